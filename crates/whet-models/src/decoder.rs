//! What the decoder families share: their inputs, the key/value cache, the causal-LM interface
//! that generation drives, and the last-token pooling of sequence classification.

use burn::tensor::{Int, Tensor, TensorData};

use crate::error::{ModelError, Result};
use crate::layers::Mode;

/// The inputs of a decoder forward pass.
#[derive(Debug, Clone)]
pub struct DecoderInput {
    /// `[B, T]` new tokens.
    pub input_ids: Tensor<2, Int>,
    /// `[B, T_past + T]`: 1 for real tokens, 0 for padding, over cached and new positions.
    pub attention_mask: Tensor<2, Int>,
    /// `[B, T]` absolute positions; `None` means `T_past..T_past + T` for every row (correct for
    /// right padding; left-padded batches must pass `cumsum(mask) - 1`, see [`position_ids`]).
    pub position_ids: Option<Tensor<2, Int>>,
    /// `[B, T]` for rows packed with several documents: a token attends only to earlier tokens
    /// of the same document (no cache). `None`: one document per row.
    pub document_ids: Option<Tensor<2, Int>>,
    /// Where the real tokens of the `[B, T]` new tokens are, to run padding-free
    /// ([`crate::unpad`]); `None` runs the padded rows as they are.
    pub unpadded: Option<crate::unpad::Unpadded>,
}

impl DecoderInput {
    /// Input of `[B, T]` ids with a full mask and default positions.
    pub fn unpadded(input_ids: Tensor<2, Int>) -> Self {
        let mask = input_ids.ones_like();
        Self {
            input_ids,
            attention_mask: mask,
            position_ids: None,
            document_ids: None,
            unpadded: None,
        }
    }
}

/// The additive attention bias of a decoder step: padding and future positions masked, and,
/// for packed rows, every key of another document.
///
/// # Shapes
/// - output `[B, 1, T, T_past + T]`
pub fn decoder_bias(input: &DecoderInput, t: usize) -> Tensor<4> {
    let bias = crate::layers::attention_bias(input.attention_mask.clone().equal_elem(1), t, true);
    match &input.document_ids {
        None => bias,
        Some(docs) => {
            let [b, n] = docs.dims();
            // (B, 1, T, 1) vs (B, 1, 1, T): a query and a key of different documents
            let q = docs.clone().reshape([b, 1, n, 1]).expand([b, 1, n, n]);
            let k = docs.clone().reshape([b, 1, 1, n]).expand([b, 1, n, n]);
            bias.mask_fill(q.not_equal(k), crate::layers::MASK_VALUE)
        }
    }
}

/// Positions as `transformers` generation computes them: `cumsum(mask) - 1`, clamped at 0, so
/// the first real token of a left-padded row has position 0.
///
/// # Shapes
/// - mask `[B, T]` (as row-major values)
/// - output `[B, T]`
pub fn position_ids(mask: &[i64], b: usize, t: usize) -> Vec<i64> {
    let mut out = Vec::with_capacity(b * t);
    for row in mask.chunks(t) {
        let mut acc = 0i64;
        for &m in row {
            acc += m;
            out.push((acc - 1).max(0));
        }
    }
    out
}

/// Cached keys and values of every layer, grown by each forward call.
///
/// A one-token call (a generation step) writes its position in place: a layer's buffers keep
/// spare room, doubled when full, so a step copies one position instead of the whole cache
/// (`Tensor::cat` at every step and layer made generation quadratic in its length). Longer
/// calls (a prompt, a training forward) concatenate, so they never carry spare room. The
/// buffers are written only while no one else holds them (burn's CPU backend copies a tensor
/// that is shared before writing), so the views handed out stay valid.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    /// Per layer: key and value buffers `[B, H_kv, capacity, hd]`, of which the first
    /// `lens[layer]` positions hold values.
    layers: Vec<Option<(Tensor<4>, Tensor<4>)>>,
    lens: Vec<usize>,
}

