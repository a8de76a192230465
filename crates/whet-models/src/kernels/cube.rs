//! The CubeCL kernels, for every runtime of burn's `Cube` backend (wgpu, CUDA, ROCm).
//!
//! Each kernel reads and writes contiguous f32 buffers; another float type is cast on the way in
//! and back on the way out. Element-wise ops take one unit per element. Row ops (softmax,
//! log-sum-exp) take one cube per row, its units striding over the row and meeting in a
//! shared-memory tree for the max and the sum, so a 150k-word vocabulary row is read by a whole
//! cube rather than by one unit.
//!
//! The dropout mask is [`DropMask`]'s hash computed in u32 arithmetic, which wraps on every
//! runtime as Rust's `wrapping_mul` does: a seed keeps the same elements on the GPU as on the
//! CPU.

use burn::backend::ops::{FloatTensorOps, IntTensorOps};
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::tensor::{DType, Shape, TensorData};
use burn_cubecl::CubeBackend;
use burn_cubecl::cubecl;
use burn_cubecl::kernel::{cast, into_contiguous};
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;
use cubecl::{CubeCount, CubeDim, calculate_cube_count_elemwise};
use std::sync::{Arc, Mutex, Weak};

use super::{DropMask, Kernels};
use crate::quant::{NF4_LEVELS, QuantMatrix};

/// The lowest finite f32: the start of a running maximum. WGSL has no infinity literal, and a
/// masked score (`MASK_VALUE`, itself `f32::MIN`) must still win against it.
const LOWEST: f32 = -3.402_823_5e38;

#[cube]
fn lowbias32(x: u32) -> u32 {
    let mut x = x;
    x ^= x >> 16u32;
    x *= 0x7feb_352du32;
    x ^= x >> 15u32;
    x *= 0x846c_a68bu32;
    x ^= x >> 16u32;
    x
}

/// [`DropMask::factor`]: `keep_scale` where element `i` is kept, else 0.
#[cube]
fn drop_factor(i: u32, seed_lo: u32, seed_hi: u32, threshold: u32, keep_scale: f32) -> f32 {
    let h = lowbias32(lowbias32(i ^ seed_lo) ^ seed_hi);
    select((h >> 8u32) < threshold, keep_scale, 0.0f32)
}

/// The sum of `value` over the cube's units (`block` of them, a power of two).
#[cube]
fn cube_sum(shared: &mut Shared<[f32]>, value: f32, #[comptime] block: usize) -> f32 {
    let unit = UNIT_POS as usize;
    shared[unit] = value;
    sync_cube();
    let mut stride = block.runtime() / 2;
    while stride > 0 {
        if unit < stride {
            shared[unit] += shared[unit + stride];
        }
        sync_cube();
        stride /= 2;
    }
    let total = shared[0];
    // Nobody may overwrite slot 0 for the next reduction before everyone has read it.
    sync_cube();
    total
}

/// The maximum of `value` over the cube's units.
#[cube]
fn cube_max(shared: &mut Shared<[f32]>, value: f32, #[comptime] block: usize) -> f32 {
    let unit = UNIT_POS as usize;
    shared[unit] = value;
    sync_cube();
    let mut stride = block.runtime() / 2;
    while stride > 0 {
        if unit < stride {
            shared[unit] = max(shared[unit], shared[unit + stride]);
        }
        sync_cube();
        stride /= 2;
    }
    let total = shared[0];
    sync_cube();
    total
}

/// The row a cube works on. The grid can hold more cubes than rows (it is folded into two
/// dimensions past 65535); the extra cubes redo the last row and write the same values, which
/// keeps every barrier in uniform control flow (no early return before one).
#[cube]
fn cube_row(rows: u32) -> usize {
    min(CUBE_POS, rows as usize - 1)
}

