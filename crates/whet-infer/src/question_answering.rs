//! The question-answering pipeline (BERT family): a trained folder (a
//! `BertForQuestionAnswering` folder, or a `peft` adapter with `qa_outputs` over its base, with
//! `qa.json`) loaded with the lengths it was trained with, and answers as
//! `pipeline("question-answering")` post-processes the start and end logits. Also the padded
//! batch of windows and its logits, which training computes the same way.

use std::collections::HashMap;
use std::path::Path;

use burn::module::Module;
use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::Serialize;
use whet_data::{QaExample, QaFeature, qa_features};
use whet_models::QuestionAnswerer;
use whet_models::bert::EncoderInput;
use whet_models::unpad::Unpadded;
use whet_models::{Checkpoint, Mode, TextTokenizer};

use crate::error::{InferError, Result};
use crate::saved;

/// A right-padded batch of windows.
#[derive(Debug, Clone)]
pub struct QaBatch {
    pub batch: usize,
    pub len: usize,
    pub input_ids: Vec<i64>,
    pub token_type_ids: Vec<i64>,
    pub attention_mask: Vec<i64>,
    pub starts: Vec<i64>,
    pub ends: Vec<i64>,
    pub tokens: usize,
}

/// Pads windows into a batch (with `pad_id`), with their answer start and end tokens.
pub fn collate(items: &[&QaFeature], pad_id: u32) -> QaBatch {
    let len = items.iter().map(|f| f.ids.len()).max().unwrap_or(1).max(1);
    let batch = items.len();
    let mut b = QaBatch {
        batch,
        len,
        input_ids: vec![pad_id as i64; batch * len],
        token_type_ids: vec![0; batch * len],
        attention_mask: vec![0; batch * len],
        starts: items.iter().map(|f| f.start as i64).collect(),
        ends: items.iter().map(|f| f.end as i64).collect(),
        tokens: items.iter().map(|f| f.ids.len()).sum(),
    };
    for (r, f) in items.iter().enumerate() {
        for (k, (&id, &ty)) in f.ids.iter().zip(&f.type_ids).enumerate() {
            b.input_ids[r * len + k] = id as i64;
            b.token_type_ids[r * len + k] = ty as i64;
            b.attention_mask[r * len + k] = 1;
        }
    }
    b
}

/// Start and end logits `[B, T]` of a batch; `padding_free` runs the model without the
/// batch's padding ([`whet_models::unpad`]).
pub fn logits(
    model: &QuestionAnswerer,
    b: &QaBatch,
    mode: Mode,
    padding_free: bool,
    device: &Device,
) -> (Tensor<2>, Tensor<2>) {
    let t = |v: &Vec<i64>| {
        Tensor::<2, Int>::from_data(TensorData::new(v.clone(), [b.batch, b.len]), device)
    };
    let out = model.forward(
        EncoderInput {
            input_ids: t(&b.input_ids),
            attention_mask: t(&b.attention_mask),
            token_type_ids: Some(t(&b.token_type_ids)),
            unpadded: padding_free.then(|| Unpadded::from_mask(&b.attention_mask, b.batch, b.len)),
        },
        mode,
    );
    (out.start, out.end)
}

fn to_vec(t: Tensor<2>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap_or_default()
}

/// The characters `[a, b)` of `text`.
fn chars(text: &str, a: usize, b: usize) -> String {
    text.chars().skip(a).take(b.saturating_sub(a)).collect()
}

/// One answer of the question-answering pipeline.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct QaAnswer {
    pub score: f64,
    /// Character offsets in the context.
    pub start: usize,
    pub end: usize,
    pub answer: String,
}

