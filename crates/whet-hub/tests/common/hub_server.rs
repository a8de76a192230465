//! A stand-in for the Hugging Face Hub on 127.0.0.1, for tests (there is no internet here).
//!
//! It serves a folder laid out as `ROOT/models/ORG/NAME/...` and `ROOT/datasets/ORG/NAME/...`
//! through the endpoints huggingface_hub and whet call, with the Hub's headers and error codes:
//! - `GET /api/{models,datasets}/ID/revision/REV`: `sha` and `siblings` (`rfilename`, `size`,
//!   `blobId`, and `lfs` with `sha256` for `.safetensors`, `.gguf` and `.parquet` files);
//! - `GET|HEAD /ID/resolve/REV/PATH` (`/datasets/ID/...`): `X-Repo-Commit`, `ETag`; an LFS
//!   file answers 302 with `X-Linked-Etag` / `X-Linked-Size` and a `Location` on `/cdn/SHA256`
//!   on the host `localhost` (another host standing for the Hub's CDN, so no client sends it
//!   the token), which serves the bytes; `Range` requests get 206;
//! - errors as the Hub sends them: 401 `RepoNotFound` for an unknown repository, 404
//!   `RevisionNotFound` / `EntryNotFound`, 401 / 403 `GatedRepo` for a gated one without the
//!   right token.
//!
//! Revisions: `main` and the commit (a hash of the repository's files), plus the names listed
//! in a repository's `.refs` file (one `NAME` per line, all naming the same commit). A blob id
//! stands in for git's (a hash of the file, not git's sha1: nothing checks it but equality).
//! `cut_once` names files whose first whole-file download is broken off halfway.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sha2::Digest;

/// What a test sets up.
#[derive(Default, Clone)]
pub struct Options {
    /// Repo ids (`ORG/NAME`) that need `token`.
    pub gated: Vec<String>,
    /// The token that may read gated repositories.
    pub token: Option<String>,
    /// Repository paths (`ORG/NAME/FILE`) whose first whole-file GET is cut halfway.
    pub cut_once: Vec<String>,
}

/// A running server.
pub struct Server {
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
    /// Every request: `METHOD PATH [auth] [range]` (`auth`: it carried an Authorization header).
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// The requests so far.
    pub fn requests(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

struct State {
    root: PathBuf,
    options: Options,
    cut_done: Mutex<HashSet<String>>,
    log: Arc<Mutex<Vec<String>>>,
    port: u16,
    hashes: Mutex<BTreeMap<PathBuf, (usize, String)>>,
}

impl State {
    /// A file's length and sha256, computed once.
    fn sha(&self, path: &Path) -> (usize, String) {
        if let Some(v) = self.hashes.lock().unwrap().get(path) {
            return v.clone();
        }
        let bytes = std::fs::read(path).unwrap_or_default();
        let v = (bytes.len(), sha256(&bytes));
        self.hashes
            .lock()
            .unwrap()
            .insert(path.to_path_buf(), v.clone());
        v
    }
}

/// Starts serving `root` on a free port, on a background thread.
pub fn start(root: &Path, options: Options) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let log = Arc::new(Mutex::new(Vec::new()));
    let state = Arc::new(State {
        root: root.to_path_buf(),
        options,
        cut_done: Mutex::new(HashSet::new()),
        log: log.clone(),
        port,
        hashes: Mutex::new(BTreeMap::new()),
    });
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let state = state.clone();
            std::thread::spawn(move || {
                let _ = serve(stream, &state);
            });
        }
    });
    Server {
        endpoint: format!("http://127.0.0.1:{port}"),
        log,
    }
}

struct Request {
    method: String,
    path: String,
    headers: BTreeMap<String, String>,
}

fn read_request(stream: &TcpStream) -> Option<Request> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let path = target.split('?').next().unwrap_or_default().to_string();
    Some(Request {
        method,
        path: decode(&path),
        headers,
    })
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(v) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Send only this many bytes of the body, then close.
    cut_at: Option<usize>,
}

impl Reply {
    fn error(status: u16, code: &str, message: &str) -> Self {
        let mut headers = vec![("X-Error-Message".into(), message.into())];
        if !code.is_empty() {
            headers.push(("X-Error-Code".into(), code.into()));
        }
        Reply {
            status,
            headers,
            body: serde_json::json!({ "error": message })
                .to_string()
                .into_bytes(),
            cut_at: None,
        }
    }
}

