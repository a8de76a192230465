//! Extractive question answering data in the SQuAD format (`question`, `context`, `answers =
//! {"text": [...], "answer_start": [...]}` with character offsets), cut into model windows as
//! `transformers`' `run_qa.py` does: the question and a window of the context per feature,
//! windows overlapping by `doc_stride` tokens, and the answer's first and last token in each
//! window (or the `[CLS]` position 0 when the answer is not inside it).

use std::collections::BTreeMap;

use serde_json::Value;
use tokenizers::{TruncationDirection, TruncationParams, TruncationStrategy};
use whet_text::TextTokenizer;

use crate::error::{DataError, Result};
use crate::table::Table;

/// A gold answer: its text and where it starts in the context, in characters.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub text: String,
    pub start: usize,
}

/// A question about a context.
#[derive(Debug, Clone, PartialEq)]
pub struct QaExample {
    pub question: String,
    pub context: String,
    /// Gold answers (the first one is trained on; all count in evaluation). Empty: no answer.
    pub answers: Vec<Answer>,
    /// `path:line`.
    pub origin: String,
}

/// Column names of question-answering data.
#[derive(Debug, Clone)]
pub struct QaColumns {
    pub question: String,
    pub context: String,
    pub answers: String,
}

impl Default for QaColumns {
    fn default() -> Self {
        Self {
            question: "question".into(),
            context: "context".into(),
            answers: "answers".into(),
        }
    }
}

/// The answers of a row: SQuAD's `{"text": [...], "answer_start": [...]}` or a list of
/// `{"text", "answer_start"}` objects.
fn answers(value: &Value) -> std::result::Result<Vec<Answer>, String> {
    let pair = |text: &Value, start: &Value| -> std::result::Result<Answer, String> {
        Ok(Answer {
            text: text
                .as_str()
                .ok_or("an answer text is not a string")?
                .to_string(),
            start: start
                .as_u64()
                .ok_or("an answer_start is not a non-negative integer")?
                as usize,
        })
    };
    match value {
        Value::Object(o) => {
            let texts = o
                .get("text")
                .and_then(|v| v.as_array())
                .ok_or("expected {\"text\": [...], \"answer_start\": [...]}")?;
            let starts = o
                .get("answer_start")
                .and_then(|v| v.as_array())
                .ok_or("expected {\"text\": [...], \"answer_start\": [...]}")?;
            if texts.len() != starts.len() {
                return Err(format!(
                    "{} answer texts but {} answer_start values",
                    texts.len(),
                    starts.len()
                ));
            }
            texts.iter().zip(starts).map(|(t, s)| pair(t, s)).collect()
        }
        Value::Array(items) => items
            .iter()
            .map(|a| {
                pair(
                    a.get("text").unwrap_or(&Value::Null),
                    a.get("answer_start").unwrap_or(&Value::Null),
                )
            })
            .collect(),
        _ => Err("expected {\"text\": [...], \"answer_start\": [...]}".into()),
    }
}

/// SQuAD's own JSON, v1.1 and v2.0 (`{"data": [{"title", "paragraphs": [{"context", "qas":
/// [{"id", "question", "answers": [{"text", "answer_start"}], "is_impossible"}]}]}]}`), as rows
/// of the flat format (`id`, `title`, `context`, `question`, `answers` with `text` and
/// `answer_start` lists), as the `squad` dataset's loading script flattens it; each row keeps
/// its article's line. `None` for a table that is not of that shape.
pub fn flatten_squad(table: &Table) -> Result<Option<Table>> {
    let has = |c: &str| table.columns.iter().any(|k| k == c);
    if !has("paragraphs") || has("question") {
        return Ok(None);
    }
    let bad = |line: usize, message: String| DataError::Value {
        path: table.locate(line).0,
        line: table.locate(line).1,
        column: "paragraphs".into(),
        message,
    };
    let mut rows = vec![];
    for (line, article) in &table.rows {
        let title = article.get("title").cloned().unwrap_or(Value::Null);
        let paragraphs = match article.get("paragraphs") {
            Some(Value::Array(p)) => p,
            other => {
                let got = other.unwrap_or(&Value::Null);
                return Err(bad(
                    *line,
                    format!("expected a list of paragraphs, got {got}"),
                ));
            }
        };
        for (k, paragraph) in paragraphs.iter().enumerate() {
            let (Some(context), Some(Value::Array(qas))) =
                (paragraph["context"].as_str(), paragraph.get("qas"))
            else {
                return Err(bad(
                    *line,
                    format!("paragraph {} has no context or no qas list", k + 1),
                ));
            };
            for qa in qas {
                let Some(question) = qa["question"].as_str() else {
                    return Err(bad(
                        *line,
                        format!("a question of paragraph {} has no text", k + 1),
                    ));
                };
                // v2.0's unanswerable questions have no answers (their plausible_answers are
                // not answers).
                let answers = qa["answers"].as_array().cloned().unwrap_or_default();
                let row = BTreeMap::from([
                    ("id".to_string(), qa["id"].clone()),
                    ("title".to_string(), title.clone()),
                    ("context".to_string(), Value::String(context.to_string())),
                    ("question".to_string(), Value::String(question.to_string())),
                    (
                        "answers".to_string(),
                        serde_json::json!({
                            "text": answers.iter().map(|a| a["text"].clone()).collect::<Vec<_>>(),
                            "answer_start": answers
                                .iter()
                                .map(|a| a["answer_start"].clone())
                                .collect::<Vec<_>>(),
                        }),
                    ),
                ]);
                rows.push((*line, row));
            }
        }
    }
    let columns = ["id", "title", "context", "question", "answers"]
        .map(String::from)
        .to_vec();
    Ok(Some(table.with_rows(columns, rows)))
}

