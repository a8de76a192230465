//! Causal-language-modelling examples: prompt templates with `{field}` placeholders (and the
//! built-in Alpaca template), chat conversations through the tokenizer's own chat template,
//! loss masks that keep only the part to learn, and plain text cut into `block_size` blocks or
//! packed with per-document positions.
//!
//! Labels follow `transformers`: a label of [`IGNORE`] (-100) is not learnt; the model shifts
//! labels itself (position `t` predicts `labels[t + 1]`), so `labels` lines up with `ids`.

use std::collections::BTreeMap;

use serde_json::Value;
use whet_text::{ChatMessage, TextTokenizer};

use crate::classification::Side;
use crate::error::{DataError, Result};

/// The label of a token that is not learnt (PyTorch's `ignore_index`).
pub const IGNORE: i64 = -100;

/// A tokenized language-modelling example.
#[derive(Debug, Clone, PartialEq)]
pub struct LmExample {
    pub ids: Vec<u32>,
    /// `IGNORE` where the loss is not taken.
    pub labels: Vec<i64>,
    /// Position ids; restart at 0 for every packed document.
    pub position_ids: Vec<u32>,
    /// Which packed document each token belongs to (attention stays inside a document).
    pub document_ids: Vec<u32>,
    /// Where it came from: `path:line`, or the blocks it was cut from.
    pub origin: String,
}

impl LmExample {
    fn single(ids: Vec<u32>, labels: Vec<i64>, origin: String) -> Self {
        Self {
            position_ids: (0..ids.len() as u32).collect(),
            document_ids: vec![0; ids.len()],
            ids,
            labels,
            origin,
        }
    }

    /// Tokens whose label is learnt.
    pub fn target_tokens(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE).count()
    }
}

/// A prompt / completion template: `{field}` is replaced by the row's field, `{{` and `}}` are
/// literal braces. The completion is the part learnt by default.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Template {
    pub prompt: String,
    pub completion: String,
}

impl Template {
    /// The Stanford Alpaca template (with and without the `input` field, picked per row as
    /// the Alpaca code does): fields `instruction`, `input`, `output`.
    pub fn alpaca() -> Self {
        Self {
            prompt: "Below is an instruction that describes a task{input_intro}. Write a \
                     response that appropriately completes the request.\n\n### Instruction:\n\
                     {instruction}\n\n{input_block}### Response:\n"
                .into(),
            completion: "{output}".into(),
        }
    }

    /// Fills both parts from a row, naming the file, line and field when one is missing.
    pub fn render(&self, row: &BTreeMap<String, Value>, origin: &str) -> Result<(String, String)> {
        let mut fields: BTreeMap<String, String> = BTreeMap::new();
        for (k, v) in row {
            fields.insert(
                k.clone(),
                match v {
                    Value::String(s) => s.clone(),
                    Value::Null => String::new(),
                    other => other.to_string(),
                },
            );
        }
        // The Alpaca template has an optional input section, chosen per row.
        if *self == Self::alpaca() {
            let input = fields.get("input").cloned().unwrap_or_default();
            let (intro, block) = if input.trim().is_empty() {
                (String::new(), String::new())
            } else {
                (
                    ", paired with an input that provides further context".to_string(),
                    format!("### Input:\n{input}\n\n"),
                )
            };
            fields.insert("input_intro".into(), intro);
            fields.insert("input_block".into(), block);
        }
        Ok((
            fill(&self.prompt, &fields, origin)?,
            fill(&self.completion, &fields, origin)?,
        ))
    }
}

fn fill(template: &str, fields: &BTreeMap<String, String>, origin: &str) -> Result<String> {
    let err = |message: String| DataError::Template {
        origin: origin.to_string(),
        message,
    };
    let mut out = String::new();
    let mut chars = template.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                out.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                out.push('}');
            }
            '{' => {
                let name: String = chars.by_ref().take_while(|&c| c != '}').collect();
                let value = fields.get(&name).ok_or_else(|| {
                    err(format!(
                        "the template names field {{{name}}}, which the row lacks (fields: {})",
                        fields.keys().cloned().collect::<Vec<_>>().join(", ")
                    ))
                })?;
                out.push_str(value);
            }
            '}' => return Err(err("a lone '}' in the template (write '}}')".into())),
            c => out.push(c),
        }
    }
    Ok(out)
}

/// What to do with an example longer than the model's context.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TooLong {
    /// Stop with an error naming the example.
    #[default]
    Error,
    /// Cut it to `max_length` tokens.
    Truncate,
    /// Leave it out (the caller counts and reports the skips).
    Skip,
}

/// How long an example may be and what happens past that.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub max_length: usize,
    pub too_long: TooLong,
    /// Which end [`TooLong::Truncate`] cuts: `Right` keeps the start (trl's `keep_start`),
    /// `Left` the end.
    pub side: Side,
}

