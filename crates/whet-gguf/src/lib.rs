//! A reader for GGUF, the file format of llama.cpp / ggml
//! (spec: <https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>).
//!
//! It parses the header, the metadata key-value pairs and the tensor index, and dequantises the
//! ggml block formats used by published checkpoints (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1,
//! Q8_0, Q4_K, Q5_K, Q6_K) to f32, matching `gguf.quants.dequantize` of the reference `gguf`
//! Python package bit for bit.
//!
//! Written here rather than taken from a crate: the maintained Rust GGUF readers either come
//! inside a whole tensor framework (candle, llama.cpp bindings) or parse the container without
//! dequantising K-quants; this file needs neither a framework nor unsafe code beyond the mmap.

pub mod writer;

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};

/// What can go wrong reading a GGUF file. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file cannot be opened or mapped.
    #[error("cannot read GGUF file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file does not start with the GGUF magic.
    #[error("{path} is not a GGUF file (magic {found:?}, expected \"GGUF\")")]
    BadMagic { path: PathBuf, found: [u8; 4] },
    /// The version is not 2 or 3.
    #[error("{path}: GGUF version {version} is not supported (2 and 3 are)")]
    Version { path: PathBuf, version: u32 },
    /// The file ends before a structure it announces.
    #[error("{path} is truncated: {what} needs bytes {start}..{end} but the file has {len}")]
    Truncated {
        path: PathBuf,
        what: String,
        start: u64,
        end: u64,
        len: u64,
    },
    /// A structural value is invalid (unknown value type, bad UTF-8, ...).
    #[error("{path}: malformed {what}: {message}")]
    Malformed {
        path: PathBuf,
        what: String,
        message: String,
    },
    /// A tensor uses a ggml type this reader cannot dequantise.
    #[error(
        "{path}: tensor {tensor} has ggml type {ty}, which whet cannot dequantise (supported: {supported})"
    )]
    UnsupportedType {
        path: PathBuf,
        tensor: String,
        ty: String,
        supported: &'static str,
    },
    /// A metadata key the caller needs is missing or of the wrong type.
    #[error("{path}: metadata key {key}: {message}")]
    Metadata {
        path: PathBuf,
        key: String,
        message: String,
    },
}

type Result<T> = std::result::Result<T, GgufError>;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// The value as an unsigned integer, if it is any integer type that fits.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    /// The value as a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The value as an array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    fn short(&self) -> String {
        match self {
            Value::String(s) if s.len() > 60 => format!("{:?}…", &s[..s.floor_char_boundary(60)]),
            Value::String(s) => format!("{s:?}"),
            Value::Array(a) => format!("[{} items]", a.len()),
            other => format!("{other:?}"),
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.short())
    }
}

/// A ggml tensor type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
    /// Any other type id (readable in the index, not dequantisable).
    Other(u32),
}

const SUPPORTED: &str = "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K";

impl GgmlType {
    fn from_id(id: u32) -> Self {
        match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            12 => Self::Q4K,
            13 => Self::Q5K,
            14 => Self::Q6K,
            30 => Self::BF16,
            other => Self::Other(other),
        }
    }

    /// `(elements per block, bytes per block)`, None for unknown types.
    pub fn block(self) -> Option<(usize, usize)> {
        Some(match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::BF16 => (1, 2),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q5_0 => (32, 22),
            Self::Q5_1 => (32, 24),
            Self::Q8_0 => (32, 34),
            Self::Q4K => (256, 144),
            Self::Q5K => (256, 176),
            Self::Q6K => (256, 210),
            Self::Other(_) => return None,
        })
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q5_0 => "Q5_0",
            Self::Q5_1 => "Q5_1",
            Self::Q8_0 => "Q8_0",
            Self::Q4K => "Q4_K",
            Self::Q5K => "Q5_K",
            Self::Q6K => "Q6_K",
            Self::Other(id) => return write!(f, "type id {id}"),
        };
        f.write_str(s)
    }
}

/// One entry of the tensor index.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// ggml name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions in ggml order: `dims[0]` is the innermost (fastest-varying) one.
    pub dims: Vec<u64>,
    /// Storage type.
    pub ty: GgmlType,
    /// Byte offset of the data from the start of the file.
    pub offset: u64,
}