#[cube(launch)]
fn gelu_kernel(x: &[f32], out: &mut [f32]) {
    let i = ABSOLUTE_POS;
    if i >= out.len() {
        terminate!();
    }
    let v = x[i];
    out[i] = 0.5f32 * v * (1.0f32 + Erf::erf(v * 0.707_106_77f32));
}

#[cube(launch)]
fn gelu_backward_kernel(x: &[f32], grad: &[f32], out: &mut [f32]) {
    let i = ABSOLUTE_POS;
    if i >= out.len() {
        terminate!();
    }
    let v = x[i];
    let cdf = 0.5f32 * (1.0f32 + Erf::erf(v * 0.707_106_77f32));
    let pdf = 0.398_942_3f32 * (-0.5f32 * v * v).exp();
    out[i] = grad[i] * (cdf + v * pdf);
}

#[cube(launch)]
fn dropout_kernel(
    x: &[f32],
    out: &mut [f32],
    seed_lo: u32,
    seed_hi: u32,
    threshold: u32,
    keep_scale: f32,
) {
    let i = ABSOLUTE_POS;
    if i >= out.len() {
        terminate!();
    }
    out[i] = x[i] * drop_factor(i as u32, seed_lo, seed_hi, threshold, keep_scale);
}

/// One cube per row of `[B, H, Tq, Tk]`: `probs = softmax(scores·scale + bias)`, `out = probs`
/// masked.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn attention_probs_kernel(
    scores: &[f32],
    bias: &[f32],
    probs: &mut [f32],
    out: &mut [f32],
    rows: u32,
    heads: u32,
    tq: u32,
    tk: u32,
    scale: f32,
    seed_lo: u32,
    seed_hi: u32,
    threshold: u32,
    keep_scale: f32,
    #[comptime] block: usize,
) {
    let row = cube_row(rows);
    let unit = UNIT_POS as usize;
    let tk = tk as usize;
    let tq = tq as usize;
    // row = ((b · H) + h) · Tq + q; the bias row drops the head.
    let b = row / (heads as usize * tq);
    let brow = (b * tq + row % tq) * tk;
    let at = row * tk;
    let mut shared = Shared::<[f32]>::new_slice(block);

    let mut local = f32::new(LOWEST);
    let mut j = unit;
    while j < tk {
        local = max(local, scores[at + j] * scale + bias[brow + j]);
        j += block;
    }
    let row_max = cube_max(&mut shared, local, block);

    let mut local_sum = 0.0f32;
    let mut j = unit;
    while j < tk {
        local_sum += (scores[at + j] * scale + bias[brow + j] - row_max).exp();
        j += block;
    }
    let inv = 1.0f32 / cube_sum(&mut shared, local_sum, block);

    let mut j = unit;
    while j < tk {
        let p = (scores[at + j] * scale + bias[brow + j] - row_max).exp() * inv;
        probs[at + j] = p;
        out[at + j] = p * drop_factor((at + j) as u32, seed_lo, seed_hi, threshold, keep_scale);
        j += block;
    }
}

/// One cube per row: `dS = scale · P ⊙ (dP − Σ dP ⊙ P)` with `dP` the masked incoming gradient.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn attention_probs_backward_kernel(
    probs: &[f32],
    grad: &[f32],
    out: &mut [f32],
    rows: u32,
    tk: u32,
    scale: f32,
    seed_lo: u32,
    seed_hi: u32,
    threshold: u32,
    keep_scale: f32,
    #[comptime] block: usize,
) {
    let row = cube_row(rows);
    let unit = UNIT_POS as usize;
    let tk = tk as usize;
    let at = row * tk;
    let mut shared = Shared::<[f32]>::new_slice(block);

    let mut local = 0.0f32;
    let mut j = unit;
    while j < tk {
        let i = at + j;
        local +=
            grad[i] * drop_factor(i as u32, seed_lo, seed_hi, threshold, keep_scale) * probs[i];
        j += block;
    }
    let dot = cube_sum(&mut shared, local, block);

    let mut j = unit;
    while j < tk {
        let i = at + j;
        let d = grad[i] * drop_factor(i as u32, seed_lo, seed_hi, threshold, keep_scale);
        out[i] = scale * probs[i] * (d - dot);
        j += block;
    }
}

