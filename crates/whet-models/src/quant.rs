//! Frozen quantised linear weights, kept quantised in memory and dequantised one layer at a time
//! inside the matmul (forward and backward), for QLoRA-style training of adapters over a 4-bit
//! base.
//!
//! Two storages:
//! - **NF4** as QLoRA defines it (Dettmers et al. 2023, <https://arxiv.org/abs/2305.14314>) and
//!   `bitsandbytes.functional.quantize_4bit(quant_type="nf4", blocksize=64)` computes it: the
//!   weight flattened row-major in blocks of 64, each block scaled by its absolute maximum and
//!   every value replaced by the index of the nearest of the 16 NormalFloat levels, two indices
//!   a byte (first in the high nibble). With double quantisation (`compress_statistics=True`,
//!   `bnb_4bit_use_double_quant`) the per-block scales are themselves quantised: their mean is
//!   subtracted and the rest stored as 8-bit codes of bitsandbytes' dynamic map in blocks of 256,
//!   each with an f32 absolute maximum.
//! - **ggml blocks** (Q4_0, Q4_1, Q8_0, ... as a GGUF file stores them), so LoRA trains over a
//!   GGUF base without dequantising the whole model.
//!
//! Why by hand: no crate quantises to NF4 outside bitsandbytes' CUDA/C++ library.
//!
//! A [`QuantMatrix`] is always the PyTorch `nn.Linear` layout `[out, in]`, row-major.

use burn::tensor::{Device, Int, Tensor, TensorData};
use rayon::prelude::*;
use whet_gguf::GgmlType;

use crate::weights::tensor_values;

/// The 16 NormalFloat-4 levels (bitsandbytes' `NF4` table: quantiles of N(0, 1) scaled to
/// [-1, 1] with an exact zero).
pub const NF4_LEVELS: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// Values per NF4 block (bitsandbytes' default `blocksize` for 4-bit).
pub const NF4_BLOCK: usize = 64;
/// Scales per block of the second quantisation.
pub const DQ_BLOCK: usize = 256;

/// How a frozen base's linear layers are stored (a recipe's `[quantization]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantSpec {
    /// NF4 in blocks of 64, with or without double quantisation of the scales.
    Nf4 { double_quant: bool },
    /// The GGUF file's own quantised blocks, as stored (other files: no quantisation).
    Gguf,
}

/// bitsandbytes' signed dynamic 8-bit map (`create_dynamic_map(signed=True)`): for each decade
/// exponent `e = 0..7`, `2^e` linearly spaced fractions in (0.1, 1) scaled by `10^(e-6)`, both
/// signs, plus 0 and 1; 256 values sorted.
pub fn dynamic_map() -> [f32; 256] {
    dynamic_map_of(true)
}

/// bitsandbytes' unsigned dynamic map (`create_dynamic_map(signed=False)`): as the signed one
/// with twice the fractions per decade and no negative half (Adam's second moment).
pub fn dynamic_map_unsigned() -> [f32; 256] {
    dynamic_map_of(false)
}

pub(crate) fn dynamic_map_of(signed: bool) -> [f32; 256] {
    // Python's 10 ** (e - 6) for e = 0..7, each the nearest double to the power of ten.
    const DECADES: [f64; 7] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0];
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for (i, &scale) in DECADES.iter().enumerate() {
        let items = (1usize << (i + if signed { 0 } else { 1 })) + 1;
        // torch.linspace(0.1, 1, items), then the midpoints of neighbours (equal to
        // bitsandbytes' map within an ulp: its tests compare with a relative 1e-6).
        let step = (1.0f32 - 0.1) / (items - 1) as f32;
        let bounds: Vec<f32> = (0..items).map(|k| 0.1 + step * k as f32).collect();
        for w in bounds.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push((scale * mean as f64) as f32);
            if signed {
                data.push((-scale * mean as f64) as f32);
            }
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(f32::total_cmp);
    let mut out = [0f32; 256];
    out.copy_from_slice(&data);
    out
}

/// Index of the level in sorted `levels` nearest to `x`.
fn nearest(levels: &[f32], x: f32) -> u8 {
    let i = levels.partition_point(|&l| l < x);
    if i == 0 {
        return 0;
    }
    if i == levels.len() {
        return (levels.len() - 1) as u8;
    }
    if (x - levels[i - 1]) <= (levels[i] - x) {
        (i - 1) as u8
    } else {
        i as u8
    }
}