impl KvCache {
    /// An empty cache for `n_layers` layers.
    pub fn new(n_layers: usize) -> Self {
        Self {
            layers: vec![None; n_layers],
            lens: vec![0; n_layers],
        }
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.lens.first().copied().unwrap_or(0)
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Starts every layer with the given keys and values (a prefix of virtual tokens).
    ///
    /// # Shapes
    /// - each key and value `[B, H_kv, P, hd]`
    pub fn set(&mut self, layers: Vec<(Tensor<4>, Tensor<4>)>) {
        self.lens = layers.iter().map(|(k, _)| k.dims()[2]).collect();
        self.layers = layers.into_iter().map(Some).collect();
    }

    /// Appends this step's keys and values for `layer` and returns the full ones.
    ///
    /// # Shapes
    /// - k, v `[B, H_kv, T, hd]`
    /// - output `[B, H_kv, T_past + T, hd]`
    pub fn append(&mut self, layer: usize, k: Tensor<4>, v: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let [b, h, t, hd] = k.dims();
        let len = self.lens[layer];
        let (kb, vb) = match self.layers[layer].take() {
            None => {
                self.layers[layer] = Some((k.clone(), v.clone()));
                self.lens[layer] = t;
                return (k, v);
            }
            Some((pk, pv)) if t > 1 => {
                let valid = |x: Tensor<4>| x.slice([0..b, 0..h, 0..len, 0..hd]);
                let (k, v) = (
                    Tensor::cat(vec![valid(pk), k], 2),
                    Tensor::cat(vec![valid(pv), v], 2),
                );
                self.layers[layer] = Some((k.clone(), v.clone()));
                self.lens[layer] = len + t;
                return (k, v);
            }
            Some(buffers) => buffers,
        };
        let (kb, vb) = if len + t <= kb.dims()[2] {
            (kb, vb)
        } else {
            // [B, H_kv, len, hd] ++ spare: room for as many positions again.
            let grow = |x: Tensor<4>| {
                let spare = Tensor::<4>::zeros([b, h, len.max(t), hd], &x.device());
                Tensor::cat(vec![x.slice([0..b, 0..h, 0..len, 0..hd]), spare], 2)
            };
            (grow(kb), grow(vb))
        };
        let at = [0..b, 0..h, len..len + t, 0..hd];
        let (kb, vb) = (kb.slice_assign(at.clone(), k), vb.slice_assign(at, v));
        self.lens[layer] = len + t;
        let valid = [0..b, 0..h, 0..len + t, 0..hd];
        let out = (kb.clone().slice(valid.clone()), vb.clone().slice(valid));
        self.layers[layer] = Some((kb, vb));
        out
    }
}

/// Places a decoder's virtual tokens on a call that starts a sequence (no cache, or an empty
/// one): the mask gains `P` ones in front; a key/value prefix goes into the cache (`local` when
/// the caller passed none), so the new tokens are numbered from `P` as after `P` cached tokens;
/// a soft prompt is returned, to be prepended to the token embeddings, with explicit positions
/// widened to `0..P` then the given ones shifted by `P`. Later calls of a cached sequence find
/// the prefix in the cache and place nothing (their mask must then cover it).
pub(crate) fn place_virtual_tokens<'a>(
    encoder: Option<&crate::prompt::PromptEncoder>,
    input: &mut DecoderInput,
    cache: Option<&'a mut KvCache>,
    local: &'a mut KvCache,
) -> (Option<&'a mut KvCache>, Option<Tensor<3>>) {
    use crate::prompt::{VirtualTokens, prompt_positions, widen_mask};
    let starts = cache.as_ref().is_none_or(|c| c.is_empty());
    let batch = input.input_ids.dims()[0];
    let Some(vt) = encoder
        .filter(|_| starts)
        .and_then(|e| e.virtual_tokens(batch))
    else {
        return (cache, None);
    };
    let p = vt.len();
    input.attention_mask = widen_mask(input.attention_mask.clone(), p);
    match vt {
        VirtualTokens::Embeddings(e) => {
            input.position_ids = input
                .position_ids
                .take()
                .map(|pos| prompt_positions(pos, p));
            (cache, Some(e))
        }
        VirtualTokens::KeyValues(kv) => {
            input.position_ids = input
                .position_ids
                .take()
                .map(|pos| pos.add_scalar(p as i64));
            match cache {
                Some(c) => {
                    c.set(kv);
                    (Some(c), None)
                }
                None => {
                    local.set(kv);
                    (Some(local), None)
                }
            }
        }
    }
}

/// A decoder with a language-modelling head, as generation needs it.
pub trait CausalLm {
    /// Final hidden states (after the last norm).
    ///
    /// # Shapes
    /// - output `[B, T, H]`
    fn forward_hidden(
        &self,
        input: DecoderInput,
        cache: Option<&mut KvCache>,
        mode: Mode,
    ) -> Tensor<3>;

    /// Vocabulary logits of hidden states.
    ///
    /// # Shapes
    /// - hidden `[B, T, H]`
    /// - output `[B, T, V]`
    fn lm_logits(&self, hidden: Tensor<3>) -> Tensor<3>;

    /// Next-token cross-entropy summed over `hidden`'s rows against `targets`: what
    /// [`crate::kernels::cross_entropy_sum`] of [`Self::lm_logits`] gives. A plain head (tied
    /// embeddings, or an LM head without bias or adapter) computes it without the `[N, V]`
    /// logits ([`crate::kernels::linear_cross_entropy_sum`]).
    ///
    /// # Shapes
    /// - hidden `[N, H]`, `targets.len() == N`
    /// - output `[1]`
    fn lm_cross_entropy_sum(&self, hidden: Tensor<2>, targets: &[u32]) -> Tensor<1> {
        logits_cross_entropy_sum(self, hidden, targets)
    }

