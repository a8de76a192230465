//! Models and data from the Hugging Face Hub, downloaded into the cache huggingface_hub
//! shares: a model Python downloaded is found here, and one whet downloaded is found by Python.
//!
//! - **Where**: `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`, laid out
//!   as huggingface_hub lays it out: `models--ORG--NAME/` (or `datasets--`) holding `blobs/`
//!   (files named by their etag: the LFS sha256, else the git blob id), `snapshots/COMMIT/`
//!   (relative symlinks into `blobs/`) and `refs/REVISION` (the commit a branch or tag named).
//! - **How**: one API call lists a revision's files with their commit, sizes and etags; only
//!   the files a snapshot lacks are downloaded, each into `blobs/ETAG.incomplete` under a lock
//!   beside huggingface_hub's own (`.locks/`), resumed with a `Range` request after a broken
//!   connection (or by the next run), checked against the announced size and sha256, then
//!   renamed into place: a partial download never becomes a cache entry.
//! - **Environment**, with huggingface_hub's names: `HF_ENDPOINT` (a mirror), `HF_TOKEN` (else
//!   the token file `hf auth login` writes), `HF_HUB_OFFLINE` (the cache only). When the
//!   endpoint cannot be reached, a revision already in the cache is used, as transformers does.
//!
//! Hand-written over `ureq` on purpose: the `hf-hub` crate's 1.0 is asynchronous (tokio,
//! reqwest, aws-lc and hf-xet: 284 crates for a blocking CLI), and its 0.4 blocking client
//! downloads a cached blob again to revalidate it, ignores `HF_HUB_CACHE` and `HF_HUB_OFFLINE`,
//! tells no missing repository from a missing revision or file, and lists no folder.

mod error;
mod naming;

use std::io::{IsTerminal, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use error::{HubError, Result};
pub use naming::{DataUri, Repo, RepoKind, check_id};

use naming::{encode_path, is_commit, percent_encode};

/// The public Hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// How often a download broken off mid-file is resumed before giving up.
const RESUMES: usize = 3;

/// A client of one endpoint and one cache.
#[derive(Debug, Clone)]
pub struct Hub {
    /// Base URL, without a trailing `/`.
    pub endpoint: String,
    /// The hub cache folder (huggingface_hub's `HF_HUB_CACHE`).
    pub cache: PathBuf,
    /// Use the cache only.
    pub offline: bool,
    token: Option<String>,
    progress: bool,
    agent: ureq::Agent,
}

/// Picks the files to fetch from a revision's file list, or says why the revision is not
/// usable.
pub type Choose<'a> = &'a dyn Fn(&[String]) -> std::result::Result<Vec<String>, String>;

/// A revision's files in the cache.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The repository.
    pub repo: Repo,
    /// The revision asked for.
    pub revision: String,
    /// The commit it names.
    pub commit: String,
    /// `CACHE/models--ORG--NAME/snapshots/COMMIT`.
    pub dir: PathBuf,
}

/// One file of a revision, as the Hub lists it.
#[derive(Debug, Clone, serde::Deserialize)]
struct Sibling {
    rfilename: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(rename = "blobId", default)]
    blob_id: Option<String>,
    #[serde(default)]
    lfs: Option<Lfs>,
}

#[derive(Debug, Clone, serde::Deserialize)]
struct Lfs {
    sha256: String,
    size: u64,
}

impl Sibling {
    /// The blob's name in the cache: huggingface_hub's etag (`X-Linked-Etag` for LFS files, the
    /// git blob id otherwise).
    fn etag(&self) -> Option<&str> {
        self.lfs
            .as_ref()
            .map(|l| l.sha256.as_str())
            .or(self.blob_id.as_deref())
    }

    fn size(&self) -> Option<u64> {
        self.lfs.as_ref().map(|l| l.size).or(self.size)
    }
}

#[derive(Debug, serde::Deserialize)]
struct RevisionInfo {
    sha: String,
    #[serde(default)]
    siblings: Vec<Sibling>,
}

/// Why a request failed: the endpoint was not reached, or it answered with an error.
enum Failure {
    Unreachable(String),
    Hub(HubError),
}

