//! Reading tabular training data (JSON lines, CSV and Parquet) into rows of named JSON values.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{DataError, Result};

/// Text encodings accepted for CSV files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Encoding {
    /// UTF-8 (the default); invalid bytes are an error naming the line.
    #[default]
    Utf8,
    /// ISO-8859-1: every byte is the code point of the same value.
    Latin1,
}

impl std::str::FromStr for Encoding {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().replace('_', "-").as_str() {
            "utf-8" | "utf8" => Ok(Encoding::Utf8),
            "latin-1" | "latin1" | "iso-8859-1" | "iso8859-1" => Ok(Encoding::Latin1),
            other => Err(format!(
                "unsupported encoding {other:?} (utf-8 and latin-1 are)"
            )),
        }
    }
}

/// The extensions [`Table::read`] reads.
pub const DATA_EXTENSIONS: &[&str] = &[
    "jsonl", "json", "ndjson", "csv", "tsv", "parquet", "txt", "text",
];

/// A file's rows: each a map from column name to value, with the 1-based line it came from.
#[derive(Debug, Clone)]
pub struct Table {
    /// Source file (for several files, the folder or glob they came from).
    pub path: PathBuf,
    /// Column names in file order (JSONL: the union of keys, in order of first appearance).
    pub columns: Vec<String>,
    /// `(line, row)`; for several files, lines count on from one file to the next
    /// ([`Table::locate`] gives back the file and its own line).
    pub rows: Vec<(usize, BTreeMap<String, Value>)>,
    /// Class names of columns a `datasets` Parquet file declares as `ClassLabel` (or a list
    /// of them), from its `huggingface` schema metadata: the column's integers are ids into them.
    pub class_names: BTreeMap<String, Vec<String>>,
    /// For several files: the number each file's lines are offset by, and the file.
    parts: Vec<(usize, PathBuf)>,
}

/// Whether a file name has an extension [`Table::read`] reads (also under `.gz`).
pub fn is_data_file(name: &str) -> bool {
    DATA_EXTENSIONS.contains(&format_of(Path::new(name)).0.as_str())
}

/// A data file's format extension, lower case, and whether the file is gzip-compressed
/// (`train.jsonl.gz` is `("jsonl", true)`), as `datasets` reads compressed files.
fn format_of(path: &Path) -> (String, bool) {
    let ext = |p: &Path| {
        p.extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .unwrap_or_default()
    };
    match ext(path).as_str() {
        "gz" => (ext(Path::new(path.file_stem().unwrap_or_default())), true),
        outer => (outer.to_string(), false),
    }
}

