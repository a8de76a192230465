//! Fused CPU kernels for the element-wise hot spots of a training step, with their own backward
//! passes, plugged into burn through its backend-extension API.
//!
//! Why by hand: on burn's `flex` backend exact GELU calls libm's scalar `erff` per element in
//! both directions (15-17% of a MiniLM step), and under autodiff softmax is decomposed into
//! five tracked ops (max, sub, exp, sum, div: five full passes and allocations per attention
//! layer) followed by dropout's three more. No crate offers these fused for burn. Here:
//!
//! - [`gelu`]: `0.5·x·(1 + erf(x/√2))` and its exact derivative in one pass each, with an erf
//!   and exp built from multiplies, adds and one division so the loops vectorise (AVX-512 or
//!   AVX2 chosen at run time), split over rayon's threads.
//! - [`attention_probs`]: `dropout(softmax(scores·scale + bias))` in one pass per row, and the
//!   gradient `scale·P⊙(dP − Σ dP⊙P)` in one pass back. The bias (padding / causal mask) is a
//!   constant; the scores get the gradient.
//! - [`dropout`]: inverted dropout whose mask is a hash of a seed and the element index
//!   ([`DropMask`]), regenerated in the backward pass rather than stored.
//! - [`cross_entropy_sum`]: `Σ_rows logsumexp(row) − row[target]` in one pass per row, and the
//!   gradient `softmax(row) − onehot(target)` in one pass back, writing no log-probability
//!   tensor (a language model's `[tokens, vocab]` logits are the largest tensor of its step).
//!
//! The functions accept every backend: tensors on another backend (a GPU) take burn's own
//! composed ops, so results agree everywhere and only the speed differs.

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Dispatch, DispatchDevice, Flex, backend_extension};
use burn::tensor::{DType, Tensor, TensorData};
use rayon::prelude::*;

use crate::quant::QuantMatrix;
use std::sync::Arc;

/// Elements per rayon task: small enough to split a `[16, 64, 1536]` activation over the cores,
/// large enough that scheduling stays negligible.
const CHUNK: usize = 16 * 1024;

/// The fused operations, implemented for `Flex` and differentiated by hand for
/// `Autodiff<Flex>`.
#[backend_extension(Autodiff, Flex)]
pub trait FusedOps: burn::backend::Backend {
    /// Exact (erf) GELU.
    fn fused_gelu(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// Inverted dropout with probability `p` and the mask of `seed`.
    fn fused_dropout(x: FloatTensor<Self>, p: f64, seed: u64) -> FloatTensor<Self>;
    /// `dropout(softmax(scores·scale + bias))` over the last dimension; `bias` broadcasts over
    /// heads (`[B, 1, Tq, Tk]` against `[B, H, Tq, Tk]`).
    fn fused_attention_probs(
        scores: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        scale: f32,
        p: f64,
        seed: u64,
    ) -> FloatTensor<Self>;
    /// `Σ_r logsumexp(logits[r]) − logits[r, targets[r]]` of `[N, C]` logits, shape `[1]`.
    fn fused_cross_entropy_sum(logits: FloatTensor<Self>, targets: Vec<u32>) -> FloatTensor<Self>;
    /// `x · Wᵀ` for `[N, in]` inputs and a frozen quantised `W` `[out, in]`, dequantised inside
    /// the op in both passes (the f32 weight is never kept for the backward pass).
    fn fused_quant_matmul(x: FloatTensor<Self>, w: Arc<QuantMatrix>) -> FloatTensor<Self>;
}

/// Exact GELU, `0.5·x·(1 + erf(x/√2))`, as `torch.nn.functional.gelu`.
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if !on_flex(&x) {
        return burn::tensor::activation::gelu(x);
    }
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_gelu(x.into_dispatch()))
}

/// Inverted dropout in training: each value zeroed with probability `p`, the rest scaled by
/// `1 / (1 - p)`.
pub fn dropout<const D: usize>(x: Tensor<D>, p: f64) -> Tensor<D> {
    if !on_flex(&x) {
        let keep = x.random_like(burn::tensor::Distribution::Bernoulli(1.0 - p));
        return x * keep / (1.0 - p);
    }
    let seed = draw_seed(&x.device());
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_dropout(
        x.into_dispatch(),
        p,
        seed,
    ))
}

/// Attention probabilities with dropout: `softmax(scores·scale + bias)`, then each value
/// dropped with probability `p` and the rest scaled by `1 / (1 - p)`.
///
/// # Shapes
/// - scores `[B, H, Tq, Tk]`
/// - bias `[B, 1, Tq, Tk]`
/// - output `[B, H, Tq, Tk]`
pub fn attention_probs(scores: Tensor<4>, bias: Tensor<4>, scale: f32, p: f64) -> Tensor<4> {
    if !on_flex(&scores) {
        let [b, h, tq, tk] = scores.dims();
        let probs = burn::tensor::activation::softmax(
            scores.mul_scalar(scale) + bias.expand([b, h, tq, tk]),
            3,
        );
        if p <= 0.0 {
            return probs;
        }
        let keep = probs.random_like(burn::tensor::Distribution::Bernoulli(1.0 - p));
        return probs * keep / (1.0 - p);
    }
    let seed = if p > 0.0 {
        draw_seed(&scores.device())
    } else {
        0
    };
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_attention_probs(
        scores.into_dispatch(),
        bias.into_dispatch(),
        scale,
        p,
        seed,
    ))
}

