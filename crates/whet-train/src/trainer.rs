//! The training loop, one for every task: seeded epoch order, the examples of each optimizer
//! step, evaluation by strategy, checkpoints, best model and early stopping. A task plugs in
//! through [`TrainStep`]: what one step does with its examples, and its evaluation. Supervised
//! tasks supply an [`Objective`] instead (how examples become batches, and the loss), which
//! takes its steps as micro-batches with gradient accumulation whose loss equals the whole
//! batch's, clipping, the schedule and the optimizer; PPO supplies its own step (a rollout and
//! its PPO epochs).

use std::collections::BTreeMap;
use std::time::Instant;

use burn::tensor::{Device, Tensor};
use serde::Serialize;
use whet_data::{epoch_order, length_grouped};
use whet_metrics::ClassificationReport;
use whet_models::VisitParams;

use crate::args::TrainingArguments;
use crate::checkpoint::{self, TrainerState};
use crate::error::{Result, TrainError};
use crate::optim::{GradStore, OptimConfig, Optimizer};
use crate::scaler::LossScaler;
use crate::schedule::lr_factor;

/// What a task supplies to the trainer: one step over the examples the trainer picked, and
/// evaluation (as burn's `TrainStep` / `ValidStep`).
pub trait TrainStep {
    type Model: VisitParams + Clone;
    type Example;

    /// Takes optimizer step `at.step` (0-based) of `at.total` with `examples`: the
    /// `per_device_train_batch_size x gradient_accumulation_steps` examples of this step in the
    /// seeded epoch order (fewer at the end of an epoch).
    fn step(
        &self,
        model: &mut Self::Model,
        opt: &mut Optimizer,
        examples: &[&Self::Example],
        at: &StepAt,
    ) -> Result<StepResult>;
    /// Loss and metrics over a dataset, in evaluation mode.
    fn evaluate(
        &self,
        model: &Self::Model,
        data: &[Self::Example],
        batch_size: usize,
        device: &Device,
    ) -> Result<Evaluation>;
    /// Whether the model is also evaluated before the first step, as a baseline the curves
    /// start from (PPO); that evaluation is logged but does not compete for the best model.
    fn evaluates_at_start(&self) -> bool {
        false
    }
    /// What `group_by_length` sorts by: the tokens of the longest row the example makes.
    fn length(&self, example: &Self::Example) -> usize;
    /// Continuations the model generates at an evaluation (`eval.generate`); none by default.
    fn samples(&self, _model: &Self::Model, _device: &Device) -> Result<Vec<Sample>> {
        Ok(vec![])
    }
}

/// A held-out prompt and the model's greedy continuation of it, at one evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Sample {
    pub prompt: String,
    pub continuation: String,
}

/// Where a step stands.
pub struct StepAt<'a> {
    /// 0-based optimizer step.
    pub step: usize,
    /// Optimizer steps of the whole run.
    pub total: usize,
    pub args: &'a TrainingArguments,
    pub device: &'a Device,
}

/// A number a step computed. On the CPU it is read at once (free there); on a GPU it stays
/// on the device until it is logged, because reading a value back waits for every kernel
/// queued before it and would stall the device at every micro-batch.
#[derive(Debug, Clone)]
pub enum Reading {
    Host(f64),
    /// A one-value tensor, not yet read (boxed: a tensor handle is large and most readings,
    /// on the CPU, are plain numbers).
    Device(Box<Tensor<1>>),
}

impl Reading {
    /// A one-value tensor read at once on the CPU, where reading is free, and kept on a GPU.
    pub fn of(t: Tensor<1>) -> Self {
        if whet_models::device::is_flex(&t.device()) {
            Self::Host(t.into_scalar::<f32>() as f64)
        } else {
            Self::Device(Box::new(t.inner()))
        }
    }
}

impl Default for Reading {
    fn default() -> Self {
        Self::Host(0.0)
    }
}

impl From<f64> for Reading {
    fn from(v: f64) -> Self {
        Self::Host(v)
    }
}

/// Reads `readings` with one transfer for all the device ones.
pub fn read_all(readings: Vec<Reading>) -> Vec<f64> {
    let on_device: Vec<Tensor<1>> = readings
        .iter()
        .filter_map(|r| match r {
            Reading::Device(t) => Some((**t).clone()),
            Reading::Host(_) => None,
        })
        .collect();
    let mut read = if on_device.is_empty() {
        Vec::new()
    } else {
        Tensor::cat(on_device, 0)
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .unwrap_or_default()
    }
    .into_iter();
    readings
        .into_iter()
        .map(|r| match r {
            Reading::Host(v) => v,
            Reading::Device(_) => read.next().map_or(f64::NAN, f64::from),
        })
        .collect()
}

