//! Fused kernels for the element-wise hot spots of a training step, with their own backward
//! passes, plugged into burn through its backend-extension API: loops over f32 slices on the CPU
//! backend `Flex` ([`flex`]), CubeCL kernels on the `Cube` backend that serves wgpu, CUDA and
//! ROCm (`cube`, with the `wgpu` or `cuda` feature).
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
//!   ([`DropMask`]), regenerated in the backward pass rather than stored. The CPU and the GPU
//!   kernels hash alike, so a seed draws the same mask on every backend.
//! - [`cross_entropy_sum`]: `Σ_rows logsumexp(row) − row[target]` in one pass per row, and the
//!   gradient `softmax(row) − onehot(target)` in one pass back, writing no log-probability
//!   tensor (a language model's `[tokens, vocab]` logits are the largest tensor of its step).
//! - [`bf16_matmul`]: matrix products with bf16 operands and f32 sums, the arithmetic of
//!   `torch.autocast`'s bf16 on the CPU, with AVX512-BF16 dot products ([`bf16`]).
//! - [`Blockwise8State`](crate::quant::Blockwise8State)'s device side: bitsandbytes' blockwise
//!   8-bit quantisation of optimizer moments and its inverse on a GPU, the host's codes bit for
//!   bit, so that an 8-bit optimizer step reads nothing back (on the CPU the host code runs).
//!
//! The functions accept every backend: tensors on a backend without these kernels take burn's
//! own composed ops, so results agree everywhere and only the speed differs.

pub mod bf16;
mod flex;
pub(crate) use flex::quant_steps_in_place;

#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod cube;

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Backend, Dispatch, DispatchDevice, Flex, TensorMetadata, backend_extension};
use burn::tensor::{FloatDType, Int, Tensor, TensorData};

use crate::quant::{Blockwise8, QuantMatrix};
use std::sync::Arc;

/// The fused operations, implemented for `Flex` and `Cube` and differentiated by hand for
/// `Autodiff` over either.
#[backend_extension(Autodiff, Flex, Cube: cfg(any(feature = "wgpu", feature = "cuda")))]
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
    /// `lhs · rhs` over the last two dimensions (the leading ones equal): with `bf16`, the
    /// operands rounded to bf16 and the sums f32 ([`bf16_matmul`]); without, in full f32
    /// ([`f32_matmul`]). The output is f32.
    fn fused_matmul(
        lhs: FloatTensor<Self>,
        rhs: FloatTensor<Self>,
        bf16: bool,
    ) -> FloatTensor<Self>;
}

/// The normalisations, fused on the CPU only (a GPU runtime runs burn's composed ops for them):
/// under autodiff burn decomposes each into eight or nine tracked ops with a full-size tensor
/// apiece, in both passes.
#[backend_extension(Autodiff, Flex)]
pub trait CpuFusedOps: burn::backend::Backend {
    /// `x / sqrt(mean(x²) + eps) · weight` over the last dimension.
    fn fused_rms_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self>;
    /// `(x − mean(x)) / sqrt(var(x) + eps) · weight + bias` over the last dimension.
    fn fused_layer_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self>;
    /// `silu(gate) · up`, the gated feed-forward of LLaMA's MLP.
    fn fused_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self>;
    /// [`rms_norm_linear`]: `rms_norm(x, norm_weight) · weight`, the normalised input not
    /// kept for the backward pass; `bf16`: the products with bf16 operands.
    fn fused_rms_norm_linear(
        x: FloatTensor<Self>,
        norm_weight: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        eps: f64,
        bf16: bool,
    ) -> FloatTensor<Self>;
    /// [`swiglu_linear`]: `(silu(gate) · up) · weight`, the gated product not kept for the
    /// backward pass; `bf16`: the products with bf16 operands ([`bf16_matmul`]).
    fn fused_swiglu_linear(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bf16: bool,
    ) -> FloatTensor<Self>;
    /// [`embedding`]: the rows of `weight` `[V, D]` at `ids` `[B, T]`, `[B, T, D]`.
    fn fused_embedding(weight: FloatTensor<Self>, ids: IntTensor<Self>) -> FloatTensor<Self>;
    /// `x · cos + rotate_half(x) · sin`; `cos` and `sin` are constants (no gradient).
    fn fused_rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
    /// [`linear_cross_entropy_sum`]: `Σ_r −log softmax(hidden[r] · weightᵀ)[targets[r]]`.
    /// `weight_grad`: whether the weight trains (its gradient is then summed chunk by chunk);
    /// `bf16`: the products with bf16 operands (a bf16 compute scope).
    fn fused_linear_cross_entropy_sum(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: Vec<u32>,
        weight_grad: bool,
        bf16: bool,
    ) -> FloatTensor<Self>;
    /// One part of [`split_last`]: `width` columns of `joined`'s last dimension from `start`
    /// on, a view; its gradient is written into `grad`, shared with the other parts.
    fn fused_part(
        joined: FloatTensor<Self>,
        start: usize,
        width: usize,
        grad: Arc<PartsGrad>,
    ) -> FloatTensor<Self>;
    /// [`attention`]: `dropout(softmax(q·kᵀ·scale + bias))·v`, k and v grouped; with
    /// `segments`, over each example of a padding-free batch ([`attention_segments`]).
    #[allow(clippy::too_many_arguments)]
    fn fused_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        segments: Option<Arc<Segments>>,
        scale: f32,
        p: f64,
        seed: u64,
    ) -> FloatTensor<Self>;
}

/// The optimizer's update, fused on the CPU only: burn's ops make PyTorch's AdamW step nine
/// passes over a parameter and its moments (a full-size tensor each), this one pass. Not
/// differentiated: optimizers update plain tensors.
#[backend_extension(Flex)]
pub trait CpuOptimOps: burn::backend::Backend {
    /// One [`adamw`] step; returns the parameter and both moments.
    #[allow(clippy::too_many_arguments)]
    fn fused_adamw(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        m: FloatTensor<Self>,
        v: FloatTensor<Self>,
        decay: f64,
        beta1: f64,
        beta2: f64,
        bc2_sqrt: f64,
        eps: f64,
        step_size: f64,
        grad_scale: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
    /// [`sum_of_squares`], `[1]`.
    fn fused_sum_of_squares(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// [`scale`]: `x · by`.
    fn fused_scale(x: FloatTensor<Self>, by: f32) -> FloatTensor<Self>;
}

/// `x · by`: undoing fp16's loss scale, and SGD's gradient clipping (the AdamW kinds take the
/// clipping coefficient in their own update pass). On the CPU backend in place when `x` is not shared,
/// and a page of zeros is left as it is (`0 · by` is 0): an embedding's gradient is zero
/// outside the rows of the step's tokens, and memory that was only ever read (see
/// [`embedding`]) stays the kernel's shared zero page instead of being copied page by page.
pub fn scale(x: Tensor<1>, by: f64) -> Tensor<1> {
    if !on_flex(&x) || !by.is_finite() {
        return x.mul_scalar(by);
    }
    Tensor::from_dispatch(<Dispatch as CpuOptimOps>::fused_scale(
        x.into_dispatch(),
        by as f32,
    ))
}

/// `Σ x²` over a tensor, as f64: a gradient norm's square. On the CPU backend one pass over
/// `x` in place (summed in f64 over chunks); elsewhere `x.square().sum()`, which makes a
/// tensor of the squares first (for an embedding's gradient, 47 MB of fresh memory a step).
pub fn sum_of_squares(x: Tensor<1>) -> f64 {
    if !on_flex(&x) {
        return x.square().sum().into_scalar::<f32>() as f64;
    }
    let s: Tensor<1> = Tensor::from_dispatch(<Dispatch as CpuOptimOps>::fused_sum_of_squares(
        x.into_dispatch(),
    ));
    s.into_data()
        .try_to_vec::<f64>()
        .ok()
        .and_then(|v| v.first().copied())
        .unwrap_or(f64::NAN)
}

/// Products of a few rows by a large matrix, on the CPU only and never differentiated: the
/// one-token steps of generation.
#[backend_extension(Flex)]
pub trait CpuSkinnyOps: burn::backend::Backend {
    /// [`skinny_matmul`]: `x [m, k] · w [k, n]` for small `m`.
    fn fused_skinny_matmul(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// The most rows [`skinny_matmul`] takes; above it the gemm crate's packed kernel is faster.
pub const SKINNY_ROWS: usize = 4;

/// `x · w` for at most [`SKINNY_ROWS`] rows, split over rayon's threads by blocks of `w`'s
/// columns, reading `w` once in place (row-major, or the transpose of a row-major matrix).
///
/// Why: a generation step multiplies one token's row by every weight matrix. The gemm crate
/// routes that to a matrix-vector loop on a single thread (its `gemv` path takes no
/// parallelism), so the step ran on one core whatever `RAYON_NUM_THREADS` said; and with two
/// to four rows (batched generation, or a few new tokens) it packs the skinny operand as for a
/// large product. Falls back to [`f32_matmul`] for tensors that autodiff tracks, more rows, or
/// another backend.
///
/// # Shapes
/// - x `[m, k]`, w `[k, n]`
/// - output `[m, n]`
pub fn skinny_matmul(x: Tensor<2>, w: Tensor<2>) -> Tensor<2> {
    let untracked = !x.is_tracked() && !w.is_tracked();
    if !on_flex(&x) || x.dims()[0] > SKINNY_ROWS || !untracked {
        return f32_matmul(x, w);
    }
    let autodiff = x.is_autodiff();
    let y = Tensor::from_dispatch(<Dispatch as CpuSkinnyOps>::fused_skinny_matmul(
        x.inner().into_dispatch(),
        w.inner().into_dispatch(),
    ));
    if autodiff { y.autodiff() } else { y }
}

/// The constants of one AdamW step (PyTorch's `torch.optim.AdamW`, `foreach` off).
#[derive(Debug, Clone, Copy)]
pub struct AdamwStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay (0: none).
    pub weight_decay: f64,
    /// The 1-based step number (bias correction).
    pub step: i32,
    /// What the gradient is multiplied by before the update: gradient clipping's coefficient,
    /// applied here rather than in a pass of its own (1: none). The product is the one
    /// [`scale`] and burn's `mul_scalar` make (`g · (c as f32)`), so the update's bits are
    /// those of clipping first.
    pub grad_scale: f64,
}

/// PyTorch's AdamW step on a flattened parameter: decoupled decay, bias-corrected moments, eps
/// outside the square root. Returns the parameter and the new moments `(m, v)`. On the CPU
/// backend it is one pass over the four tensors, with the composed ops' exact f32 arithmetic
/// (the same operations in the same order, scalars rounded to f32 as burn rounds them), so
/// both give the same bits; elsewhere the composed ops run.
///
/// # Shapes
/// - every tensor `[n]`
pub fn adamw(
    p: Tensor<1>,
    g: Tensor<1>,
    m: Tensor<1>,
    v: Tensor<1>,
    s: AdamwStep,
) -> (Tensor<1>, Tensor<1>, Tensor<1>) {
    if !on_flex(&p) {
        return adamw_composed(p, g, m, v, s);
    }
    let c = AdamwConsts::of(&s);
    let (p, m, v) = <Dispatch as CpuOptimOps>::fused_adamw(
        p.into_dispatch(),
        g.into_dispatch(),
        m.into_dispatch(),
        v.into_dispatch(),
        c.decay as f64,
        s.beta1,
        s.beta2,
        c.bc2_sqrt as f64,
        s.eps,
        c.step_size as f64,
        s.grad_scale,
    );
    (
        Tensor::from_dispatch(p),
        Tensor::from_dispatch(m),
        Tensor::from_dispatch(v),
    )
}

/// The AdamW constants rounded to f32, as burn's scalar ops round them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AdamwConsts {
    pub decay: f32,
    pub beta1: f32,
    pub one_minus_beta1: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    pub bc2_sqrt: f32,
    pub eps: f32,
    pub step_size: f32,
    pub grad_scale: f32,
}

impl AdamwConsts {
    /// `decay` is 1 without weight decay (`x · 1` is `x`, as the composed ops' skipped product).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        decay: f64,
        beta1: f64,
        beta2: f64,
        bc2_sqrt: f64,
        eps: f64,
        step_size: f64,
        grad_scale: f64,
    ) -> Self {
        Self {
            decay: decay as f32,
            beta1: beta1 as f32,
            one_minus_beta1: (1.0 - beta1) as f32,
            beta2: beta2 as f32,
            one_minus_beta2: (1.0 - beta2) as f32,
            bc2_sqrt: bc2_sqrt as f32,
            eps: eps as f32,
            step_size: step_size as f32,
            grad_scale: grad_scale as f32,
        }
    }

    fn of(s: &AdamwStep) -> Self {
        let decay = if s.weight_decay > 0.0 {
            1.0 - s.lr * s.weight_decay
        } else {
            1.0
        };
        let bc1 = 1.0 - s.beta1.powi(s.step);
        let bc2_sqrt = (1.0 - s.beta2.powi(s.step)).sqrt();
        Self::new(
            decay,
            s.beta1,
            s.beta2,
            bc2_sqrt,
            s.eps,
            s.lr / bc1,
            s.grad_scale,
        )
    }
}

/// One element of the AdamW step, in the composed ops' order: the gradient scaled, decay, the
/// moments, `sqrt(v) / sqrt(bc2) + eps`, the step. (`g · 1` is `g`: no clipping, no change.)
#[inline(always)]
pub(crate) fn adamw_element(p: &mut f32, g: f32, m: &mut f32, v: &mut f32, c: &AdamwConsts) {
    let g = g * c.grad_scale;
    let decayed = *p * c.decay;
    *m = *m * c.beta1 + g * c.one_minus_beta1;
    *v = *v * c.beta2 + (g * g) * c.one_minus_beta2;
    let denom = v.sqrt() / c.bc2_sqrt + c.eps;
    *p = decayed - (*m / denom) * c.step_size;
}

/// The 8-bit AdamW step on the CPU, one pass per block of [`crate::quant::DQ_BLOCK`] as
/// bitsandbytes' blockwise kernel: the block's moments are dequantised, updated with the
/// parameter by [`adamw`]'s arithmetic, and quantised again by [`Blockwise8::quantize`]'s
/// rule, so the parameter and the codes equal those of dequantise, [`adamw_composed`],
/// quantise. Returns the parameter, on `p`'s device.
///
/// # Shapes
/// - p, g `[n]`; m, v hold `n` values (`m` signed, `v` unsigned)
pub fn adamw_8bit_on_host(
    p: Tensor<1>,
    g: Tensor<1>,
    m: &mut Blockwise8,
    v: &mut Blockwise8,
    s: AdamwStep,
) -> Tensor<1> {
    use crate::quant::{Bucketizer, DQ_BLOCK, dynamic_map_of, quantize_block};
    use rayon::prelude::*;
    let device = p.device();
    let n = p.dims()[0];
    let host = |t: Tensor<1>| crate::weights::tensor_values(t.into_data());
    let (mut ps, gs) = (host(p), host(g));
    let c = AdamwConsts::of(&s);
    let (map_m, map_v) = (dynamic_map_of(true), dynamic_map_of(false));
    let (bounds_m, bounds_v) = (Bucketizer::of(true), Bucketizer::of(false));
    ps.par_chunks_mut(DQ_BLOCK)
        .zip(gs.par_chunks(DQ_BLOCK))
        .zip(
            m.codes
                .par_chunks_mut(DQ_BLOCK)
                .zip(m.absmax.par_iter_mut()),
        )
        .zip(
            v.codes
                .par_chunks_mut(DQ_BLOCK)
                .zip(v.absmax.par_iter_mut()),
        )
        .for_each(|(((p, g), (mc, ma)), (vc, va))| {
            let (mut mb, mut vb) = ([0f32; DQ_BLOCK], [0f32; DQ_BLOCK]);
            let len = p.len();
            for k in 0..len {
                mb[k] = map_m[mc[k] as usize] * *ma;
                vb[k] = map_v[vc[k] as usize] * *va;
                adamw_element(&mut p[k], g[k], &mut mb[k], &mut vb[k], &c);
            }
            *ma = quantize_block(&mb[..len], bounds_m, mc);
            *va = quantize_block(&vb[..len], bounds_v, vc);
        });
    Tensor::from_data(TensorData::new(ps, [n]), &device)
}

/// [`adamw`] in burn's ops (every backend; the CPU's fused pass is tested against it).
pub fn adamw_composed(
    p: Tensor<1>,
    g: Tensor<1>,
    m: Tensor<1>,
    v: Tensor<1>,
    s: AdamwStep,
) -> (Tensor<1>, Tensor<1>, Tensor<1>) {
    let g = if s.grad_scale != 1.0 {
        g.mul_scalar(s.grad_scale)
    } else {
        g
    };
    let p = if s.weight_decay > 0.0 {
        p.mul_scalar(1.0 - s.lr * s.weight_decay)
    } else {
        p
    };
    let m = m.mul_scalar(s.beta1) + g.clone().mul_scalar(1.0 - s.beta1);
    let v = v.mul_scalar(s.beta2) + g.square().mul_scalar(1.0 - s.beta2);
    let bc1 = 1.0 - s.beta1.powi(s.step);
    let bc2 = 1.0 - s.beta2.powi(s.step);
    let denom = v.clone().sqrt().div_scalar(bc2.sqrt()).add_scalar(s.eps);
    let p = p - (m.clone() / denom).mul_scalar(s.lr / bc1);
    (p, m, v)
}

/// `LlamaRMSNorm`: `x / sqrt(mean(x²) + eps) · weight` over the last dimension, in one pass
/// each way on the CPU.
///
/// # Shapes
/// - x `[..., d]`, weight `[d]`
/// - output `[..., d]`
pub fn rms_norm<const D: usize>(x: Tensor<D>, weight: Tensor<1>, eps: f64) -> Tensor<D> {
    if !on_flex(&x) {
        let rms = x.clone().square().mean_dim(D - 1).add_scalar(eps).sqrt();
        return (x / rms) * weight.unsqueeze();
    }
    Tensor::from_dispatch(<Dispatch as CpuFusedOps>::fused_rms_norm(
        x.into_dispatch(),
        weight.into_dispatch(),
        eps,
    ))
}

/// `silu(gate) · up` (LLaMA's `act_fn(gate_proj(x)) * up_proj(x)` with `hidden_act = "silu"`),
/// in one pass each way on the CPU: burn's SiLU calls libm's `expf` per element and, with the
/// product, makes four full-size tensors a pass; on a GPU burn's ops run.
///
/// # Shapes
/// - gate, up `[..., d]`
/// - output `[..., d]`
pub fn swiglu<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    if !on_flex(&gate) || gate.dims() != up.dims() {
        return burn::tensor::activation::silu(gate) * up;
    }
    Tensor::from_dispatch(<Dispatch as CpuFusedOps>::fused_swiglu(
        gate.into_dispatch(),
        up.into_dispatch(),
    ))
}