/// A data path as a local one: `hf://datasets/ORG/NAME[@REVISION]/PATH` downloaded into the
/// Hugging Face cache (see `whet_hub::data_path`); any other path as it is.
pub fn resolve(path: &Path) -> Result<PathBuf> {
    let text = path.to_string_lossy();
    if !whet_hub::DataUri::is_hf(&text) {
        return Ok(path.to_path_buf());
    }
    whet_hub::data_path(&text, &is_data_file).map_err(|e| DataError::Format {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// The files a data path names: itself; every data file under a folder (recursively, in name
/// order); or a glob's matches (`*` inside one folder, `**` across them), as `datasets`'
/// `data_files` and pandas take them.
fn data_files(path: &Path) -> Result<Vec<PathBuf>> {
    let text = path.to_string_lossy();
    let mut files = if path.is_dir() {
        let mut out = Vec::new();
        let mut stack = vec![path.to_path_buf()];
        while let Some(dir) = stack.pop() {
            let entries = std::fs::read_dir(&dir).map_err(|e| DataError::Io {
                path: dir.clone(),
                source: e,
            })?;
            for e in entries.flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if p
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(is_data_file)
                {
                    out.push(p);
                }
            }
        }
        out
    } else if !path.exists() && text.contains(['*', '?', '[']) {
        let bad = |message: String| DataError::Format {
            path: path.to_path_buf(),
            message,
        };
        let options = glob::MatchOptions {
            case_sensitive: true,
            require_literal_separator: true,
            require_literal_leading_dot: false,
        };
        glob::glob_with(&text, options)
            .map_err(|e| bad(format!("bad glob pattern: {e}")))?
            .filter_map(|p| p.ok())
            .filter(|p| p.is_file())
            .collect()
    } else {
        return Ok(vec![path.to_path_buf()]);
    };
    files.sort();
    if files.is_empty() {
        return Err(DataError::Format {
            path: path.to_path_buf(),
            message: format!(
                "no data file matches (whet reads .{})",
                DATA_EXTENSIONS.join(", .")
            ),
        });
    }
    let kind = |p: &PathBuf| match format_of(p).0.as_str() {
        "json" | "jsonl" | "ndjson" => "json".to_string(),
        "text" => "txt".to_string(),
        e => e.to_string(),
    };
    if let Some(other) = files.iter().find(|f| kind(f) != kind(&files[0])) {
        return Err(DataError::Format {
            path: path.to_path_buf(),
            message: format!(
                "its files are of several formats ({} and {}); name one with a glob such as *.{}",
                files[0].display(),
                other.display(),
                kind(&files[0])
            ),
        });
    }
    Ok(files)
}

/// The split a data file belongs to, from its path below the data folder, as `datasets` names
/// splits from file and folder names: a keyword between separators (`-`, `.`, `_`, a space,
/// digits, `/`): train / training; validation / valid / val / dev; test / testing / eval /
/// evaluation.
pub fn split_of(relative: &str) -> Option<&'static str> {
    relative
        .to_ascii_lowercase()
        .split(|c: char| matches!(c, '-' | '.' | '_' | ' ' | '/' | '\\') || c.is_ascii_digit())
        .find_map(|word| match word {
            "train" | "training" => Some("train"),
            "validation" | "valid" | "val" | "dev" => Some("validation"),
            "test" | "testing" | "eval" | "evaluation" => Some("test"),
            _ => None,
        })
}

/// The folder a data path's files are named from: the folder itself, or a glob's directories
/// before its first pattern.
fn data_root(local: &Path) -> PathBuf {
    if local.is_dir() {
        return local.to_path_buf();
    }
    let mut root = PathBuf::new();
    for c in local.components() {
        if c.as_os_str().to_string_lossy().contains(['*', '?', '[']) {
            break;
        }
        root.push(c);
    }
    root
}

/// The files of each split among `files` (paths relative to the data root, `/`-separated), for
/// files whose names say a split; files that say none are left out.
fn files_by_split(local: &Path, files: &[PathBuf]) -> BTreeMap<&'static str, Vec<String>> {
    let root = data_root(local);
    let mut out: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(&root).unwrap_or(f);
        let rel = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy())
            .collect::<Vec<_>>()
            .join("/");
        if let Some(split) = split_of(&rel) {
            out.entry(split).or_default().push(rel);
        }
    }
    out
}

/// For a folder (or `hf://` folder) whose files belong to several splits by their names, a
/// path for each split's files, as `load_dataset` would take them: the file itself, or a glob
/// (`data/train-*.parquet`, `train/*.jsonl`) that matches exactly that split's files. `None`
/// when the path is one file, names no split, or a split's files fit no such glob.
pub fn split_sources(path: &Path) -> Result<Option<BTreeMap<&'static str, String>>> {
    let local = resolve(path)?;
    if !local.is_dir() {
        return Ok(None);
    }
    let files = data_files(&local)?;
    let splits = files_by_split(&local, &files);
    if splits.len() < 2 || !splits.contains_key("train") {
        return Ok(None);
    }
    let all: Vec<String> = files
        .iter()
        .map(|f| {
            f.strip_prefix(&local)
                .unwrap_or(f)
                .components()
                .map(|c| c.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/")
        })
        .collect();
    let base = path.to_string_lossy().trim_end_matches('/').to_string();
    let mut out = BTreeMap::new();
    for (split, fs) in &splits {
        let Some(glob) = split_glob(fs, &all) else {
            return Ok(None);
        };
        out.insert(*split, format!("{base}/{glob}"));
    }
    Ok(Some(out))
}

