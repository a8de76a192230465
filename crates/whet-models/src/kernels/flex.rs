//! The CPU kernels: loops over contiguous f32 slices, split over rayon's threads and compiled
//! for the widest vector extension the CPU has.

use burn::backend::Flex;
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::tensor::{DType, TensorData};
use rayon::prelude::*;
use std::sync::Arc;

use super::{
    AdamwConsts, CpuKernels, CpuOptimOps, CpuSkinnyOps, DropMask, Kernels, PartsGrad, Segments,
    adamw_element, bf16,
};
use crate::quant::QuantMatrix;

/// Elements per rayon task: small enough to split a `[16, 64, 1536]` activation over the cores,
/// large enough that scheduling stays negligible.
const CHUNK: usize = 16 * 1024;

/// `dst[m, n] = lhs[m, k] · rhs[k, n]` (or `+=` with `accumulate`) with explicit (row, column)
/// strides, through the gemm crate burn's CPU backend uses, split over rayon's threads when the
/// product is large.
#[allow(clippy::too_many_arguments)]
fn gemm_strided(
    m: usize,
    n: usize,
    k: usize,
    lhs: &[f32],
    lhs_strides: (usize, usize),
    rhs: &[f32],
    rhs_strides: (usize, usize),
    dst: &mut [f32],
    accumulate: bool,
) {
    let parallel = m * n * k >= 64 * 64 * 64;
    assert!(dst.len() >= m * n);
    // SAFETY: dst holds the m × n values that rows n apart reach (asserted), and the
    // exclusive borrow keeps every other reader and writer away.
    unsafe {
        gemm_into(
            m,
            n,
            k,
            lhs,
            lhs_strides,
            rhs,
            rhs_strides,
            (dst.as_mut_ptr(), n),
            accumulate,
            parallel,
        )
    }
}

/// [`gemm_strided`] into rows `dst_rs` apart from `dst` (the rows of one head in a
/// `[B, T, H, hd]` buffer lie `H·hd` apart), on this thread only when `parallel` is false
/// (inside a rayon task).
///
/// # Safety
/// `dst` is valid for reads and writes at `r · dst_rs + c` for every `r < m`, `c < n`, and no
/// other code reads or writes those values meanwhile.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm_into(
    m: usize,
    n: usize,
    k: usize,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
    (dst, dst_rs): (*mut f32, usize),
    accumulate: bool,
    parallel: bool,
) {
    assert!(m == 0 || n == 0 || k == 0 || lhs.len() > (m - 1) * lhs_rs + (k - 1) * lhs_cs);
    assert!(m == 0 || n == 0 || k == 0 || rhs.len() > (k - 1) * rhs_rs + (n - 1) * rhs_cs);
    let parallelism = if parallel {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: every index the strides reach lies inside the slices: lhs (m-1)·rs + (k-1)·cs,
    // rhs (k-1)·rs + (n-1)·cs (asserted); dst's rows are the caller's promise.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            if accumulate { 1.0 } else { 0.0 },
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
    if let Some(y) = quant_skinny(xv, n, w) {
        return FlexTensor::from_data(TensorData::new(y, [n, rows]));
    }
    let wd = w.dequantize();
    let mut y = vec![0f32; n * rows];
    gemm_strided(n, rows, cols, xv, (cols, 1), &wd, (1, cols), &mut y, false);
    FlexTensor::from_data(TensorData::new(y, [n, rows]))
}

/// `y [n, out] = x [n, in] · Wᵀ` for at most [`QUANT_IN_PLACE_ROWS`] rows of `x` (a
/// generation step or its prompt), read straight from a GGUF matrix's Q4_0, Q4_1 or Q8_0 blocks: each block is
/// dequantised into registers exactly as [`whet_gguf::dequantize_into`] does (the weights are
/// the values transformers dequantises the file to) and multiplied into the rows of `x` in f32,
/// so a step reads the file's 4.5 or 8.5 bits a weight instead of 32. `None` for other types
/// and more rows (the whole matrix is dequantised then, as in training).
///
/// Why by hand: the one crate with these block formats is ggml's own C (llama.cpp), which
/// multiplies 8-bit-quantised activations, not f32 ones.
#[cfg(target_arch = "x86_64")]
fn quant_skinny(x: &[f32], n: usize, w: &QuantMatrix) -> Option<Vec<f32>> {
    use whet_gguf::GgmlType;
    let (ty, raw) = w.ggml_blocks()?;
    let code = match ty {
        GgmlType::Q4_0 => 0,
        GgmlType::Q4_1 => 1,
        GgmlType::Q8_0 => 2,
        _ => return None,
    };
    if n == 0 || n > QUANT_IN_PLACE_ROWS || !quant_steps_in_place() {
        return None;
    }
    let (rows, cols) = w.dims();
    let row_bytes = raw.len() / rows;
    let mut y = vec![0f32; n * rows];
    // Four rows of x a pass over the weights (a prompt's rows take several passes, the later
    // ones from the cache for a layer of SmolLM2's size).
    for (g, xs) in x.chunks(super::SKINNY_ROWS * cols).enumerate() {
        let n = xs.len() / cols;
        // [out, n], transposed below.
        let mut yt = vec![0f32; rows * n];
        const CHUNK: usize = 64;
        // SAFETY: AVX-512F is present (checked above); `raw` is whole rows of whole blocks of
        // this type (`QuantMatrix::ggml` checked it), `xs` is n rows of `cols`.
        let run = |(out, blocks): (&mut [f32], &[u8])| unsafe {
            quant_rows(code, blocks, row_bytes, xs, n, cols, out)
        };
        if rows * cols < 1 << 18 {
            // As the f32 skinny product: below a quarter million weights a second thread
            // costs more than it saves.
            run((&mut yt, raw));
        } else {
            yt.par_chunks_mut(n * CHUNK)
                .zip(raw.par_chunks(row_bytes * CHUNK))
                .for_each(run);
        }
        let first = g * super::SKINNY_ROWS;
        for (o, ys) in yt.chunks(n).enumerate() {
            for (r, &v) in ys.iter().enumerate() {
                y[(first + r) * rows + o] = v;
            }
        }
    }
    Some(y)
}

/// Rows of `x` up to which [`quant_skinny`] reads the blocks in place (a generation step, or a
/// prompt of up to 64 tokens): beyond, dequantising the matrix once and one f32 product
/// cost less than a pass over the blocks every four rows.
const QUANT_IN_PLACE_ROWS: usize = 64;

#[cfg(not(target_arch = "x86_64"))]
fn quant_skinny(_: &[f32], _: usize, _: &QuantMatrix) -> Option<Vec<f32>> {
    None
}

/// `dx [N, in] = dy [N, out] · W`.
fn quant_matmul_backward(dy: &FlexTensor, w: &QuantMatrix) -> FlexTensor {
    let (rows, cols) = w.dims();
    let gv = values(dy);
    let n = gv.len() / rows;
    let wd = w.dequantize();
    let mut dx = vec![0f32; n * cols];
    gemm_strided(n, cols, rows, gv, (rows, 1), &wd, (cols, 1), &mut dx, false);
    FlexTensor::from_data(TensorData::new(dx, [n, cols]))
}

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

// After `multiversion!`, which it uses.
mod attention;

/// Whether [`quant_skinny`] has its vector kernel on this CPU (AVX-512); elsewhere a
/// generation step is faster from f32 weights than from blocks decoded by scalar code.
pub(crate) fn quant_steps_in_place() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Rows of `raw` (each `row_bytes` of blocks of 32 weights) dotted with the `n` rows of `x`,
/// into `out` (`[row][n]`). Each block is dequantised in registers as `whet_gguf`'s
/// `dequantize_into` computes it (a product and a sum, not fused: the same f32 weights), then
/// multiplied into 32 partial sums a row of `x`, added up at the end of the weight row.
///
/// # Safety
/// The CPU has AVX-512F; `raw` holds whole rows of whole blocks of type `code` (0 Q4_0, 1 Q4_1,
/// 2 Q8_0), `x` holds `n` rows of `cols` = 32 × blocks a row, `out` `n` values a row of `raw`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn quant_rows(
    code: u8,
    raw: &[u8],
    row_bytes: usize,
    x: &[f32],
    n: usize,
    cols: usize,
    out: &mut [f32],
) {
    // One copy a type and row count, so that the block's decoding and the sums of each row of
    // `x` stay in registers (a loop over both spilled them to the stack).
    macro_rules! each {
        ($($c:literal),*; $($n:literal),*) => {
            each!(@c [$($c),*] [$($n),*])
        };
        (@c [$($c:literal),*] $ns:tt) => {
            match code {
                $($c => each!(@n $c $ns),)*
                _ => unreachable!("checked by quant_skinny"),
            }
        };
        (@n $c:literal [$($n:literal),*]) => {
            match n {
                // SAFETY: the caller's contract, passed on.
                $($n => unsafe { quant_rows_of::<$c, $n>(raw, row_bytes, x, cols, out) },)*
                _ => unreachable!("checked by quant_skinny"),
            }
        };
    }
    each!(0, 1, 2; 1, 2, 3, 4)
}

