//! The error type of data loading: every variant names the file, and the line where one is
//! known.

use std::path::PathBuf;

/// What can be wrong with training data.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The format is unknown or unsupported.
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    /// A JSON line (or a JSON array's element) does not parse.
    #[error("{path}:{line}: malformed JSON: {message}")]
    Json {
        path: PathBuf,
        line: usize,
        message: String,
    },
    /// A CSV record does not parse.
    #[error("{path}:{line}: malformed CSV: {message}")]
    Csv {
        path: PathBuf,
        line: usize,
        message: String,
    },
    /// Text cannot be decoded with the configured encoding.
    #[error("{path}:{line}: cannot decode text: {message}")]
    Decode {
        path: PathBuf,
        line: usize,
        message: String,
    },
    /// A configured column is absent.
    #[error("{path}: no column {column:?} (columns: {available})")]
    MissingColumn {
        path: PathBuf,
        column: String,
        available: String,
    },
    /// A row's value does not fit its column's role.
    #[error("{path}:{line}: column {column:?}: {message}")]
    Value {
        path: PathBuf,
        line: usize,
        column: String,
        message: String,
    },
    /// A label is outside the label set.
    #[error("{path}:{line}: label {label} is not one of the {n} labels ({labels})")]
    UnknownLabel {
        path: PathBuf,
        line: usize,
        label: String,
        n: usize,
        labels: String,
    },
    /// A file or split has no rows.
    #[error("{path}: no rows")]
    Empty { path: PathBuf },
    /// A split request cannot be met.
    #[error("split: {0}")]
    Split(String),
    /// A prompt or chat template cannot be applied to an example.
    #[error("{origin}: {message}")]
    Template { origin: String, message: String },
    /// Tokenization failed or does not fit the model.
    #[error("{0}")]
    Tokenize(String),
}

/// Result alias for this crate.
pub type Result<T, E = DataError> = std::result::Result<T, E>;
