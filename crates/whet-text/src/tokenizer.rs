//! Tokenizers exactly as Hugging Face builds them, from a model folder or from GGUF metadata,
//! and chat templates rendered as `transformers`' `apply_chat_template` renders them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{Result, TextError};

/// A special token and its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Special {
    /// Token text, e.g. `<|endoftext|>`.
    pub text: String,
    /// Vocabulary id.
    pub id: u32,
}

/// One chat message, as `apply_chat_template` takes them.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq, Hash)]
pub struct ChatMessage {
    /// "system", "user" or "assistant".
    pub role: String,
    /// The text.
    pub content: String,
}

/// A Hugging Face tokenizer with the special tokens and chat template of its model.
#[derive(Clone)]
pub struct TextTokenizer {
    /// The `tokenizers` tokenizer; truncation and padding are off (whet pads per batch).
    pub inner: Tokenizer,
    /// Beginning-of-sequence token.
    pub bos: Option<Special>,
    /// End-of-sequence token.
    pub eos: Option<Special>,
    /// Padding token.
    pub pad: Option<Special>,
    /// Jinja chat template.
    pub chat_template: Option<String>,
    /// Where it came from, for errors.
    pub source: String,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("source", &self.source)
            .field("vocab", &self.inner.get_vocab_size(true))
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("pad", &self.pad)
            .finish()
    }
}

pub(crate) fn tok_err(source: &str, e: impl std::fmt::Display) -> TextError {
    TextError::Tokenizer {
        source_name: source.to_string(),
        message: e.to_string(),
    }
}

impl TextTokenizer {
    /// Loads `tokenizer.json` (or GPT-2 style `vocab.json` + `merges.txt`) from a model folder,
    /// with special tokens and chat template from `tokenizer_config.json` /
    /// `special_tokens_map.json`. Truncation and padding baked into the file are switched off.
    pub fn from_folder(dir: &Path) -> Result<Self> {
        let config = read_optional_json(&dir.join("tokenizer_config.json"))?;
        let map = read_optional_json(&dir.join("special_tokens_map.json"))?;
        let tj = dir.join("tokenizer.json");
        let source = tj.display().to_string();
        let mut inner = if tj.is_file() {
            tokenizer_from_file(&tj, &source)?
        } else if dir.join("vocab.json").is_file() && dir.join("merges.txt").is_file() {
            gpt2_from_files(&dir.join("vocab.json"), &dir.join("merges.txt"))?
        } else {
            return Err(TextError::MissingFile {
                path: tj,
                hint: "a model folder needs tokenizer.json (or vocab.json and merges.txt)".into(),
            });
        };
        if let Some(id) = inner
            .get_post_processor()
            .and_then(|p| serde_json::to_value(p).ok())
            .and_then(|p| undefined_template_token(&p))
        {
            return Err(tok_err(
                &source,
                format!(
                    "the post-processor's template uses the special token {id:?}, which its \
                     special_tokens do not define"
                ),
            ));
        }
        if inner.get_vocab_size(false) == 0 {
            // Every text would encode to its special tokens only (GPT-2's: to nothing), and a
            // model's forward pass would fail on an empty sequence far from the cause.
            return Err(tok_err(
                &source,
                "the model's vocabulary is empty (only added tokens are defined): the file was \
                 written without its vocabulary",
            ));
        }
        inner
            .with_truncation(None)
            .map_err(|e| tok_err(&source, e))?;
        inner.with_padding(None);
        let special = |key: &str| -> Option<Special> {
            let text = [&config, &map]
                .iter()
                .filter_map(|j| j.as_ref()?.get(key))
                .find_map(token_text)?;
            let id = inner.token_to_id(&text)?;
            Some(Special { text, id })
        };
        let chat_template = config.as_ref().and_then(|c| match c.get("chat_template")? {
            serde_json::Value::String(s) => Some(s.clone()),
            // A list of named templates: take "default".
            serde_json::Value::Array(list) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(String::from)),
            _ => None,
        });
        // As transformers: a `chat_template.jinja` file takes priority over the config's entry.
        let chat_template = std::fs::read_to_string(dir.join("chat_template.jinja"))
            .ok()
            .or(chat_template);
        Ok(Self {
            bos: special("bos_token"),
            eos: special("eos_token"),
            pad: special("pad_token"),
            chat_template,
            source,
            inner,
        })
    }

    /// The tokenizer of a model folder ([`TextTokenizer::from_folder`]) or of a `.gguf` file
    /// (its metadata, [`crate::gguf::tokenizer`]).
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_file() {
            crate::gguf::tokenizer(&whet_gguf::GgufFile::open(path)?)
        } else {
            Self::from_folder(path)
        }
    }

    /// Token ids of `text`; `add_special_tokens` as in `transformers` (BOS/CLS/SEP per the
    /// tokenizer's post-processor).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(|e| tok_err(&self.source, e))?
            .get_ids()
            .to_vec())
    }

    /// Token ids of a text pair (`[CLS] a [SEP] b [SEP]` for BERT), with segment ids.
    pub fn encode_pair(&self, a: &str, b: &str) -> Result<(Vec<u32>, Vec<u32>)> {
        let enc = self
            .inner
            .encode_fast((a, b), true)
            .map_err(|e| tok_err(&self.source, e))?;
        Ok((enc.get_ids().to_vec(), enc.get_type_ids().to_vec()))
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| tok_err(&self.source, e))
    }

    /// Renders the chat template over `messages`, as `apply_chat_template(...,
    /// tokenize=False)`: Jinja with `trim_blocks` and `lstrip_blocks`, `bos_token` and
    /// `eos_token` in scope, and `raise_exception` available.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            tok_err(
                &self.source,
                "this model has no chat template (tokenizer_config.json \"chat_template\" or GGUF \
                 tokenizer.chat_template)",
            )
        })?;
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", template)
            .map_err(|e| tok_err(&self.source, format!("chat template: {e}")))?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| tok_err(&self.source, format!("chat template: {e}")))?;
        let text = |s: &Option<Special>| s.as_ref().map(|s| s.text.clone()).unwrap_or_default();
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => text(&self.bos),
            eos_token => text(&self.eos),
        })
        .map_err(|e| tok_err(&self.source, format!("chat template: {e}")))
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// `Tokenizer::from_file`, with a panic of its deserialiser turned into the error it should
/// have been (tokenizers 0.22 `expect`s a decoder to deserialise, in `decoders/mod.rs`).
fn tokenizer_from_file(path: &Path, source: &str) -> Result<Tokenizer> {
    std::panic::catch_unwind(|| Tokenizer::from_file(path))
        .unwrap_or_else(|_| Err("malformed tokenizer.json (the tokenizers crate panicked)".into()))
        .map_err(|e| tok_err(source, e))
}