impl From<HubError> for Failure {
    fn from(e: HubError) -> Self {
        Failure::Hub(e)
    }
}

/// Whether an environment variable is set to a true value (huggingface_hub's `_is_true`).
fn env_true(name: &str) -> bool {
    std::env::var(name)
        .map(|v| matches!(v.to_ascii_uppercase().as_str(), "1" | "ON" | "YES" | "TRUE"))
        .unwrap_or(false)
}

/// A non-empty environment variable, with `~` at its start expanded.
fn env_path(name: &str) -> Option<PathBuf> {
    let v = std::env::var(name).ok().filter(|v| !v.is_empty())?;
    Some(match v.strip_prefix("~/") {
        Some(rest) => home().join(rest),
        None => PathBuf::from(v),
    })
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .or_else(|| std::env::var_os("USERPROFILE"))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// `HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`.
fn hf_home() -> PathBuf {
    env_path("HF_HOME").unwrap_or_else(|| {
        env_path("XDG_CACHE_HOME")
            .unwrap_or_else(|| home().join(".cache"))
            .join("huggingface")
    })
}

impl Hub {
    /// A client configured as huggingface_hub configures itself from the environment:
    /// `HF_ENDPOINT`, `HF_HUB_CACHE` (or `HUGGINGFACE_HUB_CACHE`, or `HF_HOME/hub`),
    /// `HF_TOKEN` (or the token file at `HF_TOKEN_PATH` / `HF_HOME/token`), `HF_HUB_OFFLINE`
    /// (or `TRANSFORMERS_OFFLINE`).
    pub fn from_env() -> Self {
        let endpoint = std::env::var("HF_ENDPOINT")
            .ok()
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let cache = env_path("HF_HUB_CACHE")
            .or_else(|| env_path("HUGGINGFACE_HUB_CACHE"))
            .unwrap_or_else(|| hf_home().join("hub"));
        let token = ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"]
            .into_iter()
            .find_map(|v| std::env::var(v).ok().filter(|t| !t.trim().is_empty()))
            .or_else(|| {
                let file = env_path("HF_TOKEN_PATH").unwrap_or_else(|| hf_home().join("token"));
                std::fs::read_to_string(file)
                    .ok()
                    .map(|t| t.trim().to_string())
                    .filter(|t| !t.is_empty())
            });
        Self::new(&endpoint, cache)
            .with_token(token)
            .with_offline(env_true("HF_HUB_OFFLINE") || env_true("TRANSFORMERS_OFFLINE"))
    }

    /// A client of `endpoint` caching into `cache`, without a token, online.
    pub fn new(endpoint: &str, cache: PathBuf) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .user_agent(concat!("whet/", env!("CARGO_PKG_VERSION")))
            .redirect_auth_headers(ureq::config::RedirectAuthHeaders::SameHost)
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_recv_response(Some(Duration::from_secs(60)))
            .timeout_per_read(Some(Duration::from_secs(60)))
            .build()
            .new_agent();
        Self {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            cache,
            offline: false,
            token: None,
            progress: std::io::stderr().is_terminal(),
            agent,
        }
    }

    /// Sends `Authorization: Bearer TOKEN` to the endpoint.
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token;
        self
    }

    /// Uses the cache only.
    pub fn with_offline(mut self, offline: bool) -> Self {
        self.offline = offline;
        self
    }

    /// Draws a progress bar per file (the default on a terminal); otherwise one line each.
    pub fn with_progress(mut self, progress: bool) -> Self {
        self.progress = progress;
        self
    }

    fn repo_dir(&self, repo: &Repo) -> PathBuf {
        self.cache.join(repo.folder_name())
    }

    /// The revision's snapshot, as the cache already holds it: no network.
    pub fn cached(&self, repo: &Repo, revision: &str) -> Result<Snapshot> {
        let dir = self.repo_dir(repo);
        let commit = if is_commit(revision) {
            revision.to_string()
        } else {
            let r = dir.join("refs").join(revision);
            std::fs::read_to_string(&r)
                .map(|c| c.trim().to_string())
                .map_err(|_| HubError::NotCached {
                    cache: self.cache.clone(),
                    what: format!("{repo}@{revision}"),
                })?
        };
        let snapshot = dir.join("snapshots").join(&commit);
        if !snapshot.is_dir() {
            return Err(HubError::NotCached {
                cache: self.cache.clone(),
                what: format!("{repo}@{revision} (commit {commit})"),
            });
        }
        Ok(Snapshot {
            repo: repo.clone(),
            revision: revision.to_string(),
            commit,
            dir: snapshot,
        })
    }

    /// The files `choose` picks from the revision's list, downloaded where the cache lacks
    /// them. Offline, or when the endpoint cannot be reached, the cached snapshot as it is.
    /// `choose` gets every file path and returns the ones to fetch, or why the revision is not
    /// usable.
    pub fn snapshot(&self, repo: &Repo, revision: &str, choose: Choose) -> Result<Snapshot> {
        if self.offline {
            return self.cached(repo, revision);
        }
        let info = match self.revision_info(repo, revision) {
            Ok(info) => info,
            Err(Failure::Hub(e)) => return Err(e),
            Err(Failure::Unreachable(message)) => {
                return match self.cached(repo, revision) {
                    Ok(s) => {
                        eprintln!(
                            "warning: cannot reach {} ({message}); using the cached {repo}@{revision}",
                            self.endpoint
                        );
                        Ok(s)
                    }
                    Err(_) => Err(HubError::Unreachable {
                        endpoint: self.endpoint.clone(),
                        message,
                        cache: self.cache.clone(),
                        repo: repo.to_string(),
                        revision: revision.to_string(),
                    }),
                };
            }
        };
        let names: Vec<String> = info.siblings.iter().map(|s| s.rfilename.clone()).collect();
        let unusable = |message: String| HubError::Unusable {
            repo: repo.to_string(),
            revision: revision.to_string(),
            message,
        };
        let wanted = choose(&names).map_err(unusable)?;
        let snapshot = Snapshot {
            repo: repo.clone(),
            revision: revision.to_string(),
            commit: info.sha.clone(),
            dir: self.repo_dir(repo).join("snapshots").join(&info.sha),
        };
        std::fs::create_dir_all(&snapshot.dir).map_err(HubError::io(&snapshot.dir))?;
        for name in &wanted {
            let sibling = info
                .siblings
                .iter()
                .find(|s| &s.rfilename == name)
                .ok_or_else(|| HubError::EntryNotFound {
                    repo: repo.to_string(),
                    revision: revision.to_string(),
                    path: name.clone(),
                })?;
            self.fetch(&snapshot, sibling)?;
        }
        if revision != info.sha {
            self.write_ref(repo, revision, &info.sha)?;
        }
        Ok(snapshot)
    }

    /// `refs/REVISION` = the commit, written atomically.
    fn write_ref(&self, repo: &Repo, revision: &str, commit: &str) -> Result<()> {
        let path = self.repo_dir(repo).join("refs").join(revision);
        if std::fs::read_to_string(&path).is_ok_and(|c| c == commit) {
            return Ok(());
        }
        let parent = path.parent().unwrap_or(&self.cache);
        std::fs::create_dir_all(parent).map_err(HubError::io(parent))?;
        let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
        std::fs::write(&tmp, commit).map_err(HubError::io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(HubError::io(&path))
    }

    fn revision_info(
        &self,
        repo: &Repo,
        revision: &str,
    ) -> std::result::Result<RevisionInfo, Failure> {
        let url = format!(
            "{}/api/{}s/{}/revision/{}?blobs=true",
            self.endpoint,
            repo.kind_name(),
            repo.id,
            percent_encode(revision)
        );
        let mut response = self.get(&url, None)?;
        self.check(&response, &url, repo, revision, None)?;
        let body = response
            .body_mut()
            .with_config()
            .limit(256 << 20)
            .read_to_vec()
            .map_err(|e| Failure::Unreachable(e.to_string()))?;
        serde_json::from_slice(&body).map_err(|e| {
            Failure::Hub(HubError::Http {
                url,
                status: 200,
                message: format!("the revision listing does not parse: {e}"),
            })
        })
    }

    fn get(
        &self,
        url: &str,
        range: Option<u64>,
    ) -> std::result::Result<ureq::http::Response<ureq::Body>, Failure> {
        let mut request = self.agent.get(url);
        if let Some(token) = &self.token {
            request = request.header("Authorization", &format!("Bearer {token}"));
        }
        if let Some(start) = range {
            request = request.header("Range", &format!("bytes={start}-"));
        }
        request
            .call()
            .map_err(|e| Failure::Unreachable(e.to_string()))
    }

    /// Turns an error status into the error huggingface_hub raises for it, by the Hub's
    /// `X-Error-Code` header.
    fn check(
        &self,
        response: &ureq::http::Response<ureq::Body>,
        url: &str,
        repo: &Repo,
        revision: &str,
        path: Option<&str>,
    ) -> Result<()> {
        let status = response.status().as_u16();
        if status < 400 {
            return Ok(());
        }
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        let code = header("X-Error-Code");
        let message = header("X-Error-Message");
        Err(match (status, code.as_str()) {
            (_, "RepoNotFound") => HubError::RepoNotFound {
                repo: repo.to_string(),
                endpoint: self.endpoint.clone(),
            },
            (_, "RevisionNotFound") => HubError::RevisionNotFound {
                repo: repo.to_string(),
                revision: revision.to_string(),
            },
            (_, "EntryNotFound") => HubError::EntryNotFound {
                repo: repo.to_string(),
                revision: revision.to_string(),
                path: path.unwrap_or_default().to_string(),
            },
            (401, _) => HubError::Unauthorized {
                repo: repo.to_string(),
                had_token: self.token.is_some(),
            },
            (403, _) => HubError::Forbidden {
                repo: repo.to_string(),
                url: format!("{}/{}", self.endpoint, repo.url_path()),
                message: if message.is_empty() {
                    "no reason given".into()
                } else {
                    message
                },
            },
            (404, _) if path.is_some() => HubError::EntryNotFound {
                repo: repo.to_string(),
                revision: revision.to_string(),
                path: path.unwrap_or_default().to_string(),
            },
            (404, _) => HubError::RepoNotFound {
                repo: repo.to_string(),
                endpoint: self.endpoint.clone(),
            },
            _ => HubError::Http {
                url: url.to_string(),
                status,
                message,
            },
        })
    }

    /// Puts one file into the snapshot: its blob downloaded if the cache lacks it, then the
    /// snapshot's relative symlink to it.
    fn fetch(&self, snapshot: &Snapshot, file: &Sibling) -> Result<()> {
        let repo = &snapshot.repo;
        let pointer = snapshot.dir.join(&file.rfilename);
        if pointer.is_file() {
            return Ok(());
        }
        let etag = file.etag().ok_or_else(|| HubError::Unusable {
            repo: repo.to_string(),
            revision: snapshot.revision.clone(),
            message: format!("the listing gives {:?} no blob id", file.rfilename),
        })?;
        if etag.is_empty() || etag.contains(['/', '\\', '.']) {
            return Err(HubError::Unusable {
                repo: repo.to_string(),
                revision: snapshot.revision.clone(),
                message: format!(
                    "the listing gives {:?} a bad blob id {etag:?}",
                    file.rfilename
                ),
            });
        }
        let blobs = self.repo_dir(repo).join("blobs");
        let blob = blobs.join(etag);
        if !blob.is_file() {
            std::fs::create_dir_all(&blobs).map_err(HubError::io(&blobs))?;
            // The same lock file huggingface_hub takes, so the two never write one blob at once.
            let locks = self.cache.join(".locks").join(repo.folder_name());
            std::fs::create_dir_all(&locks).map_err(HubError::io(&locks))?;
            let lock_path = locks.join(format!("{etag}.lock"));
            let lock = std::fs::File::create(&lock_path).map_err(HubError::io(&lock_path))?;
            lock.lock().map_err(HubError::io(&lock_path))?;
            if !blob.is_file() {
                let url = format!(
                    "{}/{}/resolve/{}/{}",
                    self.endpoint,
                    repo.url_path(),
                    snapshot.commit,
                    encode_path(&file.rfilename)
                );
                let part = blobs.join(format!("{etag}.incomplete"));
                self.download(&url, &part, snapshot, file)?;
                std::fs::rename(&part, &blob).map_err(HubError::io(&blob))?;
            }
        }
        let parent = pointer.parent().unwrap_or(&snapshot.dir);
        std::fs::create_dir_all(parent).map_err(HubError::io(parent))?;
        link(&blob, &pointer, file.rfilename.split('/').count() + 1)
    }

    /// Downloads `url` into `part`, continuing what a broken download left there.
    fn download(&self, url: &str, part: &Path, snapshot: &Snapshot, file: &Sibling) -> Result<()> {
        let size = file.size();
        let label = format!("{}/{}", snapshot.repo.id, file.rfilename);
        let bar = self.bar(&label, size);
        let mut out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(part)
            .map_err(HubError::io(part))?;
        let mut attempt = 0;
        loop {
            let mut have = out.metadata().map_err(HubError::io(part))?.len();
            if size.is_some_and(|s| have > s) {
                out.set_len(0).map_err(HubError::io(part))?;
                have = 0;
            }
            if size == Some(have) && have > 0 {
                break;
            }
            let broke = |message: String| HubError::Unreachable {
                endpoint: self.endpoint.clone(),
                message,
                cache: self.cache.clone(),
                repo: snapshot.repo.to_string(),
                revision: snapshot.revision.clone(),
            };
            let mut response = match self.get(url, (have > 0).then_some(have)) {
                Ok(r) => r,
                Err(Failure::Unreachable(m)) if attempt < RESUMES => {
                    attempt += 1;
                    eprintln!("warning: {label}: {m}; retrying");
                    std::thread::sleep(Duration::from_millis(200 << attempt));
                    continue;
                }
                Err(Failure::Unreachable(m)) => return Err(broke(m)),
                Err(Failure::Hub(e)) => return Err(e),
            };
            match response.status().as_u16() {
                206 => {}
                // The server sent the whole file (it takes no ranges), or the range was past
                // its end: start over.
                200 | 416 => {
                    out.set_len(0).map_err(HubError::io(part))?;
                    out.seek(std::io::SeekFrom::Start(0))
                        .map_err(HubError::io(part))?;
                    have = 0;
                    if response.status().as_u16() == 416 {
                        continue;
                    }
                }
                _ => {
                    self.check(
                        &response,
                        url,
                        &snapshot.repo,
                        &snapshot.revision,
                        Some(&file.rfilename),
                    )?;
                    return Err(HubError::Http {
                        url: url.to_string(),
                        status: response.status().as_u16(),
                        message: "unexpected status for a file download".into(),
                    });
                }
            }
            bar.set_position(have);
            let mut reader = response.body_mut().with_config().limit(u64::MAX).reader();
            let mut buf = vec![0u8; 1 << 16];
            let copied: std::io::Result<()> = loop {
                match reader.read(&mut buf) {
                    Ok(0) => break Ok(()),
                    Ok(n) => {
                        if let Err(e) = out.write_all(&buf[..n]) {
                            return Err(HubError::Io {
                                path: part.to_path_buf(),
                                source: e,
                            });
                        }
                        bar.inc(n as u64);
                    }
                    Err(e) => break Err(e),
                }
            };
            let now = out.metadata().map_err(HubError::io(part))?.len();
            match copied {
                Ok(()) if size.is_none_or(|s| now == s) => break,
                Ok(()) | Err(_) if attempt < RESUMES => {
                    attempt += 1;
                    eprintln!("warning: {label}: the download broke off at {now} bytes; resuming");
                }
                Ok(()) => return Err(broke(format!("the download ended at {now} bytes"))),
                Err(e) => return Err(broke(e.to_string())),
            }
        }
        bar.finish_and_clear();
        drop(out);
        verify(part, url, file)
    }

    fn bar(&self, label: &str, size: Option<u64>) -> indicatif::ProgressBar {
        if !self.progress {
            let size = match size {
                Some(s) if s >= 1_000_000 => format!(" ({:.1} MB)", s as f64 / 1e6),
                Some(s) => format!(" ({:.1} kB)", s as f64 / 1e3),
                None => String::new(),
            };
            eprintln!("downloading {label}{size}");
            return indicatif::ProgressBar::hidden();
        }
        let bar =
            indicatif::ProgressBar::with_draw_target(size, indicatif::ProgressDrawTarget::stderr());
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{msg} {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} {eta}",
        ) {
            bar.set_style(style);
        }
        bar.set_message(label.to_string());
        bar
    }
}