/// Cross-entropy summed over rows: `Σ_r −log softmax(logits[r])[targets[r]]`.
///
/// # Shapes
/// - logits `[N, C]`, `targets.len() == N`
/// - output `[1]`
pub fn cross_entropy_sum(logits: Tensor<2>, targets: &[u32]) -> Tensor<1> {
    if !on_flex(&logits) {
        let [n, _] = logits.dims();
        let device = logits.device();
        let t = Tensor::<1, burn::tensor::Int>::from_data(
            TensorData::new(targets.iter().map(|&t| t as i64).collect(), [n]),
            &device,
        );
        return -burn::tensor::activation::log_softmax(logits, 1)
            .gather(1, t.reshape([n, 1]))
            .sum();
    }
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_cross_entropy_sum(
        logits.into_dispatch(),
        targets.to_vec(),
    ))
}

/// `x · Wᵀ` with a frozen quantised weight `W` `[out, in]`: the product a QLoRA base layer
/// computes. Only `x` gets a gradient; on the CPU backend the f32 weight exists only while one
/// matmul runs (it is dequantised again in the backward pass, as bitsandbytes' `MatMul4Bit`
/// does), elsewhere it is dequantised into a constant tensor.
///
/// # Shapes
/// - x `[..., in]`
/// - output `[..., out]`
pub fn quant_matmul<const D: usize>(x: Tensor<D>, w: &Arc<QuantMatrix>) -> Tensor<D> {
    let dims = x.dims();
    let (rows, cols) = w.dims();
    let n: usize = dims[..D - 1].iter().product();
    let mut out_dims = dims;
    out_dims[D - 1] = rows;
    let x2: Tensor<2> = x.reshape([n, cols]);
    let y: Tensor<2> = if on_flex(&x2) {
        Tensor::from_dispatch(<Dispatch as FusedOps>::fused_quant_matmul(
            x2.into_dispatch(),
            w.clone(),
        ))
    } else {
        let device = x2.device();
        let wt = Tensor::<2>::from_data(TensorData::new(w.dequantize(), [rows, cols]), &device);
        x2.matmul(wt.transpose())
    };
    y.reshape(out_dims)
}

/// `dst[m, n] = lhs[m, k] · rhs[k, n]` with explicit (row, column) strides, through the gemm
/// crate burn's CPU backend uses.
#[allow(clippy::too_many_arguments)]
fn gemm_strided(
    m: usize,
    n: usize,
    k: usize,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
    dst: &mut [f32],
) {
    assert!(dst.len() >= m * n);
    let parallelism = if m * n * k >= 64 * 64 * 64 {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: every index the strides reach lies inside the slices: lhs (m-1)·rs + (k-1)·cs,
    // rhs (k-1)·rs + (n-1)·cs and dst (m-1)·n + n-1, as the callers' shapes imply.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// `y [N, out] = x [N, in] · Wᵀ`.
fn quant_matmul_forward(x: &FlexTensor, w: &QuantMatrix) -> FlexTensor {
    let (rows, cols) = w.dims();
    let xv = values(x);
    let n = xv.len() / cols;
    let wd = w.dequantize();
    let mut y = vec![0f32; n * rows];
    gemm_strided(n, rows, cols, xv, (cols, 1), &wd, (1, cols), &mut y);
    FlexTensor::from_data(TensorData::new(y, [n, rows]))
}

/// `dx [N, in] = dy [N, out] · W`.
fn quant_matmul_backward(dy: &FlexTensor, w: &QuantMatrix) -> FlexTensor {
    let (rows, cols) = w.dims();
    let gv = values(dy);
    let n = gv.len() / rows;
    let wd = w.dequantize();
    let mut dx = vec![0f32; n * cols];
    gemm_strided(n, cols, rows, gv, (rows, 1), &wd, (cols, 1), &mut dx);
    FlexTensor::from_data(TensorData::new(dx, [n, cols]))
}

/// Whether a tensor lives on the CPU backend these kernels are written for. `WHET_KERNELS=off`
/// takes burn's composed ops everywhere (to compare the two paths).
fn on_flex<const D: usize>(x: &Tensor<D>) -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let off = *OFF.get_or_init(|| std::env::var("WHET_KERNELS").is_ok_and(|v| v == "off"));
    !off && matches!(x.device().inner().as_dispatch(), DispatchDevice::Flex(_))
}

// ---------------------------------------------------------------------------------------------
// Forward and backward kernels on contiguous f32 slices.

/// The contiguous f32 values of a tensor (copied into a dense buffer if it is a strided view or
/// another float type).
fn dense(t: FlexTensor) -> FlexTensor {
    let t = if t.dtype() == DType::F32 {
        t
    } else {
        FlexTensor::from_data(t.into_data().convert::<f32>())
    };
    if t.as_slice::<f32>().is_some() {
        t
    } else {
        t.to_contiguous()
    }
}

fn values(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().unwrap_or(&[])
}

fn new_tensor(values: Vec<f32>, like: &FlexTensor) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, like.layout().shape().clone()))
}

