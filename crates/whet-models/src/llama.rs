//! LLaMA-family decoder: RMSNorm, rotary position embeddings, grouped-query attention, SwiGLU.
//! Covers LLaMA 1-3, Mistral, Qwen2 (biased q/k/v) and SmolLM2.
//!
//! Paper: Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language Models"
//! (<https://arxiv.org/abs/2302.13971>). Matches `transformers.models.llama.modeling_llama`
//! (`LlamaModel`, `LlamaForCausalLM`, `LlamaForSequenceClassification`), whose rotary layout
//! is "rotate half" (GGUF checkpoints are un-permuted on load, see `crate::gguf`).

use burn::module::Module;
use burn::tensor::{Int, Tensor, TensorData};
use serde::Deserialize;

use crate::config::{Activation, HeadFields};
use crate::decoder::{
    CausalLm, DecoderInput, KvCache, gather_positions, last_non_pad, place_virtual_tokens,
};
use crate::error::{ModelError, Result};
use crate::layers::{
    Embedding, Linear, Mode, RmsNorm, TorchLinear, merge_heads, scaled_dot_product, split_heads,
};
use crate::prompt::{PromptEncoder, PromptShape, PromptSlot};
use crate::unpad::Layout;
use crate::weights::{VisitParams, Visitor, Weights, join};

/// LLaMA hyper-parameters, as in `transformers.LlamaConfig` (and Mistral / Qwen2 configs).
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
pub struct LlamaConfig {
    #[serde(default = "default_model_type")]
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// transformers >= 5 writes `rope_parameters` in place of `rope_theta` / `rope_scaling`.
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub attention_dropout: f64,
    #[serde(default = "default_act")]
    pub hidden_act: Activation,
    #[serde(default = "default_init")]
    pub initializer_range: f64,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
    /// Mistral (and Qwen2 with `use_sliding_window`): each token attends to at most this many
    /// before it. whet has no sliding-window mask, so it limits sequences to the window,
    /// within which both compute the same ([`LlamaConfig::positions`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_sliding_window: Option<bool>,
    #[serde(flatten, skip_serializing)]
    pub head: HeadFields,
}

fn default_model_type() -> String {
    "llama".into()
}
fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    2048
}
fn default_act() -> Activation {
    Activation::Silu
}
fn default_init() -> f64 {
    0.02
}

