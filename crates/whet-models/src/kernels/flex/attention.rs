//! Attention that keeps no probabilities for its backward pass: the CPU kernel of
//! [`crate::kernels::attention`].
//!
//! The forward pass computes `dropout(softmax(q·kᵀ·scale + bias))·v` a block of query rows at a
//! time and keeps only its inputs; the backward pass computes each block's probabilities again
//! from q and k (the recomputation of FlashAttention, Dao et al. 2022, which PyTorch's CPU
//! `scaled_dot_product_attention` does too). Why: the probabilities are `[B, H, Tq, Tk]` per
//! layer, kept from the forward pass to the backward pass: for SmolLM2 on 4 × 256 tokens 9.4 MB
//! a layer, 283 MB over its 30 layers, more than any other activation. Here the only `T²`-sized
//! memory is one block of scores per thread. Grouped key / value heads are read in place (no
//! expanded copy of k and v), and a block skips the keys that a mask hides from all its rows
//! (the upper triangle of a causal mask), which the unfused products compute and discard.

use super::{DropMask, FlexTensor, dropout_slice, gemm_into, values};
use crate::kernels::bf16::{self, Strided};
use crate::layers::MASK_VALUE;
use burn::backend::TensorMetadata;
use burn::tensor::TensorData;
use rayon::prelude::*;

/// Query rows per block: a block's scores are `ROWS × Tk` floats (64 KiB at 256 keys).
const ROWS: usize = 64;

/// The sizes of one attention call.
#[derive(Debug, Clone, Copy)]
struct Dims {
    heads: usize,
    kv_heads: usize,
    tq: usize,
    tk: usize,
    hd: usize,
}

impl Dims {
    fn of(q: &FlexTensor, k: &FlexTensor) -> Self {
        let (qd, kd) = (q.layout().shape(), k.layout().shape());
        Self {
            heads: qd[1],
            kv_heads: kd[1],
            tq: qd[2],
            tk: kd[2],
            hd: qd[3],
        }
    }

    /// Query heads per key / value head.
    fn group(&self) -> usize {
        self.heads / self.kv_heads.max(1)
    }
}

/// A `[B, H, T, hd]` tensor read in place through its strides, its last dimension contiguous:
/// element `(b, h, t, e)` is `values[offset + b·sb + h·sh + t·st + e]`. The heads that
/// `split_heads` makes are such views of the projections' `[B, T, H·hd]` output, and their
/// gradients arrive as such views too; a dense copy of each took 5% of a MiniLM bf16 step's
/// profile.
#[derive(Clone, Copy)]
pub(super) struct Heads<'a> {
    values: &'a [f32],
    offset: usize,
    sb: usize,
    sh: usize,
    st: usize,
}

impl<'a> Heads<'a> {
    /// The view of `t` (f32), or `None` where its last stride is not 1 or a stride is negative.
    pub(super) fn of(t: &'a FlexTensor) -> Option<Self> {
        let layout = t.layout();
        let strides = layout.strides();
        if t.dtype() != burn::tensor::DType::F32 || strides.len() != 4 {
            return None;
        }
        let shape = t.shape();
        // A dimension of size 1 may carry any stride; its index is always 0.
        let stride = |i: usize| {
            if shape[i] == 1 {
                Some(0)
            } else {
                usize::try_from(strides[i]).ok()
            }
        };
        if shape[3] > 1 && strides[3] != 1 {
            return None;
        }
        Some(Self {
            values: t.storage::<f32>(),
            offset: layout.start_offset(),
            sb: stride(0)?,
            sh: stride(1)?,
            st: stride(2)?,
        })
    }

    /// The view of a tensor that [`readable_in_place`] returned.
    fn expect(t: &'a FlexTensor) -> Self {
        match Self::of(t) {
            Some(heads) => heads,
            None => panic!("attention: an operand not made readable in place (readable_in_place)"),
        }
    }

    /// Head `h` of batch row `b` from its row `t` on, rows `st` apart.
    fn rows(&self, b: usize, h: usize, t: usize) -> &'a [f32] {
        &self.values[self.offset + b * self.sb + h * self.sh + t * self.st..]
    }
}