/// [`quant_rows`] for type `CODE` and `N` rows of `x`.
///
/// # Safety
/// As [`quant_rows`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn quant_rows_of<const CODE: u8, const N: usize>(
    raw: &[u8],
    row_bytes: usize,
    x: &[f32],
    cols: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (code, n) = (CODE, N);
    let bytes = [18, 20, 34][code as usize];
    let h =
        |b: &[u8], at: usize| _mm512_set1_ps(half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32());
    let low = _mm512_set1_epi32(0x0F);
    let eight = _mm512_set1_epi32(8);
    for (row, o) in raw.chunks_exact(row_bytes).zip(out.chunks_mut(n)) {
        let mut acc = [[_mm512_setzero_ps(); 2]; N];
        for (i, b) in row.chunks_exact(bytes).enumerate() {
            // The blocks a few cache lines on, which the hardware prefetcher was too slow to
            // bring (a step's weights come from memory once each).
            _mm_prefetch::<_MM_HINT_T0>(b.as_ptr().wrapping_add(512).cast());
            // SAFETY: each block is `bytes` long (chunks_exact): the loads read inside it.
            let (w0, w1) = unsafe {
                match code {
                    0 | 1 => {
                        let at = if code == 0 { 2 } else { 4 };
                        let q = _mm512_cvtepu8_epi32(_mm_loadu_si128(b.as_ptr().add(at).cast()));
                        let (lo, hi) = (_mm512_and_si512(q, low), _mm512_srli_epi32::<4>(q));
                        let d = h(b, 0);
                        if code == 0 {
                            let lo = _mm512_cvtepi32_ps(_mm512_sub_epi32(lo, eight));
                            let hi = _mm512_cvtepi32_ps(_mm512_sub_epi32(hi, eight));
                            (_mm512_mul_ps(lo, d), _mm512_mul_ps(hi, d))
                        } else {
                            let m = h(b, 2);
                            let lo = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(lo), d), m);
                            let hi = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(hi), d), m);
                            (lo, hi)
                        }
                    }
                    _ => {
                        let d = h(b, 0);
                        let q0 = _mm512_cvtepi8_epi32(_mm_loadu_si128(b.as_ptr().add(2).cast()));
                        let q1 = _mm512_cvtepi8_epi32(_mm_loadu_si128(b.as_ptr().add(18).cast()));
                        (
                            _mm512_mul_ps(_mm512_cvtepi32_ps(q0), d),
                            _mm512_mul_ps(_mm512_cvtepi32_ps(q1), d),
                        )
                    }
                }
            };
            for (r, acc) in acc.iter_mut().enumerate() {
                let xs = &x[r * cols + i * 32..][..32];
                // SAFETY: `xs` holds 32 values.
                unsafe {
                    acc[0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xs.as_ptr()), acc[0]);
                    acc[1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xs.as_ptr().add(16)), acc[1]);
                }
            }
        }
        for (r, o) in o.iter_mut().enumerate() {
            *o = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
        }
    }
}

const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

/// `e^x` for `x` up to 88.7 (clamped), relative error about 1e-7: Cody-Waite range reduction
/// to `r ∈ [-ln2/2, ln2/2]`, Cephes' degree-5 polynomial, the power of two built in the exponent
/// bits. Below -87.3, where `e^x` nears f32's smallest normal number, it is 0: no subnormal
/// result (see [`flush_subnormal`]). Branch-free so loops over it vectorise.
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5·2^23 rounds to the nearest integer without a call to roundf.
    const ROUND: f32 = 12_582_912.0;
    let underflow = x < -87.3;
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
    let y = e * f32::from_bits(n_bits.wrapping_add(127) << 23);
    if underflow { 0.0 } else { y }
}

/// `x`, or 0 where it is subnormal (below f32's smallest normal number in size). x86 CPUs take
/// a microcode assist, some hundred cycles, for each subnormal operand or result of a
/// multiply. whet's programs set their threads to flush subnormals (`flush_denormals`), but a
/// library caller's threads and the test harness's do not: there the probabilities of masked
/// keys, `e^(f32::MIN)` clamped to about 1.2e-38 and then divided by the row's sum, were
/// subnormal and fed every product of attention, whose f32 step took 12 times as long on a
/// Xeon (`time_attention`: SmolLM2's shape 110 ms, 9 ms with them 0). PyTorch's softmax gives
/// those keys exact zeros; so do these kernels, whatever the thread's setting.
#[inline(always)]
pub(super) fn flush_subnormal(x: f32) -> f32 {
    if x.abs() < f32::MIN_POSITIVE { 0.0 } else { x }
}

