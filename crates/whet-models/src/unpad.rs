//! Padding-free forward passes: a padded batch runs without its padding.
//!
//! The token-wise layers (projections, feed-forward, norms, residuals) see only the batch's real
//! tokens, flattened into one row `[1, N, H]`; attention alone puts them back into their padded
//! rows, so each token still attends only inside its own example, at its own position. This is
//! the "unpadding" of ModernBERT (`transformers.models.modernbert`, `_unpad_modernbert_input`)
//! and MosaicBERT, with attention on padded rows instead of a variable-length kernel: no
//! token-wise layer mixes positions, so the result is the padded batch's up to float rounding,
//! while the projections and the feed-forward, most of a step's work, skip the padding.
//!
//! The caller says where the real tokens are from the host-side mask it built the batch from,
//! so no device value is read back to find them.

use burn::tensor::IndexingUpdateOp;
use burn::tensor::{Device, Int, Tensor, TensorData};

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
            Layout::Unpadded { index, rows, cols } => {
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
            Layout::Unpadded { index, rows, cols } => {
                let [_, n, h] = x.dims();
                // (1, N, H) -> (N, H) -> scattered into (B*T, H) -> (B, T, H)
                Tensor::zeros([rows * cols, h], &x.device())
                    .select_assign(0, index.clone(), x.reshape([n, h]), IndexingUpdateOp::Add)
                    .reshape([*rows, *cols, h])
            }
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