/// A special token that a `TemplateProcessing` (alone or in a `Sequence`) places but does not
/// define: tokenizers deserialises such a template and then panics on the first encode.
fn undefined_template_token(p: &serde_json::Value) -> Option<String> {
    use serde_json::Value;
    match p {
        Value::Object(o) => {
            if o.get("type").and_then(|t| t.as_str()) == Some("TemplateProcessing") {
                let defined = o.get("special_tokens").and_then(|s| s.as_object());
                let undefined = ["single", "pair"]
                    .iter()
                    .filter_map(|k| o.get(*k)?.as_array())
                    .flatten()
                    .filter_map(|piece| piece.get("SpecialToken")?.get("id")?.as_str())
                    .find(|id| !defined.is_some_and(|d| d.contains_key(*id)));
                if let Some(id) = undefined {
                    return Some(id.to_string());
                }
            }
            o.values().find_map(undefined_template_token)
        }
        Value::Array(a) => a.iter().find_map(undefined_template_token),
        _ => None,
    }
}

fn read_optional_json(path: &Path) -> Result<Option<serde_json::Value>> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| TextError::Config {
                path: path.to_path_buf(),
                message: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(TextError::io(path, e)),
    }
}

/// `"<s>"` or `{"content": "<s>", ...}`.
fn token_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(String::from),
        _ => None,
    }
}

