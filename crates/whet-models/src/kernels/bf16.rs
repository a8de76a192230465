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
//! [`available`] covers both. Where the CPU has AMX and Linux grants the process its tile
//! state, the product runs on the tiles instead (`tdpbf16ps`: a 16 × 16 f32 tile of `C`
//! gains 16 × 16 × 32 multiply-adds per instruction), which is what oneDNN runs for PyTorch on
//! those CPUs; `WHET_AMX=off` keeps the AVX512-BF16 kernel (to compare the two). The operands
//! are packed into tiles the same way, with `k` padded to whole tiles of zero pairs.
//!
//! The AVX512-BF16 kernel's arithmetic is exactly the instruction's, and [`emulate`] reproduces
//! it bit for bit on any CPU (the test's reference): each operand rounded to the nearest bf16 (ties to even), and
//! per pair of `k` the odd product added to the sum, then the even one, each addition rounded
//! to f32 (the products of two bf16 are exact in f32). The instruction also treats subnormal
//! bf16 inputs as zero, which [`emulate`] does too. The AMX instruction multiplies the same
//! bf16 operands (subnormals as zero too) and accumulates in f32, but rounds its sums in an
//! order of its own that no simple model reproduces bit for bit (measured on a Xeon with AMX:
//! about 85% of the elements equal [`emulate`]'s, the rest one f32 rounding away), so its test
//! holds it to [`emulate`] within f32 accumulation error instead.

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

/// [`gemm`] added to what `dst` holds (`dst += a · b`, the sums starting from `dst`'s values)
/// with `accumulate`, or overwriting it without: a product summed over chunks of `k`, as the
/// LM-head loss sums its weight's gradient chunk by chunk.
pub(crate) fn gemm_into(
    m: usize,
    n: usize,
    k: usize,
    a: Strided,
    b: Strided,
    dst: &mut [f32],
    accumulate: bool,
) {
    gemm_by(Kernel::best(), m, n, k, a, b, dst, true, accumulate);
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

/// The products of `batches` pairs of operands (`a(i) · b(i)`, each `[m, k] · [k, n]`) in a
/// new buffer `[batches, m, n]`: one product over all threads, several one a thread (as
/// [`gemm_in_one_thread`]). On AMX the tiles store every value of the buffer, so it is not
/// zeroed first (a `memset` of the whole output, about 3% of a MiniLM training step).
pub(crate) fn products<'a>(
    batches: usize,
    m: usize,
    n: usize,
    k: usize,
    a: impl Fn(usize) -> Strided<'a> + Sync,
    b: impl Fn(usize) -> Strided<'a> + Sync,
) -> Vec<f32> {
    let len = batches * m * n;
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    if Kernel::best() == Kernel::Amx {
        // SAFETY: AMX is granted (`Kernel::best`), and the tiles store all m · n values of
        // each product at `c`.
        return unsafe {
            super::new_products(batches, m * n, |i, c, threads| {
                simd::amx::gemm(m, n, k, a(i), b(i), c, threads)
            })
        };
    }
    let mut out = vec![0f32; len];
    if batches > 1 {
        out.par_chunks_mut((m * n).max(1))
            .enumerate()
            .for_each(|(i, dst)| gemm_in_one_thread(m, n, k, a(i), b(i), dst));
    } else if batches == 1 {
        gemm(m, n, k, a(0), b(0), &mut out);
    }
    out
}

/// A `B` operand `[k, n]` ready for several products ([`gemm_prepared`]): packed once on AMX
/// (an LM head's weight, 56 MiB packed, was packed again for each chunk of rows, each time
/// into fresh pages), read as given by the other kernels, which pack per product.
pub(crate) enum PreparedB<'a> {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    Amx(simd::amx::PackedB),
    Plain {
        b: Strided<'a>,
        n: usize,
        k: usize,
    },
}

/// `b` `[k, n]` prepared for [`gemm_prepared`].
pub(crate) fn prepare_b(b: Strided<'_>, n: usize, k: usize) -> PreparedB<'_> {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    if Kernel::best() == Kernel::Amx {
        return PreparedB::Amx(simd::amx::pack_b(b, n, k, true));
    }
    PreparedB::Plain { b, n, k }
}

/// [`gemm_into`] of `a` `[m, k]` and a prepared `b` `[k, n]`.
pub(crate) fn gemm_prepared(
    m: usize,
    a: Strided,
    b: &PreparedB,
    dst: &mut [f32],
    accumulate: bool,
) {
    match b {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        PreparedB::Amx(pb) => {
            let (n, _) = pb.dims();
            assert!(
                dst.len() >= m * n,
                "bf16 gemm: output of {} < {m}×{n}",
                dst.len()
            );
            if m == 0 || n == 0 {
                return;
            }
            // SAFETY: AMX is granted (it was packed for AMX, `prepare_b`); `dst` holds m · n
            // values (asserted), initialised (a `&mut [f32]`) for `accumulate`.
            unsafe { simd::amx::gemm_packed(m, a, pb, dst.as_mut_ptr(), true, accumulate) }
        }
        PreparedB::Plain { b, n, k } => gemm_into(m, *n, *k, a, *b, dst, accumulate),
    }
}

/// The code that computes a [`gemm`]: the best this CPU has ([`Kernel::best`]), or a named
/// one (the tests compare them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// [`emulate`]: scalar code, on any CPU.
    Emulated,
    /// The AVX512-BF16 dot-product instruction on vector registers.
    Avx512Bf16,
    /// AMX tiles (`tdpbf16ps`).
    Amx,
}

