//! Names on the Hub: repo ids, `hf://datasets/...` paths, and the patterns that choose files.

use crate::error::{HubError, Result};

/// What kind of repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoKind {
    /// A model repository (`ORG/NAME`).
    Model,
    /// A dataset repository (`datasets/ORG/NAME` in URLs).
    Dataset,
}

/// A repository on the Hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repo {
    /// Model or dataset.
    pub kind: RepoKind,
    /// `ORG/NAME`, or `NAME` for the few repositories without an owner.
    pub id: String,
}

impl Repo {
    /// A model repository, its id checked as huggingface_hub's `validate_repo_id` does.
    pub fn model(id: &str) -> Result<Self> {
        check_id(id).map_err(|why| HubError::BadId {
            spec: id.to_string(),
            why,
        })?;
        Ok(Self {
            kind: RepoKind::Model,
            id: id.to_string(),
        })
    }

    /// The cache folder's name: `models--ORG--NAME` or `datasets--ORG--NAME`.
    pub fn folder_name(&self) -> String {
        format!("{}s--{}", self.kind_name(), self.id.replace('/', "--"))
    }

    /// `model` or `dataset`.
    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            RepoKind::Model => "model",
            RepoKind::Dataset => "dataset",
        }
    }

    /// The URL path of the repository's pages: `ORG/NAME` or `datasets/ORG/NAME`.
    pub(crate) fn url_path(&self) -> String {
        match self.kind {
            RepoKind::Model => self.id.clone(),
            RepoKind::Dataset => format!("datasets/{}", self.id),
        }
    }
}

impl std::fmt::Display for Repo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            RepoKind::Model => write!(f, "model {}", self.id),
            RepoKind::Dataset => write!(f, "dataset {}", self.id),
        }
    }
}

/// Why `id` is not a repo id, if it is not: one or two names of letters, digits, `-`, `_` and
/// `.`, joined by `/`, at most 96 characters, without `--` or `..`, not starting or ending
/// with `-` or `.` (huggingface_hub's `validate_repo_id`).
pub fn check_id(id: &str) -> std::result::Result<(), String> {
    if id.is_empty() {
        return Err("it is empty".into());
    }
    if id.len() > 96 {
        return Err(format!("it has {} characters, more than 96", id.len()));
    }
    let parts: Vec<&str> = id.split('/').collect();
    if parts.len() > 2 {
        return Err(format!(
            "it has {} '/'-separated parts, not 1 or 2",
            parts.len()
        ));
    }
    for part in &parts {
        if part.is_empty() {
            return Err("it has an empty part".into());
        }
        if let Some(c) = part
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        {
            return Err(format!("it holds {c:?}"));
        }
        if part.starts_with(['-', '.']) || part.ends_with(['-', '.']) {
            return Err(format!("{part:?} starts or ends with '-' or '.'"));
        }
    }
    if id.contains("--") || id.contains("..") {
        return Err("it holds '--' or '..'".into());
    }
    Ok(())
}

