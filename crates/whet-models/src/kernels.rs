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
//!   gradient `scale·P⊙(dP − Σ dP⊙P)` in one pass back. The bias (padding / causal mask) and the
//!   dropout keep-mask are constants; the scores get the gradient.
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

/// Elements per rayon task: small enough to split a `[16, 64, 1536]` activation over the cores,
/// large enough that scheduling stays negligible.
const CHUNK: usize = 16 * 1024;

/// The fused operations, implemented for `Flex` and differentiated by hand for
/// `Autodiff<Flex>`.
#[backend_extension(Autodiff, Flex)]
pub trait FusedOps: burn::backend::Backend {
    /// Exact (erf) GELU.
    fn fused_gelu(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// `softmax(scores·scale + bias) ⊙ keep · keep_scale` over the last dimension; `bias`
    /// broadcasts over heads (`[B, 1, Tq, Tk]` against `[B, H, Tq, Tk]`).
    fn fused_attention_probs(
        scores: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        keep: FloatTensor<Self>,
        scale: f32,
        keep_scale: f32,
    ) -> FloatTensor<Self>;
}

/// Exact GELU, `0.5·x·(1 + erf(x/√2))`, as `torch.nn.functional.gelu`.
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if !on_flex(&x) {
        return burn::tensor::activation::gelu(x);
    }
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_gelu(x.into_dispatch()))
}

/// Attention probabilities with dropout: `softmax(scores·scale + bias)`, then each value kept
/// where `keep` is 1 and scaled by `keep_scale` (`1 / (1 - p)`), else zeroed.
///
/// # Shapes
/// - scores `[B, H, Tq, Tk]`
/// - bias `[B, 1, Tq, Tk]`
/// - keep `[B, H, Tq, Tk]` (0 or 1)
/// - output `[B, H, Tq, Tk]`
pub fn attention_probs(
    scores: Tensor<4>,
    bias: Tensor<4>,
    keep: Tensor<4>,
    scale: f32,
    keep_scale: f32,
) -> Tensor<4> {
    if !on_flex(&scores) {
        let [b, h, tq, tk] = scores.dims();
        let probs = burn::tensor::activation::softmax(
            scores.mul_scalar(scale) + bias.expand([b, h, tq, tk]),
            3,
        );
        return probs * keep.mul_scalar(keep_scale);
    }
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_attention_probs(
        scores.into_dispatch(),
        bias.into_dispatch(),
        keep.into_dispatch(),
        scale,
        keep_scale,
    ))
}

/// Whether a tensor lives on the CPU backend these kernels are written for.
fn on_flex<const D: usize>(x: &Tensor<D>) -> bool {
    matches!(x.device().inner().as_dispatch(), DispatchDevice::Flex(_))
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
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e = p * (r * r) + r + 1.0;
    e * f32::from_bits(((n as i32 + 127) << 23) as u32)
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

multiversion!(softmax_row(scores: &[f32], bias: &[f32], scale: f32, probs: &mut [f32]) {
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
    for p in probs.iter_mut() {
        *p *= inv;
    }
});

multiversion!(dropout_row(probs: &[f32], keep: &[f32], keep_scale: f32, out: &mut [f32]) {
    for ((o, &p), &k) in out.iter_mut().zip(probs).zip(keep) {
        *o = p * k * keep_scale;
    }
});

multiversion!(softmax_backward_row(
    probs: &[f32],
    keep: &[f32],
    grad: &[f32],
    scale: f32,
    keep_scale: f32,
    out: &mut [f32]
) {
    // dP = dOut ⊙ keep · keep_scale; dS = scale · P ⊙ (dP − Σ dP ⊙ P)
    let mut dot = 0.0;
    for ((&p, &k), &g) in probs.iter().zip(keep).zip(grad) {
        dot += g * k * keep_scale * p;
    }
    for (((o, &p), &k), &g) in out.iter_mut().zip(probs).zip(keep).zip(grad) {
        *o = scale * p * (g * k * keep_scale - dot);
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
    keep: &FlexTensor,
    scale: f32,
    keep_scale: f32,
) -> (FlexTensor, FlexTensor) {
    let dims = scores.layout().shape().to_vec();
    let (b, h, tq, tk) = (dims[0], dims[1], dims[2], dims[3]);
    let (s, bias_v, keep_v) = (values(scores), values(bias), values(keep));
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
                softmax_row(&s[at..at + tk], &bias_v[brow..brow + tk], scale, p);
                dropout_row(p, &keep_v[at..at + tk], keep_scale, o);
            }
        });
    debug_assert_eq!(bias_v.len(), b * tq * tk);
    (new_tensor(probs, scores), new_tensor(out, scores))
}

