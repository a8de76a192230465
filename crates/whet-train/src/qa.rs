//! Extractive question answering end to end (`task = "question-answering"`, BERT family):
//! SQuAD-format data cut into windows, the start/end loss, exact match and F1 as the SQuAD
//! script computes them, the `pipeline("question-answering")` answer, and output the Python
//! world loads (`BertForQuestionAnswering` folder, or a `peft` adapter with `qa_outputs`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use burn::module::Module;
use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::Serialize;
use whet_data::{Encoding, QaColumns, QaExample, QaFeature, Table, qa_examples, qa_features};
use whet_metrics::squad_scores;
use whet_models::bert::{BertForQuestionAnswering, EncoderInput};
use whet_models::{Checkpoint, Mode, TextTokenizer};
use whet_peft::{ParamCounts, PeftConfig, set_trainable};

use crate::recipe::{Method, Recipe};
use crate::trainer::{BatchCounts, Evaluation, Objective};
use crate::error::{Result, TrainError};

/// Start and end of the answer span; evaluation scores the evaluation examples.
pub struct QuestionAnswering {
    pub pad_id: u32,
    /// The examples the evaluation features were cut from.
    pub eval_examples: Vec<QaExample>,
    pub max_answer_length: usize,
}

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

fn collate(items: &[&QaFeature], pad_id: u32) -> QaBatch {
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

/// Start and end logits `[B, T]` of a batch.
fn logits(
    model: &BertForQuestionAnswering,
    b: &QaBatch,
    mode: Mode,
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
        },
        mode,
    );
    (out.start, out.end)
}

/// `(CE(start) + CE(end)) / 2` summed over the batch, as `BertForQuestionAnswering` computes
/// its (mean) loss.
fn summed_span_loss(start: Tensor<2>, end: Tensor<2>, b: &QaBatch, device: &Device) -> Tensor<1> {
    let n = b.batch;
    let ce = |logits: Tensor<2>, target: &Vec<i64>| {
        let idx = Tensor::<2, Int>::from_data(TensorData::new(target.clone(), [n, 1]), device);
        -burn::tensor::activation::log_softmax(logits, 1)
            .gather(1, idx)
            .sum()
    };
    (ce(start, &b.starts) + ce(end, &b.ends)).div_scalar(2.0)
}

fn to_vec(t: Tensor<2>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap_or_default()
}

/// A window with its start and end logits.
pub type ScoredWindow<'a> = (&'a QaFeature, &'a [f32], &'a [f32]);

/// The best span of one example over its windows, as `run_qa.py`'s post-processing picks it:
/// the 20 highest start and end logits of each window, spans inside the context, not reversed,
/// at most `max_answer_length` tokens; the highest `start + end` logit wins. Returns the
/// character span in the context.
pub fn best_span(windows: &[ScoredWindow<'_>], max_answer_length: usize) -> Option<(usize, usize)> {
    let top = |v: &[f32], f: &QaFeature| {
        let mut idx: Vec<usize> = (0..f.ids.len())
            .filter(|&i| f.context_offsets[i].is_some())
            .collect();
        idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]));
        idx.truncate(20);
        idx
    };
    let mut best: Option<(f32, (usize, usize))> = None;
    for (f, start, end) in windows {
        for &s in &top(start, f) {
            for &e in &top(end, f) {
                if e < s || e - s + 1 > max_answer_length {
                    continue;
                }
                let score = start[s] + end[e];
                if best.is_none_or(|(b, _)| score > b)
                    && let (Some(a), Some(z)) = (f.context_offsets[s], f.context_offsets[e])
                {
                    best = Some((score, (a.0, z.1)));
                }
            }
        }
    }
    best.map(|(_, span)| span)
}

/// The characters `[a, b)` of `text`.
fn chars(text: &str, a: usize, b: usize) -> String {
    text.chars().skip(a).take(b.saturating_sub(a)).collect()
}

impl QuestionAnswering {
    /// Loss, and per example the predicted answer text.
    fn run(
        &self,
        model: &BertForQuestionAnswering,
        data: &[QaFeature],
        batch_size: usize,
        device: &Device,
    ) -> (f64, Vec<String>) {
        let model = &model.valid();
        let device = &device.clone().without_autodiff();
        let (mut loss, mut starts, mut ends) = (0.0, Vec::new(), Vec::new());
        for chunk in data.chunks(batch_size.max(1)) {
            let items: Vec<&QaFeature> = chunk.iter().collect();
            let b = collate(&items, self.pad_id);
            let (s, e) = logits(model, &b, Mode::Eval, device);
            loss += summed_span_loss(s.clone(), e.clone(), &b, device).into_scalar::<f32>() as f64;
            let (s, e) = (to_vec(s), to_vec(e));
            for r in 0..b.batch {
                starts.push(s[r * b.len..(r + 1) * b.len].to_vec());
                ends.push(e[r * b.len..(r + 1) * b.len].to_vec());
            }
        }
        let mut by_example: BTreeMap<usize, Vec<ScoredWindow<'_>>> = BTreeMap::new();
        for (i, f) in data.iter().enumerate() {
            by_example
                .entry(f.example)
                .or_default()
                .push((f, &starts[i], &ends[i]));
        }
        let answers = (0..self.eval_examples.len())
            .map(|k| {
                let ex = &self.eval_examples[k];
                by_example
                    .get(&k)
                    .and_then(|w| best_span(w, self.max_answer_length))
                    .map(|(a, b)| chars(&ex.context, a, b))
                    .unwrap_or_default()
            })
            .collect();
        (loss / data.len().max(1) as f64, answers)
    }
}