/// What a step did.
#[derive(Debug, Clone, Default)]
pub struct StepResult {
    /// The step's mean loss.
    pub loss: Reading,
    pub learning_rate: f64,
    /// Before clipping.
    pub grad_norm: Reading,
    /// Examples (or generated responses) and non-padding tokens the step consumed.
    pub samples: usize,
    pub tokens: usize,
    /// Positions of the step's padded batches, padding included (0 when the task pads no
    /// batches of examples, as PPO's rollouts).
    pub positions: usize,
    /// What the task logs per step (DPO's rewards, PPO's KL).
    pub metrics: BTreeMap<String, Reading>,
}

/// What a supervised task supplies to the trainer: batches and their loss. Every objective is
/// a [`TrainStep`] whose step is [`step_objective`] at the scheduled learning rate.
pub trait Objective {
    type Model: VisitParams + Clone;
    type Example;
    type Batch;

    /// Pads a micro-batch.
    fn collate(&self, items: &[&Self::Example]) -> Self::Batch;
    /// The tokens of the longest row the example makes in a batch (`group_by_length`).
    fn length(&self, example: &Self::Example) -> usize;
    /// What a batch holds.
    fn counts(&self, batch: &Self::Batch) -> BatchCounts;
    /// The training-mode loss of a batch summed over its units; the trainer divides by the
    /// units of the whole optimizer step, so accumulated micro-batches give the big batch's
    /// mean loss and gradient.
    fn summed_loss(
        &self,
        model: &Self::Model,
        batch: &Self::Batch,
        device: &Device,
    ) -> Result<Tensor<1>>;
    /// Metrics gathered while computing the losses of the step just taken (logged with it);
    /// most objectives have none.
    fn take_step_metrics(&self) -> BTreeMap<String, Reading> {
        BTreeMap::new()
    }
    /// Loss and metrics over a dataset, in evaluation mode.
    fn evaluate(
        &self,
        model: &Self::Model,
        data: &[Self::Example],
        batch_size: usize,
        device: &Device,
    ) -> Result<Evaluation>;
    /// Continuations the model generates at an evaluation (see [`TrainStep::samples`]).
    fn samples(&self, _model: &Self::Model, _device: &Device) -> Result<Vec<Sample>> {
        Ok(vec![])
    }
}

/// Sizes of a batch.
#[derive(Debug, Clone, Copy, Default)]
pub struct BatchCounts {
    /// What the loss averages over: samples (classification) or predicted tokens (language
    /// modelling, as `transformers` counts `num_items_in_batch`).
    pub units: usize,
    pub samples: usize,
    /// Non-padding tokens (throughput).
    pub tokens: usize,
    /// Positions of the padded batch, padding included.
    pub positions: usize,
}

/// The result of evaluating a model on a dataset.
#[derive(Debug, Clone, Serialize)]
pub struct Evaluation {
    pub loss: f64,
    /// Named metrics (`accuracy`, `f1`, ..., or `perplexity`).
    pub metrics: BTreeMap<String, f64>,
    /// The full report of classification tasks.
    pub report: Option<ClassificationReport>,
}

impl Evaluation {
    /// `{prefix}_loss` and `{prefix}_{metric}` for `all_results.json` (`eval`, `test`).
    pub fn results(&self, prefix: &str) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        m.insert(format!("{prefix}_loss"), self.loss.into());
        for (k, v) in &self.metrics {
            m.insert(format!("{prefix}_{k}"), (*v).into());
        }
        m
    }
}

/// Something that watches training (a progress bar, a log file).
pub trait Observer {
    /// After each optimizer step, with its numbers; on a GPU these are read when logged
    /// (`logging_steps`), so several steps may arrive at once.
    fn step(&mut self, _s: &StepLog) {}
    /// After each optimizer step, at once: `step` of `total` are done.
    fn tick(&mut self, _step: usize, _total: usize) {}
    /// After each evaluation.
    fn eval(&mut self, _e: &EvalLog) {}
    /// Something the run decided that the person should know (an option it could not honour
    /// as asked on this machine, and what it does instead).
    fn note(&mut self, _text: &str) {}
    /// Asked after each step's evaluation and checkpoint: true ends training there (a sweep
    /// pausing a trial at a rung; its checkpoint resumes it exactly).
    fn stop(&mut self, _step: usize) -> bool {
        false
    }
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
    /// Tokens of the training batches (padding left out), per second of this process.
    pub tokens_per_second: f64,
    /// What the objective logs per step (DPO's rewards, PPO's KL), flattened into the log.
    #[serde(flatten, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, f64>,
}