/// `t` as the kernels read it: itself where [`Heads::of`] can read it, else `dense`'s f32
/// copy with the contiguous layout.
pub(super) fn readable_in_place(t: FlexTensor) -> FlexTensor {
    if Heads::of(&t).is_some() {
        t
    } else {
        super::dense(t)
    }
}

/// Where a product writes its `m × n` result: row `r` from `ptr + r·rs`.
#[derive(Clone, Copy)]
struct Rows {
    ptr: *mut f32,
    rs: usize,
}

impl Rows {
    /// A dense block of rows `width` values long (the scratch blocks of scores).
    fn dense(block: &mut [f32], width: usize) -> Self {
        Self {
            ptr: block.as_mut_ptr(),
            rs: width,
        }
    }
}

/// The kernel's outputs (the output; dq, dk, dv) are written in `[B, T, H, hd]` order and
/// handed on as `[B, H, T, hd]` views of it ([`heads_tensor`]): the model merges the heads by
/// `swap_dims(1, 2)` and a reshape to `[B, T, H·hd]` (`merge_heads`, and the backward pass of
/// `split_heads`), which is then a view too, where a `[B, H, T, hd]` buffer needed a copy (2.8%
/// of a MiniLM bf16 step's profile). Each rayon task writes the rows of its own heads, `H·hd`
/// apart.
#[derive(Clone, Copy)]
struct HeadsOut {
    ptr: *mut f32,
    t: usize,
    heads: usize,
    hd: usize,
}

// SAFETY: the tasks that share a `HeadsOut` write the rows of disjoint sets of heads (one
// batch row's head, or one key / value head's group), see `forward` and `backward`.
unsafe impl Send for HeadsOut {}
unsafe impl Sync for HeadsOut {}

impl HeadsOut {
    /// `buf` holds `[B, t, heads, hd]`.
    fn new(buf: &mut [f32], t: usize, heads: usize, hd: usize) -> Self {
        Self {
            ptr: buf.as_mut_ptr(),
            t,
            heads,
            hd,
        }
    }

    /// Head `h` of batch row `b` from its row `t` on.
    fn rows(self, b: usize, h: usize, t: usize) -> Rows {
        Rows {
            ptr: self
                .ptr
                .wrapping_add(((b * self.t + t) * self.heads + h) * self.hd),
            rs: self.heads * self.hd,
        }
    }
}

/// A `[B, T, H, hd]` buffer as the `[B, H, T, hd]` tensor `[b, h, t, hd]` (a view, see
/// [`HeadsOut`]).
fn heads_tensor(values: Vec<f32>, [b, h, t, hd]: [usize; 4]) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, [b, t, h, hd])).transpose(1, 2)
}

/// The keys a block of query rows attends to, `0..end`: every key from `end` on is masked for
/// every row of the block, so its probability is 0 (e^-87 against at least one unmasked key's
/// e^0, below f32's resolution of the sum). A row whose keys are all masked attends to all of
/// them alike (its softmax is uniform, as in the unfused path), so it keeps every key.
fn visible_keys(bias: &[f32], d: &Dims, b: usize, rows: std::ops::Range<usize>) -> usize {
    let mut end = 0;
    for i in rows {
        let row = &bias[(b * d.tq + i) * d.tk..][..d.tk];
        match row.iter().rposition(|&x| x > MASK_VALUE) {
            Some(j) => end = end.max(j + 1),
            None => return d.tk,
        }
    }
    end
}

