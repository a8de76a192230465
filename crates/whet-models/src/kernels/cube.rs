//! The CubeCL kernels, for every runtime of burn's `Cube` backend (wgpu, CUDA, ROCm).
//!
//! Each kernel reads and writes contiguous f32 buffers; another float type is cast on the way in
//! and back on the way out. Element-wise ops take one unit per element. Row ops (softmax,
//! log-sum-exp) take one cube per row, its units striding over the row and meeting in a
//! shared-memory tree for the max and the sum, so a 150k-word vocabulary row is read by a whole
//! cube rather than by one unit.
//!
//! A frozen quantised weight is uploaded once per device (NF4 codes or ggml blocks as stored,
//! four bytes to a u32 word: WGSL has no u8 or f16 loads) and dequantised to f32, one unit per
//! element, by each product that needs it.
//!
//! Blockwise 8-bit values (8-bit optimizer moments) stay on the device between steps: one cube
//! per block of 256 finds its maximum and writes its codes, four to a u32 word, and one unit
//! per value dequantises. Their arithmetic is integer arithmetic, to give the host's codes on
//! every runtime (see the section's header).
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
use cubecl::ir::{ElemType, FloatKind};
use cubecl::prelude::*;
use cubecl::{CubeCount, CubeDim, calculate_cube_count_elemwise};
use std::sync::{Arc, Mutex, Weak};

use super::{DropMask, Kernels};
use crate::quant::{
    ABSMAX_FLOOR, Blockwise8, DQ_BLOCK, NF4_LEVELS, QuantMatrix, dynamic_map_of, dynamic_midpoints,
};
use whet_gguf::GgmlType;

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
        Self::f32_matmul(x, CubeBackend::float_transpose(weight))
    }

    fn quant_matmul_backward(dy: CubeTensor, w: &Arc<QuantMatrix>) -> CubeTensor {
        // dx [N, in] = dy [N, out] · W
        let weight = dequantized(w, &dy);
        Self::f32_matmul(dy, weight)
    }

    fn f32_matmul(lhs: CubeTensor, rhs: CubeTensor) -> CubeTensor {
        if lhs.dtype != DType::F32
            || rhs.dtype != DType::F32
            || crate::precision::tf32()
            || !has_tf32(&lhs)
        {
            return CubeBackend::float_matmul(lhs, rhs);
        }
        exact_f32_matmul(lhs, rhs)
    }
}

// ---------------------------------------------------------------------------------------------
// Full-f32 matrix products on a device with TF32.
//
// cubek-matmul 0.3.1 rounds f32 operands to TF32 in each of its tensor-core kernels whenever the
// device supports the type (`adjust_dtypes`), and burn's matmul autotunes over those kernels;
// neither has a switch. Its kernels without tensor cores (`requires_accelerator` false) compute
// in f32, so this launches them directly, choosing among them per problem size as burn's
// autotuner chooses among all (`tune/base.rs` of burn-cubecl): each candidate is timed once for
// a size class and the fastest is kept. `Naive` is the fallback that launches for every layout.

/// Whether the device of `t` has TF32, which burn's matmul then uses for f32 operands.
pub(super) fn has_tf32(t: &CubeTensor) -> bool {
    t.client
        .properties()
        .supports_type(ElemType::Float(FloatKind::TF32))
}

/// The unit (no tensor core) routines, in the order they are tried.
fn unit_strategies() -> Vec<cubek::matmul::strategy::Strategy> {
    use cubek::matmul::multi_level::Strategy;
    use cubek::matmul::multi_level::routines::TileSizeSelection;
    use cubek::matmul::multi_level::routines::batch::double_unit::DoubleUnitSelectionArgs;
    use cubek::matmul::multi_level::routines::batch::simple_unit::SimpleUnitSelectionArgs;
    use cubek::matmul::multi_level::routines::gemm::GemmStrategy;
    use cubek::matmul::routine::BlueprintStrategy::Inferred;
    let mut all = Vec::new();
    for tile_size in [
        TileSizeSelection::MaxTileSize,
        TileSizeSelection::MinTileSize,
    ] {
        all.push(Strategy::DoubleUnit(Inferred(DoubleUnitSelectionArgs {
            tile_size,
        })));
        all.push(Strategy::SimpleUnit(Inferred(SimpleUnitSelectionArgs {
            tile_size,
        })));
    }
    all.push(Strategy::Gemm(Inferred(GemmStrategy {
        target_num_planes: None,
    })));
    all.into_iter().map(Into::into).collect()
}

/// A problem's size class: the batch count and m, n, k, each rounded up to a power of two, and
/// whether each operand is row-major (else a transposed one): a routine may launch for one
/// layout and refuse the other.
type SizeClass = ([usize; 4], [bool; 2]);

/// The fastest unit routine found for each size class (an index into [`unit_strategies`]; past
/// its end, `Naive`).
static TUNED: Mutex<Option<std::collections::HashMap<SizeClass, usize>>> = Mutex::new(None);

/// An operand as cubek reads it: row-major, or the transpose of a row-major matrix (a weight in
/// the backward pass) as it is; anything else copied to row-major.
fn matmul_operand(t: CubeTensor) -> CubeTensor {
    let d = t.meta.shape().num_dims();
    if t.is_contiguous() || CubeBackend::float_swap_dims(t.clone(), d - 2, d - 1).is_contiguous() {
        t
    } else {
        into_contiguous(t)
    }
}