/// A relative path or glob that matches exactly `files` among `all`: the one file; files in one
/// folder whose names start alike up to the split's keyword (`train-*.parquet`); or every file
/// of a folder named for the split (`train/*.jsonl`).
fn split_glob(files: &[String], all: &[String]) -> Option<String> {
    if let [one] = files {
        return Some(one.clone());
    }
    let (dir, _) = files[0].rsplit_once('/').unwrap_or(("", &files[0]));
    let suffix = |f: &str| {
        let name = f.rsplit('/').next().unwrap_or(f);
        match name.find('.') {
            Some(i) => name[i..].to_string(),
            None => String::new(),
        }
    };
    let ext = suffix(&files[0]);
    let prefix = |d: &str| {
        if d.is_empty() {
            String::new()
        } else {
            format!("{d}/")
        }
    };
    let name = files[0].rsplit('/').next().unwrap_or(&files[0]);
    // The name up to the end of its split keyword: "train-00000-of-00002.parquet" -> "train".
    let lower = name.to_ascii_lowercase();
    let keyword_end = [
        "training",
        "train",
        "validation",
        "valid",
        "val",
        "dev",
        "testing",
        "test",
        "evaluation",
        "eval",
    ]
    .iter()
    .filter_map(|k| lower.find(k).map(|i| i + k.len()))
    .min();
    let mut candidates = vec![];
    if let Some(end) = keyword_end {
        candidates.push(format!("{}{}*{ext}", prefix(dir), &name[..end]));
    }
    if split_of(dir).is_some() {
        candidates.push(format!("{}*{ext}", prefix(dir)));
        candidates.push(format!("{}**/*{ext}", prefix(dir)));
    }
    let options = glob::MatchOptions {
        case_sensitive: true,
        require_literal_separator: true,
        require_literal_leading_dot: false,
    };
    candidates.into_iter().find(|g| {
        glob::Pattern::new(g).is_ok_and(|p| {
            let matched: Vec<&String> = all.iter().filter(|f| p.matches_with(f, options)).collect();
            matched.len() == files.len() && files.iter().all(|f| matched.contains(&f))
        })
    })
}

impl Table {
    /// Reads a `.jsonl` / `.json` (one object per line, or one JSON array of objects, as
    /// `datasets`' `json` loader reads both), `.csv` / `.tsv`, `.parquet` or `.txt` file. For
    /// Parquet the "line" of a row is its 1-based row number. A text file gives one
    /// row per non-empty line in a `text` column, as `datasets`' `text` loader does.
    ///
    /// The path may also be a folder (every data file under it) or a glob of files of one
    /// format, read in name order into one table whose columns are their union; and
    /// `hf://datasets/ORG/NAME[@REVISION]/PATH` for any of these on the Hugging Face Hub.
    ///
    /// Files of several splits, as `datasets` names them ([`split_of`]: `train-*.parquet` beside
    /// `test-*.parquet`), are refused rather than read as one table: `load_dataset` keeps them
    /// apart, and a test split read into training is a leak nobody asked for.
    pub fn read(path: &Path, encoding: Encoding) -> Result<Self> {
        let local = resolve(path)?;
        let files = data_files(&local)?;
        if files.len() == 1 && files[0] == local {
            return Self::read_file(&local, encoding);
        }
        let splits = files_by_split(&local, &files);
        if splits.len() > 1 {
            let names = |fs: &[String]| match fs {
                [one] => one.clone(),
                [first, ..] => format!("{first} and {} more", fs.len() - 1),
                [] => String::new(),
            };
            let found: Vec<String> = splits
                .iter()
                .map(|(split, fs)| format!("{split}: {}", names(fs)))
                .collect();
            let suggested: Vec<String> = split_sources(path)?
                .unwrap_or_default()
                .into_iter()
                .map(|(split, source)| format!("{split} = \"{source}\""))
                .collect();
            return Err(DataError::Format {
                path: path.to_path_buf(),
                message: format!(
                    "holds the files of several splits, as datasets names them ({}); whet reads \
                     a folder or glob as one table, so name each split's files{}",
                    found.join("; "),
                    if suggested.is_empty() {
                        " with its own glob".to_string()
                    } else {
                        format!(": {} (`whet init` writes these)", suggested.join(", "))
                    }
                ),
            });
        }
        let mut table = Table {
            path: path.to_path_buf(),
            columns: Vec::new(),
            rows: Vec::new(),
            class_names: BTreeMap::new(),
            parts: Vec::new(),
        };
        let mut offset = 0;
        for file in files {
            let part = Self::read_file(&file, encoding)?;
            for c in part.columns {
                if !table.columns.contains(&c) {
                    table.columns.push(c);
                }
            }
            for (column, names) in part.class_names {
                table.class_names.entry(column).or_insert(names);
            }
            let last = part.rows.last().map(|r| r.0).unwrap_or(0);
            table.rows.extend(
                part.rows
                    .into_iter()
                    .map(|(line, row)| (offset + line, row)),
            );
            table.parts.push((offset, file));
            offset += last;
        }
        Ok(table)
    }