/// One cube per row of `[N, C]` logits: its log-sum-exp and `lse − logits[target]`.
#[cube(launch)]
fn cross_entropy_kernel(
    logits: &[f32],
    targets: &[u32],
    lse: &mut [f32],
    loss: &mut [f32],
    rows: u32,
    classes: u32,
    #[comptime] block: usize,
) {
    let row = cube_row(rows);
    let unit = UNIT_POS as usize;
    let classes = classes as usize;
    let at = row * classes;
    let mut shared = Shared::<[f32]>::new_slice(block);

    let mut local = f32::new(LOWEST);
    let mut j = unit;
    while j < classes {
        local = max(local, logits[at + j]);
        j += block;
    }
    let row_max = cube_max(&mut shared, local, block);

    let mut local_sum = 0.0f32;
    let mut j = unit;
    while j < classes {
        local_sum += (logits[at + j] - row_max).exp();
        j += block;
    }
    let sum = cube_sum(&mut shared, local_sum, block);

    if unit == 0 {
        let l = row_max + sum.ln();
        lse[row] = l;
        loss[row] = l - logits[at + targets[row] as usize];
    }
}

/// `grad · (softmax(logits) − onehot(targets))`, one unit per element.
#[cube(launch)]
fn cross_entropy_backward_kernel(
    logits: &[f32],
    lse: &[f32],
    targets: &[u32],
    grad: &[f32],
    out: &mut [f32],
    classes: u32,
) {
    let i = ABSOLUTE_POS;
    if i >= out.len() {
        terminate!();
    }
    let classes = classes as usize;
    let row = i / classes;
    let onehot = select(i % classes == targets[row] as usize, 1.0f32, 0.0f32);
    out[i] = grad[0] * ((logits[i] - lse[row]).exp() - onehot);
}

// ---------------------------------------------------------------------------------------------
// Launching.

/// A contiguous f32 tensor (cast and copied only if it is not one already).
fn f32_contiguous(t: CubeTensor) -> CubeTensor {
    let t = if t.dtype == DType::F32 {
        t
    } else {
        cast(t, DType::F32)
    };
    into_contiguous(t)
}

/// An uninitialised contiguous f32 tensor on the device of `like`.
fn empty_f32(shape: Shape, like: &CubeTensor) -> CubeTensor {
    empty_device_contiguous_dtype(like.client.clone(), like.device.clone(), shape, DType::F32)
}

/// Back to the float type the caller passed in.
fn to_dtype(t: CubeTensor, dtype: DType) -> CubeTensor {
    if dtype == DType::F32 || t.dtype == dtype {
        t
    } else {
        cast(t, dtype)
    }
}

/// The grid of an element-wise kernel over `n` elements.
fn elementwise_grid(t: &CubeTensor, n: usize) -> (CubeCount, CubeDim) {
    let dim = CubeDim::new(&t.client, n);
    (calculate_cube_count_elemwise(&t.client, n, dim), dim)
}

/// The grid of a row kernel: one cube per row, `block` units each (a power of two, at most 256
/// and what the device allows, and no wider than a row needs).
fn row_grid(t: &CubeTensor, rows: usize, row_len: usize) -> (CubeCount, CubeDim, usize) {
    let max_units = t.client.properties().hardware.max_units_per_cube.max(1);
    // The largest power of two the device allows.
    let device_max = 1usize << (usize::BITS - 1 - (max_units as usize).leading_zeros());
    let block = row_len.next_power_of_two().clamp(32, 256).min(device_max);
    let dim = CubeDim::new_1d(block as u32);
    let count = calculate_cube_count_elemwise(&t.client, rows * block, dim);
    (count, dim, block)
}