/// Reads question-answering examples, checking that every answer is where its
/// `answer_start` says. SQuAD's own nested JSON is flattened first ([`flatten_squad`]).
pub fn qa_examples(table: &Table, cols: &QaColumns) -> Result<Vec<QaExample>> {
    let flat = flatten_squad(table)?;
    let table = flat.as_ref().unwrap_or(table);
    for c in [&cols.question, &cols.context, &cols.answers] {
        if !table.columns.iter().any(|k| k == c) {
            return Err(DataError::MissingColumn {
                path: table.path.clone(),
                column: c.clone(),
                available: table.columns.join(", "),
            });
        }
    }
    let value_err = |line: usize, column: &str, message: String| DataError::Value {
        path: table.locate(line).0,
        line: table.locate(line).1,
        column: column.to_string(),
        message,
    };
    let text = |row: &BTreeMap<String, Value>, line: usize, column: &str| -> Result<String> {
        match row.get(column) {
            Some(Value::String(s)) => Ok(s.clone()),
            other => Err(value_err(
                line,
                column,
                format!("expected text, found {}", other.unwrap_or(&Value::Null)),
            )),
        }
    };
    table
        .rows
        .iter()
        .map(|(line, row)| {
            let question = text(row, *line, &cols.question)?;
            let context = text(row, *line, &cols.context)?;
            let answers = answers(row.get(&cols.answers).unwrap_or(&Value::Null))
                .map_err(|m| value_err(*line, &cols.answers, m))?;
            for a in &answers {
                let found: String = context.chars().skip(a.start).take(a.text.chars().count()).collect();
                if found != a.text {
                    return Err(value_err(
                        *line,
                        &cols.answers,
                        format!(
                            "answer {:?} is not at answer_start {} of the context (found {found:?})",
                            a.text, a.start
                        ),
                    ));
                }
            }
            Ok(QaExample {
                question,
                context,
                answers,
                origin: table.origin(*line),
            })
        })
        .collect()
}

/// One model window of an example.
#[derive(Debug, Clone, PartialEq)]
pub struct QaFeature {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
    /// Token positions of the first answer's first and last token; 0 and 0 (`[CLS]`) when the
    /// window does not hold the whole answer or there is none.
    pub start: usize,
    pub end: usize,
    /// Index of the example in the list the features were made from.
    pub example: usize,
    /// Character span in the context of each token of the context; `None` for the question,
    /// special tokens.
    pub context_offsets: Vec<Option<(usize, usize)>>,
}

/// Cuts examples into windows of at most `max_length` tokens (question, then a slice of the
/// context), consecutive slices overlapping by `doc_stride` tokens.
pub fn qa_features(
    tokenizer: &TextTokenizer,
    examples: &[QaExample],
    max_length: usize,
    doc_stride: usize,
) -> Result<Vec<QaFeature>> {
    let mut tok = tokenizer.inner.clone();
    tok.with_truncation(Some(TruncationParams {
        max_length,
        stride: doc_stride,
        strategy: TruncationStrategy::OnlySecond,
        direction: TruncationDirection::Right,
    }))
    .map_err(|e| {
        DataError::Tokenize(format!(
            "doc_stride {doc_stride} with max_length {max_length}: {e}"
        ))
    })?;
    let mut out = Vec::new();
    for (k, ex) in examples.iter().enumerate() {
        let enc = tok
            .encode_char_offsets((ex.question.as_str(), ex.context.as_str()), true)
            .map_err(|e| DataError::Tokenize(format!("{}: {e}", ex.origin)))?;
        let windows = std::iter::once(&enc).chain(enc.get_overflowing().iter());
        for w in windows {
            let seq = w.get_sequence_ids();
            let context_offsets: Vec<Option<(usize, usize)>> = w
                .get_offsets()
                .iter()
                .zip(&seq)
                .map(|(&o, s)| (*s == Some(1) && o.1 > o.0).then_some(o))
                .collect();
            let (mut start, mut end) = (0, 0);
            if let Some(a) = ex.answers.first() {
                let (a0, a1) = (a.start, a.start + a.text.chars().count());
                let inside: Vec<(usize, (usize, usize))> = context_offsets
                    .iter()
                    .enumerate()
                    .filter_map(|(i, o)| o.map(|o| (i, o)))
                    .collect();
                let covers = inside.first().is_some_and(|(_, o)| o.0 <= a0)
                    && inside.last().is_some_and(|(_, o)| o.1 >= a1);
                if covers {
                    // The last token starting at or before the answer, the first ending at or
                    // after its end.
                    start = inside
                        .iter()
                        .rev()
                        .find(|(_, o)| o.0 <= a0)
                        .map_or(0, |x| x.0);
                    end = inside.iter().find(|(_, o)| o.1 >= a1).map_or(0, |x| x.0);
                }
            }
            out.push(QaFeature {
                ids: w.get_ids().to_vec(),
                type_ids: w.get_type_ids().to_vec(),
                start,
                end,
                example: k,
                context_offsets,
            });
        }
    }
    Ok(out)
}