/// Answers as `pipeline("question-answering")` gives them (transformers 4.57, the last release
/// with that pipeline; `align_to_words` on, `handle_impossible_answer` off): per window, the
/// softmax of the start and end logits over the context tokens and `[CLS]`, `[CLS]` then
/// dropped; a span's score is `p_start · p_end`, for spans of at most `max_answer_len` tokens;
/// the window's `2 · top_k + 10` best spans are widened to whole words and become answers,
/// where a span whose text equals an earlier answer's (ignoring case, from any window) adds
/// its score to that answer instead; the `top_k` best answers.
#[allow(clippy::too_many_arguments)]
pub fn answer(
    model: &QuestionAnswerer,
    tokenizer: &TextTokenizer,
    question: &str,
    context: &str,
    max_length: usize,
    doc_stride: usize,
    max_answer_len: usize,
    top_k: usize,
    device: &Device,
) -> Result<Vec<QaAnswer>> {
    let ex = QaExample {
        question: question.to_string(),
        context: context.to_string(),
        answers: vec![],
        origin: "input".into(),
    };
    let features = qa_features(tokenizer, &[ex], max_length, doc_stride)?;
    // The word of each context token, by its character span: the context's side of a pair is
    // split into the same words as the context alone.
    let alone = tokenizer
        .inner
        .encode_char_offsets(context, false)
        .map_err(InferError::Tokenizer)?;
    let word_of: HashMap<(usize, usize), u32> = alone
        .get_offsets()
        .iter()
        .zip(alone.get_word_ids())
        .filter_map(|(&o, w)| w.map(|w| (o, w)))
        .collect();
    let top_k = top_k.max(1);
    let model = &model.valid();
    let device = &device.clone().without_autodiff();
    let mut found: Vec<QaAnswer> = Vec::new();
    for f in &features {
        let b = collate(&[f], 0);
        let (s, e) = logits(model, &b, Mode::Eval, true, device);
        let probs = |v: Vec<f32>| {
            let allowed = |i: usize| i == 0 || f.context_offsets[i].is_some();
            let max = (0..v.len())
                .filter(|&i| allowed(i))
                .map(|i| v[i])
                .fold(f32::NEG_INFINITY, f32::max);
            let ex: Vec<f64> = (0..v.len())
                .map(|i| {
                    if allowed(i) {
                        ((v[i] - max) as f64).exp()
                    } else {
                        0.0
                    }
                })
                .collect();
            let sum: f64 = ex.iter().sum();
            let mut p: Vec<f64> = ex.iter().map(|x| x / sum).collect();
            p[0] = 0.0;
            p
        };
        let (ps, pe) = (probs(to_vec(s)), probs(to_vec(e)));
        // (score, first token, last token) of the spans inside the context.
        let mut spans: Vec<(f64, usize, usize)> = Vec::new();
        for (i, p_start) in ps.iter().enumerate() {
            for (j, p_end) in pe.iter().enumerate().take(i + max_answer_len).skip(i) {
                if f.context_offsets[i].is_some() && f.context_offsets[j].is_some() {
                    spans.push((p_start * p_end, i, j));
                }
            }
        }
        spans.sort_by(|a, b| b.0.total_cmp(&a.0));
        spans.truncate(2 * top_k + 10);
        // The characters of token `i`'s whole word, as far as this window holds it
        // (`word_to_chars` of the window's encoding).
        let word_chars = |i: usize| -> Option<(usize, usize)> {
            let o = f.context_offsets[i]?;
            let Some(w) = word_of.get(&o) else {
                return Some(o);
            };
            Some(
                f.context_offsets
                    .iter()
                    .flatten()
                    .filter(|p| word_of.get(p) == Some(w))
                    .fold(o, |(a, z), p| (a.min(p.0), z.max(p.1))),
            )
        };
        for (score, i, j) in spans {
            let (Some((a, _)), Some((_, z))) = (word_chars(i), word_chars(j)) else {
                continue;
            };
            let text = chars(context, a, z);
            let lower = text.to_lowercase();
            match found.iter_mut().find(|x| x.answer.to_lowercase() == lower) {
                Some(same) => same.score += score,
                None => found.push(QaAnswer {
                    score,
                    start: a,
                    end: z,
                    answer: text,
                }),
            }
        }
    }
    // Stable, as Python's `sorted`: equal scores keep the order they were found in.
    found.sort_by(|a, b| b.score.total_cmp(&a.score));
    found.truncate(top_k);
    if found.is_empty() {
        return Err(InferError::EmptyContext);
    }
    Ok(found)
}