impl Kernel {
    /// AMX where the CPU has it and the OS grants it (and `WHET_AMX` is not `off`), else
    /// AVX512-BF16 where the CPU has that, else the emulation.
    pub(crate) fn best() -> Self {
        if amx_ready() {
            Kernel::Amx
        } else if available() {
            Kernel::Avx512Bf16
        } else {
            Kernel::Emulated
        }
    }
}

/// Whether [`gemm`] runs on AMX tiles: the CPU has AMX-TILE and AMX-BF16 (CPUID leaf 7), Linux
/// grants this process the tile data state (`arch_prctl(ARCH_REQ_XCOMP_PERM)`, asked once: a
/// process must ask before its threads may touch the tiles), and `WHET_AMX` is not `off`.
pub fn amx_ready() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        static READY: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *READY.get_or_init(|| {
            if std::env::var("WHET_AMX").is_ok_and(|v| v == "off") || !available() {
                return false;
            }
            let leaf = std::arch::x86_64::__cpuid_count(7, 0);
            let (amx_bf16, amx_tile) = ((leaf.edx >> 22) & 1 == 1, (leaf.edx >> 24) & 1 == 1);
            // Linux's arch_prctl codes (arch/x86/include/uapi/asm/prctl.h, xstate.h).
            const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
            const XFEATURE_XTILEDATA: libc::c_long = 18;
            // SAFETY: the request only changes which register state the kernel lets this
            // process use; it reads and writes no memory of ours.
            amx_bf16
                && amx_tile
                && unsafe {
                    libc::syscall(
                        libc::SYS_arch_prctl,
                        ARCH_REQ_XCOMP_PERM,
                        XFEATURE_XTILEDATA,
                    )
                } == 0
        })
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    false
}

fn gemm_with(m: usize, n: usize, k: usize, a: Strided, b: Strided, dst: &mut [f32], threads: bool) {
    gemm_by(Kernel::best(), m, n, k, a, b, dst, threads, false);
}

/// [`gemm`] by the named kernel, which the CPU must have (the tests check [`Kernel::best`]
/// first); with `accumulate`, added to `dst` ([`gemm_into`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_by(
    kernel: Kernel,
    m: usize,
    n: usize,
    k: usize,
    a: Strided,
    b: Strided,
    dst: &mut [f32],
    threads: bool,
    accumulate: bool,
) {
    assert!(
        dst.len() >= m * n,
        "bf16 gemm: output of {} < {m}×{n}",
        dst.len()
    );
    if m == 0 || n == 0 {
        return;
    }
    match kernel {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        Kernel::Amx => {
            assert!(
                amx_ready(),
                "bf16 gemm: AMX asked for where it is not granted"
            );
            // SAFETY: AMX is granted (asserted); `dst` holds m · n values (asserted above).
            unsafe { simd::amx::gemm_into(m, n, k, a, b, dst.as_mut_ptr(), threads, accumulate) }
        }
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512Bf16 => simd::gemm(m, n, k, a, b, dst, threads, accumulate),
        _ => emulate_into(m, n, k, a, b, dst, accumulate),
    }
}

/// [`gemm`]'s arithmetic in scalar code ([`emulate_into`] overwriting): the reference the
/// vector kernels are tested against.
#[cfg(test)]
pub(crate) fn emulate(m: usize, n: usize, k: usize, a: Strided, b: Strided, dst: &mut [f32]) {
    emulate_into(m, n, k, a, b, dst, false);
}