/// Checks a finished download against the size and sha256 the listing announced.
fn verify(part: &Path, url: &str, file: &Sibling) -> Result<()> {
    let corrupt = |message: String| HubError::Corrupt {
        path: part.to_path_buf(),
        url: url.to_string(),
        message,
    };
    let len = std::fs::metadata(part).map_err(HubError::io(part))?.len();
    if let Some(size) = file.size()
        && len != size
    {
        // Nothing of it can be trusted: the next run starts over.
        let _ = std::fs::remove_file(part);
        return Err(corrupt(format!("{len} bytes where {size} were announced")));
    }
    if let Some(lfs) = &file.lfs {
        use sha2::Digest;
        let mut hasher = sha2::Sha256::new();
        let mut f = std::fs::File::open(part).map_err(HubError::io(part))?;
        std::io::copy(&mut f, &mut hasher).map_err(HubError::io(part))?;
        let got: String = hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if got != lfs.sha256 {
            let _ = std::fs::remove_file(part);
            return Err(corrupt(format!(
                "sha256 {got} where {} was announced",
                lfs.sha256
            )));
        }
    }
    Ok(())
}

/// `pointer` → `blob` as huggingface_hub links them: a relative symlink climbing `depth`
/// folders to the repository's (a copy where the platform has no symlinks).
fn link(blob: &Path, pointer: &Path, depth: usize) -> Result<()> {
    let _ = std::fs::remove_file(pointer);
    #[cfg(unix)]
    {
        let mut target = PathBuf::new();
        for _ in 0..depth {
            target.push("..");
        }
        target.push("blobs");
        target.push(blob.file_name().unwrap_or_default());
        std::os::unix::fs::symlink(&target, pointer).map_err(HubError::io(pointer))
    }
    #[cfg(not(unix))]
    {
        let _ = depth;
        std::fs::copy(blob, pointer)
            .map(|_| ())
            .map_err(HubError::io(pointer))
    }
}