    /// The same source with other rows, each keeping the line it came from (a flattened or
    /// reshaped reading of the same files).
    pub fn with_rows(
        &self,
        columns: Vec<String>,
        rows: Vec<(usize, BTreeMap<String, Value>)>,
    ) -> Table {
        Table {
            path: self.path.clone(),
            columns,
            rows,
            class_names: BTreeMap::new(),
            parts: self.parts.clone(),
        }
    }

    /// The file a row's line is in, and its line there.
    pub fn locate(&self, line: usize) -> (PathBuf, usize) {
        match self.parts.iter().rev().find(|(offset, _)| *offset < line) {
            Some((offset, file)) => (file.clone(), line - offset),
            None => (self.path.clone(), line),
        }
    }

    /// `FILE:LINE` of a row's line.
    pub fn origin(&self, line: usize) -> String {
        let (file, line) = self.locate(line);
        format!("{}:{line}", file.display())
    }

    fn read_file(path: &Path, encoding: Encoding) -> Result<Self> {
        let (ext, gzip) = format_of(path);
        let mut bytes = std::fs::read(path).map_err(|e| DataError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        if gzip {
            if ext == "parquet" {
                return Err(DataError::Format {
                    path: path.to_path_buf(),
                    message: "a gzip-compressed Parquet file: Parquet compresses its own pages; \
                              decompress it (gunzip) first"
                        .into(),
                });
            }
            bytes = gunzip(path, &bytes)?;
        }
        let table = match ext.as_str() {
            "jsonl" | "json" | "ndjson" => read_json(path, &bytes)?,
            "csv" => read_csv(path, &bytes, b',', encoding)?,
            "tsv" => read_csv(path, &bytes, b'\t', encoding)?,
            "parquet" => read_parquet(path, bytes)?,
            "txt" | "text" => read_text(path, &bytes, encoding)?,
            other @ ("bz2" | "xz" | "zst" | "zstd" | "lz4" | "zip" | "7z") => {
                return Err(DataError::Format {
                    path: path.to_path_buf(),
                    message: format!(
                        "a .{other} archive: whet reads data files as they are or gzip-compressed \
                         (.gz); decompress it first"
                    ),
                });
            }
            other => {
                return Err(DataError::Format {
                    path: path.to_path_buf(),
                    message: format!(
                        "unknown data file extension {other:?} (use .jsonl, .json, .csv, .tsv, \
                         .parquet or .txt, each also as .gz)"
                    ),
                });
            }
        };
        if table.rows.is_empty() {
            return Err(DataError::Empty {
                path: path.to_path_buf(),
            });
        }
        Ok(table)
    }

    /// Checks that every column in `names` exists.
    pub fn require(&self, names: &[&str]) -> Result<()> {
        for name in names {
            if !self.columns.iter().any(|c| c == name) {
                return Err(DataError::MissingColumn {
                    path: self.path.clone(),
                    column: name.to_string(),
                    available: self.columns.join(", "),
                });
            }
        }
        Ok(())
    }
}

/// The bytes of a gzip file (several members read as one, as `gzip -d` does).
fn gunzip(path: &Path, bytes: &[u8]) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(bytes)
        .read_to_end(&mut out)
        .map_err(|e| DataError::Format {
            path: path.to_path_buf(),
            message: format!("not a readable gzip file: {e}"),
        })?;
    Ok(out)
}