impl LlamaConfig {
    /// Key/value heads (equal to query heads without GQA).
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Per-head dimension.
    pub fn head_dim(&self) -> usize {
        // `max(1)`: a config without heads is refused by `validate`, not by a division by zero.
        self.head_dim
            .unwrap_or_else(|| self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Checks what the loader divides by, or sizes a table from, before a tensor's shape can
    /// confirm it: heads that group evenly, an even head size (rotary embeddings rotate
    /// halves), at least one layer (whose projections then confirm the head size).
    pub fn validate(&self) -> std::result::Result<(), String> {
        let (heads, kv, hd) = (self.num_attention_heads, self.kv_heads(), self.head_dim());
        if heads == 0 || kv == 0 || !heads.is_multiple_of(kv) {
            return Err(format!(
                "num_attention_heads = {heads} must be a positive multiple of \
                 num_key_value_heads = {kv}"
            ));
        }
        if hd == 0 || !hd.is_multiple_of(2) || heads.checked_mul(hd).is_none() {
            return Err(format!(
                "head_dim = {hd} must be even and positive (rotary embeddings rotate halves)"
            ));
        }
        if self.num_hidden_layers == 0 {
            return Err("num_hidden_layers = 0: a decoder needs at least one layer".into());
        }
        Ok(())
    }

    /// The attention window, where the architecture uses one: Mistral's `sliding_window`,
    /// Qwen2's when `use_sliding_window` is true.
    pub fn attention_window(&self) -> Option<usize> {
        match self.model_type.as_str() {
            "mistral" => self.sliding_window,
            "qwen2" if self.use_sliding_window == Some(true) => self.sliding_window,
            _ => None,
        }
    }

    /// The longest sequence whet computes as transformers does: the position table, or the
    /// attention window when shorter (past it transformers masks what whet would attend to).
    pub fn positions(&self) -> usize {
        self.attention_window()
            .map_or(self.max_position_embeddings, |w| {
                w.min(self.max_position_embeddings)
            })
    }

    /// Whether q/k/v projections carry a bias (Qwen2 always does).
    pub fn qkv_bias(&self) -> bool {
        self.attention_bias || self.model_type == "qwen2"
    }

    fn rope_field(&self, key: &str) -> Option<&serde_json::Value> {
        self.rope_parameters
            .as_ref()
            .and_then(|p| p.get(key))
            .or_else(|| self.rope_scaling.as_ref().and_then(|p| p.get(key)))
    }

    /// RoPE base frequency.
    pub fn theta(&self) -> f64 {
        self.rope_theta
            .or_else(|| self.rope_field("rope_theta").and_then(|v| v.as_f64()))
            .unwrap_or(10000.0)
    }

    /// Inverse frequencies of the rotary embedding, with `rope_scaling` applied as
    /// `transformers`' `ROPE_INIT_FUNCTIONS` do for the "default", "linear" and "llama3" types.
    pub fn inv_freq(&self) -> Result<Vec<f32>> {
        let d = self.head_dim();
        let theta = self.theta();
        let base: Vec<f32> = (0..d / 2)
            .map(|i| (1.0 / theta.powf((2 * i) as f64 / d as f64)) as f32)
            .collect();
        let ty = self
            .rope_field("rope_type")
            .or_else(|| self.rope_field("type"))
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        let num = |k: &str| self.rope_field(k).and_then(|v| v.as_f64());
        match ty {
            "default" => Ok(base),
            "linear" => {
                let factor = num("factor").unwrap_or(1.0) as f32;
                Ok(base.iter().map(|f| f / factor).collect())
            }
            "llama3" => {
                let factor = num("factor").unwrap_or(8.0);
                let low = num("low_freq_factor").unwrap_or(1.0);
                let high = num("high_freq_factor").unwrap_or(4.0);
                let old = num("original_max_position_embeddings").unwrap_or(8192.0);
                let (low_wl, high_wl) = (old / low, old / high);
                Ok(base
                    .iter()
                    .map(|&f| {
                        let f = f as f64;
                        let wl = 2.0 * std::f64::consts::PI / f;
                        let scaled = if wl > low_wl { f / factor } else { f };
                        let medium = (high_wl..=low_wl).contains(&wl);
                        if medium {
                            let s = (old / wl - low) / (high - low);
                            ((1.0 - s) * scaled / factor + s * scaled) as f32
                        } else {
                            scaled as f32
                        }
                    })
                    .collect())
            }
            other => Err(ModelError::Config {
                path: "config.json".into(),
                message: format!(
                    "rope scaling type {other:?} is not supported (default, linear, llama3 are)"
                ),
            }),
        }
    }
}

/// Rotary tables for a batch of positions.
#[derive(Debug, Clone)]
pub struct Rope {
    /// `[B, 1, T, hd]`
    pub cos: Tensor<4>,
    /// `[B, 1, T, hd]`
    pub sin: Tensor<4>,
}

impl Rope {
    /// # Shapes
    /// - positions `[B, T]`, inv_freq `[hd / 2]`
    fn new(positions: Tensor<2, Int>, inv_freq: Tensor<1>) -> Self {
        let [b, t] = positions.dims();
        let half = inv_freq.dims()[0];
        // (B, T, 1) * (1, 1, hd/2) -> (B, T, hd/2)
        let freqs = positions.float().reshape([b, t, 1]) * inv_freq.reshape([1, 1, half]);
        // (B, T, hd) -> (B, 1, T, hd)
        let emb = Tensor::cat(vec![freqs.clone(), freqs], 2).reshape([b, 1, t, 2 * half]);
        Self {
            cos: emb.clone().cos(),
            sin: emb.sin(),
        }
    }

    /// `x * cos + rotate_half(x) * sin`, with `rotate_half([x1, x2]) = [-x2, x1]`.
    ///
    /// # Shapes
    /// - x `[B, H, T, hd]`
    fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        crate::kernels::rope(x, self.cos.clone(), self.sin.clone())
    }
}

/// Repeats each key/value head `n_rep` times for grouped-query attention.
///
/// # Shapes
/// - x `[B, H_kv, T, hd]`
/// - output `[B, H_kv * n_rep, T, hd]`
fn repeat_kv(x: Tensor<4>, n_rep: usize) -> Tensor<4> {
    if n_rep == 1 {
        return x;
    }
    let [b, kv, t, d] = x.dims();
    // (B, KV, T, hd) -> (B, KV, 1, T, hd) -> (B, KV, rep, T, hd) -> (B, KV*rep, T, hd)
    x.reshape([b, kv, 1, t, d])
        .expand([b, kv, n_rep, t, d])
        .reshape([b, kv * n_rep, t, d])
}

/// One pre-norm block: `x + attn(norm(x))`, then `x + mlp(norm(x))`.
#[derive(Module, Debug)]
pub struct LlamaLayer {
    pub input_layernorm: RmsNorm,
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub post_attention_layernorm: RmsNorm,
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
    pub heads: usize,
    pub kv_heads: usize,
    pub attention_dropout: f64,
    #[module(skip)]
    pub act: Activation,
}

impl LlamaLayer {
    fn load(vb: &Weights, c: &LlamaConfig) -> Result<Self> {
        let (h, hd) = (c.hidden_size, c.head_dim());
        let (nq, nkv) = (c.num_attention_heads, c.kv_heads());
        let lin =
            |name: &str, i, o, bias| Linear::load(&vb.pp(name), i, o, bias, TorchLinear::Linear);
        Ok(Self {
            input_layernorm: RmsNorm::load(&vb.pp("input_layernorm"), h, c.rms_norm_eps)?,
            q_proj: lin("self_attn.q_proj", h, nq * hd, c.qkv_bias())?,
            k_proj: lin("self_attn.k_proj", h, nkv * hd, c.qkv_bias())?,
            v_proj: lin("self_attn.v_proj", h, nkv * hd, c.qkv_bias())?,
            o_proj: lin("self_attn.o_proj", nq * hd, h, c.attention_bias)?,
            post_attention_layernorm: RmsNorm::load(
                &vb.pp("post_attention_layernorm"),
                h,
                c.rms_norm_eps,
            )?,
            gate_proj: lin("mlp.gate_proj", h, c.intermediate_size, c.mlp_bias)?,
            up_proj: lin("mlp.up_proj", h, c.intermediate_size, c.mlp_bias)?,
            down_proj: lin("mlp.down_proj", c.intermediate_size, h, c.mlp_bias)?,
            heads: nq,
            kv_heads: nkv,
            attention_dropout: c.attention_dropout,
            act: c.hidden_act,
        })
    }

