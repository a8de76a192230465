//! bf16 matrix products on the CPU: operands rounded to bfloat16, products accumulated in f32,
//! with the AVX512-BF16 dot-product instruction (`vdpbf16ps`, 32 multiply-adds per
//! instruction where an f32 FMA does 16).
//!
//! Why by hand: no registry crate has a bf16 GEMM (`gemm` has f16 only; burn's CPU backend
//! computes a bf16 matmul by converting both operands to f32), and this is what
//! `torch.autocast("cpu", torch.bfloat16)` runs through oneDNN. The layout is GotoBLAS's:
//! both operands are packed once per call into bf16 pairs along `k` (the instruction multiplies
//! element pairs), `B` into panels of [`NR`] columns and `A` into slivers of [`MR`] rows, and a
//! register-blocked micro-kernel keeps an `MR × NR` tile of `C` in 24 of the 32 vector
//! registers while it walks `k` in blocks of [`KC`] pairs that stay in the L1 and L2 caches.
//!
//! Every CPU with AMX-BF16 (Sapphire Rapids and later) also has AVX512-BF16, so
//! [`available`] covers both; AMX tiles themselves are not used.
//!
//! The arithmetic is exactly the instruction's, and [`emulate`] reproduces it bit for bit on
//! any CPU (the test's reference): each operand rounded to the nearest bf16 (ties to even), and
//! per pair of `k` the odd product added to the sum, then the even one, each addition rounded
//! to f32 (the products of two bf16 are exact in f32). The instruction also treats subnormal
//! bf16 inputs as zero, which [`emulate`] does too.

use rayon::prelude::*;

/// Rows of `A` (and of `C`) per micro-kernel tile.
const MR: usize = 12;
/// Columns of `B` (and of `C`) per micro-kernel tile: two vectors of 16 f32.
const NR: usize = 32;
/// Pairs of `k` per cache block: a `KC × NR` slice of a `B` panel is 32 KiB.
const KC: usize = 256;
/// Rows of `A` per task: 8 slivers, a `MC × KC` block of 96 KiB stays in L2.
const MC: usize = MR * 8;
/// Columns of `B` per task: 8 panels.
const NC: usize = NR * 8;

/// Whether this CPU runs [`gemm`] with bf16 dot-product instructions (AVX512-BF16, which every
/// AMX CPU has too). Elsewhere [`gemm`] computes the same numbers with scalar code, far slower.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// A matrix read through strides: element `(r, c)` is `values[offset + r·rs + c·cs]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Strided<'a> {
    pub values: &'a [f32],
    pub offset: usize,
    pub rs: usize,
    pub cs: usize,
}

impl Strided<'_> {
    #[inline(always)]
    fn at(&self, r: usize, c: usize) -> f32 {
        self.values[self.offset + r * self.rs + c * self.cs]
    }
}

/// `f32` to the nearest bfloat16 (ties to even), as its 16 bits; NaN stays a (quiet) NaN.
#[inline(always)]
pub(crate) fn to_bf16(x: f32) -> u32 {
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
    if x.is_nan() {
        (b >> 16) | 0x40
    } else {
        rounded
    }
}

/// The f32 value of bf16 bits, with subnormals read as zero (as the instruction reads them).
#[inline(always)]
fn from_bf16_daz(h: u32) -> f32 {
    let h = if h & 0x7f80 == 0 { h & 0x8000 } else { h };
    f32::from_bits(h << 16)
}

/// `dst [m, n] (row-major) = bf16(a) [m, k] · bf16(b) [k, n]`, accumulated in f32 (see the
/// module's doc for the exact arithmetic). Overwrites `dst`.
pub(crate) fn gemm(m: usize, n: usize, k: usize, a: Strided, b: Strided, dst: &mut [f32]) {
    gemm_with(m, n, k, a, b, dst, true);
}