/// `scale`, `threshold` and the halves of the seed, as the kernels take them.
fn mask_args(mask: &DropMask) -> (u32, u32, u32, f32) {
    (mask.seed_lo, mask.seed_hi, mask.threshold, mask.scale)
}

impl Kernels for CubeBackend {
    fn prepare(x: CubeTensor) -> CubeTensor {
        into_contiguous(x)
    }

    fn gelu(x: CubeTensor) -> CubeTensor {
        let dtype = x.dtype;
        let x = f32_contiguous(x);
        let n = x.meta.num_elements();
        let out = empty_f32(x.meta.shape().clone(), &x);
        if n > 0 {
            let (count, dim) = elementwise_grid(&x, n);
            gelu_kernel::launch(
                &x.client.clone(),
                count,
                dim,
                x.into_buffer_arg(),
                out.clone().into_buffer_arg(),
            );
        }
        to_dtype(out, dtype)
    }

    fn gelu_backward(x: CubeTensor, grad: CubeTensor) -> CubeTensor {
        let dtype = grad.dtype;
        let (x, grad) = (f32_contiguous(x), f32_contiguous(grad));
        let n = x.meta.num_elements();
        let out = empty_f32(x.meta.shape().clone(), &x);
        if n > 0 {
            let (count, dim) = elementwise_grid(&x, n);
            gelu_backward_kernel::launch(
                &x.client.clone(),
                count,
                dim,
                x.into_buffer_arg(),
                grad.into_buffer_arg(),
                out.clone().into_buffer_arg(),
            );
        }
        to_dtype(out, dtype)
    }

    fn dropout(x: CubeTensor, mask: DropMask) -> CubeTensor {
        let dtype = x.dtype;
        let x = f32_contiguous(x);
        let n = x.meta.num_elements();
        let out = empty_f32(x.meta.shape().clone(), &x);
        if n > 0 {
            let (count, dim) = elementwise_grid(&x, n);
            let (lo, hi, threshold, scale) = mask_args(&mask);
            dropout_kernel::launch(
                &x.client.clone(),
                count,
                dim,
                x.into_buffer_arg(),
                out.clone().into_buffer_arg(),
                lo,
                hi,
                threshold,
                scale,
            );
        }
        to_dtype(out, dtype)
    }

    fn attention_probs(
        scores: CubeTensor,
        bias: CubeTensor,
        scale: f32,
        mask: DropMask,
    ) -> (CubeTensor, CubeTensor) {
        let dtype = scores.dtype;
        let (scores, bias) = (f32_contiguous(scores), f32_contiguous(bias));
        let shape = scores.meta.shape().clone();
        let [_, h, tq, tk] = [shape[0], shape[1], shape[2], shape[3]];
        let rows = shape.num_elements() / tk.max(1);
        let probs = empty_f32(shape.clone(), &scores);
        let out = empty_f32(shape, &scores);
        if rows > 0 && tk > 0 {
            let (count, dim, block) = row_grid(&scores, rows, tk);
            let (lo, hi, threshold, keep_scale) = mask_args(&mask);
            attention_probs_kernel::launch(
                &scores.client.clone(),
                count,
                dim,
                scores.into_buffer_arg(),
                bias.into_buffer_arg(),
                probs.clone().into_buffer_arg(),
                out.clone().into_buffer_arg(),
                rows as u32,
                h as u32,
                tq as u32,
                tk as u32,
                scale,
                lo,
                hi,
                threshold,
                keep_scale,
                block,
            );
        }
        (probs, to_dtype(out, dtype))
    }