/// One evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct EvalLog {
    pub step: usize,
    pub epoch: f64,
    pub loss: f64,
    pub metrics: BTreeMap<String, f64>,
    pub report: Option<ClassificationReport>,
    /// The model's continuations of held-out prompts (`eval.generate`).
    pub samples: Vec<Sample>,
}

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    /// The optimizer step the run ended at.
    pub steps: usize,
    /// The step this process started from: 0, or a resumed checkpoint's step. `history`
    /// holds the steps this process ran.
    pub first_step: usize,
    pub epochs: f64,
    pub train_loss: f64,
    pub train_runtime: f64,
    pub train_samples: usize,
    pub train_tokens: usize,
    /// Positions of the padded training batches, `train_tokens` of them real (0 when the
    /// task pads no batches of examples).
    pub train_positions: usize,
    pub history: Vec<StepLog>,
    pub evals: Vec<EvalLog>,
    pub best_step: Option<usize>,
}

/// One optimizer step over micro-batches: each contributes its summed loss divided by the
/// units of the whole step, so the accumulated gradient is the gradient of the step's mean
/// loss; then clipping to `max_grad_norm` (0: off) and the update at `lr`. Returns the step's
/// mean loss and the gradient norm before clipping. On the CPU a non-finite loss is
/// [`TrainError::NonFiniteLoss`] naming `step`, the 1-based number of this step; on a GPU both
/// numbers stay on the device and the training loop checks the loss when it reads it.
#[allow(clippy::too_many_arguments)]
pub fn step_objective<O: Objective>(
    objective: &O,
    model: &mut O::Model,
    opt: &mut Optimizer,
    batches: &[O::Batch],
    lr: f64,
    max_grad_norm: f64,
    step: usize,
    device: &Device,
) -> Result<(Reading, Reading)> {
    let n: usize = batches.iter().map(|b| objective.counts(b).units).sum();
    let on_host = whet_models::device::is_flex(device);
    let loss_scale = opt.loss_scale();
    let mut grads = GradStore::default();
    let mut host_loss = 0.0;
    let mut device_loss: Option<Tensor<1>> = None;
    for b in batches {
        let loss = objective
            .summed_loss(model, b, device)?
            .div_scalar(n.max(1) as f64);
        if on_host {
            let value = loss.clone().into_scalar::<f32>() as f64;
            if !value.is_finite() {
                return Err(TrainError::NonFiniteLoss {
                    loss: "loss",
                    step,
                    value,
                });
            }
            host_loss += value;
        } else {
            // The inner (non-autodiff) tensor: the gradient norm lives there too, and the
            // two are read back together.
            let value = loss.clone().inner();
            device_loss = Some(match device_loss {
                Some(sum) => sum + value,
                None => value,
            });
        }
        let g = if loss_scale == 1.0 {
            loss.backward()
        } else {
            loss.mul_scalar(loss_scale).backward()
        };
        grads.accumulate(model, &g);
    }
    let loss = if on_host {
        Reading::Host(host_loss)
    } else {
        let loss = device_loss.unwrap_or_else(|| Tensor::zeros([1], &device.clone().inner()));
        Reading::Device(Box::new(loss))
    };
    let grad_norm = finish_step(opt, model, &mut grads, lr, max_grad_norm, device);
    Ok((loss, grad_norm))
}