    /// Logits of every position.
    fn forward_logits(&self, input: DecoderInput, mode: Mode) -> Tensor<3> {
        self.lm_logits(self.forward_hidden(input, None, mode))
    }

    /// A fresh cache for this model.
    fn new_cache(&self) -> KvCache;

    /// The longest sequence the positions support.
    fn max_positions(&self) -> usize;

    /// Vocabulary size.
    fn vocab_size(&self) -> usize;

    /// Positions a soft prompt adds in front of the hidden states of a call that starts a
    /// sequence (0 without one).
    fn virtual_positions(&self) -> usize {
        0
    }

    /// LongRoPE (Phi-3 128k, Phi-3.5): the sequence length past which the rotary tables switch
    /// from the short to the long factors. Generation that crosses it recomputes the whole
    /// sequence without the cache, as transformers' Phi-3 does; `None` for other models.
    fn rope_switch(&self) -> Option<usize> {
        None
    }
}

/// Index of each row's last non-pad token, as `transformers`' `*ForSequenceClassification`
/// finds it: the rightmost position whose id is not `pad_token_id` (so it works for left and
/// right padding). Without a pad token only unbatched input is accepted.
///
/// # Shapes
/// - ids `[B, T]`
/// - output `[B]`
pub fn last_non_pad(ids: &Tensor<2, Int>, pad_token_id: Option<u32>) -> Result<Tensor<1, Int>> {
    let [b, t] = ids.dims();
    let values: Vec<i64> = ids
        .to_data()
        .convert::<i64>()
        .try_to_vec::<i64>()
        .map_err(|e| ModelError::Input(format!("cannot read input ids: {e:?}")))?;
    let idx: Vec<i64> = match pad_token_id {
        Some(pad) => values
            .chunks(t)
            .map(|row| {
                row.iter()
                    .rposition(|&id| id != pad as i64)
                    .unwrap_or(t - 1) as i64
            })
            .collect(),
        None if b == 1 => vec![t as i64 - 1],
        None => {
            return Err(ModelError::Input(
                "the config has no pad_token_id, so batches of more than one sequence cannot be \
                 classified (set pad_token_id, e.g. to the EOS id)"
                    .into(),
            ));
        }
    };
    Ok(Tensor::from_data(TensorData::new(idx, [b]), &ids.device()))
}

/// Picks one position per row.
///
/// # Shapes
/// - x `[B, T, C]`, index `[B]`
/// - output `[B, C]`
pub fn gather_positions(x: Tensor<3>, index: Tensor<1, Int>) -> Tensor<2> {
    let [b, _, c] = x.dims();
    // (B) -> (B, 1, C) index for a gather along T
    let idx = index.reshape([b, 1, 1]).expand([b, 1, c]);
    x.gather(1, idx).reshape([b, c])
}

/// Logits of a head tied to the token embedding `E` `[V, H]`: `h Eᵀ`. The CPU backend copies
/// a transposed operand to make it contiguous, so the product is ordered by which copy is
/// smaller: for a few rows (generation) `(E hᵀ)ᵀ` copies only the `[rows, V]` result (reading
/// `Eᵀ` would copy all of `E`, 113 MB per token for SmolLM2); for many rows (training on
/// `[1024, 49152]` logits) `h Eᵀ` copies `E` once instead of the larger result, forward and
/// backward.
///
/// # Shapes
/// - hidden `[B, T, H]`, embedding `[V, H]`
/// - output `[B, T, V]`
pub fn tied_logits(hidden: Tensor<3>, embedding: Tensor<2>) -> Tensor<3> {
    let [b, t, h] = hidden.dims();
    let [v, _] = embedding.dims();
    let rows = hidden.reshape([b * t, h]);
    if b * t <= crate::kernels::SKINNY_ROWS && crate::precision::compute().is_none() {
        // A generation step: dot products of the row with E's stored rows, over every core.
        return crate::kernels::skinny_matmul(rows, embedding.transpose()).reshape([b, t, v]);
    }
    if b * t > h {
        // (B*T, H) x (H, V) -> (B*T, V) -> (B, T, V)
        return crate::precision::matmul(rows, embedding.transpose()).reshape([b, t, v]);
    }
    // (V, H) x (H, B*T) -> (V, B*T) -> (B*T, V) -> (B, T, V)
    crate::precision::matmul(embedding, rows.transpose())
        .transpose()
        .reshape([b, t, v])
}

