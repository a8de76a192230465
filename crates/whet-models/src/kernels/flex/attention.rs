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
use crate::kernels::Segments;
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
    batch: usize,
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
            batch: qd[0],
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

/// One sequence of an attention call: its queries are rows `t0..t0 + tq` of batch row `b` of q
/// (and of the output), its keys rows `t0..t0 + tk` of k and v. A padded batch has one a batch
/// row, from row 0; a padding-free one ([`Segments`]) one an example, all in batch row 0.
#[derive(Debug, Clone, Copy)]
struct Seq {
    b: usize,
    t0: usize,
    tq: usize,
    tk: usize,
    /// Where the bias of query 0, key 0 is, and how far apart the bias rows of its queries lie.
    bias_at: usize,
    bias_rs: usize,
    /// Its row and first column in the padded batch, and that batch's `[Tq, Tk]`: the dropout
    /// mask is indexed as the padded `[B, H, Tq, Tk]` probabilities are, so a seed drops the
    /// same elements with and without the padding.
    row: usize,
    col: usize,
    padded: (usize, usize),
}

impl Seq {
    /// The sequences of a call: every batch row (bias `[B, 1, Tq, Tk]`), or every example of
    /// `segments` (bias `[rows, 1, cols, cols]`).
    fn all(d: &Dims, bias: &FlexTensor, segments: Option<&Segments>) -> Vec<Seq> {
        let bias_dims = bias.layout().shape().to_vec();
        let Some(s) = segments else {
            assert_eq!(bias_dims, [d.batch, 1, d.tq, d.tk], "attention: bias shape");
            return (0..d.batch)
                .map(|b| Seq {
                    b,
                    t0: 0,
                    tq: d.tq,
                    tk: d.tk,
                    bias_at: b * d.tq * d.tk,
                    bias_rs: d.tk,
                    row: b,
                    col: 0,
                    padded: (d.tq, d.tk),
                })
                .collect();
        };
        assert_eq!(
            bias_dims,
            [s.rows, 1, s.cols, s.cols],
            "attention: bias shape"
        );
        assert!(
            d.batch == 1 && d.tq == d.tk,
            "attention: a padding-free batch is one row of tokens"
        );
        s.list
            .iter()
            .map(|g| {
                assert!(
                    g.start + g.len <= d.tq && g.row < s.rows && g.col + g.len <= s.cols,
                    "attention: segment {g:?} outside {} tokens, [{}, {}] padded",
                    d.tq,
                    s.rows,
                    s.cols
                );
                Seq {
                    b: 0,
                    t0: g.start,
                    tq: g.len,
                    tk: g.len,
                    bias_at: (g.row * s.cols + g.col) * s.cols + g.col,
                    bias_rs: s.cols,
                    row: g.row,
                    col: g.col,
                    padded: (s.cols, s.cols),
                }
            })
            .collect()
    }