/// [`gemm`] on the calling thread only: for the products of a batch, which are spread over the
/// threads one product each (splitting each small product as well cost more than it saved).
pub(crate) fn gemm_in_one_thread(
    m: usize,
    n: usize,
    k: usize,
    a: Strided,
    b: Strided,
    dst: &mut [f32],
) {
    gemm_with(m, n, k, a, b, dst, false);
}

fn gemm_with(m: usize, n: usize, k: usize, a: Strided, b: Strided, dst: &mut [f32], threads: bool) {
    assert!(
        dst.len() >= m * n,
        "bf16 gemm: output of {} < {m}×{n}",
        dst.len()
    );
    if m == 0 || n == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if available() {
        simd::gemm(m, n, k, a, b, dst, threads);
        return;
    }
    emulate(m, n, k, a, b, dst);
}

/// [`gemm`]'s arithmetic in scalar code: the reference its vector kernel is tested against,
/// and what runs on a CPU without AVX512-BF16.
pub(crate) fn emulate(m: usize, n: usize, k: usize, a: Strided, b: Strided, dst: &mut [f32]) {
    let pair = |v: f32| from_bf16_daz(to_bf16(v));
    let kp = k.div_ceil(2);
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0f32;
            for p in 0..kp {
                let (k0, k1) = (2 * p, 2 * p + 1);
                let (a1, b1) = if k1 < k {
                    (pair(a.at(i, k1)), pair(b.at(k1, j)))
                } else {
                    (0.0, 0.0)
                };
                acc += a1 * b1;
                acc += pair(a.at(i, k0)) * pair(b.at(k0, j));
            }
            dst[i * n + j] = acc;
        }
    }
}

/// The bf16 pair `(lo, hi)` as one u32, `lo` in the low half (the instruction's element 2i).
#[inline(always)]
fn pair(lo: f32, hi: f32) -> u32 {
    to_bf16(lo) | (to_bf16(hi) << 16)
}

/// `out[p] = pair(line[2p], line[2p + 1])` over a contiguous line of `k` values (the last pair
/// padded with a zero when `k` is odd). Unit strides, so the loop vectorises.
#[inline(always)]
fn pairs_of_line(line: &[f32], out: &mut [u32]) {
    let whole = line.len() / 2;
    for (o, v) in out[..whole].iter_mut().zip(line.chunks_exact(2)) {
        *o = pair(v[0], v[1]);
    }
    if line.len() % 2 == 1 {
        out[whole] = pair(line[line.len() - 1], 0.0);
    }
}

/// `out[i] = pair(lo[i], hi[i])`: two lines of `k`-neighbours side by side (the other operand
/// order), or `lo` alone when `hi` is past the end of `k`.
#[inline(always)]
fn pairs_across(lo: &[f32], hi: Option<&[f32]>, out: &mut [u32]) {
    match hi {
        Some(hi) => {
            for ((o, &l), &h) in out.iter_mut().zip(lo).zip(hi) {
                *o = pair(l, h);
            }
        }
        None => {
            for (o, &l) in out.iter_mut().zip(lo) {
                *o = pair(l, 0.0);
            }
        }
    }
}

