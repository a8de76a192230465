//! Padding-free forward passes: a padded batch runs without its padding.
//!
//! The token-wise layers (projections, feed-forward, norms, residuals) see only the batch's real
//! tokens, flattened into one row `[1, N, H]`: the "unpadding" of ModernBERT
//! (`transformers.models.modernbert`, `_unpad_modernbert_input`) and MosaicBERT. No token-wise
//! layer mixes positions, so the result is the padded batch's up to float rounding, while the
//! projections and the feed-forward, most of a step's work, skip the padding.
//!
//! Attention is where each token must stay inside its own example. On the CPU kernels it reads
//! the flattened row as it is, each example a run of tokens ([`Segments`]) that attends within
//! itself with the padded batch's bias and dropout mask (as flash-attention's variable-length
//! kernel): scattering q, k and v into padded rows and gathering the output back took more of a
//! MiniLM LoRA step than the attention products (whole-run A/B: 1.23x without them). Elsewhere
//! ([`Attend`]: a GPU, a KV cache, prefix keys, soft-capped scores, a mask with holes) attention
//! puts the tokens back into their padded rows around the call.
//!
//! The caller says where the real tokens are from the host-side mask it built the batch from,
//! so no device value is read back to find them.

use std::sync::Arc;

use burn::tensor::IndexingUpdateOp;
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::Mode;
use crate::kernels::{Segment, Segments};
use crate::layers::{merge_heads, scaled_dot_product, split_heads};

/// Where the real tokens of a padded `[B, T]` batch are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unpadded {
    rows: usize,
    cols: usize,
    /// Row-major flat positions `row * T + col` of the real tokens, in order.
    keep: Vec<i64>,
}

impl Unpadded {
    /// The real tokens of a `[rows, cols]` mask (row-major, 1 for a real token).
    pub fn from_mask(mask: &[i64], rows: usize, cols: usize) -> Self {
        debug_assert_eq!(mask.len(), rows * cols);
        let keep = (0..mask.len() as i64)
            .filter(|&i| mask[i as usize] != 0)
            .collect();
        Self { rows, cols, keep }
    }

    /// The examples as runs of consecutive columns ([`Segments`]), or `None` where a row's
    /// real tokens have a gap (a mask with holes).
    fn segments(&self) -> Option<Segments> {
        let mut list: Vec<Segment> = Vec::new();
        for (start, &at) in self.keep.iter().enumerate() {
            let (row, col) = (at as usize / self.cols, at as usize % self.cols);
            match list.last_mut() {
                Some(s) if s.row == row => {
                    if s.col + s.len != col {
                        return None;
                    }
                    s.len += 1;
                }
                _ => list.push(Segment {
                    start,
                    len: 1,
                    row,
                    col,
                }),
            }
        }
        Some(Segments {
            rows: self.rows,
            cols: self.cols,
            list,
        })
    }

    /// The same batch after `p` virtual tokens (a soft prompt, all real) in front of each row.
    pub fn widen(&self, p: usize) -> Self {
        if p == 0 {
            return self.clone();
        }
        let (t, wide) = (self.cols as i64, (self.cols + p) as i64);
        let mut keep = Vec::with_capacity(self.keep.len() + self.rows * p);
        let mut real = self.keep.iter().peekable();
        for row in 0..self.rows as i64 {
            keep.extend((0..p as i64).map(|c| row * wide + c));
            while let Some(&&at) = real.peek().filter(|&&&at| at / t == row) {
                keep.push(row * wide + p as i64 + at % t);
                real.next();
            }
        }
        Self {
            rows: self.rows,
            cols: self.cols + p,
            keep,
        }
    }
}

/// How a forward pass holds its tokens between attention calls.
// One per forward pass: the size of the tensor handle in one variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub(crate) enum Layout {
    /// `[B, T, H]`, padding included.
    Padded,
    /// `[1, N, H]`, real tokens only.
    Unpadded {
        /// `[N]` flat positions of the real tokens in `[B * T]`.
        index: Tensor<1, Int>,
        rows: usize,
        cols: usize,
        /// The examples, where each is a run of columns of its row.
        segments: Option<Arc<Segments>>,
    },
}

impl Layout {
    /// The layout of a forward pass over `[B, T]` positions: padding-free when `unpadded` says
    /// where the real tokens are.
    pub(crate) fn new(unpadded: Option<&Unpadded>, device: &Device) -> Self {
        match unpadded {
            None => Layout::Padded,
            Some(u) => Layout::Unpadded {
                index: Tensor::from_data(TensorData::new(u.keep.clone(), [u.keep.len()]), device),
                rows: u.rows,
                cols: u.cols,
                segments: u.segments().map(Arc::new),
            },
        }
    }