/// Runs `body` compiled for the best vector extension this CPU has: the same scalar code,
/// auto-vectorised 16 or 8 lanes wide instead of SSE2's 4.
macro_rules! multiversion {
    ($name:ident ($($arg:ident : $ty:ty),*) $body:block) => {
        fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn avx512($($arg: $ty),*) { body($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) { body($($arg),*) }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports the feature the function was compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

/// Dropout keep decisions as a pure function of `(seed, element index)`, so the backward pass
/// regenerates the mask instead of storing it, and the loop vectorises (burn's `random_like`
/// draws every element from ChaCha one at a time: 15% of a training step). The hash is
/// Wellons' `lowbias32`, applied twice with the two halves of the seed.
#[derive(Debug, Clone, Copy)]
pub struct DropMask {
    seed_lo: u32,
    seed_hi: u32,
    /// Keep an element when the top 24 bits of its hash are below this.
    threshold: u32,
    /// `1 / (1 - p)`, or 1 with no dropout.
    pub scale: f32,
}

impl DropMask {
    /// A mask dropping with probability `p` (0 keeps everything).
    pub fn new(p: f64, seed: u64) -> Self {
        let p = p.clamp(0.0, 1.0);
        Self {
            seed_lo: seed as u32,
            seed_hi: (seed >> 32) as u32,
            threshold: ((1.0 - p) * (1u64 << 24) as f64).round() as u32,
            scale: if p > 0.0 {
                (1.0 / (1.0 - p)) as f32
            } else {
                1.0
            },
        }
    }

    /// `scale` where element `i` is kept, else 0.
    #[inline(always)]
    fn factor(&self, i: u32) -> f32 {
        let h = lowbias32(lowbias32(i ^ self.seed_lo) ^ self.seed_hi);
        // All ones where kept, else zero: a bit mask instead of a branch, so loops vectorise.
        let keep = 0u32.wrapping_sub(u32::from((h >> 8) < self.threshold));
        f32::from_bits(self.scale.to_bits() & keep)
    }
}

#[inline(always)]
fn lowbias32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^= x >> 16;
    x
}

/// A fresh seed from burn's random generator (seeded per step by the trainer), so masks are
/// reproducible from the training seed and a resumed run draws the same ones.
fn draw_seed(device: &burn::tensor::Device) -> u64 {
    let r = Tensor::<1>::random([2], burn::tensor::Distribution::Uniform(0.0, 1.0), device);
    let v: Vec<f32> = r
        .into_data()
        .convert::<f32>()
        .try_to_vec()
        .unwrap_or_default();
    let bits = |x: Option<&f32>| (x.copied().unwrap_or(0.0) * (1u32 << 24) as f32) as u64;
    bits(v.first()) | (bits(v.get(1)) << 24)
}

/// `e^x` for `x` in `[-87.3, 88.7]` (clamped), relative error about 1e-7: Cody-Waite range
/// reduction to `r ∈ [-ln2/2, ln2/2]`, Cephes' degree-5 polynomial, the power of two built in the
/// exponent bits. Branch-free so loops over it vectorise.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5·2^23 rounds to the nearest integer without a call to roundf.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.7);
    let v = x * LOG2E + ROUND;
    let n = v - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e = p * (r * r) + r + 1.0;
    // v's low mantissa bits hold n (its ulp is 1): 2^n from integer ops only, no float-to-int
    // conversion (Rust's saturating `as` would keep the loop scalar).
    let n_bits = v.to_bits().wrapping_sub(ROUND.to_bits());
    e * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

/// `(Φ(x), φ(x))`: the standard normal CDF `0.5·(1 + erf(x/√2))` and density. erf by
/// Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7), whose `e^{-z²}` is the density's
/// exponential, so both come from one `exp`.
#[inline(always)]
fn normal_cdf_pdf(x: f32) -> (f32, f32) {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_8,
        -1.453_152,
        1.061_405_4,
    ];
    let z = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let e = exp(-0.5 * x * x);
    let t = 1.0 / (1.0 + P * z);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    let erf_abs = 1.0 - poly * e;
    let erf = erf_abs.copysign(x);
    (0.5 * (1.0 + erf), FRAC_1_SQRT_2PI * e)
}

multiversion!(gelu_forward_slice(x: &[f32], out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = v * normal_cdf_pdf(v).0;
    }
});