impl Limit {
    /// A limit that truncates (when asked to) from the right, keeping the start.
    pub fn new(max_length: usize, too_long: TooLong) -> Self {
        Self {
            max_length,
            too_long,
            side: Side::Right,
        }
    }
}

/// Applies the too-long policy; `None` means skipped.
fn fit(mut ex: LmExample, limit: Limit) -> Result<Option<LmExample>> {
    let Limit {
        max_length,
        too_long,
        side,
    } = limit;
    if ex.ids.len() <= max_length {
        return Ok(Some(ex));
    }
    match too_long {
        TooLong::Error => Err(DataError::Tokenize(format!(
            "{}: {} tokens, longer than max_length = {max_length} (set data.too_long = \
             \"truncate\" or \"skip\")",
            ex.origin,
            ex.ids.len()
        ))),
        TooLong::Skip => Ok(None),
        TooLong::Truncate => {
            let keep = match side {
                Side::Right => 0..max_length,
                Side::Left => ex.ids.len() - max_length..ex.ids.len(),
            };
            ex.ids = ex.ids[keep.clone()].to_vec();
            ex.labels = ex.labels[keep].to_vec();
            // Positions count from the first kept token.
            ex.position_ids = (0..max_length as u32).collect();
            ex.document_ids.truncate(max_length);
            Ok(Some(ex))
        }
    }
}

/// A prompt and its completion as one example: the prompt with the tokenizer's special tokens
/// (BOS where it adds one), the completion without, then EOS so the model learns to stop. The
/// two parts are tokenized separately and joined, as `trl` does for prompt-completion data;
/// only the completion and EOS are learnt unless `train_on_prompt`.
pub fn prompt_completion(
    tokenizer: &TextTokenizer,
    prompt: &str,
    completion: &str,
    train_on_prompt: bool,
    limit: Limit,
    origin: &str,
) -> Result<Option<LmExample>> {
    let enc = |text: &str, special: bool| -> Result<Vec<u32>> {
        tokenizer
            .encode(text, special)
            .map_err(|e| DataError::Tokenize(format!("{origin}: {e}")))
    };
    let p = enc(prompt, true)?;
    let mut c = enc(completion, false)?;
    if let Some(eos) = &tokenizer.eos {
        c.push(eos.id);
    }
    let mut labels: Vec<i64> = if train_on_prompt {
        p.iter().map(|&t| t as i64).collect()
    } else {
        vec![IGNORE; p.len()]
    };
    labels.extend(c.iter().map(|&t| t as i64));
    let mut ids = p;
    ids.extend(c);
    fit(LmExample::single(ids, labels, origin.to_string()), limit)
}

/// A conversation as data holds it: a list of `{role, content}` objects. The error says what
/// is wrong, for the caller to place (file, line, column).
pub fn chat_messages(value: &Value) -> std::result::Result<Vec<ChatMessage>, String> {
    let list = value
        .as_array()
        .ok_or_else(|| format!("expected a list of messages, got {value}"))?;
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let field = |k: &str| {
                m.get(k)
                    .and_then(Value::as_str)
                    .map(String::from)
                    .ok_or_else(|| format!("message {i} has no string field {k:?}"))
            };
            Ok(ChatMessage {
                role: field("role")?,
                content: field("content")?,
            })
        })
        .collect()
}

/// A conversation rendered with the tokenizer's chat template, byte for byte as
/// `apply_chat_template(messages, tokenize=False)`; only the assistant turns (their text and
/// the template's end-of-turn after it) are learnt unless `train_on_prompt`. The spans come
/// from rendering growing prefixes of the conversation: what an assistant message adds after
/// the generation prompt of the turns before it.
pub fn chat(
    tokenizer: &TextTokenizer,
    messages: &[ChatMessage],
    train_on_prompt: bool,
    limit: Limit,
    origin: &str,
) -> Result<Option<LmExample>> {
    let err = |message: String| DataError::Template {
        origin: origin.to_string(),
        message,
    };
    if !messages.iter().any(|m| m.role == "assistant") {
        return Err(err(
            "the conversation has no assistant turn, so there is nothing to learn".into(),
        ));
    }
    let render = |msgs: &[ChatMessage], gen_prompt: bool| {
        tokenizer
            .apply_chat_template(msgs, gen_prompt)
            .map_err(|e| err(e.to_string()))
    };
    let text = render(messages, false)?;
    // Byte spans of the text to learn.
    let mut spans = Vec::new();
    for (k, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let before = render(&messages[..k], true)?;
        let through = render(&messages[..=k], false)?;
        if !text.starts_with(&through) || !through.starts_with(&before) {
            return Err(err(
                "the chat template does not render a conversation as the concatenation of its \
                 turns, so assistant turns cannot be located"
                    .into(),
            ));
        }
        spans.push((before.len(), through.len()));
    }
    // The template holds BOS itself, as apply_chat_template assumes.
    let enc = tokenizer
        .inner
        .encode(text.as_str(), false)
        .map_err(|e| DataError::Tokenize(format!("{origin}: {e}")))?;
    let ids = enc.get_ids().to_vec();
    // As transformers' `return_assistant_tokens_mask`: every token from the one holding a
    // span's first byte to the one holding its last, so a token straddling the edge counts.
    let labels = ids
        .iter()
        .zip(enc.get_offsets())
        .map(|(&id, &(start, end))| {
            let learnt = train_on_prompt
                || spans
                    .iter()
                    .any(|&(a, b)| end > start && end > a && start < b);
            if learnt { id as i64 } else { IGNORE }
        })
        .collect();
    fit(LmExample::single(ids, labels, origin.to_string()), limit)
}