/// Whether a revision names a commit outright (40 hex digits).
pub(crate) fn is_commit(revision: &str) -> bool {
    revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A parsed `hf://datasets/ORG/NAME[@REVISION][/PATH]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataUri {
    /// The dataset repository.
    pub repo: Repo,
    /// The branch, tag or commit (default `main`).
    pub revision: String,
    /// A file, a folder or a glob inside the repository (empty: the whole repository).
    pub path: String,
}

impl DataUri {
    /// Whether `path` is an `hf://` path at all.
    pub fn is_hf(path: &str) -> bool {
        path.starts_with("hf://")
    }

    /// Parses an `hf://` data path as huggingface_hub's `HfFileSystem` writes them.
    pub fn parse(uri: &str) -> Result<Self> {
        let bad = |why: &str| HubError::BadUri {
            uri: uri.to_string(),
            why: why.to_string(),
        };
        let rest = uri
            .strip_prefix("hf://")
            .ok_or_else(|| bad("it does not start with hf://"))?;
        let rest = match rest.split_once('/') {
            Some(("datasets", rest)) => rest,
            Some(("spaces", _)) | Some(("buckets", _)) => {
                return Err(bad("only dataset repositories hold training data"));
            }
            _ => {
                return Err(bad(
                    "a model repository is not a data source (hf://ORG/NAME is the model form)",
                ));
            }
        };
        let (org, tail) = rest
            .split_once('/')
            .ok_or_else(|| bad("it names no ORG/NAME"))?;
        let name_end = tail.find(['@', '/']).unwrap_or(tail.len());
        let name = &tail[..name_end];
        let mut after = &tail[name_end..];
        let mut revision = "main".to_string();
        if let Some(r) = after.strip_prefix('@') {
            // HfFileSystem takes the two refs that hold '/' unescaped; any other revision ends
            // at the next '/' and may be percent-encoded (`refs%2Fconvert%2Fparquet`).
            let special = ["refs/convert/parquet", "refs/convert/duckdb"]
                .into_iter()
                .find(|s| {
                    r.starts_with(s) && matches!(r.as_bytes().get(s.len()), None | Some(b'/'))
                })
                .map(|s| s.len())
                .or_else(|| {
                    let n = r.strip_prefix("refs/pr/")?;
                    let digits = n.bytes().take_while(u8::is_ascii_digit).count();
                    (digits > 0 && matches!(n.as_bytes().get(digits), None | Some(b'/')))
                        .then_some("refs/pr/".len() + digits)
                });
            let end = special.unwrap_or_else(|| r.find('/').unwrap_or(r.len()));
            revision = percent_decode(&r[..end]).map_err(|e| bad(&e))?;
            if revision.is_empty() {
                return Err(bad("the revision after '@' is empty"));
            }
            after = &r[end..];
        }
        let id = format!("{org}/{name}");
        check_id(&id).map_err(|why| bad(&format!("{id:?} is not a repo id: {why}")))?;
        let path = after
            .trim_start_matches('/')
            .trim_end_matches('/')
            .to_string();
        if path.split('/').any(|p| p == "..") {
            return Err(bad("the path leaves the repository ('..')"));
        }
        Ok(Self {
            repo: Repo {
                kind: RepoKind::Dataset,
                id,
            },
            revision,
            path,
        })
    }

    /// Whether the path is a glob pattern rather than a file or folder.
    pub fn is_glob(&self) -> bool {
        self.path.contains(['*', '?', '['])
    }

    /// The repository's files this path names, from its full list: the glob's matches, the
    /// file itself, or every file under the folder (the whole repository for an empty path)
    /// that `keep` accepts.
    pub fn select<'a>(
        &self,
        files: &'a [String],
        keep: &dyn Fn(&str) -> bool,
    ) -> std::result::Result<Vec<&'a str>, String> {
        if self.is_glob() {
            let pattern = glob::Pattern::new(&self.path)
                .map_err(|e| format!("bad glob {:?}: {e}", self.path))?;
            let options = glob::MatchOptions {
                case_sensitive: true,
                require_literal_separator: true,
                require_literal_leading_dot: false,
            };
            return Ok(files
                .iter()
                .map(String::as_str)
                .filter(|f| pattern.matches_with(f, options))
                .collect());
        }
        if let Some(f) = files.iter().find(|f| **f == self.path) {
            return Ok(vec![f.as_str()]);
        }
        let prefix = if self.path.is_empty() {
            String::new()
        } else {
            format!("{}/", self.path)
        };
        Ok(files
            .iter()
            .map(String::as_str)
            .filter(|f| f.starts_with(&prefix) && keep(f))
            .collect())
    }
}

/// Percent-decodes a URL component.
fn percent_decode(s: &str) -> std::result::Result<String, String> {
    let mut out = Vec::with_capacity(s.len());
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent escape in {s:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} does not decode to UTF-8"))
}