/// [`emulate`], the sums starting from `dst`'s values with `accumulate` (as the vector kernel
/// starts its registers from them): what runs on a CPU without AVX512-BF16.
fn emulate_into(
    m: usize,
    n: usize,
    k: usize,
    a: Strided,
    b: Strided,
    dst: &mut [f32],
    accumulate: bool,
) {
    let pair = |v: f32| from_bf16_daz(to_bf16(v));
    let kp = k.div_ceil(2);
    for i in 0..m {
        for j in 0..n {
            let mut acc = if accumulate { dst[i * n + j] } else { 0f32 };
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

    /// A packed operand's buffer, taken from the calling thread's pool and given back when
    /// dropped: its values are whatever the last product left there, so the packers write
    /// every value of the layout, the padding zeros included ([`zero_padding`]). Zeroing each
    /// new buffer (a `memset` of a megabyte or so per operand, three products per linear layer
    /// and step) took about 3% of a MiniLM training step.
    pub(super) struct Scratch(Vec<u32>);

    /// Buffers a thread keeps for reuse: the two operands of a product, and those of one
    /// product that runs inside another's wait (rayon runs stolen work there).
    const KEPT: usize = 4;
    /// The largest buffer kept (32 MiB): a layer's operands fit (SmolLM2's largest, 1024 tokens
    /// by 1536, is 3 MiB packed), and so does the LM-head loss's gradient for a chunk of 256
    /// rows as the weight gradient's operand (49152 × 256, 24 MiB: four chunks a step, each
    /// packed into fresh pages when it was given back); an LM head's weight (49152 × 576,
    /// 56 MiB) is given back to the allocator rather than held for the rest of the run.
    const KEPT_LEN: usize = 1 << 23;

    thread_local! {
        static POOL: std::cell::RefCell<Vec<Vec<u32>>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    impl Scratch {
        /// `len` values, not cleared.
        fn take(len: usize) -> Self {
            let mut buf = POOL
                .with(|pool| pool.borrow_mut().pop())
                .unwrap_or_default();
            // Only growth writes (zeros); a buffer long enough keeps its old values.
            buf.resize(len, 0);
            Scratch(buf)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let buf = std::mem::take(&mut self.0);
            POOL.with(|pool| {
                let mut pool = pool.borrow_mut();
                if pool.len() < KEPT && buf.capacity() <= KEPT_LEN {
                    pool.push(buf);
                }
            });
        }
    }

    impl std::ops::Deref for Scratch {
        type Target = [u32];
        fn deref(&self) -> &[u32] {
            &self.0
        }
    }

    impl std::ops::DerefMut for Scratch {
        fn deref_mut(&mut self) -> &mut [u32] {
            &mut self.0
        }
    }

    /// Zeros the parts of a `[pair][line]` packed layout that hold no operand value: pair rows
    /// from `kp` on, and the lines past `lines` (the packers write exactly the rest).
    fn zero_padding(out: &mut [u32], shape: Groups, lines: usize, kp: usize) {
        let Groups {
            width,
            pairs,
            count,
        } = shape;
        for (g, group) in out.chunks_mut(pairs * width).take(count).enumerate() {
            let len = width.min(lines.saturating_sub(g * width));
            if len == 0 {
                group.fill(0);
                continue;
            }
            if len < width {
                for row in group[..kp * width].chunks_mut(width) {
                    row[len..].fill(0);
                }
            }
            group[kp * width..].fill(0);
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
        shape: Groups,
        pairs: std::ops::Range<usize>,
        out: *mut u32,
    ) {
        let width = shape.width;
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
                let group = out.wrapping_add(g0 * shape.pairs + p * width);
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
    ) -> Scratch {
        let shape = Groups {
            width,
            pairs: k.div_ceil(2),
            count: lines.div_ceil(width),
        };
        pack_into(x, lines_are_rows, lines, k, shape, parallel)
    }

    /// How [`pack_into`] lays out a packed operand: `count` groups of `width` lines, each
    /// `[pairs][width]` u32 (`pairs` ≥ the operand's pairs of `k`, `count · width` ≥ its lines;
    /// zeros beyond).
    #[derive(Clone, Copy)]
    pub(super) struct Groups {
        pub width: usize,
        pub pairs: usize,
        pub count: usize,
    }

    /// [`pack`] into a layout with room to spare (AMX pads both to whole tiles).
    pub(super) fn pack_into(
        x: Strided,
        lines_are_rows: bool,
        lines: usize,
        k: usize,
        shape: Groups,
        parallel: bool,
    ) -> Scratch {
        let Groups {
            width,
            pairs,
            count,
        } = shape;
        let kp = k.div_ceil(2);
        assert!(
            pairs >= kp && count * width >= lines,
            "bf16 pack: layout too small"
        );
        let mut out = Scratch::take(count * pairs * width);
        zero_padding(&mut out, shape, lines, kp);
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
                unsafe { pack_pairs_of_rows(x, ks, lines, k, shape, pairs, dst.get()) };
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
        let used = lines.div_ceil(width) * pairs * width;
        if parallel {
            out[..used]
                .par_chunks_mut(pairs * width)
                .enumerate()
                .for_each(one);
        } else {
            out[..used]
                .chunks_mut(pairs * width)
                .enumerate()
                .for_each(one);
        }
        out
    }

    /// `C = A · B` (or `C += A · B` with `accumulate`) by the AVX512-BF16 kernel.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemm(
        m: usize,
        n: usize,
        k: usize,
        a: Strided,
        b: Strided,
        dst: &mut [f32],
        threads: bool,
        accumulate: bool,
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
            unsafe { block(kp, &pa, &pb, c.get(), n, rows, cols, accumulate) };
        };
        if tasks > 1 && parallel {
            (0..tasks).into_par_iter().for_each(run);
        } else {
            (0..tasks).for_each(run);
        }
    }

    /// The product on AMX tiles. Both operands are packed by [`pack_into`] in groups of 16
    /// lines with `k` padded to whole tiles of 16 pairs, and an even number of groups: each
    /// group of `B` is then a column of tiles (a tile's 16 pair rows of 16 columns, 64 bytes a
    /// row, as `tdpbf16ps` reads its second operand), and each group of `A`, its 16 × 16 blocks
    /// transposed in place, a row of tiles (16 rows of 16 pairs, as it reads its first). Each
    /// task keeps a 32 × 32 block of `C` in four tiles over all of `k`, with two tiles of `A`
    /// and two of `B` loaded per step.
    #[cfg(target_os = "linux")]
    pub(super) mod amx {
        use super::*;
        use std::arch::asm;

        /// Rows and columns of a tile, and pairs of `k` per tile row (64 bytes).
        const T: usize = 16;
        /// u32 in one tile.
        const TILE: usize = T * T;
        /// Blocks of 32 × 32 (2 × 2 tiles) of `C` per task along each side.
        const BLOCKS: usize = 4;

        /// The tile configuration `ldtilecfg` reads (palette 1): tiles 0-3 hold `C`, 4-5 `A`,
        /// 6-7 `B`, each 16 rows of 64 bytes.
        #[repr(C, align(64))]
        struct Config([u8; 64]);

        impl Config {
            fn all_full() -> Self {
                let mut c = [0u8; 64];
                c[0] = 1;
                for t in 0..8 {
                    // Bytes per row (u16, little-endian) at 16 + 2t, rows at 48 + t.
                    c[16 + 2 * t] = (T * 4) as u8;
                    c[48 + t] = T as u8;
                }
                Config(c)
            }
        }

        /// `C [m, n] = A · B` into `c`, every one of its `m · n` values written (so `c` may
        /// point at memory not yet initialised).
        ///
        /// # Safety
        /// AMX is granted ([`amx_ready`]) and `c` is valid for `m · n` writes of f32 that no
        /// other code reads or writes meanwhile.
        pub(in super::super) unsafe fn gemm(
            m: usize,
            n: usize,
            k: usize,
            a: Strided,
            b: Strided,
            c: *mut f32,
            threads: bool,
        ) {
            // SAFETY: the caller's promise, passed on.
            unsafe { gemm_into(m, n, k, a, b, c, threads, false) }
        }

        /// [`gemm`], or with `accumulate` `C += A · B`: each block of C starts from the values
        /// `c` holds (read once into the tiles), not from zeros.
        ///
        /// # Safety
        /// As [`gemm`]'s; with `accumulate` the `m · n` values at `c` are initialised.
        #[allow(clippy::too_many_arguments)]
        pub(in super::super) unsafe fn gemm_into(
            m: usize,
            n: usize,
            k: usize,
            a: Strided,
            b: Strided,
            c: *mut f32,
            threads: bool,
            accumulate: bool,
        ) {
            let parallel = threads && m * n * k >= 64 * 64 * 64;
            let pb = pack_b(b, n, k, parallel);
            // SAFETY: the caller's promise, passed on.
            unsafe { gemm_packed(m, a, &pb, c, threads, accumulate) }
        }

        /// `B` `[k, n]` packed for [`gemm_packed`]: a column of tiles for each 16 columns.
        pub(crate) struct PackedB {
            values: Scratch,
            n: usize,
            k: usize,
        }

        impl PackedB {
            /// The columns and rows of the operand packed.
            pub(in super::super) fn dims(&self) -> (usize, usize) {
                (self.n, self.k)
            }
        }

        /// Packs `B` `[k, n]` once, for products with several `A`s ([`gemm_packed`]).
        pub(in super::super) fn pack_b(b: Strided, n: usize, k: usize, parallel: bool) -> PackedB {
            let shape = Groups {
                width: T,
                pairs: k.div_ceil(2).div_ceil(T) * T,
                count: n.div_ceil(2 * T) * 2,
            };
            PackedB {
                values: pack_into(b, false, n, k, shape, parallel),
                n,
                k,
            }
        }

        /// [`gemm_into`] with `B` packed before ([`pack_b`]).
        ///
        /// # Safety
        /// As [`gemm_into`]'s.
        pub(in super::super) unsafe fn gemm_packed(
            m: usize,
            a: Strided,
            pb: &PackedB,
            c: *mut f32,
            threads: bool,
            accumulate: bool,
        ) {
            let (n, k) = (pb.n, pb.k);
            let kq = k.div_ceil(2).div_ceil(T);
            let parallel = threads && m * n * k >= 64 * 64 * 64;
            let (ga, gb) = (m.div_ceil(2 * T) * 2, n.div_ceil(2 * T) * 2);
            let shape = |count| Groups {
                width: T,
                pairs: kq * T,
                count,
            };
            let pa = if a.cs == 1 {
                pack_rows(a, m, k, ga, kq, parallel)
            } else {
                let mut pa = pack_into(a, true, m, k, shape(ga), parallel);
                // `[pair][row]` blocks of A to `[row][pair]`.
                let turn = |block: &mut [u32]| {
                    // SAFETY: AVX-512 is present (AMX CPUs have it; see `amx_ready`).
                    unsafe { transpose_block(block) }
                };
                if parallel {
                    pa.par_chunks_mut(TILE).for_each(turn);
                } else {
                    pa.chunks_mut(TILE).for_each(turn);
                }
                pa
            };
            let pb = &pb.values;
            let c = SendPtr(c);
            let (row_tasks, col_tasks) = ((ga / 2).div_ceil(BLOCKS), (gb / 2).div_ceil(BLOCKS));
            let run = |t: usize| {
                let (rt, ct) = (t / col_tasks, t % col_tasks);
                let rows = rt * BLOCKS..(ga / 2).min((rt + 1) * BLOCKS);
                let cols = ct * BLOCKS..(gb / 2).min((ct + 1) * BLOCKS);
                // SAFETY: AMX is granted (`amx_ready`); the task writes only its blocks of C
                // (clipped to m × n), disjoint from every other task's; the tile loads read
                // whole tiles of the packed operands, whose sizes follow from ga, gb and kq.
                unsafe { task(kq, &pa, pb, c.get(), m, n, rows, cols, accumulate) };
            };
            let tasks = row_tasks * col_tasks;
            if tasks > 1 && parallel {
                (0..tasks).into_par_iter().for_each(run);
            } else {
                (0..tasks).for_each(run);
            }
        }

        /// `A` whose rows are contiguous along `k`, straight into tiles `[group][block][row]
        /// [pair]`: each row's 32 values of a block rounded to 16 pairs by one conversion (no
        /// transpose, unlike the `[pair][line]` packing of the other operand).
        fn pack_rows(
            a: Strided,
            m: usize,
            k: usize,
            groups: usize,
            kq: usize,
            parallel: bool,
        ) -> Scratch {
            let mut out = Scratch::take(groups * kq * TILE);
            // The rows past m (the last group's, and whole groups past it) are zeros; the
            // loop below writes every tile row of the others.
            for (g, group) in out.chunks_mut(kq * TILE).enumerate() {
                let rows = T.min(m.saturating_sub(g * T));
                if rows < T {
                    for tile in group.chunks_mut(TILE) {
                        tile[rows * T..].fill(0);
                    }
                }
            }
            if m == 0 || k == 0 {
                out.fill(0);
                return out;
            }
            assert!(
                a.offset + (m - 1) * a.rs + k <= a.values.len(),
                "bf16 pack: {m} rows of {k} past the operand's {} values",
                a.values.len()
            );
            let one = |(g, group): (usize, &mut [u32])| {
                for r in 0..T.min(m.saturating_sub(g * T)) {
                    let row = a.offset + (g * T + r) * a.rs;
                    for q in 0..kq {
                        let n = k.saturating_sub(32 * q).min(32);
                        // SAFETY: AVX512-BF16 is present (AMX CPUs have it); the row's `n`
                        // values from 32q lie inside the operand (asserted above), and the
                        // store is row r of tile q of this group.
                        unsafe {
                            let v = pairs_of_32(a.values.as_ptr().add(row + 32 * q), n);
                            _mm512_storeu_si512(group.as_mut_ptr().add(q * TILE + r * T).cast(), v);
                        }
                    }
                }
            };
            if parallel {
                out.par_chunks_mut(kq * TILE).enumerate().for_each(one);
            } else {
                out.chunks_mut(kq * TILE).enumerate().for_each(one);
            }
            out
        }

        /// Transposes one 16 × 16 block of u32 in place.
        #[target_feature(enable = "avx512f")]
        unsafe fn transpose_block(block: &mut [u32]) {
            assert_eq!(block.len(), TILE);
            let mut rows = [_mm512_setzero_si512(); T];
            for (i, row) in rows.iter_mut().enumerate() {
                // SAFETY: row i of the 16 × 16 block is in bounds (asserted).
                *row = unsafe { _mm512_loadu_si512(block.as_ptr().add(i * T).cast()) };
            }
            transpose16(&mut rows);
            for (i, row) in rows.iter().enumerate() {
                // SAFETY: as above.
                unsafe { _mm512_storeu_si512(block.as_mut_ptr().add(i * T).cast(), *row) };
            }
        }

        /// Blocks `rows` × `cols` (in 32 × 32 blocks) of C: its own tile configuration, as
        /// the thread that runs it may not have one, released at the end. With `accumulate`
        /// each block's tiles start from C's values, else from zeros.
        #[allow(clippy::too_many_arguments)]
        unsafe fn task(
            kq: usize,
            pa: &[u32],
            pb: &[u32],
            c: *mut f32,
            m: usize,
            n: usize,
            rows: std::ops::Range<usize>,
            cols: std::ops::Range<usize>,
            accumulate: bool,
        ) {
            let config = Config::all_full();
            let group = kq * TILE;
            let stride = T * 4;
            let mut spill = [0f32; TILE];
            // SAFETY (whole body): AMX is granted; every tile load reads one whole tile inside
            // the packed buffers (group index < ga or gb, block < kq); full tiles of C are
            // stored in place (rows and columns inside m × n), edge tiles through `spill`.
            unsafe {
                asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly));
                for cb in cols {
                    for rb in rows.clone() {
                        let a0 = pa.as_ptr().add(2 * rb * group);
                        let b0 = pb.as_ptr().add(2 * cb * group);
                        if accumulate {
                            // Tile t of the block from C: in place where whole, else through
                            // `spill` (zeros past C's edges, which no store writes back).
                            for t in 0..4 {
                                let (r0, c0) = ((2 * rb + t / 2) * T, (2 * cb + t % 2) * T);
                                let full = r0 + T <= m && c0 + T <= n;
                                let (at, s) = if full {
                                    (c.add(r0 * n + c0).cast_const(), n * 4)
                                } else {
                                    spill.fill(0.0);
                                    // A tile wholly past C's edges (n or m not a whole block)
                                    // stays zeros: no pointer into C is formed for it.
                                    let (h, w) = if r0 < m && c0 < n {
                                        (T.min(m - r0), T.min(n - c0))
                                    } else {
                                        (0, 0)
                                    };
                                    for r in 0..h {
                                        std::ptr::copy_nonoverlapping(
                                            c.add((r0 + r) * n + c0),
                                            spill.as_mut_ptr().add(r * T),
                                            w,
                                        );
                                    }
                                    (spill.as_ptr(), stride)
                                };
                                match t {
                                    0 => {
                                        asm!("tileloadd tmm0, [{p} + {s}]", p = in(reg) at, s = in(reg) s, options(nostack, readonly))
                                    }
                                    1 => {
                                        asm!("tileloadd tmm1, [{p} + {s}]", p = in(reg) at, s = in(reg) s, options(nostack, readonly))
                                    }
                                    2 => {
                                        asm!("tileloadd tmm2, [{p} + {s}]", p = in(reg) at, s = in(reg) s, options(nostack, readonly))
                                    }
                                    _ => {
                                        asm!("tileloadd tmm3, [{p} + {s}]", p = in(reg) at, s = in(reg) s, options(nostack, readonly))
                                    }
                                }
                            }
                        } else {
                            asm!(
                                "tilezero tmm0",
                                "tilezero tmm1",
                                "tilezero tmm2",
                                "tilezero tmm3",
                                options(nostack, nomem)
                            );
                        }
                        for q in 0..kq {
                            asm!(
                                "tileloadd tmm4, [{a0} + {s}]",
                                "tileloadd tmm5, [{a1} + {s}]",
                                "tileloadd tmm6, [{b0} + {s}]",
                                "tileloadd tmm7, [{b1} + {s}]",
                                "tdpbf16ps tmm0, tmm4, tmm6",
                                "tdpbf16ps tmm1, tmm4, tmm7",
                                "tdpbf16ps tmm2, tmm5, tmm6",
                                "tdpbf16ps tmm3, tmm5, tmm7",
                                a0 = in(reg) a0.add(q * TILE),
                                a1 = in(reg) a0.add(group + q * TILE),
                                b0 = in(reg) b0.add(q * TILE),
                                b1 = in(reg) b0.add(group + q * TILE),
                                s = in(reg) stride,
                                options(nostack, readonly)
                            );
                        }
                        // Tile t of the block: rows (t / 2), columns (t % 2), in tiles.
                        for t in 0..4 {
                            let (r0, c0) = ((2 * rb + t / 2) * T, (2 * cb + t % 2) * T);
                            if r0 >= m || c0 >= n {
                                continue;
                            }
                            let full = r0 + T <= m && c0 + T <= n;
                            let (at, s) = if full {
                                (c.add(r0 * n + c0), n * 4)
                            } else {
                                (spill.as_mut_ptr(), stride)
                            };
                            match t {
                                0 => {
                                    asm!("tilestored [{p} + {s}], tmm0", p = in(reg) at, s = in(reg) s, options(nostack))
                                }
                                1 => {
                                    asm!("tilestored [{p} + {s}], tmm1", p = in(reg) at, s = in(reg) s, options(nostack))
                                }
                                2 => {
                                    asm!("tilestored [{p} + {s}], tmm2", p = in(reg) at, s = in(reg) s, options(nostack))
                                }
                                _ => {
                                    asm!("tilestored [{p} + {s}], tmm3", p = in(reg) at, s = in(reg) s, options(nostack))
                                }
                            }
                            if !full {
                                for r in 0..T.min(m - r0) {
                                    let w = T.min(n - c0);
                                    std::ptr::copy_nonoverlapping(
                                        spill.as_ptr().add(r * T),
                                        c.add((r0 + r) * n + c0),
                                        w,
                                    );
                                }
                            }
                        }
                    }
                }
                asm!("tilerelease", options(nostack, nomem));
            }
        }
    }

    /// One task: rows × cols of C, all of k, block by block.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block(
        kp: usize,
        pa: &[u32],
        pb: &[u32],
        c: *mut f32,
        ldc: usize,
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
        accumulate: bool,
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
                            accumulate || p0 > 0,
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
            let mut want = vec![0f32; m * n];
            emulate(m, n, k, a, b, &mut want);
            for kernel in kernels() {
                let mut got = vec![f32::NAN; m * n];
                gemm_by(kernel, m, n, k, a, b, &mut got, true, false);
                if kernel == Kernel::Avx512Bf16 {
                    assert_eq!(got, want, "transposed {ta}");
                } else {
                    assert_close(&got, &want, m, n, k, a, b, &format!("{kernel:?}"));
                }
                assert!(
                    got[..n].iter().all(|&v| v == 0.0),
                    "{kernel:?} transposed {ta}"
                );
                assert!(
                    got[n..].iter().any(|&v| v != 0.0),
                    "{kernel:?} transposed {ta}"
                );
            }
        }
    }

    /// The vector kernels this CPU has: AVX512-BF16, and AMX where it is granted.
    fn kernels() -> Vec<Kernel> {
        let mut all = vec![Kernel::Avx512Bf16];
        if amx_ready() {
            all.push(Kernel::Amx);
        }
        all
    }

    /// `got` equals `want` (both sums of the same bf16 products, added in different orders)
    /// within f32 accumulation error: k roundings of 2⁻²⁴ of the running sum's magnitude,
    /// bounded by Σ|a·b| over the bf16 operands.
    #[allow(clippy::too_many_arguments)]
    fn assert_close(
        got: &[f32],
        want: &[f32],
        m: usize,
        n: usize,
        k: usize,
        a: Strided,
        b: Strided,
        what: &str,
    ) {
        let bf = |v: f32| from_bf16_daz(to_bf16(v)) as f64;
        for i in 0..m {
            for j in 0..n {
                let magnitude: f64 = (0..k)
                    .map(|p| (bf(a.at(i, p)) * bf(b.at(p, j))).abs())
                    .sum();
                let bound = 2.0 * (k as f64 + 1.0) * 2f64.powi(-24) * magnitude;
                let (g, w) = (got[i * n + j], want[i * n + j]);
                assert!(
                    ((g - w) as f64).abs() <= bound,
                    "{what} {m}×{n}×{k} [{i}, {j}]: {g} vs {w} (bound {bound})"
                );
            }
        }
    }

    /// The AMX tiles compute the emulation's sums up to f32 rounding, through both operand
    /// layouts, on every edge shape (partial tiles, k not a whole tile, several tasks), and
    /// the answer is not a copy of the exact one (a wrong layout would be far off). Skipped
    /// (and says so) where AMX is not granted.
    #[test]
    fn amx_tiles_equal_the_emulation_within_f32_rounding() {
        if !amx_ready() {
            eprintln!("skipped: this CPU has no AMX (or WHET_AMX=off)");
            return;
        }
        let mut identical = 0;
        let mut total = 0;
        for (m, n, k) in SHAPES
            .into_iter()
            .chain([(64, 64, 64), (33, 65, 40), (200, 90, 300)])
        {
            let (av, bv) = (values(m * k, 7), values(k * n, 8));
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let (a, b) = (operand(&av, m, k, ta), operand(&bv, k, n, tb));
                let mut want = vec![0f32; m * n];
                emulate(m, n, k, a, b, &mut want);
                for threads in [true, false] {
                    let mut got = vec![f32::NAN; m * n];
                    gemm_by(Kernel::Amx, m, n, k, a, b, &mut got, threads, false);
                    let what = format!("AMX (transposed {ta}, {tb}, threads {threads})");
                    assert_close(&got, &want, m, n, k, a, b, &what);
                    identical += got.iter().zip(&want).filter(|(g, w)| g == w).count();
                    total += got.len();
                }
            }
        }
        eprintln!("AMX: {identical} of {total} elements equal the emulation's bit for bit");
    }

    /// With `accumulate`, every kernel adds the product to what the output holds (the AMX
    /// tiles load it, through a spill buffer at the edges; the vector kernel starts its
    /// registers from it; the emulation its sums): `c + a · b` within f32 rounding of both, on
    /// edge shapes, both operand layouts and one thread or all; and the values held count (a
    /// kernel that overwrote them would be off by them, far beyond the bound).
    #[test]
    fn accumulated_products_add_to_what_the_output_holds() {
        let mut all = kernels();
        if !available() {
            all.clear();
            eprintln!("only the emulation: this CPU has no AVX512-BF16");
        }
        all.push(Kernel::Emulated);
        for (m, n, k) in [
            (1, 1, 1),
            (17, 33, 5),
            (33, 65, 40),
            (64, 64, 64),
            (200, 90, 300),
        ] {
            let (av, bv, held) = (values(m * k, 11), values(k * n, 12), values(m * n, 13));
            for (ta, tb) in [(false, false), (true, true)] {
                let (a, b) = (operand(&av, m, k, ta), operand(&bv, k, n, tb));
                let mut product = vec![0f32; m * n];
                emulate(m, n, k, a, b, &mut product);
                let bf = |v: f32| from_bf16_daz(to_bf16(v)) as f64;
                for &kernel in &all {
                    for threads in [true, false] {
                        let mut got = held.clone();
                        gemm_by(kernel, m, n, k, a, b, &mut got, threads, true);
                        for i in 0..m {
                            for j in 0..n {
                                let at = i * n + j;
                                let magnitude: f64 = (0..k)
                                    .map(|p| (bf(a.at(i, p)) * bf(b.at(p, j))).abs())
                                    .sum::<f64>()
                                    + (held[at] as f64).abs();
                                let bound = 2.0 * (k as f64 + 2.0) * 2f64.powi(-24) * magnitude;
                                let want = held[at] as f64 + product[at] as f64;
                                assert!(
                                    (got[at] as f64 - want).abs() <= bound,
                                    "{kernel:?} {m}×{n}×{k} [{i}, {j}] transposed {ta}, \
                                     threads {threads}: {} vs {want} (bound {bound})",
                                    got[at]
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// `products` (the buffer the tiles fill without zeroing it first on AMX) holds each
    /// batch's product where `gemm` would put it, for one product over all threads and for
    /// several one a thread, on edge shapes; run after larger products, so that a value left
    /// unwritten would show the allocator's or the packing pool's old contents.
    #[test]
    fn products_fill_every_value_of_their_new_buffer() {
        let (ones, twos) = (vec![1.0; 200 * 300], vec![2.0; 300 * 90]);
        let big = products(
            2,
            200,
            90,
            300,
            |_| operand(&ones, 200, 300, false),
            |_| operand(&twos, 300, 90, false),
        );
        assert!(big.iter().all(|&v| v == 600.0));
        drop(big);
        for (batches, m, n, k) in [(1, 33, 65, 40), (3, 17, 9, 5), (2, 64, 33, 31)] {
            let (av, bv) = (values(batches * m * k, 3), values(batches * k * n, 4));
            let a = |i: usize| operand(&av[i * m * k..(i + 1) * m * k], m, k, false);
            let b = |i: usize| operand(&bv[i * k * n..(i + 1) * k * n], k, n, true);
            let got = products(batches, m, n, k, a, b);
            assert_eq!(got.len(), batches * m * n);
            for i in 0..batches {
                let mut want = vec![0f32; m * n];
                emulate(m, n, k, a(i), b(i), &mut want);
                let what = format!("products, batch {i} of {batches}");
                assert_close(
                    &got[i * m * n..(i + 1) * m * n],
                    &want,
                    m,
                    n,
                    k,
                    a(i),
                    b(i),
                    &what,
                );
            }
        }
    }

    /// The AVX512-BF16 kernel computes exactly what the scalar emulation does, through both
    /// operand layouts, on every edge shape. Skipped (and says so) on a CPU without AVX512-BF16.
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
                gemm_by(Kernel::Avx512Bf16, m, n, k, a, b, &mut got, true, false);
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

    /// Against the f64 product of the unrounded operands, every element of the best kernel's
    /// product (AMX where granted) is within bf16's rounding of both operands (bf16's unit roundoff is 2⁻⁸: 2·2⁻⁸ of Σ|a||b|, plus f32
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
