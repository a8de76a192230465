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
            && std::arch::is_x86_feature_detected!("avx512bw")
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

/// `f32` to the nearest bfloat16 (ties to even), as its 16 bits, as the conversion instruction
/// (`vcvtne2ps2bf16`) rounds: NaN stays a (quiet) NaN, and a subnormal f32 becomes a zero of
/// its sign (the instruction treats subnormal inputs as zero).
#[inline(always)]
pub(crate) fn to_bf16(x: f32) -> u32 {
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
    if x.is_nan() {
        (b >> 16) | 0x40
    } else if b & 0x7f80_0000 == 0 {
        (b >> 16) & 0x8000
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

    /// A pointer that rayon's tasks may share: each writes its own disjoint part of the
    /// buffer (tiles of `C` in `gemm`, pair rows of a packed operand in `pack`).
    struct SendPtr<T>(*mut T);
    // SAFETY: tasks write disjoint regions (see `gemm` and `pack`).
    unsafe impl<T> Send for SendPtr<T> {}
    unsafe impl<T> Sync for SendPtr<T> {}

    impl<T> Clone for SendPtr<T> {
        fn clone(&self) -> Self {
            *self
        }
    }
    impl<T> Copy for SendPtr<T> {}

    impl<T> SendPtr<T> {
        /// Through a method, so that a closure captures the whole `SendPtr` (Send), not its
        /// raw-pointer field.
        fn get(self) -> *mut T {
            self.0
        }
    }

    /// [`pack_lines`] with AVX-512: where each line's `k` values are contiguous they are
    /// rounded 32 at a time by the conversion instruction (`vcvtne2ps2bf16`, the rounding of
    /// [`to_bf16`]) and put in `[pair][line]` order by a 16 × 16 transpose in registers; other
    /// strides take [`pack_lines`] (operands whose lines are contiguous are packed by
    /// [`pack_pairs_of_rows`] before they get here). The layout is [`pack_lines`]'s, which the
    /// bit-for-bit test checks through both operand orders.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    fn wide_lines(
        x: Strided,
        lines_are_rows: bool,
        first: usize,
        len: usize,
        k: usize,
        width: usize,
        out: &mut [u32],
    ) {
        let (ls, ks) = if lines_are_rows {
            (x.rs, x.cs)
        } else {
            (x.cs, x.rs)
        };
        let kp = k.div_ceil(2);
        if len == 0 || k == 0 {
            return;
        }
        let base = x.offset + first * ls;
        // Every value read below lies in the slice: the last one is line len-1's value k-1.
        assert!(
            base + (len - 1) * ls + (k - 1) * ks < x.values.len() && out.len() >= kp * width,
            "bf16 pack: {len} lines of {k} past the operand's {} values",
            x.values.len()
        );
        if ks == 1 {
            let values = x.values.as_ptr();
            // SAFETY: AVX-512 with BF16 is enabled for this function; the reads are in bounds
            // (asserted above) and the writes are rows `< kp` of width `width` ≥ `len`.
            unsafe { pack_contiguous_k(values, base, ls, len, k, width, out.as_mut_ptr()) };
        } else {
            pack_lines(x, lines_are_rows, first, len, k, width, out);
        }
    }

    /// Mask of the first `n` (≤ 16) lanes.
    #[inline(always)]
    fn lanes(n: usize) -> u16 {
        if n >= 16 {
            0xffff
        } else {
            ((1u32 << n) - 1) as u16
        }
    }

    /// bf16 pairs of the (up to) 32 values at `p`, `n` of them valid (zeros beyond, so an odd
    /// `k` ends in `pair(x, 0)`): pair `j` is `(p[2j], p[2j + 1])`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[inline]
    unsafe fn pairs_of_32(p: *const f32, n: usize) -> __m512i {
        // SAFETY: the caller guarantees `n` readable values at `p`; masked lanes are not read.
        unsafe {
            let lo = _mm512_maskz_loadu_ps(lanes(n), p);
            let hi = if n > 16 {
                _mm512_maskz_loadu_ps(lanes(n - 16), p.add(16))
            } else {
                _mm512_setzero_ps()
            };
            // The low 16 bf16 (8 pairs) from `lo`, the high 16 from `hi`.
            std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo))
        }
    }

    /// Lines whose `k` values are contiguous (line `l` starts at `values[base + l·ls]`), 16
    /// lines by 16 pairs at a time: each line's 32 values become 16 pairs, and the 16 × 16 block
    /// is transposed so that each pair index is one row of the packed group.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn pack_contiguous_k(
        values: *const f32,
        base: usize,
        ls: usize,
        len: usize,
        k: usize,
        width: usize,
        out: *mut u32,
    ) {
        let kp = k.div_ceil(2);
        let mut rows = [_mm512_setzero_si512(); 16];
        for l0 in (0..len).step_by(16) {
            let lines = 16.min(len - l0);
            for p0 in (0..kp).step_by(16) {
                let (pairs, n) = (16.min(kp - p0), (k - 2 * p0).min(32));
                for (i, row) in rows.iter_mut().enumerate() {
                    *row = if i < lines {
                        // SAFETY: line l0 + i has k values from its start (caller).
                        unsafe { pairs_of_32(values.add(base + (l0 + i) * ls + 2 * p0), n) }
                    } else {
                        _mm512_setzero_si512()
                    };
                }
                transpose16(&mut rows);
                for (p, row) in rows.iter().take(pairs).enumerate() {
                    // SAFETY: pair p0 + p < kp and lines l0.. l0 + lines ≤ width of its row.
                    unsafe {
                        _mm512_mask_storeu_epi32(
                            out.add((p0 + p) * width + l0).cast(),
                            lanes(lines),
                            *row,
                        )
                    };
                }
            }
        }
    }

    /// Packs pairs `pairs` of an operand whose lines are neighbours in memory (value `kk` of
    /// line `l` at `offset + kk·ks + l`), for every group of `width` lines: each pair index
    /// takes two `k`-rows, rounded together and interleaved into pairs 16 lines at a time,
    /// written to row `p` of each group (`out` laid out as [`pack`]'s result).
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn pack_pairs_of_rows(
        x: Strided,
        ks: usize,
        lines: usize,
        k: usize,
        width: usize,
        pairs: std::ops::Range<usize>,
        out: *mut u32,
    ) {
        let kp = k.div_ceil(2);
        let values = x.values.as_ptr();
        // Element 2i of the result is bf16 i of `lo`, element 2i + 1 bf16 i of `hi` (which
        // the conversion put at 16 + i).
        let interleave = _mm512_set_epi16(
            31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20,
            4, 19, 3, 18, 2, 17, 1, 16, 0,
        );
        for p in pairs {
            let lo_row = x.offset + 2 * p * ks;
            for g0 in (0..lines).step_by(width) {
                let group = out.wrapping_add(g0 * kp + p * width);
                let len = width.min(lines - g0);
                for l0 in (0..len).step_by(16) {
                    let mask = lanes(len - l0);
                    // SAFETY: lines g0 + l0.. of k-rows 2p and (if < k) 2p + 1 are in bounds
                    // (caller); the store stays inside row p of this group (`width` ≥ `len`).
                    unsafe {
                        let at = values.add(lo_row + g0 + l0);
                        let lo = _mm512_maskz_loadu_ps(mask, at);
                        let hi = if 2 * p + 1 < k {
                            _mm512_maskz_loadu_ps(mask, at.add(ks))
                        } else {
                            _mm512_setzero_ps()
                        };
                        let both =
                            std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
                        let packed = _mm512_permutexvar_epi16(interleave, both);
                        _mm512_mask_storeu_epi32(group.add(l0).cast(), mask, packed);
                    }
                }
            }
        }
    }

    /// Transposes a 16 × 16 block of u32: `rows[i]` lane `j` becomes `rows[j]` lane `i`.
    /// Pairs of rows interleave by 32 and 64 bits, which leaves each 128-bit lane holding four
    /// rows of one column; two rounds of 128-bit lane shuffles gather each column's four lanes.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn transpose16(rows: &mut [__m512i; 16]) {
        let r = *rows;
        let mut t = [_mm512_setzero_si512(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
        }
        // After these, r[4g + c]'s 128-bit lane l holds rows 4g..4g+3 of column 4l + c.
        let mut r = [_mm512_setzero_si512(); 16];
        for g in 0..4 {
            let (a, b) = (t[4 * g], t[4 * g + 1]);
            let (c, d) = (t[4 * g + 2], t[4 * g + 3]);
            r[4 * g] = _mm512_unpacklo_epi64(a, c);
            r[4 * g + 1] = _mm512_unpackhi_epi64(a, c);
            r[4 * g + 2] = _mm512_unpacklo_epi64(b, d);
            r[4 * g + 3] = _mm512_unpackhi_epi64(b, d);
        }
        for c in 0..4 {
            t[c] = _mm512_shuffle_i32x4::<0x88>(r[c], r[4 + c]);
            t[4 + c] = _mm512_shuffle_i32x4::<0xdd>(r[c], r[4 + c]);
            t[8 + c] = _mm512_shuffle_i32x4::<0x88>(r[8 + c], r[12 + c]);
            t[12 + c] = _mm512_shuffle_i32x4::<0xdd>(r[8 + c], r[12 + c]);
        }
        for c in 0..8 {
            rows[c] = _mm512_shuffle_i32x4::<0x88>(t[c], t[8 + c]);
            rows[8 + c] = _mm512_shuffle_i32x4::<0xdd>(t[c], t[8 + c]);
        }
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
        let (ls, ks) = if lines_are_rows {
            (x.rs, x.cs)
        } else {
            (x.cs, x.rs)
        };
        if ls == 1 && ks != 1 && lines > 0 && k > 0 {
            // Neighbouring lines are neighbours in memory: walk k once, each pair of k-rows
            // read once for every group (a group at a time would read each k-row again per
            // group, for a large operand from beyond the L2 cache).
            assert!(
                x.offset + (lines - 1) + (k - 1) * ks < x.values.len(),
                "bf16 pack: {lines} lines of {k} past the operand's {} values",
                x.values.len()
            );
            let dst = SendPtr(out.as_mut_ptr());
            let chunk = |c: usize| {
                let pairs = (c * 16)..kp.min((c + 1) * 16);
                // SAFETY: AVX-512 with BF16 is present (see `gemm`); reads are in bounds
                // (asserted above); each chunk writes only its own pair rows of every group.
                unsafe { pack_pairs_of_rows(x, ks, lines, k, width, pairs, dst.get()) };
            };
            if parallel {
                (0..kp.div_ceil(16)).into_par_iter().for_each(chunk);
            } else {
                (0..kp.div_ceil(16)).for_each(chunk);
            }
            return out;
        }
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
        // The largest subnormal would round up to the smallest normal; the instruction reads
        // it as zero.
        assert_eq!(to_bf16(f32::from_bits(0x007f_ffff)), 0);
        assert_eq!(to_bf16(-f32::from_bits(0x0000_0001)), 0x8000);
    }

    /// A subnormal operand counts as zero in the vector kernel (the conversion instruction
    /// treats it so) and in the emulation alike, through both packing paths.
    #[test]
    fn subnormal_operands_count_as_zero() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        let (m, n, k) = (3, 17, 33);
        let bv = vec![2f32.powi(100); k * n];
        for ta in [false, true] {
            // Row 0 of A holds only the largest subnormal (at column 2), rounded up to the
            // smallest normal it would give 2⁻²⁶ in every column of C's row 0.
            let logical = values(m * k, 5);
            let mut av = vec![0f32; m * k];
            for r in 0..m {
                for c in 0..k {
                    let v = match (r, c) {
                        (0, 2) => f32::from_bits(0x007f_ffff),
                        (0, _) => 0.0,
                        _ => logical[r * k + c],
                    };
                    av[if ta { c * m + r } else { r * k + c }] = v;
                }
            }
            let (a, b) = (operand(&av, m, k, ta), operand(&bv, k, n, false));
            let (mut got, mut want) = (vec![f32::NAN; m * n], vec![0f32; m * n]);
            gemm(m, n, k, a, b, &mut got);
            emulate(m, n, k, a, b, &mut want);
            assert_eq!(got, want, "transposed {ta}");
            assert!(got[..n].iter().all(|&v| v == 0.0), "transposed {ta}");
            assert!(got[n..].iter().any(|&v| v != 0.0), "transposed {ta}");
        }
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
