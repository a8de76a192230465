//! Sequence-classification examples: column mapping, label sets, seeded splits, tokenization
//! with truncation, and dynamically padded batches.

use std::collections::BTreeSet;
use std::path::Path;

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde_json::Value;
use tokenizers::{TruncationDirection, TruncationParams, TruncationStrategy};
use whet_models::TextTokenizer;

use crate::error::{DataError, Result};
use crate::table::Table;

/// Which columns hold the text, the optional second text and the label.
#[derive(Debug, Clone)]
pub struct Columns {
    pub text: String,
    pub text_pair: Option<String>,
    pub label: String,
}

/// One labelled example.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub text: String,
    pub text_pair: Option<String>,
    /// Class id.
    pub label: usize,
    /// Where it came from: `path:line`.
    pub origin: String,
}

/// Class names in id order.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Labels(pub Vec<String>);

impl Labels {
    /// Number of classes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no classes.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Infers the label set of a training table: string labels sorted (as `datasets`'
    /// `class_encode_column`), integer labels `0..=max` named `LABEL_i`.
    pub fn infer(table: &Table, column: &str) -> Result<Self> {
        table.require(&[column])?;
        let mut names = BTreeSet::new();
        let mut max_int: Option<u64> = None;
        for (line, row) in &table.rows {
            match row.get(column) {
                Some(Value::Number(n)) => {
                    let v = n
                        .as_u64()
                        .ok_or_else(|| bad_label(table, *line, column, n))?;
                    max_int = Some(max_int.map_or(v, |m: u64| m.max(v)));
                }
                Some(Value::String(s)) => {
                    names.insert(s.clone());
                }
                other => {
                    return Err(bad_label(
                        table,
                        *line,
                        column,
                        other.unwrap_or(&Value::Null),
                    ));
                }
            }
        }
        if max_int.is_some() && !names.is_empty() {
            // Mixed: treat integers written as strings ("0", "1") uniformly.
            return Err(DataError::Value {
                path: table.path.clone(),
                line: 0,
                column: column.into(),
                message: "labels mix numbers and strings; use one kind (or set label_names)".into(),
            });
        }
        Ok(match max_int {
            Some(m) => Labels((0..=m).map(|i| format!("LABEL_{i}")).collect()),
            None => Labels(names.into_iter().collect()),
        })
    }

    /// The id of a label value: an integer id or a name.
    fn id(&self, table: &Table, line: usize, column: &str, v: Option<&Value>) -> Result<usize> {
        let unknown = |label: String| DataError::UnknownLabel {
            path: table.path.clone(),
            line,
            label,
            n: self.len(),
            labels: self.0.join(", "),
        };
        match v {
            Some(Value::Number(n)) => match n.as_u64() {
                Some(i) if (i as usize) < self.len() => Ok(i as usize),
                _ => Err(unknown(n.to_string())),
            },
            Some(Value::String(s)) => match self.0.iter().position(|l| l == s) {
                Some(i) => Ok(i),
                // CSV holds numbers as text: accept an in-range integer id.
                None => match s.trim().parse::<usize>() {
                    Ok(i) if i < self.len() && self.0[i] == format!("LABEL_{i}") => Ok(i),
                    _ => Err(unknown(format!("{s:?}"))),
                },
            },
            other => Err(bad_label(
                table,
                line,
                column,
                other.unwrap_or(&Value::Null),
            )),
        }
    }
}

fn bad_label(table: &Table, line: usize, column: &str, v: &impl std::fmt::Display) -> DataError {
    DataError::Value {
        path: table.path.clone(),
        line,
        column: column.into(),
        message: format!("a label must be a class name or a non-negative integer id, got {v}"),
    }
}

fn text_of(table: &Table, line: usize, column: &str, v: Option<&Value>) -> Result<String> {
    match v {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Number(n)) => Ok(n.to_string()),
        other => Err(DataError::Value {
            path: table.path.clone(),
            line,
            column: column.into(),
            message: format!("expected text, got {}", other.unwrap_or(&Value::Null)),
        }),
    }
}

/// Reads examples from a table with the given columns and label set.
pub fn examples(table: &Table, cols: &Columns, labels: &Labels) -> Result<Vec<Example>> {
    let mut needed = vec![cols.text.as_str(), cols.label.as_str()];
    if let Some(p) = &cols.text_pair {
        needed.push(p);
    }
    table.require(&needed)?;
    table
        .rows
        .iter()
        .map(|(line, row)| {
            Ok(Example {
                text: text_of(table, *line, &cols.text, row.get(&cols.text))?,
                text_pair: match &cols.text_pair {
                    Some(p) => Some(text_of(table, *line, p, row.get(p))?),
                    None => None,
                },
                label: labels.id(table, *line, &cols.label, row.get(&cols.label))?,
                origin: format!("{}:{line}", table.path.display()),
            })
        })
        .collect()
}

