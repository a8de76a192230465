//! The error type of model loading and running.

use std::path::PathBuf;

/// Everything that can go wrong while loading or running a model.
///
/// Each variant names what a person needs to fix the input: the file, the tensor, both shapes.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A model named by a Hub repo id cannot be found or downloaded.
    #[error(transparent)]
    Hub(Box<whet_hub::HubError>),

    /// No local file or folder has this name, and as a Hub repo id it cannot be fetched.
    #[error("no local file or folder {spec:?}; as a Hugging Face repo id: {source}")]
    NotLocal {
        spec: String,
        #[source]
        source: Box<whet_hub::HubError>,
    },

    /// A file the model folder must contain is not there.
    #[error("missing file {path}: {hint}")]
    MissingFile { path: PathBuf, hint: String },

    /// Reading a file failed at the operating-system level.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A JSON file (config.json, an index) does not parse or lacks a field.
    #[error("invalid {path}: {message}")]
    Config { path: PathBuf, message: String },

    /// `model_type` / `architectures` / GGUF `general.architecture` names a family whet lacks.
    #[error("unknown architecture {name:?} in {path}: whet supports {supported}")]
    UnknownArchitecture {
        name: String,
        path: PathBuf,
        supported: &'static str,
    },

    /// A safetensors file is truncated or malformed.
    #[error("invalid safetensors file {path}: {message}")]
    Safetensors { path: PathBuf, message: String },

    /// A GGUF file is truncated, malformed or uses an unsupported feature.
    #[error(transparent)]
    Gguf(#[from] whet_gguf::GgufError),

    /// Loading the tokenizer, encoding text or writing a file failed (whet-text).
    #[error(transparent)]
    Text(#[from] whet_text::TextError),

    /// The checkpoint lacks a tensor the model needs.
    #[error("tensor {name} not found in {source_name}")]
    MissingTensor { name: String, source_name: String },

    /// A tensor exists but has the wrong shape.
    #[error("tensor {name} in {source_name} has shape {actual:?}, the config expects {expected:?}")]
    ShapeMismatch {
        name: String,
        source_name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },

    /// A tensor has a dtype whet cannot convert to f32.
    #[error("tensor {name} in {source_name} has unsupported dtype {dtype}")]
    UnsupportedDtype {
        name: String,
        source_name: String,
        dtype: String,
    },

    /// The tokenizer cannot be loaded or built.
    #[error("tokenizer {source_name}: {message}")]
    Tokenizer {
        source_name: String,
        message: String,
    },

    /// Inputs do not fit the model (too long, ids out of range, bad shapes).
    #[error("invalid input: {0}")]
    Input(String),
}

/// Result alias for this crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::NotFound {
            ModelError::MissingFile {
                path,
                hint: "no such file".into(),
            }
        } else {
            ModelError::Io { path, source }
        }
    }
}

impl From<whet_hub::HubError> for ModelError {
    fn from(e: whet_hub::HubError) -> Self {
        ModelError::Hub(Box::new(e))
    }
}