/// A conversational prompt and its completion (`trl`'s prompt-completion data): the prompt
/// messages rendered with the generation prompt, the whole conversation without; the completion
/// starts where the two token sequences diverge, as `trl`'s `SFTTrainer` finds it. Only the
/// completion is learnt unless `train_on_prompt`, whatever assistant turns the prompt holds
/// (few-shot answers are context, not targets).
pub fn chat_completion(
    tokenizer: &TextTokenizer,
    prompt: &[ChatMessage],
    completion: &[ChatMessage],
    train_on_prompt: bool,
    limit: Limit,
    origin: &str,
) -> Result<Option<LmExample>> {
    let err = |message: String| DataError::Template {
        origin: origin.to_string(),
        message,
    };
    if completion.is_empty() {
        return Err(err(
            "the completion is empty, so there is nothing to learn".into()
        ));
    }
    let render = |msgs: &[ChatMessage], gen_prompt: bool| {
        tokenizer
            .apply_chat_template(msgs, gen_prompt)
            .map_err(|e| err(e.to_string()))
    };
    let whole: Vec<ChatMessage> = prompt.iter().chain(completion).cloned().collect();
    // The template holds BOS itself, as apply_chat_template assumes.
    let enc = |text: String| {
        tokenizer
            .inner
            .encode(text.as_str(), false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| DataError::Tokenize(format!("{origin}: {e}")))
    };
    let prompt_ids = enc(render(prompt, true)?)?;
    let ids = enc(render(&whole, false)?)?;
    let prompt_len = prompt_ids
        .iter()
        .zip(&ids)
        .take_while(|(a, b)| a == b)
        .count();
    let labels = ids
        .iter()
        .enumerate()
        .map(|(i, &id)| {
            if train_on_prompt || i >= prompt_len {
                id as i64
            } else {
                IGNORE
            }
        })
        .collect();
    fit(LmExample::single(ids, labels, origin.to_string()), limit)
}

/// Concatenates tokenized documents and cuts the stream into `block_size` blocks, dropping
/// the remainder, as `transformers`' `run_clm.py` `group_texts` does. Every token is learnt.
pub fn group_texts(docs: &[Vec<u32>], block_size: usize) -> Vec<LmExample> {
    let stream: Vec<u32> = docs.iter().flatten().copied().collect();
    stream
        .chunks_exact(block_size.max(1))
        .enumerate()
        .map(|(i, block)| {
            LmExample::single(
                block.to_vec(),
                block.iter().map(|&t| t as i64).collect(),
                format!("block {i}"),
            )
        })
        .collect()
}

/// Packs examples into rows of at most `max_length` tokens, first fit in order: position ids
/// restart for each document and `document_ids` tell attention not to cross documents, so a
/// packed row computes what its documents would alone; the label of each document's first
/// token is ignored so no document learns from another. An example longer than `max_length`
/// goes alone into its row (apply [`TooLong`] first).
pub fn pack(examples: &[LmExample], max_length: usize) -> Vec<LmExample> {
    let mut rows: Vec<LmExample> = Vec::new();
    let mut current: Option<LmExample> = None;
    for ex in examples {
        if let Some(row) = &current
            && row.ids.len() + ex.ids.len() > max_length
        {
            rows.extend(current.take());
        }
        match current.as_mut() {
            None => {
                let mut row = ex.clone();
                row.document_ids = vec![0; ex.ids.len()];
                current = Some(row);
            }
            Some(row) => {
                let doc = row.document_ids.last().map_or(0, |d| d + 1);
                row.ids.extend(&ex.ids);
                // The previous document's last token must not learn to predict this one's
                // first (as DataCollatorWithFlattening does).
                let at = row.labels.len();
                row.labels.extend(&ex.labels);
                row.labels[at] = IGNORE;
                row.position_ids.extend(0..ex.ids.len() as u32);
                row.document_ids
                    .extend(std::iter::repeat_n(doc, ex.ids.len()));
                row.origin = format!("{} + {}", row.origin, ex.origin);
            }
        }
    }
    rows.extend(current);
    rows
}