/// `lhs · rhs` (f32, equal leading dimensions) by cubek's routines without tensor cores.
pub(super) fn exact_f32_matmul(lhs: CubeTensor, rhs: CubeTensor) -> CubeTensor {
    use cubek::matmul::definition::{MatmulElems, MatmulGlobalElems};
    let (lhs, rhs) = (matmul_operand(lhs), matmul_operand(rhs));
    let out = burn_cubecl::kernel::matmul::init_matmul_output(&lhs, &rhs, DType::F32);
    let client = lhs.client.clone();
    let f32_type = ElemType::Float(FloatKind::F32);
    let launch = |strategy: &cubek::matmul::strategy::Strategy| {
        let mut dtypes = MatmulElems::from_globals(&MatmulGlobalElems {
            lhs: f32_type,
            rhs: f32_type,
            out: f32_type,
        });
        cubek::matmul::launch::launch_ref(
            strategy,
            &client,
            cubek::std::InputBinding::new(lhs.clone().binding(), f32_type),
            cubek::std::InputBinding::new(rhs.clone().binding(), f32_type),
            out.clone().binding(),
            &mut dtypes,
        )
        .is_ok()
    };
    let naive: cubek::matmul::strategy::Strategy =
        cubek::matmul::multi_level::Strategy::Naive.into();
    let strategies = unit_strategies();
    let (shape_l, shape_r) = (lhs.meta.shape(), rhs.meta.shape());
    let d = shape_l.num_dims();
    let batches: usize = (0..d - 2).map(|i| shape_l[i]).product();
    let class = (
        [batches, shape_l[d - 2], shape_r[d - 1], shape_l[d - 1]].map(usize::next_power_of_two),
        [lhs.is_contiguous(), rhs.is_contiguous()],
    );
    let known = TUNED
        .lock()
        .ok()
        .and_then(|t| t.as_ref().and_then(|t| t.get(&class).copied()));
    let chosen = match known {
        Some(i) => i,
        None => {
            // Time each candidate that launches, after a first launch that compiles it; the
            // device is synchronised around each.
            let sync = || cubecl::future::block_on(client.sync()).is_ok();
            let mut best = (f64::INFINITY, strategies.len());
            for (i, strategy) in strategies.iter().enumerate() {
                if !(launch(strategy) && sync()) {
                    continue;
                }
                let start = std::time::Instant::now();
                if launch(strategy) && sync() {
                    let secs = start.elapsed().as_secs_f64();
                    if secs < best.0 {
                        best = (secs, i);
                    }
                }
            }
            if let Ok(mut t) = TUNED.lock() {
                t.get_or_insert_with(Default::default).insert(class, best.1);
            }
            best.1
        }
    };
    // The chosen routine can still refuse a layout of the same size class: then `Naive`, which
    // burn-cubecl takes as launching for every layout (its autotuner's fallback). Were it to
    // refuse too, burn's own matmul still gives the product.
    if strategies.get(chosen).is_some_and(&launch) || launch(&naive) {
        out
    } else {
        CubeBackend::float_matmul(lhs, rhs)
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
    let bits = byte_at(words, e / 2);
    // Even elements sit in the high nibble.
    let code = select(e % 2 == 1, bits & 0xfu32, bits >> 4u32);
    out[e] = levels[code as usize] * absmax[e / 64];
}

// ---------------------------------------------------------------------------------------------
// ggml blocks on the device.
//
// The kernel follows `whet_gguf`'s host dequantisers (ggml-quants.c's `dequantize_row_*`) value
// for value, and its results equal theirs bit for bit: every product in them is exact in f32
// (an f16 significand of 11 bits times integers of at most 12 bits together), so the only
// rounding is the final add or subtract of Q4_1, Q5_1, Q4_K and Q5_K, which the host rounds
// once too, and a device that fuses the multiply and the add into an FMA gets the same value.

/// Byte `at` of bytes stored four to a little-endian u32 word (WGSL has no u8 loads).
#[cube]
fn byte_at(words: &[u32], at: usize) -> u32 {
    (words[at / 4] >> (8 * (at % 4)) as u32) & 0xffu32
}

/// The signed byte (i8) at `at`.
#[cube]
fn i8_at(words: &[u32], at: usize) -> i32 {
    let b = byte_at(words, at);
    i32::cast_from(b) - select(b >= 128u32, 256i32, 0i32)
}

/// The little-endian u16 at an even byte `at` (so it never straddles two words: every ggml
/// block and every f16 in one starts at an even byte).
#[cube]
fn u16_at(words: &[u32], at: usize) -> u32 {
    (words[at / 4] >> (8 * (at % 4)) as u32) & 0xffffu32
}

/// The f16 at `at` as f32, as `half::f16::to_f32` converts it (WGSL has no f16 loads): ±0 and
/// subnormals exactly (`mantissa · 2⁻²⁴`, a product exact in f32), infinities, and NaNs with the
/// quiet bit set and the payload kept.
#[cube]
fn f16_at(words: &[u32], at: usize) -> f32 {
    let h = u16_at(words, at);
    let sign = (h & 0x8000u32) << 16u32;
    let exp = (h >> 10u32) & 0x1fu32;
    let man = h & 0x3ffu32;
    // Rebias the exponent (15 → 127) and widen the mantissa (10 → 23 bits).
    let normal = sign | ((exp + 112u32) << 23u32) | (man << 13u32);
    let quiet = select(man != 0u32, 0x40_0000u32, 0u32);
    let inf_nan = sign | 0x7f80_0000u32 | quiet | (man << 13u32);
    let tiny = sign | u32::reinterpret(f32::cast_from(man) * 5.960_464_5e-8f32);
    f32::reinterpret(select(
        exp == 0u32,
        tiny,
        select(exp == 31u32, inf_nan, normal),
    ))
}

/// The bf16 at `at` as f32 (its top half), NaNs quietened as `half::bf16::to_f32` does.
#[cube]
fn bf16_at(words: &[u32], at: usize) -> f32 {
    let h = u16_at(words, at);
    let quiet = select((h & 0x7fffu32) > 0x7f80u32, 0x40u32, 0u32);
    f32::reinterpret((h | quiet) << 16u32)
}

/// The 4-bit value of element `k` (0..32) of Q4_0 / Q4_1 / Q5_0 / Q5_1 from the 16 bytes at
/// `qs`: low nibbles hold elements 0..16, high nibbles 16..32.
#[cube]
fn nibble_32(words: &[u32], qs: usize, k: usize) -> u32 {
    (byte_at(words, qs + k % 16) >> (4 * (k / 16)) as u32) & 0xfu32
}

/// The fifth bit of element `k` (0..32) of Q5_0 / Q5_1: bit `k` of the little-endian u32 at
/// `qh`, as 0 or 16.
#[cube]
fn fifth_bit(words: &[u32], qh: usize, k: usize) -> u32 {
    ((byte_at(words, qh + k / 8) >> (k % 8) as u32) & 1u32) << 4u32
}

/// Q4_0: d (f16), qs (16 bytes); `(q − 8) · d`.
#[cube]
fn q4_0(words: &[u32], base: usize, k: usize) -> f32 {
    let d = f16_at(words, base);
    let q = nibble_32(words, base + 2, k);
    f32::cast_from(i32::cast_from(q) - 8i32) * d
}

/// Q4_1: d, m (f16), qs (16 bytes); `q · d + m`.
#[cube]
fn q4_1(words: &[u32], base: usize, k: usize) -> f32 {
    let d = f16_at(words, base);
    let m = f16_at(words, base + 2);
    let q = nibble_32(words, base + 4, k);
    f32::cast_from(q) * d + m
}

/// Q5_0: d (f16), qh (u32 of fifth bits), qs (16 bytes); `(q − 16) · d`.
#[cube]
fn q5_0(words: &[u32], base: usize, k: usize) -> f32 {
    let d = f16_at(words, base);
    let q = nibble_32(words, base + 6, k) | fifth_bit(words, base + 2, k);
    f32::cast_from(i32::cast_from(q) - 16i32) * d
}

/// Q5_1: d, m (f16), qh (u32), qs (16 bytes); `q · d + m`.
#[cube]
fn q5_1(words: &[u32], base: usize, k: usize) -> f32 {
    let d = f16_at(words, base);
    let m = f16_at(words, base + 2);
    let q = nibble_32(words, base + 8, k) | fifth_bit(words, base + 4, k);
    f32::cast_from(q) * d + m
}

/// Q8_0: d (f16), 32 signed bytes; `q · d`.
#[cube]
fn q8_0(words: &[u32], base: usize, k: usize) -> f32 {
    let d = f16_at(words, base);
    f32::cast_from(i8_at(words, base + 2 + k)) * d
}

/// The 6-bit scale (`which = 0`) or min (`which = 4`) of sub-block `j` (0..8) of Q4_K / Q5_K
/// from the 12 bytes at `at`, as ggml's `get_scale_min_k4` unpacks them: sub-blocks 0..4 take
/// the low six bits of byte `j` (scales) or `j + 4` (mins); sub-blocks 4..8 a nibble of byte
/// `j + 4` (low: scales, high: mins) under the top two bits of byte `j − 4` (scales) or `j`
/// (mins). With `i = j mod 4` those bytes are `i + which` and `i + 8` for every `j`.
#[cube]
fn scale_min_k4(words: &[u32], at: usize, j: usize, which: u32) -> f32 {
    let i = j % 4;
    let own = byte_at(words, at + i + which as usize);
    let shared = byte_at(words, at + i + 8);
    let packed = ((shared >> which) & 0xfu32) | ((own >> 6u32) << 4u32);
    f32::cast_from(select(j < 4, own & 63u32, packed))
}

/// Q4_K: d, dmin (f16), scales (12 bytes), qs (128 bytes). Four chunks of 64 elements, each
/// 32 bytes of qs: low nibbles are sub-block `2c`, high nibbles `2c + 1`, each with its own
/// scale and min; `d · scale · q − dmin · min`.
#[cube]
fn q4_k(words: &[u32], base: usize, k: usize) -> f32 {
    let d = f16_at(words, base);
    let dmin = f16_at(words, base + 2);
    let chunk = k / 64;
    let high = (k % 64) / 32;
    let l = k % 32;
    let j = 2 * chunk + high;
    let d1 = d * scale_min_k4(words, base + 4, j, 0u32);
    let m1 = dmin * scale_min_k4(words, base + 4, j, 4u32);
    let q = (byte_at(words, base + 16 + 32 * chunk + l) >> (4 * high) as u32) & 0xfu32;
    d1 * f32::cast_from(q) - m1
}

/// Q5_K: d, dmin (f16), scales (12 bytes), qh (32 bytes), qs (128 bytes): Q4_K's layout with
/// a fifth bit per element, bit `j` (the sub-block) of qh byte `l`.
#[cube]
fn q5_k(words: &[u32], base: usize, k: usize) -> f32 {
    let d = f16_at(words, base);
    let dmin = f16_at(words, base + 2);
    let chunk = k / 64;
    let high = (k % 64) / 32;
    let l = k % 32;
    let j = 2 * chunk + high;
    let d1 = d * scale_min_k4(words, base + 4, j, 0u32);
    let m1 = dmin * scale_min_k4(words, base + 4, j, 4u32);
    let low = (byte_at(words, base + 48 + 32 * chunk + l) >> (4 * high) as u32) & 0xfu32;
    let fifth = ((byte_at(words, base + 16 + l) >> j as u32) & 1u32) << 4u32;
    d1 * f32::cast_from(low + fifth) - m1
}

/// Q6_K: ql (128 bytes), qh (64 bytes), scales (16 signed bytes), d (f16, last). Two halves of
/// 128 elements, each four quarters of 32: quarter `r` takes the low (r = 0, 1) or high
/// (r = 2, 3) nibbles of ql byte `l + 32·(r mod 2)`, bits `2r, 2r + 1` of qh byte `l`, and
/// scale `l / 16 + 2r`; `d · scale · (q − 32)`.
#[cube]
fn q6_k(words: &[u32], base: usize, k: usize) -> f32 {
    let d = f16_at(words, base + 208);
    let half = k / 128;
    let r = (k % 128) / 32;
    let l = k % 32;
    let ql = byte_at(words, base + 64 * half + 32 * (r % 2) + l);
    let qh = byte_at(words, base + 128 + 32 * half + l);
    let q = ((ql >> (4 * (r / 2)) as u32) & 0xfu32) | (((qh >> (2 * r) as u32) & 3u32) << 4u32);
    let scale = i8_at(words, base + 192 + 8 * half + l / 16 + 2 * r);
    d * f32::cast_from(scale) * f32::cast_from(i32::cast_from(q) - 32i32)
}

/// The ggml types the device dequantises: [`GgmlType`] less its unknown ids, as a kernel's
/// comptime argument (one compiled kernel per type).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum GgmlFormat {
    F32,
    F16,
    Bf16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

impl GgmlFormat {
    /// The kernel's format of `ty` and its block `(elements, bytes)`; None for a type the kernel
    /// does not read.
    fn of(ty: GgmlType) -> Option<(Self, (usize, usize))> {
        let format = match ty {
            GgmlType::F32 => Self::F32,
            GgmlType::F16 => Self::F16,
            GgmlType::BF16 => Self::Bf16,
            GgmlType::Q4_0 => Self::Q4_0,
            GgmlType::Q4_1 => Self::Q4_1,
            GgmlType::Q5_0 => Self::Q5_0,
            GgmlType::Q5_1 => Self::Q5_1,
            GgmlType::Q8_0 => Self::Q8_0,
            GgmlType::Q4K => Self::Q4K,
            GgmlType::Q5K => Self::Q5K,
            GgmlType::Q6K => Self::Q6K,
            GgmlType::Other(_) => return None,
        };
        Some((format, ty.block()?))
    }
}

/// `out[e]` = element `e` of a `[rows, cols]` weight stored as ggml blocks of `per` elements in
/// `bytes` bytes, read four bytes to a u32 word. Rows are whole blocks, so the flat index finds
/// the block.
#[cube(launch)]
fn ggml_dequantize_kernel(
    words: &[u32],
    out: &mut [f32],
    #[comptime] format: GgmlFormat,
    #[comptime] per: usize,
    #[comptime] bytes: usize,
) {
    let e = ABSOLUTE_POS;
    if e >= out.len() {
        terminate!();
    }
    let base = e / per * bytes;
    let k = e % per;
    out[e] = match format {
        GgmlFormat::F32 => f32::reinterpret(words[base / 4]),
        GgmlFormat::F16 => f16_at(words, base),
        GgmlFormat::Bf16 => bf16_at(words, base),
        GgmlFormat::Q4_0 => q4_0(words, base, k),
        GgmlFormat::Q4_1 => q4_1(words, base, k),
        GgmlFormat::Q5_0 => q5_0(words, base, k),
        GgmlFormat::Q5_1 => q5_1(words, base, k),
        GgmlFormat::Q8_0 => q8_0(words, base, k),
        GgmlFormat::Q4K => q4_k(words, base, k),
        GgmlFormat::Q5K => q5_k(words, base, k),
        GgmlFormat::Q6K => q6_k(words, base, k),
    };
}

// ---------------------------------------------------------------------------------------------
// Quantised weights on the device.

/// What a quantised weight keeps on a device: its storage as stored, bytes packed four to a
/// u32 word.
// One lives per weight and device and is cloned once per product: the NF4 variant's three
// tensor handles are not worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
enum OnDevice {
    /// NF4: the packed codes, the per-block absolute maxima (second quantisation undone), the
    /// 16 levels.
    Nf4 {
        words: CubeTensor,
        absmax: CubeTensor,
        levels: CubeTensor,
    },
    /// ggml blocks, with the format and the block `(elements, bytes)` the kernel reads them in.
    Ggml {
        words: CubeTensor,
        format: GgmlFormat,
        block: (usize, usize),
    },
}

/// A weight's storage on one device: uploaded by the first product on that device and kept as
/// long as the weight lives, so each later pass moves no weight bytes to the device.
struct Cached {
    weight: Weak<QuantMatrix>,
    device: burn_cubecl::CubeDevice,
    stored: OnDevice,
}

/// The f32 weight `[out, in]` on the device of `like`, for this one product, dequantised on the
/// device from its cached storage (NF4 codes or ggml blocks).
fn dequantized(w: &Arc<QuantMatrix>, like: &CubeTensor) -> FloatTensor<CubeBackend> {
    let (rows, cols) = w.dims();
    let n = rows * cols;
    let out = empty_f32(Shape::new([rows, cols]), like);
    if n == 0 {
        return to_dtype(out, like.dtype);
    }
    let (count, dim) = elementwise_grid(like, n);
    let client = like.client.clone();
    let weight = match on_device(w, like) {
        Some(OnDevice::Nf4 {
            words,
            absmax,
            levels,
        }) => {
            nf4_dequantize_kernel::launch(
                &client,
                count,
                dim,
                words.into_buffer_arg(),
                absmax.into_buffer_arg(),
                levels.into_buffer_arg(),
                out.clone().into_buffer_arg(),
            );
            out
        }
        Some(OnDevice::Ggml {
            words,
            format,
            block: (per, bytes),
        }) => {
            ggml_dequantize_kernel::launch(
                &client,
                count,
                dim,
                words.into_buffer_arg(),
                out.clone().into_buffer_arg(),
                format,
                per,
                bytes,
            );
            out
        }
        // A storage the kernels do not read (none that `QuantMatrix` builds today).
        None => {
            let data = TensorData::new(w.dequantize(), [rows, cols]);
            CubeBackend::float_from_data(data, &like.device)
        }
    };
    to_dtype(weight, like.dtype)
}

/// The cached device copy of `w`'s storage on the device of `like`, uploaded on the first call
/// per device; None for a storage the kernels do not read.
fn on_device(w: &Arc<QuantMatrix>, like: &CubeTensor) -> Option<OnDevice> {
    static CACHE: Mutex<Vec<Cached>> = Mutex::new(Vec::new());
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    let found = cache
        .iter()
        .find(|c| std::ptr::eq(c.weight.as_ptr(), Arc::as_ptr(w)) && c.device == like.device);
    if let Some(c) = found {
        return Some(c.stored.clone());
    }
    let stored = upload(w, like)?;
    // A dropped weight's address can be reused by a new one: its entry goes first.
    cache.retain(|c| c.weight.strong_count() > 0);
    cache.push(Cached {
        weight: Arc::downgrade(w),
        device: like.device.clone(),
        stored: stored.clone(),
    });
    Some(stored)
}

/// `w`'s storage copied to the device of `like`; None for a storage the kernels do not read.
fn upload(w: &Arc<QuantMatrix>, like: &CubeTensor) -> Option<OnDevice> {
    let upload_f32 = |v: Vec<f32>| {
        let len = v.len();
        f32_contiguous(CubeBackend::float_from_data(
            TensorData::new(v, [len]),
            &like.device,
        ))
    };
    if let Some(packed) = w.nf4_packed() {
        return Some(OnDevice::Nf4 {
            words: upload_words(packed, like),
            absmax: upload_f32(w.block_scales()),
            levels: upload_f32(NF4_LEVELS.to_vec()),
        });
    }
    let (ty, raw) = w.ggml_blocks()?;
    let (format, block) = GgmlFormat::of(ty)?;
    Some(OnDevice::Ggml {
        words: upload_words(raw, like),
        format,
        block,
    })
}

/// `bytes` as little-endian u32 words (the last padded with zeros) on the device of `like`.
fn upload_words(bytes: &[u8], like: &CubeTensor) -> CubeTensor {
    upload_words_to(bytes, &like.device)
}

/// `bytes` as little-endian u32 words (the last padded with zeros) on `device`.
fn upload_words_to(bytes: &[u8], device: &burn_cubecl::CubeDevice) -> CubeTensor {
    let words: Vec<u32> = bytes
        .chunks(4)
        .map(|b| {
            let mut word = [0u8; 4];
            word[..b.len()].copy_from_slice(b);
            u32::from_le_bytes(word)
        })
        .collect();
    let len = words.len();
    into_contiguous(CubeBackend::int_from_data(
        TensorData::new(words, [len]),
        device,
    ))
}

// ---------------------------------------------------------------------------------------------
// Blockwise 8-bit values on the device (bitsandbytes' 8-bit optimizer states).
//
// The codes must be the host's ([`Blockwise8::quantize`]) bit for bit, so that training on a
// GPU keeps the moments the CPU keeps. The device's own f32 arithmetic does not promise that:
// WGSL allows a division 2.5 ulp off (drivers commonly multiply by an approximate reciprocal)
// and allows flushing subnormals to zero (an all-zero block divides by 1e-38, itself
// subnormal). Mesa's lavapipe happens to do both exactly (the tests below pass there with the
// device's own `/` and `*` too); other drivers need not. So the kernels read floats as their
// bits and compute what decides a code (the block's reciprocal and each product, or each
// quotient in a partial block) and each dequantised product in integer arithmetic, rounded to
// nearest even as the host's f32 operations are; what is left (the block maximum as a maximum
// of magnitude bits, comparisons with normal midpoints) is exact on every device.

/// The significand of a finite nonzero f32 `bits`, normalised to [2²³, 2²⁴) (a subnormal's
/// shifted up).
#[cube]
fn significand(bits: u32) -> u32 {
    let field = (bits >> 23u32) & 0xffu32;
    let fraction = bits & 0x7f_ffffu32;
    // A subnormal's fraction is below 2²³: at least 9 leading zeros, so `up` is at least 1.
    let up = fraction.leading_zeros() - 8u32;
    select(field == 0u32, fraction << up, fraction | 0x80_0000u32)
}

/// The power of two that [`significand`] scales by: `value = significand(bits) · 2^exponent`.
#[cube]
fn exponent(bits: u32) -> i32 {
    let field = (bits >> 23u32) & 0xffu32;
    let fraction = bits & 0x7f_ffffu32;
    let up = fraction.leading_zeros() - 8u32;
    select(
        field == 0u32,
        -149i32 - i32::cast_from(up),
        i32::cast_from(field) - 150i32,
    )
}

/// The f32 bits nearest (ties to even) to `sign · (hi + lo / 2²⁴) · 2^(biased − 150)`: `hi` a
/// significand in [2²³, 2²⁴), `lo` the 24 bits below it, whose lowest may stand for any nonzero
/// bits further down (a sticky bit), `biased` the exponent field the value would have if normal.
/// Below the normal range the significand first shifts right into the rounding, as IEEE 754's
/// subnormals do; above it the result is infinite.
#[cube]
fn round_to_f32(sign: u32, biased: i32, hi: u32, lo: u32) -> u32 {
    // Bits of `hi` that fall below a subnormal's last bit; from 25 on, all of `hi` is less than
    // half the smallest subnormal and the result is zero either way.
    let shift = u32::cast_from(min(max(1i32 - biased, 0i32), 25i32));
    let kept = hi >> shift;
    // What falls off against half a unit of the last kept bit.
    let s = max(shift, 1u32);
    let out = hi & ((1u32 << s) - 1u32);
    let half = 1u32 << (s - 1u32);
    let above = (shift == 0u32 && lo > 0x80_0000u32)
        || (shift > 0u32 && (out > half || (out == half && lo != 0u32)));
    let tie = (shift == 0u32 && lo == 0x80_0000u32) || (shift > 0u32 && out == half && lo == 0u32);
    let up = above || (tie && (kept & 1u32) == 1u32);
    let magnitude = kept + select(up, 1u32, 0u32);
    // A normal value's hidden bit adds the last 1 to its exponent field (and a carry out of the
    // significand moves the exponent on); a subnormal's field is 0, and a carry into bit 23
    // makes the smallest normal.
    let field = u32::cast_from(max(biased - 1i32, 0i32)) << 23u32;
    select(
        biased > 254i32,
        sign | 0x7f80_0000u32,
        sign | (field + magnitude),
    )
}

/// `a · b` of finite f32 bits, rounded to nearest even, in integer arithmetic.
#[cube]
fn mul_rn(a: u32, b: u32) -> u32 {
    let sign = (a ^ b) & 0x8000_0000u32;
    let sa = significand(a);
    let sb = significand(b);
    // The 48-bit product from 12-bit halves (every partial product fits a u32), as the 24 bits
    // above 2²⁴ (`hi`) and the 24 below (`lo`).
    let (ah, al) = (sa >> 12u32, sa & 0xfffu32);
    let (bh, bl) = (sb >> 12u32, sb & 0xfffu32);
    let mid = ah * bl + al * bh;
    let low = al * bl + ((mid & 0xfffu32) << 12u32);
    let lo = low & 0xff_ffffu32;
    let hi = ah * bh + (mid >> 12u32) + (low >> 24u32);
    // The product lies in [2⁴⁶, 2⁴⁸): bring its leading bit to 2⁴⁷.
    let short = hi < 0x80_0000u32;
    let hi = select(short, (hi << 1u32) | (lo >> 23u32), hi);
    let lo = select(short, (lo << 1u32) & 0xff_ffffu32, lo);
    let biased = exponent(a) + exponent(b) + 174i32 - select(short, 1i32, 0i32);
    let zero = (a & 0x7fff_ffffu32) == 0u32 || (b & 0x7fff_ffffu32) == 0u32;
    select(zero, sign, round_to_f32(sign, biased, hi, lo))
}

/// `a / b` of finite f32 bits, `b` nonzero, rounded to nearest even, in integer arithmetic.
#[cube]
fn div_rn(a: u32, b: u32) -> u32 {
    let sign = (a ^ b) & 0x8000_0000u32;
    let sa = significand(a);
    let sb = significand(b);
    let small = sa < sb;
    // Long division of r / sb ∈ [1, 2): 24 significand bits and the round bit; what remains
    // is the sticky bit.
    let mut r = select(small, sa << 1u32, sa);
    let mut q = 0u32;
    let mut i = 0u32;
    while i < 25u32 {
        q <<= 1u32;
        if r >= sb {
            r -= sb;
            q += 1u32;
        }
        r <<= 1u32;
        i += 1u32;
    }
    let lo = ((q & 1u32) << 23u32) | select(r != 0u32, 1u32, 0u32);
    let biased = exponent(a) - exponent(b) + 127i32 - select(small, 1i32, 0i32);
    select(
        (a & 0x7fff_ffffu32) == 0u32,
        sign,
        round_to_f32(sign, biased, q >> 1u32, lo),
    )
}

/// The code of the f32 `x` (bits) in a block scaled by `scale` (`max(absmax, 1e-38)`, bits) with
/// reciprocal `inv`, as [`Blockwise8::quantize`] computes it: `x · inv` in a full block, `x /
/// scale` in a partial last one, clamped to [−1, 1], then the number of the map's 255 midpoints
/// below it (a binary search). A NaN takes code 0, as the host's search gives it.
#[cube]
fn blockwise8_code(x: u32, scale: u32, inv: u32, partial: bool, bounds: &[f32]) -> u32 {
    let sign = x & 0x8000_0000u32;
    let magnitude = x & 0x7fff_ffffu32;
    // An infinite maximum scales every finite value to zero, and an infinite value to NaN
    // (∞ · 0, ∞ / ∞).
    let infinite_scale = scale >= 0x7f80_0000u32;
    let nan = magnitude > 0x7f80_0000u32 || (infinite_scale && magnitude == 0x7f80_0000u32);
    let mut scaled = sign;
    if !infinite_scale && !nan {
        if partial {
            scaled = div_rn(x, scale);
        } else {
            scaled = mul_rn(x, inv);
        }
    }
    // |x| ≤ absmax, but the reciprocal's rounding can take a product past 1.
    let scaled = select(
        (scaled & 0x7fff_ffffu32) > 0x3f80_0000u32,
        sign | 0x3f80_0000u32,
        scaled,
    );
    // The midpoints are normal floats, at least 1e-7 from zero, so comparing with them is
    // exact on every device (even one that reads a subnormal `y` as zero: same count).
    let y = f32::reinterpret(scaled);
    let mut below = 0u32;
    let mut step = 128u32;
    while step > 0u32 {
        // `below + step` never passes 255: the steps left sum to at most 2·step − 1.
        if bounds[(below + step - 1u32) as usize] < y {
            below += step;
        }
        step /= 2u32;
    }
    select(nan, 0u32, below)
}

/// One cube of 64 units per block of 256 values, a unit per u32 word of four codes: the block's
/// absolute maximum (a maximum of magnitude bits, which order as the magnitudes do; NaNs
/// skipped, as `f32::max` skips them), then each unit's four codes.
#[cube(launch)]
fn blockwise8_quantize_kernel(
    values: &[f32],
    bounds: &[f32],
    words: &mut [u32],
    absmax: &mut [f32],
    blocks: u32,
    floor: u32,
) {
    let block = cube_row(blocks);
    let unit = UNIT_POS as usize;
    let word = block * 64 + unit;
    let n = values.len();
    let mut shared = Shared::<[u32]>::new_slice(64usize);

    let mut local = 0u32;
    let mut k = 0usize;
    while k < 4 {
        let e = word * 4 + k;
        if e < n {
            let magnitude = u32::reinterpret(values[e]) & 0x7fff_ffffu32;
            if magnitude <= 0x7f80_0000u32 {
                local = max(local, magnitude);
            }
        }
        k += 1;
    }
    shared[unit] = local;
    sync_cube();
    let mut stride = 32usize;
    while stride > 0 {
        if unit < stride {
            shared[unit] = max(shared[unit], shared[unit + stride]);
        }
        sync_cube();
        stride /= 2;
    }
    let m = shared[0];
    if unit == 0 {
        absmax[block] = f32::reinterpret(m);
    }
    if word >= words.len() {
        terminate!();
    }

    let scale = max(m, floor);
    let partial = (block + 1) * 256 > n;
    let inv = div_rn(0x3f80_0000u32, scale);
    let mut packed = 0u32;
    let mut k = 0usize;
    while k < 4 {
        let e = word * 4 + k;
        if e < n {
            let code = blockwise8_code(u32::reinterpret(values[e]), scale, inv, partial, bounds);
            packed |= code << (8 * k) as u32;
        }
        k += 1;
    }
    words[word] = packed;
}

/// `out[e] = map[code e] · absmax[e / 256]`, one unit per value; the product rounded in integer
/// arithmetic (a device that flushes subnormals would lose a tiny block's values).
#[cube(launch)]
fn blockwise8_dequantize_kernel(words: &[u32], absmax: &[f32], map: &[f32], out: &mut [f32]) {
    let e = ABSOLUTE_POS;
    if e >= out.len() {
        terminate!();
    }
    let level = map[byte_at(words, e) as usize];
    let scale = absmax[e / 256];
    let (a, b) = (u32::reinterpret(level), u32::reinterpret(scale));
    let finite = (a & 0x7f80_0000u32) != 0x7f80_0000u32 && (b & 0x7f80_0000u32) != 0x7f80_0000u32;
    out[e] = select(finite, f32::reinterpret(mul_rn(a, b)), level * scale);
}

/// A dynamic map and its midpoints on one device, uploaded once.
struct Tables {
    device: burn_cubecl::CubeDevice,
    signed: bool,
    map: CubeTensor,
    midpoints: CubeTensor,
}

/// The `(map, midpoints)` of the signed or unsigned dynamic map on `device`.
fn tables(device: &burn_cubecl::CubeDevice, signed: bool) -> (CubeTensor, CubeTensor) {
    static CACHE: Mutex<Vec<Tables>> = Mutex::new(Vec::new());
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(t) = cache
        .iter()
        .find(|t| t.signed == signed && t.device == *device)
    {
        return (t.map.clone(), t.midpoints.clone());
    }
    let upload = |v: Vec<f32>| {
        let len = v.len();
        into_contiguous(CubeBackend::float_from_data(
            TensorData::new(v, [len]),
            device,
        ))
    };
    let t = Tables {
        device: device.clone(),
        signed,
        map: upload(dynamic_map_of(signed).to_vec()),
        midpoints: upload(dynamic_midpoints(signed)),
    };
    let out = (t.map.clone(), t.midpoints.clone());
    cache.push(t);
    out
}

/// [`Blockwise8::quantize`] of `[n]` values on their device: `(words [⌈n/4⌉] u32, absmax
/// [⌈n/256⌉] f32)`, codes four to a word, the first in the low byte.
pub(super) fn blockwise8_quantize(values: CubeTensor, signed: bool) -> (CubeTensor, CubeTensor) {
    let values = f32_contiguous(values);
    let n = values.meta.num_elements();
    let blocks = n.div_ceil(DQ_BLOCK);
    let words = empty_device_contiguous_dtype(
        values.client.clone(),
        values.device.clone(),
        Shape::new([n.div_ceil(4)]),
        DType::U32,
    );
    let absmax = empty_f32(Shape::new([blocks]), &values);
    if n > 0 {
        let (_, midpoints) = tables(&values.device, signed);
        let dim = CubeDim::new_1d(64);
        let count = calculate_cube_count_elemwise(&values.client, blocks * 64, dim);
        blockwise8_quantize_kernel::launch(
            &values.client.clone(),
            count,
            dim,
            values.into_buffer_arg(),
            midpoints.into_buffer_arg(),
            words.clone().into_buffer_arg(),
            absmax.clone().into_buffer_arg(),
            blocks as u32,
            ABSMAX_FLOOR.to_bits(),
        );
    }
    (words, absmax)
}

/// Host values laid out as [`blockwise8_quantize`] leaves them, on `device`.
pub(super) fn blockwise8_upload(
    q: &Blockwise8,
    device: &burn_cubecl::CubeDevice,
) -> (CubeTensor, CubeTensor) {
    let blocks = q.absmax.len();
    let absmax = into_contiguous(CubeBackend::float_from_data(
        TensorData::new(q.absmax.clone(), [blocks]),
        device,
    ));
    (upload_words_to(&q.codes, device), absmax)
}

/// The `[len]` f32 values that `(words, absmax)` of [`blockwise8_quantize`] stand for.
pub(super) fn blockwise8_dequantize(
    words: CubeTensor,
    absmax: CubeTensor,
    len: usize,
    signed: bool,
) -> CubeTensor {
    let out = empty_f32(Shape::new([len]), &absmax);
    if len > 0 {
        let (map, _) = tables(&absmax.device, signed);
        let (count, dim) = elementwise_grid(&absmax, len);
        blockwise8_dequantize_kernel::launch(
            &absmax.client.clone(),
            count,
            dim,
            into_contiguous(words).into_buffer_arg(),
            f32_contiguous(absmax).into_buffer_arg(),
            map.into_buffer_arg(),
            out.clone().into_buffer_arg(),
        );
    }
    out
}

/// The ggml kernel on Mesa's software Vulkan device against the host dequantiser
/// ([`QuantMatrix::dequantize`], whet-gguf's), for every ggml type: the dequantised weight bit
/// for bit, and `quant_matmul`'s product and input gradient against composed ops over the
/// host's weight. The blocks are random bytes with f16 scales of every kind (normal of either
/// sign, ±0, subnormal): whet-gguf's writer quantises to four of the eleven types only, and
/// random bytes reach every bit of every layout.
#[cfg(all(test, feature = "wgpu"))]
mod tests {
    use super::*;
    use crate::kernels::quant_matmul;
    use burn::tensor::{Device, DeviceKind, Distribution, Tensor};

    const TYPES: [GgmlType; 11] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
    ];

    fn gpu() -> Device {
        Device::wgpu(DeviceKind::Cpu)
    }

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .unwrap_or_else(|e| panic!("tensor data: {e:?}"))
    }

    /// A deterministic stream of bits (xorshift32).
    struct Bits(u32);

    impl Bits {
        fn next(&mut self) -> u32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 17;
            self.0 ^= self.0 << 5;
            self.0
        }
    }

    /// The `i`-th f16 of a test matrix: mostly normal values of either sign in [2⁻¹⁰, 2⁻²),
    /// and in turn +0, −0 and subnormals of either sign (the kernel's other conversion path).
    fn f16_bits(bits: &mut Bits, i: usize) -> u16 {
        let r = bits.next();
        let sign = (r >> 31) as u16 * 0x8000;
        let mantissa = (r & 0x3ff) as u16;
        match i % 8 {
            2 => 0,
            3 => 0x8000,
            5 | 6 => sign | mantissa.max(1),
            _ => sign | ((5 + (r >> 10) % 8) as u16) << 10 | mantissa,
        }
    }

    /// `rows × cols` values of `ty` as ggml stores them: random bytes, with the f16 fields of
    /// each block (and every F16, BF16 and F32 value) finite.
    fn blocks(ty: GgmlType, rows: usize, cols: usize, bits: &mut Bits) -> Vec<u8> {
        let (per, bytes) = ty.block().unwrap_or_else(|| panic!("{ty} has no blocks"));
        let mut raw: Vec<u8> = (0..rows * cols / per * bytes)
            .map(|_| bits.next() as u8)
            .collect();
        // Where each block keeps its f16 scales (d, and m or dmin).
        let halves: &[usize] = match ty {
            GgmlType::F16 | GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
            GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K => &[0, 2],
            GgmlType::Q6K => &[208],
            _ => &[],
        };
        for (i, block) in raw.chunks_exact_mut(bytes).enumerate() {
            for &at in halves {
                block[at..at + 2].copy_from_slice(&f16_bits(bits, i).to_le_bytes());
            }
            match ty {
                // The f16 values widened (exponents 117..=124), and in turn zeros and subnormals.
                GgmlType::BF16 => {
                    let h = f16_bits(bits, i);
                    let exp = if h & 0x7c00 == 0 {
                        0
                    } else {
                        112 + (h >> 10 & 0x1f)
                    };
                    let bf = (h & 0x8000) | exp << 7 | (h & 0x7f);
                    block.copy_from_slice(&bf.to_le_bytes());
                }
                // Magnitudes in [2⁻¹⁰, 2⁶), and in turn subnormals.
                GgmlType::F32 => {
                    let r = bits.next();
                    let exp = match i % 8 {
                        2 => 0,
                        _ => 117 + r % 16,
                    };
                    let v = (r & 0x807f_ffff) | exp << 23;
                    block.copy_from_slice(&v.to_le_bytes());
                }
                _ => {}
            }
        }
        raw
    }

    /// A `[5, 2 blocks]` matrix of `ty` (64 columns for the one-value types).
    fn matrix(ty: GgmlType, bits: &mut Bits) -> Arc<QuantMatrix> {
        let (per, _) = ty.block().unwrap_or_else(|| panic!("{ty} has no blocks"));
        let (rows, cols) = (5, 2 * per.max(32));
        let raw = blocks(ty, rows, cols, bits);
        Arc::new(QuantMatrix::ggml(ty, raw, rows, cols).unwrap_or_else(|e| panic!("{e}")))
    }

    #[test]
    fn ggml_blocks_dequantise_on_the_device_bit_for_bit() {
        let _rng = crate::test_rng();
        let like = Tensor::<1>::zeros([1], &gpu())
            .try_into_primitive::<CubeBackend>()
            .unwrap_or_else(|e| panic!("not a cube tensor: {e:?}"));
        let mut bits = Bits(0x9e37_79b9);
        for ty in TYPES {
            let w = matrix(ty, &mut bits);
            assert!(
                matches!(on_device(&w, &like), Some(OnDevice::Ggml { .. })),
                "{ty} is read on the device"
            );
            let want = w.dequantize();
            let mut distinct: Vec<u32> = want.iter().map(|v| v.to_bits()).collect();
            distinct.sort_unstable();
            distinct.dedup();
            assert!(
                distinct.len() > want.len() / 8,
                "{ty}: test data too uniform"
            );
            let cols = w.dims().1;
            // Twice: a launch must leave the cached blocks as they were.
            for pass in 0..2 {
                let got = values(Tensor::<2>::from_primitive::<CubeBackend>(dequantized(
                    &w, &like,
                )));
                assert_eq!(got.len(), want.len(), "{ty}: length");
                for (i, (g, h)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(
                        g.to_bits(),
                        h.to_bits(),
                        "{ty}, pass {pass}: element [{}, {}] is {g:e}, the host's {h:e}",
                        i / cols,
                        i % cols
                    );
                }
            }
        }
    }

    /// Infinities and NaNs of F16 and BF16 weights (no arithmetic touches them): NaNs come
    /// back quiet with their payload, as `half` converts them.
    #[test]
    fn f16_and_bf16_infinities_and_nans_convert_as_half_does() {
        let _rng = crate::test_rng();
        let like = Tensor::<1>::zeros([1], &gpu())
            .try_into_primitive::<CubeBackend>()
            .unwrap_or_else(|e| panic!("not a cube tensor: {e:?}"));
        let f16s: [u16; 6] = [0x7c00, 0xfc00, 0x7c01, 0x7e00, 0xfd55, 0x3c00];
        let bf16s: [u16; 6] = [0x7f80, 0xff80, 0x7f81, 0x7fc0, 0xffa5, 0x3f80];
        for (ty, halves) in [(GgmlType::F16, f16s), (GgmlType::BF16, bf16s)] {
            let raw: Vec<u8> = halves.iter().flat_map(|h| h.to_le_bytes()).collect();
            let w = Arc::new(QuantMatrix::ggml(ty, raw, 2, 3).unwrap_or_else(|e| panic!("{e}")));
            let got = values(Tensor::<2>::from_primitive::<CubeBackend>(dequantized(
                &w, &like,
            )));
            let want = w.dequantize();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{ty}");
        }
    }

    #[test]
    fn ggml_quant_matmul_matches_composed_ops_in_value_and_gradient() {
        let _rng = crate::test_rng();
        let device = gpu().autodiff();
        let mut bits = Bits(0x0bad_5eed);
        // |a − b| ≤ 1e-5 · (1 + |b|): both sides multiply the same f32 weight on the same
        // device, so they differ at most in summation order; a wrong weight moves whole units.
        let close = |a: Vec<f32>, b: Vec<f32>, what: &str| {
            assert_eq!(a.len(), b.len(), "{what}: lengths");
            for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                assert!(
                    (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                    "{what}: element {i} is {x}, want {y}"
                );
            }
        };
        for ty in TYPES {
            let w = matrix(ty, &mut bits);
            let (rows, cols) = w.dims();
            let host =
                Tensor::<2>::from_data(TensorData::new(w.dequantize(), [rows, cols]), &device);
            let x = Tensor::<3>::random([2, 3, cols], Distribution::Normal(0.0, 1.0), &device);
            let (a, b) = (x.clone().require_grad(), x.require_grad());
            // y [2, 3, out] = x [2, 3, in] · Wᵀ
            let ya = quant_matmul(a.clone(), &w);
            let yb = b
                .clone()
                .reshape([6, cols])
                .matmul(host.transpose())
                .reshape([2, 3, rows]);
            close(
                values(ya.clone()),
                values(yb.clone()),
                &format!("{ty} product"),
            );
            let r = Tensor::<3>::random([2, 3, rows], Distribution::Normal(0.0, 1.0), &device);
            let (ga, gb) = ((ya * r.clone()).sum().backward(), (yb * r).sum().backward());
            let grad = |t: &Tensor<3>, g| values(t.grad(g).unwrap_or_else(|| panic!("no grad")));
            close(
                grad(&a, &ga),
                grad(&b, &gb),
                &format!("{ty} input gradient"),
            );
        }
    }

    /// Values exercising every branch of the 8-bit codes: five blocks of 256 and a partial last
    /// block of 77, non-negative unless `signed`.
    fn blockwise8_values(signed: bool) -> Vec<f32> {
        let mut bits = Bits(0x5eed_1234);
        let mut uniform = move || (bits.next() >> 8) as f32 / (1u32 << 24) as f32;
        let midpoints = dynamic_midpoints(signed);
        let nudge = |x: f32, ulps: i32| f32::from_bits((x.to_bits() as i32 + ulps) as u32);
        let mut v = Vec::new();
        // Magnitudes over eight decades, so codes of every decade of the map.
        for _ in 0..256 {
            let m = 10f32.powi(-((uniform() * 8.0) as i32)) * (0.1 + 0.9 * uniform());
            v.push(if signed && uniform() < 0.5 { -m } else { m });
        }
        // An all-zero block (scaled by the subnormal 1e-38).
        v.extend([0.0; 256]);
        // Every midpoint exactly: a power-of-two maximum has an exact reciprocal, so `x · inv`
        // is the midpoint itself and takes the lower code.
        v.push(0.5);
        v.extend(midpoints.iter().map(|b| b * 0.5));
        // Within an ulp of each midpoint under a maximum whose reciprocal rounds, with zeros of
        // both signs and a subnormal.
        v.extend([0.3, if signed { -0.0 } else { 0.0 }, 1e-45]);
        v.extend((0..253).map(|j| nudge(midpoints[j] * 0.3, j as i32 % 3 - 1)));
        // Subnormals only: the maximum, its reciprocal and every scaled value leave the normal
        // range of the operands.
        for k in 0..256 {
            let m = 3e-39 * uniform();
            v.push(if signed && k % 2 == 1 { -m } else { m });
        }
        // The partial last block divides: midpoints times a power of two land on them exactly,
        // then values around them.
        v.push(0.125);
        v.extend(midpoints.iter().step_by(8).map(|b| b * 0.125));
        v.extend((0..44).map(|j| nudge(midpoints[j * 5] * 0.11, j as i32 % 3 - 1)));
        assert_eq!(v.len(), 5 * 256 + 77);
        v
    }

    /// The same f32 bits (NaNs of either sign and payload count as one).
    fn assert_same_bits(got: &[f32], want: &[f32], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                "{what}: element {i} is {g:e}, the host's {w:e}"
            );
        }
    }

    /// The device's codes and block maxima are the host's, and both dequantise to the same
    /// values bit for bit: in the cases `blockwise8_values` builds (ties on the midpoints, an
    /// all-zero block, subnormals, a partial last block), on random values over a few blocks,
    /// and with NaN and infinite values.
    #[test]
    fn blockwise8_codes_on_the_device_are_the_hosts_bit_for_bit() {
        use crate::quant::Blockwise8State;
        let _rng = crate::test_rng();
        let device = gpu();
        let mut bits = Bits(0x0123_4567);
        let mut normal = move || {
            let u = (bits.next() >> 8) as f32 / (1u32 << 24) as f32 + 1e-7;
            let w = (bits.next() >> 8) as f32 / (1u32 << 24) as f32;
            (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * w).cos()
        };
        let random: Vec<f32> = (0..7 * 256 + 200).map(|_| normal() * 1e-3).collect();
        let mut special = random[..600].to_vec();
        special[3] = f32::NAN;
        special[300] = f32::INFINITY;
        special[301] = 1.0;
        special[590] = -f32::NAN;
        for signed in [true, false] {
            let own = |v: &[f32]| -> Vec<f32> {
                if signed {
                    v.to_vec()
                } else {
                    v.iter()
                        .map(|x| if x.is_nan() { *x } else { x.abs() })
                        .collect()
                }
            };
            for (case, v) in [
                ("cases", blockwise8_values(signed)),
                ("random", own(&random)),
                ("special", own(&special)),
            ] {
                let what = format!("{case}, signed {signed}");
                let host = Blockwise8::quantize(&v, signed);
                let t = Tensor::<1>::from_data(TensorData::new(v.clone(), [v.len()]), &device);
                let q = Blockwise8State::quantize(t, signed);
                assert!(q.is_on_device(), "{what}: quantised on the host");
                assert_eq!(q.len(), v.len());
                let got = q.to_host();
                assert_same_bits(&got.absmax, &host.absmax, &format!("{what}: absmax"));
                for (i, (g, h)) in got.codes.iter().zip(&host.codes).enumerate() {
                    assert_eq!(
                        g,
                        h,
                        "{what}: code {i} (value {:e}, block maximum {:e})",
                        v[i],
                        host.absmax[i / 256]
                    );
                }
                assert_eq!(got, host, "{what}");
                let want = host.dequantize();
                assert_same_bits(
                    &values(q.dequantize(&device)),
                    &want,
                    &format!("{what}: dequantised"),
                );
                // Host values uploaded (a checkpoint loaded) dequantise alike and come back as
                // they went.
                let up = Blockwise8State::from_host(host.clone(), &device);
                assert!(up.is_on_device());
                assert_eq!(up.to_host(), host, "{what}: uploaded");
                assert_same_bits(
                    &values(up.dequantize(&device)),
                    &want,
                    &format!("{what}: uploaded, dequantised"),
                );
                assert_eq!(up.storage_bytes(), q.storage_bytes());
            }
            // The cases reach what they are built for: ties take the lower code, the all-zero
            // block the code of zero, the subnormal block codes other than zero's.
            let v = blockwise8_values(signed);
            let host = Blockwise8::quantize(&v, signed);
            let zero = dynamic_map_of(signed).iter().position(|&l| l == 0.0);
            assert!(
                host.codes[513..768]
                    .iter()
                    .enumerate()
                    .all(|(j, &c)| c as usize == j)
            );
            assert!(
                host.codes[256..512]
                    .iter()
                    .all(|&c| Some(c as usize) == zero)
            );
            let mut distinct = host.codes[1024..1280].to_vec();
            distinct.sort_unstable();
            distinct.dedup();
            assert!(
                distinct.len() > 30,
                "subnormal block: {} codes",
                distinct.len()
            );
        }
    }

    #[cube(launch)]
    fn arithmetic_kernel(a: &[u32], b: &[u32], product: &mut [u32], quotient: &mut [u32]) {
        let i = ABSOLUTE_POS;
        if i >= product.len() {
            terminate!();
        }
        product[i] = mul_rn(a[i], b[i]);
        quotient[i] = div_rn(a[i], b[i]);
    }

    /// The integer `mul_rn` and `div_rn` give the host's f32 `*` and `/` bit for bit, over
    /// random finite operands of every exponent, subnormals, zeros, results that underflow to
    /// subnormals or zero and products that overflow.
    #[test]
    fn integer_f32_arithmetic_rounds_as_the_host() {
        let _rng = crate::test_rng();
        let like = Tensor::<1>::zeros([1], &gpu())
            .try_into_primitive::<CubeBackend>()
            .unwrap_or_else(|e| panic!("not a cube tensor: {e:?}"));
        let mut bits = Bits(0x2545_f491);
        let mut operand = move || {
            let r = bits.next();
            let field = match bits.next() % 8 {
                0 => 0,
                1 => 1 + bits.next() % 3,
                2 => 60 + bits.next() % 20,
                3 => 250 + bits.next() % 5,
                _ => 1 + bits.next() % 254,
            };
            let fraction = match r % 16 {
                0 => 0,
                1 => r >> 31,
                _ => r & 0x7f_ffff,
            };
            (r & 0x8000_0000) | field << 23 | fraction
        };
        let n = 1 << 18;
        let (a, b): (Vec<u32>, Vec<u32>) = (0..n)
            .map(|_| (operand(), operand()))
            .filter(|&(_, b)| b & 0x7fff_ffff != 0)
            .unzip();
        let n = a.len();
        let upload = |v: &[u32]| upload_words_to(&bytes(v), &like.device);
        fn bytes(v: &[u32]) -> Vec<u8> {
            v.iter().flat_map(|w| w.to_le_bytes()).collect()
        }
        let empty = || {
            empty_device_contiguous_dtype(
                like.client.clone(),
                like.device.clone(),
                Shape::new([n]),
                DType::U32,
            )
        };
        let (product, quotient) = (empty(), empty());
        let (count, dim) = elementwise_grid(&like, n);
        arithmetic_kernel::launch(
            &like.client.clone(),
            count,
            dim,
            upload(&a).into_buffer_arg(),
            upload(&b).into_buffer_arg(),
            product.clone().into_buffer_arg(),
            quotient.clone().into_buffer_arg(),
        );
        let read = |t: CubeTensor| -> Vec<u32> {
            Tensor::<1, burn::tensor::Int>::from_primitive::<CubeBackend>(t)
                .into_data()
                .iter::<u32>()
                .collect()
        };
        let (product, quotient) = (read(product), read(quotient));
        let mut subnormal = 0;
        for i in 0..n {
            let (x, y) = (f32::from_bits(a[i]), f32::from_bits(b[i]));
            let (p, q) = (x * y, x / y);
            subnormal += usize::from(p.is_subnormal()) + usize::from(q.is_subnormal());
            assert_eq!(product[i], p.to_bits(), "{x:e} · {y:e} = {p:e}");
            assert_eq!(quotient[i], q.to_bits(), "{x:e} / {y:e} = {q:e}");
        }
        assert!(subnormal > n / 100, "{subnormal} subnormal results of {n}");
    }
}