    /// Token-wise layers run in `layout`, attention on padded rows.
    ///
    /// # Shapes
    /// - x `[B, T, H]` (`[1, N, H]` padding-free), bias `[B, 1, T, T_past + T]`
    /// - output as x
    fn forward(
        &self,
        x: Tensor<3>,
        layout: &Layout,
        rope: &Rope,
        bias: Tensor<4>,
        cache: Option<(&mut KvCache, usize)>,
        mode: Mode,
    ) -> Tensor<3> {
        let h = self.input_layernorm.forward(x.clone());
        let heads = |y: Tensor<3>, n| split_heads(layout.pad(y), n);
        let q = rope.apply(heads(self.q_proj.forward(h.clone(), mode), self.heads));
        let mut k = rope.apply(heads(self.k_proj.forward(h.clone(), mode), self.kv_heads));
        let mut v = heads(self.v_proj.forward(h, mode), self.kv_heads);
        if let Some((cache, layer)) = cache {
            (k, v) = cache.append(layer, k, v);
        }
        let rep = self.heads / self.kv_heads;
        let ctx = scaled_dot_product(
            q,
            repeat_kv(k, rep),
            repeat_kv(v, rep),
            bias,
            self.attention_dropout,
            mode,
        );
        let x = x + self.o_proj.forward(layout.enter(merge_heads(ctx)), mode);
        let h = self.post_attention_layernorm.forward(x.clone());
        let (gate, up) = (
            self.gate_proj.forward(h.clone(), mode),
            self.up_proj.forward(h, mode),
        );
        let gated = match self.act {
            Activation::Silu => crate::kernels::swiglu(gate, up),
            act => act.forward(gate) * up,
        };
        x + self.down_proj.forward(gated, mode)
    }
}

impl VisitParams for LlamaLayer {
    fn visit_params(&mut self, p: &str, v: &mut dyn Visitor) {
        self.input_layernorm
            .visit_params(&join(p, "input_layernorm"), v);
        self.q_proj.visit_params(&join(p, "self_attn.q_proj"), v);
        self.k_proj.visit_params(&join(p, "self_attn.k_proj"), v);
        self.v_proj.visit_params(&join(p, "self_attn.v_proj"), v);
        self.o_proj.visit_params(&join(p, "self_attn.o_proj"), v);
        self.post_attention_layernorm
            .visit_params(&join(p, "post_attention_layernorm"), v);
        self.gate_proj.visit_params(&join(p, "mlp.gate_proj"), v);
        self.up_proj.visit_params(&join(p, "mlp.up_proj"), v);
        self.down_proj.visit_params(&join(p, "mlp.down_proj"), v);
    }
}

/// The decoder stack (`LlamaModel`).
#[derive(Module, Debug)]
pub struct LlamaModel {
    pub embed_tokens: Embedding,
    pub layers: Vec<LlamaLayer>,
    pub norm: RmsNorm,
    /// `[hd / 2]`, a constant (not trained).
    #[module(skip)]
    pub inv_freq: Tensor<1>,
    /// Virtual tokens of prompt learning, attached from outside (whet-peft).
    pub prompt: Option<PromptEncoder>,
}

impl LlamaModel {
    /// Loads from `vb` scoped to the `model.` prefix.
    pub fn load(vb: &Weights, c: &LlamaConfig) -> Result<Self> {
        let embed_tokens = Embedding::load(&vb.pp("embed_tokens"), c.vocab_size, c.hidden_size)?
            .with_padding_idx(c.pad_token_id);
        let layers = (0..c.num_hidden_layers)
            .map(|i| LlamaLayer::load(&vb.pp(format!("layers.{i}")), c))
            .collect::<Result<_>>()?;
        // After the layers: their q projections' shapes have confirmed the head size the
        // rotary table is sized from.
        let inv_freq = c.inv_freq()?;
        let n = inv_freq.len();
        Ok(Self {
            embed_tokens,
            layers,
            norm: RmsNorm::load(&vb.pp("norm"), c.hidden_size, c.rms_norm_eps)?,
            inv_freq: Tensor::from_data(TensorData::new(inv_freq, [n]), vb.device()),
            prompt: None,
        })
    }