    fn attention_probs_backward(
        probs: CubeTensor,
        grad: CubeTensor,
        scale: f32,
        mask: DropMask,
    ) -> CubeTensor {
        let dtype = grad.dtype;
        let (probs, grad) = (f32_contiguous(probs), f32_contiguous(grad));
        let shape = probs.meta.shape().clone();
        let tk = shape[shape.num_dims() - 1];
        let rows = shape.num_elements() / tk.max(1);
        let out = empty_f32(shape, &probs);
        if rows > 0 && tk > 0 {
            let (count, dim, block) = row_grid(&probs, rows, tk);
            let (lo, hi, threshold, keep_scale) = mask_args(&mask);
            attention_probs_backward_kernel::launch(
                &probs.client.clone(),
                count,
                dim,
                probs.into_buffer_arg(),
                grad.into_buffer_arg(),
                out.clone().into_buffer_arg(),
                rows as u32,
                tk as u32,
                scale,
                lo,
                hi,
                threshold,
                keep_scale,
                block,
            );
        }
        to_dtype(out, dtype)
    }

    fn targets(targets: &[u32], like: &CubeTensor) -> IntTensor<Self> {
        let data = TensorData::new(targets.to_vec(), [targets.len()]);
        CubeBackend::int_from_data(data, &like.device)
    }

    fn cross_entropy(logits: CubeTensor, targets: CubeTensor) -> (CubeTensor, CubeTensor) {
        let dtype = logits.dtype;
        let logits = f32_contiguous(logits);
        let shape = logits.meta.shape().clone();
        let (rows, classes) = (shape[0], shape[1]);
        let lse = empty_f32(Shape::new([rows]), &logits);
        let loss_rows = empty_f32(Shape::new([rows]), &logits);
        if rows > 0 && classes > 0 {
            let (count, dim, block) = row_grid(&logits, rows, classes);
            cross_entropy_kernel::launch(
                &logits.client.clone(),
                count,
                dim,
                logits.into_buffer_arg(),
                into_contiguous(targets).into_buffer_arg(),
                lse.clone().into_buffer_arg(),
                loss_rows.clone().into_buffer_arg(),
                rows as u32,
                classes as u32,
                block,
            );
        }
        let loss = CubeBackend::float_sum(loss_rows);
        (to_dtype(loss, dtype), lse)
    }

    fn cross_entropy_backward(
        logits: CubeTensor,
        lse: CubeTensor,
        targets: CubeTensor,
        grad: CubeTensor,
    ) -> CubeTensor {
        let dtype = logits.dtype;
        let (logits, grad) = (f32_contiguous(logits), f32_contiguous(grad));
        let shape = logits.meta.shape().clone();
        let (n, classes) = (shape.num_elements(), shape[1]);
        let out = empty_f32(shape, &logits);
        if n > 0 {
            let (count, dim) = elementwise_grid(&logits, n);
            cross_entropy_backward_kernel::launch(
                &logits.client.clone(),
                count,
                dim,
                logits.into_buffer_arg(),
                into_contiguous(lse).into_buffer_arg(),
                into_contiguous(targets).into_buffer_arg(),
                grad.into_buffer_arg(),
                out.clone().into_buffer_arg(),
                classes as u32,
            );
        }
        to_dtype(out, dtype)
    }

    fn quant_matmul(x: CubeTensor, w: &Arc<QuantMatrix>) -> CubeTensor {
        // y [N, out] = x [N, in] · Wᵀ
        let weight = dequantized(w, &x);
        CubeBackend::float_matmul(x, CubeBackend::float_transpose(weight))
    }

    fn quant_matmul_backward(dy: CubeTensor, w: &Arc<QuantMatrix>) -> CubeTensor {
        // dx [N, in] = dy [N, out] · W
        let weight = dequantized(w, &dy);
        CubeBackend::float_matmul(dy, weight)
    }
}