/// What a model folder needs, chosen from a repository's files: the GGUF file asked for, or
/// the root's config, tokenizer, chat template and safetensors files (the weights in other
/// formats and the subfolders' exports are left on the Hub).
pub fn choose_model_files(
    files: &[String],
    gguf_file: Option<&str>,
) -> std::result::Result<Vec<String>, String> {
    if let Some(g) = gguf_file {
        if files.iter().any(|f| f == g) {
            return Ok(vec![g.to_string()]);
        }
        let ggufs: Vec<&str> = files
            .iter()
            .map(String::as_str)
            .filter(|f| f.ends_with(".gguf"))
            .collect();
        return Err(format!(
            "no file {g:?} (gguf_file); its GGUF files: {}",
            list(&ggufs)
        ));
    }
    let root: Vec<&str> = files
        .iter()
        .map(String::as_str)
        .filter(|f| !f.contains('/'))
        .collect();
    let has = |name: &str| root.contains(&name);
    let ggufs: Vec<&str> = files
        .iter()
        .map(String::as_str)
        .filter(|f| f.ends_with(".gguf"))
        .collect();
    if !has("config.json") && !has("adapter_config.json") {
        return Err(if ggufs.is_empty() {
            "no config.json: not a transformers model".into()
        } else {
            format!(
                "no config.json, only GGUF files: name one with gguf_file (or --gguf-file): {}",
                list(&ggufs)
            )
        });
    }
    if !root.iter().any(|f| f.ends_with(".safetensors")) {
        let other: Vec<&str> = root
            .iter()
            .copied()
            .filter(|f| {
                [".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt"]
                    .iter()
                    .any(|e| f.ends_with(e))
            })
            .collect();
        return Err(format!(
            "no .safetensors weights (whet reads safetensors{}{})",
            if other.is_empty() { "" } else { "; it has " },
            list(&other)
        ));
    }
    Ok(root
        .into_iter()
        .filter(|f| {
            [".json", ".safetensors", ".txt", ".model", ".jinja"]
                .iter()
                .any(|e| f.ends_with(e))
        })
        .map(String::from)
        .collect())
}