    /// From padded rows into this layout.
    ///
    /// # Shapes
    /// - x `[B, T, H]`
    /// - output `[B, T, H]` padded, `[1, N, H]` padding-free
    pub(crate) fn enter(&self, x: Tensor<3>) -> Tensor<3> {
        match self {
            Layout::Padded => x,
            Layout::Unpadded {
                index, rows, cols, ..
            } => {
                let [b, t, h] = x.dims();
                debug_assert_eq!(
                    (b, t),
                    (*rows, *cols),
                    "padding-free layout of another batch"
                );
                let n = index.dims()[0];
                // (B, T, H) -> (B*T, H) -> (N, H) -> (1, N, H)
                x.reshape([b * t, h])
                    .select(0, index.clone())
                    .reshape([1, n, h])
            }
        }
    }

    /// From this layout back into padded rows, zeros at the padding.
    ///
    /// # Shapes
    /// - x `[B, T, H]` padded, `[1, N, H]` padding-free
    /// - output `[B, T, H]`
    pub(crate) fn pad(&self, x: Tensor<3>) -> Tensor<3> {
        match self {
            Layout::Padded => x,
            Layout::Unpadded {
                index, rows, cols, ..
            } => {
                let [_, n, h] = x.dims();
                // (1, N, H) -> (N, H) -> scattered into (B*T, H) -> (B, T, H)
                Tensor::zeros([rows * cols, h], &x.device())
                    .select_assign(0, index.clone(), x.reshape([n, h]), IndexingUpdateOp::Add)
                    .reshape([*rows, *cols, h])
            }
        }
    }
}

/// How one attention call of a forward pass takes its tokens: padded again around the call
/// (`pad` before, `enter` after), or, padding-free on the CPU kernels, the flattened tokens
/// as they are, each example attending within its own ([`crate::kernels::attention_segments`]).
pub(crate) struct Attend<'a> {
    layout: &'a Layout,
    segments: Option<&'a Arc<Segments>>,
}

impl Layout {
    /// The attention call for `x` (the layer's input, for its device). `flat`: whether the call
    /// can take the flattened tokens: keys and values from the same tokens as the queries (no
    /// prefix, no cache) and no rotation that needs padded positions.
    pub(crate) fn attend(&self, x: &Tensor<3>, flat: bool) -> Attend<'_> {
        let segments = match self {
            Layout::Unpadded {
                segments: Some(s), ..
            } if flat && crate::kernels::segments_apply(x) => Some(s),
            _ => None,
        };
        Attend {
            layout: self,
            segments,
        }
    }

    /// A table of the padded positions `[B, 1, T, d]` (the rotary embedding's) at the
    /// flattened tokens, `[1, 1, N, d]`, for the attention calls that take those
    /// ([`Attend::is_flat`]); `None` where no call can (padded, or a mask with holes).
    pub(crate) fn flat_table(&self, table: Tensor<4>) -> Option<Tensor<4>> {
        match self {
            Layout::Unpadded {
                index,
                rows,
                cols,
                segments: Some(_),
            } if table.dims()[0] == *rows && table.dims()[2] == *cols => {
                let [b, _, t, d] = table.dims();
                let n = index.dims()[0];
                // (B, 1, T, d) -> (B*T, d) -> (N, d) -> (1, 1, N, d)
                Some(
                    table
                        .reshape([b * t, d])
                        .select(0, index.clone())
                        .reshape([1, 1, n, d]),
                )
            }
            _ => None,
        }
    }
}

