//! Sequence-classification examples: column mapping, label sets, seeded splits, tokenization
//! with truncation, and dynamically padded batches.

use std::collections::BTreeSet;
use std::path::Path;

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde_json::Value;
use tokenizers::{EncodeInput, TruncationDirection, TruncationParams, TruncationStrategy};
use whet_text::TextTokenizer;

use crate::error::{DataError, Result};
use crate::table::Table;

/// Which columns hold the text, the optional second text and the label.
#[derive(Debug, Clone)]
pub struct Columns {
    pub text: String,
    pub text_pair: Option<String>,
    pub label: String,
}

/// What an example is labelled with.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// Single-label classification: one class id.
    Class(usize),
    /// Multi-label classification (`problem_type = "multi_label_classification"`): the set
    /// of class ids that apply, possibly empty.
    Multi(Vec<usize>),
    /// Regression (`problem_type = "regression"`): one real number.
    Value(f32),
}

impl Target {
    /// The class ids that apply (none for a regression target).
    pub fn ids(&self) -> &[usize] {
        match self {
            Target::Class(c) => std::slice::from_ref(c),
            Target::Multi(v) => v,
            Target::Value(_) => &[],
        }
    }
}

/// What a label column holds, as `transformers`' `problem_type` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LabelKind {
    /// One class name or id a row.
    #[default]
    Single,
    /// A list of class names or ids a row.
    Multi,
    /// One real number a row (regression).
    Real,
}

/// Whether a label column holds real numbers: every value a number (in CSV, text that parses as
/// one) or missing, and at least one not an integer. This is `run_glue.py`'s test for
/// regression (a column `datasets` reads as float; pandas and Arrow read a column of integers
/// as int, and a missing cell as NaN in a float column). A missing target is then an error
/// naming its row, not a class.
pub fn real_valued(table: &Table, column: &str) -> bool {
    let mut fraction = false;
    for (_, row) in &table.rows {
        match row.get(column) {
            Some(Value::Number(n)) => fraction |= !(n.is_u64() || n.is_i64()),
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => {
                let s = s.trim();
                if s.is_empty() || s.parse::<i64>().is_ok() {
                    continue;
                }
                match s.parse::<f64>() {
                    Ok(v) if v.is_finite() => fraction = true,
                    _ => return false,
                }
            }
            _ => return false,
        }
    }
    fraction
}