    /// # Shapes
    /// - output `[B, T, H]`
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
        let mut x = self.embed_tokens.forward(input.input_ids.clone());
        if let Some(e) = soft_prompt {
            // (B, P, H) ++ (B, T, H) -> (B, P + T, H)
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
        let rope = Rope::new(positions, self.inv_freq.clone());
        let unpadded = input
            .unpadded
            .map(|u| u.widen(t - input.input_ids.dims()[1]));
        let layout = Layout::new(unpadded.as_ref(), &x.device());
        let mut x = layout.enter(x);
        for (i, layer) in self.layers.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|c| (c, i));
            x = layer.forward(x, &layout, &rope, bias.clone(), layer_cache, mode);
        }
        layout.pad(self.norm.forward(x))
    }
}

impl VisitParams for LlamaModel {
    fn visit_params(&mut self, p: &str, v: &mut dyn Visitor) {
        self.embed_tokens.visit_params(&join(p, "embed_tokens"), v);
        for (i, layer) in self.layers.iter_mut().enumerate() {
            layer.visit_params(&join(p, &format!("layers.{i}")), v);
        }
        self.norm.visit_params(&join(p, "norm"), v);
        let shape = self.prompt_shape();
        let slot = PromptSlot {
            encoder: &mut self.prompt,
            shape,
            word_embeddings: &self.embed_tokens,
        };
        crate::prompt::visit_slot(slot, p, v);
    }
}

impl LlamaModel {
    /// The sizes of this model's virtual tokens.
    pub fn prompt_shape(&self) -> PromptShape {
        let first = &self.layers[0];
        let kv_dim = first.k_proj.dims().1;
        PromptShape {
            layers: self.layers.len(),
            hidden: self.embed_tokens.weight.dims()[1],
            kv_heads: first.kv_heads,
            head_dim: kv_dim / first.kv_heads,
            takes_prefix: true,
        }
    }

    /// Positions a soft prompt adds in front of the output.
    pub fn virtual_positions(&self) -> usize {
        self.prompt.as_ref().map_or(0, |e| e.output_offset())
    }
}