fn utf8_line(path: &Path, line: usize, bytes: &[u8]) -> Result<String> {
    String::from_utf8(bytes.to_vec()).map_err(|e| DataError::Decode {
        path: path.to_path_buf(),
        line,
        message: format!(
            "{e}; if the file is not UTF-8, set the data encoding (e.g. encoding = \"latin-1\")"
        ),
    })
}

/// One row per non-empty line, in a `text` column.
fn read_text(path: &Path, bytes: &[u8], encoding: Encoding) -> Result<Table> {
    let mut rows = Vec::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let line = match encoding {
            Encoding::Utf8 => utf8_line(path, i + 1, raw)?,
            Encoding::Latin1 => raw.iter().map(|&b| b as char).collect(),
        };
        if !line.trim().is_empty() {
            rows.push((
                i + 1,
                BTreeMap::from([("text".to_string(), Value::String(line))]),
            ));
        }
    }
    Ok(Table {
        path: path.to_path_buf(),
        columns: vec!["text".into()],
        rows,
        class_names: BTreeMap::new(),
        parts: Vec::new(),
    })
}

/// JSON rows as `datasets`' `json` loader takes them: JSON Lines, or one JSON array of objects
/// (`alpaca_data.json`); also one object holding its rows as an array under `data`, the layout
/// of the Hugging Face examples' JSON files (run_qa.py's `field="data"`, SQuAD's own files).
/// Another object is refused, naming its fields, where `datasets` asks for `field=`.
fn read_json(path: &Path, bytes: &[u8]) -> Result<Table> {
    // A byte-order mark (files saved by Windows editors) is not part of the JSON.
    let body = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'[') {
        let items: Vec<Value> = serde_json::from_slice(body).map_err(|e| DataError::Json {
            path: path.to_path_buf(),
            line: e.line(),
            message: e.to_string(),
        })?;
        return json_rows(path, items, element_lines(body, None));
    }
    read_jsonl(path, body).or_else(|e| {
        let Ok(Value::Object(mut fields)) = serde_json::from_slice::<Value>(body) else {
            return Err(e);
        };
        if let Some(Value::Array(items)) = fields.remove("data") {
            return json_rows(path, items, element_lines(body, Some("data")));
        }
        Err(DataError::Format {
            path: path.to_path_buf(),
            message: format!(
                "the file is one JSON object (fields: {}), not rows: whet reads JSON Lines (an \
                 object a line), a JSON array of objects, or an object holding them under \
                 \"data\"; write the rows out, e.g. `jq -c '.FIELD[]' FILE > rows.jsonl`",
                fields.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        })
    })
}

/// Rows from a JSON array's elements, each an object. A row's "line" is the line its object
/// starts on (`starts`), or, where several start on one line (a compact array), its 1-based
/// place in the array.
fn json_rows(path: &Path, items: Vec<Value>, starts: Vec<usize>) -> Result<Table> {
    let distinct = starts.len() == items.len() && starts.windows(2).all(|w| w[0] < w[1]);
    let mut rows = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let line = if distinct { starts[i] } else { i + 1 };
        let Value::Object(obj) = item else {
            return Err(DataError::Json {
                path: path.to_path_buf(),
                line,
                message: format!("element {} of the array is not a JSON object", i + 1),
            });
        };
        rows.push((line, obj));
    }
    Ok(object_table(path, rows))
}

/// A table of JSON objects: the columns are their keys in order of first appearance.
fn object_table(path: &Path, objects: Vec<(usize, serde_json::Map<String, Value>)>) -> Table {
    let mut columns: Vec<String> = Vec::new();
    let mut rows = Vec::with_capacity(objects.len());
    for (line, obj) in objects {
        for k in obj.keys() {
            if !columns.contains(k) {
                columns.push(k.clone());
            }
        }
        rows.push((line, obj.into_iter().collect()));
    }
    Table {
        path: path.to_path_buf(),
        columns,
        rows,
        class_names: BTreeMap::new(),
        parts: Vec::new(),
    }
}

