//! The error type of using trained models: loading a saved folder (a model or a `peft` adapter
//! with its base) and running a pipeline on it. Each variant names the folder or what a person
//! needs to fix.

use std::path::PathBuf;

/// What can go wrong while loading a trained folder or running a pipeline.
#[derive(Debug, thiserror::Error)]
pub enum InferError {
    /// Loading or running a model failed (whet-models).
    #[error(transparent)]
    Model(#[from] whet_models::ModelError),
    /// Tokenizing the input failed (whet-data).
    #[error(transparent)]
    Data(#[from] whet_data::DataError),
    /// Reading or applying an adapter failed (whet-peft).
    #[error(transparent)]
    Peft(#[from] whet_peft::PeftError),
    /// A file or folder cannot be read.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A JSON file does not parse.
    #[error("{path}: {source}")]
    JsonFile {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// An adapter folder whose base model is neither given nor named in it.
    #[error("{path}: the adapter does not name its base model")]
    NoBaseModel { path: PathBuf },
    /// A saved model whose task head was never trained (`head`: `classification`,
    /// `question-answering`).
    #[error(
        "{path} has no trained {head} head (missing {}); train it first with `whet train`",
        .missing.join(", ")
    )]
    UntrainedHead {
        path: PathBuf,
        head: &'static str,
        missing: Vec<String>,
    },
    /// A model without a token to pad a batch with.
    #[error("the model has neither a pad nor an EOS token")]
    NoPadToken,
    /// A question-answering context without a token an answer could be.
    #[error("the context holds no token to answer with")]
    EmptyContext,
    /// The `tokenizers` library failed (offsets of a text).
    #[error("{0}")]
    Tokenizer(Box<dyn std::error::Error + Send + Sync>),
    /// Tensor values cannot be read back.
    #[error("{0:?}")]
    TensorData(burn::tensor::DataError),
}

/// Result alias for the pipelines of this crate.
pub type Result<T, E = InferError> = std::result::Result<T, E>;

impl InferError {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        InferError::Io {
            path: path.into(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_read_as_before() {
        let e = InferError::UntrainedHead {
            path: "out".into(),
            head: "classification",
            missing: vec!["classifier.weight".into(), "classifier.bias".into()],
        };
        assert_eq!(
            e.to_string(),
            "out has no trained classification head (missing classifier.weight, \
             classifier.bias); train it first with `whet train`"
        );
        let e = InferError::NoBaseModel {
            path: "adapter".into(),
        };
        assert_eq!(
            e.to_string(),
            "adapter: the adapter does not name its base model"
        );
    }

    #[test]
    fn errors_cross_threads_for_anyhow() {
        fn send_sync<T: Send + Sync + 'static>() {}
        send_sync::<InferError>();
    }
}
