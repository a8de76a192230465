//! GPT-2 decoder with tied language-modelling head and sequence-classification head.
//!
//! Paper: Radford et al. 2019, "Language Models are Unsupervised Multitask Learners".
//! Matches `transformers.models.gpt2.modeling_gpt2` (`GPT2Model`, `GPT2LMHeadModel`,
//! `GPT2ForSequenceClassification`). Its `Conv1D` layers store weights `[in, out]`, which whet
//! keeps as they are ([`TorchLinear::Conv1D`]).

use burn::module::Module;
use burn::tensor::{Int, Tensor};
use serde::Deserialize;

use crate::config::{Activation, HeadFields};
use crate::decoder::{
    CausalLm, DecoderInput, KvCache, gather_positions, last_non_pad, place_virtual_tokens,
};
use crate::error::Result;
use crate::layers::{Embedding, LayerNorm, Linear, Mode, TorchLinear, dropout, split_heads};
use crate::prompt::{PromptEncoder, PromptShape, PromptSlot};
use crate::unpad::Layout;
use crate::weights::{VisitParams, Visitor, Weights, join};

/// GPT-2 hyper-parameters, as in `transformers.GPT2Config`.
#[derive(Debug, Clone, Deserialize)]
pub struct Gpt2Config {
    pub vocab_size: usize,
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    #[serde(default)]
    pub n_inner: Option<usize>,
    #[serde(default = "default_act")]
    pub activation_function: Activation,
    #[serde(default = "default_dropout")]
    pub resid_pdrop: f64,
    #[serde(default = "default_dropout")]
    pub embd_pdrop: f64,
    #[serde(default = "default_dropout")]
    pub attn_pdrop: f64,
    #[serde(default = "default_ln_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_init")]
    pub initializer_range: f64,
    #[serde(default)]
    pub summary_first_dropout: Option<f64>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    #[serde(flatten)]
    pub head: HeadFields,
}

fn default_act() -> Activation {
    Activation::GeluTanh
}
fn default_dropout() -> f64 {
    0.1
}
fn default_ln_eps() -> f64 {
    1e-5
}
fn default_init() -> f64 {
    0.02
}

/// One pre-norm block: `x + attn(ln_1(x))`, then `x + mlp(ln_2(x))`.
#[derive(Module, Debug)]
pub struct Gpt2Block {
    pub ln_1: LayerNorm,
    /// Fused query/key/value projection `[E, 3E]`.
    pub c_attn: Linear,
    pub attn_proj: Linear,
    pub ln_2: LayerNorm,
    pub c_fc: Linear,
    pub mlp_proj: Linear,
    pub heads: usize,
    pub attn_pdrop: f64,
    pub resid_pdrop: f64,
    #[module(skip)]
    pub act: Activation,
}

impl Gpt2Block {
    fn load(vb: &Weights, c: &Gpt2Config) -> Result<Self> {
        let e = c.n_embd;
        let inner = c.n_inner.unwrap_or(4 * e);
        let conv = |name: &str, i, o| Linear::load(&vb.pp(name), i, o, true, TorchLinear::Conv1D);
        Ok(Self {
            ln_1: LayerNorm::load(&vb.pp("ln_1"), e, c.layer_norm_epsilon)?,
            c_attn: conv("attn.c_attn", e, 3 * e)?,
            attn_proj: conv("attn.c_proj", e, e)?,
            ln_2: LayerNorm::load(&vb.pp("ln_2"), e, c.layer_norm_epsilon)?,
            c_fc: conv("mlp.c_fc", e, inner)?,
            mlp_proj: conv("mlp.c_proj", inner, e)?,
            heads: c.n_head,
            attn_pdrop: c.attn_pdrop,
            resid_pdrop: c.resid_pdrop,
            act: c.activation_function,
        })
    }

    /// Token-wise layers run in `layout`, attention on padded rows.
    ///
    /// # Shapes
    /// - x `[B, T, E]` (`[1, N, E]` padding-free), bias `[B, 1, T, T_past + T]`
    /// - output as x
    fn forward(
        &self,
        x: Tensor<3>,
        layout: &Layout,
        bias: Tensor<4>,
        cache: Option<(&mut KvCache, usize)>,
        mode: Mode,
    ) -> Tensor<3> {
        let attend = layout.attend(&x, cache.is_none());
        // (B, T, E) -> (B, T, 3E) -> three (B, T, E)
        let qkv = attend.rows(self.c_attn.forward(self.ln_1.forward(x.clone()), mode));
        let e = qkv.dims()[2] / 3;
        let [q, k, v] = crate::kernels::split_last(qkv, [e, e, e]);
        let q = split_heads(q, self.heads);
        let (mut k, mut v) = (split_heads(k, self.heads), split_heads(v, self.heads));
        if let Some((cache, layer)) = cache {
            (k, v) = cache.append(layer, k, v);
        }
        let ctx = attend.merge(attend.run([q, k, v], bias, self.attn_pdrop, mode));
        let x = x + dropout(self.attn_proj.forward(ctx, mode), self.resid_pdrop, mode);
        let h = self
            .act
            .forward(self.c_fc.forward(self.ln_2.forward(x.clone()), mode));
        x.clone() + dropout(self.mlp_proj.forward(h, mode), self.resid_pdrop, mode)
    }
}

