//! Extractive question answering end to end (`task = "question-answering"`, BERT family):
//! SQuAD-format data cut into windows, the start/end loss, exact match and F1 as the SQuAD
//! script computes them, and output the Python world loads (`BertForQuestionAnswering` folder,
//! or a `peft` adapter with `qa_outputs`). The `pipeline("question-answering")` answer, and
//! loading a saved folder back, are in [`whet_infer::question_answering`].

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::Module;
use burn::tensor::{Device, Int, Tensor, TensorData};
use whet_data::{Encoding, QaColumns, QaExample, QaFeature, Table, qa_examples, qa_features};
use whet_infer::question_answering::{QaBatch, answer, collate, logits};
use whet_metrics::squad_scores;
use whet_models::QuestionAnswerer;
use whet_models::{Checkpoint, Mode, TextTokenizer};
use whet_peft::{ParamCounts, PeftConfig};

use crate::error::{Result, TrainError};
use crate::recipe::Recipe;
use crate::task::{Outcome, Report, Task, one_line};
use crate::trainer::{BatchCounts, Evaluation, Objective};

/// Start and end of the answer span; evaluation scores the evaluation examples.
pub struct QuestionAnswering {
    pub pad_id: u32,
    /// The examples the evaluation features were cut from.
    pub eval_examples: Vec<QaExample>,
    pub max_answer_length: usize,
    /// Batches run without their padding (`training.padding_free`, off unless set): the loss
    /// then leaves padding positions out of its softmax, which `transformers` counts in (so
    /// its loss depends on how far a batch is padded), as if each window ran alone.
    pub padding_free: bool,
}

