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

/// A file's rows: each a map from column name to value, with the 1-based line it came from.
#[derive(Debug, Clone)]
pub struct Table {
    /// Source file.
    pub path: PathBuf,
    /// Column names in file order (JSONL: the union of keys, in order of first appearance).
    pub columns: Vec<String>,
    /// `(line, row)`
    pub rows: Vec<(usize, BTreeMap<String, Value>)>,
}

impl Table {
    /// Reads a `.jsonl` / `.json` (one object per line), `.csv` / `.tsv`, `.parquet` or `.txt`
    /// file. For Parquet the "line" of a row is its 1-based row number. A text file gives one
    /// row per non-empty line in a `text` column, as `datasets`' `text` loader does.
    pub fn read(path: &Path, encoding: Encoding) -> Result<Self> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or_default()
            .to_ascii_lowercase();
        let bytes = std::fs::read(path).map_err(|e| DataError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        let table = match ext.as_str() {
            "jsonl" | "json" | "ndjson" => read_jsonl(path, &bytes)?,
            "csv" => read_csv(path, &bytes, b',', encoding)?,
            "tsv" => read_csv(path, &bytes, b'\t', encoding)?,
            "parquet" => read_parquet(path, bytes)?,
            "txt" | "text" => read_text(path, &bytes, encoding)?,
            other => {
                return Err(DataError::Format {
                    path: path.to_path_buf(),
                    message: format!(
                        "unknown data file extension {other:?} (use .jsonl, .csv, .tsv, .parquet or .txt)"
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
    })
}

fn read_jsonl(path: &Path, bytes: &[u8]) -> Result<Table> {
    let mut columns: Vec<String> = Vec::new();
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
        for k in obj.keys() {
            if !columns.contains(k) {
                columns.push(k.clone());
            }
        }
        rows.push((line, obj.into_iter().collect()));
    }
    Ok(Table {
        path: path.to_path_buf(),
        columns,
        rows,
    })
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
    })
}