/// `(Φ(x), φ(x))`: the standard normal CDF `0.5·(1 + erf(x/√2))` and density. erf by
/// Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7), whose `e^{-z²}` is the density's
/// exponential, so both come from one `exp`.
#[inline(always)]
pub(super) fn normal_cdf_pdf(x: f32) -> (f32, f32) {
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

// Both write values not yet written (`MaybeUninit`): zeroing each new output first took 1.6%
// of a MiniLM full bf16 step.
multiversion!(gelu_forward_slice(x: &[f32], out: &mut [std::mem::MaybeUninit<f32>]) {
    for (o, &v) in out.iter_mut().zip(x) {
        o.write(v * normal_cdf_pdf(v).0);
    }
});

multiversion!(gelu_backward_slice(
    x: &[f32],
    grad: &[f32],
    out: &mut [std::mem::MaybeUninit<f32>]
) {
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(grad) {
        let (cdf, pdf) = normal_cdf_pdf(v);
        o.write(g * (cdf + v * pdf));
    }
});

/// `len` values, each chunk of [`CHUNK`] written by `fill` (its index, its values not yet
/// written) on rayon's threads, with no zeroing first.
///
/// # Safety
/// `fill` writes every value of each chunk it is given.
unsafe fn unzeroed(
    len: usize,
    fill: impl Fn(usize, &mut [std::mem::MaybeUninit<f32>]) + Sync,
) -> Vec<f32> {
    // SAFETY: the caller's promise, passed on.
    unsafe { unzeroed_with(len, || (), |_, k, o| fill(k, o)) }
}

/// [`unzeroed`] with a scratch value for each of rayon's tasks (`init`'s), lent to `fill`.
///
/// # Safety
/// `fill` writes every value of each chunk it is given.
unsafe fn unzeroed_with<T, S: Send>(
    len: usize,
    init: impl Fn() -> S + Sync + Send,
    fill: impl Fn(&mut S, usize, &mut [std::mem::MaybeUninit<T>]) + Sync,
) -> Vec<T>
where
    T: Send,
{
    let mut out: Vec<T> = Vec::with_capacity(len);
    out.spare_capacity_mut()[..len]
        .par_chunks_mut(CHUNK)
        .enumerate()
        .for_each_init(init, |s, (k, o)| fill(s, k, o));
    // SAFETY: `fill` wrote every value of its chunk (the caller's promise); they cover 0..len.
    unsafe { out.set_len(len) };
    out
}

fn gelu_forward(x: &FlexTensor) -> FlexTensor {
    let xs = values(x);
    // SAFETY: `gelu_forward_slice` writes all of each chunk (x's chunk is as long).
    let out = unsafe {
        unzeroed(xs.len(), |k, o| {
            gelu_forward_slice(&xs[k * CHUNK..][..o.len()], o)
        })
    };
    new_tensor(out, x)
}

fn gelu_backward(x: &FlexTensor, grad: &FlexTensor) -> FlexTensor {
    let (xs, gs) = (values(x), values(grad));
    assert_eq!(
        xs.len(),
        gs.len(),
        "gelu backward: gradient of another shape"
    );
    // SAFETY: `gelu_backward_slice` writes all of each chunk (x's and the gradient's chunks
    // are as long).
    let out = unsafe {
        unzeroed(xs.len(), |k, o| {
            let at = k * CHUNK..k * CHUNK + o.len();
            gelu_backward_slice(&xs[at.clone()], &gs[at], o)
        })
    };
    new_tensor(out, x)
}

multiversion!(dropout_slice(x: &[f32], mask: &DropMask, base: u32, out: &mut [f32]) {
    for (j, (o, &v)) in out.iter_mut().zip(x).enumerate() {
        *o = v * mask.factor(base.wrapping_add(j as u32));
    }
});

// [`dropout_slice`] into values not yet written.
multiversion!(dropout_into(
    x: &[f32],
    mask: &DropMask,
    base: u32,
    out: &mut [std::mem::MaybeUninit<f32>]
) {
    for (j, (o, &v)) in out.iter_mut().zip(x).enumerate() {
        o.write(v * mask.factor(base.wrapping_add(j as u32)));
    }
});

fn dropout_apply(x: &FlexTensor, mask: &DropMask) -> FlexTensor {
    let xs = values(x);
    // Not zeroed first (a `memset` of LoRA's dropped inputs took 1.6% of a SmolLM2 LoRA step).
    // SAFETY: `dropout_into` writes all of each chunk (x's chunk is as long).
    let out = unsafe {
        unzeroed(xs.len(), |k, o| {
            dropout_into(&xs[k * CHUNK..][..o.len()], mask, (k * CHUNK) as u32, o)
        })
    };
    new_tensor(out, x)
}

multiversion!(softmax_row(scores: &[f32], bias: &[f32], scale: f32, probs: &mut [f32]) {
    for (p, (&s, &b)) in probs.iter_mut().zip(scores.iter().zip(bias)) {
        *p = s * scale + b;
    }
    softmax_in_place(probs);
});

/// `softmax(row)` in place.
#[inline(always)]
fn softmax_in_place(row: &mut [f32]) {
    let max = max_of(row);
    // exp and its sum in 16 independent partial sums, as [`dot`] (one running sum kept the
    // loop, exp included, scalar: 4 ns an element).
    let mut acc = [0f32; 16];
    let mut chunks = row.chunks_exact_mut(16);
    for c in &mut chunks {
        for i in 0..16 {
            c[i] = exp(c[i] - max);
            acc[i] += c[i];
        }
    }
    let mut tail = 0f32;
    for p in chunks.into_remainder() {
        *p = exp(*p - max);
        tail += *p;
    }
    let inv = 1.0 / (acc.iter().sum::<f32>() + tail);
    for p in row.iter_mut() {
        *p = flush_subnormal(*p * inv);
    }
}

/// The largest element (`f32::MIN` for an empty slice), 16 lanes at a time.
#[inline(always)]
fn max_of(a: &[f32]) -> f32 {
    let mut acc = [f32::MIN; 16];
    let ca = a.chunks_exact(16);
    let tail = ca.remainder().iter().fold(f32::MIN, |m, &x| m.max(x));
    for x in ca {
        for i in 0..16 {
            acc[i] = acc[i].max(x[i]);
        }
    }
    acc.iter().fold(tail, |m, &x| m.max(x))
}

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
    let dot = dot(probs, out);
    for (o, &p) in out.iter_mut().zip(probs) {
        *o = flush_subnormal(scale * p * (*o - dot));
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
    // Without dropout the output is the probabilities: one tensor, kept once for the backward
    // passes of this op and of the product with v.
    let mut out = if mask.keeps_all() {
        Vec::new()
    } else {
        vec![0f32; s.len()]
    };
    let per_task = rows_per_task(tk);
    let row_task = |task: usize, p_rows: &mut [f32], mut o_rows: Option<&mut [f32]>| {
        for (i, p) in p_rows.chunks_mut(tk).enumerate() {
            let row = task * per_task + i;
            // row = ((bi · H) + hi) · Tq + qi; the bias row drops the head.
            let (bi, qi) = (row / (h * tq), row % tq);
            let brow = (bi * tq + qi) * tk;
            let at = row * tk;
            let bias_row = &bias_v[brow..brow + tk];
            softmax_row(&s[at..at + tk], bias_row, scale, p);
            if let Some(o) = o_rows.as_deref_mut() {
                dropout_slice(p, mask, at as u32, &mut o[i * tk..(i + 1) * tk]);
            }
        }
    };
    if out.is_empty() {
        probs
            .par_chunks_mut(per_task * tk)
            .enumerate()
            .for_each(|(task, p_rows)| row_task(task, p_rows, None));
        let probs = new_tensor(probs, scores);
        return (probs.clone(), probs);
    }
    probs
        .par_chunks_mut(per_task * tk)
        .zip(out.par_chunks_mut(per_task * tk))
        .enumerate()
        .for_each(|(task, (p_rows, o_rows))| row_task(task, p_rows, Some(o_rows)));
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
    let max = max_of(row);
    // 16 partial sums, as in [`softmax_in_place`].
    let mut acc = [0f32; 16];
    let chunks = row.chunks_exact(16);
    let mut tail = 0f32;
    for &x in chunks.remainder() {
        tail += exp(x - max);
    }
    for c in chunks {
        for i in 0..16 {
            acc[i] += exp(c[i] - max);
        }
    }
    *out = max + (acc.iter().sum::<f32>() + tail).ln();
});