impl Attend<'_> {
    /// Whether the call takes the flattened tokens (no padding around it).
    pub(crate) fn is_flat(&self) -> bool {
        self.segments.is_some()
    }

    /// A projection `[B, T, ·]` (`[1, N, ·]` padding-free) in the rows [`Self::run`] reads.
    pub(crate) fn rows(&self, y: Tensor<3>) -> Tensor<3> {
        match self.segments {
            Some(_) => y,
            None => self.layout.pad(y),
        }
    }

    /// A projection `[B, T, n·hd]` (`[1, N, n·hd]` padding-free) as `n` heads for [`Self::run`].
    pub(crate) fn heads(&self, y: Tensor<3>, n: usize) -> Tensor<4> {
        split_heads(self.rows(y), n)
    }

    /// [`scaled_dot_product`] of heads made by [`Self::heads`], the bias the padded batch's
    /// `[B, 1, T, T]`.
    pub(crate) fn run(
        &self,
        [q, k, v]: [Tensor<4>; 3],
        bias: Tensor<4>,
        dropout_p: f64,
        mode: Mode,
    ) -> Tensor<4> {
        match self.segments {
            Some(s) => {
                let p = if mode == Mode::Eval { 0.0 } else { dropout_p };
                let scale = 1.0 / (q.dims()[3] as f32).sqrt();
                crate::kernels::attention_segments(q, k, v, bias, s, scale, p)
            }
            None => scaled_dot_product(q, k, v, bias, dropout_p, mode),
        }
    }

    /// [`Self::run`]'s output back in the layout's rows, heads merged: `[B, T, H·hd]`
    /// (`[1, N, H·hd]` padding-free).
    pub(crate) fn merge(&self, ctx: Tensor<4>) -> Tensor<3> {
        match self.segments {
            Some(_) => merge_heads(ctx),
            None => self.layout.enter(merge_heads(ctx)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widening_puts_virtual_tokens_in_front_of_every_row() {
        // Rows of 3: [1 1 0], [1 0 0]
        let u = Unpadded::from_mask(&[1, 1, 0, 1, 0, 0], 2, 3);
        assert_eq!(u.keep, vec![0, 1, 3]);
        let w = u.widen(2);
        // Rows of 5: [v v 1 1 0], [v v 1 0 0]
        assert_eq!(w.keep, vec![0, 1, 2, 3, 5, 6, 7]);
        assert_eq!((w.rows, w.cols), (2, 5));
    }

    /// The attention call on the flattened tokens ([`Attend`] with segments) gives the padded
    /// call's output and gradients on the real tokens, with dropout too (the same mask), for
    /// rows padded on the right, on the left, not at all, and a row with no token; grouped
    /// key / value heads; and heads of 64 under bf16 (AMX tiles where the CPU has them).
    #[test]
    fn attention_on_flattened_tokens_equals_the_padded_call() {
        use burn::tensor::Distribution;
        let _rng = crate::test_rng();
        let device = Device::flex().autodiff();
        let (rows, cols) = (4, 12);
        // Row 0 padded on the right, row 1 on the left, row 2 full, row 3 empty.
        let mask: Vec<i64> = (0..rows * cols)
            .map(|i| {
                let (r, c) = (i / cols, i % cols);
                [c < 7, c >= 3, true, false][r] as i64
            })
            .collect();
        let u = Unpadded::from_mask(&mask, rows, cols);
        assert_eq!(
            u.segments().map(|s| s.list.len()),
            Some(3),
            "three rows with tokens, each one run"
        );
        let keep = Tensor::<2, Int>::from_data(TensorData::new(mask, [rows, cols]), &device);
        let bias = crate::layers::attention_bias(keep.equal_elem(1), cols, false);
        let n = u.keep.len();
        for (heads, kv, hd, bf16) in [(4, 2, 8, false), (2, 2, 64, true)] {
            let normal =
                |w: usize| Tensor::<3>::random([1, n, w], Distribution::Normal(0.0, 1.0), &device);
            let (q, k, v, w) = (
                normal(heads * hd),
                normal(kv * hd),
                normal(kv * hd),
                normal(heads * hd),
            );
            for p in [0.0, 0.3] {
                let run = |flat: bool| {
                    device.seed(5);
                    let layout = Layout::new(Some(&u), &device);
                    let [qt, kt, vt] = [&q, &k, &v].map(|t| t.clone().require_grad());
                    let compute = bf16.then_some(burn::tensor::FloatDType::BF16);
                    let _scope = crate::precision::scope(compute);
                    let attend = layout.attend(&qt, flat);
                    assert_eq!(attend.segments.is_some(), flat);
                    let [qh, kh, vh] = [(&qt, heads), (&kt, kv), (&vt, kv)]
                        .map(|(t, h)| attend.heads(t.clone(), h));
                    let out = attend.merge(attend.run([qh, kh, vh], bias.clone(), p, Mode::Train));
                    let grads = (out.clone() * w.clone()).sum().backward();
                    let [dq, dk, dv] = [&qt, &kt, &vt]
                        .map(|t| t.grad(&grads).unwrap_or_else(|| panic!("no gradient")));
                    [out.inner(), dq, dk, dv]
                };
                let (flat, padded) = (run(true), run(false));
                let tolerance = if bf16 { 2e-2 } else { 2e-6 };
                for (name, (f, c)) in ["output", "dq", "dk", "dv"]
                    .iter()
                    .zip(flat.into_iter().zip(padded))
                {
                    let scale = c.clone().abs().max().into_scalar::<f32>().max(1.0);
                    let diff = (f - c).abs().max().into_scalar::<f32>();
                    assert!(
                        diff <= tolerance * scale,
                        "{name} (heads {heads}, kv {kv}, hd {hd}, p {p}): max diff {diff}"
                    );
                }
            }
        }
    }

    #[test]
    fn entering_and_padding_keeps_real_tokens_and_zeroes_padding() {
        let device = Device::default();
        let u = Unpadded::from_mask(&[1, 0, 1, 1], 2, 2);
        let layout = Layout::new(Some(&u), &device);
        let x = Tensor::<3>::from_data(
            TensorData::new(vec![1.0f32, 2., 3., 4., 5., 6., 7., 8.], [2, 2, 2]),
            &device,
        );
        let flat = layout.enter(x);
        assert_eq!(flat.dims(), [1, 3, 2]);
        let back: Vec<f32> = layout.pad(flat).into_data().try_to_vec().unwrap();
        assert_eq!(back, vec![1., 2., 0., 0., 5., 6., 7., 8.]);
    }
}
