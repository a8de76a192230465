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

use super::{DropMask, FlexTensor, dropout_slice, gemm_on, new_tensor, values};
use crate::layers::MASK_VALUE;
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
    q: &[f32],
    k: &[f32],
    bias: &[f32],
    scale: f32,
    d: &Dims,
    bh: usize,
    i0: usize,
    rows: usize,
    keys: usize,
    p: &mut [f32],
) {
    let b = bh / d.heads;
    let q_block = &q[(bh * d.tq + i0) * d.hd..];
    // (rows, hd) x (hd, keys) -> (rows, keys); kᵀ read through its strides
    gemm_on(
        rows,
        keys,
        d.hd,
        q_block,
        (d.hd, 1),
        k,
        (1, d.hd),
        p,
        false,
        false,
    );
    for (r, row) in p.chunks_mut(keys).enumerate() {
        let bias_row = &bias[(b * d.tq + i0 + r) * d.tk..][..keys];
        scale_bias_softmax(row, bias_row, scale);
    }
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
/// - q `[B, H, Tq, hd]`, k and v `[B, KV, Tk, hd]` (H a multiple of KV), all dense
/// - bias `[B, 1, Tq, Tk]` dense
/// - output `[B, H, Tq, hd]`
pub(super) fn forward(
    q: &FlexTensor,
    k: &FlexTensor,
    v: &FlexTensor,
    bias: &FlexTensor,
    scale: f32,
    mask: &DropMask,
) -> FlexTensor {
    let d = Dims::of(q, k);
    let (qs, ks, vs, bs) = (values(q), values(k), values(v), values(bias));
    let mut out = vec![0f32; qs.len()];
    let kv_len = d.tk * d.hd;
    out.par_chunks_mut(d.tq * d.hd)
        .enumerate()
        .for_each(|(bh, out_head)| {
            let (b, h) = (bh / d.heads, bh % d.heads);
            let kvh = b * d.kv_heads + h / d.group();
            let (k, v) = (&ks[kvh * kv_len..][..kv_len], &vs[kvh * kv_len..][..kv_len]);
            let mut p = vec![0f32; ROWS.min(d.tq) * d.tk];
            for i0 in (0..d.tq).step_by(ROWS) {
                let rows = ROWS.min(d.tq - i0);
                let keys = visible_keys(bs, &d, b, i0..i0 + rows);
                let p = &mut p[..rows * keys];
                probs_block(qs, k, bs, scale, &d, bh, i0, rows, keys, p);
                if !mask.keeps_all() {
                    for (r, row) in p.chunks_mut(keys).enumerate() {
                        dropout_in_place(row, mask, mask_base(&d, bh, i0 + r));
                    }
                }
                // (rows, keys) x (keys, hd) -> (rows, hd)
                let o = &mut out_head[i0 * d.hd..];
                gemm_on(
                    rows,
                    d.hd,
                    keys,
                    p,
                    (keys, 1),
                    v,
                    (d.hd, 1),
                    o,
                    false,
                    false,
                );
            }
        });
    new_tensor(out, q)
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
    q: &FlexTensor,
    k: &FlexTensor,
    v: &FlexTensor,
    bias: &FlexTensor,
    dout: &FlexTensor,
    scale: f32,
    mask: &DropMask,
) -> (FlexTensor, FlexTensor, FlexTensor) {
    let d = Dims::of(q, k);
    let (qs, ks, vs, bs, dos) = (values(q), values(k), values(v), values(bias), values(dout));
    let (head_len, kv_len) = (d.tq * d.hd, d.tk * d.hd);
    let mut dq = vec![0f32; qs.len()];
    let mut dk = vec![0f32; ks.len()];
    let mut dv = vec![0f32; vs.len()];
    dq.par_chunks_mut(d.group() * head_len)
        .zip(dk.par_chunks_mut(kv_len).zip(dv.par_chunks_mut(kv_len)))
        .enumerate()
        .for_each(|(kvh, (dq_group, (dk, dv)))| {
            let b = kvh / d.kv_heads;
            let (k, v) = (&ks[kvh * kv_len..][..kv_len], &vs[kvh * kv_len..][..kv_len]);
            let block = ROWS.min(d.tq) * d.tk;
            let (mut p, mut dp, mut ds) = (vec![0f32; block], vec![0f32; block], vec![0f32; block]);
            for (g, dq_head) in dq_group.chunks_mut(head_len).enumerate() {
                let bh = kvh * d.group() + g;
                let (q_head, do_head) = (&qs[bh * head_len..], &dos[bh * head_len..]);
                for i0 in (0..d.tq).step_by(ROWS) {
                    let rows = ROWS.min(d.tq - i0);
                    let keys = visible_keys(bs, &d, b, i0..i0 + rows);
                    let n = rows * keys;
                    let (p, dp, ds) = (&mut p[..n], &mut dp[..n], &mut ds[..n]);
                    let (q_block, do_block) = (&q_head[i0 * d.hd..], &do_head[i0 * d.hd..]);
                    probs_block(qs, k, bs, scale, &d, bh, i0, rows, keys, p);
                    // d(dropped probs) = dout · vᵀ: (rows, hd) x (hd, keys) -> (rows, keys)
                    gemm_on(
                        rows,
                        keys,
                        d.hd,
                        do_block,
                        (d.hd, 1),
                        v,
                        (1, d.hd),
                        dp,
                        false,
                        false,
                    );
                    // dv += (dropped probs)ᵀ · dout: (keys, rows) x (rows, hd) -> (keys, hd)
                    let dropped: &[f32] = if mask.keeps_all() {
                        p
                    } else {
                        for (r, (x, y)) in p.chunks(keys).zip(ds.chunks_mut(keys)).enumerate() {
                            dropout_slice(x, mask, mask_base(&d, bh, i0 + r), y);
                        }
                        ds
                    };
                    gemm_on(
                        keys,
                        d.hd,
                        rows,
                        dropped,
                        (1, keys),
                        do_block,
                        (d.hd, 1),
                        dv,
                        true,
                        false,
                    );
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
                            mask_base(&d, bh, i0 + r),
                            ds,
                        );
                    }
                    // dq = d(scores) · k: (rows, keys) x (keys, hd) -> (rows, hd)
                    let dq_block = &mut dq_head[i0 * d.hd..];
                    gemm_on(
                        rows,
                        d.hd,
                        keys,
                        ds,
                        (keys, 1),
                        k,
                        (d.hd, 1),
                        dq_block,
                        false,
                        false,
                    );
                    // dk += d(scores)ᵀ · q: (keys, rows) x (rows, hd) -> (keys, hd)
                    gemm_on(
                        keys,
                        d.hd,
                        rows,
                        ds,
                        (1, keys),
                        q_block,
                        (d.hd, 1),
                        dk,
                        true,
                        false,
                    );
                }
            }
        });
    (new_tensor(dq, q), new_tensor(dk, k), new_tensor(dv, v))
}