/// A byte-level BPE tokenizer as `transformers`' `GPT2Converter` builds one: BPE over the
/// vocabulary and merges, ByteLevel pre-tokenizer and decoder, and either a BOS template or the
/// ByteLevel post-processor.
pub fn byte_level_bpe(
    vocab: HashMap<String, u32>,
    merges: Vec<(String, String)>,
    specials: &[String],
    add_prefix_space: bool,
    bos_to_add: Option<&Special>,
    source: &str,
) -> Result<Tokenizer> {
    let vocab: ahash::AHashMap<String, u32> = vocab.into_iter().collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| tok_err(source, e))?;
    let mut tok = Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(
        ByteLevel::default()
            .add_prefix_space(add_prefix_space)
            .trim_offsets(true),
    ));
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    match bos_to_add {
        Some(bos) => {
            tok.with_post_processor(Some(bos_template(bos, source)?));
        }
        None => {
            tok.with_post_processor(Some(ByteLevel::default().trim_offsets(false)));
        }
    }
    let added: Vec<AddedToken> = specials
        .iter()
        .map(|s| AddedToken::from(s.clone(), true))
        .collect();
    tok.add_special_tokens(&added);
    Ok(tok)
}

/// The post-processor that puts BOS in front, as transformers' `update_post_processor` writes it
/// for `add_bos_token`: `BOS $A` and `BOS $A BOS $B`.
pub(crate) fn bos_template(bos: &Special, source: &str) -> Result<TemplateProcessing> {
    TemplateProcessing::builder()
        .try_single(format!("{}:0 $A:0", bos.text))
        .and_then(|b| b.try_pair(format!("{0}:0 $A:0 {0}:1 $B:1", bos.text)))
        .map_err(|e| tok_err(source, e))?
        .special_tokens(vec![(bos.text.clone(), bos.id)])
        .build()
        .map_err(|e| tok_err(source, e))
}

/// GPT-2's tokenizer from its original `vocab.json` (= `encoder.json`) and `merges.txt`
/// (= `vocab.bpe`), as `GPT2TokenizerFast(vocab_file, merges_file)` builds it.
pub fn gpt2_from_files(vocab: &Path, merges: &Path) -> Result<Tokenizer> {
    let source = vocab.display().to_string();
    let text = std::fs::read_to_string(vocab).map_err(|e| TextError::io(vocab, e))?;
    let vocab_map: HashMap<String, u32> =
        serde_json::from_str(&text).map_err(|e| TextError::Config {
            path: vocab.to_path_buf(),
            message: e.to_string(),
        })?;
    let merges_text = std::fs::read_to_string(merges).map_err(|e| TextError::io(merges, e))?;
    let merges = parse_merges(&merges_text, merges)?;
    let specials: Vec<String> = ["<|endoftext|>"]
        .iter()
        .filter(|s| vocab_map.contains_key(**s))
        .map(|s| s.to_string())
        .collect();
    byte_level_bpe(vocab_map, merges, &specials, false, None, &source)
}