multiversion!(cross_entropy_grad_row(row: &[f32], lse: f32, g: f32, out: &mut [f32]) {
    for (o, &x) in out.iter_mut().zip(row) {
        *o = flush_subnormal(g * exp(x - lse));
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

/// An f32 tensor whose strides are all positive (a transposed view stays a view; anything else
/// is copied dense), so that [`bf16::gemm`] reads it in place.
fn strided_f32(t: FlexTensor) -> FlexTensor {
    let t = if t.dtype() == DType::F32 {
        t
    } else {
        FlexTensor::from_data(t.into_data().convert::<f32>())
    };
    if t.layout().has_positive_strides() {
        t
    } else {
        t.to_contiguous()
    }
}

/// Product `b` of a batch of matrices `[..., r, c]` (leading dimensions `lead`), read through
/// its strides.
fn batch_operand<'a>(t: &'a FlexTensor, b: usize, lead: &[usize]) -> bf16::Strided<'a> {
    let d = lead.len() + 2;
    let layout = t.layout();
    let strides = layout.strides();
    let (mut offset, mut rest) = (layout.start_offset(), b);
    for i in (0..d - 2).rev() {
        offset += (rest % lead[i]) * strides[i] as usize;
        rest /= lead[i];
    }
    bf16::Strided {
        values: t.storage::<f32>(),
        offset,
        rs: strides[d - 2] as usize,
        cs: strides[d - 1] as usize,
    }
}

/// The sizes of `lhs [..., m, k] · rhs [..., k, n]`: (leading dimensions, m, k, n).
fn product_dims(lhs: &FlexTensor, rhs: &FlexTensor) -> (Vec<usize>, usize, usize, usize) {
    let (ls, rs) = (lhs.layout().shape(), rhs.layout().shape());
    let d = ls.num_dims();
    let lead = (0..d - 2).map(|i| ls[i]).collect();
    (lead, ls[d - 2], ls[d - 1], rs[d - 1])
}

/// `lhs [..., m, k] · rhs [..., k, n]` with [`bf16::gemm`], one product per index of the
/// (equal) leading dimensions; a batch's products are spread over the threads, one each.
fn bf16_matmul(lhs: FlexTensor, rhs: FlexTensor) -> FlexTensor {
    let (lhs, rhs) = (strided_f32(lhs), strided_f32(rhs));
    let (lead, m, k, n) = product_dims(&lhs, &rhs);
    let batches: usize = lead.iter().product();
    let (l, r) = (&lhs, &rhs);
    let out = bf16::products(
        batches,
        m,
        n,
        k,
        |i| batch_operand(l, i, &lead),
        |i| batch_operand(r, i, &lead),
    );
    let mut shape = lead;
    shape.extend([m, n]);
    FlexTensor::from_data(TensorData::new(out, shape))
}

/// `lhs [..., m, k] · rhs [..., k, n]` in f32 by the `gemm` crate (burn's matmul runs the same
/// crate), one product per index of the (equal) leading dimensions. The products fill a new
/// buffer without reading it (`gemm` reads no destination when told not to), where burn's
/// matmul zeroes its output and copies it into an aligned buffer: 5% of a MiniLM f32 step.
fn f32_matmul(lhs: FlexTensor, rhs: FlexTensor) -> FlexTensor {
    let (lhs, rhs) = (strided_f32(lhs), strided_f32(rhs));
    let (lead, m, k, n) = product_dims(&lhs, &rhs);
    let batches: usize = lead.iter().product();
    let one = |i: usize, dst: *mut f32, parallel: bool| {
        let (a, b) = (batch_operand(&lhs, i, &lead), batch_operand(&rhs, i, &lead));
        if k > 0 {
            assert!(
                a.offset + (m - 1) * a.rs + (k - 1) * a.cs < a.values.len()
                    && b.offset + (k - 1) * b.rs + (n - 1) * b.cs < b.values.len(),
                "f32 matmul: operands of {m}×{k} and {k}×{n} past their buffers"
            );
        }
        let threads = rayon::current_num_threads();
        let parallel = parallel && threads > 1 && m * n * k >= 192 * 192 * 192;
        // A narrow product (LoRA's rank-r products: n = r < 16, m the tokens or features):
        // gemm computes a row-major result as its transpose, whose n rows fill at most half
        // of its kernels' 16-row tiles (the `x1x6` edge kernel, 6% of a SmolLM2 LoRA step);
        // written column-major the m rows fill them, and the n · m values are transposed here.
        let narrow = n < 16 && m >= 64;
        let mut column_major = if narrow {
            vec![0f32; m * n]
        } else {
            Vec::new()
        };
        let (out, out_cs, out_rs) = if narrow {
            (column_major.as_mut_ptr(), m as isize, 1)
        } else {
            (dst, 1, n as isize)
        };
        // Columns `col..col + width` of the product (all of them with `col` 0 and `width` n).
        // SAFETY (of each call): `out` holds m · n values for this product alone
        // (`new_products`, or the column-major buffer) and the calls write disjoint columns;
        // with `read_dst` false gemm writes all of them and reads none (zeros when k is 0);
        // every operand index lies inside its slice (asserted).
        let columns = |out: usize, col: usize, width: usize, parallelism| unsafe {
            gemm::gemm(
                m,
                width,
                k,
                (out as *mut f32).offset(col as isize * out_cs),
                out_cs,
                out_rs,
                false,
                a.values.as_ptr().add(a.offset),
                a.cs as isize,
                a.rs as isize,
                b.values.as_ptr().add(b.offset + col * b.cs),
                b.cs as isize,
                b.rs as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            )
        };
        // Over the threads, each thread takes a block of the columns whole: gemm's own split
        // hands every thread a share of each row block, and each packs the whole of the left
        // operand of gemm's transposed problem (`rhs`, a layer's weight) again, 15% of a
        // SmolLM2 LoRA step; in blocks each packs only its own columns' part (a LoRA step
        // 1.10x, MiniLM 1.04-1.08x). Only where `lhs`'s rows are contiguous (the layers'
        // forward and input-gradient products): a weight gradient's `lhs` is a transposed view
        // (xᵀ) that every block packs whole, and split there SmolLM2 full fine-tuning's peak
        // RSS rose by 0.3-0.85 GB in half of the runs.
        let width = n.div_ceil(threads).next_multiple_of(16);
        let out = out as usize;
        if parallel && !narrow && width < n && a.cs == 1 {
            (0..n.div_ceil(width)).into_par_iter().for_each(|c| {
                let col = c * width;
                columns(out, col, width.min(n - col), gemm::Parallelism::None)
            });
        } else if parallel {
            columns(out, 0, n, gemm::Parallelism::Rayon(0));
        } else {
            columns(out, 0, n, gemm::Parallelism::None);
        }
        if narrow {
            for (j, column) in column_major.chunks_exact(m).enumerate() {
                for (i, &x) in column.iter().enumerate() {
                    // SAFETY: i < m and j < n: inside the m · n values at `dst`.
                    unsafe { dst.add(i * n + j).write(x) };
                }
            }
        }
    };
    // SAFETY: each call of `one` writes all m · n values at its pointer (above).
    let out = unsafe { super::new_products(batches, m * n, one) };
    let mut shape = lead;
    shape.extend([m, n]);
    FlexTensor::from_data(TensorData::new(out, shape))
}

fn target_values(t: &FlexTensor) -> &[u32] {
    t.as_slice::<u32>().unwrap_or(&[])
}

impl Kernels for Flex {
    fn prepare(x: FlexTensor) -> FlexTensor {
        dense(x)
    }

    fn gelu(x: FlexTensor) -> FlexTensor {
        gelu_forward(&dense(x))
    }

    fn gelu_backward(x: FlexTensor, grad: FlexTensor) -> FlexTensor {
        gelu_backward(&dense(x), &dense(grad))
    }

    fn dropout(x: FlexTensor, mask: DropMask) -> FlexTensor {
        dropout_apply(&dense(x), &mask)
    }

    fn attention_probs(
        scores: FlexTensor,
        bias: FlexTensor,
        scale: f32,
        mask: DropMask,
    ) -> (FlexTensor, FlexTensor) {
        attention_probs_forward(&dense(scores), &dense(bias), scale, &mask)
    }

    fn attention_probs_backward(
        probs: FlexTensor,
        grad: FlexTensor,
        scale: f32,
        mask: DropMask,
    ) -> FlexTensor {
        attention_probs_backward(&dense(probs), &dense(grad), scale, &mask)
    }

    fn targets(targets: &[u32], _like: &FlexTensor) -> IntTensor<Self> {
        FlexTensor::from_data(TensorData::new(targets.to_vec(), [targets.len()]))
    }

    fn cross_entropy(logits: FlexTensor, targets: FlexTensor) -> (FlexTensor, FlexTensor) {
        let logits = dense(logits);
        let lse = row_logsumexp(&logits);
        let loss = cross_entropy_forward(&logits, &lse, target_values(&targets));
        let rows = lse.len();
        (loss, FlexTensor::from_data(TensorData::new(lse, [rows])))
    }

    fn cross_entropy_backward(
        logits: FlexTensor,
        lse: FlexTensor,
        targets: FlexTensor,
        grad: FlexTensor,
    ) -> FloatTensor<Self> {
        let g = values(&dense(grad)).first().copied().unwrap_or(0.0);
        let lse = dense(lse);
        cross_entropy_backward(&dense(logits), values(&lse), target_values(&targets), g)
    }

    fn quant_matmul(x: FlexTensor, w: &Arc<QuantMatrix>) -> FlexTensor {
        quant_matmul_forward(&dense(x), w)
    }

    fn quant_matmul_backward(dy: FlexTensor, w: &Arc<QuantMatrix>) -> FlexTensor {
        quant_matmul_backward(&dense(dy), w)
    }

    fn bf16_matmul(lhs: FlexTensor, rhs: FlexTensor) -> FlexTensor {
        bf16_matmul(lhs, rhs)
    }

    fn f32_matmul(lhs: FlexTensor, rhs: FlexTensor) -> FlexTensor {
        f32_matmul(lhs, rhs)
    }
}

/// `row` as values, once they are all written.
///
/// # Safety
/// Every value of `row` has been written.
#[inline(always)]
unsafe fn written(row: &mut [std::mem::MaybeUninit<f32>]) -> &mut [f32] {
    // SAFETY: `MaybeUninit<f32>` has f32's layout, and every value is initialised (caller).
    unsafe { &mut *(row as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) }
}

/// How many rows of `d` values `len` values make, asserting they make whole rows (the
/// normalisations' kernels write whole rows only).
fn whole_rows(len: usize, d: usize, op: &str) -> usize {
    assert!(
        d > 0 && len.is_multiple_of(d),
        "{op}: {len} values are not whole rows of {d}"
    );
    len / d
}

/// Rows of `d` values handed to one rayon task.
fn rows_per_chunk(d: usize) -> usize {
    (CHUNK / d.max(1)).max(1)
}

/// `Σ a·b` with 16 independent partial sums, so that the loop vectorises (a single running sum
/// must keep its order and stays scalar).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut tail = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    acc.iter().sum::<f32>() + tail
}