/// The end of an optimizer step, after the backward passes: undoes the fp16 loss scale,
/// clips to `max_grad_norm` (0: off) and updates, unless fp16 gradients overflowed; then the
/// step is skipped and the scale backs off ([`crate::scaler::LossScaler`]). Returns the
/// gradient norm before clipping. On a GPU it stays on the device, except with fp16: deciding
/// whether to step reads it, as `GradScaler.step` reads its overflow flag.
pub fn finish_step<M: VisitParams>(
    opt: &mut Optimizer,
    model: &mut M,
    grads: &mut GradStore,
    lr: f64,
    max_grad_norm: f64,
    device: &Device,
) -> Reading {
    if let Some(s) = opt.scaler {
        grads.scale(1.0 / s.scale);
    }
    // On the CPU the clipping coefficient goes into the update pass (one pass over each
    // gradient fewer); on a GPU the gradients are scaled there, without reading the norm back.
    let (norm, coef) = if whet_models::device::is_flex(device) {
        let (norm, coef) = grads.clip_coefficient(max_grad_norm);
        (Reading::Host(norm), coef)
    } else {
        let norm = grads.clip_on_device(max_grad_norm, device);
        (Reading::Device(Box::new(norm)), 1.0)
    };
    if opt.scaler.is_none() {
        opt.step(model, grads, lr, coef);
        return norm;
    }
    let value = read_all(vec![norm])[0];
    if opt
        .scaler
        .as_mut()
        .is_some_and(|s| s.update(value.is_finite()))
    {
        opt.step(model, grads, lr, coef);
    }
    Reading::Host(value)
}

impl<O: Objective> TrainStep for O {
    type Model = O::Model;
    type Example = O::Example;

    fn step(
        &self,
        model: &mut O::Model,
        opt: &mut Optimizer,
        examples: &[&O::Example],
        at: &StepAt,
    ) -> Result<StepResult> {
        let args = at.args;
        // Dropout masks depend only on the seed and the step: a resumed run draws the same.
        whet_models::device::seed(at.device, args.seed.wrapping_add(at.step as u64));
        let batches: Vec<O::Batch> = examples
            .chunks(args.per_device_train_batch_size)
            .map(|mb| self.collate(mb))
            .collect();
        let (mut samples, mut tokens, mut positions) = (0, 0, 0);
        for b in &batches {
            let c = self.counts(b);
            samples += c.samples;
            tokens += c.tokens;
            positions += c.positions;
        }
        let warmup = args.warmup(at.total);
        // Steps skipped for fp16 overflow do not advance the schedule (as `Trainer`).
        let scheduled = at.step.saturating_sub(opt.skipped_steps());
        let lr =
            args.learning_rate * lr_factor(args.lr_scheduler_type, scheduled, warmup, at.total);
        let (loss, grad_norm) = step_objective(
            self,
            model,
            opt,
            &batches,
            lr,
            args.max_grad_norm,
            at.step + 1,
            at.device,
        )?;
        Ok(StepResult {
            loss,
            learning_rate: lr,
            grad_norm,
            samples,
            tokens,
            positions,
            metrics: self.take_step_metrics(),
        })
    }

    fn evaluate(
        &self,
        model: &O::Model,
        data: &[O::Example],
        batch_size: usize,
        device: &Device,
    ) -> Result<Evaluation> {
        Objective::evaluate(self, model, data, batch_size, device)
    }

    fn length(&self, example: &O::Example) -> usize {
        Objective::length(self, example)
    }

    fn samples(&self, model: &O::Model, device: &Device) -> Result<Vec<Sample>> {
        Objective::samples(self, model, device)
    }
}

/// A step taken whose numbers are not read yet (on a GPU, until logged).
struct Pending {
    /// The log, its loss, gradient norm and metrics still unset.
    log: StepLog,
    loss: Reading,
    grad_norm: Reading,
    metrics: BTreeMap<String, Reading>,
}

impl Pending {
    fn readings(&self) -> impl Iterator<Item = &Reading> {
        [&self.loss, &self.grad_norm]
            .into_iter()
            .chain(self.metrics.values())
    }
}

/// Reads the pending steps' loss, gradient norm and metrics (one transfer), checks the losses
/// are finite, adds them to the run's sum and hands each step's log to the observer, in order.
fn flush(
    pending: &mut Vec<Pending>,
    state: &mut TrainerState,
    history: &mut Vec<StepLog>,
    observer: &mut dyn Observer,
) -> Result<()> {
    let readings: Vec<Reading> = pending.iter().flat_map(|p| p.readings().cloned()).collect();
    let mut values = read_all(readings).into_iter();
    for p in pending.drain(..) {
        let mut log = p.log;
        let mut next = || values.next().unwrap_or(f64::NAN);
        (log.loss, log.grad_norm) = (next(), next());
        log.metrics = p.metrics.into_keys().map(|k| (k, next())).collect();
        if !log.loss.is_finite() {
            return Err(TrainError::NonFiniteLoss {
                loss: "loss",
                step: log.step,
                value: log.loss,
            });
        }
        state.loss_sum += log.loss;
        observer.step(&log);
        history.push(log);
    }
    Ok(())
}