/// The probabilities of query rows `i0..i0 + rows` of head `bh` (= b · H + h) over keys
/// `0..keys`, before dropout, into `p` (`rows × keys`, row-major): `softmax(q·kᵀ·scale + bias)`.
#[allow(clippy::too_many_arguments)]
fn probs_block(
    bf16: bool,
    q: &Heads,
    (k, k_st): (&[f32], usize),
    bias: &[f32],
    scale: f32,
    d: &Dims,
    bh: usize,
    i0: usize,
    rows: usize,
    keys: usize,
    p: &mut [f32],
) {
    let (b, h) = (bh / d.heads, bh % d.heads);
    assert!(p.len() >= rows * keys);
    // (rows, hd) x (hd, keys) -> (rows, keys); kᵀ read through its strides
    // SAFETY: p holds the rows × keys block (asserted), borrowed exclusively.
    unsafe {
        product(
            bf16,
            rows,
            keys,
            d.hd,
            q.rows(b, h, i0),
            (q.st, 1),
            k,
            (1, k_st),
            Rows::dense(p, keys),
            false,
        )
    };
    for (r, row) in p.chunks_mut(keys).enumerate() {
        let bias_row = &bias[(b * d.tq + i0 + r) * d.tk..][..keys];
        scale_bias_softmax(row, bias_row, scale);
    }
}

/// One of the kernel's products on the calling thread: `dst (+)= lhs · rhs` with f32 operands
/// ([`gemm_into`]), or with `bf16` the operands rounded to bf16 and summed in f32 by
/// [`bf16::gemm_in_one_thread`], as autocast runs attention's two products. Only where the CPU
/// has AMX tiles (see [`bf16_products`]).
///
/// # Safety
/// `dst` is valid for reads and writes of `m` rows of `n` values, and no other thread reads or
/// writes them meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn product(
    bf16: bool,
    m: usize,
    n: usize,
    k: usize,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
    dst: Rows,
    accumulate: bool,
) {
    if !bf16 {
        // SAFETY: dst's rows are the caller's promise.
        return unsafe {
            gemm_into(
                m,
                n,
                k,
                lhs,
                (lhs_rs, lhs_cs),
                rhs,
                (rhs_rs, rhs_cs),
                (dst.ptr, dst.rs),
                accumulate,
                false,
            )
        };
    }
    if m == 0 || n == 0 {
        return;
    }
    let a = Strided {
        values: lhs,
        offset: 0,
        rs: lhs_rs,
        cs: lhs_cs,
    };
    let b = Strided {
        values: rhs,
        offset: 0,
        rs: rhs_rs,
        cs: rhs_cs,
    };
    if !accumulate && dst.rs == n {
        // SAFETY: m rows of n values n apart are one run of m · n values (the caller's
        // promise), not aliased meanwhile.
        let out = unsafe { std::slice::from_raw_parts_mut(dst.ptr, m * n) };
        return bf16::gemm_in_one_thread(m, n, k, a, b, out);
    }
    let mut sum = vec![0f32; m * n];
    bf16::gemm_in_one_thread(m, n, k, a, b, &mut sum);
    for (r, row) in sum.chunks(n).enumerate() {
        // SAFETY: row r of dst (the caller's promise).
        let out = unsafe { std::slice::from_raw_parts_mut(dst.ptr.add(r * dst.rs), n) };
        if accumulate {
            for (d, s) in out.iter_mut().zip(row) {
                *d += s;
            }
        } else {
            out.copy_from_slice(row);
        }
    }
}

/// Whether the kernel's products run in bf16: under bf16 compute on this thread, on a CPU with
/// AMX, for heads of 64 values or more. `time_attention` on a 2-core Xeon with AMX: SmolLM2's
/// shape (4 rows, 9 / 3 heads of 64, 256 tokens, causal) took 6.8-7.8 ms a step with the tiles
/// and 9.1-9.5 ms with f32 products (the 93 ms first measured for f32 came from subnormal
/// probabilities on the harness's threads, see `flush_subnormal`); MiniLM's (16 rows, 12
/// heads of 32, 50 tokens) 3.9-4.2 ms with the tiles and 3.4 ms in f32 (a product over 32
/// values is one tile step, the packing costs more than it saves). With only AVX512-BF16 the
/// products stay f32, which ran faster than bf16 products there.
pub(super) fn bf16_products(head_dim: usize) -> bool {
    head_dim >= 64
        && crate::precision::compute() == Some(burn::tensor::FloatDType::BF16)
        && bf16::amx_ready()
}

multiversion!(scale_bias_softmax(row: &mut [f32], bias: &[f32], scale: f32) {
    for (s, &b) in row.iter_mut().zip(bias) {
        *s = *s * scale + b;
    }
    super::softmax_in_place(row);
});