multiversion!(gelu_backward_slice(x: &[f32], grad: &[f32], out: &mut [f32]) {
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(grad) {
        let (cdf, pdf) = normal_cdf_pdf(v);
        *o = g * (cdf + v * pdf);
    }
});

fn gelu_forward(x: &FlexTensor) -> FlexTensor {
    let xs = values(x);
    let mut out = vec![0f32; xs.len()];
    out.par_chunks_mut(CHUNK)
        .zip(xs.par_chunks(CHUNK))
        .for_each(|(o, x)| gelu_forward_slice(x, o));
    new_tensor(out, x)
}

fn gelu_backward(x: &FlexTensor, grad: &FlexTensor) -> FlexTensor {
    let (xs, gs) = (values(x), values(grad));
    let mut out = vec![0f32; xs.len()];
    out.par_chunks_mut(CHUNK)
        .zip(xs.par_chunks(CHUNK).zip(gs.par_chunks(CHUNK)))
        .for_each(|(o, (x, g))| gelu_backward_slice(x, g, o));
    new_tensor(out, x)
}

multiversion!(dropout_slice(x: &[f32], mask: &DropMask, base: u32, out: &mut [f32]) {
    for (j, (o, &v)) in out.iter_mut().zip(x).enumerate() {
        *o = v * mask.factor(base.wrapping_add(j as u32));
    }
});

fn dropout_apply(x: &FlexTensor, mask: &DropMask) -> FlexTensor {
    let xs = values(x);
    let mut out = vec![0f32; xs.len()];
    out.par_chunks_mut(CHUNK)
        .zip(xs.par_chunks(CHUNK))
        .enumerate()
        .for_each(|(k, (o, x))| dropout_slice(x, mask, (k * CHUNK) as u32, o));
    new_tensor(out, x)
}

multiversion!(softmax_row(
    scores: &[f32],
    bias: &[f32],
    scale: f32,
    mask: &DropMask,
    base: u32,
    probs: &mut [f32],
    out: &mut [f32]
) {
    let mut max = f32::MIN;
    for (p, (&s, &b)) in probs.iter_mut().zip(scores.iter().zip(bias)) {
        *p = s * scale + b;
        max = max.max(*p);
    }
    let mut sum = 0.0;
    for p in probs.iter_mut() {
        *p = exp(*p - max);
        sum += *p;
    }
    let inv = 1.0 / sum;
    for (j, (o, p)) in out.iter_mut().zip(probs.iter_mut()).enumerate() {
        *p *= inv;
        *o = *p * mask.factor(base.wrapping_add(j as u32));
    }
});

multiversion!(softmax_backward_row(
    probs: &[f32],
    grad: &[f32],
    scale: f32,
    mask: &DropMask,
    base: u32,
    out: &mut [f32]
) {
    // dP = dOut ⊙ keep · keep_scale; dS = scale · P ⊙ (dP − Σ dP ⊙ P)
    for (j, (o, &g)) in out.iter_mut().zip(grad).enumerate() {
        *o = g * mask.factor(base.wrapping_add(j as u32));
    }
    let mut dot = 0.0;
    for (&p, &d) in probs.iter().zip(out.iter()) {
        dot += d * p;
    }
    for (o, &p) in out.iter_mut().zip(probs) {
        *o = scale * p * (*o - dot);
    }
});

/// Rows of `[B, H, Tq, Tk]` handed to one rayon task.
fn rows_per_task(tk: usize) -> usize {
    (CHUNK / tk.max(1)).max(1)
}

/// `(probs before dropout, output)`.
fn attention_probs_forward(
    scores: &FlexTensor,
    bias: &FlexTensor,
    scale: f32,
    mask: &DropMask,
) -> (FlexTensor, FlexTensor) {
    let dims = scores.layout().shape().to_vec();
    let (h, tq, tk) = (dims[1], dims[2], dims[3]);
    let (s, bias_v) = (values(scores), values(bias));
    let mut probs = vec![0f32; s.len()];
    let mut out = vec![0f32; s.len()];
    let per_task = rows_per_task(tk);
    probs
        .par_chunks_mut(per_task * tk)
        .zip(out.par_chunks_mut(per_task * tk))
        .enumerate()
        .for_each(|(task, (p_rows, o_rows))| {
            for (i, (p, o)) in p_rows.chunks_mut(tk).zip(o_rows.chunks_mut(tk)).enumerate() {
                let row = task * per_task + i;
                // row = ((bi · H) + hi) · Tq + qi; the bias row drops the head.
                let (bi, qi) = (row / (h * tq), row % tq);
                let brow = (bi * tq + qi) * tk;
                let at = row * tk;
                let bias_row = &bias_v[brow..brow + tk];
                softmax_row(&s[at..at + tk], bias_row, scale, mask, at as u32, p, o);
            }
        });
    (new_tensor(probs, scores), new_tensor(out, scores))
}