/// One labelled example.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub text: String,
    pub text_pair: Option<String>,
    pub label: Target,
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

    /// Infers the label set of a training table: the names a `datasets` Parquet file declares
    /// for a `ClassLabel` column, else string labels sorted (as `datasets`'
    /// `class_encode_column`), integer labels `0..=max` named `LABEL_i`. A multi-label column
    /// holds lists of either kind.
    pub fn infer(table: &Table, column: &str) -> Result<Self> {
        table.require(&[column])?;
        if let Some(names) = table.class_names.get(column) {
            return Ok(Labels(names.clone()));
        }
        let mut names = BTreeSet::new();
        let mut ints = BTreeSet::new();
        // The largest integer id and the line it is on.
        let mut max_int: Option<(u64, usize)> = None;
        // The same for integers written as text (CSV), kept apart until every label is one.
        let (mut text_ints, mut text_max) = (BTreeSet::new(), None::<(u64, usize)>);
        let mut all_text_numeric = true;
        for (line, row) in &table.rows {
            let values = match row.get(column) {
                Some(Value::Array(items)) => items.iter().collect(),
                Some(v) => vec![v],
                None => vec![&Value::Null],
            };
            for v in values {
                match v {
                    Value::Number(n) => {
                        let v = n
                            .as_u64()
                            .ok_or_else(|| bad_label(table, *line, column, n))?;
                        ints.insert(v);
                        if max_int.is_none_or(|(m, _)| v > m) {
                            max_int = Some((v, *line));
                        }
                    }
                    Value::String(s) => {
                        names.insert(s.clone());
                        match s.trim().parse::<u64>() {
                            Ok(v) => {
                                text_ints.insert(v);
                                if text_max.is_none_or(|(m, _)| v > m) {
                                    text_max = Some((v, *line));
                                }
                            }
                            Err(_) => all_text_numeric = false,
                        }
                    }
                    // A boolean column is two classes, false (0) and true (1), as `datasets`
                    // sorts its unique values.
                    Value::Bool(b) => {
                        names.insert(b.to_string());
                        all_text_numeric = false;
                    }
                    other => return Err(bad_label(table, *line, column, other)),
                }
            }
        }
        // CSV and TSV hold numbers as text: a column of nothing but integers is class ids, as
        // pandas reads it into `datasets` (so that label 10 is id 10, not the "10" sorted
        // between "1" and "2").
        if max_int.is_none() && !names.is_empty() && all_text_numeric {
            names.clear();
            ints = text_ints;
            max_int = text_max;
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
        // Integer labels are class ids 0..=max. An id far past the number of distinct labels
        // is a stray value (or ids that are really names), not a class count to allocate:
        // more than half of 0..=max unused is refused.
        if let Some((m, line)) = max_int
            && m >= 2 * ints.len() as u64
        {
            return Err(DataError::Value {
                path: table.locate(line).0,
                line: table.locate(line).1,
                column: column.into(),
                message: format!(
                    "label {m} is taken as a class id, but only {} distinct integer labels \
                     occur, so ids 0..={m} would be mostly unused classes: number the classes \
                     0..{}, write the labels as names (strings), or list them in \
                     data.label_names",
                    ints.len(),
                    ints.len() - 1
                ),
            });
        }
        Ok(match max_int {
            Some((m, _)) => Labels((0..=m).map(|i| format!("LABEL_{i}")).collect()),
            None => Labels(names.into_iter().collect()),
        })
    }

    /// The id of a label value: an integer id or a name.
    pub fn id(&self, table: &Table, line: usize, column: &str, v: Option<&Value>) -> Result<usize> {
        let unknown = |label: String| DataError::UnknownLabel {
            path: table.locate(line).0,
            line: table.locate(line).1,
            label,
            n: self.len(),
            labels: self.0.join(", "),
        };
        match v {
            Some(Value::Number(n)) => match n.as_u64() {
                Some(i) if (i as usize) < self.len() => Ok(i as usize),
                _ => Err(unknown(n.to_string())),
            },
            Some(Value::Bool(b)) => self
                .0
                .iter()
                .position(|l| *l == b.to_string())
                .ok_or_else(|| unknown(b.to_string())),
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
        path: table.locate(line).0,
        line: table.locate(line).1,
        column: column.into(),
        message: format!(
            "a label must be a class name, a boolean or a non-negative integer id, got {v}"
        ),
    }
}

fn text_of(table: &Table, line: usize, column: &str, v: Option<&Value>) -> Result<String> {
    match v {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Number(n)) => Ok(n.to_string()),
        other => Err(DataError::Value {
            path: table.locate(line).0,
            line: table.locate(line).1,
            column: column.into(),
            message: format!("expected text, got {}", other.unwrap_or(&Value::Null)),
        }),
    }
}

/// The target of one row: a class id, a list of names or ids, or a real number.
fn target(
    table: &Table,
    line: usize,
    column: &str,
    labels: &Labels,
    kind: LabelKind,
    v: Option<&Value>,
) -> Result<Target> {
    let multi_label = match kind {
        LabelKind::Real => return real_target(table, line, column, v),
        LabelKind::Multi => true,
        LabelKind::Single => false,
    };
    match (multi_label, v) {
        (true, Some(Value::Array(items))) => {
            let mut ids = items
                .iter()
                .map(|x| labels.id(table, line, column, Some(x)))
                .collect::<Result<Vec<_>>>()?;
            ids.sort_unstable();
            ids.dedup();
            Ok(Target::Multi(ids))
        }
        (true, other) => Err(DataError::Value {
            path: table.locate(line).0,
            line: table.locate(line).1,
            column: column.into(),
            message: format!(
                "multi-label classification needs a list of labels, got {}",
                other.unwrap_or(&Value::Null)
            ),
        }),
        (false, Some(Value::Array(_))) => Err(DataError::Value {
            path: table.locate(line).0,
            line: table.locate(line).1,
            column: column.into(),
            message: "the label is a list; for several labels per text set \
                      task = \"multi-label-classification\""
                .into(),
        }),
        (false, v) => Ok(Target::Class(labels.id(table, line, column, v)?)),
    }
}