/// The per-block scales of an NF4 matrix.
#[derive(Debug, Clone)]
enum Scales {
    /// One f32 absolute maximum per block.
    F32(Vec<f32>),
    /// Double quantisation: `absmax[b] = DYNAMIC[codes[b]] · outer[b / 256] + offset`.
    Double {
        codes: Vec<u8>,
        outer: Vec<f32>,
        offset: f32,
    },
}

#[derive(Debug, Clone)]
enum Storage {
    Nf4 { packed: Vec<u8>, scales: Scales },
    Ggml { ty: GgmlType, raw: Vec<u8> },
}

/// A frozen `[rows, cols]` (`[out, in]`) weight held quantised.
#[derive(Debug, Clone)]
pub struct QuantMatrix {
    rows: usize,
    cols: usize,
    storage: Storage,
}

impl QuantMatrix {
    /// Quantises `values` (`[rows, cols]` row-major) to NF4 in blocks of 64.
    pub fn nf4(values: &[f32], rows: usize, cols: usize, double_quant: bool) -> Self {
        assert_eq!(
            values.len(),
            rows * cols,
            "NF4: values do not fill [{rows}, {cols}]"
        );
        let blocks: Vec<&[f32]> = values.chunks(NF4_BLOCK).collect();
        let absmax: Vec<f32> = blocks
            .par_iter()
            .map(|b| b.iter().fold(0f32, |m, v| m.max(v.abs())))
            .collect();
        let mut packed = vec![0u8; values.len().div_ceil(2)];
        packed
            .par_chunks_mut(NF4_BLOCK / 2)
            .zip(blocks.par_iter().zip(absmax.par_iter()))
            .for_each(|(out, (b, &m))| {
                let inv = if m > 0.0 { 1.0 / m } else { 0.0 };
                for (k, pair) in b.chunks(2).enumerate() {
                    let hi = nearest(&NF4_LEVELS, pair[0] * inv);
                    let lo = pair.get(1).map_or(0, |&v| nearest(&NF4_LEVELS, v * inv));
                    out[k] = (hi << 4) | lo;
                }
            });
        let scales = if double_quant {
            double_quantise(&absmax)
        } else {
            Scales::F32(absmax)
        };
        Self {
            rows,
            cols,
            storage: Storage::Nf4 { packed, scales },
        }
    }

    /// Wraps ggml blocks of a `[rows, cols]` tensor (rows of whole blocks).
    pub fn ggml(ty: GgmlType, raw: Vec<u8>, rows: usize, cols: usize) -> Result<Self, String> {
        let (per, bytes) = ty
            .block()
            .ok_or_else(|| format!("ggml type {ty} cannot be dequantised"))?;
        if !cols.is_multiple_of(per) {
            return Err(format!(
                "rows of {cols} values are not whole {ty} blocks of {per}"
            ));
        }
        let want = rows * cols / per * bytes;
        if raw.len() != want {
            return Err(format!(
                "{ty} [{rows}, {cols}] needs {want} bytes, got {}",
                raw.len()
            ));
        }
        Ok(Self {
            rows,
            cols,
            storage: Storage::Ggml { ty, raw },
        })
    }

    /// `(rows, cols)` = `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Number of weights represented.
    pub fn num_elements(&self) -> usize {
        self.rows * self.cols
    }

    /// Bytes held (codes and scales).
    pub fn storage_bytes(&self) -> usize {
        match &self.storage {
            Storage::Nf4 { packed, scales } => {
                packed.len()
                    + match scales {
                        Scales::F32(s) => 4 * s.len(),
                        Scales::Double { codes, outer, .. } => codes.len() + 4 * outer.len() + 4,
                    }
            }
            Storage::Ggml { raw, .. } => raw.len(),
        }
    }

    /// A short name of the storage: `nf4`, `nf4+dq`, or the ggml type.
    pub fn kind(&self) -> String {
        match &self.storage {
            Storage::Nf4 {
                scales: Scales::F32(_),
                ..
            } => "nf4".into(),
            Storage::Nf4 { .. } => "nf4+dq".into(),
            Storage::Ggml { ty, .. } => ty.to_string(),
        }
    }

    /// The per-block absolute maxima NF4 dequantises with (after undoing the second
    /// quantisation); empty for ggml storage.
    pub fn block_scales(&self) -> Vec<f32> {
        match &self.storage {
            Storage::Nf4 { scales, .. } => scales_f32(scales),
            Storage::Ggml { .. } => vec![],
        }
    }