/// A trained question-answering model ready for use, with the window lengths it was trained
/// with.
pub struct Trained {
    pub model: QuestionAnswerer,
    pub tokenizer: TextTokenizer,
    /// Tokens per window (question, context and special tokens).
    pub max_length: usize,
    /// Tokens shared by consecutive windows of a long context.
    pub doc_stride: usize,
    /// The longest answer in tokens the run's evaluation took (30, run_qa.py's default, for a
    /// folder without `qa.json`).
    pub max_answer_length: usize,
    /// Whether the run evaluated its batches without their padding.
    pub padding_free: bool,
    pub pad_id: u32,
}

impl Trained {
    /// The `top_k` best answers to `question` in `context` (see [`answer`]), in windows as the
    /// model was trained on.
    pub fn answer(
        &self,
        question: &str,
        context: &str,
        max_answer_len: usize,
        top_k: usize,
        device: &Device,
    ) -> Result<Vec<QaAnswer>> {
        answer(
            &self.model,
            &self.tokenizer,
            question,
            context,
            self.max_length,
            self.doc_stride,
            max_answer_len,
            top_k,
            device,
        )
    }
}

/// Loads what `whet train` saves for a question-answering task (a `peft` adapter folder or a
/// full model folder, with `qa.json`), or any `transformers` question-answering folder (then
/// with the pipeline's window lengths, 384 and a stride of 128).
pub fn load(dir: &Path, device: &Device) -> Result<Trained> {
    load_on(dir, None, device)
}

/// As [`load`], with the base of an adapter folder given (`None`: the base it names).
pub fn load_on(dir: &Path, base: Option<&Path>, device: &Device) -> Result<Trained> {
    let meta = saved::meta(dir, "qa.json");
    let get = |k: &str, default: u64| {
        meta.as_ref().and_then(|m| m[k].as_u64()).unwrap_or(default) as usize
    };
    let (max_length, doc_stride) = (get("max_length", 384), get("doc_stride", 128));
    let max_answer_length = get("max_answer_length", 30);
    let padding_free = meta
        .as_ref()
        .and_then(|m| m["padding_free"].as_bool())
        .unwrap_or(false);
    let (base, is_adapter) = saved::base_model(dir, base, meta.as_ref())?;
    let checkpoint = Checkpoint::open(&base)?;
    let (mut model, fresh) = checkpoint.load_question_answering(device)?;
    if is_adapter {
        whet_peft::load_adapter(&mut model, dir, device)?;
    } else if !fresh.is_empty() {
        return Err(InferError::UntrainedHead {
            path: dir.to_path_buf(),
            head: "question-answering",
            missing: fresh,
        });
    }
    let tokenizer = match TextTokenizer::from_folder(dir) {
        Ok(t) => t,
        Err(_) => checkpoint.tokenizer()?,
    };
    let pad_id = checkpoint
        .pad_token_id()
        .or(tokenizer.pad.as_ref().map(|p| p.id))
        .unwrap_or(0);
    Ok(Trained {
        model,
        tokenizer,
        max_length,
        doc_stride,
        max_answer_length,
        padding_free,
        pad_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_without_a_trained_span_head_is_refused() {
        let dir = crate::classification::tests::minilm();
        let Err(e) = load(&dir, &Device::flex()) else {
            panic!("an encoder without a span head loaded for question answering");
        };
        let text = e.to_string();
        assert!(
            text.contains("has no trained question-answering head (missing qa_outputs."),
            "{text}"
        );
    }
}
