//! The training loop for sequence classification: seeded epoch order, micro-batches with
//! gradient accumulation whose loss equals the whole batch's, clipping, the schedule, the
//! optimizer, evaluation by strategy, best model and early stopping.

use std::time::Instant;

use burn::module::Module;
use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::Serialize;
use whet_data::{Batch, Encoded, Target, collate, epoch_order};
use whet_metrics::{ClassificationReport, classification_report, multilabel_report};
use whet_models::{Classifier, ClassifierInput, Mode};

use crate::args::{Strategy, TrainingArguments};
use crate::checkpoint::{self, TrainerState};
use crate::optim::{GradStore, OptimConfig, Optimizer};
use crate::schedule::lr_factor;

/// Something that watches training (a progress bar, a log file).
pub trait Observer {
    /// After each optimizer step.
    fn step(&mut self, _s: &StepLog) {}
    /// After each evaluation.
    fn eval(&mut self, _e: &EvalLog) {}
}

/// No-op observer.
pub struct Silent;
impl Observer for Silent {}

/// One optimizer step.
#[derive(Debug, Clone, Serialize)]
pub struct StepLog {
    pub step: usize,
    pub total_steps: usize,
    pub epoch: f64,
    pub loss: f64,
    pub learning_rate: f64,
    pub grad_norm: f64,
    pub samples_per_second: f64,
}

/// One evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct EvalLog {
    pub step: usize,
    pub epoch: f64,
    pub loss: f64,
    pub report: ClassificationReport,
}

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    pub steps: usize,
    pub epochs: f64,
    pub train_loss: f64,
    pub train_runtime: f64,
    pub train_samples: usize,
    pub train_tokens: usize,
    pub history: Vec<StepLog>,
    pub evals: Vec<EvalLog>,
    pub best_step: Option<usize>,
}

/// The labels of a batch as tensors.
pub enum BatchLabels {
    /// `[B]` class ids.
    Class(Tensor<1, Int>),
    /// `[B, C]` multi-hot.
    MultiHot(Tensor<2>),
}

/// Builds model inputs and labels of a padded batch on `device` (`n_labels` sizes the
/// multi-hot rows of multi-label targets).
pub fn to_input(
    b: &Batch,
    device: &Device,
    with_types: bool,
    n_labels: usize,
) -> (ClassifierInput, BatchLabels) {
    let t = |v: &Vec<i64>| {
        Tensor::<2, Int>::from_data(TensorData::new(v.clone(), [b.batch, b.len]), device)
    };
    let labels = if b.targets.iter().any(|t| matches!(t, Target::Multi(_))) {
        let mut hot = vec![0f32; b.batch * n_labels];
        for (r, t) in b.targets.iter().enumerate() {
            for &k in t.ids() {
                hot[r * n_labels + k] = 1.0;
            }
        }
        BatchLabels::MultiHot(Tensor::from_data(
            TensorData::new(hot, [b.batch, n_labels]),
            device,
        ))
    } else {
        let ids: Vec<i64> = b.targets.iter().map(|t| t.ids()[0] as i64).collect();
        BatchLabels::Class(Tensor::from_data(TensorData::new(ids, [b.batch]), device))
    };
    (
        ClassifierInput {
            input_ids: t(&b.input_ids),
            attention_mask: t(&b.attention_mask),
            token_type_ids: with_types.then(|| t(&b.token_type_ids)),
        },
        labels,
    )
}

/// The loss of a batch summed over its rows (callers divide by the sample count):
/// cross-entropy for class ids; for multi-hot targets the binary cross-entropy with logits
/// averaged over labels, so that the mean over samples equals `BCEWithLogitsLoss`'s mean over
/// all elements, as `transformers` computes it for `multi_label_classification`.
pub fn summed_loss(logits: Tensor<2>, labels: BatchLabels) -> Tensor<1> {
    let [n, c] = logits.dims();
    match labels {
        BatchLabels::Class(ids) => {
            let logp = burn::tensor::activation::log_softmax(logits, 1);
            -logp.gather(1, ids.reshape([n, 1])).sum()
        }
        BatchLabels::MultiHot(y) => {
            // max(x, 0) - x*y + log(1 + exp(-|x|)): stable for logits of any size.
            let x = logits;
            let bce = x.clone().clamp_min(0.0) - x.clone() * y + x.abs().neg().exp().log1p();
            bce.sum().div_scalar(c as f64)
        }
    }
}

/// Predicted targets of a batch of logits: the arg-max class, or every label whose sigmoid
/// exceeds 0.5 (logit > 0) for multi-label.
fn predictions(logits: Tensor<2>, multi_label: bool) -> Vec<Target> {
    let [n, c] = logits.dims();
    if multi_label {
        let v: Vec<f32> = logits
            .into_data()
            .convert::<f32>()
            .try_to_vec()
            .unwrap_or_default();
        (0..n)
            .map(|i| Target::Multi((0..c).filter(|&k| v[i * c + k] > 0.0).collect()))
            .collect()
    } else {
        let arg: Vec<i64> = logits
            .argmax(1)
            .into_data()
            .convert::<i64>()
            .try_to_vec()
            .unwrap_or_default();
        arg.iter().map(|&p| Target::Class(p as usize)).collect()
    }
}