/// Exact match and F1 in percent (as `evaluate.load("squad")`), averaged over examples.
pub fn squad_metrics(examples: &[QaExample], predictions: &[String]) -> (f64, f64) {
    let (mut em, mut f1) = (0.0, 0.0);
    for (ex, p) in examples.iter().zip(predictions) {
        let golds: Vec<String> = ex.answers.iter().map(|a| a.text.clone()).collect();
        let (e, f) = squad_scores(p, &golds);
        em += e;
        f1 += f;
    }
    let n = examples.len().max(1) as f64;
    (100.0 * em / n, 100.0 * f1 / n)
}

impl Objective for QuestionAnswering {
    type Model = BertForQuestionAnswering;
    type Example = QaFeature;
    type Batch = QaBatch;

    fn collate(&self, items: &[&QaFeature]) -> QaBatch {
        collate(items, self.pad_id)
    }

    fn counts(&self, b: &QaBatch) -> BatchCounts {
        BatchCounts {
            units: b.batch,
            samples: b.batch,
            tokens: b.tokens,
        }
    }

    fn summed_loss(
        &self,
        model: &BertForQuestionAnswering,
        b: &QaBatch,
        device: &Device,
    ) -> Result<Tensor<1>> {
        let (s, e) = logits(model, b, Mode::Train, device);
        Ok(summed_span_loss(s, e, b, device))
    }

    fn evaluate(
        &self,
        model: &BertForQuestionAnswering,
        data: &[QaFeature],
        batch_size: usize,
        device: &Device,
    ) -> Result<Evaluation> {
        let (loss, answers) = self.run(model, data, batch_size, device);
        let (em, f1) = squad_metrics(&self.eval_examples, &answers);
        Ok(Evaluation {
            loss,
            metrics: BTreeMap::from([("exact_match".to_string(), em), ("f1".to_string(), f1)]),
            report: None,
        })
    }
}

/// A split: examples and their windows.
pub struct QaSplit {
    pub examples: Vec<QaExample>,
    pub features: Vec<QaFeature>,
}

/// Everything a question-answering run prepared before training.
pub struct QaPrepared {
    pub checkpoint: Checkpoint,
    pub tokenizer: TextTokenizer,
    pub train: QaSplit,
    pub validation: Option<QaSplit>,
    pub test: Option<QaSplit>,
    pub pad_id: u32,
    pub doc_stride: usize,
    pub model: BertForQuestionAnswering,
    pub counts: ParamCounts,
    /// The adapter method's configuration (None for full and head training).
    pub adapter: Option<PeftConfig>,
    pub fresh: Vec<String>,
}

