//! Training for whet: `TrainingArguments`, optimizers, schedules and the loop. A task supplies
//! its data and model; the trainer owns the loop.

pub mod args;
pub mod causal_lm;
pub mod checkpoint;
pub mod classification;
pub mod dpo;
pub mod error;
pub mod keys;
pub mod method;
pub mod optim;
pub mod output;
pub mod plan;
pub mod ppo;
pub mod question_answering;
pub mod recipe;
pub mod reward;
pub mod scaler;
pub mod schedule;
pub mod task;
pub mod token_classification;
pub mod trainer;

pub use args::{Strategy, TrainingArguments};
pub use classification::objective::{evaluate, optimizer_step, train_classifier};
pub use error::{Result, TrainError};
pub use optim::{Optimizer, OptimizerKind};
pub use recipe::{Method, Recipe, TaskKind};
pub use schedule::{Schedule, lr_factor};
pub use task::{Run, Task};
pub use trainer::{
    BatchCounts, EvalLog, Evaluation, Objective, Observer, Sample, Silent, StepAt, StepLog,
    StepResult, TrainStep, TrainSummary,
};

/// Prepares the task the recipe names: the one place that dispatches on the task kind.
pub fn open(run: Run) -> Result<Box<dyn Task>> {
    Ok(match run.recipe.task {
        TaskKind::SequenceClassification
        | TaskKind::MultiLabelClassification
        | TaskKind::Regression => Box::new(crate::classification::ClassificationTask::open(run)?),
        TaskKind::TokenClassification => Box::new(
            crate::token_classification::TokenClassificationTask::open(run)?,
        ),
        TaskKind::CausalLm => Box::new(crate::causal_lm::CausalLmTask::open(run)?),
        TaskKind::QuestionAnswering => {
            Box::new(crate::question_answering::QuestionAnsweringTask::open(run)?)
        }
        TaskKind::RewardModel => Box::new(crate::reward::RewardTask::open(run)?),
        TaskKind::Dpo => Box::new(crate::dpo::DpoTask::open(run)?),
        TaskKind::Ppo => Box::new(crate::ppo::PpoTask::open(run)?),
    })
}