/// The parts of `joined` along its last dimension, `widths` wide, in order: q, k and v of a
/// checkpoint that joins their projections (GPT-2's `c_attn`, ModernBERT's `Wqkv`, Phi-3's
/// `qkv_proj`), or an MLP's two halves.
///
/// On the CPU each part is a view, and the backward pass writes the parts' gradients into one
/// buffer of the joined shape, handed to autodiff when the last part's has arrived. Why: burn's
/// `slice` makes each part's gradient a zero tensor of the joined shape with the part written
/// in, and autodiff sums them: for q, k and v three full-size tensors and two sums (GPT-2's
/// projection and split on 2048 rows, forward and backward: 84 ms with burn's, 65 ms with
/// this; `time_split_last`). Columns that no part covers get a zero gradient. Every part must
/// reach the loss when `joined` takes a gradient (q, k and v all do): until the last part's
/// gradient arrives `joined` has none, and autodiff stops with "Can't consume the gradients
/// before they are registered".
///
/// # Shapes
/// - joined `[..., Σ widths]`
/// - outputs `[..., widths[i]]`
pub fn split_last<const D: usize, const N: usize>(
    joined: Tensor<D>,
    widths: [usize; N],
) -> [Tensor<D>; N] {
    let mut starts = [0; N];
    for i in 1..N {
        starts[i] = starts[i - 1] + widths[i - 1];
    }
    if !on_flex(&joined) || N < 2 {
        return std::array::from_fn(|i| joined.clone().narrow(D - 1, starts[i], widths[i]));
    }
    let grad = Arc::new(PartsGrad::new(N));
    std::array::from_fn(|i| {
        Tensor::from_dispatch(<Dispatch as CpuFusedOps>::fused_part(
            joined.clone().into_dispatch(),
            starts[i],
            widths[i],
            grad.clone(),
        ))
    })
}

/// The gradient of a tensor that [`split_last`] split, assembled from its parts' gradients.
#[derive(Debug)]
pub struct PartsGrad {
    parts: usize,
    /// The joined gradient's values so far (empty until the first part's arrives), and how many
    /// parts have arrived.
    state: std::sync::Mutex<(Vec<f32>, usize)>,
}

impl PartsGrad {
    fn new(parts: usize) -> Self {
        Self {
            parts,
            state: std::sync::Mutex::new((Vec::new(), 0)),
        }
    }
}

/// `rms_norm(x, norm_weight) · weight`: a pre-norm layer's projection of its normalised input
/// (LLaMA's q, k, v after `input_layernorm`, gate and up after `post_attention_layernorm`).
/// On the CPU the normalised input is not kept for the backward pass, which computes it again
/// from x and the norm's `1 / rms` (x is kept anyway, as the norm's own gradient needs it): the
/// two normalised inputs of a LLaMA layer are `2 · [N, hidden]` (SmolLM2 on 2048 tokens:
/// 9.4 MB a layer). `bf16`: both passes' products with bf16 operands and f32 sums.
///
/// # Shapes
/// - x `[N, d]`, norm_weight `[d]`, weight `[d, out]`
/// - output `[N, out]`
pub fn rms_norm_linear(
    x: Tensor<2>,
    norm_weight: Tensor<1>,
    weight: Tensor<2>,
    eps: f64,
    bf16: bool,
) -> Tensor<2> {
    if !on_flex(&x) || (bf16 && !bf16::available()) {
        let h = rms_norm(x, norm_weight, eps);
        return if bf16 {
            bf16_matmul(h, weight)
        } else {
            f32_matmul(h, weight)
        };
    }
    Tensor::from_dispatch(<Dispatch as CpuFusedOps>::fused_rms_norm_linear(
        x.into_dispatch(),
        norm_weight.into_dispatch(),
        weight.into_dispatch(),
        eps,
        bf16,
    ))
}

/// `(silu(gate) · up) · weight`: LLaMA's `down_proj(act_fn(gate_proj(x)) * up_proj(x))` for a
/// down projection without bias or adapter. On the CPU the gated product is not kept for the
/// backward pass, which computes it again from gate and up (kept by the SwiGLU's own gradient
/// anyway; one more pass over them): it is the largest activation that training keeps of a
/// LLaMA layer, `[N, intermediate]` (SmolLM2 on 4 × 256 tokens: 6.3 MB a layer, 189 MB over
/// its 30 layers). `bf16`: both passes' products with bf16 operands and f32 sums, as
/// [`bf16_matmul`], and gate and up rounded to bf16 first, as autocast's matmul outputs are,
/// and kept in 16 bits (half the memory again); elsewhere composed of the same rounding,
/// [`swiglu`] and the product.
///
/// # Shapes
/// - gate, up `[N, d]`, weight `[d, out]`
/// - output `[N, out]`
pub fn swiglu_linear(gate: Tensor<2>, up: Tensor<2>, weight: Tensor<2>, bf16: bool) -> Tensor<2> {
    if !on_flex(&gate) || gate.dims() != up.dims() || (bf16 && !bf16::available()) {
        if !bf16 {
            return f32_matmul(swiglu(gate, up), weight);
        }
        let gated = swiglu(rounded_to_bf16(gate), rounded_to_bf16(up));
        return bf16_matmul(gated, weight);
    }
    Tensor::from_dispatch(<Dispatch as CpuFusedOps>::fused_swiglu_linear(
        gate.into_dispatch(),
        up.into_dispatch(),
        weight.into_dispatch(),
        bf16,
    ))
}

/// `t`'s values rounded to bf16 (as f32), as autocast's matmul outputs are; the gradient passes
/// through the rounding unrounded, as [`swiglu_linear`]'s CPU kernel passes it
/// (`t + (round(t) − t)` is `round(t)` exactly).
fn rounded_to_bf16<const D: usize>(t: Tensor<D>) -> Tensor<D> {
    let rounded = t.clone().cast(FloatDType::BF16).cast(FloatDType::F32);
    t.clone() + (rounded - t).detach()
}

/// `weight[ids]`, `[B, T, D]` for ids `[B, T]` and a weight `[V, D]`: burn's `embedding`, with
/// a backward pass of its own on the CPU. Why: burn's makes the weight's gradient as a
/// zero-filled `[V, D]` tensor and a scatter into it, which on the CPU backend wrote, and made
/// the kernel zero, every page of a fresh allocation twice a step (BERT's word embedding is
/// 47 MB; with clipping's scale, which wrote every page again, more than half of a MiniLM
/// step's page faults: 3.73M -> 1.62M over 200 steps with [`scale`]). Here the gradient starts as
/// untouched zeroed memory, and only the rows of the ids are written; the optimizer's read of
/// the rest maps the kernel's zero page.
///
/// # Shapes
/// - weight `[V, D]`, ids `[B, T]`
/// - output `[B, T, D]`
pub fn embedding(weight: Tensor<2>, ids: Tensor<2, Int>) -> Tensor<3> {
    if !on_flex(&weight) {
        return burn::tensor::module::embedding(weight, ids);
    }
    Tensor::from_dispatch(<Dispatch as CpuFusedOps>::fused_embedding(
        weight.into_dispatch(),
        ids.into_dispatch(),
    ))
}

/// Rotary position embeddings as transformers' `apply_rotary_pos_emb`: `x · cos +
/// rotate_half(x) · sin` with `rotate_half([x1, x2]) = [−x2, x1]`, in one pass each way on the
/// CPU (burn's ops make two slices, a negation, a concatenation, two products and a sum, each a
/// full-size tensor, for q and k of every layer). The forward pass gives the composed ops' bits.
///
/// # Shapes
/// - x `[B, H, T, hd]`, cos and sin `[B, 1, T, hd]` (constants)
/// - output `[B, H, T, hd]`
pub fn rope(x: Tensor<4>, cos: Tensor<4>, sin: Tensor<4>) -> Tensor<4> {
    let [b, _, t, d] = x.dims();
    if !on_flex(&x) || cos.dims() != [b, 1, t, d] || sin.dims() != [b, 1, t, d] || d % 2 != 0 {
        return rope_composed(x, cos, sin);
    }
    Tensor::from_dispatch(<Dispatch as CpuFusedOps>::fused_rope(
        x.into_dispatch(),
        cos.into_dispatch(),
        sin.into_dispatch(),
    ))
}

/// [`rope`] in burn's ops (every backend; the CPU's fused op is tested against it).
pub fn rope_composed(x: Tensor<4>, cos: Tensor<4>, sin: Tensor<4>) -> Tensor<4> {
    let [b, h, t, d] = x.dims();
    let x1 = x.clone().slice([0..b, 0..h, 0..t, 0..d / 2]);
    let x2 = x.clone().slice([0..b, 0..h, 0..t, d / 2..d]);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * cos + rotated * sin
}

/// `torch.nn.functional.layer_norm` over the last dimension, in one pass each way on the CPU.
///
/// # Shapes
/// - x `[..., d]`, weight and bias `[d]`
/// - output `[..., d]`
pub fn layer_norm<const D: usize>(
    x: Tensor<D>,
    weight: Tensor<1>,
    bias: Tensor<1>,
    eps: f64,
) -> Tensor<D> {
    if !on_flex(&x) {
        return burn::tensor::module::layer_norm(x, weight, Some(bias), eps);
    }
    Tensor::from_dispatch(<Dispatch as CpuFusedOps>::fused_layer_norm(
        x.into_dispatch(),
        weight.into_dispatch(),
        bias.into_dispatch(),
        eps,
    ))
}

/// Exact GELU, `0.5·x·(1 + erf(x/√2))`, as `torch.nn.functional.gelu`.
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if !fused(&x) {
        return burn::tensor::activation::gelu(x);
    }
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_gelu(x.into_dispatch()))
}

/// Inverted dropout in training: each value zeroed with probability `p`, the rest scaled by
/// `1 / (1 - p)`.
pub fn dropout<const D: usize>(x: Tensor<D>, p: f64) -> Tensor<D> {
    if !fused(&x) {
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
    if !fused(&scores) {
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

/// Scaled dot-product attention in training, `dropout(softmax(q·kᵀ·scale + bias))·v`, with
/// grouped key / value heads (each serving `H / KV` query heads, as LLaMA's GQA).
///
/// On the CPU backend the probabilities are not kept for the backward pass: it computes them
/// again from q and k, a block of query rows at a time (see `flex/attention.rs`), k and v are
/// not expanded to every query head, and q, k, v and the output's gradient are read through
/// their strides. That removes the largest activation of a step (`[B, H, Tq, Tk]` per layer)
/// for one more `q·kᵀ` product in the backward pass, and ran twice as fast as the products
/// around [`attention_probs`] (`time_attention`). Under bf16 compute it runs too, its
/// products in f32: autocast would round q, k, v and the probabilities to bf16, so this is
/// the more precise of the two, and faster than the bf16 products around the probabilities
/// (`time_attention`). Elsewhere (GPUs, f16 compute) k and v are expanded and the products
/// and [`attention_probs`] run as burn's ops. The dropout mask is the same for a seed on both
/// paths.
///
/// # Shapes
/// - q `[B, H, Tq, hd]`, k and v `[B, KV, Tk, hd]`, H a multiple of KV
/// - bias `[B, 1, Tq, Tk]`
/// - output `[B, H, Tq, hd]`
pub fn attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    bias: Tensor<4>,
    scale: f32,
    p: f64,
) -> Tensor<4> {
    if !segments_apply(&q) {
        return attention_composed(q, k, v, bias, scale, p);
    }
    attention_kernel([q, k, v], bias, None, scale, p)
}

/// The CPU attention kernel, its dropout seed drawn here.
fn attention_kernel(
    [q, k, v]: [Tensor<4>; 3],
    bias: Tensor<4>,
    segments: Option<Arc<Segments>>,
    scale: f32,
    p: f64,
) -> Tensor<4> {
    let seed = if p > 0.0 { draw_seed(&q.device()) } else { 0 };
    Tensor::from_dispatch(<Dispatch as CpuFusedOps>::fused_attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        bias.into_dispatch(),
        segments,
        scale,
        p,
        seed,
    ))
}

/// The examples of a padding-free batch as [`attention_segments`] reads them: each a run of
/// consecutive tokens of the flattened batch and of one padded row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segments {
    /// The padded batch `[rows, cols]` whose attention bias (`[rows, 1, cols, cols]`) and
    /// dropout mask the examples take.
    pub rows: usize,
    pub cols: usize,
    pub list: Vec<Segment>,
}

/// One example: tokens `start..start + len` of the flattened batch, columns
/// `col..col + len` of padded row `row`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub start: usize,
    pub len: usize,
    pub row: usize,
    pub col: usize,
}

/// [`attention`] over a padding-free batch on the CPU: each example of `segments` attends
/// within its own tokens, read in place from the flattened projections, with the padded batch's
/// bias and dropout mask, so the result is the padded call's on the real tokens up to float
/// rounding. What it saves: scattering q, k and v into padded rows and gathering the output
/// back (and both again in the backward pass), and the products over the padding. Only where
/// [`attention`] runs its CPU kernel ([`segments_apply`]).
///
/// # Shapes
/// - q `[1, H, N, hd]`, k and v `[1, KV, N, hd]` (the heads of `[1, N, ·]` projections)
/// - bias `[rows, 1, cols, cols]`
/// - output `[1, H, N, hd]`
pub fn attention_segments(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    bias: Tensor<4>,
    segments: &Arc<Segments>,
    scale: f32,
    p: f64,
) -> Tensor<4> {
    attention_kernel([q, k, v], bias, Some(segments.clone()), scale, p)
}

/// Whether [`attention_segments`] can run for tensors on `x`'s device now: where [`attention`]
/// runs its CPU kernel (the CPU backend, in f32 or under bf16 compute).
pub fn segments_apply<const D: usize>(x: &Tensor<D>) -> bool {
    on_flex(x) && !matches!(crate::precision::compute(), Some(dt) if dt != FloatDType::BF16)
}

/// [`attention`] as two products around [`attention_probs`], k and v expanded to every query
/// head.
fn attention_composed(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    bias: Tensor<4>,
    scale: f32,
    p: f64,
) -> Tensor<4> {
    let group = q.dims()[1] / k.dims()[1].max(1);
    let (k, v) = (
        crate::layers::repeat_kv(k, group),
        crate::layers::repeat_kv(v, group),
    );
    // (B, H, Tq, hd) x (B, H, hd, Tk) -> (B, H, Tq, Tk)
    let scores = crate::precision::matmul(q, k.swap_dims(2, 3));
    let probs = attention_probs(scores, bias, scale, p);
    // (B, H, Tq, Tk) x (B, H, Tk, hd) -> (B, H, Tq, hd)
    crate::precision::matmul(probs, v)
}

/// Cross-entropy summed over rows: `Σ_r −log softmax(logits[r])[targets[r]]`.
///
/// # Shapes
/// - logits `[N, C]`, `targets.len() == N`
/// - output `[1]`
pub fn cross_entropy_sum(logits: Tensor<2>, targets: &[u32]) -> Tensor<1> {
    if !fused(&logits) {
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

/// Cross-entropy summed over rows of the logits `hidden · weightᵀ`, without the `[N, V]`
/// logits: `Σ_r −log softmax(hidden[r] · weightᵀ)[targets[r]]`, a language model's loss through
/// its LM head (Liger's fused linear cross-entropy; Wijmans et al. 2024's cut cross-entropy).
///
/// Why: the logits of a 4 × 256-token batch over a 49152-word vocabulary are 200 MB, kept from
/// the forward pass to the backward, and their gradient is another 200 MB; together the largest
/// tensors of a small model's step. On the CPU, with a frozen weight (LoRA and the other
/// adapters, DPO, evaluation), the rows go through in chunks of 256: each chunk's logits are
/// computed, turned into the loss and in place into its gradient (softmax − onehot), which is
/// multiplied into the hidden rows' gradient before the next chunk reuses the buffer. The
/// backward pass then only scales that by the upstream gradient, so there is no second
/// vocabulary product.
///
/// A weight that trains (full fine-tuning) gets its gradient in the same pass, summed chunk by
/// chunk: a product per chunk that reads and writes the whole `[V, D]` gradient, which timed
/// alone is slower than one product over all rows, but keeps the logits and their gradient
/// out of the step's peak memory (see BENCHMARKS.md, session 16; session 13's measurement
/// that this did not lower the peak was hidden by a larger peak when the model was saved).
/// Under a bf16 compute scope on a CPU with AVX512-BF16 the chunks' products take bf16
/// operands, as [`bf16_matmul`] rounds them in both passes (on AMX the weight is packed once
/// for all chunks). A GPU and other 16-bit scopes take the logits and [`cross_entropy_sum`].
///
/// # Shapes
/// - hidden `[N, D]`, weight `[V, D]`, `targets.len() == N`
/// - output `[1]`
pub fn linear_cross_entropy_sum(
    hidden: Tensor<2>,
    weight: Tensor<2>,
    targets: &[u32],
) -> Tensor<1> {
    // The chunked kernel's products: f32, or bf16 where the CPU has the instructions.
    let bf16 = match crate::precision::compute() {
        None => Some(false),
        Some(FloatDType::BF16) if bf16::available() => Some(true),
        Some(_) => None,
    };
    let Some(bf16) = bf16.filter(|_| on_flex(&hidden)) else {
        let logits = crate::precision::matmul(hidden, weight.transpose());
        return cross_entropy_sum(logits, targets);
    };
    let weight_grad = weight.is_tracked();
    Tensor::from_dispatch(<Dispatch as CpuFusedOps>::fused_linear_cross_entropy_sum(
        hidden.into_dispatch(),
        weight.into_dispatch(),
        targets.to_vec(),
        weight_grad,
        bf16,
    ))
}

/// `x · Wᵀ` with a frozen quantised weight `W` `[out, in]`: the product a QLoRA base layer
/// computes. Only `x` gets a gradient. With the fused kernels the f32 weight exists only while
/// one matmul runs (it is dequantised again in the backward pass, as bitsandbytes' `MatMul4Bit`
/// does); on other backends it is dequantised into a constant tensor.
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
    let y: Tensor<2> = if fused(&x2) {
        Tensor::from_dispatch(<Dispatch as FusedOps>::fused_quant_matmul(
            x2.into_dispatch(),
            w.clone(),
        ))
    } else {
        let device = x2.device();
        let wt = Tensor::<2>::from_data(TensorData::new(w.dequantize(), [rows, cols]), &device)
            .cast(x2.dtype());
        f32_matmul(x2, wt.transpose())
    };
    y.reshape(out_dims)
}

/// `a · b` over the last two dimensions with the operands rounded to bf16 and the sums kept in
/// f32, as a matrix product under `torch.autocast(device_type="cpu", dtype=torch.bfloat16)`;
/// inputs, output and gradients are f32. On the CPU backend of a CPU with AVX512-BF16
/// ([`bf16::available`]) it runs the [`bf16`] kernel in both passes (no bf16 tensor is ever
/// made); elsewhere the composed casts and matmul compute it.
///
/// # Shapes
/// - a `[..., m, k]`, b `[..., k, n]`, the leading dimensions equal
/// - output `[..., m, n]`
pub fn bf16_matmul<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> Tensor<D> {
    let (da, db) = (a.dims(), b.dims());
    if !on_flex(&a) || !bf16::available() || da[..D - 2] != db[..D - 2] {
        let bf = burn::tensor::FloatDType::BF16;
        return a
            .cast(bf)
            .matmul(b.cast(bf))
            .cast(burn::tensor::FloatDType::F32);
    }
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_matmul(
        a.into_dispatch(),
        b.into_dispatch(),
        true,
    ))
}