/// Reads and windows the data, loads the model and applies the method.
pub fn prepare(recipe: &Recipe, device: &Device) -> Result<QaPrepared> {
    let d = &recipe.data;
    let enc: Encoding = d.encoding.parse().map_err(TrainError::Encoding)?;
    let cols = QaColumns {
        question: d.question_column.clone(),
        context: d.context_column.clone(),
        answers: d.answers_column.clone(),
    };
    let read = |p: &Path| -> Result<Vec<QaExample>> {
        let t = Table::read(p, enc)?;
        Ok(qa_examples(&t, &cols)?)
    };
    let all = read(&d.train)?;
    let validation = d.validation.as_deref().map(read).transpose()?;
    let test = d.test.as_deref().map(read).transpose()?;
    let (train, validation, test) = d.parts(all, validation, test)?;
    let mut checkpoint = Checkpoint::open(&recipe.model)?;
    checkpoint.quantization = crate::method::quant_policy(recipe, &["qa_outputs"]);
    if d.max_length > checkpoint.max_positions() {
        return Err(TrainError::ExceedsPositions {
            key: "data.max_length",
            value: d.max_length,
            positions: checkpoint.max_positions(),
            model: recipe.model.clone(),
        });
    }
    let doc_stride = d.doc_stride.unwrap_or(d.max_length / 3);
    let tokenizer = checkpoint.tokenizer()?;
    let pad_id = checkpoint
        .pad_token_id()
        .or(tokenizer.pad.as_ref().map(|p| p.id))
        .unwrap_or(0);
    let window = |ex: Vec<QaExample>| -> Result<QaSplit> {
        let features = qa_features(&tokenizer, &ex, d.max_length, doc_stride)?;
        Ok(QaSplit {
            examples: ex,
            features,
        })
    };
    let train = window(train)?;
    if train.features.is_empty() {
        return Err(TrainError::dataset(&d.train, "the training split is empty"));
    }
    let validation = validation.map(window).transpose()?;
    let test = test.map(window).transpose()?;
    let (mut model, fresh) = checkpoint.load_question_answering(device)?;
    let head = |name: &str| name.starts_with("qa_outputs.");
    let (counts, adapter) = match recipe.method {
        Method::Full => (crate::method::full(&mut model), None),
        Method::Head => {
            set_trainable(&mut model, &head);
            (
                ParamCounts {
                    trainable: crate::output::param_count(&model, &head),
                    all: crate::output::param_count(&model, &|_| true),
                },
                None,
            )
        }
        Method::Lora
        | Method::Qlora
        | Method::Ia3
        | Method::Bottleneck
        | Method::PrefixTuning
        | Method::PromptTuning => {
            // peft's task_type = "QUESTION_ANS" saves the span head with the adapter.
            let (counts, cfg) = crate::method::attach_adapter(
                &mut model,
                recipe,
                &["qa_outputs"],
                &tokenizer,
                device,
            )?
            .ok_or(TrainError::NoAdapterTable)?;
            (counts, Some(cfg))
        }
    };
    Ok(QaPrepared {
        checkpoint,
        tokenizer,
        train,
        validation,
        test,
        pad_id,
        doc_stride,
        model,
        counts,
        adapter,
        fresh,
    })
}

/// The objective of a prepared run (evaluation on the validation split).
pub fn objective(p: &QaPrepared, recipe: &Recipe) -> QuestionAnswering {
    QuestionAnswering {
        pad_id: p.pad_id,
        eval_examples: p
            .validation
            .as_ref()
            .map(|v| v.examples.clone())
            .unwrap_or_default(),
        max_answer_length: recipe.data.max_answer_length,
    }
}

/// Trains (see [`crate::trainer::train`]).
pub fn run_training(
    p: &mut QaPrepared,
    recipe: &Recipe,
    device: &Device,
    observer: &mut dyn crate::Observer,
    resume: Option<&Path>,
) -> Result<crate::TrainSummary> {
    let objective = objective(p, recipe);
    crate::trainer::train(
        &objective,
        &mut p.model,
        &p.train.features,
        p.validation.as_ref().map(|v| v.features.as_slice()),
        &recipe.training,
        device,
        observer,
        resume,
    )
}

/// Loss, exact match and F1 of a split.
pub fn evaluate_split(
    p: &QaPrepared,
    recipe: &Recipe,
    split: &QaSplit,
    device: &Device,
) -> Evaluation {
    let objective = QuestionAnswering {
        eval_examples: split.examples.clone(),
        ..objective(p, recipe)
    };
    let (loss, answers) = objective.run(
        &p.model,
        &split.features,
        recipe.training.per_device_eval_batch_size,
        device,
    );
    let (em, f1) = squad_metrics(&split.examples, &answers);
    Evaluation {
        loss,
        metrics: BTreeMap::from([("exact_match".to_string(), em), ("f1".to_string(), f1)]),
        report: None,
    }
}

/// Saves the result: a `peft` adapter (`QUESTION_ANS`) for LoRA, a `transformers` folder
/// otherwise, with the tokenizer and `qa.json` (max_length, doc_stride).
pub fn save(p: &QaPrepared, recipe: &Recipe, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| TrainError::io(out, e))?;
    match &p.adapter {
        Some(cfg) => {
            crate::output::save_adapter(&p.model, cfg, &recipe.model, "QUESTION_ANS", out)?;
        }
        None => {
            p.checkpoint.write_question_answering_config(out)?;
            crate::output::save_weights(&p.model, out)?;
        }
    }
    p.checkpoint.write_tokenizer_files(&p.tokenizer, out)?;
    let info = serde_json::json!({
        "task": "question-answering",
        "max_length": recipe.data.max_length,
        "doc_stride": p.doc_stride,
        "base_model": recipe.model,
    });
    whet_models::fsutil::write_atomic(&out.join("qa.json"), info.to_string().as_bytes())?;
    Ok(())
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
    model: &BertForQuestionAnswering,
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
        .map_err(TrainError::Tokenizer)?;
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
        let (s, e) = logits(model, &b, Mode::Eval, device);
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
        return Err(TrainError::EmptyContext);
    }
    Ok(found)
}