    /// The bias of query `i` over the sequence's keys.
    fn bias_row<'a>(&self, bias: &'a [f32], i: usize) -> &'a [f32] {
        &bias[self.bias_at + i * self.bias_rs..][..self.tk]
    }

    /// The first element index of query `i` of head `h` in the padded `[B, H, Tq, Tk]`
    /// probabilities: where the unfused kernel's dropout mask starts that row, so both drop
    /// the same elements for a seed.
    fn mask_base(&self, heads: usize, h: usize, i: usize) -> u32 {
        let (tq, tk) = self.padded;
        (((self.row * heads + h) * tq + self.col + i) * tk + self.col) as u32
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
fn visible_keys(bias: &[f32], seq: &Seq, rows: std::ops::Range<usize>) -> usize {
    let mut end = 0;
    for i in rows {
        match seq.bias_row(bias, i).iter().rposition(|&x| x > MASK_VALUE) {
            Some(j) => end = end.max(j + 1),
            None => return seq.tk,
        }
    }
    end
}

/// The probabilities of query rows `i0..i0 + rows` of head `h` of `seq` over its keys
/// `0..keys` (`k` from the sequence's first key on), before dropout, into `p` (`rows × keys`,
/// row-major): `softmax(q·kᵀ·scale + bias)`.
#[allow(clippy::too_many_arguments)]
fn probs_block(
    bf16: bool,
    q: &Heads,
    (k, k_st): (&[f32], usize),
    bias: &[f32],
    scale: f32,
    (d, seq): (&Dims, &Seq),
    h: usize,
    i0: usize,
    rows: usize,
    keys: usize,
    p: &mut [f32],
) {
    assert!(p.len() >= rows * keys);
    // (rows, hd) x (hd, keys) -> (rows, keys); kᵀ read through its strides
    // SAFETY: p holds the rows × keys block (asserted), borrowed exclusively.
    unsafe {
        product(
            bf16,
            rows,
            keys,
            d.hd,
            q.rows(seq.b, h, seq.t0 + i0),
            (q.st, 1),
            k,
            (1, k_st),
            Rows::dense(p, keys),
            false,
        )
    };
    for (r, row) in p.chunks_mut(keys).enumerate() {
        scale_bias_softmax(row, &seq.bias_row(bias, i0 + r)[..keys], scale);
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

/// `dropout(softmax(q·kᵀ·scale + bias))·v`.
///
/// # Shapes
/// - q `[B, H, Tq, hd]`, k and v `[B, KV, Tk, hd]` (H a multiple of KV), each read through
///   its strides ([`Heads`])
/// - bias `[B, 1, Tq, Tk]` dense
/// - output `[B, H, Tq, hd]`, a view of `[B, Tq, H, hd]` ([`HeadsOut`])
///
/// With `segments` (a padding-free batch) B is 1, Tq = Tk = N tokens, and the bias is the
/// padded batch's `[rows, 1, cols, cols]`: each example attends within its own tokens.
#[allow(clippy::too_many_arguments)]
pub(super) fn forward(
    q: &FlexTensor,
    k: &FlexTensor,
    v: &FlexTensor,
    bias: &FlexTensor,
    segments: Option<&Segments>,
    scale: f32,
    mask: &DropMask,
    bf16: bool,
) -> FlexTensor {
    let [qs, ks, vs] = [q, k, v].map(Heads::expect);
    let d = Dims::of(q, k);
    let seqs = Seq::all(&d, bias, segments);
    let bs = values(bias);
    let mut out = vec![0f32; d.batch * d.tq * d.heads * d.hd];
    let dst = HeadsOut::new(&mut out, d.tq, d.heads, d.hd);
    (0..seqs.len() * d.heads).into_par_iter().for_each(|task| {
        let (seq, h) = (&seqs[task / d.heads], task % d.heads);
        let kvh = h / d.group();
        let (k, v) = (ks.rows(seq.b, kvh, seq.t0), vs.rows(seq.b, kvh, seq.t0));
        let mut p = vec![0f32; ROWS.min(seq.tq) * seq.tk];
        for i0 in (0..seq.tq).step_by(ROWS) {
            let rows = ROWS.min(seq.tq - i0);
            let keys = visible_keys(bs, seq, i0..i0 + rows);
            let p = &mut p[..rows * keys];
            probs_block(
                bf16,
                &qs,
                (k, ks.st),
                bs,
                scale,
                (&d, seq),
                h,
                i0,
                rows,
                keys,
                p,
            );
            if !mask.keeps_all() {
                for (r, row) in p.chunks_mut(keys).enumerate() {
                    dropout_in_place(row, mask, seq.mask_base(d.heads, h, i0 + r));
                }
            }
            // (rows, keys) x (keys, hd) -> (rows, hd)
            // SAFETY: the sequence's rows of head h lie inside `out`, written by this task
            // alone (sequences do not overlap).
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
                    dst.rows(seq.b, h, seq.t0 + i0),
                    false,
                )
            };
        }
    });
    heads_tensor(out, [d.batch, d.heads, d.tq, d.hd])
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
    (bias, segments): (&FlexTensor, Option<&Segments>),
    dout: &FlexTensor,
    scale: f32,
    mask: &DropMask,
    bf16: bool,
) -> (FlexTensor, FlexTensor, FlexTensor) {
    let [qs, ks, vs, dos] = [q, k, v, dout].map(Heads::expect);
    let d = Dims::of(q, k);
    let seqs = Seq::all(&d, bias, segments);
    let bs = values(bias);
    let mut dq = vec![0f32; d.batch * d.tq * d.heads * d.hd];
    let mut dk = vec![0f32; d.batch * d.tk * d.kv_heads * d.hd];
    let mut dv = vec![0f32; d.batch * d.tk * d.kv_heads * d.hd];
    let dq_out = HeadsOut::new(&mut dq, d.tq, d.heads, d.hd);
    let (dk_out, dv_out) = (
        HeadsOut::new(&mut dk, d.tk, d.kv_heads, d.hd),
        HeadsOut::new(&mut dv, d.tk, d.kv_heads, d.hd),
    );
    // Task (sequence, kh) writes the sequence's rows of key / value head kh of dk and dv, and
    // of its group's query heads of dq: disjoint from every other task's.
    (0..seqs.len() * d.kv_heads)
        .into_par_iter()
        .for_each(|task| {
            let (seq, kh) = (&seqs[task / d.kv_heads], task % d.kv_heads);
            let (b, t0) = (seq.b, seq.t0);
            let (k, v) = (ks.rows(b, kh, t0), vs.rows(b, kh, t0));
            let (dk, dv) = (dk_out.rows(b, kh, t0), dv_out.rows(b, kh, t0));
            let block = ROWS.min(seq.tq) * seq.tk;
            let (mut p, mut dp, mut ds) = (vec![0f32; block], vec![0f32; block], vec![0f32; block]);
            for h in kh * d.group()..(kh + 1) * d.group() {
                for i0 in (0..seq.tq).step_by(ROWS) {
                    let rows = ROWS.min(seq.tq - i0);
                    let keys = visible_keys(bs, seq, i0..i0 + rows);
                    let n = rows * keys;
                    let (p, dp, ds) = (&mut p[..n], &mut dp[..n], &mut ds[..n]);
                    let (q_block, do_block) = (qs.rows(b, h, t0 + i0), dos.rows(b, h, t0 + i0));
                    probs_block(
                        bf16,
                        &qs,
                        (k, ks.st),
                        bs,
                        scale,
                        (&d, seq),
                        h,
                        i0,
                        rows,
                        keys,
                        p,
                    );
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
                            dropout_slice(x, mask, seq.mask_base(d.heads, h, i0 + r), y);
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
                        super::softmax_backward_row(
                            p,
                            dp,
                            scale,
                            mask,
                            seq.mask_base(d.heads, h, i0 + r),
                            ds,
                        );
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
                            dq_out.rows(b, h, t0 + i0),
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
        heads_tensor(dq, [d.batch, d.heads, d.tq, d.hd]),
        heads_tensor(dk, [d.batch, d.kv_heads, d.tk, d.hd]),
        heads_tensor(dv, [d.batch, d.kv_heads, d.tk, d.hd]),
    )
}