fn serve(mut stream: TcpStream, state: &State) -> std::io::Result<()> {
    let Some(request) = read_request(&stream) else {
        return Ok(());
    };
    let range = request.headers.get("range").cloned();
    let auth = if request.headers.contains_key("authorization") {
        " auth"
    } else {
        ""
    };
    state.log.lock().unwrap().push(format!(
        "{} {}{auth}{}",
        request.method,
        request.path,
        range
            .as_deref()
            .map(|r| format!(" {r}"))
            .unwrap_or_default()
    ));
    let reply = route(&request, state);
    let head_only = request.method == "HEAD";
    let (status, mut headers, body, cut_at) = match (&range, reply.status) {
        (Some(r), 200) => match parse_range(r, reply.body.len()) {
            Some(start) if start < reply.body.len() => (
                206,
                {
                    let mut h = reply.headers.clone();
                    h.push((
                        "Content-Range".into(),
                        format!(
                            "bytes {start}-{}/{}",
                            reply.body.len() - 1,
                            reply.body.len()
                        ),
                    ));
                    h
                },
                reply.body[start..].to_vec(),
                reply.cut_at,
            ),
            _ => (
                416,
                vec![(
                    "Content-Range".into(),
                    format!("bytes */{}", reply.body.len()),
                )],
                vec![],
                None,
            ),
        },
        _ => (reply.status, reply.headers, reply.body, reply.cut_at),
    };
    headers.push(("Content-Length".into(), body.len().to_string()));
    headers.push(("Connection".into(), "close".into()));
    let mut out = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    for (k, v) in &headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    stream.write_all(out.as_bytes())?;
    if !head_only {
        let n = cut_at.unwrap_or(body.len()).min(body.len());
        stream.write_all(&body[..n])?;
    }
    stream.flush()?;
    let _ = stream.shutdown(std::net::Shutdown::Both);
    Ok(())
}