/// Scores predicted targets against the truth (single- or multi-label by the truth's kind).
pub fn report(truth: &[Target], preds: &[Target], n_labels: usize) -> ClassificationReport {
    let multi = truth.iter().any(|t| matches!(t, Target::Multi(_)));
    if multi {
        let ids = |v: &[Target]| v.iter().map(|t| t.ids().to_vec()).collect::<Vec<_>>();
        multilabel_report(&ids(truth), &ids(preds), n_labels)
    } else {
        let ids = |v: &[Target]| v.iter().map(|t| t.ids()[0]).collect::<Vec<_>>();
        classification_report(&ids(truth), &ids(preds), n_labels)
    }
}

/// Loss and predictions over a dataset, in evaluation mode.
pub fn evaluate(
    model: &Classifier,
    data: &[Encoded],
    n_labels: usize,
    batch_size: usize,
    pad_id: u32,
    device: &Device,
) -> whet_models::Result<(f64, ClassificationReport, Vec<Target>)> {
    // Evaluate on the plain backend: no autodiff graph is recorded for forward passes that are
    // never differentiated.
    let model = &model.valid();
    let device = &device.clone().without_autodiff();
    let with_types = matches!(model, Classifier::Bert(_));
    let multi = data.iter().any(|e| matches!(e.label, Target::Multi(_)));
    let mut loss = 0.0;
    let mut preds = Vec::with_capacity(data.len());
    for chunk in data.chunks(batch_size.max(1)) {
        let items: Vec<&Encoded> = chunk.iter().collect();
        let b = collate(&items, pad_id);
        let (input, labels) = to_input(&b, device, with_types, n_labels);
        let logits = model.forward(input, Mode::Eval)?;
        loss += summed_loss(logits.clone(), labels).into_scalar::<f32>() as f64;
        preds.extend(predictions(logits, multi));
    }
    let truth: Vec<Target> = data.iter().map(|e| e.label.clone()).collect();
    let report = report(&truth, &preds, n_labels);
    Ok((loss / data.len().max(1) as f64, report, preds))
}

/// One optimizer step over micro-batches: each contributes its summed loss divided by the
/// number of samples in the whole step, so the accumulated gradient is the gradient of the
/// step's mean loss; then clipping to `max_grad_norm` (0: off) and the update at `lr`.
/// Returns the step's mean loss and the gradient norm before clipping.
pub fn optimizer_step(
    model: &mut Classifier,
    opt: &mut Optimizer,
    batches: &[Batch],
    n_labels: usize,
    lr: f64,
    max_grad_norm: f64,
    device: &Device,
) -> Result<(f64, f64), String> {
    let with_types = matches!(model, Classifier::Bert(_));
    let n: usize = batches.iter().map(|b| b.batch).sum();
    let mut grads = GradStore::default();
    let mut step_loss = 0.0;
    for b in batches {
        let (input, labels) = to_input(b, device, with_types, n_labels);
        let logits = model
            .forward(input, Mode::Train)
            .map_err(|e| e.to_string())?;
        let loss = summed_loss(logits, labels).div_scalar(n as f64);
        let value = loss.clone().into_scalar::<f32>() as f64;
        if !value.is_finite() {
            return Err(format!(
                "the loss became {value} at step {{step}} (learning rate too high?); stopping"
            ));
        }
        step_loss += value;
        let g = loss.backward();
        grads.accumulate(model, &g);
    }
    let grad_norm = grads.clip(max_grad_norm);
    opt.step(model, &grads, lr);
    Ok((step_loss, grad_norm))
}

/// The value of `metric_for_best_model` (default: eval loss, lower is better).
fn metric(e: &EvalLog, name: Option<&str>) -> Result<(f64, bool), String> {
    let name = name.unwrap_or("loss");
    let name = name.strip_prefix("eval_").unwrap_or(name);
    Ok(match name {
        "loss" => (e.loss, false),
        "accuracy" => (e.report.accuracy, true),
        "f1" => (e.report.macro_avg.f1, true),
        "matthews_correlation" => (e.report.matthews_correlation, true),
        "precision" => (e.report.macro_avg.precision, true),
        "recall" => (e.report.macro_avg.recall, true),
        other => {
            return Err(format!(
                "metric_for_best_model {other:?} is not one of loss, accuracy, f1, precision, recall, matthews_correlation"
            ));
        }
    })
}

