//! Using trained models. Text generation lives here; the classification and question-answering
//! pipelines join it as the training issues land.

pub mod generate;

pub use generate::{
    GenerationConfig, Sampling, generate, generate_batch, penalize_repetition, stop_end,
};