/// `a · b` over the last two dimensions in f32, as PyTorch's f32 matmul computes it by default
/// (`torch.backends.cuda.matmul.allow_tf32` is false). On a CUDA device with TF32 (Ampere and
/// newer) burn's matmul would not: cubek-matmul 0.3.1 stages f32 operands as TF32 (10 mantissa
/// bits of f32's 23) in every tensor-core kernel whenever the device has the type
/// (`adjust_dtypes`), with no switch to turn it off. There this runs cubek's kernels that use
/// no tensor cores, in both passes, unless TF32 is allowed ([`crate::precision::set_tf32`],
/// `training.tf32`). Elsewhere (the CPU, devices without TF32, other float types) it is burn's
/// matmul.
///
/// # Shapes
/// - a `[..., m, k]`, b `[..., k, n]`, the leading dimensions broadcasting
/// - output `[..., m, n]`
pub fn f32_matmul<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> Tensor<D> {
    let f32 = burn::tensor::DType::F32;
    if !(avoids_tf32(&a) || on_flex(&a)) || a.dtype() != f32 || b.dtype() != f32 {
        return a.matmul(b);
    }
    let (mut da, mut db) = (a.dims(), b.dims());
    let (a, b) = if da[..D - 2] == db[..D - 2] {
        (a, b)
    } else {
        for i in 0..D - 2 {
            let n = da[i].max(db[i]);
            (da[i], db[i]) = (n, n);
        }
        (a.expand(da), b.expand(db))
    };
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_matmul(
        a.into_dispatch(),
        b.into_dispatch(),
        false,
    ))
}

/// bitsandbytes' blockwise 8-bit quantisation ([`Blockwise8::quantize`]) computed on the device
/// `values` live on, when it runs the CubeCL kernels: `(words, absmax)`, the codes four to a u32
/// word, the same codes and maxima as the host's. None elsewhere: the CPU backend quantises on
/// the host, whose memory is its own.
pub(crate) fn blockwise8_quantize(
    values: &Tensor<1>,
    signed: bool,
) -> Option<(Tensor<1, Int>, Tensor<1>)> {
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    if on_cube(&values.device()) {
        use burn_cubecl::CubeBackend;
        if let Ok(x) = values.clone().inner().try_into_primitive::<CubeBackend>() {
            let (words, absmax) = cube::blockwise8_quantize(x, signed);
            return Some((
                Tensor::from_primitive::<CubeBackend>(words),
                Tensor::from_primitive::<CubeBackend>(absmax),
            ));
        }
    }
    #[cfg(not(any(feature = "wgpu", feature = "cuda")))]
    let _ = (values, signed);
    None
}

/// Host values `q` uploaded as [`blockwise8_quantize`] lays them out, onto `device` when it runs
/// the CubeCL kernels; None elsewhere.
pub(crate) fn blockwise8_upload(
    q: &Blockwise8,
    device: &burn::tensor::Device,
) -> Option<(Tensor<1, Int>, Tensor<1>)> {
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    if on_cube(device) {
        let device = device.clone().inner();
        if let DispatchDevice::Cube(cube_device) = device.as_dispatch() {
            let (words, absmax) = cube::blockwise8_upload(q, cube_device);
            return Some((
                Tensor::from_primitive::<burn_cubecl::CubeBackend>(words),
                Tensor::from_primitive::<burn_cubecl::CubeBackend>(absmax),
            ));
        }
    }
    #[cfg(not(any(feature = "wgpu", feature = "cuda")))]
    let _ = (q, device);
    None
}

/// The `len` values that [`blockwise8_quantize`]'s `(words, absmax)` stand for, `[len]` f32,
/// dequantised by a kernel on their device; None on a device without the kernels.
pub(crate) fn blockwise8_dequantize(
    words: Tensor<1, Int>,
    absmax: Tensor<1>,
    len: usize,
    signed: bool,
) -> Option<Tensor<1>> {
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    if on_cube(&absmax.device()) {
        use burn_cubecl::CubeBackend;
        if let (Ok(w), Ok(a)) = (
            words.clone().try_into_primitive::<CubeBackend>(),
            absmax.clone().try_into_primitive::<CubeBackend>(),
        ) {
            return Some(Tensor::from_primitive::<CubeBackend>(
                cube::blockwise8_dequantize(w, a, len, signed),
            ));
        }
    }
    #[cfg(not(any(feature = "wgpu", feature = "cuda")))]
    let _ = (words, absmax, len, signed);
    None
}

/// Whether f32 products on the device of `x` take [`f32_matmul`]'s own path to stay f32: a GPU
/// runtime whose device has TF32, TF32 not allowed ([`crate::precision::set_tf32`]), whet's
/// kernels on. burn's fused attention is then left out too (`layers::scaled_dot_product`).
pub fn avoids_tf32<const D: usize>(x: &Tensor<D>) -> bool {
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    if !crate::precision::tf32()
        && on_cube(&x.device())
        && let Ok(t) = x
            .clone()
            .inner()
            .try_into_primitive::<burn_cubecl::CubeBackend>()
    {
        return cube::has_tf32(&t);
    }
    #[cfg(not(any(feature = "wgpu", feature = "cuda")))]
    let _ = x;
    false
}

/// Whether `device` has TF32 (a CUDA device of the Ampere generation or newer), which burn's
/// matrix products use for f32 operands there (see [`f32_matmul`]).
pub fn has_tf32(device: &burn::tensor::Device) -> bool {
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    if matches!(
        device.clone().inner().as_dispatch(),
        DispatchDevice::Cube(_)
    ) {
        let probe = Tensor::<1>::zeros([1], &device.clone().inner());
        if let Ok(t) = probe.try_into_primitive::<burn_cubecl::CubeBackend>() {
            return cube::has_tf32(&t);
        }
    }
    #[cfg(not(any(feature = "wgpu", feature = "cuda")))]
    let _ = device;
    false
}

/// `WHET_KERNELS=off`: burn's composed ops everywhere (to compare the two paths).
fn kernels_off() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OFF.get_or_init(|| std::env::var("WHET_KERNELS").is_ok_and(|v| v == "off"))
}

/// Whether `device` runs the CubeCL kernels (a GPU runtime, kernels not turned off).
#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn on_cube(device: &burn::tensor::Device) -> bool {
    !kernels_off()
        && matches!(
            device.clone().inner().as_dispatch(),
            DispatchDevice::Cube(_)
        )
}

/// Whether a tensor lives on a backend these kernels are written for: the CPU backend, and with
/// the `wgpu` or `cuda` feature the CubeCL one. `WHET_KERNELS=off` takes burn's composed ops
/// everywhere (to compare the two paths).
fn fused<const D: usize>(x: &Tensor<D>) -> bool {
    if kernels_off() {
        return false;
    }
    match x.device().inner().as_dispatch() {
        DispatchDevice::Flex(_) => true,
        #[cfg(any(feature = "wgpu", feature = "cuda"))]
        DispatchDevice::Cube(_) => true,
        #[allow(unreachable_patterns)]
        _ => false,
    }
}

/// Whether the CPU kernels serve a tensor: it lives on the CPU backend and `WHET_KERNELS` does
/// not turn them off (callers of [`adamw_8bit_on_host`] check it).
pub fn on_cpu_kernels<const D: usize>(x: &Tensor<D>) -> bool {
    on_flex(x)
}

/// Whether a tensor lives on the CPU backend with the kernels on (the CPU-only fused ops).
fn on_flex<const D: usize>(x: &Tensor<D>) -> bool {
    !kernels_off() && matches!(x.device().inner().as_dispatch(), DispatchDevice::Flex(_))
}

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

    /// Whether every element is kept (no dropout): the mask is the identity.
    pub fn keeps_all(&self) -> bool {
        self.threshold >= 1 << 24
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
    fn cpu(device: &burn::tensor::Device) -> burn::tensor::Device {
        if crate::device::is_flex(device) {
            device.clone()
        } else {
            burn::tensor::Device::flex()
        }
    }
    // Drawn on the CPU (see `device::random`): the same seeds on every device, and no read-back
    // from a GPU at each dropout layer.
    let r = crate::device::random(
        [2],
        burn::tensor::Distribution::Uniform(0.0, 1.0),
        &cpu(device),
    );
    let v: Vec<f32> = r
        .into_data()
        .convert::<f32>()
        .try_to_vec()
        .unwrap_or_default();
    let bits = |x: Option<&f32>| (x.copied().unwrap_or(0.0) * (1u32 << 24) as f32) as u64;
    bits(v.first()) | (bits(v.get(1)) << 24)
}

/// What a backend supplies so that `Autodiff` over it can differentiate the fused ops: each
/// forward, returning what its backward pass keeps, and each backward pass.
trait Kernels: Backend {
    /// The layout the kernels read (dense f32 on the CPU, contiguous on a device), applied
    /// once to a differentiated input so that the backward pass keeps it in that form.
    fn prepare(x: FloatTensor<Self>) -> FloatTensor<Self>;
    fn gelu(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// `grad · GELU'(x)`.
    fn gelu_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self>;
    /// `x ⊙ mask` (the backward pass of dropout is dropout of the gradient).
    fn dropout(x: FloatTensor<Self>, mask: DropMask) -> FloatTensor<Self>;
    /// `(probabilities before dropout, output)`.
    fn attention_probs(
        scores: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        scale: f32,
        mask: DropMask,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// The gradient of the scores from the probabilities before dropout.
    fn attention_probs_backward(
        probs: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        scale: f32,
        mask: DropMask,
    ) -> FloatTensor<Self>;
    /// The targets as a `[N]` u32 tensor on the device of `like`.
    fn targets(targets: &[u32], like: &FloatTensor<Self>) -> IntTensor<Self>;
    /// `(loss [1], row log-sum-exp [N])`.
    fn cross_entropy(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// `grad · (softmax(logits) − onehot(targets))`, `grad` of shape `[1]`.
    fn cross_entropy_backward(
        logits: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        targets: IntTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
    /// `x [N, in] · Wᵀ`.
    fn quant_matmul(x: FloatTensor<Self>, w: &Arc<QuantMatrix>) -> FloatTensor<Self>;
    /// `dy [N, out] · W`.
    fn quant_matmul_backward(dy: FloatTensor<Self>, w: &Arc<QuantMatrix>) -> FloatTensor<Self>;
    /// `lhs · rhs` in f32 with f32 operands (see [`f32_matmul`]): by default burn's matmul.
    fn f32_matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::float_matmul(lhs, rhs)
    }
    /// `lhs · rhs` with bf16 operands and f32 sums (see [`bf16_matmul`]): by default burn's
    /// own casts and matmul.
    fn bf16_matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        use burn::tensor::FloatDType::{BF16, F32};
        let product = Self::float_matmul(Self::float_cast(lhs, BF16), Self::float_cast(rhs, BF16));
        Self::float_cast(product, F32)
    }
}

/// A new buffer of `batches` products of `size` values each, filled by `product(i, dst,
/// threads)` without being zeroed first: one product over all threads (`threads` true), or
/// several, one a thread. Products that store every value of their output use it to skip the
/// `memset` of a zeroed buffer (bf16 on AMX tiles, f32 by the `gemm` crate: 3-5% of a training
/// step each).
///
/// # Safety
/// `product(i, dst, _)` writes all `size` values at `dst` (valid for exactly those) and reads
/// none of them before writing.
unsafe fn new_products(
    batches: usize,
    size: usize,
    product: impl Fn(usize, *mut f32, bool) + Sync,
) -> Vec<f32> {
    /// The buffer's start, shared by rayon's tasks, each writing its own product.
    #[derive(Clone, Copy)]
    struct Start(*mut f32);
    // SAFETY: the tasks write disjoint ranges of the buffer (one product each).
    unsafe impl Send for Start {}
    unsafe impl Sync for Start {}
    impl Start {
        /// Through a method, so that a closure captures the whole `Start`.
        fn at(self, i: usize) -> *mut f32 {
            self.0.wrapping_add(i)
        }
    }
    use rayon::prelude::*;
    let len = batches * size;
    let mut out = Vec::<f32>::with_capacity(len);
    let start = Start(out.as_mut_ptr());
    if size > 0 {
        if batches > 1 {
            (0..batches)
                .into_par_iter()
                .for_each(|i| product(i, start.at(i * size), false));
        } else if batches == 1 {
            product(0, start.at(0), true);
        }
    }
    // SAFETY: every product wrote its `size` values (the caller's contract), all `len` of them.
    unsafe { out.set_len(len) };
    out
}

/// What the CPU backend supplies for [`CpuFusedOps`]: forwards returning what their backward
/// passes keep, and the backward passes.
trait CpuKernels: Kernels {
    /// q, k or v as [`attention`] reads them, applied once to each so that the backward pass
    /// keeps them in that form: on the CPU, the heads views that `split_heads` makes are read
    /// through their strides, not copied.
    fn prepare_heads(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// [`attention`]'s output; its backward pass keeps only the inputs.
    fn attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: (FloatTensor<Self>, Option<&Segments>),
        scale: f32,
        mask: DropMask,
    ) -> FloatTensor<Self>;
    /// `(dq, dk, dv)` of [`attention`] from `[q, k, v, bias]` as the forward pass had them.
    fn attention_backward(
        inputs: [FloatTensor<Self>; 4],
        segments: Option<&Segments>,
        dout: FloatTensor<Self>,
        scale: f32,
        mask: DropMask,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
    /// `(loss [1], dloss/dhidden, dloss/dweight)` of [`linear_cross_entropy_sum`] with
    /// `weight` `[V, D]`; `grads`: whether to compute the gradients at all, and the weight's;
    /// `bf16`: the products with bf16 operands, as [`bf16_matmul`]'s in both passes.
    fn linear_cross_entropy(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: &[u32],
        grads: (bool, bool),
        bf16: bool,
    ) -> (
        FloatTensor<Self>,
        Option<FloatTensor<Self>>,
        Option<FloatTensor<Self>>,
    );
    /// `t · by` for `by` of shape `[1]`.
    fn scale_by(t: FloatTensor<Self>, by: FloatTensor<Self>) -> FloatTensor<Self>;
    /// The gradient `[vocab, D]` of [`embedding`]'s weight for the output gradient `dout`
    /// `[B, T, D]`: row `v` sums the rows of `dout` at the positions holding id `v`.
    fn embedding_grad(
        dout: FloatTensor<Self>,
        ids: IntTensor<Self>,
        vocab: usize,
    ) -> FloatTensor<Self>;
    /// [`rope`] of `[B, H, T, hd]` with `[B, 1, T, hd]` tables; `backward`: its transpose,
    /// the input gradient of an output gradient.
    fn rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        backward: bool,
    ) -> FloatTensor<Self>;
    /// Writes the gradient of a [`split_last`] part starting at column `start` into `grad`;
    /// the whole gradient (of shape `joined`) once every part's has arrived.
    fn write_part(
        grad: &PartsGrad,
        start: usize,
        dpart: FloatTensor<Self>,
        joined: burn::tensor::Shape,
    ) -> Option<FloatTensor<Self>>;
    /// `x` rounded to bf16 and stored in 16 bits, as the bf16 products round their operands.
    fn round_bf16(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// `silu(gate) · up` (f32); gate and up both f32, or both bf16 from [`Self::round_bf16`].
    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self>;
    /// `(dgate, dup)` of [`swiglu`] (f32), gate and up as [`Self::swiglu`] takes them.
    fn swiglu_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        dy: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// `(output, 1 / rms per row [rows])`.
    fn rms_norm(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        eps: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// `(dx, dweight)`.
    fn rms_norm_backward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        rstd: FloatTensor<Self>,
        dy: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// `(output, (mean, 1 / std) per row [rows, 2])`.
    fn layer_norm(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        b: FloatTensor<Self>,
        eps: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// `(dx, dweight, dbias)`.
    fn layer_norm_backward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        dy: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

impl CpuFusedOps for Flex {
    fn fused_part(
        joined: FloatTensor<Self>,
        start: usize,
        width: usize,
        _grad: Arc<PartsGrad>,
    ) -> FloatTensor<Self> {
        let last = joined.shape().num_dims() - 1;
        joined.narrow(last, start, width)
    }

    fn fused_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        segments: Option<Arc<Segments>>,
        scale: f32,
        p: f64,
        seed: u64,
    ) -> FloatTensor<Self> {
        let mask = DropMask::new(p, seed);
        <Self as CpuKernels>::attention(q, k, v, (bias, segments.as_deref()), scale, mask)
    }

    fn fused_linear_cross_entropy_sum(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: Vec<u32>,
        _weight_grad: bool,
        bf16: bool,
    ) -> FloatTensor<Self> {
        <Self as CpuKernels>::linear_cross_entropy(hidden, weight, &targets, (false, false), bf16).0
    }

    fn fused_rms_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self> {
        <Self as CpuKernels>::rms_norm(x, weight, eps as f32).0
    }

    fn fused_layer_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self> {
        <Self as CpuKernels>::layer_norm(x, weight, bias, eps as f32).0
    }

    fn fused_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        <Self as CpuKernels>::swiglu(gate, up)
    }

    fn fused_swiglu_linear(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bf16: bool,
    ) -> FloatTensor<Self> {
        swiglu_product::<Self>(gate, up, weight, bf16)
    }

    fn fused_rms_norm_linear(
        x: FloatTensor<Self>,
        norm_weight: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        eps: f64,
        bf16: bool,
    ) -> FloatTensor<Self> {
        let (h, _) = <Self as CpuKernels>::rms_norm(x, norm_weight, eps as f32);
        product::<Self>(h, weight, bf16)
    }

    fn fused_embedding(weight: FloatTensor<Self>, ids: IntTensor<Self>) -> FloatTensor<Self> {
        <Self as burn::backend::ops::ModuleOps<Self>>::embedding(weight, ids)
    }

    fn fused_rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        <Self as CpuKernels>::rope(x, cos, sin, false)
    }
}

impl<B: CpuKernels, C: CheckpointStrategy> CpuFusedOps for Autodiff<B, C> {
    fn fused_part(
        joined: FloatTensor<Self>,
        start: usize,
        width: usize,
        grad: Arc<PartsGrad>,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct PartBackward;

        impl<B: CpuKernels> Backward<B, 1> for PartBackward {
            /// The part's first column, the joined shape, the gradient the parts share.
            type State = (usize, burn::tensor::Shape, Arc<PartsGrad>);

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let [joined_node] = ops.parents;
                let dpart = grads.consume::<B>(&ops.node);
                let (start, shape, grad) = ops.state;
                if let Some(node) = joined_node
                    && let Some(whole) = B::write_part(&grad, start, dpart, shape)
                {
                    grads.register::<B>(node.id, whole);
                }
            }
        }

        let slice = |t: FloatTensor<B>| {
            let shape = t.shape();
            let last = shape.num_dims() - 1;
            let ranges: Vec<burn::tensor::Slice> = (0..=last)
                .map(|i| match i == last {
                    true => (start..start + width).into(),
                    false => (0..shape[i]).into(),
                })
                .collect();
            (B::float_slice(t, &ranges), shape)
        };
        match PartBackward
            .prepare::<C>([joined.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (part, shape) = slice(joined.into_primitive());
                prep.finish((start, shape, grad), part)
            }
            OpsKind::UnTracked(prep) => prep.finish(slice(joined.into_primitive()).0),
        }
    }

    fn fused_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        segments: Option<Arc<Segments>>,
        scale: f32,
        p: f64,
        seed: u64,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct AttentionBackward;

        impl<B: CpuKernels> Backward<B, 3> for AttentionBackward {
            /// q, k, v and the bias as the forward pass read them; the segments; scale;
            /// dropout mask.
            type State = ([FloatTensor<B>; 4], Option<Arc<Segments>>, f32, DropMask);

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let dout = grads.consume::<B>(&ops.node);
                let (inputs, segments, scale, mask) = ops.state;
                let (dq, dk, dv) =
                    B::attention_backward(inputs, segments.as_deref(), dout, scale, mask);
                for (node, g) in ops.parents.into_iter().zip([dq, dk, dv]) {
                    if let Some(node) = node {
                        grads.register::<B>(node.id, g);
                    }
                }
            }
        }

        // The bias is a constant (a mask): it takes no gradient even if it is tracked.
        let bias = B::prepare(bias.into_primitive());
        let mask = DropMask::new(p, seed);
        match AttentionBackward
            .prepare::<C>([q.node(), k.node(), v.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let [q, k, v] = [q, k, v].map(|x| B::prepare_heads(x.into_primitive()));
                let out = <B as CpuKernels>::attention(
                    q.clone(),
                    k.clone(),
                    v.clone(),
                    (bias.clone(), segments.as_deref()),
                    scale,
                    mask,
                );
                prep.finish(([q, k, v, bias], segments, scale, mask), out)
            }
            OpsKind::UnTracked(prep) => {
                let [q, k, v] = [q, k, v].map(|x| x.into_primitive());
                let bias = (bias, segments.as_deref());
                prep.finish(<B as CpuKernels>::attention(q, k, v, bias, scale, mask))
            }
        }
    }