/// The first element index of query row `i` of head `bh` in `[B, H, Tq, Tk]`: where the
/// unfused kernel's dropout mask starts that row, so both drop the same elements for a seed.
fn mask_base(d: &Dims, bh: usize, i: usize) -> u32 {
    ((bh * d.tq + i) * d.tk) as u32
}

/// `dropout(softmax(q·kᵀ·scale + bias))·v`.
///
/// # Shapes
/// - q `[B, H, Tq, hd]`, k and v `[B, KV, Tk, hd]` (H a multiple of KV), each read through
///   its strides ([`Heads`])
/// - bias `[B, 1, Tq, Tk]` dense
/// - output `[B, H, Tq, hd]`, a view of `[B, Tq, H, hd]` ([`HeadsOut`])
pub(super) fn forward(
    q: &FlexTensor,
    k: &FlexTensor,
    v: &FlexTensor,
    bias: &FlexTensor,
    scale: f32,
    mask: &DropMask,
    bf16: bool,
) -> FlexTensor {
    let [qs, ks, vs] = [q, k, v].map(Heads::expect);
    let d = Dims::of(q, k);
    let bs = values(bias);
    let batch = q.shape()[0];
    let mut out = vec![0f32; batch * d.tq * d.heads * d.hd];
    let dst = HeadsOut::new(&mut out, d.tq, d.heads, d.hd);
    (0..batch * d.heads).into_par_iter().for_each(|bh| {
        let (b, h) = (bh / d.heads, bh % d.heads);
        let kvh = h / d.group();
        let (k, v) = (ks.rows(b, kvh, 0), vs.rows(b, kvh, 0));
        let mut p = vec![0f32; ROWS.min(d.tq) * d.tk];
        for i0 in (0..d.tq).step_by(ROWS) {
            let rows = ROWS.min(d.tq - i0);
            let keys = visible_keys(bs, &d, b, i0..i0 + rows);
            let p = &mut p[..rows * keys];
            probs_block(bf16, &qs, (k, ks.st), bs, scale, &d, bh, i0, rows, keys, p);
            if !mask.keeps_all() {
                for (r, row) in p.chunks_mut(keys).enumerate() {
                    dropout_in_place(row, mask, mask_base(&d, bh, i0 + r));
                }
            }
            // (rows, keys) x (keys, hd) -> (rows, hd)
            // SAFETY: rows i0.. of head bh lie inside `out`, written by this task alone.
            unsafe {
                product(
                    bf16,
                    rows,
                    d.hd,
                    keys,
                    p,
                    (keys, 1),
                    v,
                    (vs.st, 1),
                    dst.rows(b, h, i0),
                    false,
                )
            };
        }
    });
    heads_tensor(out, [batch, d.heads, d.tq, d.hd])
}

fn dropout_in_place(row: &mut [f32], mask: &DropMask, base: u32) {
    for (j, x) in row.iter_mut().enumerate() {
        *x *= mask.factor(base.wrapping_add(j as u32));
    }
}

