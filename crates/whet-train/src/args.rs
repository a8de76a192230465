//! `TrainingArguments`: the names and defaults of `transformers.TrainingArguments`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::optim::OptimizerKind;
use crate::schedule::Schedule;

/// When to evaluate or save.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Never.
    #[default]
    No,
    /// Every `eval_steps` / `save_steps` optimizer steps.
    Steps,
    /// At the end of each epoch.
    Epoch,
}

/// Training hyper-parameters, named and defaulted as in `transformers.TrainingArguments`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingArguments {
    /// Where checkpoints, the final model and results go.
    pub output_dir: PathBuf,
    #[serde(default = "d_lr")]
    pub learning_rate: f64,
    #[serde(default = "d_batch")]
    pub per_device_train_batch_size: usize,
    #[serde(default = "d_batch")]
    pub per_device_eval_batch_size: usize,
    #[serde(default = "d_epochs")]
    pub num_train_epochs: f64,
    /// Total optimizer steps; overrides `num_train_epochs` when positive.
    #[serde(default = "d_max_steps")]
    pub max_steps: i64,
    #[serde(default = "d_one")]
    pub gradient_accumulation_steps: usize,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "d_beta1")]
    pub adam_beta1: f64,
    #[serde(default = "d_beta2")]
    pub adam_beta2: f64,
    #[serde(default = "d_eps")]
    pub adam_epsilon: f64,
    #[serde(default = "d_one_f")]
    pub max_grad_norm: f64,
    #[serde(default)]
    pub optim: OptimizerKind,
    #[serde(default)]
    pub lr_scheduler_type: Schedule,
    #[serde(default)]
    pub warmup_steps: usize,
    #[serde(default)]
    pub warmup_ratio: f64,
    #[serde(default, alias = "evaluation_strategy")]
    pub eval_strategy: Strategy,
    #[serde(default)]
    pub eval_steps: Option<usize>,
    #[serde(default = "d_save_strategy")]
    pub save_strategy: Strategy,
    #[serde(default = "d_save_steps")]
    pub save_steps: usize,
    #[serde(default)]
    pub save_total_limit: Option<usize>,
    #[serde(default)]
    pub load_best_model_at_end: bool,
    #[serde(default)]
    pub metric_for_best_model: Option<String>,
    #[serde(default)]
    pub greater_is_better: Option<bool>,
    #[serde(default)]
    pub early_stopping_patience: Option<usize>,
    #[serde(default = "d_logging")]
    pub logging_steps: usize,
    #[serde(default = "d_seed")]
    pub seed: u64,
    /// Mixed precision in bfloat16: matrix products in bf16, weights, optimizer moments,
    /// softmax, norms and the loss in f32 (see `whet_models::precision`). The device must
    /// have bf16 arithmetic (CUDA and the CPU do; wgpu does not).
    #[serde(default)]
    pub bf16: bool,
    /// Mixed precision in float16, as `bf16`, with dynamic loss scaling (`LossScaler`,
    /// PyTorch's `GradScaler`): a step whose gradients overflow is skipped.
    #[serde(default)]
    pub fp16: bool,
    /// TF32 in f32 matrix products (`transformers`' `tf32`): operands rounded to TF32's 10
    /// mantissa bits on the tensor cores of a CUDA device that has them (Ampere and newer), as
    /// `torch.backends.cuda.matmul.allow_tf32 = True`; faster, less precise. Off by default,
    /// where f32 products are f32 there as in PyTorch. Only a CUDA device has TF32: elsewhere
    /// `true` is refused (transformers refuses it too).
    #[serde(default)]
    pub tf32: bool,
    /// Batches of similar lengths, as `transformers`' `LengthGroupedSampler`: the epoch's
    /// shuffled order is cut into megabatches of up to 50 optimizer steps' examples, each sorted
    /// longest first (the longest example of the epoch goes first, so a run that runs out of
    /// memory does so at once), so that a batch carries less padding. It changes which examples
    /// share a batch, so it is off by default, as in `transformers`.
    #[serde(default)]
    pub group_by_length: bool,
    /// Batches run without their padding (`trl`'s `padding_free`), in training and in the
    /// run's evaluations: projections, feed-forward layers and norms see only the real tokens,
    /// flattened into one row, and attention alone puts them back into their rows (see
    /// `whet_models::unpad`). Unset, it is on wherever the result is the padded batch's up to
    /// float rounding (the parity tests run both ways): every task but question
    /// answering, whose loss (as `transformers` computes it) takes the padding positions'
    /// logits into its softmax; there `true` leaves them out, as if each window ran alone.
    /// Dropout draws its masks over the real tokens only, so `false` repeats the random stream
    /// of a padded run. The pipelines (`whet predict`) always run padding-free.
    #[serde(default)]
    pub padding_free: Option<bool>,
    /// Where the logs go besides the terminal, as `TrainingArguments.report_to` (a name or a
    /// list of names): `"jsonl"` writes `OUT/logs.jsonl`, one JSON object a log line or
    /// evaluation; `"tensorboard"` writes TensorBoard event files into `OUT/runs`
    /// (`train/loss`, `train/learning_rate`, `train/grad_norm`, `train/epoch`,
    /// `train/tokens_per_second`, `eval/loss`, `eval/METRIC`, as transformers'
    /// `TensorBoardCallback` names them); `"all"` both; `"none"` (or nothing) neither. Other
    /// integrations (wandb, mlflow, ...) are refused.
    #[serde(default, deserialize_with = "one_or_many")]
    pub report_to: Vec<String>,
}