/// Trains `model` on `train`, evaluating on `eval` as the arguments say.
#[allow(clippy::too_many_arguments)]
pub fn train_classifier(
    model: &mut Classifier,
    train: &[Encoded],
    eval: Option<&[Encoded]>,
    n_labels: usize,
    pad_id: u32,
    args: &TrainingArguments,
    device: &Device,
    observer: &mut dyn Observer,
    resume: Option<&std::path::Path>,
) -> Result<TrainSummary, String> {
    args.validate()?;
    if train.is_empty() {
        return Err("the training split is empty".into());
    }
    let total = args.total_steps(train.len());
    let warmup = args.warmup(total);
    let steps_per_epoch = args.steps_per_epoch(train.len());
    let micro = args.per_device_train_batch_size;
    let per_step = micro * args.gradient_accumulation_steps;
    let mut opt = Optimizer::new(OptimConfig {
        kind: args.optim,
        beta1: args.adam_beta1,
        beta2: args.adam_beta2,
        eps: args.adam_epsilon,
        weight_decay: args.weight_decay,
    });
    let start = Instant::now();
    let mut history = Vec::new();
    let mut evals: Vec<EvalLog> = Vec::new();
    let mut best: Option<(f64, usize, Classifier)> = None;
    let mut state = TrainerState {
        patience_left: args.early_stopping_patience,
        ..Default::default()
    };
    if let Some(dir) = resume {
        state = checkpoint::load(dir, model, &mut opt, device)?;
    }
    let mut step = state.global_step;
    let mut epoch = step / steps_per_epoch;
    // Steps of the current epoch already taken before a resume.
    let mut skip = step % steps_per_epoch;
    'outer: while step < total {
        let order = epoch_order(train.len(), args.seed, epoch);
        for chunk in order.chunks(per_step).skip(skip) {
            if step >= total {
                break 'outer;
            }
            // Dropout masks depend only on the seed and the step: a resumed run draws the same.
            device.seed(args.seed.wrapping_add(step as u64));
            let batches: Vec<Batch> = chunk
                .chunks(micro)
                .map(|mb| collate(&mb.iter().map(|&i| &train[i]).collect::<Vec<_>>(), pad_id))
                .collect();
            state.tokens += batches.iter().map(|b| b.tokens).sum::<usize>();
            let lr = args.learning_rate * lr_factor(args.lr_scheduler_type, step, warmup, total);
            let (step_loss, grad_norm) = optimizer_step(
                model,
                &mut opt,
                &batches,
                n_labels,
                lr,
                args.max_grad_norm,
                device,
            )
            .map_err(|e| e.replace("{step}", &(step + 1).to_string()))?;
            step += 1;
            state.samples += chunk.len();
            state.loss_sum += step_loss;
            let log = StepLog {
                step,
                total_steps: total,
                epoch: step as f64 / steps_per_epoch as f64,
                loss: step_loss,
                learning_rate: lr,
                grad_norm,
                samples_per_second: state.samples as f64 / start.elapsed().as_secs_f64(),
            };
            observer.step(&log);
            history.push(log);

            let end_of_epoch = step.is_multiple_of(steps_per_epoch) || step == total;
            let do_eval = match args.eval_strategy {
                Strategy::No => false,
                Strategy::Epoch => end_of_epoch,
                Strategy::Steps => {
                    args.eval_steps.is_some_and(|k| step.is_multiple_of(k)) || step == total
                }
            };
            if let (true, Some(eval)) = (do_eval, eval) {
                let (loss, report, _) = evaluate(
                    model,
                    eval,
                    n_labels,
                    args.per_device_eval_batch_size,
                    pad_id,
                    device,
                )
                .map_err(|e| e.to_string())?;
                let e = EvalLog {
                    step,
                    epoch: step as f64 / steps_per_epoch as f64,
                    loss,
                    report,
                };
                observer.eval(&e);
                let (value, higher) = metric(&e, args.metric_for_best_model.as_deref())?;
                let higher = args.greater_is_better.unwrap_or(higher);
                let improved = state
                    .best_metric
                    .is_none_or(|b| if higher { value > b } else { value < b });
                if improved {
                    state.patience_left = args.early_stopping_patience;
                    state.best_metric = Some(value);
                    state.best_step = Some(step);
                    best = Some((value, step, model.clone()));
                } else if let Some(p) = state.patience_left.as_mut() {
                    *p = p.saturating_sub(1);
                }
                evals.push(e);
            }
            let do_save = match args.save_strategy {
                Strategy::No => false,
                Strategy::Epoch => end_of_epoch,
                Strategy::Steps => step.is_multiple_of(args.save_steps.max(1)),
            };
            if do_save {
                state.global_step = step;
                state.optimizer_steps = opt.step;
                checkpoint::save(&args.output_dir, model, &opt, &state, args.save_total_limit)?;
            }
            if state.patience_left == Some(0) {
                break 'outer;
            }
        }
        skip = 0;
        epoch += 1;
    }
    let (samples, tokens, loss_sum) = (state.samples, state.tokens, state.loss_sum);
    let best_step = state.best_step;
    if args.load_best_model_at_end {
        match (best, best_step) {
            (Some((_, _, m)), _) => *model = m,
            // The best evaluation happened before a resume: its checkpoint holds it.
            (None, Some(s)) => {
                let dir = args.output_dir.join(format!("checkpoint-{s}"));
                checkpoint::load_params(&dir, model, device)?;
            }
            (None, None) => {}
        }
    }
    Ok(TrainSummary {
        steps: step,
        epochs: step as f64 / steps_per_epoch as f64,
        train_loss: loss_sum / step.max(1) as f64,
        train_runtime: start.elapsed().as_secs_f64(),
        train_samples: samples,
        train_tokens: tokens,
        history,
        evals,
        best_step,
    })
}