fn attention_probs_backward(
    probs: &FlexTensor,
    keep: &FlexTensor,
    grad: &FlexTensor,
    scale: f32,
    keep_scale: f32,
) -> FlexTensor {
    let tk = *probs.layout().shape().as_slice().last().unwrap_or(&1);
    let (p, k, g) = (values(probs), values(keep), values(grad));
    let mut out = vec![0f32; p.len()];
    let per_task = rows_per_task(tk) * tk;
    out.par_chunks_mut(per_task)
        .enumerate()
        .for_each(|(task, o_rows)| {
            let start = task * per_task;
            for (i, o) in o_rows.chunks_mut(tk).enumerate() {
                let at = start + i * tk;
                softmax_backward_row(
                    &p[at..at + tk],
                    &k[at..at + tk],
                    &g[at..at + tk],
                    scale,
                    keep_scale,
                    o,
                );
            }
        });
    new_tensor(out, probs)
}

// ---------------------------------------------------------------------------------------------
// The backend implementations.

impl FusedOps for Flex {
    fn fused_gelu(x: FlexTensor) -> FlexTensor {
        gelu_forward(&dense(x))
    }

    fn fused_attention_probs(
        scores: FlexTensor,
        bias: FlexTensor,
        keep: FlexTensor,
        scale: f32,
        keep_scale: f32,
    ) -> FlexTensor {
        let (scores, bias, keep) = (dense(scores), dense(bias), dense(keep));
        attention_probs_forward(&scores, &bias, &keep, scale, keep_scale).1
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

        match GeluBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let input = dense(x.primitive().clone());
                let out = gelu_forward(&input);
                prep.finish(input, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(gelu_forward(&dense(x.into_primitive()))),
        }
    }

    fn fused_attention_probs(
        scores: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        keep: FloatTensor<Self>,
        scale: f32,
        keep_scale: f32,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct ProbsBackward;

        impl Backward<Flex, 1> for ProbsBackward {
            /// Probabilities before dropout, the keep-mask, scale, keep scale.
            type State = (FlexTensor, FlexTensor, f32, f32);

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let [parent] = ops.parents;
                let grad = grads.consume::<Flex>(&ops.node);
                let (probs, keep, scale, keep_scale) = ops.state;
                if let Some(node) = parent {
                    let g =
                        attention_probs_backward(&probs, &keep, &dense(grad), scale, keep_scale);
                    grads.register::<Flex>(node.id, g);
                }
            }
        }

        let bias = dense(bias.into_primitive());
        let keep = dense(keep.into_primitive());
        match ProbsBackward
            .prepare::<C>([scores.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let s = dense(scores.primitive().clone());
                let (probs, out) = attention_probs_forward(&s, &bias, &keep, scale, keep_scale);
                prep.finish((probs, keep, scale, keep_scale), out)
            }
            OpsKind::UnTracked(prep) => {
                let s = dense(scores.into_primitive());
                prep.finish(attention_probs_forward(&s, &bias, &keep, scale, keep_scale).1)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, Distribution};

    #[test]
    fn exp_and_normal_cdf_match_libm() {
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
    fn fused_attention_probs_match_composed_ops_in_value_and_gradient() {
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
        let keep = Tensor::<4>::random([b, h, tq, tk], Distribution::Bernoulli(0.8), &device);
        let (scale, keep_scale) = (0.37, 1.25);
        let a = s.clone().require_grad();
        let c = s.require_grad();
        let pa = attention_probs(a.clone(), bias.clone(), keep.clone(), scale, keep_scale);
        let pc = burn::tensor::activation::softmax(
            c.clone().mul_scalar(scale) + bias.expand([b, h, tq, tk]),
            3,
        ) * keep.mul_scalar(keep_scale);
        assert!(max_diff(pa.clone(), pc.clone()) < 1e-6);
        let w = Tensor::<4>::random([b, h, tq, tk], Distribution::Normal(0.0, 1.0), &device);
        let ga = (pa * w.clone()).sum().backward();
        let gc = (pc * w).sum().backward();
        let (ga, gc) = (
            a.grad(&ga).unwrap_or_else(|| panic!("no grad")),
            c.grad(&gc).unwrap_or_else(|| panic!("no grad")),
        );
        assert!(max_diff(ga, gc) < 1e-5);
    }
}
