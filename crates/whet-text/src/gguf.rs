//! Tokenizers in GGUF metadata: the tokenizer a GGUF file describes, built as `transformers`'
//! GGUF integration builds it (byte-level BPE, and Gemma's SentencePiece vocabulary); the
//! `tokenizer_config.json` that makes `AutoTokenizer` behave the same; and a tokenizer written
//! back as `tokenizer.ggml.*` metadata.

use std::collections::HashMap;

use whet_gguf::GgufFile;

use crate::error::{Result, TextError};
use crate::tokenizer::{Special, TextTokenizer, byte_level_bpe, tok_err};

/// The split regexes llama.cpp names in `tokenizer.ggml.pre` for byte-level vocabularies, as
/// transformers' `GGUF_PRE_TOKENIZER_SPLITS` applies them (the ones whet reads and writes);
/// other names keep the plain byte-level split.
const PRE_TOKENIZER_SPLITS: &[(&str, &str)] = &[
    ("qwen2", QWEN2_SPLIT),
    ("deepseek-r1-qwen", QWEN2_SPLIT),
    ("llama-bpe", LLAMA3_SPLIT),
    ("llama3", LLAMA3_SPLIT),
    ("llama-v3", LLAMA3_SPLIT),
];

/// `transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX`.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// transformers' `_LLAMA3_SPLIT`.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The architectures whose SentencePiece vocabulary (`tokenizer.ggml.model = "llama"`) whet
/// builds, as transformers' `gemma_tokenizer` does.
const GEMMA_ARCHS: &[&str] = &["gemma", "gemma2", "gemma3"];

/// The tokenizer a GGUF file's metadata describes: byte-level BPE (`tokenizer.ggml.model =
/// "gpt2"`, with control and user-defined tokens registered as special added tokens), or the
/// SentencePiece vocabulary of a Gemma file (see [`gemma_sentencepiece`]).
pub fn tokenizer(file: &GgufFile) -> Result<TextTokenizer> {
    let source = file.path().display().to_string();
    let model = file.get_str("tokenizer.ggml.model")?;
    let arch = file.get_str("general.architecture").unwrap_or_default();
    let gemma = model == "llama" && GEMMA_ARCHS.contains(&arch);
    if model != "gpt2" && !gemma {
        return Err(TextError::Tokenizer {
            source_name: source,
            message: format!(
                "GGUF tokenizer model {model:?} is not supported for architecture {arch:?} \
                 (byte-level BPE \"gpt2\" is, and SentencePiece \"llama\" of {})",
                GEMMA_ARCHS.join(", ")
            ),
        });
    }
    let tokens = file.get_strings("tokenizer.ggml.tokens")?;
    let types: Vec<u64> = file
        .get("tokenizer.ggml.token_type")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().map(|v| v.as_u64().unwrap_or(1)).collect())
        .unwrap_or_default();
    let special = |k: &str| -> Option<Special> {
        let id = file.get(&format!("tokenizer.ggml.{k}"))?.as_u64()? as u32;
        Some(Special {
            text: tokens.get(id as usize)?.to_string(),
            id,
        })
    };
    let bos = special("bos_token_id");
    let add_bos = file
        .get("tokenizer.ggml.add_bos_token")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let bos_to_add = if add_bos { bos.as_ref() } else { None };
    let inner = if gemma {
        gemma_sentencepiece(&tokens, &types, bos_to_add, &source)?
    } else {
        gpt2_bpe(file, &tokens, &types, bos_to_add, &source)?
    };
    Ok(TextTokenizer {
        inner,
        eos: special("eos_token_id"),
        pad: special("padding_token_id"),
        bos,
        chat_template: file
            .get("tokenizer.chat_template")
            .and_then(|v| v.as_str())
            .map(String::from),
        source,
    })
}