fn attention_probs_backward(
    probs: &FlexTensor,
    grad: &FlexTensor,
    scale: f32,
    mask: &DropMask,
) -> FlexTensor {
    let tk = *probs.layout().shape().as_slice().last().unwrap_or(&1);
    let (p, g) = (values(probs), values(grad));
    let mut out = vec![0f32; p.len()];
    let per_task = rows_per_task(tk) * tk;
    out.par_chunks_mut(per_task)
        .enumerate()
        .for_each(|(task, o_rows)| {
            let start = task * per_task;
            for (i, o) in o_rows.chunks_mut(tk).enumerate() {
                let at = start + i * tk;
                softmax_backward_row(&p[at..at + tk], &g[at..at + tk], scale, mask, at as u32, o);
            }
        });
    new_tensor(out, probs)
}

multiversion!(logsumexp_row(row: &[f32], out: &mut f32) {
    let mut max = f32::MIN;
    for &x in row {
        max = max.max(x);
    }
    let mut sum = 0.0;
    for &x in row {
        sum += exp(x - max);
    }
    *out = max + sum.ln();
});

multiversion!(cross_entropy_grad_row(row: &[f32], lse: f32, g: f32, out: &mut [f32]) {
    for (o, &x) in out.iter_mut().zip(row) {
        *o = g * exp(x - lse);
    }
});

/// Per-row log-sum-exp of `[N, C]` logits.
fn row_logsumexp(logits: &FlexTensor) -> Vec<f32> {
    let c = *logits.layout().shape().as_slice().last().unwrap_or(&1);
    let x = values(logits);
    let mut lse = vec![0f32; x.len() / c.max(1)];
    lse.par_iter_mut()
        .zip(x.par_chunks(c.max(1)))
        .for_each(|(l, row)| logsumexp_row(row, l));
    lse
}

/// `Σ_r lse[r] − logits[r, t_r]` as a `[1]` tensor.
fn cross_entropy_forward(logits: &FlexTensor, lse: &[f32], targets: &[u32]) -> FlexTensor {
    let c = *logits.layout().shape().as_slice().last().unwrap_or(&1);
    let x = values(logits);
    let loss: f64 = lse
        .iter()
        .zip(targets)
        .enumerate()
        .map(|(r, (&l, &t))| (l - x[r * c + t as usize]) as f64)
        .sum();
    FlexTensor::from_data(TensorData::new(vec![loss as f32], [1]))
}

/// `g · (softmax(logits) − onehot(targets))`.
fn cross_entropy_backward(logits: &FlexTensor, lse: &[f32], targets: &[u32], g: f32) -> FlexTensor {
    let c = *logits.layout().shape().as_slice().last().unwrap_or(&1);
    let x = values(logits);
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(c.max(1))
        .zip(x.par_chunks(c.max(1)))
        .enumerate()
        .for_each(|(r, (o, row))| {
            cross_entropy_grad_row(row, lse[r], g, o);
            o[targets[r] as usize] -= g;
        });
    new_tensor(out, logits)
}

// ---------------------------------------------------------------------------------------------
// The backend implementations.

impl FusedOps for Flex {
    fn fused_gelu(x: FlexTensor) -> FlexTensor {
        gelu_forward(&dense(x))
    }

    fn fused_dropout(x: FlexTensor, p: f64, seed: u64) -> FlexTensor {
        dropout_apply(&dense(x), &DropMask::new(p, seed))
    }

    fn fused_attention_probs(
        scores: FlexTensor,
        bias: FlexTensor,
        scale: f32,
        p: f64,
        seed: u64,
    ) -> FlexTensor {
        let mask = DropMask::new(p, seed);
        attention_probs_forward(&dense(scores), &dense(bias), scale, &mask).1
    }

    fn fused_cross_entropy_sum(logits: FlexTensor, targets: Vec<u32>) -> FlexTensor {
        let logits = dense(logits);
        cross_entropy_forward(&logits, &row_logsumexp(&logits), &targets)
    }

    fn fused_quant_matmul(x: FlexTensor, w: Arc<QuantMatrix>) -> FlexTensor {
        quant_matmul_forward(&dense(x), &w)
    }
}

/// Runs a fused op with one differentiable input: `forward` gets the dense input and returns
/// what the backward pass keeps and the output. Without a graph (the input needs no gradient)
/// the kept state is dropped.
fn one_input<C: CheckpointStrategy, Bw: Backward<Flex, 1>>(
    backward: Bw,
    x: FloatTensor<Autodiff<Flex, C>>,
    forward: impl FnOnce(FlexTensor) -> (Bw::State, FlexTensor),
) -> FloatTensor<Autodiff<Flex, C>> {
    match backward.prepare::<C>([x.node()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let (state, out) = forward(dense(x.primitive().clone()));
            prep.finish(state, out)
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(dense(x.into_primitive())).1),
    }
}