/// `Σ a` as [`dot`] sums.
#[inline(always)]
fn sum(a: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let ca = a.chunks_exact(16);
    let tail: f32 = ca.remainder().iter().sum();
    for x in ca {
        for i in 0..16 {
            acc[i] += x[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

multiversion!(rms_norm_rows(
    x: &[f32],
    w: &[f32],
    eps: f32,
    out: &mut [std::mem::MaybeUninit<f32>],
    rstd: &mut [f32]
) {
    let d = w.len();
    for ((xr, or), r) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)).zip(rstd.iter_mut()) {
        *r = 1.0 / (dot(xr, xr) / d as f32 + eps).sqrt();
        for ((o, &v), &wv) in or.iter_mut().zip(xr).zip(w) {
            o.write(v * *r * wv);
        }
    }
});

multiversion!(rms_norm_backward_rows(
    x: &[f32],
    w: &[f32],
    rstd: &[f32],
    dy: &[f32],
    dx: &mut [std::mem::MaybeUninit<f32>],
    dw: &mut [f32]
) {
    let d = w.len();
    let rows = x.chunks_exact(d).zip(dy.chunks_exact(d)).zip(dx.chunks_exact_mut(d));
    for (((xr, gr), dxr), &r) in rows.zip(rstd) {
        // g = dy ⊙ w; dx = r·(g − x·r²·mean(g ⊙ x)); dw += dy ⊙ x·r
        for ((o, &g), &wv) in dxr.iter_mut().zip(gr).zip(w) {
            o.write(g * wv);
        }
        // SAFETY: the loop above wrote every value of the row (`gr` and `w` are `d` long).
        let dxr = unsafe { written(dxr) };
        let c = r * r * dot(dxr, xr) / d as f32;
        for (o, &v) in dxr.iter_mut().zip(xr) {
            *o = r * (*o - v * c);
        }
        for ((a, &g), &v) in dw.iter_mut().zip(gr).zip(xr) {
            *a += g * v * r;
        }
    }
});

multiversion!(layer_norm_rows(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    eps: f32,
    out: &mut [std::mem::MaybeUninit<f32>],
    stats: &mut [f32]
) {
    let d = w.len();
    let rows = x.chunks_exact(d).zip(out.chunks_exact_mut(d));
    for ((xr, or), st) in rows.zip(stats.chunks_exact_mut(2)) {
        let mean = sum(xr) / d as f32;
        // Two passes, as PyTorch's (biased) variance: no cancellation for large means.
        for (o, &v) in or.iter_mut().zip(xr) {
            o.write(v - mean);
        }
        // SAFETY: the loop above wrote every value of the row (`xr` is `d` long).
        let or = unsafe { written(or) };
        let r = 1.0 / (dot(or, or) / d as f32 + eps).sqrt();
        (st[0], st[1]) = (mean, r);
        for ((o, &wv), &bv) in or.iter_mut().zip(w).zip(b) {
            *o = *o * r * wv + bv;
        }
    }
});

multiversion!(layer_norm_backward_rows(
    x: &[f32],
    w: &[f32],
    stats: &[f32],
    dy: &[f32],
    dx: &mut [std::mem::MaybeUninit<f32>],
    dw: &mut [f32],
    db: &mut [f32]
) {
    let d = w.len();
    let mut xhat = vec![0f32; d];
    let rows = x.chunks_exact(d).zip(dy.chunks_exact(d)).zip(dx.chunks_exact_mut(d));
    for (((xr, gr), dxr), st) in rows.zip(stats.chunks_exact(2)) {
        let (mean, r) = (st[0], st[1]);
        // x̂ = (x − μ)·r; g = dy ⊙ w; dx = r·(g − mean(g) − x̂·mean(g ⊙ x̂));
        // dw += dy ⊙ x̂; db += dy
        for (h, &v) in xhat.iter_mut().zip(xr) {
            *h = (v - mean) * r;
        }
        for ((o, &g), &wv) in dxr.iter_mut().zip(gr).zip(w) {
            o.write(g * wv);
        }
        // SAFETY: the loop above wrote every value of the row (`gr` and `w` are `d` long).
        let dxr = unsafe { written(dxr) };
        let mg = sum(dxr) / d as f32;
        let mgx = dot(dxr, &xhat) / d as f32;
        for (o, &h) in dxr.iter_mut().zip(xhat.iter()) {
            *o = r * (*o - mg - h * mgx);
        }
        for ((a, &g), &h) in dw.iter_mut().zip(gr).zip(xhat.iter()) {
            *a += g * h;
        }
        for (a, &g) in db.iter_mut().zip(gr) {
            *a += g;
        }
    }
});

/// Adds each task's partial parameter gradients into one.
fn add_partials(partials: Vec<Vec<f32>>, d: usize) -> Vec<f32> {
    partials.into_iter().fold(vec![0f32; d], |mut acc, p| {
        for (a, v) in acc.iter_mut().zip(p) {
            *a += v;
        }
        acc
    })
}

// `silu(g) · u`, the sigmoid through the vectorised `exp`.
multiversion!(swiglu_slice(g: &[f32], u: &[f32], out: &mut [std::mem::MaybeUninit<f32>]) {
    for ((o, &a), &b) in out.iter_mut().zip(g).zip(u) {
        let s = 1.0 / (1.0 + exp(-a));
        o.write(a * s * b);
    }
});

// f32 to bf16 as the bf16 products round their operands ([`bf16::to_bf16`]).
multiversion!(round_bf16_slice(x: &[f32], out: &mut [std::mem::MaybeUninit<half::bf16>]) {
    for (o, &x) in out.iter_mut().zip(x) {
        o.write(half::bf16::from_bits(bf16::to_bf16(x) as u16));
    }
});

// bf16 to f32, exactly.
multiversion!(widen_slice(h: &[half::bf16], out: &mut [f32]) {
    for (o, &h) in out.iter_mut().zip(h) {
        *o = f32::from_bits(u32::from(h.to_bits()) << 16);
    }
});

/// The contiguous values of a bf16 tensor ([`CpuKernels::round_bf16`]'s), or None.
fn bf16_values(t: &FlexTensor) -> Option<&[half::bf16]> {
    (t.dtype() == DType::BF16)
        .then(|| t.as_slice::<half::bf16>())
        .flatten()
}

/// A value type the SwiGLU kernels read: f32 in place, bf16 widened chunk by chunk into a
/// buffer of the rayon task ([`widen_slice`]).
trait Lanes: Copy + Sync {
    /// `chunk` as f32: itself, or widened into `buf`.
    fn as_f32<'a>(chunk: &'a [Self], buf: &'a mut Vec<f32>) -> &'a [f32];
}

impl Lanes for f32 {
    fn as_f32<'a>(chunk: &'a [f32], _: &'a mut Vec<f32>) -> &'a [f32] {
        chunk
    }
}

impl Lanes for half::bf16 {
    fn as_f32<'a>(chunk: &'a [half::bf16], buf: &'a mut Vec<f32>) -> &'a [f32] {
        buf.resize(chunk.len(), 0.0);
        widen_slice(chunk, buf);
        buf
    }
}

/// `silu(g) · u` over chunks split across rayon's threads.
fn swiglu_chunks<E: Lanes>(gs: &[E], us: &[E]) -> Vec<f32> {
    assert_eq!(gs.len(), us.len(), "swiglu: gate and up of other lengths");
    // SAFETY: `swiglu_slice` writes all of each chunk (the gate's and up's are as long).
    unsafe {
        unzeroed_with(gs.len(), <[Vec<f32>; 2]>::default, |[bg, bu], k, o| {
            let at = k * CHUNK..k * CHUNK + o.len();
            swiglu_slice(E::as_f32(&gs[at.clone()], bg), E::as_f32(&us[at], bu), o);
        })
    }
}

/// `(dg, du)` of [`swiglu_chunks`] for the output gradient `ds`.
fn swiglu_backward_chunks<E: Lanes>(gs: &[E], us: &[E], ds: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let len = gs.len();
    assert!(
        us.len() == len && ds.len() == len,
        "swiglu backward: gate, up and gradient of other lengths"
    );
    // Not zeroed first: `swiglu_backward_slice` writes every value of both.
    let (mut dg, mut du) = (Vec::with_capacity(len), Vec::with_capacity(len));
    dg.spare_capacity_mut()[..len]
        .par_chunks_mut(CHUNK)
        .zip(du.spare_capacity_mut()[..len].par_chunks_mut(CHUNK))
        .zip(
            gs.par_chunks(CHUNK)
                .zip(us.par_chunks(CHUNK))
                .zip(ds.par_chunks(CHUNK)),
        )
        .for_each_init(
            <[Vec<f32>; 2]>::default,
            |[bg, bu], ((dg, du), ((g, u), d))| {
                swiglu_backward_slice(E::as_f32(g, bg), E::as_f32(u, bu), d, dg, du);
            },
        );
    // SAFETY: the chunks cover 0..len of both, and `swiglu_backward_slice` wrote all of each
    // (its inputs' chunks are as long, asserted above).
    unsafe {
        dg.set_len(len);
        du.set_len(len);
    }
    (dg, du)
}

// `dg = dy · u · s · (1 + g · (1 − s))`, `du = dy · g · s` with `s = sigmoid(g)`.
multiversion!(swiglu_backward_slice(
    g: &[f32],
    u: &[f32],
    dy: &[f32],
    dg: &mut [std::mem::MaybeUninit<f32>],
    du: &mut [std::mem::MaybeUninit<f32>]
) {
    for ((((dg, du), &a), &b), &d) in dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(dy) {
        let s = 1.0 / (1.0 + exp(-a));
        du.write(d * a * s);
        dg.write(d * b * s * (1.0 + a * (1.0 - s)));
    }
});

// One row of rotary embedding over `d = 2h` values. Forward:
// `y_lo = x_lo·c_lo − x_hi·s_lo`, `y_hi = x_hi·c_hi + x_lo·s_hi` (the composed ops' products
// and sums, so the same bits); backward (the transpose):
// `dx_lo = dy_lo·c_lo + dy_hi·s_hi`, `dx_hi = dy_hi·c_hi − dy_lo·s_lo`.
multiversion!(rope_row(x: &[f32], c: &[f32], s: &[f32], out: &mut [f32], backward: bool) {
    let h = x.len() / 2;
    let (x_lo, x_hi) = x.split_at(h);
    let (c_lo, c_hi) = c.split_at(h);
    let (s_lo, s_hi) = s.split_at(h);
    let (o_lo, o_hi) = out.split_at_mut(h);
    if backward {
        for i in 0..h {
            o_lo[i] = x_lo[i] * c_lo[i] + x_hi[i] * s_hi[i];
            o_hi[i] = x_hi[i] * c_hi[i] - x_lo[i] * s_lo[i];
        }
    } else {
        for i in 0..h {
            o_lo[i] = x_lo[i] * c_lo[i] + -x_hi[i] * s_lo[i];
            o_hi[i] = x_hi[i] * c_hi[i] + x_lo[i] * s_hi[i];
        }
    }
});

/// Rows of logits a chunk of [`CpuKernels::linear_cross_entropy`] holds: 50 MB with a
/// 49152-word vocabulary, against 200 MB for a 4 × 256-token batch at once (128 rows ran no
/// faster, 512 no faster either).
const CE_CHUNK_ROWS: usize = 256;

// `row ← softmax(row)` given the row's log-sum-exp.
multiversion!(softmax_in_place_row(row: &mut [f32], lse: f32) {
    for x in row.iter_mut() {
        *x = exp(*x - lse);
    }
});

impl CpuKernels for Flex {
    fn prepare_heads(x: FlexTensor) -> FlexTensor {
        attention::readable_in_place(x)
    }

    fn attention(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        (bias, segments): (FlexTensor, Option<&Segments>),
        scale: f32,
        mask: DropMask,
    ) -> FlexTensor {
        let [q, k, v] = [q, k, v].map(attention::readable_in_place);
        let bf16 = attention::bf16_products(q.layout().shape()[3]);
        attention::forward(&q, &k, &v, &dense(bias), segments, scale, &mask, bf16)
    }

    fn attention_backward(
        [q, k, v, bias]: [FlexTensor; 4],
        segments: Option<&Segments>,
        dout: FlexTensor,
        scale: f32,
        mask: DropMask,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let [q, k, v, dout] = [q, k, v, dout].map(attention::readable_in_place);
        let bf16 = attention::bf16_products(q.layout().shape()[3]);
        let bias = dense(bias);
        attention::backward([&q, &k, &v], (&bias, segments), &dout, scale, &mask, bf16)
    }

    fn linear_cross_entropy(
        hidden: FlexTensor,
        weight: FlexTensor,
        targets: &[u32],
        (grad, weight_grad): (bool, bool),
        bf16: bool,
    ) -> (FlexTensor, Option<FlexTensor>, Option<FlexTensor>) {
        let h = dense(hidden);
        let hs = values(&h);
        let (n, d) = (h.layout().shape()[0], h.layout().shape()[1]);
        // The weight is read in place: contiguous [V, D] (tied embeddings) or the transpose of
        // a contiguous [D, V] (an LM head stored [in, out]).
        let w = strided_f32(weight);
        let v = w.layout().shape()[0];
        let (sv, sd) = (
            w.layout().strides()[0] as usize,
            w.layout().strides()[1] as usize,
        );
        let ws = &w.storage::<f32>()[w.layout().start_offset()..];
        let mut dh = vec![0f32; if grad { n * d } else { 0 }];
        let mut dw = vec![0f32; if grad && weight_grad { v * d } else { 0 }];
        let mut logits = vec![0f32; CE_CHUNK_ROWS.min(n) * v];
        // Under bf16 the products take bf16 operands with f32 sums (the rounding of
        // `bf16_matmul`'s forward and backward products), and the weight is packed once for
        // each product that reads it, not once a chunk (on AMX; `bf16::prepare_b`): as `Wᵀ`
        // `[D, V]` for the logits, as `W` `[V, D]` for the hidden rows' gradient.
        fn strided(values: &[f32], rs: usize, cs: usize) -> bf16::Strided<'_> {
            bf16::Strided {
                values,
                offset: 0,
                rs,
                cs,
            }
        }
        let prepared = bf16.then(|| {
            (
                bf16::prepare_b(strided(ws, sd, sv), v, d),
                grad.then(|| bf16::prepare_b(strided(ws, sv, sd), d, v)),
            )
        });
        let mut loss = 0f64;
        for r0 in (0..n).step_by(CE_CHUNK_ROWS) {
            let c = CE_CHUNK_ROWS.min(n - r0);
            let (lg, h_c) = (&mut logits[..c * v], &hs[r0 * d..(r0 + c) * d]);
            // (C, D) x (D, V) -> (C, V): logits = h Wᵀ.
            match &prepared {
                Some((wt, _)) => bf16::gemm_prepared(c, strided(h_c, d, 1), wt, lg, false),
                None => gemm_strided(c, v, d, h_c, (d, 1), ws, (sd, sv), lg, false),
            }
            loss += lg
                .par_chunks_mut(v)
                .zip(&targets[r0..r0 + c])
                .map(|(row, &t)| {
                    let mut lse = 0f32;
                    logsumexp_row(row, &mut lse);
                    let l = (lse - row[t as usize]) as f64;
                    if grad {
                        // The row becomes the loss's gradient: softmax − onehot.
                        softmax_in_place_row(row, lse);
                        row[t as usize] -= 1.0;
                    }
                    l
                })
                .sum::<f64>();
            if grad {
                // (C, V) x (V, D) -> (C, D)
                let dh_c = &mut dh[r0 * d..(r0 + c) * d];
                match &prepared {
                    Some((_, Some(w))) => bf16::gemm_prepared(c, strided(lg, v, 1), w, dh_c, false),
                    _ => gemm_strided(c, d, v, lg, (v, 1), ws, (sv, sd), dh_c, false),
                }
                if weight_grad {
                    // (V, C) x (C, D) -> (V, D), summed over the chunks. The first chunk writes
                    // without reading: dw's pages are then written first, not read as the
                    // kernel's shared zero page and copied on the write, each copy a TLB
                    // flush on every core (SmolLM2 full fine-tuning, A B B A: 1.045x).
                    // Under bf16 the chunks' sums are added in f32 (`gemm_into` loads them).
                    let first = r0 == 0;
                    if bf16 {
                        let (a, b) = (strided(lg, 1, v), strided(h_c, d, 1));
                        bf16::gemm_into(v, d, c, a, b, &mut dw, !first);
                    } else {
                        gemm_strided(v, d, c, lg, (1, v), h_c, (d, 1), &mut dw, !first);
                    }
                }
            }
        }
        let loss = FlexTensor::from_data(TensorData::new(vec![loss as f32], [1]));
        (
            loss,
            grad.then(|| FlexTensor::from_data(TensorData::new(dh, [n, d]))),
            (grad && weight_grad).then(|| FlexTensor::from_data(TensorData::new(dw, [v, d]))),
        )
    }

    fn scale_by(t: FlexTensor, by: FlexTensor) -> FlexTensor {
        let g = values(&dense(by)).first().copied().unwrap_or(0.0);
        // In place: the LM-head loss's gradients are scaled at the start of the backward pass,
        // when the forward's activations are all alive, and a scaled copy of the head's
        // weight gradient (SmolLM2: 113 MB) was the peak's last increment.
        let mut t = owned(t);
        let n = t.layout().shape().num_elements();
        t.storage_mut::<f32>()[..n]
            .par_chunks_mut(CHUNK)
            .for_each(|c| c.iter_mut().for_each(|x| *x *= g));
        t
    }

    fn rope(x: FlexTensor, cos: FlexTensor, sin: FlexTensor, backward: bool) -> FlexTensor {
        let (x, c, s) = (dense(x), dense(cos), dense(sin));
        let dims = x.layout().shape().to_vec();
        let (heads, t, d) = (dims[1], dims[2], dims[3]);
        let (xs, cs, ss) = (values(&x), values(&c), values(&s));
        let mut out = vec![0f32; xs.len()];
        // One task per (batch, head): T rows of d, reading the batch's T rows of the tables.
        out.par_chunks_mut(t * d)
            .zip(xs.par_chunks(t * d))
            .enumerate()
            .for_each(|(bh, (o, x))| {
                let table = (bh / heads) * t * d..(bh / heads + 1) * t * d;
                let (c, s) = (&cs[table.clone()], &ss[table]);
                for (((o, x), c), s) in o
                    .chunks_mut(d)
                    .zip(x.chunks(d))
                    .zip(c.chunks(d))
                    .zip(s.chunks(d))
                {
                    rope_row(x, c, s, o, backward);
                }
            });
        new_tensor(out, &x)
    }

    fn embedding_grad(dout: FlexTensor, ids: IntTensor<Flex>, vocab: usize) -> FlexTensor {
        let dout = dense(dout);
        let dy = values(&dout);
        let d = dout.layout().shape().last().copied().unwrap_or(0);
        // `vec![0.0; n]` allocates zeroed memory (calloc), which for a large gradient is a
        // fresh mapping the kernel has not touched yet: only the pages of rows written here
        // are faulted in.
        let mut grad = vec![0f32; vocab * d];
        if d > 0 {
            for (row, id) in dy.chunks(d).zip(ids.into_data().iter::<i64>()) {
                let start = usize::try_from(id).unwrap_or(usize::MAX).saturating_mul(d);
                if let Some(g) = grad.get_mut(start..start.saturating_add(d)) {
                    for (g, &y) in g.iter_mut().zip(row) {
                        *g += y;
                    }
                }
            }
        }
        FlexTensor::from_data(TensorData::new(grad, vec![vocab, d]))
    }

    fn write_part(
        grad: &PartsGrad,
        start: usize,
        dpart: FlexTensor,
        joined: burn::tensor::Shape,
    ) -> Option<FlexTensor> {
        let dpart = dense(dpart);
        let part = values(&dpart);
        let (total, width) = (
            joined[joined.num_dims() - 1],
            dpart.layout().shape()[joined.num_dims() - 1],
        );
        // A poisoned lock means a thread panicked mid-write; that panic is the error to report.
        let mut state = grad
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (values, arrived) = &mut *state;
        if values.is_empty() {
            *values = vec![0f32; joined.num_elements()];
        }
        values
            .par_chunks_mut(total)
            .zip(part.par_chunks(width))
            .for_each(|(row, part)| row[start..start + width].copy_from_slice(part));
        *arrived += 1;
        (*arrived == grad.parts)
            .then(|| FlexTensor::from_data(TensorData::new(std::mem::take(values), joined)))
    }

    fn round_bf16(x: FlexTensor) -> FlexTensor {
        let x = dense(x);
        let xs = values(&x);
        // SAFETY: `round_bf16_slice` writes all of each chunk (x's chunk is as long).
        let out = unsafe {
            unzeroed_with(
                xs.len(),
                || (),
                |_, k, o| round_bf16_slice(&xs[k * CHUNK..][..o.len()], o),
            )
        };
        FlexTensor::from_data(TensorData::new(out, x.layout().shape().clone()))
    }

    fn swiglu(gate: FlexTensor, up: FlexTensor) -> FlexTensor {
        let like = gate.layout().shape().clone();
        let out = match (bf16_values(&gate), bf16_values(&up)) {
            (Some(gs), Some(us)) => swiglu_chunks(gs, us),
            _ => {
                let (g, u) = (dense(gate), dense(up));
                swiglu_chunks(values(&g), values(&u))
            }
        };
        FlexTensor::from_data(TensorData::new(out, like))
    }

    fn swiglu_backward(
        gate: FlexTensor,
        up: FlexTensor,
        dy: FlexTensor,
    ) -> (FlexTensor, FlexTensor) {
        let d = dense(dy);
        let (dg, du) = match (bf16_values(&gate), bf16_values(&up)) {
            (Some(gs), Some(us)) => swiglu_backward_chunks(gs, us, values(&d)),
            _ => {
                let (g, u) = (dense(gate), dense(up));
                swiglu_backward_chunks(values(&g), values(&u), values(&d))
            }
        };
        (new_tensor(dg, &d), new_tensor(du, &d))
    }

    fn rms_norm(x: FlexTensor, w: FlexTensor, eps: f32) -> (FlexTensor, FlexTensor) {
        let (x, w) = (dense(x), dense(w));
        let (xs, ws) = (values(&x), values(&w));
        let d = ws.len();
        let rows = whole_rows(xs.len(), d, "rms_norm");
        // Not zeroed first: `rms_norm_rows` writes every row.
        let (mut out, mut rstd) = (Vec::with_capacity(xs.len()), vec![0f32; rows]);
        let per = rows_per_chunk(d);
        out.spare_capacity_mut()[..xs.len()]
            .par_chunks_mut(per * d)
            .zip(rstd.par_chunks_mut(per))
            .zip(xs.par_chunks(per * d))
            .for_each(|((o, r), x)| rms_norm_rows(x, ws, eps, o, r));
        // SAFETY: the chunks cover all `rows` whole rows, each written.
        unsafe { out.set_len(xs.len()) };
        let y = new_tensor(out, &x);
        (y, FlexTensor::from_data(TensorData::new(rstd, [rows])))
    }

    fn rms_norm_backward(
        x: FlexTensor,
        w: FlexTensor,
        rstd: FlexTensor,
        dy: FlexTensor,
    ) -> (FlexTensor, FlexTensor) {
        let (x, w, rstd, dy) = (dense(x), dense(w), dense(rstd), dense(dy));
        let (xs, ws, rs, gs) = (values(&x), values(&w), values(&rstd), values(&dy));
        let d = ws.len();
        let rows = whole_rows(xs.len(), d, "rms_norm backward");
        assert!(
            gs.len() == xs.len() && rs.len() == rows,
            "rms_norm backward: input, gradient and statistics of other shapes"
        );
        // Not zeroed first: `rms_norm_backward_rows` writes every row of `dx`.
        let mut dx = Vec::with_capacity(xs.len());
        let per = rows_per_chunk(d);
        let partials: Vec<Vec<f32>> = dx.spare_capacity_mut()[..xs.len()]
            .par_chunks_mut(per * d)
            .zip(xs.par_chunks(per * d).zip(gs.par_chunks(per * d)))
            .zip(rs.par_chunks(per))
            .map(|((o, (x, g)), r)| {
                let mut dw = vec![0f32; d];
                rms_norm_backward_rows(x, ws, r, g, o, &mut dw);
                dw
            })
            .collect();
        // SAFETY: the chunks cover every row, each written whole (the lengths asserted above).
        unsafe { dx.set_len(xs.len()) };
        let dw = add_partials(partials, d);
        (
            new_tensor(dx, &x),
            FlexTensor::from_data(TensorData::new(dw, [d])),
        )
    }

    fn layer_norm(
        x: FlexTensor,
        w: FlexTensor,
        b: FlexTensor,
        eps: f32,
    ) -> (FlexTensor, FlexTensor) {
        let (x, w, b) = (dense(x), dense(w), dense(b));
        let (xs, ws, bs) = (values(&x), values(&w), values(&b));
        let d = ws.len();
        let rows = whole_rows(xs.len(), d, "layer_norm");
        // Not zeroed first: `layer_norm_rows` writes every row.
        let (mut out, mut stats) = (Vec::with_capacity(xs.len()), vec![0f32; 2 * rows]);
        let per = rows_per_chunk(d);
        out.spare_capacity_mut()[..xs.len()]
            .par_chunks_mut(per * d)
            .zip(stats.par_chunks_mut(2 * per))
            .zip(xs.par_chunks(per * d))
            .for_each(|((o, s), x)| layer_norm_rows(x, ws, bs, eps, o, s));
        // SAFETY: the chunks cover all `rows` whole rows, each written.
        unsafe { out.set_len(xs.len()) };
        let y = new_tensor(out, &x);
        (y, FlexTensor::from_data(TensorData::new(stats, [rows, 2])))
    }

    fn layer_norm_backward(
        x: FlexTensor,
        w: FlexTensor,
        stats: FlexTensor,
        dy: FlexTensor,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let (x, w, stats, dy) = (dense(x), dense(w), dense(stats), dense(dy));
        let (xs, ws, ss, gs) = (values(&x), values(&w), values(&stats), values(&dy));
        let d = ws.len();
        let rows = whole_rows(xs.len(), d, "layer_norm backward");
        assert!(
            gs.len() == xs.len() && ss.len() == 2 * rows,
            "layer_norm backward: input, gradient and statistics of other shapes"
        );
        // Not zeroed first: `layer_norm_backward_rows` writes every row of `dx`.
        let mut dx = Vec::with_capacity(xs.len());
        let per = rows_per_chunk(d);
        let partials: Vec<(Vec<f32>, Vec<f32>)> = dx.spare_capacity_mut()[..xs.len()]
            .par_chunks_mut(per * d)
            .zip(xs.par_chunks(per * d).zip(gs.par_chunks(per * d)))
            .zip(ss.par_chunks(2 * per))
            .map(|((o, (x, g)), s)| {
                let (mut dw, mut db) = (vec![0f32; d], vec![0f32; d]);
                layer_norm_backward_rows(x, ws, s, g, o, &mut dw, &mut db);
                (dw, db)
            })
            .collect();
        // SAFETY: the chunks cover every row, each written whole (the lengths asserted above).
        unsafe { dx.set_len(xs.len()) };
        let (dws, dbs): (Vec<_>, Vec<_>) = partials.into_iter().unzip();
        let tensor = |v: Vec<f32>| FlexTensor::from_data(TensorData::new(v, [d]));
        (
            new_tensor(dx, &x),
            tensor(add_partials(dws, d)),
            tensor(add_partials(dbs, d)),
        )
    }
}

multiversion!(adamw_chunk(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], c: AdamwConsts) {
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        adamw_element(p, g, m, v, &c);
    }
});