/// Byte-level BPE from `tokenizer.ggml.tokens` / `merges`, as `GGUFGPTConverter` builds it.
fn gpt2_bpe(
    file: &GgufFile,
    tokens: &[&str],
    types: &[u64],
    bos_to_add: Option<&Special>,
    source: &str,
) -> Result<tokenizers::Tokenizer> {
    let source = source.to_string();
    let merges = file
        .get_strings("tokenizer.ggml.merges")?
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| TextError::Tokenizer {
                    source_name: source.clone(),
                    message: format!("merge #{i} {m:?} is not two tokens"),
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let vocab: HashMap<String, u32> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), i as u32))
        .collect();
    // Token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
    let specials: Vec<String> = tokens
        .iter()
        .zip(types.iter())
        .filter(|(_, ty)| matches!(**ty, 3 | 4))
        .map(|(t, _)| t.to_string())
        .collect();
    let add_prefix_space = file
        .get("tokenizer.ggml.add_space_prefix")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let mut tok = byte_level_bpe(
        vocab,
        merges,
        &specials,
        add_prefix_space,
        bos_to_add,
        &source,
    )?;
    // `set_split_regex`: the named split, then the byte-level mapping without its own regex.
    let pre = file.get("tokenizer.ggml.pre").and_then(|v| v.as_str());
    if let Some((_, regex)) = PRE_TOKENIZER_SPLITS.iter().find(|(n, _)| Some(*n) == pre) {
        use tokenizers::pre_tokenizers::byte_level::ByteLevel;
        use tokenizers::pre_tokenizers::sequence::Sequence;
        use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
        let split = Split::new(
            SplitPattern::Regex(regex.to_string()),
            tokenizers::SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| tok_err(&source, e))?;
        let bytes = ByteLevel::default()
            .add_prefix_space(false)
            .use_regex(false);
        tok.with_pre_tokenizer(Some(Sequence::new(vec![split.into(), bytes.into()])));
    }
    Ok(tok)
}

/// The `tokenizer.ggml.pre` name of a tokenizer's split regex, when it is one llama.cpp names.
fn pre_tokenizer_name(json: &serde_json::Value) -> Option<&'static str> {
    let pre = &json["pre_tokenizer"];
    let parts = pre["pretokenizers"].as_array()?;
    let regex = parts
        .iter()
        .find(|p| p["type"] == "Split")?
        .get("pattern")?
        .get("Regex")?
        .as_str()?;
    PRE_TOKENIZER_SPLITS
        .iter()
        .find(|(_, r)| *r == regex)
        .map(|(n, _)| *n)
}