/// The names `report_to` takes.
pub const REPORTERS: [&str; 4] = ["jsonl", "tensorboard", "all", "none"];

/// A string or a list of strings, as `transformers` takes `report_to`.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

impl TrainingArguments {
    /// Whether `report_to` names `name` ("all" names every one).
    pub fn reports_to(&self, name: &str) -> bool {
        self.report_to.iter().any(|r| r == name || r == "all")
    }

    /// `padding_free` as set, or the task's default when unset.
    pub fn padding_free_or(&self, task_default: bool) -> bool {
        self.padding_free.unwrap_or(task_default)
    }
}

fn d_lr() -> f64 {
    5e-5
}
fn d_batch() -> usize {
    8
}
fn d_epochs() -> f64 {
    3.0
}
fn d_max_steps() -> i64 {
    -1
}
fn d_one() -> usize {
    1
}
fn d_one_f() -> f64 {
    1.0
}
fn d_beta1() -> f64 {
    0.9
}
fn d_beta2() -> f64 {
    0.999
}
fn d_eps() -> f64 {
    1e-8
}
fn d_save_strategy() -> Strategy {
    Strategy::Steps
}
fn d_save_steps() -> usize {
    500
}
fn d_logging() -> usize {
    500
}
fn d_seed() -> u64 {
    42
}

impl TrainingArguments {
    /// Defaults with the given output folder.
    pub fn new(output_dir: impl Into<PathBuf>) -> Self {
        Self {
            output_dir: output_dir.into(),
            learning_rate: d_lr(),
            per_device_train_batch_size: d_batch(),
            per_device_eval_batch_size: d_batch(),
            num_train_epochs: d_epochs(),
            max_steps: d_max_steps(),
            gradient_accumulation_steps: d_one(),
            weight_decay: 0.0,
            adam_beta1: d_beta1(),
            adam_beta2: d_beta2(),
            adam_epsilon: d_eps(),
            max_grad_norm: d_one_f(),
            optim: OptimizerKind::default(),
            lr_scheduler_type: Schedule::default(),
            warmup_steps: 0,
            warmup_ratio: 0.0,
            eval_strategy: Strategy::No,
            eval_steps: None,
            save_strategy: d_save_strategy(),
            save_steps: d_save_steps(),
            save_total_limit: None,
            load_best_model_at_end: false,
            metric_for_best_model: None,
            greater_is_better: None,
            early_stopping_patience: None,
            logging_steps: d_logging(),
            seed: d_seed(),
            bf16: false,
            fp16: false,
            tf32: false,
            group_by_length: false,
            padding_free: None,
            report_to: vec![],
        }
    }

    /// Optimizer steps per epoch for `n` training examples.
    pub fn steps_per_epoch(&self, n: usize) -> usize {
        let batches = n.div_ceil(self.per_device_train_batch_size.max(1));
        batches
            .div_ceil(self.gradient_accumulation_steps.max(1))
            .max(1)
    }

    /// Whether to evaluate after `step` of `total` (`end_of_epoch`: the step closes an epoch).
    pub fn evaluates_at(&self, step: usize, total: usize, end_of_epoch: bool) -> bool {
        match self.eval_strategy {
            Strategy::No => false,
            Strategy::Epoch => end_of_epoch,
            Strategy::Steps => {
                self.eval_steps.is_some_and(|k| step.is_multiple_of(k)) || step == total
            }
        }
    }

    /// Whether to write a checkpoint after `step`.
    pub fn saves_at(&self, step: usize, end_of_epoch: bool) -> bool {
        match self.save_strategy {
            Strategy::No => false,
            Strategy::Epoch => end_of_epoch,
            Strategy::Steps => step.is_multiple_of(self.save_steps.max(1)),
        }
    }