/// Whether a higher value of an evaluation metric is better: not for the loss, and not for
/// `perplexity` and `mse`, which are errors as a loss is (transformers' default, `greater_is_better`
/// unless the name ends in "loss", would pick the worst of those).
pub fn higher_is_better(metric: &str) -> bool {
    !matches!(metric, "loss" | "perplexity" | "mse")
}

/// The value of `metric_for_best_model` (default: eval loss, lower is better) and whether
/// higher is better ([`higher_is_better`]).
fn metric(e: &EvalLog, name: Option<&str>) -> Result<(f64, bool)> {
    let name = name.unwrap_or("loss");
    let name = name.strip_prefix("eval_").unwrap_or(name);
    if name == "loss" {
        return Ok((e.loss, false));
    }
    match e.metrics.get(name) {
        Some(&v) => Ok((v, higher_is_better(name))),
        None => Err(TrainError::UnknownMetric {
            name: name.to_string(),
            available: e.metrics.keys().cloned().collect(),
        }),
    }
}

/// Trains `model` on `train`, evaluating on `eval` as the arguments say; resumes from the
/// checkpoint folder `resume` when given.
#[allow(clippy::too_many_arguments)]
pub fn train<T: TrainStep>(
    task: &T,
    model: &mut T::Model,
    train: &[T::Example],
    eval: Option<&[T::Example]>,
    args: &TrainingArguments,
    device: &Device,
    observer: &mut dyn Observer,
    resume: Option<&std::path::Path>,
) -> Result<TrainSummary> {
    args.validate()?;
    if train.is_empty() {
        return Err(TrainError::EmptyTrainingSplit);
    }
    let total = args.total_steps(train.len());
    let steps_per_epoch = args.steps_per_epoch(train.len());
    let per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps;
    let mut opt = Optimizer::new(OptimConfig::from_args(args));
    if args.fp16 {
        opt.scaler = Some(LossScaler::default());
    }
    let mut compute = args.compute_dtype();
    if compute == Some(burn::tensor::FloatDType::BF16)
        && whet_models::device::is_flex(device)
        && !whet_models::kernels::bf16::available()
    {
        // As the issue asks: bf16 on a CPU only where it has bf16 dot products; elsewhere the
        // casts would only add work to f32 products.
        observer.note(
            "bf16 = true: this CPU has no AVX512-BF16 (nor AMX), so the matrix products run in \
             f32",
        );
        compute = None;
    }
    if compute == Some(burn::tensor::FloatDType::BF16)
        && whet_models::device::is_flex(device)
        && whet_models::kernels::bf16::amx_ready()
    {
        observer.note("bf16 = true: the matrix products run on this CPU's AMX tiles");
    }
    if let Some(dt) = compute
        && !device.supports_dtype(dt)
    {
        return Err(TrainError::option(
            if args.bf16 {
                "training.bf16"
            } else {
                "training.fp16"
            },
            format!(
                "the device {device:?} has no {dt:?} arithmetic{}",
                if args.bf16 {
                    " (wgpu's shaders have no bf16): use fp16 = true there, or a CUDA device"
                } else {
                    ""
                }
            ),
        ));
    }
    if args.tf32 && !whet_models::kernels::has_tf32(device) {
        return Err(TrainError::option(
            "training.tf32",
            "only a CUDA device of the Ampere generation or newer has TF32, and this run's \
             device has none: leave it false here",
        ));
    }
    // TF32 in f32 products for the run when asked for (process-wide, as PyTorch's switch);
    // the previous setting comes back when the run ends.
    let _tf32 = whet_models::precision::Tf32Guard::set(args.tf32);
    // Matrix products in 16 bits for the whole run, evaluation included (as `Trainer` runs
    // both under autocast).
    let _precision = whet_models::precision::scope(compute);
    let start = Instant::now();
    let mut history = Vec::new();
    let mut evals: Vec<EvalLog> = Vec::new();
    let mut best: Option<T::Model> = None;
    let mut state = TrainerState {
        patience_left: args.early_stopping_patience,
        ..Default::default()
    };
    if let Some(dir) = resume {
        state = checkpoint::load(dir, model, &mut opt, device)?;
        if opt.scaler.is_some()
            && let Some(s) = state.loss_scaler
        {
            opt.scaler = Some(s);
        }
    }
    let mut step = state.global_step;
    let first_step = step;
    // Steps whose loss and gradient norm are not read yet (on a GPU, until logged).
    let mut pending: Vec<Pending> = Vec::new();
    let evaluate = |model: &T::Model, step: usize| -> Result<Option<EvalLog>> {
        let Some(eval) = eval else { return Ok(None) };
        let r = task.evaluate(model, eval, args.per_device_eval_batch_size, device)?;
        Ok(Some(EvalLog {
            step,
            epoch: step as f64 / steps_per_epoch as f64,
            loss: r.loss,
            metrics: r.metrics,
            report: r.report,
            samples: task.samples(model, device)?,
        }))
    };
    if step == 0
        && task.evaluates_at_start()
        && args.eval_strategy != crate::args::Strategy::No
        && let Some(e) = evaluate(model, 0)?
    {
        observer.eval(&e);
        evals.push(e);
    }
    let lengths: Option<Vec<usize>> = args
        .group_by_length
        .then(|| train.iter().map(|e| task.length(e)).collect());
    let mut epoch = step / steps_per_epoch;
    // Steps of the current epoch already taken before a resume.
    let mut skip = step % steps_per_epoch;
    'outer: while step < total {
        let mut order = epoch_order(train.len(), args.seed, epoch);
        if let Some(lengths) = &lengths {
            order = length_grouped(&order, lengths, per_step);
        }
        for chunk in order.chunks(per_step).skip(skip) {
            if step >= total {
                break 'outer;
            }
            let examples: Vec<&T::Example> = chunk.iter().map(|&i| &train[i]).collect();
            let at = StepAt {
                step,
                total,
                args,
                device,
            };
            let r = task.step(model, &mut opt, &examples, &at)?;
            checkpoint::crash_point("step", step + 1);
            step += 1;
            state.samples += r.samples;
            state.tokens += r.tokens;
            state.positions += r.positions;
            let log = StepLog {
                step,
                total_steps: total,
                epoch: step as f64 / steps_per_epoch as f64,
                loss: 0.0,
                learning_rate: r.learning_rate,
                grad_norm: 0.0,
                samples_per_second: state.samples as f64 / start.elapsed().as_secs_f64(),
                tokens_per_second: state.tokens as f64 / start.elapsed().as_secs_f64(),
                metrics: BTreeMap::new(),
            };
            pending.push(Pending {
                log,
                loss: r.loss,
                grad_norm: r.grad_norm,
                metrics: r.metrics,
            });
            observer.tick(step, total);

            let end_of_epoch = step.is_multiple_of(steps_per_epoch) || step == total;
            let evaluates = args.evaluates_at(step, total, end_of_epoch);
            let saves = args.saves_at(step, end_of_epoch);
            // Read the step's numbers when they are logged, or when an evaluation, a checkpoint
            // or the end needs them; on the CPU at once.
            if step.is_multiple_of(args.logging_steps.max(1))
                || step == total
                || evaluates
                || saves
                || pending
                    .iter()
                    .flat_map(Pending::readings)
                    .all(|r| matches!(r, Reading::Host(_)))
            {
                flush(&mut pending, &mut state, &mut history, observer)?;
            }
            if evaluates && let Some(e) = evaluate(model, step)? {
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
                    if args.load_best_model_at_end {
                        best = Some(model.clone());
                    }
                } else if let Some(p) = state.patience_left.as_mut() {
                    *p = p.saturating_sub(1);
                }
                evals.push(e);
            }
            if saves {
                state.global_step = step;
                state.optimizer_steps = opt.step;
                state.loss_scaler = opt.scaler;
                checkpoint::save(&args.output_dir, model, &opt, &state, args.save_total_limit)?;
            }
            if state.patience_left == Some(0) || observer.stop(step) {
                break 'outer;
            }
        }
        skip = 0;
        epoch += 1;
    }
    flush(&mut pending, &mut state, &mut history, observer)?;
    let best_step = state.best_step;
    if args.load_best_model_at_end {
        match (best, best_step) {
            (Some(m), _) => *model = m,
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
        first_step,
        epochs: step as f64 / steps_per_epoch as f64,
        train_loss: state.loss_sum / step.max(1) as f64,
        train_runtime: start.elapsed().as_secs_f64(),
        train_samples: state.samples,
        train_tokens: state.tokens,
        train_positions: state.positions,
        history,
        evals,
        best_step,
    })
}