/// Percent-encodes a URL path segment (everything but RFC 3986's unreserved characters).
pub(crate) fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A repository path encoded for a URL, its `/` kept.
pub(crate) fn encode_path(path: &str) -> String {
    path.split('/')
        .map(percent_encode)
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_are_checked_as_huggingface_hub_does() {
        for good in [
            "gpt2",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "org/name.v2",
            "a_b/c",
        ] {
            assert!(check_id(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "a/b/c",
            "org/",
            "/abs",
            "a b",
            "org/na--me",
            "org/..",
            "-org/x",
            "org/x.",
            "./local",
        ] {
            assert!(check_id(bad).is_err(), "{bad}");
        }
        assert!(check_id(&"a".repeat(97)).is_err());
    }

    #[test]
    fn data_uris_parse_as_hffilesystem_writes_them() {
        let u =
            DataUri::parse("hf://datasets/stanfordnlp/imdb/plain_text/train-*.parquet").unwrap();
        assert_eq!(u.repo.id, "stanfordnlp/imdb");
        assert_eq!(u.revision, "main");
        assert_eq!(u.path, "plain_text/train-*.parquet");
        assert!(u.is_glob());
        assert_eq!(u.repo.folder_name(), "datasets--stanfordnlp--imdb");

        let u = DataUri::parse("hf://datasets/o/n@refs/convert/parquet/default/train").unwrap();
        assert_eq!(
            (u.revision.as_str(), u.path.as_str()),
            ("refs/convert/parquet", "default/train")
        );
        let u = DataUri::parse("hf://datasets/o/n@refs%2Fpr%2F3/a.csv").unwrap();
        assert_eq!(
            (u.revision.as_str(), u.path.as_str()),
            ("refs/pr/3", "a.csv")
        );
        let u = DataUri::parse("hf://datasets/o/n@refs/pr/12").unwrap();
        assert_eq!((u.revision.as_str(), u.path.as_str()), ("refs/pr/12", ""));
        let u = DataUri::parse("hf://datasets/o/n@v1.0/data/").unwrap();
        assert_eq!((u.revision.as_str(), u.path.as_str()), ("v1.0", "data"));

        for (bad, says) in [
            ("hf://o/n/x.csv", "model repository"),
            ("hf://spaces/o/n/x.csv", "dataset repositories"),
            ("hf://datasets/o", "ORG/NAME"),
            ("hf://datasets/o/n@/x", "empty"),
            ("hf://datasets/o/n--x/a", "not a repo id"),
            ("hf://datasets/o/n/../m/x", ".."),
            ("s3://datasets/o/n", "hf://"),
        ] {
            let e = DataUri::parse(bad).unwrap_err().to_string();
            assert!(e.contains(says) && e.contains(bad), "{bad}: {e}");
        }
    }

    #[test]
    fn a_data_path_selects_a_file_a_folder_or_a_glob() {
        let files: Vec<String> = [
            "README.md",
            "data/train-0.parquet",
            "data/train-1.parquet",
            "data/test-0.parquet",
            "data/sub/deep.parquet",
            "extra.jsonl",
        ]
        .map(String::from)
        .to_vec();
        let data = |f: &str| f.ends_with(".parquet") || f.ends_with(".jsonl");
        let select = |p: &str| {
            DataUri::parse(&format!("hf://datasets/o/n/{p}"))
                .unwrap()
                .select(&files, &data)
                .unwrap()
        };
        assert_eq!(select("extra.jsonl"), ["extra.jsonl"]);
        assert_eq!(
            select("data/train-*.parquet"),
            ["data/train-0.parquet", "data/train-1.parquet"]
        );
        // `*` stays inside one folder; `**` crosses them.
        assert_eq!(select("data/*.parquet").len(), 3);
        assert_eq!(select("data/**/*.parquet").len(), 4);
        assert_eq!(select("data").len(), 4);
        assert_eq!(select("").len(), 5, "README.md is not data");
        assert!(select("nothing/here").is_empty());
    }
}