fn parse_range(r: &str, len: usize) -> Option<usize> {
    let start = r.strip_prefix("bytes=")?.strip_suffix('-')?;
    let start: usize = start.parse().ok()?;
    (start <= len).then_some(start)
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        _ => "Error",
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256(bytes: &[u8]) -> String {
    hex(&sha2::Sha256::digest(bytes))
}

fn is_lfs(path: &str) -> bool {
    [".safetensors", ".gguf", ".parquet"]
        .iter()
        .any(|e| path.ends_with(e))
}

/// The files of a repository folder, by repository path (sorted), skipping `.refs`.
fn files(dir: &Path) -> Vec<(String, PathBuf)> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<(String, PathBuf)>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(base, &p, out);
            } else if p.file_name().is_some_and(|n| n != ".refs") {
                let rel = p
                    .strip_prefix(base)
                    .unwrap()
                    .to_string_lossy()
                    .replace('\\', "/");
                out.push((rel, p));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

struct Repo {
    id: String,
    files: Vec<(String, PathBuf)>,
    commit: String,
    refs: Vec<String>,
}

impl Repo {
    fn open(state: &State, kind: &'static str, id: &str) -> Option<Repo> {
        if id.split('/').count() != 2 || id.contains("..") {
            return None;
        }
        let dir = state.root.join(format!("{kind}s")).join(id);
        if !dir.is_dir() {
            return None;
        }
        let files = files(&dir);
        let mut h = sha2::Sha256::new();
        for (name, path) in &files {
            h.update(name.as_bytes());
            h.update(state.sha(path).1.as_bytes());
        }
        let commit = hex(&h.finalize())[..40].to_string();
        let refs = std::fs::read_to_string(dir.join(".refs"))
            .unwrap_or_default()
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect();
        Some(Repo {
            id: id.to_string(),
            files,
            commit,
            refs,
        })
    }

    fn knows(&self, revision: &str) -> bool {
        revision == "main" || revision == self.commit || self.refs.iter().any(|r| r == revision)
    }
}

/// Splits `ID/rest` where ID is ORG/NAME.
fn split_id(s: &str) -> Option<(String, &str)> {
    let mut it = s.splitn(3, '/');
    let org = it.next()?;
    let name = it.next()?;
    Some((format!("{org}/{name}"), it.next().unwrap_or("")))
}

fn route(req: &Request, state: &State) -> Reply {
    let path = req.path.trim_start_matches('/');
    if let Some(sha) = path.strip_prefix("cdn/") {
        return cdn(state, sha);
    }
    if let Some(rest) = path.strip_prefix("api/") {
        let (kind, rest) = match rest.split_once('/') {
            Some(("models", r)) => ("model", r),
            Some(("datasets", r)) => ("dataset", r),
            _ => return Reply::error(404, "", "unknown API"),
        };
        let Some((id, rest)) = split_id(rest) else {
            return Reply::error(404, "", "bad path");
        };
        let Some(revision) = rest.strip_prefix("revision/") else {
            return Reply::error(404, "", "this stand-in only answers /revision/");
        };
        return match open_checked(req, state, kind, &id, revision) {
            Ok(repo) => api(state, &repo),
            Err(reply) => reply,
        };
    }
    let (kind, rest) = match path.strip_prefix("datasets/") {
        Some(r) => ("dataset", r),
        None => ("model", path),
    };
    let Some((id, rest)) = split_id(rest) else {
        return Reply::error(404, "", "bad path");
    };
    let Some(rest) = rest.strip_prefix("resolve/") else {
        return Reply::error(404, "", "this stand-in only answers /resolve/");
    };
    // The revision is percent-encoded as one segment by the clients.
    let (revision, file) = rest.split_once('/').unwrap_or((rest, ""));
    let repo = match open_checked(req, state, kind, &id, revision) {
        Ok(r) => r,
        Err(reply) => return reply,
    };
    resolve(state, &repo, file)
}

fn open_checked(
    req: &Request,
    state: &State,
    kind: &'static str,
    id: &str,
    revision: &str,
) -> Result<Repo, Reply> {
    let Some(repo) = Repo::open(state, kind, id) else {
        return Err(Reply::error(401, "RepoNotFound", "Repository Not Found"));
    };
    if state.options.gated.iter().any(|g| g == id) {
        let given = req
            .headers
            .get("authorization")
            .and_then(|a| a.strip_prefix("Bearer "));
        match given {
            None => {
                return Err(Reply::error(
                    401,
                    "GatedRepo",
                    "Access to this repository is restricted. You must be authenticated.",
                ));
            }
            Some(t) if Some(t) != state.options.token.as_deref() => {
                return Err(Reply::error(
                    403,
                    "GatedRepo",
                    "Access to this repository is restricted and you are not in the authorized list.",
                ));
            }
            Some(_) => {}
        }
    }
    if !repo.knows(revision) {
        return Err(Reply::error(404, "RevisionNotFound", "Invalid rev id"));
    }
    Ok(repo)
}

fn api(state: &State, repo: &Repo) -> Reply {
    let siblings: Vec<serde_json::Value> = repo
        .files
        .iter()
        .map(|(name, path)| {
            let (len, sha) = state.sha(path);
            let mut s = serde_json::json!({
                "rfilename": name,
                "size": len,
                "blobId": sha[..40],
            });
            if is_lfs(name) {
                s["lfs"] = serde_json::json!({"sha256": sha, "size": len, "pointerSize": 134});
            }
            s
        })
        .collect();
    let body = serde_json::json!({
        "id": repo.id,
        "sha": repo.commit,
        "private": false,
        "siblings": siblings,
    });
    Reply {
        status: 200,
        headers: vec![("Content-Type".into(), "application/json".into())],
        body: body.to_string().into_bytes(),
        cut_at: None,
    }
}

fn resolve(state: &State, repo: &Repo, file: &str) -> Reply {
    let Some((_, path)) = repo.files.iter().find(|(n, _)| n == file) else {
        let mut r = Reply::error(404, "EntryNotFound", &format!("{file} does not exist"));
        r.headers
            .push(("X-Repo-Commit".into(), repo.commit.clone()));
        return r;
    };
    let bytes = std::fs::read(path).unwrap_or_default();
    let sha = sha256(&bytes);
    let mut headers = vec![("X-Repo-Commit".into(), repo.commit.clone())];
    if is_lfs(file) {
        headers.push(("ETag".into(), format!("\"{}\"", &sha[..40])));
        headers.push(("X-Linked-Etag".into(), format!("\"{sha}\"")));
        headers.push(("X-Linked-Size".into(), bytes.len().to_string()));
        headers.push((
            "Location".into(),
            format!("http://localhost:{}/cdn/{sha}", state.port),
        ));
        return Reply {
            status: 302,
            headers,
            body: vec![],
            cut_at: None,
        };
    }
    headers.push(("ETag".into(), format!("\"{}\"", &sha[..40])));
    let key = format!("{}/{file}", repo.id);
    let cut_at = cut(state, &key, bytes.len());
    Reply {
        status: 200,
        headers,
        body: bytes,
        cut_at,
    }
}

fn cut(state: &State, key: &str, len: usize) -> Option<usize> {
    if !state.options.cut_once.iter().any(|c| c == key) {
        return None;
    }
    let mut done = state.cut_done.lock().unwrap();
    done.insert(key.to_string()).then_some(len / 2)
}

/// The stand-in CDN: bytes by sha256, with ranges.
fn cdn(state: &State, sha: &str) -> Reply {
    for kind in ["models", "datasets"] {
        let base = state.root.join(kind);
        let Ok(orgs) = std::fs::read_dir(&base) else {
            continue;
        };
        for org in orgs.flatten() {
            for repo in std::fs::read_dir(org.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                for (name, path) in files(&repo.path()) {
                    if state.sha(&path).1 == sha {
                        let bytes = std::fs::read(&path).unwrap_or_default();
                        let key = format!(
                            "{}/{}/{name}",
                            org.file_name().to_string_lossy(),
                            repo.file_name().to_string_lossy()
                        );
                        let cut_at = cut(state, &key, bytes.len());
                        return Reply {
                            status: 200,
                            headers: vec![("ETag".into(), format!("\"{sha}\""))],
                            body: bytes,
                            cut_at,
                        };
                    }
                }
            }
        }
    }
    Reply::error(404, "", "no such object")
}
