//! Using models: text generation, the text-classification and question-answering pipelines.
//! Trained folders (a model, or a `peft` adapter over its base, as `whet train` saves them)
//! load here with what the pipelines need; training builds its batches with the same helpers.

pub mod classification;
pub mod error;
pub mod generate;
pub mod question_answering;
mod saved;

pub use error::InferError;
pub use generate::{
    GenerationConfig, Sampling, generate, generate_batch, penalize_repetition, stop_end,
};