/// Parses `merges.txt`: one "left right" pair a line after an optional `#version` header.
pub fn parse_merges(text: &str, path: &Path) -> Result<Vec<(String, String)>> {
    text.lines()
        .enumerate()
        .filter(|(i, l)| !(l.is_empty() || (*i == 0 && l.starts_with("#version"))))
        .map(|(i, l)| {
            l.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| TextError::Config {
                    path: PathBuf::from(path),
                    message: format!("line {}: a merge needs two tokens, got {l:?}", i + 1),
                })
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A byte-level BPE over "h", "i", "a" with one merge, `<s>` added as BOS and `</s>` as EOS,
    /// and a one-line chat template.
    pub(crate) fn tiny() -> TextTokenizer {
        let vocab: HashMap<String, u32> = ["h", "i", "hi", "<s>", "</s>", "a"]
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        let bos = Special {
            text: "<s>".into(),
            id: 3,
        };
        let specials = ["<s>".to_string(), "</s>".to_string()];
        let merges = vec![("h".to_string(), "i".to_string())];
        let inner = byte_level_bpe(vocab, merges, &specials, false, Some(&bos), "tiny").unwrap();
        TextTokenizer {
            inner,
            bos: Some(bos),
            eos: Some(Special {
                text: "</s>".into(),
                id: 4,
            }),
            pad: None,
            chat_template: Some(
                "{{ bos_token }}{% for m in messages %}{{ m.role }}: {{ m.content }}{{ eos_token \
                 }}{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
                    .into(),
            ),
            source: "tiny".into(),
        }
    }

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn encodes_with_bos_and_decodes_without_specials() {
        let t = tiny();
        assert_eq!(t.encode("hihi", true).unwrap(), [3, 2, 2]);
        assert_eq!(t.encode("<s>hi</s>", false).unwrap(), [3, 2, 4]);
        assert_eq!(t.decode(&[3, 2, 2, 4], true).unwrap(), "hihi");
        assert_eq!(t.vocab_size(), 6);
    }

    #[test]
    fn chat_template_renders_with_bos_eos_and_generation_prompt() {
        let t = tiny();
        let m = [msg("user", "hi")];
        assert_eq!(
            t.apply_chat_template(&m, true).unwrap(),
            "<s>user: hi</s>assistant:"
        );
        assert_eq!(t.apply_chat_template(&m, false).unwrap(), "<s>user: hi</s>");
    }

    #[test]
    fn chat_template_errors_name_the_tokenizer() {
        let mut t = tiny();
        t.chat_template = Some("{{ raise_exception('no system role') }}".into());
        let e = t.apply_chat_template(&[], false).unwrap_err().to_string();
        assert!(
            e.starts_with("tokenizer tiny: chat template:") && e.contains("no system role"),
            "{e}"
        );
        t.chat_template = None;
        let e = t.apply_chat_template(&[], false).unwrap_err().to_string();
        assert!(e.contains("has no chat template"), "{e}");
    }

    #[test]
    fn loads_a_folder_with_specials_and_template() {
        let t = tiny();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("tokenizer.json"),
            t.inner.to_string(false).unwrap(),
        )
        .unwrap();
        let config = serde_json::json!({
            "bos_token": "<s>",
            "eos_token": {"content": "</s>"},
            "chat_template": [{"name": "default", "template": "{{ eos_token }}"}],
        });
        std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
        for loaded in [
            TextTokenizer::from_folder(dir.path()).unwrap(),
            TextTokenizer::open(dir.path()).unwrap(),
        ] {
            assert_eq!(loaded.bos, t.bos);
            assert_eq!(loaded.eos, t.eos);
            assert_eq!(loaded.pad, None);
            assert_eq!(loaded.chat_template.as_deref(), Some("{{ eos_token }}"));
            assert_eq!(loaded.encode("hihi", true).unwrap(), [3, 2, 2]);
        }
        // An empty vocabulary (transformers 5's `GPT2TokenizerFast(vocab_file=..,
        // merges_file=..)` saved one here) is refused at load, naming the file.
        let mut empty: serde_json::Value =
            serde_json::from_str(&t.inner.to_string(false).unwrap()).unwrap();
        empty["model"]["vocab"] = serde_json::json!({});
        empty["model"]["merges"] = serde_json::json!([]);
        let bad = tempfile::tempdir().unwrap();
        std::fs::write(bad.path().join("tokenizer.json"), empty.to_string()).unwrap();
        let e = TextTokenizer::from_folder(bad.path())
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("tokenizer.json") && e.contains("vocabulary is empty"),
            "{e}"
        );
        // As transformers: chat_template.jinja takes priority over the config's entry.
        std::fs::write(dir.path().join("chat_template.jinja"), "{{ bos_token }}").unwrap();
        let loaded = TextTokenizer::from_folder(dir.path()).unwrap();
        assert_eq!(loaded.chat_template.as_deref(), Some("{{ bos_token }}"));
    }

    #[test]
    fn a_folder_without_tokenizer_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let e = TextTokenizer::from_folder(dir.path()).unwrap_err();
        assert!(
            matches!(&e, TextError::MissingFile { path, .. } if path.ends_with("tokenizer.json"))
        );
        assert!(e.to_string().starts_with("missing file "), "{e}");
        std::fs::write(dir.path().join("tokenizer_config.json"), "{").unwrap();
        let e = TextTokenizer::from_folder(dir.path()).unwrap_err();
        assert!(e.to_string().starts_with("invalid "), "{e}");
    }

    #[test]
    fn merges_parse_after_a_version_header_and_name_a_bad_line() {
        let p = Path::new("merges.txt");
        let m = parse_merges("#version: 0.2\nh i\n\nhi i\n", p).unwrap();
        assert_eq!(
            m,
            [("h".into(), "i".into()), ("hi".into(), "i".into())] as [(String, String); 2]
        );
        let e = parse_merges("h i\nbad\n", p).unwrap_err().to_string();
        assert!(
            e.starts_with("invalid merges.txt: line 2: a merge needs two tokens"),
            "{e}"
        );
    }
}