/// `(dq, dk, dv)` of [`forward`] for the output gradient `dout` (`[B, H, Tq, hd]`).
///
/// One rayon task per key / value head of a batch row, looping over the query heads of its
/// group, so each task owns its dk and dv rows and sums into them without locks.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    [q, k, v]: [&FlexTensor; 3],
    bias: &FlexTensor,
    dout: &FlexTensor,
    scale: f32,
    mask: &DropMask,
    bf16: bool,
) -> (FlexTensor, FlexTensor, FlexTensor) {
    let [qs, ks, vs, dos] = [q, k, v, dout].map(Heads::expect);
    let d = Dims::of(q, k);
    let bs = values(bias);
    let batch = q.shape()[0];
    let mut dq = vec![0f32; batch * d.tq * d.heads * d.hd];
    let mut dk = vec![0f32; batch * d.tk * d.kv_heads * d.hd];
    let mut dv = vec![0f32; batch * d.tk * d.kv_heads * d.hd];
    let dq_out = HeadsOut::new(&mut dq, d.tq, d.heads, d.hd);
    let (dk_out, dv_out) = (
        HeadsOut::new(&mut dk, d.tk, d.kv_heads, d.hd),
        HeadsOut::new(&mut dv, d.tk, d.kv_heads, d.hd),
    );
    // Task kvh writes the rows of key / value head kvh of dk and dv, and of its group's query
    // heads of dq: disjoint from every other task's.
    (0..batch * d.kv_heads).into_par_iter().for_each(|kvh| {
        let (b, kh) = (kvh / d.kv_heads, kvh % d.kv_heads);
        let (k, v) = (ks.rows(b, kh, 0), vs.rows(b, kh, 0));
        let (dk, dv) = (dk_out.rows(b, kh, 0), dv_out.rows(b, kh, 0));
        let block = ROWS.min(d.tq) * d.tk;
        let (mut p, mut dp, mut ds) = (vec![0f32; block], vec![0f32; block], vec![0f32; block]);
        for g in 0..d.group() {
            let bh = kvh * d.group() + g;
            let h = bh % d.heads;
            for i0 in (0..d.tq).step_by(ROWS) {
                let rows = ROWS.min(d.tq - i0);
                let keys = visible_keys(bs, &d, b, i0..i0 + rows);
                let n = rows * keys;
                let (p, dp, ds) = (&mut p[..n], &mut dp[..n], &mut ds[..n]);
                let (q_block, do_block) = (qs.rows(b, h, i0), dos.rows(b, h, i0));
                probs_block(bf16, &qs, (k, ks.st), bs, scale, &d, bh, i0, rows, keys, p);
                // d(dropped probs) = dout · vᵀ: (rows, hd) x (hd, keys) -> (rows, keys)
                // SAFETY (this and the products below): dp and ds are this task's
                // scratch of rows × keys; dv, dk and head h of dq are its own rows.
                unsafe {
                    product(
                        bf16,
                        rows,
                        keys,
                        d.hd,
                        do_block,
                        (dos.st, 1),
                        v,
                        (1, vs.st),
                        Rows::dense(dp, keys),
                        false,
                    )
                };
                // dv += (dropped probs)ᵀ · dout: (keys, rows) x (rows, hd) -> (keys, hd)
                let dropped: &[f32] = if mask.keeps_all() {
                    p
                } else {
                    for (r, (x, y)) in p.chunks(keys).zip(ds.chunks_mut(keys)).enumerate() {
                        dropout_slice(x, mask, mask_base(&d, bh, i0 + r), y);
                    }
                    ds
                };
                unsafe {
                    product(
                        bf16,
                        keys,
                        d.hd,
                        rows,
                        dropped,
                        (1, keys),
                        do_block,
                        (dos.st, 1),
                        dv,
                        true,
                    )
                };
                // d(scores) = scale · P ⊙ (dP − Σ dP ⊙ P), dP the dropout of d(dropped probs)
                for (r, ((p, dp), ds)) in p
                    .chunks(keys)
                    .zip(dp.chunks(keys))
                    .zip(ds.chunks_mut(keys))
                    .enumerate()
                {
                    super::softmax_backward_row(p, dp, scale, mask, mask_base(&d, bh, i0 + r), ds);
                }
                // dq = d(scores) · k: (rows, keys) x (keys, hd) -> (rows, hd)
                unsafe {
                    product(
                        bf16,
                        rows,
                        d.hd,
                        keys,
                        ds,
                        (keys, 1),
                        k,
                        (ks.st, 1),
                        dq_out.rows(b, h, i0),
                        false,
                    )
                };
                // dk += d(scores)ᵀ · q: (keys, rows) x (rows, hd) -> (keys, hd)
                unsafe {
                    product(
                        bf16,
                        keys,
                        d.hd,
                        rows,
                        ds,
                        (1, keys),
                        q_block,
                        (qs.st, 1),
                        dk,
                        true,
                    )
                };
            }
        }
    });
    // dv has k's shape (v's).
    (
        heads_tensor(dq, [batch, d.heads, d.tq, d.hd]),
        heads_tensor(dk, [batch, d.kv_heads, d.tk, d.hd]),
        heads_tensor(dv, [batch, d.kv_heads, d.tk, d.hd]),
    )
}