/// A regression target: a number, or text that parses as a finite one (CSV).
fn real_target(table: &Table, line: usize, column: &str, v: Option<&Value>) -> Result<Target> {
    let value = match v {
        Some(Value::Number(n)) => n.as_f64(),
        Some(Value::String(s)) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    match value {
        Some(x) if x.is_finite() => Ok(Target::Value(x as f32)),
        _ => Err(DataError::Value {
            path: table.locate(line).0,
            line: table.locate(line).1,
            column: column.into(),
            message: match v {
                None | Some(Value::Null) => "the label is missing: a regression needs a number \
                                             on every row (drop such rows first)"
                    .to_string(),
                Some(Value::String(s)) if s.trim().is_empty() => "the label is empty: a \
                     regression needs a number on every row (drop such rows first)"
                    .to_string(),
                Some(other) => {
                    format!("a regression label must be a finite number, got {other}")
                }
            },
        }),
    }
}

/// Reads examples from a table with the given columns and label set; the label cells hold what
/// `kind` says (a class, a list of classes, a number).
pub fn examples(
    table: &Table,
    cols: &Columns,
    labels: &Labels,
    kind: LabelKind,
) -> Result<Vec<Example>> {
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
                label: target(
                    table,
                    *line,
                    &cols.label,
                    labels,
                    kind,
                    row.get(&cols.label),
                )?,
                origin: table.origin(*line),
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
/// `datasets`' `train_test_split(seed=...)` applied in sequence would. The first size of `None`
/// takes the rest; a later `None` part is empty.
pub fn seeded_split<T: Clone>(
    items: &[T],
    sizes: &[Option<Size>],
    seed: u64,
) -> Result<Vec<Vec<T>>> {
    let n = items.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed));
    // Saturating: two counts near usize::MAX (a recipe's `train = 1e300`) are "too many", not
    // an overflow.
    let fixed = sizes
        .iter()
        .flatten()
        .fold(0usize, |sum, s| sum.saturating_add(s.resolve(n)));
    if fixed > n {
        return Err(DataError::Split(format!(
            "the requested parts need {fixed} examples, the data has {n}"
        )));
    }
    let mut start = 0;
    let mut out = Vec::new();
    let mut rest = Some(n - fixed);
    for s in sizes {
        // The first unsized part takes the rest; any later one is empty.
        let len = match s {
            Some(s) => s.resolve(n),
            None => rest.take().unwrap_or(0),
        };
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
    pub label: Target,
}

/// Tokenizes examples with the model's special tokens, truncating to `max_length` from the
/// given side the way `transformers` does (`truncation=True`, longest-first for pairs).
/// Texts are encoded in parallel (the tokenizer's own rayon pool, `TOKENIZERS_PARALLELISM`
/// as in Python).
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
    let inputs: Vec<EncodeInput> = examples
        .iter()
        .map(|ex| match &ex.text_pair {
            Some(p) => (ex.text.as_str(), p.as_str()).into(),
            None => ex.text.as_str().into(),
        })
        .collect();
    let encodings = match tok.encode_batch_fast(inputs, true) {
        Ok(e) => e,
        // The batch error does not say which text failed: find it one by one.
        Err(batch_err) => {
            for ex in examples {
                let one = match &ex.text_pair {
                    Some(p) => tok.encode_fast((ex.text.as_str(), p.as_str()), true),
                    None => tok.encode_fast(ex.text.as_str(), true),
                };
                if let Err(e) = one {
                    return Err(DataError::Tokenize(format!("{}: {e}", ex.origin)));
                }
            }
            return Err(DataError::Tokenize(batch_err.to_string()));
        }
    };
    Ok(encodings
        .into_iter()
        .zip(examples)
        .map(|(enc, ex)| Encoded {
            ids: enc.get_ids().to_vec(),
            type_ids: enc.get_type_ids().to_vec(),
            label: ex.label.clone(),
        })
        .collect())
}