/// `LlamaForCausalLM`: the decoder and an LM head, tied to the embedding or not.
#[derive(Module, Debug)]
pub struct LlamaForCausalLm {
    pub model: LlamaModel,
    /// `None` when tied to `model.embed_tokens`.
    pub lm_head: Option<Linear>,
    pub max_positions: usize,
}

impl LlamaForCausalLm {
    /// Loads decoder and head. A checkpoint without `lm_head.weight` is treated as tied, as
    /// `transformers` does for `tie_word_embeddings = true`.
    pub fn load(vb: &Weights, c: &LlamaConfig) -> Result<Self> {
        let model = LlamaModel::load(&vb.pp("model"), c)?;
        let lm_head = if c.tie_word_embeddings || !vb.contains("lm_head.weight") {
            None
        } else {
            Some(Linear::load(
                &vb.pp("lm_head"),
                c.hidden_size,
                c.vocab_size,
                false,
                TorchLinear::Linear,
            )?)
        };
        Ok(Self {
            model,
            lm_head,
            max_positions: c.positions(),
        })
    }
}

impl CausalLm for LlamaForCausalLm {
    fn forward_hidden(
        &self,
        input: DecoderInput,
        cache: Option<&mut KvCache>,
        mode: Mode,
    ) -> Tensor<3> {
        self.model.forward(input, cache, mode)
    }

    fn lm_logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        match &self.lm_head {
            Some(head) => head.forward(hidden, Mode::Eval),
            None => crate::decoder::tied_logits(hidden, self.model.embed_tokens.weight.val()),
        }
    }

    fn lm_cross_entropy_sum(&self, hidden: Tensor<2>, targets: &[u32]) -> Tensor<1> {
        use crate::layers::LinearWeight;
        let weight = match &self.lm_head {
            None => Some(self.model.embed_tokens.weight.val()),
            // [H, V] read as its transpose [V, H], in place.
            Some(head) => match &head.weight {
                LinearWeight::Dense(w)
                    if head.bias.is_none()
                        && head.adapter.is_none()
                        && head.ia3.is_none()
                        && head.bottleneck.is_none() =>
                {
                    Some(w.val().transpose())
                }
                _ => None,
            },
        };
        match weight {
            Some(w) => crate::kernels::linear_cross_entropy_sum(hidden, w, targets),
            None => crate::decoder::logits_cross_entropy_sum(self, hidden, targets),
        }
    }

    fn new_cache(&self) -> KvCache {
        KvCache::new(self.model.layers.len())
    }

    fn max_positions(&self) -> usize {
        self.max_positions
    }

    fn vocab_size(&self) -> usize {
        self.model.embed_tokens.weight.dims()[0]
    }

    fn virtual_positions(&self) -> usize {
        self.model.virtual_positions()
    }
}

impl VisitParams for LlamaForCausalLm {
    fn visit_params(&mut self, p: &str, v: &mut dyn Visitor) {
        self.model.visit_params(&join(p, "model"), v);
        if let Some(head) = &mut self.lm_head {
            head.visit_params(&join(p, "lm_head"), v);
        }
    }
}

/// `LlamaForSequenceClassification`: a bias-free `score` layer at the last non-pad token.
#[derive(Module, Debug)]
pub struct LlamaForSequenceClassification {
    pub model: LlamaModel,
    pub score: Linear,
    #[module(skip)]
    pub pad_token_id: Option<u32>,
}

impl LlamaForSequenceClassification {
    /// Loads decoder and score layer (initialised when absent, name returned).
    pub fn load(vb: &Weights, c: &LlamaConfig) -> Result<(Self, Vec<String>)> {
        let model = LlamaModel::load(&vb.pp("model"), c)?;
        let (score, fresh) = crate::load_or_init_linear_nobias(
            &vb.pp("score"),
            c.hidden_size,
            c.head.num_labels(),
            c.initializer_range,
        )?;
        Ok((
            Self {
                model,
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
            .add_scalar(self.model.virtual_positions() as i64);
        let h = self.model.forward(input, None, mode);
        Ok(gather_positions(self.score.forward(h, mode), last))
    }
}

impl VisitParams for LlamaForSequenceClassification {
    fn visit_params(&mut self, p: &str, v: &mut dyn Visitor) {
        self.model.visit_params(&join(p, "model"), v);
        self.score.visit_params(&join(p, "score"), v);
    }
}