/// The 1-based line each element of a JSON array starts on: the top-level array, or (`field`)
/// the array under that key of the top-level object. serde_json keeps no positions in a parsed
/// value, so this scans the text (strings and nesting) once, up to the array's end.
fn element_lines(body: &[u8], field: Option<&str>) -> Vec<usize> {
    let (mut line, mut depth) = (1, 0usize);
    let (mut in_string, mut escaped, mut expecting) = (false, false, false);
    // The depth inside the array whose elements are counted, once it has opened.
    let mut target: Option<usize> = None;
    // The top-level object's key being read, and whether its value has begun.
    let (mut string_start, mut key, mut after_colon) = (0, None::<&[u8]>, false);
    let mut starts = vec![];
    for (i, &b) in body.iter().enumerate() {
        if b == b'\n' {
            line += 1;
        }
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => {
                    in_string = false;
                    if depth == 1 && !after_colon {
                        key = Some(&body[string_start..i]);
                    }
                }
                _ => {}
            }
            continue;
        }
        if b.is_ascii_whitespace() {
            continue;
        }
        if target == Some(depth) && expecting && b != b']' {
            starts.push(line);
            expecting = false;
        }
        match b {
            b'"' => {
                in_string = true;
                string_start = i + 1;
            }
            b'[' | b'{' => {
                let opens = target.is_none()
                    && b == b'['
                    && match field {
                        None => depth == 0,
                        Some(f) => depth == 1 && after_colon && key == Some(f.as_bytes()),
                    };
                depth += 1;
                if opens {
                    target = Some(depth);
                    expecting = true;
                }
            }
            // The counted array closes: nothing after it matters.
            b']' if target == Some(depth) => break,
            b']' | b'}' => depth = depth.saturating_sub(1),
            b',' if target == Some(depth) => expecting = true,
            b',' if depth == 1 => (key, after_colon) = (None, false),
            b':' if depth == 1 => after_colon = true,
            _ => {}
        }
    }
    starts
}

fn read_jsonl(path: &Path, bytes: &[u8]) -> Result<Table> {
    let mut rows = Vec::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = i + 1;
        let text = utf8_line(path, line, raw)?;
        if text.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(&text).map_err(|e| DataError::Json {
            path: path.to_path_buf(),
            line,
            message: e.to_string(),
        })?;
        let Value::Object(obj) = value else {
            return Err(DataError::Json {
                path: path.to_path_buf(),
                line,
                message: "each line must be a JSON object".into(),
            });
        };
        rows.push((line, obj));
    }
    Ok(object_table(path, rows))
}

fn read_csv(path: &Path, bytes: &[u8], delimiter: u8, encoding: Encoding) -> Result<Table> {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .flexible(false)
        .from_reader(bytes);
    let decode = |line: usize, field: &[u8]| -> Result<String> {
        match encoding {
            Encoding::Utf8 => utf8_line(path, line, field),
            Encoding::Latin1 => Ok(field.iter().map(|&b| b as char).collect()),
        }
    };
    let csv_err = |e: csv::Error| {
        let line = e.position().map(|p| p.line() as usize).unwrap_or(0);
        DataError::Csv {
            path: path.to_path_buf(),
            line,
            message: e.to_string(),
        }
    };
    let header = reader.byte_headers().map_err(csv_err)?.clone();
    let columns: Vec<String> = header
        .iter()
        .map(|h| decode(1, h).map(|s| s.trim_start_matches('\u{feff}').to_string()))
        .collect::<Result<_>>()?;
    let mut rows = Vec::new();
    for record in reader.byte_records() {
        let record = record.map_err(csv_err)?;
        let line = record.position().map(|p| p.line() as usize).unwrap_or(0);
        let mut row = BTreeMap::new();
        for (name, field) in columns.iter().zip(record.iter()) {
            row.insert(name.clone(), Value::String(decode(line, field)?));
        }
        rows.push((line, row));
    }
    Ok(Table {
        path: path.to_path_buf(),
        columns,
        rows,
        class_names: BTreeMap::new(),
        parts: Vec::new(),
    })
}

