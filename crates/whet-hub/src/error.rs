//! What can go wrong between whet and the Hub: every variant names the repository, revision,
//! file or path it concerns, and says what to do where there is something to do.

use std::path::PathBuf;

/// An error of the hub client.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// Neither a local path nor a repo id (`NAME` or `ORG/NAME`).
    #[error(
        "{spec:?} is not a local file or folder, and not a Hugging Face repo id ({why}); a repo id \
         is ORG/NAME (letters, digits, '-', '_', '.')"
    )]
    BadId { spec: String, why: String },
    /// An `hf://` path whet does not read.
    #[error("{uri:?}: {why}; whet reads data as hf://datasets/ORG/NAME[@REVISION]/PATH")]
    BadUri { uri: String, why: String },
    /// The Hub has no such repository (or hides a private one from this token).
    #[error(
        "{repo} was not found on {endpoint} (if it is private or gated, set HF_TOKEN to a token \
         that may read it)"
    )]
    RepoNotFound { repo: String, endpoint: String },
    /// The repository has no such branch, tag or commit.
    #[error("{repo} has no revision {revision:?}")]
    RevisionNotFound { repo: String, revision: String },
    /// The revision has no such file.
    #[error("{repo}@{revision} has no file {path:?}")]
    EntryNotFound {
        repo: String,
        revision: String,
        path: String,
    },
    /// 401: a token is needed, or the one given is not valid.
    #[error(
        "{repo}: the Hub refused the request (401 unauthorized{}); set HF_TOKEN (or log in with \
         `hf auth login`) to a token that may read it",
        if *had_token { ", with the token given" } else { ", no token given" }
    )]
    Unauthorized { repo: String, had_token: bool },
    /// 403: a gated repository whose conditions this account has not accepted, or a token
    /// without the right scope.
    #[error(
        "{repo}: access is restricted (403 forbidden): {message}; accept the repository's \
         conditions at {url} and use a token of that account (HF_TOKEN)"
    )]
    Forbidden {
        repo: String,
        url: String,
        message: String,
    },
    /// The endpoint cannot be reached and the cache does not hold what is asked for.
    #[error(
        "cannot reach {endpoint} ({message}) and the cache {cache} has no {repo}@{revision}; check \
         the network, set HF_ENDPOINT for a mirror, or HF_HUB_OFFLINE=1 to use the cache only"
    )]
    Unreachable {
        endpoint: String,
        message: String,
        cache: PathBuf,
        repo: String,
        revision: String,
    },
    /// Any other HTTP failure.
    #[error("{url}: HTTP {status}: {message}")]
    Http {
        url: String,
        status: u16,
        message: String,
    },
    /// `HF_HUB_OFFLINE=1` and the cache does not hold the revision or file.
    #[error(
        "HF_HUB_OFFLINE is set and the cache {cache} has no {what}; download it once with the \
         network on (or unset HF_HUB_OFFLINE)"
    )]
    NotCached { cache: PathBuf, what: String },
    /// A repository's files do not make something whet can load.
    #[error("{repo}@{revision}: {message}")]
    Unusable {
        repo: String,
        revision: String,
        message: String,
    },
    /// A download ended with other bytes than the Hub announced.
    #[error("{path}: the download of {url} is corrupt: {message}")]
    Corrupt {
        path: PathBuf,
        url: String,
        message: String,
    },
    /// A file of the cache cannot be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl HubError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> HubError {
        let path = path.into();
        move |source| HubError::Io { path, source }
    }
}

/// Results of this crate.
pub type Result<T> = std::result::Result<T, HubError>;