/// A tensor's f32 values to update in place (copied first when shared or strided).
fn owned(t: FlexTensor) -> FlexTensor {
    let t = dense(t);
    if t.layout().contiguous_offsets() == Some((0, t.layout().shape().num_elements())) {
        t
    } else {
        t.to_contiguous()
    }
}

impl CpuOptimOps for Flex {
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
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let c = AdamwConsts::new(decay, beta1, beta2, bc2_sqrt, eps, step_size, grad_scale);
        let (mut p, g, mut m, mut v) = (owned(param), dense(grad), owned(m), owned(v));
        let gs = values(&g);
        let n = gs.len();
        let (ps, ms, vs) = (
            &mut p.storage_mut::<f32>()[..n],
            &mut m.storage_mut::<f32>()[..n],
            &mut v.storage_mut::<f32>()[..n],
        );
        ps.par_chunks_mut(CHUNK)
            .zip(gs.par_chunks(CHUNK))
            .zip(ms.par_chunks_mut(CHUNK))
            .zip(vs.par_chunks_mut(CHUNK))
            .for_each(|(((p, g), m), v)| adamw_chunk(p, g, m, v, c));
        (p, m, v)
    }

    fn fused_sum_of_squares(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let x = dense(x);
        let sum: f64 = values(&x)
            .par_chunks(CHUNK)
            .map(|c| {
                let mut s = 0f32;
                sum_of_squares_chunk(c, &mut s);
                s as f64
            })
            .sum();
        FlexTensor::from_data(TensorData::new(vec![sum], [1]))
    }

    fn fused_scale(x: FloatTensor<Self>, by: f32) -> FloatTensor<Self> {
        let mut x = owned(x);
        let n = x.layout().shape().num_elements();
        x.storage_mut::<f32>()[..n]
            .par_chunks_mut(CHUNK)
            .for_each(|c| scale_nonzero_pages(c, by));
        x
    }
}