/// Gemma's SentencePiece vocabulary as transformers 5's `gemma_tokenizer` builds it from a GGUF
/// file (`integrations/gguf/gguf_tokenizer_mapping.py`), which no crate reads: a `GemmaTokenizer`
/// (BPE with byte fallback, spaces normalised to `▁`), whose merges the file does not list. They
/// are rebuilt as `convert_slow_tokenizer.generate_merges` rebuilds them: every split of a token
/// into two tokens of the vocabulary is a merge, ranked by the token's position in the file
/// (earlier first; Gemma's scores do not follow its merge order), then by the lengths of the two
/// halves, longer first. Tokens of two or more spaces are stored as spaces and renamed to `▁`s
/// first. Control tokens (type 3) become special added tokens, user-defined ones (type 4) plain
/// added tokens matched whole.
pub fn gemma_sentencepiece(
    tokens: &[&str],
    types: &[u64],
    bos_to_add: Option<&Special>,
    source: &str,
) -> Result<tokenizers::Tokenizer> {
    use tokenizers::decoders::byte_fallback::ByteFallback;
    use tokenizers::decoders::fuse::Fuse;
    use tokenizers::decoders::sequence::Sequence;
    use tokenizers::models::bpe::BPE;
    use tokenizers::normalizers::replace::Replace;
    use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
    use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

    let tokens: Vec<String> = tokens
        .iter()
        .map(|t| {
            if t.contains(' ') && t.trim().is_empty() {
                "\u{2581}".repeat(t.chars().count())
            } else {
                t.to_string()
            }
        })
        .collect();
    // A dict built from the list: a repeated token keeps its last id, and its first place in
    // the iteration order.
    let vocab: HashMap<&str, u32> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i as u32))
        .collect();
    let mut merges: Vec<(&str, &str, i64)> = vec![];
    let mut seen = std::collections::HashSet::new();
    for token in &tokens {
        if !seen.insert(token.as_str()) {
            continue;
        }
        let score = -i64::from(vocab[token.as_str()]);
        let mut local: Vec<(&str, &str, i64)> = token
            .char_indices()
            .skip(1)
            .map(|(at, _)| token.split_at(at))
            .filter(|(l, r)| vocab.contains_key(l) && vocab.contains_key(r))
            .map(|(l, r)| (l, r, score))
            .collect();
        local.sort_by_key(|(l, r, _)| (vocab[l], vocab[r]));
        merges.extend(local);
    }
    let chars = |s: &str| s.chars().count();
    // Stable, descending: equal keys keep their order, as Python's sorted(reverse=True).
    merges.sort_by_key(|m| std::cmp::Reverse((m.2, chars(m.0), chars(m.1))));
    let merges: Vec<(String, String)> = merges
        .into_iter()
        .map(|(l, r, _)| (l.to_string(), r.to_string()))
        .collect();
    let vocab: ahash::AHashMap<String, u32> =
        vocab.into_iter().map(|(t, i)| (t.to_string(), i)).collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .unk_token("<unk>".into())
        .fuse_unk(true)
        .byte_fallback(true)
        .build()
        .map_err(|e| tok_err(source, e))?;
    let mut tok = Tokenizer::new(bpe);
    tok.with_normalizer(Some(
        Replace::new(" ", "\u{2581}").map_err(|e| tok_err(source, e))?,
    ));
    tok.with_pre_tokenizer(Some(
        Split::new(
            SplitPattern::String(" ".into()),
            SplitDelimiterBehavior::MergedWithPrevious,
            false,
        )
        .map_err(|e| tok_err(source, e))?,
    ));
    tok.with_decoder(Some(Sequence::new(vec![
        Replace::new("\u{2581}", " ")
            .map_err(|e| tok_err(source, e))?
            .into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ])));
    if let Some(bos) = bos_to_add {
        tok.with_post_processor(Some(crate::tokenizer::bos_template(bos, source)?));
    }
    let of_type = |ty: u64| -> Vec<&String> {
        tokens
            .iter()
            .zip(types)
            .filter(|(_, t)| **t == ty)
            .map(|(t, _)| t)
            .collect()
    };
    let control: Vec<AddedToken> = of_type(3)
        .into_iter()
        .map(|t| AddedToken::from(t.clone(), true).normalized(false))
        .collect();
    tok.add_special_tokens(&control);
    let user: Vec<AddedToken> = of_type(4)
        .into_iter()
        .map(|t| AddedToken::from(t.clone(), false).normalized(false))
        .collect();
    tok.add_tokens(&user);
    Ok(tok)
}

/// `tokenizer_config.json` for a GGUF's tokenizer: special tokens, whether BOS is added, and
/// the chat template, so `AutoTokenizer` behaves as the GGUF's tokenizer does.
pub fn tokenizer_config(
    file: &GgufFile,
    tokenizer: &TextTokenizer,
    max_positions: usize,
) -> serde_json::Value {
    let text = |s: &Option<Special>| s.as_ref().map(|s| s.text.clone());
    let add_bos = file
        .get("tokenizer.ggml.add_bos_token")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": text(&tokenizer.bos),
        "eos_token": text(&tokenizer.eos),
        "pad_token": text(&tokenizer.pad),
        "add_bos_token": add_bos,
        "clean_up_tokenization_spaces": false,
        "model_max_length": max_positions,
        "chat_template": tokenizer.chat_template,
    })
}