impl VisitParams for Gpt2Block {
    fn visit_params(&mut self, p: &str, v: &mut dyn Visitor) {
        self.ln_1.visit_params(&join(p, "ln_1"), v);
        self.c_attn.visit_params(&join(p, "attn.c_attn"), v);
        self.attn_proj.visit_params(&join(p, "attn.c_proj"), v);
        self.ln_2.visit_params(&join(p, "ln_2"), v);
        self.c_fc.visit_params(&join(p, "mlp.c_fc"), v);
        self.mlp_proj.visit_params(&join(p, "mlp.c_proj"), v);
    }
}

/// The decoder stack (`GPT2Model`).
#[derive(Module, Debug)]
pub struct Gpt2Model {
    pub wte: Embedding,
    pub wpe: Embedding,
    pub h: Vec<Gpt2Block>,
    pub ln_f: LayerNorm,
    pub embd_pdrop: f64,
    /// Virtual tokens of prompt learning, attached from outside (whet-peft).
    pub prompt: Option<PromptEncoder>,
}

impl Gpt2Model {
    /// Loads from `vb` scoped to the `transformer.` prefix if any.
    pub fn load(vb: &Weights, c: &Gpt2Config) -> Result<Self> {
        Ok(Self {
            wte: Embedding::load(&vb.pp("wte"), c.vocab_size, c.n_embd)?,
            wpe: Embedding::load(&vb.pp("wpe"), c.n_positions, c.n_embd)?,
            h: (0..c.n_layer)
                .map(|i| Gpt2Block::load(&vb.pp(format!("h.{i}")), c))
                .collect::<Result<_>>()?,
            ln_f: LayerNorm::load(&vb.pp("ln_f"), c.n_embd, c.layer_norm_epsilon)?,
            embd_pdrop: c.embd_pdrop,
            prompt: None,
        })
    }

    /// # Shapes
    /// - output `[B, T, E]`
    pub fn forward(
        &self,
        input: DecoderInput,
        cache: Option<&mut KvCache>,
        mode: Mode,
    ) -> Tensor<3> {
        let mut input = input;
        let mut local = KvCache::default();
        let (mut cache, soft_prompt) =
            place_virtual_tokens(self.prompt.as_ref(), &mut input, cache, &mut local);
        let mut x = self.wte.forward(input.input_ids.clone());
        if let Some(e) = soft_prompt {
            // (B, P, E) ++ (B, T, E) -> (B, P + T, E)
            x = Tensor::cat(vec![e, x], 1);
        }
        let [b, t, _] = x.dims();
        let past = cache.as_ref().map(|c| c.len()).unwrap_or(0);
        let bias = crate::decoder::decoder_bias(&input, t);
        let positions = input.position_ids.unwrap_or_else(|| {
            Tensor::<1, Int>::arange(past as i64..(past + t) as i64, &x.device())
                .reshape([1, t])
                .expand([b, t])
        });
        let x = x + self.wpe.forward(positions);
        let unpadded = input
            .unpadded
            .map(|u| u.widen(t - input.input_ids.dims()[1]));
        let layout = Layout::new(unpadded.as_ref(), &x.device());
        let mut x = layout.enter(dropout(x, self.embd_pdrop, mode));
        for (i, block) in self.h.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|c| (c, i));
            x = block.forward(x, &layout, bias.clone(), layer_cache, mode);
        }
        layout.pad(self.ln_f.forward(x))
    }
}

impl VisitParams for Gpt2Model {
    fn visit_params(&mut self, p: &str, v: &mut dyn Visitor) {
        self.wte.visit_params(&join(p, "wte"), v);
        self.wpe.visit_params(&join(p, "wpe"), v);
        for (i, block) in self.h.iter_mut().enumerate() {
            block.visit_params(&join(p, &format!("h.{i}")), v);
        }
        self.ln_f.visit_params(&join(p, "ln_f"), v);
        let shape = self.prompt_shape();
        let slot = PromptSlot {
            encoder: &mut self.prompt,
            shape,
            word_embeddings: &self.wte,
        };
        crate::prompt::visit_slot(slot, p, v);
    }
}