/// [`CausalLm::lm_cross_entropy_sum`] through the logits.
pub fn logits_cross_entropy_sum<M: CausalLm + ?Sized>(
    model: &M,
    hidden: Tensor<2>,
    targets: &[u32],
) -> Tensor<1> {
    let [n, h] = hidden.dims();
    // (N, H) -> (1, N, H) -> (1, N, V) -> (N, V)
    let logits = model.lm_logits(hidden.reshape([1, n, h]));
    let v = logits.dims()[2];
    crate::kernels::cross_entropy_sum(logits.reshape([n, v]), targets)
}

/// Next-token cross-entropy as `transformers`' causal-LM loss: logits at position `t` predict
/// label `t + 1`; labels of -100 are ignored; the mean is over counted labels.
///
/// # Shapes
/// - logits `[B, T, V]`, labels `[B, T]`
/// - output `[1]`
pub fn causal_lm_loss(logits: Tensor<3>, labels: Tensor<2, Int>) -> Tensor<1> {
    let [b, t, v] = logits.dims();
    // (B, T-1, V) -> (B*(T-1), V) against (B, T-1) -> (B*(T-1))
    let shifted = logits.slice([0..b, 0..t - 1]).reshape([b * (t - 1), v]);
    let targets = labels.slice([0..b, 1..t]).reshape([b * (t - 1)]);
    crate::layers::cross_entropy(shifted, targets, -100)
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, Distribution};

    use super::*;

    /// Both orders of the tied head give `h Eᵀ`, in value and in gradient.
    #[test]
    fn tied_logits_agree_for_few_and_many_rows() {
        let _rng = crate::test_rng();
        let device = Device::flex().autodiff();
        let e =
            Tensor::<2>::random([50, 8], Distribution::Normal(0.0, 1.0), &device).require_grad();
        for t in [1, 3, 20] {
            // t = 20 rows > 8 hidden: h Eᵀ; 1 and 3 rows: (E hᵀ)ᵀ.
            let h = Tensor::<3>::random([1, t, 8], Distribution::Normal(0.0, 1.0), &device)
                .require_grad();
            let got = tied_logits(h.clone(), e.clone());
            let want = h
                .clone()
                .reshape([t, 8])
                .matmul(e.clone().transpose())
                .reshape([1, t, 50]);
            let d: f32 = (got.clone() - want.clone()).abs().max().into_scalar();
            assert!(d < 1e-5, "{t} rows: {d}");
            let w = Tensor::<3>::random([1, t, 50], Distribution::Normal(0.0, 1.0), &device);
            let (ga, gb) = (
                (got * w.clone()).sum().backward(),
                (want * w).sum().backward(),
            );
            let d: f32 = (h.grad(&ga).unwrap() - h.grad(&gb).unwrap())
                .abs()
                .max()
                .into_scalar();
            assert!(d < 1e-4, "{t} rows, hidden gradient: {d}");
            let d: f32 = (e.grad(&ga).unwrap() - e.grad(&gb).unwrap())
                .abs()
                .max()
                .into_scalar();
            assert!(d < 1e-4, "{t} rows, embedding gradient: {d}");
        }
    }

    /// A prompt then one-token steps: the cache returns what concatenation would, and its
    /// buffers grow by doubling, not by one position per step (between growths a step writes
    /// its position into the buffer).
    #[test]
    fn one_token_steps_write_the_cache_in_place() {
        let device = Device::flex();
        let kv = |t: usize, seed: f32| {
            let values: Vec<f32> = (0..2 * 3 * t * 4).map(|i| seed + i as f32).collect();
            Tensor::<4>::from_data(burn::tensor::TensorData::new(values, [2, 3, t, 4]), &device)
        };
        let mut cache = KvCache::new(1);
        let (mut want_k, mut want_v) = (kv(5, 0.0), kv(5, 0.5));
        cache.append(0, want_k.clone(), want_v.clone());
        let mut capacities = vec![];
        for step in 0..12 {
            let (k, v) = (kv(1, 1000.0 * step as f32), kv(1, -1000.0 * step as f32));
            want_k = Tensor::cat(vec![want_k, k.clone()], 2);
            want_v = Tensor::cat(vec![want_v, v.clone()], 2);
            let (got_k, got_v) = cache.append(0, k, v);
            assert_eq!(got_k.into_data(), want_k.clone().into_data());
            assert_eq!(got_v.into_data(), want_v.clone().into_data());
            assert_eq!(cache.len(), 6 + step);
            let (buffer, _) = cache.layers[0].as_ref().unwrap();
            capacities.push(buffer.dims()[2]);
        }
        assert_eq!(capacities, [10, 10, 10, 10, 10, 20, 20, 20, 20, 20, 20, 20]);
    }
}
