//! Training for whet: `TrainingArguments`, optimizers, schedules and the loop. A task supplies
//! its data and model; the trainer owns the loop.

pub mod args;
pub mod optim;
pub mod schedule;
pub mod trainer;

pub use args::{Strategy, TrainingArguments};
pub use optim::{Optimizer, OptimizerKind};
pub use schedule::{Schedule, lr_factor};
pub use trainer::{EvalLog, Observer, Silent, StepLog, TrainSummary, evaluate, train_classifier};