    /// The second quantisation of an NF4 matrix's scales: 8-bit codes, the f32 maximum of each
    /// block of 256, and the subtracted mean.
    pub fn double_quant_state(&self) -> Option<(&[u8], &[f32], f32)> {
        match &self.storage {
            Storage::Nf4 {
                scales:
                    Scales::Double {
                        codes,
                        outer,
                        offset,
                    },
                ..
            } => Some((codes, outer, *offset)),
            _ => None,
        }
    }

    /// The packed NF4 bytes (two codes a byte, first in the high nibble).
    pub fn nf4_packed(&self) -> Option<&[u8]> {
        match &self.storage {
            Storage::Nf4 { packed, .. } => Some(packed),
            Storage::Ggml { .. } => None,
        }
    }

    /// The ggml type and stored blocks of a matrix held as ggml blocks (for the device kernels,
    /// which read the blocks as they are stored).
    #[cfg_attr(not(any(feature = "wgpu", feature = "cuda")), allow(dead_code))]
    pub(crate) fn ggml_blocks(&self) -> Option<(GgmlType, &[u8])> {
        match &self.storage {
            Storage::Ggml { ty, raw } => Some((*ty, raw)),
            Storage::Nf4 { .. } => None,
        }
    }

    /// The NF4 level indices, one per weight (empty for ggml storage).
    pub fn nf4_codes(&self) -> Vec<u8> {
        match &self.storage {
            Storage::Nf4 { packed, .. } => {
                let mut out: Vec<u8> = packed.iter().flat_map(|b| [b >> 4, b & 0x0F]).collect();
                out.truncate(self.num_elements());
                out
            }
            Storage::Ggml { .. } => vec![],
        }
    }

    /// The weights as f32, `[rows, cols]` row-major, computed in parallel.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.num_elements()];
        self.dequantize_into(&mut out);
        out
    }

    /// Writes the weights into `out` (`[rows, cols]` row-major).
    pub fn dequantize_into(&self, out: &mut [f32]) {
        assert_eq!(out.len(), self.num_elements());
        match &self.storage {
            Storage::Nf4 { packed, scales } => {
                let absmax = scales_f32(scales);
                out.par_chunks_mut(NF4_BLOCK)
                    .zip(packed.par_chunks(NF4_BLOCK / 2))
                    .zip(absmax.par_iter())
                    .for_each(|((y, q), &m)| {
                        for (k, v) in y.iter_mut().enumerate() {
                            let b = q[k / 2];
                            let code = if k % 2 == 0 { b >> 4 } else { b & 0x0F };
                            *v = NF4_LEVELS[code as usize] * m;
                        }
                    });
            }
            Storage::Ggml { ty, raw } => {
                let (per, bytes) = ty.block().unwrap_or((1, 4));
                // Rows are whole blocks (checked in `ggml`), so rows dequantise independently.
                let row_bytes = self.cols / per * bytes;
                out.par_chunks_mut(self.cols)
                    .zip(raw.par_chunks(row_bytes))
                    .for_each(|(y, r)| {
                        // The type was checked in `ggml`.
                        let _ = whet_gguf::dequantize_into(*ty, r, y);
                    });
            }
        }
    }
}

fn double_quantise(absmax: &[f32]) -> Scales {
    let offset =
        (absmax.iter().map(|&v| v as f64).sum::<f64>() / absmax.len().max(1) as f64) as f32;
    let map = dynamic_map();
    let centred: Vec<f32> = absmax.iter().map(|&v| v - offset).collect();
    let mut codes = vec![0u8; centred.len()];
    let mut outer = Vec::with_capacity(centred.len().div_ceil(DQ_BLOCK));
    for (c, b) in codes.chunks_mut(DQ_BLOCK).zip(centred.chunks(DQ_BLOCK)) {
        let m = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        let inv = if m > 0.0 { 1.0 / m } else { 0.0 };
        for (q, &v) in c.iter_mut().zip(b) {
            *q = nearest(&map, (v * inv).clamp(-1.0, 1.0));
        }
        outer.push(m);
    }
    Scales::Double {
        codes,
        outer,
        offset,
    }
}

fn scales_f32(scales: &Scales) -> Vec<f32> {
    match scales {
        Scales::F32(s) => s.clone(),
        Scales::Double {
            codes,
            outer,
            offset,
        } => {
            let map = dynamic_map();
            codes
                .iter()
                .enumerate()
                .map(|(i, &c)| map[c as usize] * outer[i / DQ_BLOCK] + offset)
                .collect()
        }
    }
}