// `x · by`, in place, for a page of `x` (1024 values) that holds a value other than zero.
multiversion!(scale_nonzero_pages(x: &mut [f32], by: f32) {
    for page in x.chunks_mut(1024) {
        if page.iter().any(|&v| v != 0.0) {
            page.iter_mut().for_each(|v| *v *= by);
        }
    }
});

multiversion!(sum_of_squares_chunk(x: &[f32], out: &mut f32) {
    *out = dot(x, x);
});

impl CpuSkinnyOps for Flex {
    /// `w` cut into one contiguous stretch of memory a thread, each multiplied by the gemm
    /// crate on that thread (with a single row, its matrix-vector loop, which reads `w` in
    /// place): a row-major `w` by its rows (the threads' partial products are summed), the
    /// transpose of a row-major matrix (tied embeddings) by its columns.
    fn fused_skinny_matmul(x: FlexTensor, w: FlexTensor) -> FlexTensor {
        let x = dense(x);
        let xs = values(&x);
        let (m, k) = (x.layout().shape()[0], x.layout().shape()[1]);
        let n = w.layout().shape()[1];
        let transposed = w.dtype() == DType::F32
            && w.layout().strides() == [1, k as isize]
            && w.layout().start_offset() == 0;
        let w = if transposed { w } else { dense(w) };
        // A dense tensor's values start at its offset (`values`); the transposed view was
        // checked to start at 0.
        let ws: &[f32] = if transposed {
            &w.storage::<f32>()[..k * n]
        } else {
            values(&w)
        };
        // (row, column) strides of w's element (i, j).
        let (rs, cs) = if transposed { (1, k) } else { (n, 1) };
        // Below a quarter million weights a second thread costs more than it saves; above, at
        // least two pieces, so that the split runs (and is tested) on any machine.
        let parts = if k * n < 1 << 18 {
            1
        } else {
            rayon::current_num_threads().max(2)
        };
        // The split dimension: w's rows when row-major, its columns when transposed.
        let split = if transposed { n } else { k };
        let step = split.div_ceil(parts).max(1);
        // One product over w's rows i0..i0 + rows and columns j0..j0 + cols: [m, cols].
        let product = |(i0, rows): (usize, usize), (j0, cols): (usize, usize)| {
            let mut dst = vec![0f32; m * cols];
            // SAFETY: x is [m, k] dense, read at columns i0..i0 + rows; w's elements
            // (i0 + i, j0 + j) lie at (i0 + i)·rs + (j0 + j)·cs < k·n; dst is [m, cols].
            unsafe {
                gemm::gemm(
                    m,
                    cols,
                    rows,
                    dst.as_mut_ptr(),
                    1,
                    cols as isize,
                    false,
                    xs.as_ptr().add(i0),
                    1,
                    k as isize,
                    ws.as_ptr().add(i0 * rs + j0 * cs),
                    cs as isize,
                    rs as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            dst
        };
        let pieces: Vec<Vec<f32>> = (0..split.div_ceil(step))
            .into_par_iter()
            .map(|p| {
                let range = (p * step, step.min(split - p * step));
                if transposed {
                    product((0, k), range)
                } else {
                    product(range, (0, n))
                }
            })
            .collect();
        let mut out = vec![0f32; m * n];
        if transposed {
            for (p, piece) in pieces.iter().enumerate() {
                let (j0, cols) = (p * step, step.min(n - p * step));
                for (r, row) in piece.chunks(cols).enumerate() {
                    out[r * n + j0..r * n + j0 + cols].copy_from_slice(row);
                }
            }
        } else {
            for piece in &pieces {
                for (o, v) in out.iter_mut().zip(piece) {
                    *o += v;
                }
            }
        }
        FlexTensor::from_data(TensorData::new(out, [m, n]))
    }
}