/// [`tokenize`], with the token ids kept in `cache_dir` between runs (as `datasets` caches a
/// mapped dataset): the file is named by a SHA-256 of the tokenizer, the truncation settings
/// and every text, so any change to them is a miss. Returns the encodings and whether they
/// came from the cache. A cache file that cannot be read or written is ignored.
pub fn tokenize_cached(
    tokenizer: &TextTokenizer,
    examples: &[Example],
    max_length: usize,
    side: Side,
    cache_dir: &Path,
) -> Result<(Vec<Encoded>, bool)> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"whet-tokenized-v1\0");
    h.update(
        tokenizer
            .inner
            .to_string(false)
            .map_err(|e| DataError::Tokenize(e.to_string()))?
            .as_bytes(),
    );
    h.update((max_length as u64).to_le_bytes());
    h.update([side as u8]);
    for ex in examples {
        for part in [Some(&ex.text), ex.text_pair.as_ref()] {
            match part {
                Some(t) => {
                    h.update((t.len() as u64).to_le_bytes());
                    h.update(t.as_bytes());
                }
                None => h.update(u64::MAX.to_le_bytes()),
            }
        }
    }
    let key: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    let path = cache_dir.join(format!("{key}.tokens"));
    if let Some(ids) = std::fs::read(&path)
        .ok()
        .and_then(|b| decode_cache(&b, examples.len()))
    {
        let encoded = ids
            .into_iter()
            .zip(examples)
            .map(|((ids, type_ids), ex)| Encoded {
                ids,
                type_ids,
                label: ex.label.clone(),
            })
            .collect();
        return Ok((encoded, true));
    }
    let encoded = tokenize(tokenizer, examples, max_length, side)?;
    // Best effort: a read-only cache folder only costs the next run a re-tokenization.
    let _ = whet_text::fsutil::write_atomic(&path, &encode_cache(&encoded));
    Ok((encoded, false))
}

const CACHE_MAGIC: &[u8; 8] = b"WHETTOK1";

/// `magic, n: u64, then per example len: u32, ids: [u32; len], type_ids: [u32; len]`, all
/// little-endian.
fn encode_cache(encoded: &[Encoded]) -> Vec<u8> {
    let mut out = CACHE_MAGIC.to_vec();
    out.extend((encoded.len() as u64).to_le_bytes());
    for e in encoded {
        out.extend((e.ids.len() as u32).to_le_bytes());
        for v in e.ids.iter().chain(&e.type_ids) {
            out.extend(v.to_le_bytes());
        }
    }
    out
}

type CachedIds = Vec<(Vec<u32>, Vec<u32>)>;

fn decode_cache(bytes: &[u8], expected: usize) -> Option<CachedIds> {
    let rest = bytes.strip_prefix(CACHE_MAGIC.as_slice())?;
    let (n, mut rest) = rest.split_at_checked(8)?;
    if u64::from_le_bytes(n.try_into().ok()?) as usize != expected {
        return None;
    }
    let mut u32s = |k: usize| -> Option<Vec<u32>> {
        let (head, tail) = rest.split_at_checked(k * 4)?;
        rest = tail;
        Some(
            head.chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        )
    };
    let mut out = Vec::with_capacity(expected);
    for _ in 0..expected {
        let len = u32s(1)?[0] as usize;
        out.push((u32s(len)?, u32s(len)?));
    }
    rest.is_empty().then_some(out)
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
    /// `[B]`, one per row.
    pub targets: Vec<Target>,
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
        targets: items.iter().map(|e| e.label.clone()).collect(),
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

/// `order` regrouped so that batches hold examples of similar `lengths`, as `transformers`'
/// `get_length_grouped_indices`: cut into megabatches of `min(n / (4·batch), 50)` (at least 1)
/// batches, each sorted longest first (ties keep their order), then the megabatch holding the
/// longest example swaps its first element with the first megabatch's, so the longest example
/// comes first.
pub fn length_grouped(order: &[usize], lengths: &[usize], batch: usize) -> Vec<usize> {
    let batch = batch.max(1);
    let mult = (order.len() / (batch * 4)).clamp(1, 50);
    let mut megabatches: Vec<Vec<usize>> = order
        .chunks(mult * batch)
        .map(|m| {
            let mut m = m.to_vec();
            m.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
            m
        })
        .collect();
    // The first megabatch with the largest maximum, as torch.argmax picks the first.
    let mut longest = 0;
    for (i, m) in megabatches.iter().enumerate() {
        if lengths[m[0]] > lengths[megabatches[longest][0]] {
            longest = i;
        }
    }
    if longest > 0 {
        let first = megabatches[0][0];
        megabatches[0][0] = std::mem::replace(&mut megabatches[longest][0], first);
    }
    megabatches.concat()
}

/// Reads a table, naming the option that pointed at it if it is missing.
pub fn read_table(path: &Path, encoding: crate::table::Encoding) -> Result<Table> {
    Table::read(path, encoding)
}