/// The smallest block maximum [`Blockwise8`] scales by (bitsandbytes' guard for an all-zero
/// block; a subnormal f32).
pub(crate) const ABSMAX_FLOOR: f32 = 1e-38;

/// The 255 midpoints of neighbouring levels of a dynamic map: a value's [`Blockwise8`] code is
/// the number of midpoints below it.
pub(crate) fn dynamic_midpoints(signed: bool) -> Vec<f32> {
    dynamic_map_of(signed)
        .windows(2)
        .map(|w| (w[0] + w[1]) / 2.0)
        .collect()
}

/// `bucketize` on a dynamic map's midpoints: a value's code is the number of midpoints below
/// it. A binary search over the 255 midpoints per value made 8-bit optimizer steps spend most
/// of their time in mispredicted branches; here the value's top 16 bits (sign, exponent, seven
/// mantissa bits) index a table of the codes that values with those bits can take (one or
/// two, as the map's levels are spread), and only those midpoints are compared: the same
/// count, so the same code, as the full search.
pub(crate) struct Bucketizer {
    bounds: Vec<f32>,
    /// Per top-16-bit key: the codes of the smallest and of the largest value with that key.
    range: Vec<(u8, u8)>,
}

impl Bucketizer {
    /// The bucketizer of the signed or unsigned dynamic map, made once.
    pub(crate) fn of(signed: bool) -> &'static Bucketizer {
        static SIGNED: std::sync::OnceLock<Bucketizer> = std::sync::OnceLock::new();
        static UNSIGNED: std::sync::OnceLock<Bucketizer> = std::sync::OnceLock::new();
        let cell = if signed { &SIGNED } else { &UNSIGNED };
        cell.get_or_init(|| Bucketizer::new(dynamic_midpoints(signed)))
    }

    fn new(bounds: Vec<f32>) -> Self {
        let count = |x: f32| bounds.partition_point(|&b| b < x) as u8;
        let range = (0u32..1 << 16)
            .map(|key| {
                let (a, b) = (
                    f32::from_bits(key << 16),
                    f32::from_bits(key << 16 | 0xffff),
                );
                // Negative floats grow more negative as their bits grow.
                let (lo, hi) = if a.is_sign_negative() { (b, a) } else { (a, b) };
                (count(lo), count(hi))
            })
            .collect();
        Self { bounds, range }
    }

    /// The number of midpoints below `x` (0 for NaN, as the full search gives).
    #[inline]
    pub(crate) fn code(&self, x: f32) -> u8 {
        let (lo, hi) = self.range[(x.to_bits() >> 16) as usize];
        let between = &self.bounds[lo as usize..hi as usize];
        lo + between.iter().filter(|&&b| b < x).count() as u8
    }
}

/// Quantises one block of at most [`DQ_BLOCK`] values into `codes` over the map `bucketizer`
/// holds; returns the block's absolute maximum.
pub(crate) fn quantize_block(values: &[f32], bucketizer: &Bucketizer, codes: &mut [u8]) -> f32 {
    let absmax = values.iter().fold(0f32, |a, x| a.max(x.abs()));
    let inv = 1.0 / absmax.max(ABSMAX_FLOOR);
    // bitsandbytes divides in a last, partial block and multiplies by the reciprocal in the
    // full ones; the roundings differ.
    let partial = values.len() < DQ_BLOCK;
    let m = absmax.max(ABSMAX_FLOOR);
    for (q, &x) in codes.iter_mut().zip(values) {
        let x = if partial { x / m } else { x * inv };
        *q = bucketizer.code(x.clamp(-1.0, 1.0));
    }
    absmax
}

/// Values quantised blockwise to 8 bits over a dynamic map, as bitsandbytes'
/// `quantize_blockwise` stores 8-bit optimizer states: blocks of [`DQ_BLOCK`] (256), each
/// scaled by its absolute maximum, every value the index of the nearest map level.
#[derive(Debug, Clone, PartialEq)]
pub struct Blockwise8 {
    /// One code per value.
    pub codes: Vec<u8>,
    /// One f32 absolute maximum per block.
    pub absmax: Vec<f32>,
    /// Signed map (`true`) or unsigned map (non-negative values).
    pub signed: bool,
}