/// Parquet through the `parquet` crate's row API (no Arrow): every row becomes a JSON object,
/// lists (multi-label columns) become arrays. Text in Parquet is UTF-8 by definition.
///
/// The parquet crate still panics on some corrupt pages where it should return an error
/// (apache/arrow-rs#9742; fuzzing found out-of-range slices in its bit reader and assertions
/// in its dictionary and record decoders): such a panic is caught and becomes the file's
/// [`DataError::Format`], so a damaged file is an error naming it, not a crash (the panic
/// hook still prints the crate's message first).
fn read_parquet(path: &Path, bytes: Vec<u8>) -> Result<Table> {
    std::panic::catch_unwind(|| parquet_rows(path, bytes)).unwrap_or_else(|panic| {
        let why = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("no message");
        Err(DataError::Format {
            path: path.to_path_buf(),
            message: format!("not a readable Parquet file: the parquet reader failed ({why})"),
        })
    })
}

fn parquet_rows(path: &Path, bytes: Vec<u8>) -> Result<Table> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let format = |e: parquet::errors::ParquetError| DataError::Format {
        path: path.to_path_buf(),
        message: format!("not a readable Parquet file: {e}"),
    };
    let file_len = bytes.len() as u64;
    let reader = SerializedFileReader::new(bytes::Bytes::from(bytes)).map_err(format)?;
    // The row API trusts each column chunk's byte range (`ColumnChunkMetaData::byte_range`
    // panics on a negative offset or size): check every one against the file first.
    for (g, group) in reader.metadata().row_groups().iter().enumerate() {
        for column in group.columns() {
            let start = column
                .dictionary_page_offset()
                .unwrap_or(column.data_page_offset());
            let len = column.compressed_size();
            let end = u64::try_from(start)
                .ok()
                .zip(u64::try_from(len).ok())
                .and_then(|(start, len)| start.checked_add(len));
            if end.is_none_or(|end| end > file_len) {
                return Err(DataError::Format {
                    path: path.to_path_buf(),
                    message: format!(
                        "not a readable Parquet file: column {} of row group {} claims {len} \
                         bytes at offset {start}, outside the file's {file_len} bytes",
                        column.column_path(),
                        g + 1
                    ),
                });
            }
        }
    }
    let columns: Vec<String> = reader
        .metadata()
        .file_metadata()
        .schema_descr()
        .root_schema()
        .get_fields()
        .iter()
        .map(|f| f.name().to_string())
        .collect();
    let mut rows = Vec::new();
    for (i, row) in reader.get_row_iter(None).map_err(format)?.enumerate() {
        let row = row.map_err(|e| DataError::Format {
            path: path.to_path_buf(),
            message: format!("row {}: {e}", i + 1),
        })?;
        let map = row
            .get_column_iter()
            .map(|(name, field)| (name.clone(), field.to_json_value()))
            .collect();
        rows.push((i + 1, map));
    }
    Ok(Table {
        path: path.to_path_buf(),
        columns,
        rows,
        class_names: class_labels(reader.metadata().file_metadata()),
        parts: Vec::new(),
    })
}

/// The names of the `ClassLabel` columns (and lists of them) that `datasets` records in a
/// Parquet file's `huggingface` schema metadata: `{"info": {"features": {"label": {"names":
/// [...], "_type": "ClassLabel"}, "tags": {"feature": {...ClassLabel}, "_type": "List"}}}}`.
/// Metadata that is absent or not of this shape names nothing.
fn class_labels(meta: &parquet::file::metadata::FileMetaData) -> BTreeMap<String, Vec<String>> {
    let json = meta
        .key_value_metadata()
        .and_then(|kv| kv.iter().find(|k| k.key == "huggingface"))
        .and_then(|k| k.value.as_deref())
        .and_then(|v| serde_json::from_str::<Value>(v).ok());
    let Some(Value::Object(features)) = json.map(|j| j["info"]["features"].clone()) else {
        return BTreeMap::new();
    };
    features
        .into_iter()
        .filter_map(|(column, feature)| {
            // A list of class labels keeps its ClassLabel under "feature".
            let label = match feature.get("feature") {
                Some(inner) => inner,
                None => &feature,
            };
            if label["_type"] != "ClassLabel" {
                return None;
            }
            let names = label["names"]
                .as_array()?
                .iter()
                .map(|n| n.as_str().map(String::from))
                .collect::<Option<Vec<_>>>()?;
            Some((column, names))
        })
        .collect()
}