impl TensorInfo {
    /// Element count.
    pub fn numel(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Dimensions in row-major (PyTorch / numpy) order: the reverse of ggml's.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// A memory-mapped GGUF file.
pub struct GgufFile {
    path: PathBuf,
    map: memmap2::Mmap,
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata in key order.
    pub metadata: BTreeMap<String, Value>,
    /// The tensor index in file order.
    pub tensors: Vec<TensorInfo>,
}

/// How deep arrays may nest in metadata. The reader recurses per level, so a file must not
/// choose the depth (ggml's own reader accepts no nested arrays at all).
const MAX_ARRAY_DEPTH: usize = 8;

/// The fewest bytes a metadata value of type `ty` takes (a string or an array: its length
/// fields); None for an unknown type.
fn encoded_size(ty: u32) -> Option<usize> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        9 => 12,
        _ => return None,
    })
}

/// The fewest bytes an entry of the tensor index takes: name length, rank, type, offset.
const MIN_TENSOR_INFO: usize = 8 + 4 + 4 + 8;

struct Cursor<'a> {
    path: &'a Path,
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        match end {
            Some(end) => {
                let s = &self.bytes[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(GgufError::Truncated {
                path: self.path.to_path_buf(),
                what: what.to_string(),
                start: self.pos as u64,
                end: self.pos as u64 + n as u64,
                len: self.bytes.len() as u64,
            }),
        }
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn len(&mut self, what: &str) -> Result<usize> {
        let n = self.u64(what)?;
        // A length beyond the file is a truncation (or garbage), not an allocation to attempt.
        if n > self.bytes.len() as u64 {
            return Err(GgufError::Truncated {
                path: self.path.to_path_buf(),
                what: format!("{what} (declared length {n})"),
                start: self.pos as u64,
                end: (self.pos as u64).saturating_add(n),
                len: self.bytes.len() as u64,
            });
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.len(what)?;
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|e| GgufError::Malformed {
            path: self.path.to_path_buf(),
            what: what.to_string(),
            message: format!("invalid UTF-8: {e}"),
        })
    }

    /// A value of type `ty`; `depth` counts the arrays it sits in.
    fn value(&mut self, ty: u32, what: &str, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>(what)?[0]),
            1 => Value::I8(self.array::<1>(what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            7 => Value::Bool(self.array::<1>(what)?[0] != 0),
            8 => Value::String(self.string(what)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(GgufError::Malformed {
                        path: self.path.to_path_buf(),
                        what: what.to_string(),
                        message: format!("arrays nested more than {MAX_ARRAY_DEPTH} deep"),
                    });
                }
                let inner = self.u32(what)?;
                let n = self.len(what)?;
                // Room for as many elements as the rest of the file can hold, not for as many
                // as the count claims: a count may be garbage.
                let fits =
                    encoded_size(inner).map_or(0, |size| (self.bytes.len() - self.pos) / size);
                let mut v = Vec::with_capacity(n.min(fits));
                for _ in 0..n {
                    v.push(self.value(inner, what, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            other => {
                return Err(GgufError::Malformed {
                    path: self.path.to_path_buf(),
                    what: what.to_string(),
                    message: format!("unknown metadata value type {other}"),
                });
            }
        })
    }
}

impl GgufFile {
    /// Opens and indexes a GGUF file; tensor data is read lazily from the mapping.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let io = |source| GgufError::Io {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(io)?;
        // SAFETY: read-only mapping of a file whet does not modify while it is open.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        let mut c = Cursor {
            path: &path,
            bytes: &map[..],
            pos: 0,
        };
        let magic: [u8; 4] = c.array("magic")?;
        if &magic != b"GGUF" {
            return Err(GgufError::BadMagic {
                path: path.clone(),
                found: magic,
            });
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::Version {
                path: path.clone(),
                version,
            });
        }
        let n_tensors = c.len("tensor count")?;
        let n_kv = c.len("metadata count")?;
        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = c.string(&format!("metadata key #{i}"))?;
            let ty = c.u32(&format!("type of metadata {key}"))?;
            let value = c.value(ty, &format!("metadata {key}"), 0)?;
            metadata.insert(key, value);
        }
        let mut tensors = Vec::with_capacity(n_tensors.min((map.len() - c.pos) / MIN_TENSOR_INFO));
        for i in 0..n_tensors {
            let name = c.string(&format!("name of tensor #{i}"))?;
            let n_dims = c.u32(&format!("rank of tensor {name}"))?;
            if n_dims > 8 {
                return Err(GgufError::Malformed {
                    path: path.clone(),
                    what: format!("tensor {name}"),
                    message: format!("rank {n_dims} (at most 8 expected)"),
                });
            }
            let dims = (0..n_dims)
                .map(|_| c.u64(&format!("dims of tensor {name}")))
                .collect::<Result<Vec<_>>>()?;
            // Validated once here, so `numel` never overflows.
            if dims
                .iter()
                .try_fold(1u64, |n, &d| n.checked_mul(d))
                .is_none()
            {
                return Err(GgufError::Malformed {
                    path: path.clone(),
                    what: format!("tensor {name}"),
                    message: format!("dimensions {dims:?} hold more than 2^64 elements"),
                });
            }
            let ty = GgmlType::from_id(c.u32(&format!("type of tensor {name}"))?);
            let offset = c.u64(&format!("offset of tensor {name}"))?;
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset,
            });
        }
        let alignment = metadata
            .get("general.alignment")
            .and_then(Value::as_u64)
            .unwrap_or(32)
            .max(1);
        let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
        for t in &mut tensors {
            let beyond = |t: &TensorInfo, message: String| GgufError::Malformed {
                path: path.clone(),
                what: format!("data of tensor {}", t.name),
                message,
            };
            t.offset = t
                .offset
                .checked_add(data_start)
                .ok_or_else(|| beyond(t, format!("offset {} lies beyond any file", t.offset)))?;
            if let Some((per, bytes)) = t.ty.block() {
                let size = t.numel().div_ceil(per as u64).checked_mul(bytes as u64);
                let Some(end) = size.and_then(|size| t.offset.checked_add(size)) else {
                    return Err(beyond(
                        t,
                        format!(
                            "{} {} values at offset {} end beyond any file",
                            t.numel(),
                            t.ty,
                            t.offset
                        ),
                    ));
                };
                if end > map.len() as u64 {
                    return Err(GgufError::Truncated {
                        path: path.clone(),
                        what: format!("data of tensor {}", t.name),
                        start: t.offset,
                        end,
                        len: map.len() as u64,
                    });
                }
            }
        }
        Ok(Self {
            path,
            map,
            version,
            metadata,
            tensors,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Index entry of the tensor `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    fn missing(&self, key: &str, message: &str) -> GgufError {
        GgufError::Metadata {
            path: self.path.clone(),
            key: key.to_string(),
            message: message.to_string(),
        }
    }

    /// A required unsigned integer.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        self.get(key)
            .ok_or_else(|| self.missing(key, "missing"))?
            .as_u64()
            .ok_or_else(|| self.missing(key, "not an unsigned integer"))
    }

    /// A required float.
    pub fn get_f64(&self, key: &str) -> Result<f64> {
        self.get(key)
            .ok_or_else(|| self.missing(key, "missing"))?
            .as_f64()
            .ok_or_else(|| self.missing(key, "not a number"))
    }

    /// A required string.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        self.get(key)
            .ok_or_else(|| self.missing(key, "missing"))?
            .as_str()
            .ok_or_else(|| self.missing(key, "not a string"))
    }

    /// A required array of strings.
    pub fn get_strings(&self, key: &str) -> Result<Vec<&str>> {
        let arr = self
            .get(key)
            .ok_or_else(|| self.missing(key, "missing"))?
            .as_array()
            .ok_or_else(|| self.missing(key, "not an array"))?;
        arr.iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| self.missing(key, "not an array of strings"))
            })
            .collect()
    }

    /// The raw stored bytes of a tensor.
    pub fn raw(&self, t: &TensorInfo) -> Result<&[u8]> {
        let (per, bytes) = t.ty.block().ok_or_else(|| self.unsupported(t))?;
        let size = (t.numel().div_ceil(per as u64) * bytes as u64) as usize;
        let start = t.offset as usize;
        Ok(&self.map[start..start + size])
    }

    fn unsupported(&self, t: &TensorInfo) -> GgufError {
        GgufError::UnsupportedType {
            path: self.path.clone(),
            tensor: t.name.clone(),
            ty: t.ty.to_string(),
            supported: SUPPORTED,
        }
    }

    /// Dequantises a tensor to f32 in storage (row-major, [`TensorInfo::shape`]) order.
    pub fn dequantize(&self, t: &TensorInfo) -> Result<Vec<f32>> {
        let raw = self.raw(t)?;
        let n = t.numel() as usize;
        let (per, _) = t.ty.block().ok_or_else(|| self.unsupported(t))?;
        if !n.is_multiple_of(per) {
            return Err(GgufError::Malformed {
                path: self.path.clone(),
                what: format!("tensor {}", t.name),
                message: format!(
                    "{n} elements is not a multiple of the {} block of {per}",
                    t.ty
                ),
            });
        }
        dequantize(t.ty, raw, n).ok_or_else(|| self.unsupported(t))
    }
}

/// Dequantises `n` values of type `ty` from `raw`; None for an unsupported type.
pub fn dequantize(ty: GgmlType, raw: &[u8], n: usize) -> Option<Vec<f32>> {
    let mut out = vec![0f32; n];
    dequantize_into(ty, raw, &mut out)?;
    Some(out)
}

/// Dequantises `out.len()` values of type `ty` from `raw` into `out`; None for an unsupported
/// type.
pub fn dequantize_into(ty: GgmlType, raw: &[u8], out: &mut [f32]) -> Option<()> {
    let (per, bytes) = ty.block()?;
    let blocks = raw.chunks_exact(bytes).zip(out.chunks_exact_mut(per));
    match ty {
        GgmlType::F32 => {
            blocks.for_each(|(b, y)| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        }
        GgmlType::F16 => blocks.for_each(|(b, y)| y[0] = f16::from_le_bytes([b[0], b[1]]).to_f32()),
        GgmlType::BF16 => {
            blocks.for_each(|(b, y)| y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32())
        }
        GgmlType::Q4_0 => blocks.for_each(|(b, y)| q4_0(b, y)),
        GgmlType::Q4_1 => blocks.for_each(|(b, y)| q4_1(b, y)),
        GgmlType::Q5_0 => blocks.for_each(|(b, y)| q5_0(b, y)),
        GgmlType::Q5_1 => blocks.for_each(|(b, y)| q5_1(b, y)),
        GgmlType::Q8_0 => blocks.for_each(|(b, y)| q8_0(b, y)),
        GgmlType::Q4K => blocks.for_each(|(b, y)| q4_k(b, y)),
        GgmlType::Q5K => blocks.for_each(|(b, y)| q5_k(b, y)),
        GgmlType::Q6K => blocks.for_each(|(b, y)| q6_k(b, y)),
        GgmlType::Other(_) => return None,
    }
    Some(())
}

fn h(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

// Block layouts below follow ggml-quants.c (`dequantize_row_*`).

/// d: f16, qs: 16 bytes of 4-bit values; low nibbles are elements 0..16, high 16..32.
fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = h(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        y[j] = ((qs[j] & 0x0F) as i32 - 8) as f32 * d;
        y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
    }
}

/// d, m: f16; qs as Q4_0; y = q * d + m.
fn q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (h(b, 0), h(b, 2));
    let qs = &b[4..20];
    for j in 0..16 {
        y[j] = (qs[j] & 0x0F) as f32 * d + m;
        y[j + 16] = (qs[j] >> 4) as f32 * d + m;
    }
}

/// d: f16, qh: u32 of fifth bits, qs: 16 bytes of low nibbles; values are signed (-16).
fn q5_0(b: &[u8], y: &mut [f32]) {
    let d = h(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for j in 0..16 {
        let xh0 = (((qh >> j) << 4) & 0x10) as u8;
        let xh1 = ((qh >> (j + 12)) & 0x10) as u8;
        y[j] = (((qs[j] & 0x0F) | xh0) as i32 - 16) as f32 * d;
        y[j + 16] = (((qs[j] >> 4) | xh1) as i32 - 16) as f32 * d;
    }
}

/// d, m: f16, qh: u32, qs: 16 bytes; y = q * d + m.
fn q5_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (h(b, 0), h(b, 2));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for j in 0..16 {
        let xh0 = (((qh >> j) << 4) & 0x10) as u8;
        let xh1 = ((qh >> (j + 12)) & 0x10) as u8;
        y[j] = ((qs[j] & 0x0F) | xh0) as f32 * d + m;
        y[j + 16] = ((qs[j] >> 4) | xh1) as f32 * d + m;
    }
}

/// d: f16, qs: 32 signed bytes.
fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = h(b, 0);
    for j in 0..32 {
        y[j] = (b[2 + j] as i8) as f32 * d;
    }
}

/// The 6-bit scale and min of sub-block `j` packed in the 12 `scales` bytes of Q4_K / Q5_K.
fn scale_min_k4(j: usize, q: &[u8]) -> (f32, f32) {
    if j < 4 {
        ((q[j] & 63) as f32, (q[j + 4] & 63) as f32)
    } else {
        let d = (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4);
        let m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
        (d as f32, m as f32)
    }
}

/// d, dmin: f16, scales: 12 bytes, qs: 128 bytes; 8 sub-blocks of 32 with 6-bit scale/min.
fn q4_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (h(b, 0), h(b, 2));
    let scales = &b[4..16];
    let qs = &b[16..144];
    for (chunk, (q, y)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * chunk, scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let (d1, m1) = (d * sc1, dmin * m1);
        let (d2, m2) = (d * sc2, dmin * m2);
        for l in 0..32 {
            y[l] = d1 * (q[l] & 0x0F) as f32 - m1;
            y[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

/// d, dmin: f16, scales: 12, qh: 32, qs: 128 bytes.
fn q5_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (h(b, 0), h(b, 2));
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for (chunk, (q, y)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * chunk, scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let (d1, m1) = (d * sc1, dmin * m1);
        let (d2, m2) = (d * sc2, dmin * m2);
        let (u1, u2) = (1u8 << (2 * chunk), 2u8 << (2 * chunk));
        for l in 0..32 {
            let hi1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let hi2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            y[l] = d1 * ((q[l] & 0x0F) + hi1) as f32 - m1;
            y[l + 32] = d2 * ((q[l] >> 4) + hi2) as f32 - m2;
        }
    }
}

/// ql: 128, qh: 64, scales: 16 signed bytes, d: f16 (last).
fn q6_k(b: &[u8], y: &mut [f32]) {
    let d = h(b, 208);
    for half in 0..2 {
        let ql = &b[64 * half..64 * half + 64];
        let qh = &b[128 + 32 * half..128 + 32 * half + 32];
        let sc = &b[192 + 8 * half..192 + 8 * half + 8];
        let y = &mut y[128 * half..128 * half + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            let s = |k: usize| (sc[is + k] as i8) as f32;
            y[l] = d * s(0) * q1 as f32;
            y[l + 32] = d * s(2) * q2 as f32;
            y[l + 64] = d * s(4) * q3 as f32;
            y[l + 96] = d * s(6) * q4 as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_block_scales_signed_bytes() {
        let mut b = vec![0u8; 34];
        b[..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        b[2] = 4;
        b[3] = (-6i8) as u8;
        let y = dequantize(GgmlType::Q8_0, &b, 32).unwrap();
        assert_eq!(&y[..3], &[2.0, -3.0, 0.0]);
    }

    #[test]
    fn q4_0_nibble_order_is_low_then_high() {
        let mut b = vec![0u8; 18];
        b[..2].copy_from_slice(&f16::from_f32(1.0).to_le_bytes());
        b[2] = 0x9A; // low nibble 10 -> element 0, high nibble 9 -> element 16
        let y = dequantize(GgmlType::Q4_0, &b, 32).unwrap();
        assert_eq!(y[0], 2.0);
        assert_eq!(y[16], 1.0);
        assert_eq!(y[1], -8.0);
    }
}