impl Blockwise8 {
    /// Quantises `values` (non-negative ones when `signed` is false).
    pub fn quantize(values: &[f32], signed: bool) -> Self {
        // bitsandbytes' quantize_blockwise (its pure-torch backend and what its CUDA kernel
        // computes): `bucketize` on the midpoints of the map, so a value on a midpoint takes
        // the lower code. Comparing distances instead rounds differently near the midpoints.
        let bucketizer = Bucketizer::of(signed);
        let mut codes = vec![0u8; values.len()];
        let mut absmax = vec![0f32; values.len().div_ceil(DQ_BLOCK)];
        codes
            .par_chunks_mut(DQ_BLOCK)
            .zip(values.par_chunks(DQ_BLOCK))
            .zip(absmax.par_iter_mut())
            .for_each(|((c, v), m)| *m = quantize_block(v, bucketizer, c));
        Self {
            codes,
            absmax,
            signed,
        }
    }

    /// Zeros (an optimizer's first moments).
    pub fn zeros(len: usize, signed: bool) -> Self {
        Self {
            codes: vec![0; len],
            absmax: vec![0.0; len.div_ceil(DQ_BLOCK)],
            signed,
        }
    }

    /// The values the codes stand for.
    pub fn dequantize(&self) -> Vec<f32> {
        let map = dynamic_map_of(self.signed);
        let mut out = vec![0f32; self.codes.len()];
        out.par_chunks_mut(DQ_BLOCK)
            .zip(self.codes.par_chunks(DQ_BLOCK))
            .zip(self.absmax.par_iter())
            .for_each(|((y, c), &m)| {
                for (v, &q) in y.iter_mut().zip(c) {
                    *v = map[q as usize] * m;
                }
            });
        out
    }

    /// Bytes held.
    pub fn storage_bytes(&self) -> usize {
        self.codes.len() + 4 * self.absmax.len()
    }
}

/// [`Blockwise8`] values kept in the memory of the device that uses them: in host memory on the
/// CPU backend, in device memory on a GPU runtime (with the `wgpu` or `cuda` feature), where
/// CubeCL kernels quantise and dequantise them with the host's codes and values bit for bit, so
/// that an optimizer step keeping 8-bit moments reads nothing back to the host.
// One per optimizer moment, held in a map: the device variant's two tensor handles are not
// worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Blockwise8State {
    /// In host memory.
    Host(Blockwise8),
    /// In the memory of the device the tensors live on.
    Device {
        /// The codes, four to a u32 word, the first in the low byte; the last word padded with
        /// zero codes. `[⌈len / 4⌉]`, dtype u32.
        words: Tensor<1, Int>,
        /// One absolute maximum per block of [`DQ_BLOCK`] values, `[⌈len / 256⌉]`.
        absmax: Tensor<1>,
        /// Values represented.
        len: usize,
        /// Signed map (`true`) or unsigned map (non-negative values).
        signed: bool,
    },
}

impl Blockwise8State {
    /// Quantises `values` where they live: into device memory on a device with the kernels
    /// (a GPU runtime), else into host memory by [`Blockwise8::quantize`] (the CPU backend,
    /// whose memory is the host's, or `WHET_KERNELS=off`).
    pub fn quantize(values: Tensor<1>, signed: bool) -> Self {
        match crate::kernels::blockwise8_quantize(&values, signed) {
            Some((words, absmax)) => Self::Device {
                words,
                absmax,
                len: values.dims()[0],
                signed,
            },
            None => Self::quantize_on_host(values, signed),
        }
    }

    /// Quantises `values` into host memory whatever their device (a paged optimizer's states;
    /// on a GPU this reads the values back).
    pub fn quantize_on_host(values: Tensor<1>, signed: bool) -> Self {
        Self::Host(Blockwise8::quantize(
            &tensor_values(values.into_data()),
            signed,
        ))
    }

    /// The host values `q` in the memory of `device`: uploaded to a device with the kernels,
    /// else kept as they are.
    pub fn from_host(q: Blockwise8, device: &Device) -> Self {
        match crate::kernels::blockwise8_upload(&q, device) {
            Some((words, absmax)) => Self::Device {
                words,
                absmax,
                len: q.codes.len(),
                signed: q.signed,
            },
            None => Self::Host(q),
        }
    }