    fn fused_linear_cross_entropy_sum(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: Vec<u32>,
        weight_grad: bool,
        bf16: bool,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct LinearCrossEntropyBackward;

        impl<B: CpuKernels> Backward<B, 2> for LinearCrossEntropyBackward {
            /// The loss's gradients for the hidden rows and the weight (at an upstream gradient
            /// of 1), computed in the forward pass.
            type State = (Option<FloatTensor<B>>, Option<FloatTensor<B>>);

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let g = grads.consume::<B>(&ops.node);
                let [h_node, w_node] = ops.parents;
                let (dh, dw) = ops.state;
                for (node, d) in [(h_node, dh), (w_node, dw)] {
                    if let (Some(node), Some(d)) = (node, d) {
                        grads.register::<B>(node.id, B::scale_by(d, g.clone()));
                    }
                }
            }
        }

        match LinearCrossEntropyBackward
            .prepare::<C>([hidden.node(), weight.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let h = B::prepare(hidden.into_primitive());
                let (loss, dh, dw) = <B as CpuKernels>::linear_cross_entropy(
                    h,
                    weight.into_primitive(),
                    &targets,
                    (true, weight_grad),
                    bf16,
                );
                prep.finish((dh, dw), loss)
            }
            OpsKind::UnTracked(prep) => {
                let (h, w) = (hidden.into_primitive(), weight.into_primitive());
                prep.finish(
                    <B as CpuKernels>::linear_cross_entropy(h, w, &targets, (false, false), bf16).0,
                )
            }
        }
    }

    fn fused_rms_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct RmsNormBackward;

        impl<B: CpuKernels> Backward<B, 2> for RmsNormBackward {
            /// The input, the weight, 1 / rms per row.
            type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let [x_node, w_node] = ops.parents;
                let dy = grads.consume::<B>(&ops.node);
                let (x, w, rstd) = ops.state;
                let (dx, dw) = B::rms_norm_backward(x, w, rstd, dy);
                if let Some(node) = x_node {
                    grads.register::<B>(node.id, dx);
                }
                if let Some(node) = w_node {
                    grads.register::<B>(node.id, dw);
                }
            }
        }

        let eps = eps as f32;
        match RmsNormBackward
            .prepare::<C>([x.node(), weight.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (x, w) = (
                    B::prepare(x.into_primitive()),
                    B::prepare(weight.into_primitive()),
                );
                let (y, rstd) = <B as CpuKernels>::rms_norm(x.clone(), w.clone(), eps);
                prep.finish((x, w, rstd), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(
                <B as CpuKernels>::rms_norm(x.into_primitive(), weight.into_primitive(), eps).0,
            ),
        }
    }

    fn fused_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct SwigluBackward;

        impl<B: CpuKernels> Backward<B, 2> for SwigluBackward {
            /// The gate and the up projection.
            type State = (FloatTensor<B>, FloatTensor<B>);

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let [gate_node, up_node] = ops.parents;
                let dy = grads.consume::<B>(&ops.node);
                let (gate, up) = ops.state;
                let (dgate, dup) = B::swiglu_backward(gate, up, dy);
                for (node, g) in [(gate_node, dgate), (up_node, dup)] {
                    if let Some(node) = node {
                        grads.register::<B>(node.id, g);
                    }
                }
            }
        }

        match SwigluBackward
            .prepare::<C>([gate.node(), up.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (gate, up) = (
                    B::prepare(gate.into_primitive()),
                    B::prepare(up.into_primitive()),
                );
                let y = <B as CpuKernels>::swiglu(gate.clone(), up.clone());
                prep.finish((gate, up), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(<B as CpuKernels>::swiglu(
                gate.into_primitive(),
                up.into_primitive(),
            )),
        }
    }

    fn fused_rms_norm_linear(
        x: FloatTensor<Self>,
        norm_weight: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        eps: f64,
        bf16: bool,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct RmsNormLinearBackward;

        impl<B: CpuKernels> Backward<B, 3> for RmsNormLinearBackward {
            /// The norm's input, weight and `1 / rms` per row; the projection's weight when the
            /// norm's input or weight takes a gradient; eps; whether the products are bf16.
            type State = ([FloatTensor<B>; 3], Option<FloatTensor<B>>, f32, bool);

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let [x_node, norm_node, weight_node] = ops.parents;
                let dy = grads.consume::<B>(&ops.node);
                let ([x, norm_weight, rstd], weight, eps, bf16) = ops.state;
                let transposed = |t: FloatTensor<B>| B::float_swap_dims(t, 0, 1);
                if let Some(node) = weight_node {
                    // The normalised input again, where the forward pass let it go:
                    // [N, d]ᵀ · [N, out] -> [d, out]
                    let (h, _) = B::rms_norm(x.clone(), norm_weight.clone(), eps);
                    let dw = product::<B>(transposed(h), dy.clone(), bf16);
                    grads.register::<B>(node.id, dw);
                }
                if let Some(weight) = weight {
                    // [N, out] · [out, d] -> [N, d]
                    let dh = product::<B>(dy, transposed(weight), bf16);
                    let (dx, dnorm) = B::rms_norm_backward(x, norm_weight, rstd, dh);
                    for (node, g) in [(x_node, dx), (norm_node, dnorm)] {
                        if let Some(node) = node {
                            grads.register::<B>(node.id, g);
                        }
                    }
                }
            }
        }

        let eps = eps as f32;
        let inputs_tracked = x.is_tracked() || norm_weight.is_tracked();
        match RmsNormLinearBackward
            .prepare::<C>([x.node(), norm_weight.node(), weight.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (x, norm_weight) = (
                    B::prepare(x.into_primitive()),
                    B::prepare(norm_weight.into_primitive()),
                );
                let weight = weight.into_primitive();
                let (h, rstd) = <B as CpuKernels>::rms_norm(x.clone(), norm_weight.clone(), eps);
                let out = product::<B>(h, weight.clone(), bf16);
                let kept = inputs_tracked.then_some(weight);
                prep.finish(([x, norm_weight, rstd], kept, eps, bf16), out)
            }
            OpsKind::UnTracked(prep) => {
                let (h, _) = <B as CpuKernels>::rms_norm(
                    x.into_primitive(),
                    norm_weight.into_primitive(),
                    eps,
                );
                prep.finish(product::<B>(h, weight.into_primitive(), bf16))
            }
        }
    }

    fn fused_swiglu_linear(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bf16: bool,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct SwigluLinearBackward;

        impl<B: CpuKernels> Backward<B, 3> for SwigluLinearBackward {
            /// The gate and the up projection (bf16 with bf16 products); the weight when either
            /// of them takes a gradient; whether the products are bf16.
            type State = (FloatTensor<B>, FloatTensor<B>, Option<FloatTensor<B>>, bool);

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let [gate_node, up_node, weight_node] = ops.parents;
                let dy = grads.consume::<B>(&ops.node);
                let (gate, up, weight, bf16) = ops.state;
                let transposed = |t: FloatTensor<B>| B::float_swap_dims(t, 0, 1);
                if let Some(node) = weight_node {
                    // The gated product again, where the forward pass let it go:
                    // [N, d]ᵀ · [N, out] -> [d, out]
                    let gated = B::swiglu(gate.clone(), up.clone());
                    let dw = product::<B>(transposed(gated), dy.clone(), bf16);
                    grads.register::<B>(node.id, dw);
                }
                if let Some(weight) = weight {
                    // [N, out] · [out, d] -> [N, d]
                    let dgated = product::<B>(dy, transposed(weight), bf16);
                    let (dgate, dup) = B::swiglu_backward(gate, up, dgated);
                    for (node, g) in [(gate_node, dgate), (up_node, dup)] {
                        if let Some(node) = node {
                            grads.register::<B>(node.id, g);
                        }
                    }
                }
            }
        }

        let inputs_tracked = gate.is_tracked() || up.is_tracked();
        match SwigluLinearBackward
            .prepare::<C>([gate.node(), up.node(), weight.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let [gate, up] = [gate, up].map(|t| match bf16 {
                    true => B::round_bf16(t.into_primitive()),
                    false => B::prepare(t.into_primitive()),
                });
                let weight = weight.into_primitive();
                let gated = <B as CpuKernels>::swiglu(gate.clone(), up.clone());
                let out = product::<B>(gated, weight.clone(), bf16);
                prep.finish((gate, up, inputs_tracked.then_some(weight), bf16), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(swiglu_product::<B>(
                gate.into_primitive(),
                up.into_primitive(),
                weight.into_primitive(),
                bf16,
            )),
        }
    }

    fn fused_embedding(weight: FloatTensor<Self>, ids: IntTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct EmbeddingBackward;

        impl<B: CpuKernels> Backward<B, 1> for EmbeddingBackward {
            /// The ids and the vocabulary size.
            type State = (IntTensor<B>, usize);

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let [weight_node] = ops.parents;
                let dout = grads.consume::<B>(&ops.node);
                let (ids, vocab) = ops.state;
                if let Some(node) = weight_node {
                    let grad = B::embedding_grad(dout, ids, vocab);
                    // Held while registered, so that a sum with a gradient registered before
                    // (tied embeddings: the LM head's, dense) is written into that one's
                    // buffer, not into this one, whose untouched pages are the kernel's zero
                    // page: each write there copied a page and flushed the TLB of every core
                    // (11.5% of a SmolLM2 full fine-tuning step). Dropped after: alone, the
                    // registered gradient is then the only owner again.
                    let held = grad.clone();
                    grads.register::<B>(node.id, grad);
                    drop(held);
                }
            }
        }

        let vocab = weight.shape()[0];
        match EmbeddingBackward
            .prepare::<C>([weight.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let out = <B as burn::backend::ops::ModuleOps<B>>::embedding(
                    weight.into_primitive(),
                    ids.clone(),
                );
                prep.finish((ids, vocab), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(
                <B as burn::backend::ops::ModuleOps<B>>::embedding(weight.into_primitive(), ids),
            ),
        }
    }

    fn fused_rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct RopeBackward;

        impl<B: CpuKernels> Backward<B, 1> for RopeBackward {
            /// The cos and sin tables.
            type State = (FloatTensor<B>, FloatTensor<B>);

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let [x_node] = ops.parents;
                let dy = grads.consume::<B>(&ops.node);
                let (cos, sin) = ops.state;
                if let Some(node) = x_node {
                    grads.register::<B>(node.id, B::rope(dy, cos, sin, true));
                }
            }
        }

        // The tables are constants (made from integer positions): only x is differentiated.
        let (cos, sin) = (
            B::prepare(cos.into_primitive()),
            B::prepare(sin.into_primitive()),
        );
        match RopeBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let y =
                    <B as CpuKernels>::rope(x.into_primitive(), cos.clone(), sin.clone(), false);
                prep.finish((cos, sin), y)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(<B as CpuKernels>::rope(x.into_primitive(), cos, sin, false))
            }
        }
    }

    fn fused_layer_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct LayerNormBackward;

        impl<B: CpuKernels> Backward<B, 3> for LayerNormBackward {
            /// The input, the weight, (mean, 1 / std) per row.
            type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let [x_node, w_node, b_node] = ops.parents;
                let dy = grads.consume::<B>(&ops.node);
                let (x, w, stats) = ops.state;
                let (dx, dw, db) = B::layer_norm_backward(x, w, stats, dy);
                for (node, g) in [(x_node, dx), (w_node, dw), (b_node, db)] {
                    if let Some(node) = node {
                        grads.register::<B>(node.id, g);
                    }
                }
            }
        }

        let eps = eps as f32;
        match LayerNormBackward
            .prepare::<C>([x.node(), weight.node(), bias.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (x, w) = (
                    B::prepare(x.into_primitive()),
                    B::prepare(weight.into_primitive()),
                );
                let (y, stats) =
                    <B as CpuKernels>::layer_norm(x.clone(), w.clone(), bias.into_primitive(), eps);
                prep.finish((x, w, stats), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(
                <B as CpuKernels>::layer_norm(
                    x.into_primitive(),
                    weight.into_primitive(),
                    bias.into_primitive(),
                    eps,
                )
                .0,
            ),
        }
    }
}

/// The forward passes without a graph, shared by the backends that implement [`Kernels`].
macro_rules! fused_ops_from_kernels {
    ($backend:ty) => {
        impl FusedOps for $backend {
            fn fused_gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
                <Self as Kernels>::gelu(x)
            }

            fn fused_dropout(x: FloatTensor<Self>, p: f64, seed: u64) -> FloatTensor<Self> {
                <Self as Kernels>::dropout(x, DropMask::new(p, seed))
            }

            fn fused_attention_probs(
                scores: FloatTensor<Self>,
                bias: FloatTensor<Self>,
                scale: f32,
                p: f64,
                seed: u64,
            ) -> FloatTensor<Self> {
                let mask = DropMask::new(p, seed);
                <Self as Kernels>::attention_probs(scores, bias, scale, mask).1
            }

            fn fused_cross_entropy_sum(
                logits: FloatTensor<Self>,
                targets: Vec<u32>,
            ) -> FloatTensor<Self> {
                let targets = <Self as Kernels>::targets(&targets, &logits);
                <Self as Kernels>::cross_entropy(logits, targets).0
            }

            fn fused_quant_matmul(x: FloatTensor<Self>, w: Arc<QuantMatrix>) -> FloatTensor<Self> {
                <Self as Kernels>::quant_matmul(x, &w)
            }

            fn fused_matmul(
                lhs: FloatTensor<Self>,
                rhs: FloatTensor<Self>,
                bf16: bool,
            ) -> FloatTensor<Self> {
                product::<Self>(lhs, rhs, bf16)
            }
        }
    };
}

fused_ops_from_kernels!(Flex);
#[cfg(any(feature = "wgpu", feature = "cuda"))]
fused_ops_from_kernels!(burn_cubecl::CubeBackend);

/// Runs a fused op with one differentiable input: `forward` gets the prepared input and returns
/// what the backward pass keeps and the output. Without a graph (the input needs no gradient)
/// the kept state is dropped.
/// `lhs · rhs` in f32 ([`Kernels::f32_matmul`]), or with bf16 operands and f32 sums
/// ([`Kernels::bf16_matmul`]).
fn product<B: Kernels>(lhs: FloatTensor<B>, rhs: FloatTensor<B>, bf16: bool) -> FloatTensor<B> {
    if bf16 {
        B::bf16_matmul(lhs, rhs)
    } else {
        B::f32_matmul(lhs, rhs)
    }
}

/// [`swiglu_linear`]'s output, gate and up rounded to bf16 first with bf16 products.
fn swiglu_product<B: CpuKernels>(
    gate: FloatTensor<B>,
    up: FloatTensor<B>,
    weight: FloatTensor<B>,
    bf16: bool,
) -> FloatTensor<B> {
    let [gate, up] = [gate, up].map(|t| if bf16 { B::round_bf16(t) } else { t });
    product::<B>(B::swiglu(gate, up), weight, bf16)
}

fn one_input<B: Kernels, C: CheckpointStrategy, Bw: Backward<B, 1>>(
    backward: Bw,
    x: FloatTensor<Autodiff<B, C>>,
    forward: impl FnOnce(FloatTensor<B>) -> (Bw::State, FloatTensor<B>),
) -> FloatTensor<Autodiff<B, C>> {
    match backward.prepare::<C>([x.node()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let (state, out) = forward(B::prepare(x.primitive().clone()));
            prep.finish(state, out)
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(B::prepare(x.into_primitive())).1),
    }
}

impl<B: Kernels, C: CheckpointStrategy> FusedOps for Autodiff<B, C> {
    fn fused_gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct GeluBackward;