impl Gpt2Model {
    /// The sizes of this model's virtual tokens.
    pub fn prompt_shape(&self) -> PromptShape {
        let e = self.wte.weight.dims()[1];
        let heads = self.h[0].heads;
        PromptShape {
            layers: self.h.len(),
            hidden: e,
            kv_heads: heads,
            head_dim: e / heads,
            takes_prefix: true,
        }
    }

    /// Positions a soft prompt adds in front of the output.
    pub fn virtual_positions(&self) -> usize {
        self.prompt.as_ref().map_or(0, |e| e.output_offset())
    }
}

fn base_prefix(vb: &Weights) -> &'static str {
    if vb.contains("transformer.wte.weight") {
        "transformer"
    } else {
        ""
    }
}

/// `GPT2LMHeadModel`: the decoder and a head tied to the token embedding.
#[derive(Module, Debug)]
pub struct Gpt2LmHeadModel {
    pub transformer: Gpt2Model,
    pub max_positions: usize,
}

impl Gpt2LmHeadModel {
    /// Loads the decoder (the head is the transposed token embedding).
    pub fn load(vb: &Weights, c: &Gpt2Config) -> Result<Self> {
        Ok(Self {
            transformer: Gpt2Model::load(&vb.pp(base_prefix(vb)), c)?,
            max_positions: c.n_positions,
        })
    }
}

impl CausalLm for Gpt2LmHeadModel {
    fn forward_hidden(
        &self,
        input: DecoderInput,
        cache: Option<&mut KvCache>,
        mode: Mode,
    ) -> Tensor<3> {
        self.transformer.forward(input, cache, mode)
    }

    fn lm_logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        crate::decoder::tied_logits(hidden, self.transformer.wte.weight.val())
    }

    fn lm_cross_entropy_sum(&self, hidden: Tensor<2>, targets: &[u32]) -> Tensor<1> {
        crate::kernels::linear_cross_entropy_sum(hidden, self.transformer.wte.weight.val(), targets)
    }

    fn new_cache(&self) -> KvCache {
        KvCache::new(self.transformer.h.len())
    }

    fn max_positions(&self) -> usize {
        self.max_positions
    }

    fn vocab_size(&self) -> usize {
        self.transformer.wte.weight.dims()[0]
    }

    fn virtual_positions(&self) -> usize {
        self.transformer.virtual_positions()
    }
}

impl VisitParams for Gpt2LmHeadModel {
    fn visit_params(&mut self, p: &str, v: &mut dyn Visitor) {
        self.transformer.visit_params(&join(p, "transformer"), v);
    }
}

/// `GPT2ForSequenceClassification`: a bias-free `score` layer read at the last non-pad token.
#[derive(Module, Debug)]
pub struct Gpt2ForSequenceClassification {
    pub transformer: Gpt2Model,
    pub score: Linear,
    #[module(skip)]
    pub pad_token_id: Option<u32>,
}

impl Gpt2ForSequenceClassification {
    /// Loads the decoder and the score layer (initialised when absent, name returned).
    pub fn load(vb: &Weights, c: &Gpt2Config) -> Result<(Self, Vec<String>)> {
        let transformer = Gpt2Model::load(&vb.pp(base_prefix(vb)), c)?;
        let (score, fresh) = crate::load_or_init_linear_nobias(
            &vb.pp("score"),
            c.n_embd,
            c.head.num_labels(),
            c.initializer_range,
        )?;
        Ok((
            Self {
                transformer,
                score,
                pad_token_id: c.pad_token_id,
            },
            fresh,
        ))
    }

    /// # Shapes
    /// - logits `[B, num_labels]`
    pub fn forward(&self, input: DecoderInput, mode: Mode) -> Result<Tensor<2>> {
        // A soft prompt puts its positions in front of every row's tokens.
        let last = last_non_pad(&input.input_ids, self.pad_token_id)?
            .add_scalar(self.transformer.virtual_positions() as i64);
        let h = self.transformer.forward(input, None, mode);
        Ok(gather_positions(self.score.forward(h, mode), last))
    }
}

impl VisitParams for Gpt2ForSequenceClassification {
    fn visit_params(&mut self, p: &str, v: &mut dyn Visitor) {
        self.transformer.visit_params(&join(p, "transformer"), v);
        self.score.visit_params(&join(p, "score"), v);
    }
}
