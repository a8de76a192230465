//! Virtual tokens for prompt learning, the slot every family offers for them, and how a forward
//! pass places them.
//!
//! Two methods put trainable "virtual tokens" in front of the input rather than changing any
//! layer (peft's prompt-learning family):
//! - prompt tuning (Lester et al. 2021, <https://arxiv.org/abs/2104.08691>): `P` embeddings
//!   prepended to the token embeddings; the model then runs over `P + T` positions;
//! - prefix tuning (Li & Liang 2021, <https://arxiv.org/abs/2101.00190>): `P` keys and values
//!   prepended in every attention layer (transformers' `past_key_values`); the model still runs
//!   over `T` positions, numbered from `P` as after a cache of `P` tokens.
//!
//! whet-peft creates the [`PromptEncoder`] and attaches it through [`Visitor::prompt`]; the
//! families only place what it produces, so no model file knows either method.

use burn::module::{Module, Param};
use burn::tensor::{Int, Tensor};

use crate::layers::{Embedding, Linear, Mode};
use crate::weights::{VisitParams, Visitor, join};

/// The sizes virtual tokens must have for a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PromptShape {
    /// Transformer layers (one key/value prefix each).
    pub layers: usize,
    /// Width of the token embeddings (a soft prompt's width).
    pub hidden: usize,
    /// Key/value heads of attention (fewer than query heads under grouped-query attention).
    pub kv_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// Whether the family takes a key/value prefix. transformers' DistilBERT takes no
    /// `past_key_values`, so peft cannot prefix-tune it and whet does not offer it either.
    pub takes_prefix: bool,
}

impl PromptShape {
    /// Width of one layer's keys (or values): peft's `token_dim` for prefix tuning.
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

/// What the virtual tokens are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptKind {
    /// A soft prompt: embeddings in front of the token embeddings.
    Prompt,
    /// A key/value prefix in every attention layer.
    Prefix,
}

/// The trainable source of virtual tokens (peft's `PromptEmbedding` / `PrefixEncoder`).
#[derive(Module, Debug)]
pub struct PromptEncoder {
    /// `[P, hidden]` for a soft prompt; `[P, layers * 2 * kv_dim]` for a prefix without
    /// projection; `[P, kv_dim]` before the projection otherwise.
    pub embedding: Param<Tensor<2>>,
    /// Prefix projection (peft's `transform.0`): `kv_dim -> encoder_hidden_size`, then tanh.
    pub transform_in: Option<Linear>,
    /// Prefix projection (peft's `transform.2`): `encoder_hidden_size -> layers * 2 * kv_dim`.
    pub transform_out: Option<Linear>,
    #[module(skip)]
    pub kind: PromptKind,
    #[module(skip)]
    pub shape: PromptShape,
    /// When false the model runs without virtual tokens (the base model).
    pub enabled: bool,
}

/// Virtual tokens for one batch.
// Made once per forward pass, so the size difference of the variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum VirtualTokens {
    /// `[B, P, hidden]`, prepended to the token embeddings.
    Embeddings(Tensor<3>),
    /// Per layer: keys and values `[B, H_kv, P, hd]`, prepended in attention.
    KeyValues(Vec<(Tensor<4>, Tensor<4>)>),
}