/// The tokenizer as GGUF metadata (`tokenizer.ggml.*`, byte-level BPE as llama.cpp's "gpt2"
/// model, and the chat template), from a `tokenizers` byte-level BPE tokenizer.
pub fn tokenizer_metadata(tok: &TextTokenizer) -> Result<Vec<(String, whet_gguf::Value)>> {
    use whet_gguf::Value;
    let bad = |message: String| TextError::Tokenizer {
        source_name: tok.source.clone(),
        message,
    };
    let json: serde_json::Value =
        serde_json::from_str(&tok.inner.to_string(false).map_err(|e| bad(e.to_string()))?)
            .map_err(|e| bad(e.to_string()))?;
    let model = &json["model"];
    if model["type"] != "BPE" {
        return Err(bad(format!(
            "GGUF export writes byte-level BPE tokenizers (llama.cpp's \"gpt2\"); this one is {}",
            model["type"]
        )));
    }
    let vocab = tok.inner.get_vocab(true);
    let n = vocab.values().map(|&i| i as usize + 1).max().unwrap_or(0);
    let mut tokens = vec![String::new(); n];
    for (t, &i) in &vocab {
        tokens[i as usize] = t.clone();
    }
    if let Some(i) = tokens.iter().position(|t| t.is_empty()) {
        return Err(bad(format!("the vocabulary has no token with id {i}")));
    }
    // Token types: 1 normal, 3 control (special added tokens), 4 user-defined (other added).
    let mut types = vec![1i32; n];
    for added in json["added_tokens"].as_array().into_iter().flatten() {
        if let Some(id) = added["id"].as_u64().filter(|&i| (i as usize) < n) {
            types[id as usize] = if added["special"].as_bool() == Some(true) {
                3
            } else {
                4
            };
        }
    }
    let merges: Vec<Value> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| match m {
            serde_json::Value::String(s) => Value::String(s.clone()),
            serde_json::Value::Array(p) => Value::String(format!(
                "{} {}",
                p.first().and_then(|v| v.as_str()).unwrap_or_default(),
                p.get(1).and_then(|v| v.as_str()).unwrap_or_default()
            )),
            _ => Value::String(String::new()),
        })
        .collect();
    let add_prefix_space = json["pre_tokenizer"]["add_prefix_space"]
        .as_bool()
        .unwrap_or(false)
        || json["pre_tokenizer"]["pretokenizers"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| p["add_prefix_space"].as_bool() == Some(true));
    // Whether encoding adds BOS: what the post-processor does to a plain text.
    let add_bos = match (&tok.bos, tok.inner.encode("a", true)) {
        (Some(b), Ok(e)) => e.get_ids().first() == Some(&b.id),
        _ => false,
    };
    let mut out = vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        (
            "tokenizer.ggml.pre".into(),
            Value::String(pre_tokenizer_name(&json).unwrap_or("default").into()),
        ),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(add_bos)),
        (
            "tokenizer.ggml.add_space_prefix".into(),
            Value::Bool(add_prefix_space),
        ),
    ];
    for (key, special) in [
        ("bos_token_id", &tok.bos),
        ("eos_token_id", &tok.eos),
        ("padding_token_id", &tok.pad),
    ] {
        if let Some(s) = special {
            out.push((format!("tokenizer.ggml.{key}"), Value::U32(s.id)));
        }
    }
    if let Some(t) = &tok.chat_template {
        out.push(("tokenizer.chat_template".into(), Value::String(t.clone())));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tokenizer written as GGUF metadata and read back encodes the same, with the same
    /// special tokens and chat template.
    #[test]
    fn metadata_round_trips() {
        let t = crate::tokenizer::tests::tiny();
        let mut w = whet_gguf::writer::GgufWriter::new();
        w.set(
            "general.architecture",
            whet_gguf::Value::String("llama".into()),
        );
        for (k, v) in tokenizer_metadata(&t).unwrap() {
            w.set(&k, v);
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        w.write(&path).unwrap();
        let file = GgufFile::open(&path).unwrap();
        for back in [
            tokenizer(&file).unwrap(),
            TextTokenizer::open(&path).unwrap(),
        ] {
            assert_eq!(back.bos, t.bos);
            assert_eq!(back.eos, t.eos);
            assert_eq!(back.chat_template, t.chat_template);
            for text in ["hihi", "<s>hi</s>"] {
                assert_eq!(
                    back.encode(text, true).unwrap(),
                    t.encode(text, true).unwrap()
                );
            }
        }
        let cfg = tokenizer_config(&file, &t, 2048);
        assert_eq!(cfg["bos_token"], "<s>");
        assert_eq!(cfg["add_bos_token"], true);
        assert_eq!(cfg["model_max_length"], 2048);
    }

    #[test]
    fn other_tokenizer_models_are_refused_by_name() {
        let mut w = whet_gguf::writer::GgufWriter::new();
        w.set(
            "tokenizer.ggml.model",
            whet_gguf::Value::String("llama".into()),
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spm.gguf");
        w.write(&path).unwrap();
        let e = tokenizer(&GgufFile::open(&path).unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("GGUF tokenizer model \"llama\" is not supported"),
            "{e}"
        );
    }
}
