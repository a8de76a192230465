//! Token-classification examples (named entities, parts of speech), as `run_ner.py` reads
//! them: a list of words and a list of tags a row (`tokens` / `ner_tags`, the `conll2003`
//! layout), tokenized word by word with the tag on each word's first token and `-100` (not
//! learnt) on its other tokens and on the special tokens (`label_all_tokens = False`).

use serde_json::Value;
use tokenizers::{EncodeInput, InputSequence, TruncationDirection, TruncationParams};
use whet_text::TextTokenizer;

use crate::classification::Labels;
use crate::error::{DataError, Result};
use crate::table::Table;

/// The label of a token that is not learnt (`CrossEntropyLoss`'s `ignore_index`).
pub const IGNORE_TAG: i64 = -100;

/// Which columns hold the words and their tags.
#[derive(Debug, Clone)]
pub struct TokenColumns {
    pub tokens: String,
    pub tags: String,
}

impl TokenColumns {
    /// `run_ner.py`'s choice: the named columns where the table has them, else `tokens` and
    /// `ner_tags`.
    pub fn for_table(table: &Table, tokens: &str, tags: &str) -> Self {
        let has = |c: &str| table.columns.iter().any(|k| k == c);
        Self {
            tokens: if has(tokens) { tokens } else { "tokens" }.to_string(),
            tags: if has(tags) { tags } else { "ner_tags" }.to_string(),
        }
    }
}

/// One sentence: its words and each word's tag id.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenExample {
    pub words: Vec<String>,
    pub tags: Vec<usize>,
    /// `path:line`.
    pub origin: String,
}

/// Reads the sentences of a table; the tags are names or ids of `labels`
/// ([`Labels::infer`] reads a column of tag lists, ClassLabel names included).
pub fn token_examples(
    table: &Table,
    cols: &TokenColumns,
    labels: &Labels,
) -> Result<Vec<TokenExample>> {
    table.require(&[&cols.tokens, &cols.tags])?;
    let err = |line: usize, column: &str, message: String| DataError::Value {
        path: table.locate(line).0,
        line: table.locate(line).1,
        column: column.to_string(),
        message,
    };
    table
        .rows
        .iter()
        .map(|(line, row)| {
            let Some(Value::Array(words)) = row.get(&cols.tokens) else {
                return Err(err(*line, &cols.tokens, "expected a list of words".into()));
            };
            let words = words
                .iter()
                .map(|w| match w {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(err(
                        *line,
                        &cols.tokens,
                        format!("a word must be text, got {other}"),
                    )),
                })
                .collect::<Result<Vec<_>>>()?;
            let Some(Value::Array(tags)) = row.get(&cols.tags) else {
                return Err(err(*line, &cols.tags, "expected a list of tags".into()));
            };
            if tags.len() != words.len() {
                return Err(err(
                    *line,
                    &cols.tags,
                    format!("{} tags for {} words", tags.len(), words.len()),
                ));
            }
            let tags = tags
                .iter()
                .map(|t| labels.id(table, *line, &cols.tags, Some(t)))
                .collect::<Result<Vec<_>>>()?;
            Ok(TokenExample {
                words,
                tags,
                origin: table.origin(*line),
            })
        })
        .collect()
}

/// A tokenized sentence: token ids and each token's tag (or [`IGNORE_TAG`]).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEncoded {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
    pub tags: Vec<i64>,
}

/// Tokenizes sentences word by word (`is_split_into_words=True`), truncated to `max_length`
/// tokens from the right, each word's tag on its first token (`label_all_tokens = False`).
pub fn tokenize_words(
    tokenizer: &TextTokenizer,
    examples: &[TokenExample],
    max_length: usize,
) -> Result<Vec<TokenEncoded>> {
    let mut tok = tokenizer.inner.clone();
    tok.with_truncation(Some(TruncationParams {
        max_length,
        direction: TruncationDirection::Right,
        ..Default::default()
    }))
    .map_err(|e| DataError::Tokenize(e.to_string()))?;
    examples
        .iter()
        .map(|ex| {
            let words: Vec<&str> = ex.words.iter().map(String::as_str).collect();
            let input = EncodeInput::Single(InputSequence::from(words));
            // `encode`, not `encode_fast`: the fast path leaves the word ids out.
            let enc = tok
                .encode(input, true)
                .map_err(|e| DataError::Tokenize(format!("{}: {e}", ex.origin)))?;
            let mut previous = None;
            let tags = enc
                .get_word_ids()
                .iter()
                .map(|w| {
                    let tag = match w {
                        Some(w) if previous != Some(*w) => ex.tags[*w as usize] as i64,
                        _ => IGNORE_TAG,
                    };
                    previous = *w;
                    tag
                })
                .collect();
            Ok(TokenEncoded {
                ids: enc.get_ids().to_vec(),
                type_ids: enc.get_type_ids().to_vec(),
                tags,
            })
        })
        .collect()
}

/// A padded batch of tokenized sentences (right padding; tags [`IGNORE_TAG`] on padding).
#[derive(Debug, Clone)]
pub struct TokenBatch {
    pub input_ids: Vec<i64>,
    pub attention_mask: Vec<i64>,
    pub token_type_ids: Vec<i64>,
    pub tags: Vec<i64>,
    pub batch: usize,
    pub len: usize,
    /// Non-padding tokens.
    pub tokens: usize,
    /// Tokens with a tag to learn.
    pub tagged: usize,
}

/// Pads sentences to the longest of them.
pub fn collate_tokens(items: &[&TokenEncoded], pad_id: u32) -> TokenBatch {
    let len = items.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    let n = items.len();
    let mut b = TokenBatch {
        input_ids: vec![pad_id as i64; n * len],
        attention_mask: vec![0; n * len],
        token_type_ids: vec![0; n * len],
        tags: vec![IGNORE_TAG; n * len],
        batch: n,
        len,
        tokens: 0,
        tagged: 0,
    };
    for (r, e) in items.iter().enumerate() {
        for (k, &id) in e.ids.iter().enumerate() {
            let at = r * len + k;
            b.input_ids[at] = id as i64;
            b.attention_mask[at] = 1;
            b.token_type_ids[at] = e.type_ids[k] as i64;
            b.tags[at] = e.tags[k];
        }
        b.tokens += e.ids.len();
        b.tagged += e.tags.iter().filter(|&&t| t != IGNORE_TAG).count();
    }
    b
}