/// Packs `len` lines of an operand into `[pair][width]` u32 (`width` ≥ `len`, zeros beyond):
/// line `l` is row `first + l` of `A` (`lines_are_rows`) or column `first + l` of `B`, and
/// `k` runs along the other index. Whichever stride is 1 decides the loop that vectorises.
#[inline(always)]
fn pack_lines(
    x: Strided,
    lines_are_rows: bool,
    first: usize,
    len: usize,
    k: usize,
    width: usize,
    out: &mut [u32],
) {
    // (stride between lines, stride along k)
    let (ls, ks) = if lines_are_rows {
        (x.rs, x.cs)
    } else {
        (x.cs, x.rs)
    };
    let kp = k.div_ceil(2);
    let base = x.offset + first * ls;
    if ks == 1 && k > 0 {
        // Each line's k values are contiguous: convert the line, then spread its pairs.
        let mut scratch = vec![0u32; kp];
        for l in 0..len {
            let start = base + l * ls;
            pairs_of_line(&x.values[start..start + k], &mut scratch);
            for (p, &v) in scratch.iter().enumerate() {
                out[p * width + l] = v;
            }
        }
    } else if ls == 1 && len > 0 {
        // Neighbouring lines are contiguous: two k-rows at a time, straight into place.
        for p in 0..kp {
            let lo = base + 2 * p * ks;
            let hi = (2 * p + 1 < k).then(|| &x.values[lo + ks..lo + ks + len]);
            pairs_across(
                &x.values[lo..lo + len],
                hi,
                &mut out[p * width..p * width + len],
            );
        }
    } else {
        let at = |l: usize, kk: usize| x.values[base + l * ls + kk * ks];
        for p in 0..kp {
            for l in 0..len {
                let hi = if 2 * p + 1 < k { at(l, 2 * p + 1) } else { 0.0 };
                out[p * width + l] = pair(at(l, 2 * p), hi);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use super::*;
    use std::arch::x86_64::*;

    /// A pointer that rayon's tasks may share: each writes its own disjoint tiles of `C`.
    #[derive(Clone, Copy)]
    struct SendPtr(*mut f32);
    // SAFETY: tasks write disjoint regions (see `gemm`).
    unsafe impl Send for SendPtr {}
    unsafe impl Sync for SendPtr {}

    impl SendPtr {
        /// Through a method, so that a closure captures the whole `SendPtr` (Send), not its
        /// raw-pointer field.
        fn get(self) -> *mut f32 {
            self.0
        }
    }

    /// [`pack_lines`] compiled for AVX-512, so that its loops vectorise 16 wide.
    #[target_feature(enable = "avx512f,avx512bw")]
    fn wide_lines(
        x: Strided,
        lines_are_rows: bool,
        first: usize,
        len: usize,
        k: usize,
        width: usize,
        out: &mut [u32],
    ) {
        pack_lines(x, lines_are_rows, first, len, k, width, out);
    }

    /// Packs `lines` lines of `x` in groups of `width`, each group `[pair][line]`: u32 bf16 pairs
    /// along `k`, zeros past the edges. `A` `[m, k]` packs its rows into slivers of [`MR`]
    /// (`lines_are_rows`), `B` `[k, n]` its columns into panels of [`NR`].
    fn pack(
        x: Strided,
        lines_are_rows: bool,
        lines: usize,
        k: usize,
        width: usize,
        parallel: bool,
    ) -> Vec<u32> {
        let kp = k.div_ceil(2);
        let mut out = vec![0u32; lines.div_ceil(width) * kp * width];
        let one = |(g, group): (usize, &mut [u32])| {
            let len = width.min(lines - g * width);
            // SAFETY: only called where the CPU has AVX-512 (see `gemm`).
            unsafe { wide_lines(x, lines_are_rows, g * width, len, k, width, group) };
        };
        if parallel {
            out.par_chunks_mut(kp * width).enumerate().for_each(one);
        } else {
            out.chunks_mut(kp * width).enumerate().for_each(one);
        }
        out
    }

    pub(super) fn gemm(
        m: usize,
        n: usize,
        k: usize,
        a: Strided,
        b: Strided,
        dst: &mut [f32],
        threads: bool,
    ) {
        let kp = k.div_ceil(2);
        let parallel = threads && m * n * k >= 64 * 64 * 64;
        let (pa, pb) = (
            pack(a, true, m, k, MR, parallel),
            pack(b, false, n, k, NR, parallel),
        );
        let c = SendPtr(dst.as_mut_ptr());
        let (row_blocks, col_blocks) = (m.div_ceil(MC), n.div_ceil(NC));
        let tasks = row_blocks * col_blocks;
        let run = |t: usize| {
            let (rb, cb) = (t / col_blocks, t % col_blocks);
            let rows = (rb * MC)..(m.min((rb + 1) * MC));
            let cols = (cb * NC)..(n.min((cb + 1) * NC));
            // SAFETY: AVX512-BF16 is present (checked by the caller); the task writes only the
            // rows × cols block of C, disjoint from every other task's, and every read stays
            // inside the packed buffers, whose sizes follow from m, n and k.
            unsafe { block(kp, &pa, &pb, c.get(), n, rows, cols) };
        };
        if tasks > 1 && parallel {
            (0..tasks).into_par_iter().for_each(run);
        } else {
            (0..tasks).for_each(run);
        }
    }

    /// One task: rows × cols of C, all of k, block by block.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn block(
        kp: usize,
        pa: &[u32],
        pb: &[u32],
        c: *mut f32,
        ldc: usize,
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
    ) {
        let mut p0 = 0;
        while p0 < kp {
            let len = KC.min(kp - p0);
            let mut j = cols.start;
            while j < cols.end {
                let panel = &pb[(j / NR) * kp * NR + p0 * NR..];
                let mut i = rows.start;
                while i < rows.end {
                    let sliver = &pa[(i / MR) * kp * MR + p0 * MR..];
                    // SAFETY: see `gemm`; the tile's valid part lies inside C.
                    unsafe {
                        micro(
                            len,
                            sliver.as_ptr(),
                            panel.as_ptr(),
                            c.add(i * ldc + j),
                            ldc,
                            MR.min(rows.end - i),
                            NR.min(cols.end - j),
                            p0 > 0,
                        );
                    }
                    i += MR;
                }
                j += NR;
            }
            p0 += len;
        }
    }

    /// `C[rows, cols] (+)= A sliver · B panel` over `len` pairs of k: an `MR × NR` tile of f32
    /// sums in 24 registers. `accumulate` adds to what C holds (later blocks of k) instead of
    /// starting from zero, which keeps the order of additions that of one pass over k.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    #[inline]
    unsafe fn micro(
        len: usize,
        a: *const u32,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        accumulate: bool,
    ) {
        let lane = |n: usize| -> u16 {
            if n >= 16 {
                0xffff
            } else {
                ((1u32 << n) - 1) as u16
            }
        };
        let (m0, m1) = (lane(cols), lane(cols.saturating_sub(16)));
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        // SAFETY (whole body): a and b point at `len` packed pairs of MR and NR u32, c at a tile
        // of which rows × cols lie inside C; masked loads and stores touch only those.
        unsafe {
            if accumulate {
                for (r, tile) in acc.iter_mut().enumerate() {
                    if r < rows {
                        let row = c.add(r * ldc);
                        tile[0] = _mm512_maskz_loadu_ps(m0, row);
                        tile[1] = _mm512_maskz_loadu_ps(m1, row.add(16));
                    }
                }
            }
            for p in 0..len {
                let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR).cast()));
                let b1: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(b.add(p * NR + 16).cast()));
                let ap = a.add(p * MR);
                for (r, tile) in acc.iter_mut().enumerate() {
                    let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ap.add(r) as i32));
                    tile[0] = _mm512_dpbf16_ps(tile[0], av, b0);
                    tile[1] = _mm512_dpbf16_ps(tile[1], av, b1);
                }
            }
            for (r, tile) in acc.iter().enumerate() {
                if r < rows {
                    let row = c.add(r * ldc);
                    _mm512_mask_storeu_ps(row, m0, tile[0]);
                    _mm512_mask_storeu_ps(row.add(16), m1, tile[1]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SplitMix64 values in [-2, 2): fixed operands without a random-number crate.
    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = s;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                z ^= z >> 31;
                ((z >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect()
    }

    /// Shapes around every edge: single rows and columns, odd k, partial tiles, several k blocks
    /// (2·KC = 512 values of k) and several tasks.
    const SHAPES: [(usize, usize, usize); 9] = [
        (1, 1, 1),
        (1, 33, 7),
        (13, 1, 2),
        (12, 32, 64),
        (25, 47, 129),
        (7, 300, 513),
        (100, 70, 1100),
        (130, 260, 96),
        (3, 5, 1),
    ];

    /// Row-major `[r, c]`, or its transpose read through strides.
    fn operand(values: &[f32], rows: usize, cols: usize, transposed: bool) -> Strided<'_> {
        if transposed {
            Strided {
                values,
                offset: 0,
                rs: 1,
                cs: rows,
            }
        } else {
            Strided {
                values,
                offset: 0,
                rs: cols,
                cs: 1,
            }
        }
    }

    #[test]
    fn rounding_to_bf16_is_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: to even (1).
        assert_eq!(to_bf16(1.0 + 2f32.powi(-8)), 0x3f80);
        // 1 + 3·2^-8 lies halfway between 1 + 2^-7 and 1 + 2^-6: to even (1 + 2^-6).
        assert_eq!(to_bf16(1.0 + 3.0 * 2f32.powi(-8)), 0x3f82);
        assert_eq!(to_bf16(1.0 + 2f32.powi(-8) + 2f32.powi(-20)), 0x3f81);
        assert_eq!(to_bf16(-2.0), 0xc000);
        assert_eq!(to_bf16(f32::INFINITY), 0x7f80);
        assert_eq!(to_bf16(f32::MAX), 0x7f80, "f32::MAX rounds up to infinity");
        assert!(f32::from_bits(to_bf16(f32::NAN) << 16).is_nan());
    }

    /// The vector kernel computes exactly what the scalar emulation does, through both operand
    /// layouts, on every edge shape. Skipped (and says so) on a CPU without AVX512-BF16.
    #[test]
    fn the_vector_kernel_equals_its_emulation_bit_for_bit() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        for (m, n, k) in SHAPES {
            let (av, bv) = (values(m * k, 1), values(k * n, 2));
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let (a, b) = (operand(&av, m, k, ta), operand(&bv, k, n, tb));
                let mut got = vec![f32::NAN; m * n];
                let mut want = vec![0f32; m * n];
                gemm(m, n, k, a, b, &mut got);
                emulate(m, n, k, a, b, &mut want);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(
                        g.to_bits(),
                        w.to_bits(),
                        "{m}×{n}×{k} (transposed {ta}, {tb}) element {i}: {g} vs {w}"
                    );
                }
            }
        }
    }

    /// Against the f64 product of the unrounded operands, every element is within bf16's
    /// rounding of both operands (bf16's unit roundoff is 2⁻⁸: 2·2⁻⁸ of Σ|a||b|, plus f32
    /// accumulation), and the rounding is
    /// really there (the result is not the f32 product).
    #[test]
    fn products_are_f32_products_within_bf16_rounding() {
        for (m, n, k) in SHAPES {
            let (av, bv) = (values(m * k, 3), values(k * n, 4));
            let (a, b) = (operand(&av, m, k, false), operand(&bv, k, n, false));
            let mut got = vec![0f32; m * n];
            gemm(m, n, k, a, b, &mut got);
            let mut differs = false;
            for i in 0..m {
                for j in 0..n {
                    let (mut exact, mut magnitude) = (0f64, 0f64);
                    for p in 0..k {
                        let t = av[i * k + p] as f64 * bv[p * n + j] as f64;
                        exact += t;
                        magnitude += t.abs();
                    }
                    let err = (got[i * n + j] as f64 - exact).abs();
                    let bound = magnitude * (2.0 * 2f64.powi(-8) + k as f64 * 2f64.powi(-24));
                    assert!(
                        err <= bound,
                        "{m}×{n}×{k} [{i}, {j}]: off by {err} > {bound}"
                    );
                    differs |= err > magnitude * 2f64.powi(-20);
                }
            }
            assert!(differs || k == 1, "{m}×{n}×{k}: no bf16 rounding seen");
        }
    }
}