/// `(CE(start) + CE(end)) / 2` summed over the batch, as `BertForQuestionAnswering` computes
/// its (mean) loss. Its softmax runs over the padding positions too; a padding-free batch has
/// no logits there (see [`QuestionAnswering::padding_free`]), so they are left out of it.
fn summed_span_loss(
    start: Tensor<2>,
    end: Tensor<2>,
    b: &QaBatch,
    padding_free: bool,
    device: &Device,
) -> Tensor<1> {
    let n = b.batch;
    let padding = padding_free.then(|| {
        let mask = TensorData::new(b.attention_mask.clone(), [n, b.len]);
        Tensor::<2, Int>::from_data(mask, device).equal_elem(0)
    });
    let ce = |logits: Tensor<2>, target: &Vec<i64>| {
        let logits = match &padding {
            Some(p) => logits.mask_fill(p.clone(), whet_models::layers::MASK_VALUE),
            None => logits,
        };
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
        model: &QuestionAnswerer,
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
            let (s, e) = logits(model, &b, Mode::Eval, self.padding_free, device);
            loss += summed_span_loss(s.clone(), e.clone(), &b, self.padding_free, device)
                .into_scalar::<f32>() as f64;
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
    type Model = QuestionAnswerer;
    type Example = QaFeature;
    type Batch = QaBatch;

    fn collate(&self, items: &[&QaFeature]) -> QaBatch {
        collate(items, self.pad_id)
    }

    fn length(&self, example: &QaFeature) -> usize {
        example.ids.len()
    }

    fn counts(&self, b: &QaBatch) -> BatchCounts {
        BatchCounts {
            units: b.batch,
            samples: b.batch,
            tokens: b.tokens,
            positions: b.batch * b.len,
        }
    }

    fn summed_loss(
        &self,
        model: &QuestionAnswerer,
        b: &QaBatch,
        device: &Device,
    ) -> Result<Tensor<1>> {
        let (s, e) = logits(model, b, Mode::Train, self.padding_free, device);
        Ok(summed_span_loss(s, e, b, self.padding_free, device))
    }

    fn evaluate(
        &self,
        model: &QuestionAnswerer,
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
    pub model: QuestionAnswerer,
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
    // peft's task_type = "QUESTION_ANS" saves the span head with the adapter.
    let (counts, adapter) = crate::method::apply(
        &mut model,
        recipe,
        Some(&head),
        &["qa_outputs"],
        &tokenizer,
        device,
    )?;
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
        padding_free: recipe.padding_free(),
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
) -> Result<Evaluation> {
    let objective = QuestionAnswering {
        eval_examples: split.examples.clone(),
        ..objective(p, recipe)
    };
    objective.evaluate(
        &p.model,
        &split.features,
        recipe.training.per_device_eval_batch_size,
        device,
    )
}

/// How a trained model's evaluation windows and scores SQuAD-format examples: what `qa.json`
/// records of the run.
#[derive(Debug, Clone, Copy)]
pub struct QaWindows {
    pub max_length: usize,
    pub doc_stride: usize,
    pub max_answer_length: usize,
    pub padding_free: bool,
    pub pad_id: u32,
}

/// Loss, exact match and F1 of a trained model on SQuAD-format examples, windowed as it was
/// trained: what the run's own evaluation computes (`whet eval` on a question-answering model).
pub fn evaluate_examples(
    model: &QuestionAnswerer,
    tokenizer: &TextTokenizer,
    examples: &[QaExample],
    w: QaWindows,
    batch_size: usize,
    device: &Device,
) -> Result<Evaluation> {
    let features = qa_features(tokenizer, examples, w.max_length, w.doc_stride)?;
    let objective = QuestionAnswering {
        pad_id: w.pad_id,
        eval_examples: examples.to_vec(),
        max_answer_length: w.max_answer_length,
        padding_free: w.padding_free,
    };
    objective.evaluate(model, &features, batch_size, device)
}

/// Saves the result: a `peft` adapter (`QUESTION_ANS`) for LoRA, a `transformers` folder
/// otherwise, with the tokenizer and `qa.json` (max_length, doc_stride, max_answer_length,
/// padding_free).
/// `whet_infer::question_answering::load` reads it back.
pub fn save(p: &QaPrepared, recipe: &Recipe, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| TrainError::io(out, e))?;
    match &p.adapter {
        Some(cfg) => {
            crate::output::save_adapter(&p.model, cfg, recipe, "QUESTION_ANS", out)?;
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
        "max_answer_length": recipe.data.max_answer_length,
        "padding_free": recipe.padding_free(),
        "base_model": recipe.model,
    });
    whet_models::fsutil::write_atomic(&out.join("qa.json"), info.to_string().as_bytes())?;
    Ok(())
}

/// A question-answering run.
pub struct QuestionAnsweringTask {
    p: QaPrepared,
    run: crate::task::Run,
}

impl QuestionAnsweringTask {
    /// Prepares the run's data and model.
    pub fn open(run: crate::task::Run) -> Result<Self> {
        Ok(Self {
            p: prepare(&run.recipe, &run.device)?,
            run,
        })
    }
}

impl Task for QuestionAnsweringTask {
    /// A row's text: the question, then the context.
    fn split_texts(&self) -> Vec<(&'static str, Vec<whet_data::leakage::Text>)> {
        let p = &self.p;
        crate::task::splits(&p.train, p.validation.as_ref(), p.test.as_ref())
            .map(|(name, split)| {
                let texts = split.examples.iter().map(|e| whet_data::leakage::Text {
                    origin: e.origin.clone(),
                    text: format!("{}\n{}", e.question, e.context),
                });
                (name, texts.collect())
            })
            .collect()
    }

    fn describe(&self) -> Vec<String> {
        let (p, recipe) = (&self.p, &self.run.recipe);
        let sizes = |s: Option<&QaSplit>| {
            s.map_or("0".to_string(), |s| {
                format!("{} ({} windows)", s.examples.len(), s.features.len())
            })
        };
        let mut lines = vec![
            format!(
                "model {} ({}), method {:?}, extractive question answering",
                recipe.model.display(),
                p.checkpoint.family(),
                recipe.method
            ),
            format!(
                "data: {} train / {} validation / {} test questions, max_length {}, doc_stride {}",
                sizes(Some(&p.train)),
                sizes(p.validation.as_ref()),
                sizes(p.test.as_ref()),
                recipe.data.max_length,
                p.doc_stride
            ),
        ];
        lines.extend(crate::task::closing_lines(&p.fresh, &p.counts));
        lines
    }

    fn plan(&mut self) -> Option<crate::plan::MemoryPlan> {
        let p = &mut self.p;
        let lens = p.train.features.iter().map(|f| (f.ids.len(), 0)).collect();
        let args = &self.run.recipe.training;
        Some(crate::plan::plan_of(
            &p.checkpoint,
            &mut p.model,
            args,
            lens,
            false,
            1,
        ))
    }

    /// The pipeline's best answer to a few held-out questions, with the gold answer.
    fn sample(&mut self, before: bool) -> Result<Vec<String>> {
        let p = &self.p;
        let split = p
            .validation
            .as_ref()
            .or(p.test.as_ref())
            .unwrap_or(&p.train);
        let mut lines = vec![
            if before {
                "before training:"
            } else {
                "after training:"
            }
            .to_string(),
        ];
        for ex in split.examples.iter().take(3) {
            let best = answer(
                &p.model,
                &p.tokenizer,
                &ex.question,
                &ex.context,
                self.run.recipe.data.max_length,
                p.doc_stride,
                15,
                1,
                &self.run.device,
            )?;
            let gold = ex.answers.first().map_or("", |a| a.text.as_str());
            lines.push(format!(
                "  {:<50} gold {:<20} predicted {:<20} ({:.2})",
                one_line(&ex.question, 50),
                one_line(gold, 20),
                one_line(&best[0].answer, 20),
                best[0].score
            ));
        }
        Ok(lines)
    }

    fn total_steps(&self) -> usize {
        self.run
            .recipe
            .training
            .total_steps(self.p.train.features.len())
    }

    fn train(&mut self, observer: &mut dyn crate::Observer) -> Result<crate::TrainSummary> {
        let run = &self.run;
        run_training(
            &mut self.p,
            &run.recipe,
            &run.device,
            observer,
            run.resume.as_deref(),
        )
    }

    fn evaluate(&mut self, _summary: &crate::TrainSummary) -> Result<Outcome> {
        let p = &self.p;
        let mut out = Outcome::default();
        for (name, split) in [("eval", &p.validation), ("test", &p.test)] {
            if let Some(split) = split {
                let e = evaluate_split(p, &self.run.recipe, split, &self.run.device)?;
                out.results.extend(e.results(name));
                out.lines.push(format!(
                    "{name}: loss {:.4}, exact match {:.2}, F1 {:.2} ({} questions)",
                    e.loss,
                    e.metrics["exact_match"],
                    e.metrics["f1"],
                    split.examples.len()
                ));
            }
        }
        Ok(out)
    }

    /// The exact splits as SQuAD-format JSONL (`question`, `context`, `answers` with `text` and
    /// character `answer_start` lists), which `whet eval` and the reference read.
    fn write_data(&self, dir: &Path) -> Result<()> {
        let p = &self.p;
        let splits = crate::task::splits(&p.train, p.validation.as_ref(), p.test.as_ref());
        crate::task::write_splits(dir, splits, |split: &QaSplit| {
            let row = |e: &QaExample| {
                serde_json::json!({
                    "question": e.question,
                    "context": e.context,
                    "answers": {
                        "text": e.answers.iter().map(|a| &a.text).collect::<Vec<_>>(),
                        "answer_start": e.answers.iter().map(|a| a.start).collect::<Vec<_>>(),
                    },
                })
            };
            split.examples.iter().map(row).collect()
        })
    }

    fn save(&self, out: &Path) -> Result<()> {
        save(&self.p, &self.run.recipe, out)
    }

    fn counts(&self) -> ParamCounts {
        self.p.counts
    }

    fn report(&self) -> Report {
        Report {
            unit: "windows",
            curve_metric: "",
            adapter: self.p.adapter.is_some(),
            files: "qa.json, all_results.json, trainer_state.json, recipe.resolved.toml, loss_curve.png",
        }
    }
}