    /// Total optimizer steps for `n` training examples.
    pub fn total_steps(&self, n: usize) -> usize {
        if self.max_steps > 0 {
            self.max_steps as usize
        } else {
            (self.num_train_epochs * self.steps_per_epoch(n) as f64).ceil() as usize
        }
    }

    /// Warmup steps: `warmup_steps` if set, else `ceil(warmup_ratio * total)`.
    pub fn warmup(&self, total: usize) -> usize {
        if self.warmup_steps > 0 {
            self.warmup_steps
        } else {
            (self.warmup_ratio * total as f64).ceil() as usize
        }
    }

    /// Checks values a person may get wrong, naming the option.
    /// The 16-bit type of mixed precision, if `bf16` or `fp16` asks for one.
    pub fn compute_dtype(&self) -> Option<burn::tensor::FloatDType> {
        match (self.bf16, self.fp16) {
            (true, _) => Some(burn::tensor::FloatDType::BF16),
            (_, true) => Some(burn::tensor::FloatDType::F16),
            _ => None,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.bf16 && self.fp16 {
            return Err(TrainError::option(
                "training.fp16",
                "and training.bf16 cannot both be true: pick one 16-bit type",
            ));
        }
        let positive = [
            (
                "per_device_train_batch_size",
                self.per_device_train_batch_size,
            ),
            (
                "per_device_eval_batch_size",
                self.per_device_eval_batch_size,
            ),
            (
                "gradient_accumulation_steps",
                self.gradient_accumulation_steps,
            ),
            ("logging_steps", self.logging_steps),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(TrainError::option(
                    format!("training.{name}"),
                    "must be at least 1",
                ));
            }
        }
        if let Some(r) = self
            .report_to
            .iter()
            .find(|r| !REPORTERS.contains(&r.as_str()))
        {
            return Err(TrainError::option(
                "training.report_to",
                format!(
                    "{r:?} is not an integration whet writes; it takes {}",
                    REPORTERS.map(|n| format!("{n:?}")).join(", ")
                ),
            ));
        }
        if self.learning_rate.is_nan() || self.learning_rate <= 0.0 {
            return Err(TrainError::option(
                "training.learning_rate",
                format!("must be > 0, got {}", self.learning_rate),
            ));
        }
        if !(0.0..=1.0).contains(&self.warmup_ratio) {
            return Err(TrainError::option(
                "training.warmup_ratio",
                format!("must be in [0, 1], got {}", self.warmup_ratio),
            ));
        }
        if self.eval_strategy == Strategy::Steps && self.eval_steps.is_none() {
            return Err(TrainError::option(
                "training.eval_strategy",
                "= \"steps\" needs training.eval_steps",
            ));
        }
        if self.load_best_model_at_end && self.eval_strategy == Strategy::No {
            return Err(TrainError::option(
                "training.load_best_model_at_end",
                "needs an eval_strategy",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_transformers_defaults() {
        let a = TrainingArguments::new("out");
        let from_serde: TrainingArguments =
            serde_json::from_value(serde_json::json!({"output_dir": "out"})).unwrap();
        assert_eq!(
            serde_json::to_value(&a).unwrap(),
            serde_json::to_value(&from_serde).unwrap()
        );
        assert_eq!(a.learning_rate, 5e-5);
        assert_eq!(a.per_device_train_batch_size, 8);
        assert_eq!(a.num_train_epochs, 3.0);
        assert_eq!(
            (a.adam_beta1, a.adam_beta2, a.adam_epsilon),
            (0.9, 0.999, 1e-8)
        );
        assert_eq!((a.weight_decay, a.max_grad_norm), (0.0, 1.0));
        assert_eq!(a.lr_scheduler_type, Schedule::Linear);
        assert_eq!(a.seed, 42);
        assert_eq!(a.optim, OptimizerKind::Adamw);
    }

    #[test]
    fn steps_follow_batches_accumulation_and_max_steps() {
        let mut a = TrainingArguments::new("out");
        a.per_device_train_batch_size = 16;
        a.gradient_accumulation_steps = 2;
        a.num_train_epochs = 1.0;
        assert_eq!(a.steps_per_epoch(100), 4); // 7 batches -> 4 steps
        a.warmup_ratio = 0.1;
        assert_eq!(a.warmup(4), 1);
        a.max_steps = 3;
        assert_eq!(a.total_steps(100), 3);
    }

    #[test]
    fn unknown_fields_are_refused() {
        let e = serde_json::from_value::<TrainingArguments>(
            serde_json::json!({"output_dir": "o", "learning_rat": 1e-3}),
        );
        assert!(e.unwrap_err().to_string().contains("learning_rat"));
    }
}