/// `out[e] = LEVELS[code e] · absmax[e / 64]` over a `[rows, cols]` NF4 weight whose packed
/// bytes (two codes a byte, first in the high nibble) are read four to a u32 word.
#[cube(launch)]
fn nf4_dequantize_kernel(words: &[u32], absmax: &[f32], levels: &[f32], out: &mut [f32]) {
    let e = ABSOLUTE_POS;
    if e >= out.len() {
        terminate!();
    }
    let byte = e / 2;
    let bits = (words[byte / 4] >> (8 * (byte % 4)) as u32) & 0xffu32;
    // Even elements sit in the high nibble.
    let code = select(e % 2 == 1, bits & 0xfu32, bits >> 4u32);
    out[e] = levels[code as usize] * absmax[e / 64];
}

/// An NF4 weight's storage on one device: uploaded by the first product on that device and
/// kept as long as the weight lives, so each later pass moves no weight bytes to the device.
struct Nf4OnDevice {
    weight: Weak<QuantMatrix>,
    device: burn_cubecl::CubeDevice,
    words: CubeTensor,
    absmax: CubeTensor,
    levels: CubeTensor,
}

/// The f32 weight `[out, in]` on the device of `like`, for this one product: NF4 dequantised
/// on the device from its cached codes; other storages (ggml blocks) dequantised on the host
/// and uploaded.
fn dequantized(w: &Arc<QuantMatrix>, like: &CubeTensor) -> FloatTensor<CubeBackend> {
    let (rows, cols) = w.dims();
    let weight = match w.nf4_packed() {
        Some(packed) => {
            let (words, absmax, levels) = nf4_on_device(w, packed, like);
            let n = rows * cols;
            let out = empty_f32(Shape::new([rows, cols]), like);
            if n > 0 {
                let (count, dim) = elementwise_grid(like, n);
                nf4_dequantize_kernel::launch(
                    &like.client.clone(),
                    count,
                    dim,
                    words.into_buffer_arg(),
                    absmax.into_buffer_arg(),
                    levels.into_buffer_arg(),
                    out.clone().into_buffer_arg(),
                );
            }
            out
        }
        None => {
            let data = TensorData::new(w.dequantize(), [rows, cols]);
            CubeBackend::float_from_data(data, &like.device)
        }
    };
    to_dtype(weight, like.dtype)
}

/// The cached device copy of an NF4 weight's codes, scales and levels.
fn nf4_on_device(
    w: &Arc<QuantMatrix>,
    packed: &[u8],
    like: &CubeTensor,
) -> (CubeTensor, CubeTensor, CubeTensor) {
    static CACHE: Mutex<Vec<Nf4OnDevice>> = Mutex::new(Vec::new());
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    let found = cache
        .iter()
        .find(|c| std::ptr::eq(c.weight.as_ptr(), Arc::as_ptr(w)) && c.device == like.device);
    if let Some(c) = found {
        return (c.words.clone(), c.absmax.clone(), c.levels.clone());
    }
    // A dropped weight's address can be reused by a new one: its entry goes first.
    cache.retain(|c| c.weight.strong_count() > 0);
    let words: Vec<u32> = packed
        .chunks(4)
        .map(|b| {
            let mut word = [0u8; 4];
            word[..b.len()].copy_from_slice(b);
            u32::from_le_bytes(word)
        })
        .collect();
    let words_len = words.len();
    let absmax = w.block_scales();
    let absmax_len = absmax.len();
    let upload_f32 = |v: Vec<f32>, len: usize| {
        f32_contiguous(CubeBackend::float_from_data(
            TensorData::new(v, [len]),
            &like.device,
        ))
    };
    let entry = Nf4OnDevice {
        weight: Arc::downgrade(w),
        device: like.device.clone(),
        words: into_contiguous(CubeBackend::int_from_data(
            TensorData::new(words, [words_len]),
            &like.device,
        )),
        absmax: upload_f32(absmax, absmax_len),
        levels: upload_f32(NF4_LEVELS.to_vec(), NF4_LEVELS.len()),
    };
    let tensors = (
        entry.words.clone(),
        entry.absmax.clone(),
        entry.levels.clone(),
    );
    cache.push(entry);
    tensors
}