    /// The values the codes stand for, `[len]` f32 on `device` (host values are moved there;
    /// device values are dequantised on their device and moved only if it is another).
    pub fn dequantize(&self, device: &Device) -> Tensor<1> {
        match self {
            Self::Host(q) => {
                Tensor::from_data(TensorData::new(q.dequantize(), [q.codes.len()]), device)
            }
            Self::Device {
                words,
                absmax,
                len,
                signed,
            } => {
                let values = crate::kernels::blockwise8_dequantize(
                    words.clone(),
                    absmax.clone(),
                    *len,
                    *signed,
                );
                match values {
                    Some(values) if values.device() == *device => values,
                    Some(values) => values.to_device(device),
                    // Only a device with the kernels makes such words; read back otherwise.
                    None => Self::Host(self.to_host()).dequantize(device),
                }
            }
        }
    }

    /// A host copy (read back from the device for device values: for checkpoints and tests).
    pub fn to_host(&self) -> Blockwise8 {
        match self {
            Self::Host(q) => q.clone(),
            Self::Device {
                words,
                absmax,
                len,
                signed,
            } => {
                let mut codes: Vec<u8> = words
                    .clone()
                    .into_data()
                    .iter::<u32>()
                    .flat_map(u32::to_le_bytes)
                    .collect();
                codes.truncate(*len);
                Blockwise8 {
                    codes,
                    absmax: tensor_values(absmax.clone().into_data()),
                    signed: *signed,
                }
            }
        }
    }

    /// Whether the values are in device memory.
    pub fn is_on_device(&self) -> bool {
        matches!(self, Self::Device { .. })
    }

    /// Values represented.
    pub fn len(&self) -> usize {
        match self {
            Self::Host(q) => q.codes.len(),
            Self::Device { len, .. } => *len,
        }
    }

    /// Whether no values are represented.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held, in host or device memory (on a device the codes take whole u32 words).
    pub fn storage_bytes(&self) -> usize {
        match self {
            Self::Host(q) => q.storage_bytes(),
            Self::Device { len, .. } => 4 * len.div_ceil(4) + 4 * len.div_ceil(DQ_BLOCK),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table-guided bucketize gives the full binary search's code for every f32 in
    /// [-1, 1] with a 16-bit key boundary near it, every midpoint and its neighbours, and NaN.
    #[test]
    fn the_bucketizer_counts_as_the_full_search() {
        for signed in [true, false] {
            let b = Bucketizer::of(signed);
            let full = |x: f32| b.bounds.partition_point(|&m| m < x) as u8;
            let mut xs: Vec<f32> = Vec::new();
            for &m in &b.bounds {
                xs.extend([
                    m,
                    f32::from_bits(m.to_bits().wrapping_add(1)),
                    f32::from_bits(m.to_bits().wrapping_sub(1)),
                ]);
            }
            for key in 0u32..1 << 16 {
                for low in [0u32, 1, 0x7fff, 0x8000, 0xfffe, 0xffff] {
                    let x = f32::from_bits(key << 16 | low);
                    if (-1.0..=1.0).contains(&x) {
                        xs.push(x);
                    }
                }
            }
            xs.push(f32::NAN);
            for x in xs {
                assert_eq!(b.code(x), full(x), "{x:e} (signed {signed})");
            }
        }
    }

    #[test]
    fn dynamic_map_is_bitsandbytes_shape() {
        let m = dynamic_map();
        // Symmetric except for the extra 1.0: the extremes are ±(1 - 0.9/128).
        assert_eq!(m[0], -m[254]);
        assert!((m[254] - (1.0 - 0.9 / 128.0)).abs() < 1e-6, "{}", m[254]);
        assert!(m.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(m[255], 1.0);
        assert!(m.contains(&0.0));
        // The smallest magnitude is 1e-6 times the midpoint of linspace(0.1, 1, 2) = 0.55.
        let smallest = m
            .iter()
            .filter(|v| **v > 0.0)
            .fold(f32::MAX, |a, &b| a.min(b));
        assert!((smallest - 0.55e-6).abs() < 1e-12, "{smallest}");
    }

    #[test]
    fn nearest_picks_the_closest_level() {
        assert_eq!(nearest(&NF4_LEVELS, -2.0), 0);
        assert_eq!(nearest(&NF4_LEVELS, 2.0), 15);
        assert_eq!(nearest(&NF4_LEVELS, 0.0), 7);
        assert_eq!(nearest(&NF4_LEVELS, 0.03), 7);
        assert_eq!(nearest(&NF4_LEVELS, 0.05), 8);
        for (i, &l) in NF4_LEVELS.iter().enumerate() {
            assert_eq!(nearest(&NF4_LEVELS, l) as usize, i);
        }
    }
}