        impl<B: Kernels> Backward<B, 1> for GeluBackward {
            /// The (prepared) input.
            type State = FloatTensor<B>;

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let [parent] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                if let Some(node) = parent {
                    grads.register::<B>(node.id, <B as Kernels>::gelu_backward(ops.state, grad));
                }
            }
        }

        one_input::<B, C, _>(GeluBackward, x, |input| {
            (input.clone(), <B as Kernels>::gelu(input))
        })
    }

    fn fused_dropout(x: FloatTensor<Self>, p: f64, seed: u64) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct DropoutBackward;

        impl<B: Kernels> Backward<B, 1> for DropoutBackward {
            /// The mask, regenerated from its seed.
            type State = DropMask;

            fn backward(self, ops: Ops<DropMask, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
                let [parent] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                if let Some(node) = parent {
                    grads.register::<B>(node.id, B::dropout(grad, ops.state));
                }
            }
        }

        let mask = DropMask::new(p, seed);
        one_input::<B, C, _>(DropoutBackward, x, |input| (mask, B::dropout(input, mask)))
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

        impl<B: Kernels> Backward<B, 1> for ProbsBackward {
            /// Probabilities before dropout, scale, dropout mask.
            type State = (FloatTensor<B>, f32, DropMask);

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let [parent] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (probs, scale, mask) = ops.state;
                if let Some(node) = parent {
                    let g = B::attention_probs_backward(probs, grad, scale, mask);
                    grads.register::<B>(node.id, g);
                }
            }
        }

        // The bias is a constant (a mask): it takes no gradient even if it is tracked.
        let bias = bias.into_primitive();
        let mask = DropMask::new(p, seed);
        one_input::<B, C, _>(ProbsBackward, scores, |s| {
            let (probs, out) = B::attention_probs(s, bias, scale, mask);
            ((probs, scale, mask), out)
        })
    }

    fn fused_cross_entropy_sum(logits: FloatTensor<Self>, targets: Vec<u32>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct CrossEntropyBackward;

        impl<B: Kernels> Backward<B, 1> for CrossEntropyBackward {
            /// The logits, their row log-sum-exp, the targets.
            type State = (FloatTensor<B>, FloatTensor<B>, IntTensor<B>);

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let [parent] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (logits, lse, targets) = ops.state;
                if let Some(node) = parent {
                    let dx = B::cross_entropy_backward(logits, lse, targets, grad);
                    grads.register::<B>(node.id, dx);
                }
            }
        }

        one_input::<B, C, _>(CrossEntropyBackward, logits, |x| {
            let targets = B::targets(&targets, &x);
            let (loss, lse) = B::cross_entropy(x.clone(), targets.clone());
            ((x, lse, targets), loss)
        })
    }

    fn fused_quant_matmul(x: FloatTensor<Self>, w: Arc<QuantMatrix>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct QuantMatmulBackward;

        impl<B: Kernels> Backward<B, 1> for QuantMatmulBackward {
            /// The quantised weight (shared, not copied).
            type State = Arc<QuantMatrix>;

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let [parent] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                if let Some(node) = parent {
                    grads.register::<B>(node.id, B::quant_matmul_backward(grad, &ops.state));
                }
            }
        }

        one_input::<B, C, _>(QuantMatmulBackward, x, |input| {
            let out = B::quant_matmul(input, &w);
            (w, out)
        })
    }

    fn fused_matmul(
        lhs: FloatTensor<Self>,
        rhs: FloatTensor<Self>,
        bf16: bool,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct MatmulBackward {
            bf16: bool,
        }

        impl<B: Kernels> Backward<B, 2> for MatmulBackward {
            /// The left operand when the right one takes a gradient, and the other way round.
            type State = (Option<FloatTensor<B>>, Option<FloatTensor<B>>);

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let [lhs_node, rhs_node] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (lhs, rhs) = ops.state;
                let transposed = |t: FloatTensor<B>| {
                    let d = t.rank();
                    B::float_swap_dims(t, d - 2, d - 1)
                };
                // Both products of the backward pass in the forward's precision (under bf16, as
                // autocast runs them).
                if let (Some(node), Some(rhs)) = (lhs_node, rhs) {
                    let g = product::<B>(grad.clone(), transposed(rhs), self.bf16);
                    grads.register::<B>(node.id, g);
                }
                if let (Some(node), Some(lhs)) = (rhs_node, lhs) {
                    let g = product::<B>(transposed(lhs), grad, self.bf16);
                    grads.register::<B>(node.id, g);
                }
            }
        }

        let (lhs_tracked, rhs_tracked) = (lhs.is_tracked(), rhs.is_tracked());
        let backward = MatmulBackward { bf16 };
        match backward
            .prepare::<C>([lhs.node(), rhs.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (l, r) = (lhs.into_primitive(), rhs.into_primitive());
                let out = product::<B>(l.clone(), r.clone(), bf16);
                prep.finish((rhs_tracked.then_some(l), lhs_tracked.then_some(r)), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(product::<B>(
                lhs.into_primitive(),
                rhs.into_primitive(),
                bf16,
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::flex::{exp, normal_cdf_pdf};
    use super::*;
    use burn::backend::flex::FlexTensor;
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

    /// Masked keys get probabilities of exactly 0, and no kernel of softmax or cross-entropy
    /// gives a subnormal value (each one costs an x86 CPU a microcode assist in the products
    /// that read it: attention's f32 step ran 12 times slower with them, see
    /// `flex::flush_subnormal`): the causal mask's probabilities and their gradient, and the
    /// gradient of logits 95 below their maximum.
    #[test]
    fn masked_keys_and_far_logits_give_zeros_not_subnormals() {
        let _rng = crate::test_rng();
        for x in [-87.4f32, -88.0, -100.0, -1e30, f32::MIN] {
            assert_eq!(exp(x), 0.0, "exp({x})");
        }
        assert!(exp(-87.0).is_normal());
        let normal_or_zero = |what: &str, values: Vec<f32>| {
            let bad = values
                .iter()
                .filter(|v| **v != 0.0 && !v.is_normal())
                .count();
            assert_eq!(bad, 0, "{what}: {bad} subnormal values");
        };
        let device = Device::flex().autodiff();
        let (b, h, t) = (2, 3, 40);
        let keep = Tensor::<2, burn::tensor::Bool>::from_data(
            TensorData::new(vec![true; b * t], [b, t]),
            &device,
        );
        let bias = crate::layers::attention_bias(keep, t, true);
        let scores = Tensor::<4>::random([b, h, t, t], Distribution::Normal(0.0, 3.0), &device)
            .require_grad();
        let probs = attention_probs(scores.clone(), bias, 0.125, 0.0);
        let values = probs.to_data().try_to_vec::<f32>().unwrap_or_default();
        assert_eq!(values.len(), b * h * t * t);
        for (i, p) in values.iter().enumerate() {
            let (row, key) = ((i / t) % t, i % t);
            if key > row {
                assert_eq!(*p, 0.0, "masked key {key} of query {row}");
            }
        }
        normal_or_zero("probabilities", values);
        let w = Tensor::<4>::random([b, h, t, t], Distribution::Normal(0.0, 1.0), &device);
        let grads = (probs * w).sum().backward();
        let dscores = scores.grad(&grads).unwrap_or_else(|| panic!("no gradient"));
        normal_or_zero(
            "score gradient",
            dscores.to_data().try_to_vec::<f32>().unwrap_or_default(),
        );

        let mut far = vec![-95f32; 4 * 64];
        for row in 0..4 {
            far[row * 64 + row] = 0.0;
        }
        let logits = Tensor::<2>::from_data(TensorData::new(far, [4, 64]), &device).require_grad();
        // A mean over 4 rows: each gradient is a quarter of a probability.
        let grads = (cross_entropy_sum(logits.clone(), &[0, 1, 2, 3]) / 4.0).backward();
        let dlogits = logits.grad(&grads).unwrap_or_else(|| panic!("no gradient"));
        normal_or_zero(
            "logit gradient",
            dlogits.to_data().try_to_vec::<f32>().unwrap_or_default(),
        );
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

    /// `product(a, b)` against burn's matmul on attention-shaped operands (`[B, H, T, d] ·
    /// [B, H, d, T]`, the right one a transposed view), under autodiff: the largest difference
    /// of the value, the left gradient and the right gradient (none when `product` does not
    /// differentiate the right operand).
    fn product_against_matmul(
        product: impl Fn(Tensor<4>, Tensor<4>) -> Tensor<4>,
    ) -> (f32, f32, Option<f32>) {
        let _rng = crate::test_rng();
        let device = Device::flex().autodiff();
        let a = Tensor::<4>::random([2, 3, 9, 20], Distribution::Normal(0.0, 1.0), &device);
        let bt = Tensor::<4>::random([2, 3, 11, 20], Distribution::Normal(0.0, 1.0), &device);
        let (a1, b1) = (a.clone().require_grad(), bt.clone().require_grad());
        let (a2, b2) = (a.require_grad(), bt.require_grad());
        let y1 = product(a1.clone(), b1.clone().swap_dims(2, 3));
        let y2 = a2.clone().matmul(b2.clone().swap_dims(2, 3));
        let w = Tensor::<4>::random([2, 3, 9, 11], Distribution::Normal(0.0, 1.0), &device);
        let value = max_diff(y1.clone(), y2.clone());
        let g1 = (y1 * w.clone()).sum().backward();
        let g2 = (y2 * w).sum().backward();
        let grad = |t: &Tensor<4>, g| t.grad(g).unwrap_or_else(|| panic!("no grad"));
        let right = b1.grad(&g1).map(|g| max_diff(g, grad(&b2, &g2)));
        (value, max_diff(grad(&a1, &g1), grad(&a2, &g2)), right)
    }

    /// bf16 products against f32 ones: the value and both gradients within bf16's rounding of
    /// sums of 20 and 11 products of N(0, 1) values (about 2⁻⁸ of Σ|a||b| ≈ 13), and not equal
    /// to the f32 ones (the rounding is really there).
    #[test]
    fn bf16_matmul_is_the_f32_product_within_bf16_rounding_in_value_and_gradients() {
        let (value, left, right) = product_against_matmul(bf16_matmul);
        let right = right.unwrap_or_else(|| panic!("no right gradient"));
        for (d, what) in [
            (value, "product"),
            (left, "left gradient"),
            (right, "right gradient"),
        ] {
            assert!(d > 0.0 && d < 0.1, "{what}: off by {d}");
        }
    }

    /// The f32 arm of `fused_matmul` (what [`f32_matmul`] runs on the CPU, and on a GPU with
    /// TF32): the value and both gradients equal burn's matmul's, with a transposed right
    /// operand; with a frozen right operand the left gradient is the same.
    #[test]
    fn fused_f32_matmul_equals_burns_matmul_in_value_and_gradients() {
        let fused = |x: Tensor<4>, y: Tensor<4>| {
            Tensor::<4>::from_dispatch(<Dispatch as FusedOps>::fused_matmul(
                x.into_dispatch(),
                y.into_dispatch(),
                false,
            ))
        };
        let (value, left, right) = product_against_matmul(fused);
        let right = right.unwrap_or_else(|| panic!("no right gradient"));
        for (d, what) in [
            (value, "product"),
            (left, "left gradient"),
            (right, "right gradient"),
        ] {
            assert!(d < 1e-5, "{what}: off by {d}");
        }
        let frozen = |x: Tensor<4>, y: Tensor<4>| fused(x, y.detach());
        let (value, left, _) = product_against_matmul(frozen);
        assert!(value < 1e-5 && left < 1e-5, "right frozen: {value}, {left}");
    }

    /// The CPU's f32 product, which fills a buffer it never zeroes, equals burn's matmul on
    /// the shapes where that could show: one product split over the threads, a batch of
    /// products one a thread, transposed operands, a product over k = 0 (all zeros), empty
    /// ones and narrow ones (fewer than 16 columns, written column-major and transposed); each
    /// run after a large product freed its memory, so a value left unwritten would hold that
    /// product's old values.
    #[test]
    fn cpu_f32_products_write_every_value() {
        use burn::backend::Flex;
        use burn::backend::flex::FlexTensor;
        use burn::backend::ops::FloatTensorOps;
        let _rng = crate::test_rng();
        let flex = |shape: Vec<usize>, seed: u64| {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|i| ((i as u64 * 2654435761 + seed) % 1000) as f32 / 500.0 - 1.0)
                .collect();
            FlexTensor::from_data(TensorData::new(v, shape))
        };
        let values = |t: FlexTensor| t.into_data().try_to_vec::<f32>().unwrap_or_default();
        for (lead, m, k, n, transposed) in [
            (vec![], 300, 250, 200, false),
            (vec![3], 17, 5, 9, false),
            (vec![2, 2], 33, 40, 65, true),
            (vec![], 7, 0, 5, false),
            (vec![2], 0, 4, 3, false),
            // narrow: written column-major, then transposed
            (vec![], 300, 64, 8, false),
            (vec![2], 100, 30, 15, true),
            (vec![], 64, 0, 8, false),
        ] {
            drop(<Flex as Kernels>::f32_matmul(
                flex(vec![400, 300], 1),
                flex(vec![300, 400], 2),
            ));
            let shape = |r: usize, c: usize| [lead.clone(), vec![r, c]].concat();
            let a = flex(shape(m, k), 3);
            let b = if transposed {
                let d = lead.len();
                Flex::float_swap_dims(flex(shape(n, k), 4), d, d + 1)
            } else {
                flex(shape(k, n), 4)
            };
            let got = values(<Flex as Kernels>::f32_matmul(a.clone(), b.clone()));
            let want = values(Flex::float_matmul(a, b));
            assert_eq!(got.len(), want.len(), "{lead:?} {m}×{k}×{n}");
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                    "{lead:?} {m}×{k}×{n} [{i}]: {g} vs {w}"
                );
            }
            if k == 0 {
                assert!(got.iter().all(|&g| g == 0.0), "k = 0 gives zeros");
            }
        }
    }

    /// A few rows times a GGUF matrix of Q4_0, Q4_1 or Q8_0 blocks (a generation step, read
    /// from the blocks in place where the CPU has AVX-512) equal the rows times the
    /// dequantised matrix within f32 summation error, and so do more rows (the whole matrix
    /// dequantised, as in training).
    #[test]
    fn quantised_steps_equal_the_dequantised_product() {
        use whet_gguf::GgmlType;
        let mut s = 7u64;
        let mut byte = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 56) as u8
        };
        // One thread's matrix, and one over 2^18 weights, which the threads split.
        let types = [
            (GgmlType::Q4_0, 18, 1),
            (GgmlType::Q4_1, 20, 2),
            (GgmlType::Q8_0, 34, 1),
        ];
        for ((ty, bytes, scales), (rows, cols)) in types
            .into_iter()
            .flat_map(|t| [(70, 96), (600, 448)].map(move |shape| (t, shape)))
        {
            let mut raw = vec![0u8; rows * cols / 32 * bytes];
            for block in raw.chunks_mut(bytes) {
                for (i, b) in block.iter_mut().enumerate() {
                    *b = byte();
                    if i < 2 * scales {
                        // f16 scales in ±[2⁻⁸, 2): exponent bits 7..16.
                        *b = if i % 2 == 1 {
                            (*b & 0x80) | (0x1c + (*b & 0x0f) / 2)
                        } else {
                            *b
                        };
                    }
                }
            }
            let w = crate::quant::QuantMatrix::ggml(ty, raw, rows, cols).unwrap();
            let dense = w.dequantize();
            let w = Arc::new(w);
            // One pass over the blocks, several (prompts up to 64 rows), and the whole matrix
            // dequantised (more rows).
            for n in [1, 2, 3, 4, 5, 9, 65] {
                let x =
                    Tensor::<2>::random([n, cols], Distribution::Normal(0.0, 1.0), &Device::flex());
                let xv = x.to_data().convert::<f32>().try_to_vec::<f32>().unwrap();
                let y = quant_matmul(x, &w)
                    .into_data()
                    .convert::<f32>()
                    .try_to_vec::<f32>()
                    .unwrap();
                for i in 0..n {
                    for o in 0..rows {
                        let (mut exact, mut size) = (0f64, 0f64);
                        for k in 0..cols {
                            let t = xv[i * cols + k] as f64 * dense[o * cols + k] as f64;
                            exact += t;
                            size += t.abs();
                        }
                        let err = (y[i * rows + o] as f64 - exact).abs();
                        assert!(
                            err <= size * cols as f64 * 2f64.powi(-23) + 1e-30,
                            "{ty} n={n} [{i}, {o}]: {} vs {exact}",
                            y[i * rows + o]
                        );
                    }
                }
            }
        }
    }

    /// On a CPU with AVX512-BF16 the CPU backend's product is the kernel's (AMX where granted),
    /// bit for bit (the composed casts would round the output to bf16 too); a frozen right
    /// operand takes no gradient while the left one does.
    #[test]
    fn bf16_matmul_on_the_cpu_runs_the_kernel() {
        if !bf16::available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        let _rng = crate::test_rng();
        let device = Device::flex().autodiff();
        let (m, k, n) = (37, 70, 45);
        let x = Tensor::<2>::random([m, k], Distribution::Normal(0.0, 1.0), &device);
        let w = Tensor::<2>::random([k, n], Distribution::Normal(0.0, 1.0), &device);
        let x = x.require_grad();
        let y = bf16_matmul(x.clone(), w.clone());
        let values = |t: Tensor<2>| t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
        let (xv, wv) = (values(x.clone().inner()), values(w.clone().inner()));
        let mut want = vec![0f32; m * n];
        bf16::gemm(
            m,
            n,
            k,
            bf16::Strided {
                values: &xv,
                offset: 0,
                rs: k,
                cs: 1,
            },
            bf16::Strided {
                values: &wv,
                offset: 0,
                rs: n,
                cs: 1,
            },
            &mut want,
        );
        let got = values(y.clone().inner());
        assert!(
            got.iter()
                .zip(&want)
                .all(|(g, w)| g.to_bits() == w.to_bits())
        );
        let grads = y.sum().backward();
        assert!(x.grad(&grads).is_some());
        assert!(w.grad(&grads).is_none());
    }

    /// The fused AdamW pass gives the composed ops' bits: parameter and both moments over
    /// five steps, with and without weight decay, over more elements than one rayon task
    /// (with a ragged tail) and from a shared parameter (copied, the original untouched).
    #[test]
    fn fused_adamw_equals_the_composed_ops_bit_for_bit() {
        let _rng = crate::test_rng();
        let device = Device::flex();
        let n = 40_000 + 7;
        let bits = |t: &Tensor<1>| -> Vec<u32> {
            let v: Vec<f32> = t.to_data().try_to_vec().unwrap();
            v.iter().map(|x| x.to_bits()).collect()
        };
        // A clipping coefficient applied inside the pass, and none (1).
        for (weight_decay, grad_scale) in [(0.0, 1.0), (0.01, 1.0), (0.01, 0.37)] {
            let p0 = Tensor::<1>::random([n], Distribution::Normal(0.0, 0.05), &device);
            let keep = bits(&p0);
            let (mut fused, mut composed) = (
                (p0.clone(), p0.zeros_like(), p0.zeros_like()),
                (p0.clone(), p0.zeros_like(), p0.zeros_like()),
            );
            for step in 1..=5 {
                let g = Tensor::<1>::random([n], Distribution::Normal(0.0, 1e-2), &device);
                let s = AdamwStep {
                    lr: 1e-3,
                    beta1: 0.9,
                    beta2: 0.999,
                    eps: 1e-8,
                    weight_decay,
                    step,
                    grad_scale,
                };
                let (p, m, v) = fused;
                fused = adamw(p, g.clone(), m, v, s);
                let (p, m, v) = composed;
                composed = adamw_composed(p, g, m, v, s);
                for (name, a, b) in [
                    ("param", &fused.0, &composed.0),
                    ("m", &fused.1, &composed.1),
                    ("v", &fused.2, &composed.2),
                ] {
                    assert!(
                        bits(a) == bits(b),
                        "{name} differs at step {step} (weight decay {weight_decay}, gradient scale {grad_scale})"
                    );
                }
            }
            assert_eq!(bits(&p0), keep, "the shared original is not written");
            assert!(bits(&fused.0) != keep, "the parameter moved");
        }
    }

    /// The one-pass 8-bit AdamW gives what dequantising, the composed AdamW and quantising give:
    /// the same parameter bits and the same codes and block maxima, over three steps from zero
    /// moments, with a partial last block, weight decay and, at step 2, a clipping coefficient.
    #[test]
    fn fused_8bit_adamw_equals_dequantise_update_quantise() {
        let _rng = crate::test_rng();
        let device = Device::flex();
        let n = 3 * crate::quant::DQ_BLOCK + 77;
        let p0 = Tensor::<1>::random([n], Distribution::Normal(0.0, 0.05), &device);
        let bits = |t: &Tensor<1>| -> Vec<u32> {
            let v: Vec<f32> = t.to_data().try_to_vec().unwrap();
            v.iter().map(|x| x.to_bits()).collect()
        };
        let host = |t: Tensor<1>| -> Vec<f32> { t.into_data().try_to_vec().unwrap() };
        let (mut pf, mut mf, mut vf) = (
            p0.clone(),
            Blockwise8::zeros(n, true),
            Blockwise8::zeros(n, false),
        );
        let (mut pc, mut mc, mut vc) =
            (p0, Blockwise8::zeros(n, true), Blockwise8::zeros(n, false));
        for step in 1..=3 {
            let g = Tensor::<1>::random([n], Distribution::Normal(0.0, 1e-2), &device);
            let s = AdamwStep {
                lr: 1e-3,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.01,
                step,
                grad_scale: if step == 2 { 0.37 } else { 1.0 },
            };
            pf = adamw_8bit_on_host(pf, g.clone(), &mut mf, &mut vf, s);
            let t = |v: Vec<f32>| Tensor::<1>::from_data(TensorData::new(v, [n]), &device);
            let (p, m, v) = adamw_composed(pc, g, t(mc.dequantize()), t(vc.dequantize()), s);
            (pc, mc, vc) = (
                p,
                Blockwise8::quantize(&host(m), true),
                Blockwise8::quantize(&host(v), false),
            );
            assert!(bits(&pf) == bits(&pc), "parameter differs at step {step}");
            assert_eq!(mf, mc, "first moments differ at step {step}");
            assert_eq!(vf, vc, "second moments differ at step {step}");
        }
        assert!(
            mf.codes.iter().any(|&c| c != mf.codes[0]),
            "the moments moved"
        );
    }

    /// The fused rotary embedding against burn's composed ops: the output bit for bit and the
    /// input gradient, for a strided input (heads split from `[B, T, H, hd]`, as attention
    /// makes it) and tables that differ per batch row.
    #[test]
    fn fused_rope_matches_composed_ops_in_value_and_gradient() {
        let _rng = crate::test_rng();
        let device = Device::flex().autodiff();
        let (b, h, t, d) = (2, 3, 5, 8);
        let x = Tensor::<4>::random([b, t, h, d], Distribution::Normal(0.0, 1.0), &device)
            .swap_dims(1, 2);
        let angles =
            Tensor::<4>::random([b, 1, t, d / 2], Distribution::Uniform(-3.0, 3.0), &device);
        let angles = Tensor::cat(vec![angles.clone(), angles], 3);
        let (cos, sin) = (angles.clone().cos(), angles.sin());
        let dy = Tensor::<4>::random([b, h, t, d], Distribution::Normal(0.0, 1.0), &device);
        let run = |fused: bool| {
            let x = x.clone().require_grad();
            let y = if fused {
                rope(x.clone(), cos.clone(), sin.clone())
            } else {
                rope_composed(x.clone(), cos.clone(), sin.clone())
            };
            let grads = (y.clone() * dy.clone()).sum().backward();
            let dx = x.grad(&grads).unwrap();
            (
                y.inner().into_data().try_to_vec::<f32>().unwrap(),
                dx.into_data().try_to_vec::<f32>().unwrap(),
            )
        };
        let (fused, composed) = (run(true), run(false));
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&fused.0), bits(&composed.0), "output");
        let d = fused
            .1
            .iter()
            .zip(&composed.1)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(d < 1e-6, "input gradient: {d}");
    }

    /// The chunked LM-head loss against the logits and `cross_entropy_sum`: the loss and the
    /// hidden rows' gradient over 600 rows (two whole chunks of 256 and a ragged one), with a
    /// frozen weight `[V, D]` (tied embeddings) and as the transpose of a `[D, V]` head, under
    /// an upstream gradient of −3 (DPO negates the sum); and weights that train, stored either
    /// way, whose gradient (summed over the chunks) equals the logits path's.
    #[test]
    fn linear_cross_entropy_equals_the_logits_path() {
        let _rng = crate::test_rng();
        let device = Device::flex().autodiff();
        let (n, d, v) = (600, 24, 97);
        let targets: Vec<u32> = (0..n as u32).map(|i| (i * 37 + 5) % v as u32).collect();
        for (transposed, frozen) in [(false, true), (true, true), (false, false), (true, false)] {
            let h =
                Tensor::<2>::random([n, d], Distribution::Normal(0.0, 1.0), &device).require_grad();
            let stored = if transposed { [d, v] } else { [v, d] };
            let mut w = Tensor::<2>::random(stored, Distribution::Normal(0.0, 0.5), &device);
            if !frozen {
                w = w.require_grad();
            }
            let as_vd = |w: Tensor<2>| if transposed { w.transpose() } else { w };
            let run = |fused: bool| {
                let loss = if fused {
                    linear_cross_entropy_sum(h.clone(), as_vd(w.clone()), &targets)
                } else {
                    cross_entropy_sum(h.clone().matmul(as_vd(w.clone()).transpose()), &targets)
                };
                let grads = loss.clone().mul_scalar(-3.0).backward();
                (
                    loss.inner(),
                    h.grad(&grads).expect("no hidden gradient"),
                    w.grad(&grads),
                )
            };
            let ((l0, dh0, dw0), (l1, dh1, dw1)) = (run(false), run(true));
            let l: f32 = l0.clone().into_scalar();
            assert!(max_diff(l0, l1) <= 1e-5 * l.abs(), "loss");
            assert!(max_diff(dh0, dh1) < 1e-4, "hidden gradient");
            match (dw0, dw1) {
                (Some(a), Some(b)) => assert!(max_diff(a, b) < 1e-4, "weight gradient"),
                (None, None) => assert!(frozen),
                _ => panic!("the weight's gradient exists on one path only"),
            }
        }
    }

    /// In a bf16 compute scope the chunked LM-head loss rounds its products' operands as the
    /// logits path's `bf16_matmul` does, in both passes: the loss equal to the bf16 logits
    /// path's within f32 summation, the hidden rows' gradient off the f32 one's (the rounding
    /// happened), the hidden rows' and the weight's gradients within bf16 rounding of the
    /// upstream gradient (the logits path rounds `−3 · dlogits`, this one `dlogits`), for a
    /// weight `[V, D]` and the transpose of a `[D, V]` one, frozen and training. Skipped (and
    /// says so) where the CPU has no AVX512-BF16 (the logits path runs there).
    #[test]
    fn linear_cross_entropy_in_bf16_equals_the_bf16_logits_path() {
        if !bf16::available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        let _rng = crate::test_rng();
        let device = Device::flex().autodiff();
        let (n, d, v) = (600, 24, 97);
        let targets: Vec<u32> = (0..n as u32).map(|i| (i * 37 + 5) % v as u32).collect();
        let max_abs = |t: Tensor<2>| -> f32 { t.abs().max().into_scalar() };
        for (transposed, frozen) in [(false, true), (true, true), (false, false), (true, false)] {
            let h =
                Tensor::<2>::random([n, d], Distribution::Normal(0.0, 1.0), &device).require_grad();
            let stored = if transposed { [d, v] } else { [v, d] };
            let mut w = Tensor::<2>::random(stored, Distribution::Normal(0.0, 0.5), &device);
            if !frozen {
                w = w.require_grad();
            }
            let as_vd = |w: Tensor<2>| if transposed { w.transpose() } else { w };
            let run = |fused: bool, compute| {
                let _scope = crate::precision::scope(compute);
                let loss = if fused {
                    linear_cross_entropy_sum(h.clone(), as_vd(w.clone()), &targets)
                } else {
                    let logits = bf16_matmul(h.clone(), as_vd(w.clone()).transpose());
                    cross_entropy_sum(logits, &targets)
                };
                let grads = loss.clone().mul_scalar(-3.0).backward();
                let loss: f32 = loss.inner().into_scalar();
                (
                    loss,
                    h.grad(&grads).expect("no hidden gradient"),
                    w.grad(&grads),
                )
            };
            let bf = Some(FloatDType::BF16);
            let ((l0, dh0, dw0), (l1, dh1, dw1)) = (run(false, bf), run(true, bf));
            let (_, dh32, _) = run(true, None);
            let what = format!("transposed {transposed}, frozen {frozen}");
            assert!(
                (l0 - l1).abs() <= 1e-6 * l0.abs(),
                "loss {l0} vs {l1}, {what}"
            );
            let scale = max_abs(dh0.clone());
            let rounded = max_diff(dh32, dh1.clone());
            assert!(
                rounded > 1e-3 * scale,
                "the bf16 hidden gradient is the f32 one ({rounded} of {scale}), {what}"
            );
            let dh = max_diff(dh0, dh1);
            assert!(
                dh <= 1e-2 * scale,
                "hidden gradient {dh} of {scale}, {what}"
            );
            match (dw0, dw1) {
                (Some(a), Some(b)) => {
                    let scale = max_abs(a.clone());
                    let dw = max_diff(a, b);
                    assert!(
                        dw <= 1e-2 * scale,
                        "weight gradient {dw} of {scale}, {what}"
                    );
                }
                (None, None) => assert!(frozen),
                _ => panic!("the weight's gradient exists on one path only, {what}"),
            }
        }
    }

    /// Not a check: times the LM-head loss with and without logits at SmolLM2's size (1024
    /// rows, D 576, V 49152), forward and backward, a frozen and a training weight. BENCHMARKS.md
    /// quotes it: `RAYON_NUM_THREADS=2 cargo test -p whet-models --lib -- --ignored
    /// time_linear_cross_entropy --nocapture`.
    #[test]
    #[ignore]
    fn time_linear_cross_entropy() {
        let device = Device::flex().autodiff();
        let (n, d, v) = (1024, 576, 49152);
        let targets: Vec<u32> = (0..n as u32).map(|i| (i * 37 + 5) % v as u32).collect();
        let h = Tensor::<2>::random([n, d], Distribution::Normal(0.0, 1.0), &device).require_grad();
        for frozen in [true, false] {
            let mut w = Tensor::<2>::random([v, d], Distribution::Normal(0.0, 0.05), &device);
            if !frozen {
                w = w.require_grad();
            }
            for fused in [false, true, false, true] {
                let t = std::time::Instant::now();
                for _ in 0..3 {
                    let loss = if fused {
                        linear_cross_entropy_sum(h.clone(), w.clone(), &targets)
                    } else {
                        cross_entropy_sum(h.clone().matmul(w.clone().transpose()), &targets)
                    };
                    let _ = h.grad(&loss.backward()).map(|g| g.into_data());
                }
                let ms = t.elapsed().as_secs_f64() * 1000.0 / 3.0;
                println!("frozen weight {frozen}, without logits {fused}: {ms:.0} ms a step");
            }
        }
    }

    /// [`split_last`]'s parts against burn's `narrow`: values on the plain and the autodiff
    /// device, and the joined tensor's gradient, with two columns that no part covers (their
    /// gradient is zero) and a part that reaches the loss through a transposed view.
    #[test]
    fn split_last_equals_narrow_in_value_and_gradient() {
        let _rng = crate::test_rng();
        for device in [Device::flex(), Device::flex().autodiff()] {
            let x = Tensor::<3>::random([2, 3, 12], Distribution::Normal(0.0, 1.0), &device);
            let x = if device.is_autodiff() {
                x.require_grad()
            } else {
                x
            };
            let widths = [5, 2, 3];
            let loss = |parts: Vec<Tensor<3>>| {
                let [a, b, c] = <[Tensor<3>; 3]>::try_from(parts).unwrap();
                (a.sin().sum() + b.swap_dims(1, 2).exp().sum()) + c.mul_scalar(3.0).sum()
            };
            let narrowed: Vec<_> = [0, 5, 7]
                .into_iter()
                .zip(widths)
                .map(|(start, w)| x.clone().narrow(2, start, w))
                .collect();
            let parts = split_last(x.clone(), widths).to_vec();
            for (p, n) in parts.iter().zip(&narrowed) {
                assert_eq!(p.dims(), n.dims());
                assert_eq!(max_diff(p.clone(), n.clone()), 0.0);
            }
            if device.is_autodiff() {
                let (gp, gn) = (loss(parts).backward(), loss(narrowed).backward());
                let (gp, gn) = (x.grad(&gp).unwrap(), x.grad(&gn).unwrap());
                assert_eq!(max_diff(gp.clone(), gn), 0.0);
                let tail = gp.narrow(2, 10, 2).abs().sum().into_scalar::<f32>();
                assert_eq!(tail, 0.0, "the columns no part covers");
            }
        }
    }

    /// Not a check: times a joined projection's output split into q, k and v by burn's
    /// `narrow` and by [`split_last`], forward and backward, at GPT-2's width on 2048 rows.
    /// BENCHMARKS.md quotes it: `RAYON_NUM_THREADS=2 cargo test -p whet-models --lib --
    /// --ignored time_split_last --nocapture`.
    #[test]
    #[ignore]
    fn time_split_last() {
        let device = Device::flex().autodiff();
        let (n, d) = (2048, 768);
        let x = Tensor::<2>::random([n, d], Distribution::Normal(0.0, 1.0), &device).require_grad();
        let w = Tensor::<2>::random([d, 3 * d], Distribution::Normal(0.0, 0.05), &device)
            .require_grad();
        let mut best = [f64::MAX; 2];
        for round in 0..8 {
            let ours = round % 2 == 1;
            let start = std::time::Instant::now();
            for _ in 0..5 {
                let y = x.clone().matmul(w.clone());
                let parts = match ours {
                    true => split_last(y, [d, d, d]).to_vec(),
                    false => (0..3).map(|i| y.clone().narrow(1, i * d, d)).collect(),
                };
                let loss = parts
                    .into_iter()
                    .enumerate()
                    .map(|(i, p)| p.mul_scalar(i as f32 + 1.0).sum())
                    .reduce(|a, b| a + b)
                    .unwrap();
                let _ = x.grad(&loss.backward()).map(|g| g.into_data());
            }
            let ms = start.elapsed().as_secs_f64() * 1000.0 / 5.0;
            best[usize::from(ours)] = best[usize::from(ours)].min(ms);
        }
        println!(
            "narrow: {:.1} ms a step; split_last: {:.1} ms a step (best of 4)",
            best[0], best[1]
        );
    }

    /// The in-place sum of squares (a gradient norm's) against burn's `square().sum()`, over
    /// more values than one chunk of the parallel loop, and a ragged tail.
    #[test]
    fn sum_of_squares_equals_the_composed_ops() {
        let _rng = crate::test_rng();
        let x = Tensor::<1>::random([300_007], Distribution::Normal(0.0, 1.0), &Device::flex());
        let want = x.clone().square().sum().into_scalar::<f32>() as f64;
        let got = sum_of_squares(x);
        assert!((got - want).abs() <= 1e-5 * want, "{got} vs {want}");
    }

    /// Clipping's scaling against `mul_scalar`: a gradient with pages of zeros (which the
    /// kernel skips) and scattered values, more values than one chunk of the parallel loop and
    /// a ragged tail; in place for a tensor it owns, while a tensor that another holder shares
    /// is copied, not changed under it; a NaN factor makes every value NaN, zeros included.
    #[test]
    fn scale_equals_mul_scalar_and_leaves_a_shared_tensor_alone() {
        let _rng = crate::test_rng();
        let n = 300_007;
        let mut values = vec![0f32; n];
        for i in (0..n).step_by(4099) {
            values[i] = i as f32 * 0.5 - 7.0;
        }
        values[n - 1] = 3.0;
        let x = Tensor::<1>::from_data(TensorData::new(values.clone(), [n]), &Device::flex());
        let want: Vec<f32> = values.iter().map(|v| v * 0.3).collect();
        let shared = x.clone();
        let got: Vec<f32> = scale(x, 0.3).into_data().try_to_vec().unwrap();
        assert_eq!(got, want);
        let unshared: Vec<f32> = scale(shared.clone(), 0.3).into_data().try_to_vec().unwrap();
        assert_eq!(unshared, want, "in place");
        let nan: Vec<f32> = scale(shared.clone(), f64::NAN)
            .into_data()
            .try_to_vec()
            .unwrap();
        assert!(nan.iter().all(|v| v.is_nan()), "NaN factor");
        assert_eq!(shared.into_data().try_to_vec::<f32>().unwrap(), values);
    }

    /// Gate and up kept in 16 bits: `round_bf16` stores bf16 values equal to burn's cast (no
    /// subnormals here), and the SwiGLU kernels read them as the f32 values they stand for.
    #[test]
    fn gate_and_up_kept_in_bf16_are_read_as_their_values() {
        let _rng = crate::test_rng();
        let device = Device::flex();
        let n = 20_011;
        let g = Tensor::<1>::random([n], Distribution::Normal(0.0, 3.0), &device);
        let u = Tensor::<1>::random([n], Distribution::Normal(0.0, 1.0), &device);
        let dy = Tensor::<1>::random([n], Distribution::Normal(0.0, 1.0), &device);
        let widened = |t: &Tensor<1>| t.clone().cast(FloatDType::BF16).cast(FloatDType::F32);
        let (gw, uw) = (widened(&g), widened(&u));
        let prim = |t: Tensor<1>| FlexTensor::from_data(t.into_data());
        let (gb, ub) = (
            <Flex as CpuKernels>::round_bf16(prim(g)),
            <Flex as CpuKernels>::round_bf16(prim(u)),
        );
        assert_eq!(gb.dtype(), burn::tensor::DType::BF16);
        let f =
            |t: FlexTensor| -> Vec<f32> { t.into_data().convert::<f32>().try_to_vec().unwrap() };
        assert_eq!(f(gb.clone()), f(prim(gw.clone())));
        let from_bf16 = <Flex as CpuKernels>::swiglu(gb.clone(), ub.clone());
        let from_f32 = <Flex as CpuKernels>::swiglu(prim(gw.clone()), prim(uw.clone()));
        assert_eq!(f(from_bf16), f(from_f32));
        let (dg16, du16) = <Flex as CpuKernels>::swiglu_backward(gb, ub, prim(dy.clone()));
        let (dg, du) = <Flex as CpuKernels>::swiglu_backward(prim(gw), prim(uw), prim(dy));
        assert_eq!((f(dg16), f(du16)), (f(dg), f(du)));
    }

    /// The embedding against burn's: rows in value, and the weight's gradient with repeated
    /// ids (summed) and rows no id picks (zero), trained and frozen.
    #[test]
    fn embedding_matches_burns_in_value_and_gradient() {
        let _rng = crate::test_rng();
        let device = Device::flex().autodiff();
        let (vocab, d) = (3000, 37);
        let weight = Tensor::<2>::random([vocab, d], Distribution::Normal(0.0, 1.0), &device);
        let ids = Tensor::<2, Int>::from_data(
            TensorData::new(vec![5i64, 17, 5, 2999, 0, 17, 17, 1234], [2, 4]),
            &device,
        );
        let dy = Tensor::<3>::random([2, 4, d], Distribution::Normal(0.0, 1.0), &device);
        let v = |t: Tensor<3>| -> Vec<f32> { t.into_data().try_to_vec().unwrap() };
        let run = |fused: bool| {
            let w = weight.clone().require_grad();
            let y = if fused {
                embedding(w.clone(), ids.clone())
            } else {
                burn::tensor::module::embedding(w.clone(), ids.clone())
            };
            let grads = (y.clone() * dy.clone()).sum().backward();
            let dw: Vec<f32> = w.grad(&grads).unwrap().into_data().try_to_vec().unwrap();
            (v(y), dw)
        };
        let (fused, composed) = (run(true), run(false));
        assert_eq!(fused.0, composed.0, "rows");
        let close = fused
            .1
            .iter()
            .zip(&composed.1)
            .all(|(a, b)| (a - b).abs() <= 1e-6 * b.abs().max(1.0));
        assert!(close, "weight gradient");
        assert_eq!(fused.1.len(), vocab * d);
        let frozen = embedding(weight.clone(), ids.clone());
        assert_eq!(v(frozen), composed.0, "frozen rows");
    }

    /// Fused attention against the composed products, forward and backward, at a MiniLM step's
    /// shape (16 rows of up to 50 tokens, 12 heads of 32, padded keys, dropout 0.1) and a
    /// SmolLM2 block's (4 × 256 causal, 9 heads on 3 key / value heads of 64). Prints ms a
    /// step: `RAYON_NUM_THREADS=2 cargo test -p whet-models --lib -- --ignored time_attention
    /// --nocapture`.
    #[test]
    #[ignore]
    fn time_attention() {
        let device = Device::flex().autodiff();
        for (b, h, kv, t, hd, causal, p) in [
            (16, 12, 12, 50, 32, false, 0.1),
            (4, 9, 3, 256, 64, true, 0.0),
        ] {
            let keep: Vec<bool> = (0..b * t).map(|i| i % t < t - (i / t) * 2).collect();
            let keep =
                Tensor::<2, burn::tensor::Bool>::from_data(TensorData::new(keep, [b, t]), &device);
            let bias = crate::layers::attention_bias(keep, t, causal);
            let normal = |shape: [usize; 4]| {
                Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &device).require_grad()
            };
            let (q, k, v) = (
                normal([b, h, t, hd]),
                normal([b, kv, t, hd]),
                normal([b, kv, t, hd]),
            );
            let scale = 1.0 / (hd as f32).sqrt();
            for (fused, bf16) in [(false, false), (true, false), (false, true), (true, true)]
                .into_iter()
                .cycle()
                .take(8)
            {
                let _scope = crate::precision::scope(bf16.then_some(FloatDType::BF16));
                let start = std::time::Instant::now();
                for _ in 0..10 {
                    let out = if fused {
                        attention(q.clone(), k.clone(), v.clone(), bias.clone(), scale, p)
                    } else {
                        attention_composed(q.clone(), k.clone(), v.clone(), bias.clone(), scale, p)
                    };
                    let grads = out.sum().backward();
                    let _ = q.grad(&grads).map(|g| g.into_data());
                }
                let ms = start.elapsed().as_secs_f64() * 100.0;
                println!(
                    "[{b}, {h}/{kv}, {t}, {hd}] fused {fused}, bf16 {bf16}: {ms:.2} ms a step"
                );
            }
        }
    }

    /// The skinny product against burn's matmul: 1 to 4 rows, a row-major weight and the
    /// transpose of one (tied embeddings), whole and split into ragged pieces, on the plain
    /// and the autodiff device; a tracked input takes burn's matmul and keeps its gradient;
    /// 5 rows take burn's matmul too.
    #[test]
    fn skinny_matmul_equals_matmul() {
        let _rng = crate::test_rng();
        // A small product on one thread; a large one (over 2^18 weights) split in pieces.
        for (device, (k, n)) in [
            (Device::flex(), (37, 557)),
            (Device::flex().autodiff(), (37, 557)),
            (Device::flex(), (301, 1013)),
        ] {
            let w = Tensor::<2>::random([k, n], Distribution::Normal(0.0, 1.0), &device);
            let wt_rows = Tensor::<2>::random([n, k], Distribution::Normal(0.0, 1.0), &device);
            // A row-major view that starts inside its buffer: the weight's rows 1..=k of k + 1.
            let offset = Tensor::<2>::random([k + 1, n], Distribution::Normal(0.0, 1.0), &device)
                .slice([1..k + 1, 0..n]);
            for m in 1..=5 {
                let x = Tensor::<2>::random([m, k], Distribution::Normal(0.0, 1.0), &device);
                for w in [w.clone(), wt_rows.clone().transpose(), offset.clone()] {
                    let want = x.clone().matmul(w.clone());
                    let got = skinny_matmul(x.clone(), w);
                    assert_eq!(got.dims(), [m, n]);
                    let d = max_diff(got, want);
                    assert!(d < 1e-4, "{m} rows: off by {d}");
                }
            }
        }
        let device = Device::flex().autodiff();
        let x = Tensor::<2>::random([1, 8], Distribution::Normal(0.0, 1.0), &device).require_grad();
        let w = Tensor::<2>::random([8, 3], Distribution::Normal(0.0, 1.0), &device);
        let grads = skinny_matmul(x.clone(), w.clone()).sum().backward();
        let want = w.inner().sum_dim(1).reshape([1, 8]);
        assert!(max_diff(x.grad(&grads).expect("no input gradient"), want) < 1e-5);
    }

    /// The fused SwiGLU against burn's `silu(gate) * up`: the output and both gradients, over
    /// gates from -30 to 30 (the sigmoid's saturated tails) and a ragged length.
    #[test]
    fn fused_swiglu_matches_composed_ops_in_value_and_gradients() {
        let _rng = crate::test_rng();
        let device = Device::flex().autodiff();
        let shape = [3, 7, 37];
        let gate = Tensor::<3>::random(shape, Distribution::Uniform(-30.0, 30.0), &device);
        let up = Tensor::<3>::random(shape, Distribution::Normal(0.0, 1.0), &device);
        let dy = Tensor::<3>::random(shape, Distribution::Normal(0.0, 1.0), &device);
        let run = |fused: bool| {
            let (g, u) = (gate.clone().require_grad(), up.clone().require_grad());
            let y = if fused {
                swiglu(g.clone(), u.clone())
            } else {
                burn::tensor::activation::silu(g.clone()) * u.clone()
            };
            let grads = (y.clone() * dy.clone()).sum().backward();
            let v = |t: Tensor<3>| -> Vec<f32> { t.into_data().try_to_vec().unwrap() };
            let (dg, du) = (g.grad(&grads).unwrap(), u.grad(&grads).unwrap());
            (
                v(y.inner()),
                dg.into_data().try_to_vec::<f32>().unwrap(),
                du.into_data().try_to_vec::<f32>().unwrap(),
            )
        };
        let (fused, composed) = (run(true), run(false));
        for (name, a, b) in [
            ("output", &fused.0, &composed.0),
            ("gate gradient", &fused.1, &composed.1),
            ("up gradient", &fused.2, &composed.2),
        ] {
            let d = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs() / y.abs().max(1.0))
                .fold(0f32, f32::max);
            assert!(d < 1e-5, "{name}: {d}");
        }
    }

    /// The norm and projection that keeps no normalised input, against RMSNorm followed by the
    /// product: the output and the gradients of x, the norm's weight and the projection's, in
    /// f32 and with bf16 products (where the CPU has them), and with a frozen projection.
    #[test]
    fn rms_norm_linear_matches_norm_then_product_in_value_and_gradients() {
        let _rng = crate::test_rng();
        let device = Device::flex().autodiff();
        let (n, d, out) = (37, 70, 19);
        let x = Tensor::<2>::random([n, d], Distribution::Normal(0.5, 2.0), &device);
        let norm = Tensor::<1>::random([d], Distribution::Normal(1.0, 0.3), &device);
        let weight = Tensor::<2>::random([d, out], Distribution::Normal(0.0, 0.2), &device);
        let dy = Tensor::<2>::random([n, out], Distribution::Normal(0.0, 1.0), &device);
        let v = |t: Tensor<2>| -> Vec<f32> { t.into_data().try_to_vec().unwrap() };
        let v1 = |t: Tensor<1>| -> Vec<f32> { t.into_data().try_to_vec().unwrap() };
        let run = |fused: bool, bf16: bool, train_weight: bool| {
            let (x, g) = (x.clone().require_grad(), norm.clone().require_grad());
            let w = if train_weight {
                weight.clone().require_grad()
            } else {
                weight.clone()
            };
            let y = if fused {
                rms_norm_linear(x.clone(), g.clone(), w.clone(), 1e-5, bf16)
            } else if bf16 {
                bf16_matmul(rms_norm(x.clone(), g.clone(), 1e-5), w.clone())
            } else {
                rms_norm(x.clone(), g.clone(), 1e-5).matmul(w.clone())
            };
            let grads = (y.clone() * dy.clone()).sum().backward();
            (
                v(y.inner()),
                v(x.grad(&grads).unwrap()),
                v1(g.grad(&grads).unwrap()),
                w.grad(&grads).map(v),
            )
        };
        let mut cases = vec![(false, true), (false, false)];
        if bf16::available() {
            cases.push((true, true));
        }
        for (bf16, train_weight) in cases {
            let (fused, composed) = (
                run(true, bf16, train_weight),
                run(false, bf16, train_weight),
            );
            assert_eq!(fused.3.is_some(), train_weight);
            let none = vec![];
            for (name, a, b) in [
                ("output", &fused.0, &composed.0),
                ("input gradient", &fused.1, &composed.1),
                ("norm weight gradient", &fused.2, &composed.2),
                (
                    "weight gradient",
                    fused.3.as_ref().unwrap_or(&none),
                    composed.3.as_ref().unwrap_or(&none),
                ),
            ] {
                assert_eq!(a.len(), b.len(), "{name}");
                let d = a
                    .iter()
                    .zip(b)
                    .map(|(x, y)| (x - y).abs() / y.abs().max(1.0))
                    .fold(0f32, f32::max);
                assert!(d < 1e-5, "{name} (bf16 {bf16}): {d}");
            }
        }
    }

    /// The SwiGLU and down projection that keeps no gated product, against the SwiGLU followed
    /// by the product: the output and the gradients of gate, up and weight, in f32 and with
    /// bf16 products (where the CPU has them), and with a frozen weight (no weight gradient).
    #[test]
    fn swiglu_linear_matches_swiglu_then_product_in_value_and_gradients() {
        let _rng = crate::test_rng();
        let device = Device::flex().autodiff();
        let (n, d, out) = (37, 70, 19);
        let gate = Tensor::<2>::random([n, d], Distribution::Uniform(-8.0, 8.0), &device);
        let up = Tensor::<2>::random([n, d], Distribution::Normal(0.0, 1.0), &device);
        let weight = Tensor::<2>::random([d, out], Distribution::Normal(0.0, 0.2), &device);
        let dy = Tensor::<2>::random([n, out], Distribution::Normal(0.0, 1.0), &device);
        let v = |t: Tensor<2>| -> Vec<f32> { t.into_data().try_to_vec().unwrap() };
        let run = |fused: bool, bf16: bool, train_weight: bool| {
            let (g, u) = (gate.clone().require_grad(), up.clone().require_grad());
            let w = if train_weight {
                weight.clone().require_grad()
            } else {
                weight.clone()
            };
            let y = if fused {
                swiglu_linear(g.clone(), u.clone(), w.clone(), bf16)
            } else if bf16 {
                let r = rounded_to_bf16::<2>;
                bf16_matmul(swiglu(r(g.clone()), r(u.clone())), w.clone())
            } else {
                swiglu(g.clone(), u.clone()).matmul(w.clone())
            };
            let grads = (y.clone() * dy.clone()).sum().backward();
            let dw = w.grad(&grads).map(v);
            (
                v(y.inner()),
                v(g.grad(&grads).unwrap()),
                v(u.grad(&grads).unwrap()),
                dw,
            )
        };
        let mut cases = vec![(false, true), (false, false)];
        if bf16::available() {
            cases.push((true, true));
        }
        for (bf16, train_weight) in cases {
            let (fused, composed) = (
                run(true, bf16, train_weight),
                run(false, bf16, train_weight),
            );
            assert_eq!(fused.3.is_some(), train_weight);
            let none = vec![];
            for (name, a, b) in [
                ("output", &fused.0, &composed.0),
                ("gate gradient", &fused.1, &composed.1),
                ("up gradient", &fused.2, &composed.2),
                (
                    "weight gradient",
                    fused.3.as_ref().unwrap_or(&none),
                    composed.3.as_ref().unwrap_or(&none),
                ),
            ] {
                assert_eq!(a.len(), b.len(), "{name}");
                let d = a
                    .iter()
                    .zip(b)
                    .map(|(x, y)| (x - y).abs() / y.abs().max(1.0))
                    .fold(0f32, f32::max);
                assert!(d < 1e-5, "{name} (bf16 {bf16}): {d}");
            }
            // Without autodiff (evaluation) the same output.
            let untracked = swiglu_linear(
                gate.clone().inner(),
                up.clone().inner(),
                weight.clone().inner(),
                bf16,
            );
            assert_eq!(v(untracked), fused.0, "untracked output (bf16 {bf16})");
        }
    }

    /// RMSNorm and LayerNorm against burn's composed ops: the output and the gradients of the
    /// input, the weight and the bias, with rows wider than a vector and a ragged tail (d = 37)
    /// and an offset mean (the two-pass variance).
    #[test]
    fn fused_norms_match_composed_ops_in_value_and_gradients() {
        let _rng = crate::test_rng();
        let device = Device::flex().autodiff();
        let (rows, d) = ([3, 5], 37);
        let x = Tensor::<3>::random(
            [rows[0], rows[1], d],
            Distribution::Normal(4.0, 2.0),
            &device,
        );
        let w = Tensor::<1>::random([d], Distribution::Normal(1.0, 0.3), &device);
        let b = Tensor::<1>::random([d], Distribution::Normal(0.0, 0.3), &device);
        let up = Tensor::<3>::random(
            [rows[0], rows[1], d],
            Distribution::Normal(0.0, 1.0),
            &device,
        );
        let grads_of = |fused: bool, layer: bool| {
            let (x, w, b) = (
                x.clone().require_grad(),
                w.clone().require_grad(),
                b.clone().require_grad(),
            );
            let y = match (fused, layer) {
                (true, true) => layer_norm(x.clone(), w.clone(), b.clone(), 1e-5),
                (false, true) => {
                    burn::tensor::module::layer_norm(x.clone(), w.clone(), Some(b.clone()), 1e-5)
                }
                (true, false) => rms_norm(x.clone(), w.clone(), 1e-5),
                (false, false) => {
                    let rms = x.clone().square().mean_dim(2).add_scalar(1e-5).sqrt();
                    (x.clone() / rms) * w.clone().unsqueeze()
                }
            };
            let g = (y.clone() * up.clone()).sum().backward();
            let gb = if layer { b.grad(&g) } else { None };
            (y.inner(), x.grad(&g).unwrap(), w.grad(&g).unwrap(), gb)
        };
        for layer in [false, true] {
            let (y1, gx1, gw1, gb1) = grads_of(true, layer);
            let (y2, gx2, gw2, gb2) = grads_of(false, layer);
            let what = if layer { "layer norm" } else { "rms norm" };
            assert!(max_diff(y1, y2) < 1e-5, "{what}: output");
            assert!(max_diff(gx1, gx2) < 1e-5, "{what}: input gradient");
            assert!(max_diff(gw1, gw2) < 1e-4, "{what}: weight gradient");
            if let (Some(a), Some(b)) = (gb1, gb2) {
                assert!(max_diff(a, b) < 1e-4, "{what}: bias gradient");
            } else {
                assert!(!layer, "no bias gradient");
            }
        }
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

    /// The CPU attention kernel, which keeps no probabilities, against the products around
    /// the probabilities kernel with k and v expanded: output and the gradients of q, k and v,
    /// under an upstream gradient of random weights. Cases: grouped heads (4 query heads on 2
    /// key / value heads) over two blocks of query rows (70 = 64 + a ragged 6) with a causal
    /// mask and a left-padded row whose first queries see no key at all (a uniform softmax);
    /// a few queries after a longer past (Tq < Tk) with padded keys and no causality; and
    /// both with dropout, which must drop the same elements as the probabilities kernel for
    /// one seed.
    #[test]
    fn fused_attention_matches_composed_ops_in_value_and_gradient() {
        let _rng = crate::test_rng();
        let device = Device::flex().autodiff();
        // (batch, heads, kv heads, queries, keys, head dim, causal, padded keys per row)
        let cases = [
            (2, 4, 2, 70, 70, 8, true, [0, 5]),
            (2, 3, 1, 9, 75, 16, false, [3, 0]),
            (1, 2, 1, 70, 70, 64, true, [4, 0]),
        ];
        for (b, h, kv, tq, tk, hd, causal, pads) in cases {
            let keep: Vec<bool> = (0..b * tk).map(|i| i % tk >= pads[i / tk]).collect();
            let keep =
                Tensor::<2, burn::tensor::Bool>::from_data(TensorData::new(keep, [b, tk]), &device);
            let bias = crate::layers::attention_bias(keep, tq, causal);
            let normal = |shape: [usize; 4]| {
                Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &device)
            };
            // In the second case q, k and v are views of `[B, T, H, hd]` tensors, as
            // `split_heads` makes them, which the kernel reads through their strides; the
            // gradients compared are those of the `[B, T, H, hd]` tensors.
            let strided = !causal;
            let shape =
                |[b, h, t, d]: [usize; 4]| if strided { [b, t, h, d] } else { [b, h, t, d] };
            let (q, k, v) = (
                normal(shape([b, h, tq, hd])),
                normal(shape([b, kv, tk, hd])),
                normal(shape([b, kv, tk, hd])),
            );
            let w = normal([b, h, tq, hd]);
            let scale = 1.0 / (hd as f32).sqrt();
            for p in [0.0, 0.3] {
                let seed = 1234;
                let run = |fused: bool| {
                    let [qt, kt, vt] = [&q, &k, &v].map(|t| t.clone().require_grad());
                    let [q, k, v] = [&qt, &kt, &vt].map(|t| {
                        if strided {
                            t.clone().swap_dims(1, 2)
                        } else {
                            t.clone()
                        }
                    });
                    let out = if fused {
                        Tensor::from_dispatch(<Dispatch as CpuFusedOps>::fused_attention(
                            q.clone().into_dispatch(),
                            k.clone().into_dispatch(),
                            v.clone().into_dispatch(),
                            bias.clone().into_dispatch(),
                            None,
                            scale,
                            p,
                            seed,
                        ))
                    } else {
                        let group = h / kv;
                        let (ke, ve) = (
                            crate::layers::repeat_kv(k.clone(), group),
                            crate::layers::repeat_kv(v.clone(), group),
                        );
                        let scores = q.clone().matmul(ke.swap_dims(2, 3));
                        let probs =
                            Tensor::from_dispatch(<Dispatch as FusedOps>::fused_attention_probs(
                                scores.into_dispatch(),
                                bias.clone().into_dispatch(),
                                scale,
                                p,
                                seed,
                            ));
                        probs.matmul(ve)
                    };
                    // Strided, the output's gradient reaches the kernel as a view too.
                    let loss = if strided {
                        (out.clone().swap_dims(1, 2) * w.clone().swap_dims(1, 2)).sum()
                    } else {
                        (out.clone() * w.clone()).sum()
                    };
                    let grads = loss.backward();
                    let [dq, dk, dv] = [&qt, &kt, &vt]
                        .map(|t| t.grad(&grads).unwrap_or_else(|| panic!("no gradient")));
                    [out.inner(), dq, dk, dv]
                };
                // Under bf16 compute with AMX, heads of 64 take bf16 products (autocast's
                // rounding of the operands): within bf16 rounding of the f32 ops, and not equal.
                let bf16 = hd >= 64 && bf16::amx_ready();
                for compute in [None, Some(FloatDType::BF16)]
                    .into_iter()
                    .take(1 + bf16 as usize)
                {
                    let fused = {
                        let _scope = crate::precision::scope(compute);
                        run(true)
                    };
                    let composed = run(false);
                    let tolerance = if compute.is_some() { 2e-2 } else { 2e-6 };
                    for (name, (f, c)) in ["output", "dq", "dk", "dv"]
                        .iter()
                        .zip(fused.into_iter().zip(composed))
                    {
                        let scale = c.clone().abs().max().into_scalar::<f32>();
                        let diff = max_diff(f, c);
                        assert!(
                            diff <= tolerance * scale.max(1.0),
                            "{name} (b {b}, h {h}, kv {kv}, tq {tq}, tk {tk}, p {p}, \
                             {compute:?}): max diff {diff}"
                        );
                        if compute.is_some() {
                            assert!(diff > 1e-5 * scale, "{name}: bf16 products did not run");
                        }
                    }
                }
            }
        }
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

/// The CubeCL kernels on Mesa's software Vulkan device (llvmpipe), against burn's composed ops
/// on the same device and against the CPU kernels.
///
/// Tolerances: both sides compute in f32 and differ in summation order (a cube's tree against a
/// sequential loop) and in exp / erf (the device's own against the CPU kernels' polynomials,
/// each within a few ulp or 1.5e-7 absolute), so values agree to about 1e-6 relative; the
/// bounds below leave a factor of ten or more over that and stay far below any real error
/// (a wrong index, a missing scale), which moves results by whole units.
#[cfg(all(test, any(feature = "wgpu", feature = "cuda")))]
mod cube_tests {
    use super::*;
    use burn::tensor::{Device, Distribution};

    /// The software wgpu adapter (scripts/test_devices.sh), or CUDA in a build without wgpu
    /// (the GPU check's bundle). Made directly rather than through `device::for_tests`: the
    /// device tests of this binary register the wgpu runtime themselves, and a second
    /// registration through the options' `init` fails.
    fn gpu() -> Device {
        #[cfg(feature = "wgpu")]
        return Device::wgpu(burn::tensor::DeviceKind::Cpu);
        #[cfg(not(feature = "wgpu"))]
        return Device::cuda(0);
    }

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .unwrap_or_else(|e| panic!("tensor data: {e:?}"))
    }

    /// Every `|a − b| ≤ atol + rtol·|b|`; names the worst element otherwise.
    fn assert_close<const D: usize>(a: Tensor<D>, b: Tensor<D>, rtol: f32, atol: f32, what: &str) {
        let (a, b) = (values(a), values(b));
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        assert!(!a.is_empty(), "{what}: empty");
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!(
                (x - y).abs() <= atol + rtol * y.abs(),
                "{what}: element {i} is {x}, want {y}"
            );
        }
    }

    fn grad_of<const D: usize>(x: &Tensor<D>, g: &burn::tensor::Gradients) -> Tensor<D> {
        x.grad(g).unwrap_or_else(|| panic!("no gradient"))
    }

    fn fused_dropout<const D: usize>(x: Tensor<D>, p: f64, seed: u64) -> Tensor<D> {
        Tensor::from_dispatch(<Dispatch as FusedOps>::fused_dropout(
            x.into_dispatch(),
            p,
            seed,
        ))
    }

    fn fused_probs(s: Tensor<4>, bias: Tensor<4>, scale: f32, p: f64, seed: u64) -> Tensor<4> {
        Tensor::from_dispatch(<Dispatch as FusedOps>::fused_attention_probs(
            s.into_dispatch(),
            bias.into_dispatch(),
            scale,
            p,
            seed,
        ))
    }

    #[test]
    fn cube_gelu_matches_burn_in_value_and_gradient() {
        let _rng = crate::test_rng();
        let device = gpu().autodiff();
        let x = Tensor::<3>::random([2, 5, 300], Distribution::Normal(0.0, 3.0), &device);
        assert!(fused(&x), "a device tensor takes the kernels");
        let a = x.clone().require_grad();
        let ya = gelu(a.clone());
        let yb = burn::tensor::activation::gelu(x.clone());
        assert_close(ya.clone(), yb, 1e-5, 1e-6, "gelu");
        let w = Tensor::<3>::random([2, 5, 300], Distribution::Normal(0.0, 1.0), &device);
        let ga = (ya * w.clone()).sum().backward();
        // burn's own GELU backward on this backend is the derivative of the tanh approximation
        // (off by up to 2e-4); the exact one is Φ(x) + x·φ(x), composed here from burn's ops.
        let cdf = (x.clone() / std::f32::consts::SQRT_2).erf().add_scalar(1.0) / 2.0;
        let pdf = (x.clone().powi_scalar(2) / -2.0).exp() * 0.398_942_3;
        let want = w * (cdf + x * pdf);
        assert_close(grad_of(&a, &ga), want, 1e-5, 1e-6, "gelu gradient");
    }

    /// The same seed keeps the same elements on the GPU as on the CPU, in the forward pass and
    /// in the gradient.
    #[test]
    fn cube_dropout_draws_the_cpu_mask() {
        let _rng = crate::test_rng();
        let cpu = Device::flex().autodiff();
        let x = Tensor::<2>::random([64, 300], Distribution::Normal(1.0, 0.1), &cpu);
        let xg = Tensor::<2>::from_data(x.to_data(), &gpu().autodiff());
        let seed = 0x0123_4567_89ab_cdef;
        let (a, b) = (x.require_grad(), xg.require_grad());
        let (ya, yb) = (
            fused_dropout(a.clone(), 0.25, seed),
            fused_dropout(b.clone(), 0.25, seed),
        );
        let (va, vb) = (values(ya.clone()), values(yb.clone()));
        let zeros = |v: &[f32]| v.iter().map(|&x| x == 0.0).collect::<Vec<_>>();
        assert_eq!(zeros(&va), zeros(&vb), "same seed, same mask");
        let dropped = zeros(&va).iter().filter(|&&z| z).count() as f64 / va.len() as f64;
        assert!((dropped - 0.25).abs() < 0.02, "dropped fraction {dropped}");
        // The same product `x · (1 / 0.75)` on both.
        assert_eq!(va, vb);
        let (ga, gb) = (ya.sum().backward(), yb.sum().backward());
        assert_eq!(values(grad_of(&a, &ga)), values(grad_of(&b, &gb)));
    }

    #[test]
    fn cube_attention_probs_match_burn_and_the_cpu_kernel() {
        let _rng = crate::test_rng();
        let device = gpu().autodiff();
        // Rows of 300 keys: longer than a cube (256 units), so units stride.
        let [b, h, tq, tk] = [2, 3, 5, 300];
        let s = Tensor::<4>::random([b, h, tq, tk], Distribution::Normal(0.0, 2.0), &device);
        let mut bias = vec![0f32; b * tq * tk];
        for (i, v) in bias.iter_mut().enumerate() {
            if i % tk >= tk - 1 - (i / (tq * tk)) * 7 {
                *v = crate::layers::MASK_VALUE; // pad the last keys of each row
            }
        }
        let bias = Tensor::<4>::from_data(TensorData::new(bias, [b, 1, tq, tk]), &device);
        let scale = 0.37;
        let (a, c) = (s.clone().require_grad(), s.clone().require_grad());
        let pa = attention_probs(a.clone(), bias.clone(), scale, 0.0);
        let pc = burn::tensor::activation::softmax(
            c.clone().mul_scalar(scale) + bias.clone().expand([b, h, tq, tk]),
            3,
        );
        assert_close(pa.clone(), pc.clone(), 1e-4, 1e-7, "probabilities");
        let w = Tensor::<4>::random([b, h, tq, tk], Distribution::Normal(0.0, 1.0), &device);
        let ga = (pa * w.clone()).sum().backward();
        let gc = (pc * w.clone()).sum().backward();
        assert_close(
            grad_of(&a, &ga),
            grad_of(&c, &gc),
            1e-4,
            1e-6,
            "score gradient",
        );

        // With dropout: the CPU kernel with the same seed drops the same probabilities.
        let cpu = Device::flex().autodiff();
        let to_cpu = |t: &Tensor<4>| Tensor::<4>::from_data(t.to_data(), &cpu);
        let (sg, sc) = (s.clone().require_grad(), to_cpu(&s).require_grad());
        let seed = 99;
        let pg = fused_probs(sg.clone(), bias.clone(), scale, 0.3, seed);
        let pc = fused_probs(sc.clone(), to_cpu(&bias), scale, 0.3, seed);
        let pg_cpu = Tensor::<4>::from_data(pg.to_data(), &cpu);
        assert_close(pg_cpu, pc.clone(), 1e-4, 1e-7, "dropped probabilities");
        let gg = (pg * w.clone()).sum().backward();
        let gc = (pc * to_cpu(&w)).sum().backward();
        let gg_cpu = Tensor::<4>::from_data(grad_of(&sg, &gg).to_data(), &cpu);
        assert_close(
            gg_cpu,
            grad_of(&sc, &gc),
            1e-4,
            1e-6,
            "dropped score gradient",
        );
    }

    #[test]
    fn cube_cross_entropy_matches_burn_in_value_and_gradient() {
        let _rng = crate::test_rng();
        let device = gpu().autodiff();
        let x = Tensor::<2>::random([7, 1000], Distribution::Normal(0.0, 4.0), &device);
        let targets: Vec<u32> = vec![0, 999, 17, 500, 3, 3, 250];
        let (a, b) = (x.clone().require_grad(), x.require_grad());
        let la = cross_entropy_sum(a.clone(), &targets);
        let t = Tensor::<1, burn::tensor::Int>::from_data(
            TensorData::new(targets.iter().map(|&t| t as i64).collect(), [7]),
            &device,
        );
        let lb = -burn::tensor::activation::log_softmax(b.clone(), 1)
            .gather(1, t.reshape([7, 1]))
            .sum();
        assert_close(la.clone(), lb.clone(), 1e-5, 0.0, "loss");
        // Scale the loss so the incoming gradient is not 1.
        let ga = la.mul_scalar(0.5).backward();
        let gb = lb.mul_scalar(0.5).backward();
        assert_close(
            grad_of(&a, &ga),
            grad_of(&b, &gb),
            1e-4,
            1e-7,
            "logit gradient",
        );
    }

    #[test]
    fn cube_quant_matmul_matches_the_cpu_kernel() {
        let _rng = crate::test_rng();
        let cpu = Device::flex().autodiff();
        let (rows, cols) = (48, 128);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
            .collect();
        let w = Arc::new(QuantMatrix::nf4(&w, rows, cols, true));
        let x = Tensor::<3>::random([2, 3, cols], Distribution::Normal(0.0, 1.0), &cpu);
        let xg = Tensor::<3>::from_data(x.to_data(), &gpu().autodiff());
        let (a, b) = (x.require_grad(), xg.require_grad());
        let (ya, yb) = (quant_matmul(a.clone(), &w), quant_matmul(b.clone(), &w));
        let yb_cpu = Tensor::<3>::from_data(yb.to_data(), &cpu);
        assert_close(yb_cpu, ya.clone(), 1e-4, 1e-5, "product");
        let (ga, gb) = (ya.sum().backward(), yb.sum().backward());
        let gb_cpu = Tensor::<3>::from_data(grad_of(&b, &gb).to_data(), &cpu);
        assert_close(gb_cpu, grad_of(&a, &ga), 1e-4, 1e-5, "input gradient");
    }

    /// f32 matrix products on the device keep f32's precision, as PyTorch's f32 matmul does by
    /// default. The operand `1 + 2^-12` times the identity is `1 + 2^-12` in f32, and exactly 1
    /// with operands rounded to TF32 (10 explicit mantissa bits), which cubek's tensor-core
    /// kernels do on a device that has TF32 (`adjust_dtypes` in cubek-matmul 0.3.1): burn's own
    /// matmul failed this on an H200 (GPU check of 2026-12-04, BENCHMARKS), [`f32_matmul`]
    /// must not, in both passes. Large enough (256³) for tensor-core kernels to be picked.
    #[test]
    fn cube_f32_matmul_is_not_rounded_to_tf32() {
        let n = 256;
        let device = gpu().autodiff();
        let v = 1.0 + 2f32.powi(-12);
        let eye: Vec<f32> = (0..n * n)
            .map(|i| if i / n == i % n { 1.0 } else { 0.0 })
            .collect();
        let a = Tensor::<2>::full([n, n], v, &device).require_grad();
        let b = Tensor::<2>::from_data(TensorData::new(eye, [n, n]), &device).require_grad();
        let y = f32_matmul(a.clone(), b.clone());
        let worst = |t: Tensor<2>, want: f32| {
            values(t)
                .iter()
                .map(|x| (x - want).abs())
                .fold(0f32, f32::max)
        };
        let off = worst(y.clone(), v);
        assert!(
            off == 0.0,
            "f32 product off by {off:e} (TF32 rounding gives {:e})",
            v - 1.0
        );
        // d(sum y)/da = 1 · bᵀ (ones times the identity: ones); d/db = aᵀ · 1 = n·v per element,
        // which TF32 would make n.
        let g = (y * Tensor::<2>::full([n, n], v, &device)).sum().backward();
        let off = worst(grad_of(&a, &g), v);
        assert!(off == 0.0, "gradient of the left operand off by {off:e}");
        let want = n as f32 * v * v;
        let off = worst(grad_of(&b, &g), want);
        assert!(
            off <= want * 1e-6,
            "gradient of the right operand off by {off:e}"
        );
    }

    /// cubek's unit routines that [`f32_matmul`] runs on a device with TF32 give the CPU's
    /// products for plain, batched and transposed operands, every size class twice (the second
    /// time from the tuned choice). Launched directly, so that the software adapter, which has
    /// no TF32, runs them too.
    #[test]
    fn cube_unit_matmul_routines_equal_the_cpu_product() {
        use burn::backend::ops::FloatTensorOps;
        use burn_cubecl::CubeBackend;
        let cpu = Device::flex();
        let device = gpu();
        let on_gpu = |t: &Tensor<4>| {
            Tensor::<4>::from_data(t.to_data(), &device)
                .try_into_primitive::<CubeBackend>()
                .unwrap_or_else(|_| panic!("not a cube tensor"))
        };
        for (batch, m, k, n, transposed) in [
            (1, 64, 96, 80, false),
            (1, 1, 64, 48, false),
            (6, 17, 33, 19, false),
            (2, 40, 24, 56, true),
        ] {
            let a = Tensor::<4>::random([batch, 1, m, k], Distribution::Normal(0.0, 1.0), &cpu);
            let b = if transposed {
                Tensor::<4>::random([batch, 1, n, k], Distribution::Normal(0.0, 1.0), &cpu)
                    .swap_dims(2, 3)
            } else {
                Tensor::<4>::random([batch, 1, k, n], Distribution::Normal(0.0, 1.0), &cpu)
            };
            let want = a.clone().matmul(b.clone());
            // The transposed operand keeps its strides on the device.
            let (ga, gb) = if transposed {
                let rows = on_gpu(&b.clone().swap_dims(2, 3));
                (on_gpu(&a), CubeBackend::float_swap_dims(rows, 2, 3))
            } else {
                (on_gpu(&a), on_gpu(&b))
            };
            for round in 0..2 {
                let got = cube::exact_f32_matmul(ga.clone(), gb.clone());
                let got = Tensor::<4>::from_primitive::<CubeBackend>(got);
                let got = Tensor::<4>::from_data(got.to_data(), &cpu);
                assert_close(
                    got,
                    want.clone(),
                    1e-5,
                    1e-5,
                    &format!("{batch}x{m}x{k}x{n} transposed {transposed}, round {round}"),
                );
            }
        }
    }
}