impl<C: CheckpointStrategy> FusedOps for Autodiff<Flex, C> {
    fn fused_gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct GeluBackward;

        impl Backward<Flex, 1> for GeluBackward {
            /// The (dense) input.
            type State = FlexTensor;

            fn backward(
                self,
                ops: Ops<FlexTensor, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let [parent] = ops.parents;
                let grad = grads.consume::<Flex>(&ops.node);
                if let Some(node) = parent {
                    grads.register::<Flex>(node.id, gelu_backward(&ops.state, &dense(grad)));
                }
            }
        }

        one_input::<C, _>(GeluBackward, x, |input| {
            let out = gelu_forward(&input);
            (input, out)
        })
    }

    fn fused_dropout(x: FloatTensor<Self>, p: f64, seed: u64) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct DropoutBackward;

        impl Backward<Flex, 1> for DropoutBackward {
            /// The mask, regenerated from its seed.
            type State = DropMask;

            fn backward(self, ops: Ops<DropMask, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
                let [parent] = ops.parents;
                let grad = grads.consume::<Flex>(&ops.node);
                if let Some(node) = parent {
                    grads.register::<Flex>(node.id, dropout_apply(&dense(grad), &ops.state));
                }
            }
        }

        let mask = DropMask::new(p, seed);
        one_input::<C, _>(DropoutBackward, x, |input| {
            (mask, dropout_apply(&input, &mask))
        })
    }

    fn fused_attention_probs(
        scores: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        scale: f32,
        p: f64,
        seed: u64,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct ProbsBackward;

        impl Backward<Flex, 1> for ProbsBackward {
            /// Probabilities before dropout, scale, dropout mask.
            type State = (FlexTensor, f32, DropMask);

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let [parent] = ops.parents;
                let grad = grads.consume::<Flex>(&ops.node);
                let (probs, scale, mask) = ops.state;
                if let Some(node) = parent {
                    let g = attention_probs_backward(&probs, &dense(grad), scale, &mask);
                    grads.register::<Flex>(node.id, g);
                }
            }
        }

        let bias = dense(bias.into_primitive());
        let mask = DropMask::new(p, seed);
        one_input::<C, _>(ProbsBackward, scores, |s| {
            let (probs, out) = attention_probs_forward(&s, &bias, scale, &mask);
            ((probs, scale, mask), out)
        })
    }

    fn fused_cross_entropy_sum(logits: FloatTensor<Self>, targets: Vec<u32>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct CrossEntropyBackward;

        impl Backward<Flex, 1> for CrossEntropyBackward {
            /// The logits, their row log-sum-exp, the targets.
            type State = (FlexTensor, Vec<f32>, Vec<u32>);

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let [parent] = ops.parents;
                let grad = grads.consume::<Flex>(&ops.node);
                let g = values(&dense(grad)).first().copied().unwrap_or(0.0);
                let (logits, lse, targets) = ops.state;
                if let Some(node) = parent {
                    let dx = cross_entropy_backward(&logits, &lse, &targets, g);
                    grads.register::<Flex>(node.id, dx);
                }
            }
        }

        one_input::<C, _>(CrossEntropyBackward, logits, |x| {
            let lse = row_logsumexp(&x);
            let out = cross_entropy_forward(&x, &lse, &targets);
            ((x, lse, targets), out)
        })
    }

    fn fused_quant_matmul(x: FloatTensor<Self>, w: Arc<QuantMatrix>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct QuantMatmulBackward;

        impl Backward<Flex, 1> for QuantMatmulBackward {
            /// The quantised weight (shared, not copied).
            type State = Arc<QuantMatrix>;

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let [parent] = ops.parents;
                let grad = grads.consume::<Flex>(&ops.node);
                if let Some(node) = parent {
                    let dx = quant_matmul_backward(&dense(grad), &ops.state);
                    grads.register::<Flex>(node.id, dx);
                }
            }
        }

        one_input::<C, _>(QuantMatmulBackward, x, |input| {
            let out = quant_matmul_forward(&input, &w);
            (w, out)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, Distribution};

    #[test]
    fn exp_and_normal_cdf_match_libm() {
        let _rng = crate::test_rng();
        let mut worst_exp = 0f32;
        let mut worst_cdf = 0f64;
        for i in -20_000..=20_000 {
            let x = i as f32 * 0.004; // [-80, 80]
            let want = (x as f64).exp();
            let rel = ((exp(x) as f64 - want) / want).abs() as f32;
            worst_exp = worst_exp.max(rel);
            let v = i as f32 * 0.0005; // [-10, 10]
            let cdf = 0.5 * (1.0 + libm_erf(v as f64 / std::f64::consts::SQRT_2));
            worst_cdf = worst_cdf.max((normal_cdf_pdf(v).0 as f64 - cdf).abs());
        }
        assert!(worst_exp < 3e-7, "exp relative error {worst_exp}");
        // A&S bounds erf's error by 1.5e-7 (7.5e-8 on the CDF); f32 rounding of the
        // polynomial and the exponential adds a few ulp of 1.
        assert!(worst_cdf < 5e-7, "normal CDF absolute error {worst_cdf}");
    }

    /// erf in f64 by its Taylor series (|x| < 3) or continued fraction, for the test only.
    fn libm_erf(x: f64) -> f64 {
        if x.abs() > 6.0 {
            return x.signum();
        }
        if x.abs() < 3.0 {
            let (mut term, mut sum, x2) = (x, x, x * x);
            for n in 1..200 {
                term *= -x2 / n as f64;
                sum += term / (2 * n + 1) as f64;
            }
            return sum * 2.0 / std::f64::consts::PI.sqrt();
        }
        // erfc by Lentz's continued fraction
        let z = x.abs();
        let mut f = z;
        for k in (1..60).rev() {
            f = z + (k as f64 / 2.0) / f;
        }
        let erfc = (-z * z).exp() / (f * std::f64::consts::PI.sqrt());
        (1.0 - erfc) * x.signum()
    }

    fn max_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
        (a - b).abs().max().into_scalar::<f32>()
    }

    #[test]
    fn fused_gelu_matches_burn_in_value_and_gradient() {
        let _rng = crate::test_rng();
        let device = Device::flex().autodiff();
        let x = Tensor::<3>::random([2, 5, 300], Distribution::Normal(0.0, 3.0), &device);
        let a = x.clone().require_grad();
        let b = x.require_grad();
        let ya = gelu(a.clone());
        let yb = burn::tensor::activation::gelu(b.clone());
        assert!(max_diff(ya.clone(), yb.clone()) < 1e-5);
        let w = Tensor::<3>::random([2, 5, 300], Distribution::Normal(0.0, 1.0), &device);
        let ga = (ya * w.clone()).sum().backward();
        let gb = (yb * w).sum().backward();
        let (ga, gb) = (
            a.grad(&ga).unwrap_or_else(|| panic!("no grad")),
            b.grad(&gb).unwrap_or_else(|| panic!("no grad")),
        );
        assert!(max_diff(ga, gb) < 1e-5);
    }

    #[test]
    fn fused_cross_entropy_matches_composed_ops_in_value_and_gradient() {
        let _rng = crate::test_rng();
        let device = Device::flex().autodiff();
        device.seed(11);
        let x = Tensor::<2>::random([7, 1000], Distribution::Normal(0.0, 4.0), &device);
        let targets: Vec<u32> = vec![0, 999, 17, 500, 3, 3, 250];
        let a = x.clone().require_grad();
        let b = x.require_grad();
        let la = cross_entropy_sum(a.clone(), &targets);
        let t = Tensor::<1, burn::tensor::Int>::from_data(
            TensorData::new(targets.iter().map(|&t| t as i64).collect(), [7]),
            &device,
        );
        let lb = -burn::tensor::activation::log_softmax(b.clone(), 1)
            .gather(1, t.reshape([7, 1]))
            .sum();
        let (va, vb) = (
            la.clone().into_scalar::<f32>(),
            lb.clone().into_scalar::<f32>(),
        );
        assert!((va - vb).abs() < 1e-4 * vb.abs(), "{va} vs {vb}");
        // Scale the loss so the incoming gradient is not 1.
        let ga = la.mul_scalar(0.5).backward();
        let gb = lb.mul_scalar(0.5).backward();
        let (ga, gb) = (
            a.grad(&ga).unwrap_or_else(|| panic!("no grad")),
            b.grad(&gb).unwrap_or_else(|| panic!("no grad")),
        );
        // Softmax values are at most 1; the fast exp and an f32 sum over 1000 terms keep them
        // within a few 1e-7.
        let d = max_diff(ga, gb);
        assert!(d < 1e-5, "gradient differs by {d}");
    }

    #[test]
    fn fused_attention_probs_match_composed_ops_in_value_and_gradient() {
        let _rng = crate::test_rng();
        let device = Device::flex().autodiff();
        let [b, h, tq, tk] = [2, 3, 5, 7];
        let s = Tensor::<4>::random([b, h, tq, tk], Distribution::Normal(0.0, 2.0), &device);
        let mut bias = vec![0f32; b * tq * tk];
        for (i, v) in bias.iter_mut().enumerate() {
            if i % tk >= tk - 1 - (i / (tq * tk)) * 2 {
                *v = crate::layers::MASK_VALUE; // pad the last keys of each row
            }
        }
        let bias = Tensor::<4>::from_data(TensorData::new(bias, [b, 1, tq, tk]), &device);
        let scale = 0.37;
        let a = s.clone().require_grad();
        let c = s.require_grad();
        let pa = attention_probs(a.clone(), bias.clone(), scale, 0.0);
        let pc = burn::tensor::activation::softmax(
            c.clone().mul_scalar(scale) + bias.expand([b, h, tq, tk]),
            3,
        );
        assert!(max_diff(pa.clone(), pc.clone()) < 1e-6);
        let w = Tensor::<4>::random([b, h, tq, tk], Distribution::Normal(0.0, 1.0), &device);
        let ga = (pa * w.clone()).sum().backward();
        let gc = (pc * w).sum().backward();
        let ga = a.grad(&ga).unwrap_or_else(|| panic!("no grad"));
        let gc = c.grad(&gc).unwrap_or_else(|| panic!("no grad"));
        assert!(max_diff(ga, gc) < 1e-5);
    }

    /// With dropout the output is the dropout-free probabilities masked and scaled, and the
    /// gradient flows only through kept values: both checked against the mask the output shows.
    #[test]
    fn consecutive_dropout_masks_are_independent() {
        let _rng = crate::test_rng();
        // Masks of successive calls (as LoRA's q / k / v adapters draw on one input) and of
        // successive steps (seed, seed + 1) must not repeat or correlate: both-dropped should
        // be p² of the elements.
        let device = Device::flex().autodiff();
        let x = Tensor::<2>::ones([200, 500], &device);
        let dropped = |t: Tensor<2>| -> Vec<bool> {
            t.into_data()
                .convert::<f32>()
                .try_to_vec::<f32>()
                .unwrap_or_default()
                .iter()
                .map(|&v| v == 0.0)
                .collect()
        };
        device.seed(42);
        let a = dropped(dropout(x.clone(), 0.25));
        let b = dropped(dropout(x.clone(), 0.25));
        device.seed(43);
        let c = dropped(dropout(x.clone(), 0.25));
        for (name, other) in [("next call", &b), ("next step", &c)] {
            let both =
                a.iter().zip(other).filter(|(p, q)| **p && **q).count() as f64 / a.len() as f64;
            assert!((both - 0.0625).abs() < 0.005, "{name}: both dropped {both}");
        }
    }

    #[test]
    fn dropout_masks_are_seeded_and_their_gradient_uses_the_same_mask() {
        let _rng = crate::test_rng();
        let device = Device::flex().autodiff();
        let x = Tensor::<2>::random([64, 300], Distribution::Normal(1.0, 0.1), &device);
        device.seed(7);
        let a = x.clone().require_grad();
        let y = dropout(a.clone(), 0.25);
        device.seed(7);
        let again = dropout(x.clone(), 0.25);
        assert_eq!(max_diff(y.clone(), again), 0.0, "same seed, same mask");
        let kept: Vec<f32> = y
            .clone()
            .into_data()
            .convert::<f32>()
            .try_to_vec()
            .unwrap_or_default();
        let xs: Vec<f32> = x
            .into_data()
            .convert::<f32>()
            .try_to_vec()
            .unwrap_or_default();
        let dropped = kept.iter().filter(|&&v| v == 0.0).count() as f64 / kept.len() as f64;
        assert!((dropped - 0.25).abs() < 0.02, "dropped fraction {dropped}");
        for (k, v) in kept.iter().zip(&xs) {
            assert!(*k == 0.0 || (k - v / 0.75).abs() < 1e-6);
        }
        let g = y.sum().backward();
        let g: Vec<f32> = a
            .grad(&g)
            .unwrap_or_else(|| panic!("no grad"))
            .into_data()
            .convert::<f32>()
            .try_to_vec()
            .unwrap_or_default();
        for (gi, k) in g.iter().zip(&kept) {
            let want = if *k == 0.0 { 0.0 } else { 1.0 / 0.75 };
            assert!((gi - want).abs() < 1e-6);
        }
        // attention probabilities: dropped entries are zero, kept ones scaled
        let s = Tensor::<4>::random([2, 2, 4, 6], Distribution::Normal(0.0, 1.0), &device);
        let bias = Tensor::<4>::zeros([2, 1, 4, 6], &device);
        let plain = attention_probs(s.clone(), bias.clone(), 1.0, 0.0);
        let dropped = attention_probs(s, bias, 1.0, 0.5);
        let (p, d): (Vec<f32>, Vec<f32>) = (
            plain
                .into_data()
                .convert::<f32>()
                .try_to_vec()
                .unwrap_or_default(),
            dropped
                .into_data()
                .convert::<f32>()
                .try_to_vec()
                .unwrap_or_default(),
        );
        assert!(d.contains(&0.0) && d.iter().any(|&v| v > 0.0));
        for (pv, dv) in p.iter().zip(&d) {
            assert!(*dv == 0.0 || (dv - 2.0 * pv).abs() < 1e-6);
        }
    }
}