impl VirtualTokens {
    /// `P`, the number of virtual tokens.
    pub fn len(&self) -> usize {
        match self {
            VirtualTokens::Embeddings(e) => e.dims()[1],
            VirtualTokens::KeyValues(kv) => kv.first().map(|(k, _)| k.dims()[2]).unwrap_or(0),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl PromptEncoder {
    /// Number of virtual tokens.
    pub fn num_virtual_tokens(&self) -> usize {
        self.embedding.dims()[0]
    }

    /// The prefix keys and values of all layers as one matrix, after the projection when there
    /// is one: what peft saves as `prompt_embeddings` for prefix tuning.
    ///
    /// # Shapes
    /// - output `[P, layers * 2 * kv_dim]`
    pub fn prefix_values(&self) -> Tensor<2> {
        let e = self.embedding.val();
        match (&self.transform_in, &self.transform_out) {
            (Some(a), Some(b)) => b.forward(a.forward(e, Mode::Eval).tanh(), Mode::Eval),
            _ => e,
        }
    }

    /// The virtual tokens of a batch of `batch` rows; None when disabled.
    pub fn virtual_tokens(&self, batch: usize) -> Option<VirtualTokens> {
        if !self.enabled {
            return None;
        }
        let p = self.num_virtual_tokens();
        match self.kind {
            PromptKind::Prompt => {
                let e = self.embedding.val();
                let d = e.dims()[1];
                // (P, H) -> (1, P, H) -> (B, P, H)
                Some(VirtualTokens::Embeddings(
                    e.reshape([1, p, d]).expand([batch, p, d]),
                ))
            }
            PromptKind::Prefix => {
                let s = self.shape;
                let (kvh, hd) = (s.kv_heads, s.head_dim);
                // peft's get_prompt: (P, L*2*kv) -> (P, 2L, KV, hd) -> (2L, KV, P, hd); layer l
                // takes rows 2l (keys) and 2l + 1 (values).
                let all = self
                    .prefix_values()
                    .reshape([p, 2 * s.layers, kvh, hd])
                    .permute([1, 2, 0, 3]);
                let pick = |i: usize| {
                    // (1, KV, P, hd) -> (B, KV, P, hd)
                    all.clone()
                        .slice(i..i + 1)
                        .reshape([1, kvh, p, hd])
                        .expand([batch, kvh, p, hd])
                };
                Some(VirtualTokens::KeyValues(
                    (0..s.layers)
                        .map(|l| (pick(2 * l), pick(2 * l + 1)))
                        .collect(),
                ))
            }
        }
    }

    /// Positions the model's output gains in front (a soft prompt's `P`; 0 for a prefix or when
    /// disabled).
    pub fn output_offset(&self) -> usize {
        match self.kind {
            PromptKind::Prompt if self.enabled => self.num_virtual_tokens(),
            _ => 0,
        }
    }
}

impl VisitParams for PromptEncoder {
    fn visit_params(&mut self, p: &str, v: &mut dyn Visitor) {
        v.matrix(
            &join(p, "embedding.weight"),
            &mut self.embedding,
            crate::weights::Layout::Same,
        );
        if let Some(l) = &mut self.transform_in {
            l.visit_params(&join(p, "transform.0"), v);
        }
        if let Some(l) = &mut self.transform_out {
            l.visit_params(&join(p, "transform.2"), v);
        }
    }
}

/// A family's slot for a prompt encoder, as a visitor sees it.
pub struct PromptSlot<'a> {
    /// The encoder, None until a prompt-learning method attaches one.
    pub encoder: &'a mut Option<PromptEncoder>,
    /// The sizes it must have.
    pub shape: PromptShape,
    /// The model's token embeddings (peft initialises a soft prompt from some of its rows).
    pub word_embeddings: &'a Embedding,
}

/// Visits a family's prompt slot under `<prefix>.prompt_encoder`: first as a whole
/// ([`Visitor::prompt`]), then, unless the visitor took it, the encoder's parameters.
pub fn visit_slot(mut slot: PromptSlot<'_>, prefix: &str, v: &mut dyn Visitor) {
    let name = join(prefix, "prompt_encoder");
    if v.prompt(&name, &mut slot) {
        return;
    }
    if let Some(e) = slot.encoder.as_mut() {
        e.visit_params(&name, v);
    }
}

/// Ones for `p` virtual positions in front of a mask.
///
/// # Shapes
/// - mask `[B, T]`
/// - output `[B, p + T]`
pub fn widen_mask(mask: Tensor<2, Int>, p: usize) -> Tensor<2, Int> {
    let [b, _] = mask.dims();
    let ones = Tensor::<2, Int>::ones([b, p], &mask.device());
    Tensor::cat(vec![ones, mask], 1)
}

/// Positions after `p` soft-prompt tokens: `0..p` for the prompt, the given ones shifted by `p`.
///
/// # Shapes
/// - positions `[B, T]`
/// - output `[B, p + T]`
pub fn prompt_positions(positions: Tensor<2, Int>, p: usize) -> Tensor<2, Int> {
    let [b, _] = positions.dims();
    let front = Tensor::<1, Int>::arange(0..p as i64, &positions.device())
        .reshape([1, p])
        .expand([b, p]);
    Tensor::cat(vec![front, positions.add_scalar(p as i64)], 1)
}