/// Sizes of a split: absolute counts, or fractions of the whole.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Size {
    Count(usize),
    Fraction(f64),
}

impl Size {
    fn resolve(self, n: usize) -> usize {
        match self {
            Size::Count(c) => c,
            Size::Fraction(f) => (f * n as f64).round() as usize,
        }
    }
}

/// Shuffles `items` with `seed` and cuts consecutive parts of the given sizes (in order), as
/// `datasets`' `train_test_split(seed=...)` applied in sequence would. A size of `None` takes
/// the rest.
pub fn seeded_split<T: Clone>(
    items: &[T],
    sizes: &[Option<Size>],
    seed: u64,
) -> Result<Vec<Vec<T>>> {
    let n = items.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed));
    let fixed: usize = sizes.iter().flatten().map(|s| s.resolve(n)).sum();
    if fixed > n {
        return Err(DataError::Split(format!(
            "the requested parts need {fixed} examples, the data has {n}"
        )));
    }
    let mut start = 0;
    let mut out = Vec::new();
    for s in sizes {
        let len = s.map(|s| s.resolve(n)).unwrap_or(n - fixed);
        out.push(
            order[start..start + len]
                .iter()
                .map(|&i| items[i].clone())
                .collect(),
        );
        start += len;
    }
    Ok(out)
}

/// Which end to cut when a text is longer than `max_length`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    #[default]
    Right,
    Left,
}

/// A tokenized example.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
    pub label: usize,
}

/// Tokenizes examples with the model's special tokens, truncating to `max_length` from the
/// given side the way `transformers` does (`truncation=True`, longest-first for pairs).
pub fn tokenize(
    tokenizer: &TextTokenizer,
    examples: &[Example],
    max_length: usize,
    side: Side,
) -> Result<Vec<Encoded>> {
    let mut tok = tokenizer.inner.clone();
    tok.with_truncation(Some(TruncationParams {
        max_length,
        strategy: TruncationStrategy::LongestFirst,
        stride: 0,
        direction: match side {
            Side::Right => TruncationDirection::Right,
            Side::Left => TruncationDirection::Left,
        },
    }))
    .map_err(|e| DataError::Tokenize(e.to_string()))?;
    examples
        .iter()
        .map(|ex| {
            let enc = match &ex.text_pair {
                Some(p) => tok.encode_fast((ex.text.as_str(), p.as_str()), true),
                None => tok.encode_fast(ex.text.as_str(), true),
            }
            .map_err(|e| DataError::Tokenize(format!("{}: {e}", ex.origin)))?;
            Ok(Encoded {
                ids: enc.get_ids().to_vec(),
                type_ids: enc.get_type_ids().to_vec(),
                label: ex.label,
            })
        })
        .collect()
}

/// A padded batch, row-major, ready to become tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// `[B, T]`
    pub input_ids: Vec<i64>,
    /// `[B, T]`
    pub attention_mask: Vec<i64>,
    /// `[B, T]`
    pub token_type_ids: Vec<i64>,
    /// `[B]`
    pub labels: Vec<i64>,
    pub batch: usize,
    pub len: usize,
    /// Real (non-pad) tokens.
    pub tokens: usize,
}

/// Pads a batch to its longest member (dynamic padding) on the right.
pub fn collate(items: &[&Encoded], pad_id: u32) -> Batch {
    let b = items.len();
    let t = items.iter().map(|e| e.ids.len()).max().unwrap_or(0).max(1);
    let mut batch = Batch {
        input_ids: vec![pad_id as i64; b * t],
        attention_mask: vec![0; b * t],
        token_type_ids: vec![0; b * t],
        labels: items.iter().map(|e| e.label as i64).collect(),
        batch: b,
        len: t,
        tokens: 0,
    };
    for (r, e) in items.iter().enumerate() {
        for (c, (&id, &ty)) in e.ids.iter().zip(&e.type_ids).enumerate() {
            batch.input_ids[r * t + c] = id as i64;
            batch.attention_mask[r * t + c] = 1;
            batch.token_type_ids[r * t + c] = ty as i64;
        }
        batch.tokens += e.ids.len();
    }
    batch
}

/// The order of an epoch: a permutation of `0..n` that depends only on the seed and the epoch,
/// so a resumed run visits the same examples in the same order.
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mixed = seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    order.shuffle(&mut StdRng::seed_from_u64(mixed));
    order
}

/// Reads a table, naming the option that pointed at it if it is missing.
pub fn read_table(path: &Path, encoding: crate::table::Encoding) -> Result<Table> {
    Table::read(path, encoding)
}
