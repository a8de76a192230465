//! The error type of tokenizer loading, text encoding and file writing.

use std::path::PathBuf;

/// Everything that can go wrong while loading a tokenizer, encoding text or writing a file.
///
/// Each variant names what a person needs to fix the input: the file and what is wrong in it.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    /// A file the model folder must contain is not there.
    #[error("missing file {path}: {hint}")]
    MissingFile { path: PathBuf, hint: String },

    /// Reading or writing a file failed at the operating-system level.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A JSON file (tokenizer_config.json, vocab.json) or merges.txt does not parse.
    #[error("invalid {path}: {message}")]
    Config { path: PathBuf, message: String },

    /// A GGUF file is truncated, malformed or lacks tokenizer metadata.
    #[error(transparent)]
    Gguf(#[from] whet_gguf::GgufError),

    /// The tokenizer cannot be loaded or built, or fails on an input.
    #[error("tokenizer {source_name}: {message}")]
    Tokenizer {
        source_name: String,
        message: String,
    },
}

/// Result alias for this crate.
pub type Result<T, E = TextError> = std::result::Result<T, E>;

impl TextError {
    /// An I/O error on `path`; a missing file becomes [`TextError::MissingFile`].
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::NotFound {
            TextError::MissingFile {
                path,
                hint: "no such file".into(),
            }
        } else {
            TextError::Io { path, source }
        }
    }
}
