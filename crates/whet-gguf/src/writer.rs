//! Writing GGUF v3 files (the format of ggml's `gguf.h` and Python's `gguf.GGUFWriter`):
//! metadata, a tensor index, and tensor data aligned to 32 bytes; plus the ggml quantisers
//! whet exports with (F16, Q8_0, Q4_0, as `ggml-quants.c`'s reference `quantize_row_*`).

use std::io::Write;
use std::path::Path;

use half::f16;

use crate::{GgmlType, Value};

/// Data alignment (`general.alignment`'s default).
pub const ALIGNMENT: usize = 32;

/// A GGUF file being assembled in memory.
#[derive(Debug, Default)]
pub struct GgufWriter {
    metadata: Vec<(String, Value)>,
    tensors: Vec<(String, Vec<u64>, GgmlType, Vec<u8>)>,
}

fn type_id(ty: GgmlType) -> u32 {
    match ty {
        GgmlType::F32 => 0,
        GgmlType::F16 => 1,
        GgmlType::Q4_0 => 2,
        GgmlType::Q4_1 => 3,
        GgmlType::Q5_0 => 6,
        GgmlType::Q5_1 => 7,
        GgmlType::Q8_0 => 8,
        GgmlType::Q4K => 12,
        GgmlType::Q5K => 13,
        GgmlType::Q6K => 14,
        GgmlType::BF16 => 30,
        GgmlType::Other(id) => id,
    }
}

fn value_type(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.push(*x as u8),
        Value::U16(x) => out.extend(x.to_le_bytes()),
        Value::I16(x) => out.extend(x.to_le_bytes()),
        Value::U32(x) => out.extend(x.to_le_bytes()),
        Value::I32(x) => out.extend(x.to_le_bytes()),
        Value::F32(x) => out.extend(x.to_le_bytes()),
        Value::Bool(x) => out.push(*x as u8),
        Value::String(s) => put_string(out, s),
        Value::Array(items) => {
            // An empty array is written as an array of u8 (its element type is moot).
            let inner = items.first().map(value_type).unwrap_or(0);
            out.extend(inner.to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, item);
            }
        }
        Value::U64(x) => out.extend(x.to_le_bytes()),
        Value::I64(x) => out.extend(x.to_le_bytes()),
        Value::F64(x) => out.extend(x.to_le_bytes()),
    }
}

impl GgufWriter {
    /// An empty file.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a metadata entry.
    pub fn set(&mut self, key: &str, value: Value) {
        self.metadata.retain(|(k, _)| k != key);
        self.metadata.push((key.to_string(), value));
    }

    /// Adds a tensor: its ggml name, its shape in row-major (PyTorch) order and its stored
    /// bytes (see [`encode`]).
    pub fn add_tensor(&mut self, name: &str, shape: &[usize], ty: GgmlType, data: Vec<u8>) {
        // ggml lists dimensions innermost first.
        let dims = shape.iter().rev().map(|&d| d as u64).collect();
        self.tensors.push((name.to_string(), dims, ty, data));
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend(b"GGUF");
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_string(&mut out, k);
            out.extend(value_type(v).to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offset = 0usize;
        for (name, dims, ty, data) in &self.tensors {
            put_string(&mut out, name);
            out.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(type_id(*ty).to_le_bytes());
            out.extend((offset as u64).to_le_bytes());
            offset += data.len().next_multiple_of(ALIGNMENT);
        }
        out.resize(out.len().next_multiple_of(ALIGNMENT), 0);
        for (_, _, _, data) in &self.tensors {
            out.extend(data);
            out.resize(out.len().next_multiple_of(ALIGNMENT), 0);
        }
        out
    }

    /// Writes the file atomically (a temporary beside it, then a rename).
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension(format!("gguf.tmp-{}", std::process::id()));
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&self.to_bytes())?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)
    }
}

/// Encodes row-major f32 values as `ty` (F32, F16, Q8_0 or Q4_0); None for another type or
/// when the values are not whole blocks.
pub fn encode(ty: GgmlType, values: &[f32]) -> Option<Vec<u8>> {
    Some(match ty {
        GgmlType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        GgmlType::F16 => values
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect(),
        GgmlType::Q8_0 if values.len().is_multiple_of(32) => {
            values.chunks(32).flat_map(q8_0_block).collect()
        }
        GgmlType::Q4_0 if values.len().is_multiple_of(32) => {
            values.chunks(32).flat_map(q4_0_block).collect()
        }
        _ => return None,
    })
}

/// `quantize_row_q8_0_ref`: d = amax / 127 (f16), q = round(x / d).
fn q8_0_block(x: &[f32]) -> Vec<u8> {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut out = f16::from_f32(d).to_le_bytes().to_vec();
    out.extend(x.iter().map(|v| ((v * id).round() as i8) as u8));
    out
}

/// `quantize_row_q4_0_ref`: d = max / -8 where max is the value of largest magnitude (f16),
/// q = min(15, trunc(x / d + 8.5)); elements 0..16 in the low nibbles, 16..32 in the high.
fn q4_0_block(x: &[f32]) -> Vec<u8> {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let q = |v: f32| ((v * id + 8.5) as i8).clamp(0, 15) as u8;
    let mut out = f16::from_f32(d).to_le_bytes().to_vec();
    out.extend((0..16).map(|j| q(x[j]) | (q(x[j + 16]) << 4)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `encode` writes the bytes `gguf.quants.quantize` writes (the reference quantisers of
    /// the `gguf` package, `tests/fixtures/gguf/export.safetensors` from
    /// `scripts/fixtures/make_gguf_export_fixture.py`), byte for byte, on rows chosen to probe rounding.
    #[test]
    fn encode_is_byte_identical_to_gguf_quants_quantize() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/gguf/export.safetensors");
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let input = st.tensor("input").unwrap();
        let [rows, cols] = [input.shape()[0], input.shape()[1]];
        let values: Vec<f32> = input
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        for (key, ty) in [
            ("f16", GgmlType::F16),
            ("q8_0", GgmlType::Q8_0),
            ("q4_0", GgmlType::Q4_0),
        ] {
            let want = st.tensor(key).unwrap();
            let row_bytes = want.shape()[1];
            for r in 0..rows {
                let got = encode(ty, &values[r * cols..(r + 1) * cols]).unwrap();
                let expect = &want.data()[r * row_bytes..(r + 1) * row_bytes];
                let differ = got.iter().zip(expect).filter(|(a, b)| a != b).count();
                assert_eq!(
                    (got.len(), differ),
                    (row_bytes, 0),
                    "{key}, row {r}: {differ} bytes differ"
                );
            }
        }
    }
}