fn list(names: &[&str]) -> String {
    if names.is_empty() {
        return String::new();
    }
    let mut s = names.iter().take(8).copied().collect::<Vec<_>>().join(", ");
    if names.len() > 8 {
        s.push_str(&format!(", … ({} in all)", names.len()));
    }
    s
}

/// Where to load a model from (see [`Hub::model_path`]), with the client the environment
/// configures.
pub fn model_path(spec: &Path, revision: Option<&str>, gguf_file: Option<&str>) -> Result<PathBuf> {
    Hub::from_env().model_path(spec, revision, gguf_file)
}

/// The local path of an `hf://` data path (see [`Hub::data_path`]), with the client the
/// environment configures.
pub fn data_path(uri: &str, keep: &dyn Fn(&str) -> bool) -> Result<PathBuf> {
    Hub::from_env().data_path(uri, keep)
}

impl Hub {
    /// Where to load a model from, as `from_pretrained(spec, revision=, gguf_file=)` finds it:
    /// a local file or folder always wins (`gguf_file` then names a file inside it); otherwise
    /// `spec` is a repo id, and the path is its cache snapshot (the GGUF file inside it).
    pub fn model_path(
        &self,
        spec: &Path,
        revision: Option<&str>,
        gguf_file: Option<&str>,
    ) -> Result<PathBuf> {
        if spec.exists() {
            if let Some(r) = revision {
                return Err(HubError::BadId {
                    spec: spec.display().to_string(),
                    why: format!(
                        "it is a local path, so revision = {r:?} cannot apply; leave revision out"
                    ),
                });
            }
            return Ok(match gguf_file {
                Some(g) => spec.join(g),
                None => spec.to_path_buf(),
            });
        }
        let text = spec.to_string_lossy();
        let repo = Repo::model(&text)?;
        let revision = revision.unwrap_or("main");
        let snapshot = self.snapshot(&repo, revision, &|files| {
            choose_model_files(files, gguf_file)
        })?;
        let path = match gguf_file {
            Some(g) => snapshot.dir.join(g),
            None => snapshot.dir.clone(),
        };
        if !path.exists() {
            return Err(HubError::NotCached {
                cache: self.cache.clone(),
                what: format!(
                    "{}@{revision}: {}",
                    repo.id,
                    gguf_file.unwrap_or("config.json")
                ),
            });
        }
        Ok(path)
    }

    /// The local path of `hf://datasets/ORG/NAME[@REVISION]/PATH`: the files it names (those
    /// of a folder that `keep` accepts) downloaded into the cache, and `PATH` inside the
    /// snapshot (a glob stays a glob, for the reader to expand).
    pub fn data_path(&self, uri: &str, keep: &dyn Fn(&str) -> bool) -> Result<PathBuf> {
        let data = DataUri::parse(uri)?;
        let snapshot = self.snapshot(&data.repo, &data.revision, &|files| {
            let chosen = data.select(files, keep)?;
            if chosen.is_empty() {
                let mut shown: Vec<&str> = files
                    .iter()
                    .map(String::as_str)
                    .filter(|f| keep(f))
                    .collect();
                shown.truncate(12);
                return Err(format!(
                    "no data file matches {:?} (its data files: {})",
                    data.path,
                    if shown.is_empty() {
                        "none".into()
                    } else {
                        shown.join(", ")
                    }
                ));
            }
            Ok(chosen.into_iter().map(String::from).collect())
        })?;
        Ok(if data.path.is_empty() {
            snapshot.dir
        } else {
            snapshot.dir.join(&data.path)
        })
    }
}
