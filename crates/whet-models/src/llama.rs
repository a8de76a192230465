//! The rotary decoders: RMSNorm, rotary position embeddings, grouped-query attention, a gated
//! MLP. LLaMA 1-3, Mistral, Qwen2 and SmolLM2 are the plain form; the families built on it
//! differ in a few switches, each read from the config in one place ([`LlamaConfig`]'s
//! architecture methods):
//! - Qwen3: RMSNorm on each head's queries and keys before the rotation;
//! - Phi-3: q/k/v as one `qkv_proj` and gate/up as one `gate_up_proj`;
//! - Gemma: embeddings scaled by `sqrt(hidden)`, norms scaling by `1 + weight`, a GELU-tanh MLP;
//!   Gemma 2 adds norms after attention and around the MLP, tanh soft-capping of attention
//!   scores and logits, `query_pre_attn_scalar`, and sliding-window layers alternating with
//!   global ones; Gemma 3 (text) replaces the attention cap with q/k norms and gives local layers
//!   their own rope base.
//!
//! Paper: Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language Models"
//! (<https://arxiv.org/abs/2302.13971>). Matches `transformers.models.llama.modeling_llama`
//! (`LlamaModel`, `LlamaForCausalLM`, `LlamaForSequenceClassification`) and the `mistral`,
//! `qwen2`, `qwen3`, `phi3`, `gemma`, `gemma2` and `gemma3` (text) modules, whose rotary layout
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
    Embedding, Linear, Mode, RmsNorm, TorchLinear, dropout, normed_projections, repeat_kv,
};
use crate::prompt::{PromptEncoder, PromptShape, PromptSlot};
use crate::unpad::Layout;
use crate::weights::{VisitParams, Visitor, Weights, join};

/// The `model_type`s this decoder implements.
pub const MODEL_TYPES: &[&str] = &[
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "phi3",
    "gemma",
    "gemma2",
    "gemma3_text",
];

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
    /// The fields of Gemma, Qwen3 and Phi-3 configs.
    #[serde(flatten)]
    pub variant: VariantFields,
    #[serde(flatten, skip_serializing)]
    pub head: HeadFields,
}

/// The config fields of the families that change LLaMA's decoder, under their configs' names.
/// `None` is an absent key; where a family's default differs from "off", the architecture
/// methods of [`LlamaConfig`] apply it.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
pub struct VariantFields {
    /// Gemma's name for the MLP activation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_activation: Option<Activation>,
    /// Gemma 2/3: attention scores are scaled by `query_pre_attn_scalar^-0.5`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_pre_attn_scalar: Option<f64>,
    /// Gemma 2/3: `tanh(logits / cap) * cap` on the output (a number, or null for none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_logit_softcapping: Option<serde_json::Value>,
    /// Gemma 2: the same on attention scores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attn_logit_softcapping: Option<serde_json::Value>,
    /// `"full_attention"` or `"sliding_attention"` per layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_types: Option<Vec<String>>,
    /// Gemma 3 configs before `layer_types`: every n-th layer is global.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window_pattern: Option<usize>,
    /// Gemma 3 configs before `rope_parameters`: the local layers' rope base.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_local_base_freq: Option<f64>,
    /// Qwen2/3: layers from this index on use the sliding window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_window_layers: Option<usize>,
    /// Rotation of a fraction of each head (Phi-3.5 / Phi-4-mini): refused unless 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial_rotary_factor: Option<f64>,
    /// Gemma 3 as an encoder: refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_bidirectional_attention: Option<bool>,
    /// Phi-3: dropout on the attention and MLP outputs before each residual add (training).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resid_pdrop: Option<f64>,
    /// Phi-3: the pretraining context, where LongRoPE switches to its long factors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<usize>,
}

/// LongRoPE's second table and when it applies.
#[derive(Debug, Clone)]
pub struct LongRope {
    /// Inverse frequencies with the long factors.
    pub long: Vec<f32>,
    /// Past this many positions the long factors apply.
    pub original_max: usize,
}

/// Which attention a layer uses, as `layer_types` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    /// Every earlier token.
    Full,
    /// The last `sliding_window` tokens.
    Sliding,
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
        if !self.is(MODEL_TYPES) {
            return Err(format!(
                "model_type {:?} is not a rotary decoder whet implements ({})",
                self.model_type,
                MODEL_TYPES.join(", ")
            ));
        }
        self.unsupported()?;
        self.check_layer_types()
    }

    fn is(&self, types: &[&str]) -> bool {
        types.contains(&self.model_type.as_str())
    }

    fn is_gemma(&self) -> bool {
        self.is(&["gemma", "gemma2", "gemma3_text"])
    }

    /// The longest sequence the position table allows.
    pub fn positions(&self) -> usize {
        self.max_position_embeddings
    }

    /// Whether q/k/v projections carry a bias (Qwen2 always does).
    pub fn qkv_bias(&self) -> bool {
        self.attention_bias || self.model_type == "qwen2"
    }

    /// Added to RMSNorm weights before scaling (Gemma stores `weight - 1`).
    pub fn norm_offset(&self) -> f64 {
        if self.is_gemma() { 1.0 } else { 0.0 }
    }

    /// Qwen3 and Gemma 3 normalise each head's queries and keys (`q_norm`, `k_norm`).
    pub fn qk_norm(&self) -> bool {
        self.is(&["qwen3", "gemma3_text"])
    }

    /// Gemma 2/3 normalise the attention output and both sides of the MLP as well.
    pub fn sandwich_norms(&self) -> bool {
        self.is(&["gemma2", "gemma3_text"])
    }

    /// Phi-3 stores q/k/v as one `qkv_proj` and gate/up as one `gate_up_proj`.
    pub fn fused_projections(&self) -> bool {
        self.model_type == "phi3"
    }

    /// The MLP's activation (Gemma: `hidden_activation`, GELU-tanh by default).
    pub fn activation(&self) -> Activation {
        match self.variant.hidden_activation {
            Some(a) => a,
            None if self.is_gemma() => Activation::GeluTanh,
            None => self.hidden_act,
        }
    }

    /// Gemma's embedding scale, `sqrt(hidden_size)`.
    pub fn embed_scale(&self) -> Option<f32> {
        self.is_gemma()
            .then(|| (self.hidden_size as f64).sqrt() as f32)
    }

    /// Gemma 2/3's `query_pre_attn_scalar` (256 by default): scores scale by its `^-0.5`.
    pub fn query_pre_attn_scalar(&self) -> Option<f64> {
        match self.variant.query_pre_attn_scalar {
            Some(s) => Some(s),
            None if self.is(&["gemma2", "gemma3_text"]) => Some(256.0),
            None => None,
        }
    }

    fn softcap(&self, value: &Option<serde_json::Value>, gemma2_default: f64) -> Option<f64> {
        match value {
            Some(v) => v.as_f64(),
            None if self.model_type == "gemma2" => Some(gemma2_default),
            None => None,
        }
    }

    /// The tanh cap of the output logits (Gemma 2: 30 by default).
    pub fn final_logit_softcapping(&self) -> Option<f64> {
        self.softcap(&self.variant.final_logit_softcapping, 30.0)
    }

    /// The tanh cap of attention scores (Gemma 2: 50 by default).
    pub fn attn_logit_softcapping(&self) -> Option<f64> {
        self.softcap(&self.variant.attn_logit_softcapping, 50.0)
    }

    /// The sliding window's length, where the architecture has one switched on.
    pub fn sliding_window(&self) -> Option<usize> {
        match self.model_type.as_str() {
            "qwen2" | "qwen3" if self.use_sliding_window != Some(true) => None,
            "gemma2" | "gemma3_text" => Some(self.sliding_window.unwrap_or(4096)),
            "mistral" | "qwen2" | "qwen3" | "phi3" => self.sliding_window,
            _ => None,
        }
    }

    /// Checks `layer_types`: one known entry per layer.
    fn check_layer_types(&self) -> std::result::Result<(), String> {
        let Some(types) = &self.variant.layer_types else {
            return Ok(());
        };
        if types.len() != self.num_hidden_layers {
            return Err(format!(
                "layer_types has {} entries for num_hidden_layers = {}",
                types.len(),
                self.num_hidden_layers
            ));
        }
        match types
            .iter()
            .find(|t| !matches!(t.as_str(), "full_attention" | "sliding_attention"))
        {
            Some(other) => Err(format!(
                "layer_types: {other:?} is not implemented (full_attention and \
                 sliding_attention are)"
            )),
            None => Ok(()),
        }
    }

    /// Layer `i`'s attention, as transformers derives `layer_types` when a config has none.
    /// A sliding layer without a window attends to everything, as in transformers.
    pub fn layer_kind(&self, i: usize) -> LayerKind {
        if self.sliding_window().is_none() {
            return LayerKind::Full;
        }
        let sliding = match &self.variant.layer_types {
            Some(types) => types.get(i).is_some_and(|t| t == "sliding_attention"),
            None => match self.model_type.as_str() {
                "gemma2" => !(i + 1).is_multiple_of(2),
                "gemma3_text" => {
                    !(i + 1).is_multiple_of(self.variant.sliding_window_pattern.unwrap_or(6).max(1))
                }
                "qwen2" | "qwen3" => i >= self.variant.max_window_layers.unwrap_or(28),
                "mistral" | "phi3" => true,
                _ => false,
            },
        };
        if sliding {
            LayerKind::Sliding
        } else {
            LayerKind::Full
        }
    }

    /// The config switches whet does not implement, refused by name rather than ignored.
    fn unsupported(&self) -> std::result::Result<(), String> {
        let partial = self.variant.partial_rotary_factor.or_else(|| {
            self.rope_field(LayerKind::Full, "partial_rotary_factor")
                .and_then(|v| v.as_f64())
        });
        if let Some(f) = partial.filter(|f| *f != 1.0) {
            return Err(format!(
                "partial_rotary_factor = {f}: rotating part of each head is not implemented"
            ));
        }
        if self.variant.use_bidirectional_attention == Some(true) {
            return Err(
                "use_bidirectional_attention = true: Gemma 3 as a bidirectional \
                        encoder is not implemented"
                    .into(),
            );
        }
        Ok(())
    }

    /// The rope settings of a layer kind: Gemma 3's `rope_parameters` holds one table per kind.
    fn rope_field(&self, kind: LayerKind, key: &str) -> Option<&serde_json::Value> {
        let per_kind = |p: &serde_json::Value| {
            let name = match kind {
                LayerKind::Full => "full_attention",
                LayerKind::Sliding => "sliding_attention",
            };
            p.get(name).cloned().map(|_| name)
        };
        let params = self
            .rope_parameters
            .as_ref()
            .and_then(|p| match per_kind(p) {
                Some(name) => p.get(name),
                None => Some(p),
            });
        let scaling = self
            .rope_scaling
            .as_ref()
            .filter(|_| kind == LayerKind::Full);
        params
            .and_then(|p| p.get(key))
            .or_else(|| scaling.and_then(|p| p.get(key)))
    }

    /// RoPE base frequency of a layer kind.
    pub fn theta(&self, kind: LayerKind) -> f64 {
        let set = self.rope_field(kind, "rope_theta").and_then(|v| v.as_f64());
        match kind {
            LayerKind::Sliding if self.model_type == "gemma3_text" => set
                .or(self.variant.rope_local_base_freq)
                .unwrap_or(10_000.0),
            _ => set
                .or(self.rope_theta)
                .unwrap_or(if self.model_type == "gemma3_text" {
                    1_000_000.0
                } else {
                    10_000.0
                }),
        }
    }

    /// LongRoPE's factors of a layer kind, as `_compute_longrope_parameters` computes the
    /// table: `1 / (factor_i * theta^(2i / d))` in f32.
    fn longrope_table(&self, kind: LayerKind, key: &str) -> Result<Vec<f32>> {
        let d = self.head_dim();
        let factors: Vec<f64> = self
            .rope_field(kind, key)
            .and_then(|v| v.as_array())
            .map(|a| a.iter().filter_map(|f| f.as_f64()).collect())
            .unwrap_or_default();
        if factors.len() != d / 2 {
            return Err(ModelError::Config {
                path: "config.json".into(),
                message: format!(
                    "rope {key} has {} factors; longrope needs head_dim / 2 = {}",
                    factors.len(),
                    d / 2
                ),
            });
        }
        let theta = self.theta(kind) as f32;
        Ok(factors
            .iter()
            .enumerate()
            .map(|(i, &f)| 1.0 / (f as f32 * theta.powf((2 * i) as f32 / d as f32)))
            .collect())
    }

    /// The pretraining context LongRoPE switches at (`original_max_position_embeddings` of the
    /// rope parameters, else of the config).
    fn original_max(&self, kind: LayerKind) -> Option<usize> {
        self.rope_field(kind, "original_max_position_embeddings")
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .or(self.variant.original_max_position_embeddings)
    }

    /// LongRoPE's long table, where the config uses LongRoPE.
    pub fn longrope(&self, kind: LayerKind) -> Result<Option<LongRope>> {
        if self.rope_type(kind) != "longrope" {
            return Ok(None);
        }
        let original_max = self.original_max(kind).ok_or_else(|| ModelError::Config {
            path: "config.json".into(),
            message: "longrope needs original_max_position_embeddings".into(),
        })?;
        Ok(Some(LongRope {
            long: self.longrope_table(kind, "long_factor")?,
            original_max,
        }))
    }

    /// The factor LongRoPE multiplies cos and sin by: the config's `attention_factor`, else
    /// `sqrt(1 + ln(s) / ln(original))` with `s` = `factor`, else positions / original; 1
    /// for other rope types.
    pub fn rope_attention_factor(&self, kind: LayerKind) -> f32 {
        if self.rope_type(kind) != "longrope" {
            return 1.0;
        }
        if let Some(f) = self
            .rope_field(kind, "attention_factor")
            .and_then(|v| v.as_f64())
        {
            return f as f32;
        }
        let original = self
            .original_max(kind)
            .unwrap_or(self.max_position_embeddings) as f64;
        let factor = self
            .rope_field(kind, "factor")
            .and_then(|v| v.as_f64())
            .unwrap_or(self.max_position_embeddings as f64 / original);
        if factor <= 1.0 {
            1.0
        } else {
            (1.0 + factor.ln() / original.ln()).sqrt() as f32
        }
    }

    fn rope_type(&self, kind: LayerKind) -> &str {
        self.rope_field(kind, "rope_type")
            .or_else(|| self.rope_field(kind, "type"))
            .and_then(|v| v.as_str())
            .unwrap_or("default")
    }

    /// Inverse frequencies of the rotary embedding of a layer kind, with `rope_scaling` applied
    /// as `transformers`' `ROPE_INIT_FUNCTIONS` do for the "default", "linear", "llama3" and
    /// "longrope" (short factors; see [`LlamaConfig::longrope`]) types.
    pub fn inv_freq(&self, kind: LayerKind) -> Result<Vec<f32>> {
        let d = self.head_dim();
        let theta = self.theta(kind);
        let base: Vec<f32> = (0..d / 2)
            .map(|i| (1.0 / theta.powf((2 * i) as f64 / d as f64)) as f32)
            .collect();
        let ty = self
            .rope_field(kind, "rope_type")
            .or_else(|| self.rope_field(kind, "type"))
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        let num = |k: &str| self.rope_field(kind, k).and_then(|v| v.as_f64());
        match ty {
            "default" => Ok(base),
            "longrope" => self.longrope_table(kind, "short_factor"),
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
                    "rope scaling type {other:?} is not supported (default, linear, llama3, \
                     longrope are)"
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
    pub(crate) fn new(positions: Tensor<2, Int>, inv_freq: Tensor<1>) -> Self {
        Self::scaled(positions, inv_freq, 1.0)
    }

    /// The tables with cos and sin multiplied by `scale` (LongRoPE's attention factor).
    ///
    /// # Shapes
    /// - positions `[B, T]`, inv_freq `[hd / 2]`
    pub(crate) fn scaled(positions: Tensor<2, Int>, inv_freq: Tensor<1>, scale: f32) -> Self {
        // The tables follow the positions off autodiff: a model's `inv_freq` is a skipped field,
        // left on the autodiff device it was loaded on by `valid()`, and tables made from it
        // put every op of an evaluation after the rotary embedding on the autodiff backend,
        // where each untracked op left a graph entry that was never freed (SmolLM2 LoRA: RSS
        // +200 MB over three greedy samples before training).
        let inv_freq = match positions.device().is_autodiff() {
            true => inv_freq,
            false => inv_freq.without_autodiff(),
        };
        let [b, t] = positions.dims();
        let half = inv_freq.dims()[0];
        // (B, T, 1) * (1, 1, hd/2) -> (B, T, hd/2)
        let freqs = positions.float().reshape([b, t, 1]) * inv_freq.reshape([1, 1, half]);
        // (B, T, hd) -> (B, 1, T, hd)
        let emb = Tensor::cat(vec![freqs.clone(), freqs], 2).reshape([b, 1, t, 2 * half]);
        let (cos, sin) = (emb.clone().cos(), emb.sin());
        match scale {
            1.0 => Self { cos, sin },
            s => Self {
                cos: cos.mul_scalar(s),
                sin: sin.mul_scalar(s),
            },
        }
    }

    /// The tables at `layout`'s flattened tokens, where its attention calls can take those
    /// ([`Layout::flat_table`]).
    pub(crate) fn flatten(&self, layout: &Layout) -> Option<Self> {
        Some(Self {
            cos: layout.flat_table(self.cos.clone())?,
            sin: layout.flat_table(self.sin.clone())?,
        })
    }

    /// `x * cos + rotate_half(x) * sin`, with `rotate_half([x1, x2]) = [-x2, x1]`.
    ///
    /// # Shapes
    /// - x `[B, H, T, hd]`
    pub(crate) fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        crate::kernels::rope(x, self.cos.clone(), self.sin.clone())
    }
}

/// The names of a layer's input projections: q, k and v, or Phi-3's one `qkv_proj`.
fn qkv_names(fused: bool) -> &'static [&'static str] {
    if fused {
        &["self_attn.qkv_proj"]
    } else {
        &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    }
}

/// The names of a layer's MLP input projections: gate and up, or Phi-3's `gate_up_proj`.
fn gate_up_names(fused: bool) -> &'static [&'static str] {
    if fused {
        &["mlp.gate_up_proj"]
    } else {
        &["mlp.gate_proj", "mlp.up_proj"]
    }
}

/// `tanh(x / cap) * cap`: Gemma 2's soft-capping of attention scores and logits.
fn softcap<const D: usize>(x: Tensor<D>, cap: f64) -> Tensor<D> {
    x.div_scalar(cap).tanh().mul_scalar(cap)
}

/// One block. Pre-norm (LLaMA): `x + attn(norm(x))`, then `x + mlp(norm(x))`. With Gemma 2/3's
/// sandwich norms: `x + norm(attn(norm(x)))`, then `x + norm(mlp(norm(x)))`.
#[derive(Module, Debug)]
pub struct LlamaLayer {
    pub input_layernorm: RmsNorm,
    /// q, k, v (or one fused qkv).
    pub qkv: Vec<Linear>,
    /// Qwen3 / Gemma 3: RMSNorm over each head's queries and keys.
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    pub o_proj: Linear,
    /// Before the MLP (LLaMA), or after attention (Gemma 2/3).
    pub post_attention_layernorm: RmsNorm,
    /// Gemma 2/3: before and after the MLP.
    pub pre_feedforward_layernorm: Option<RmsNorm>,
    pub post_feedforward_layernorm: Option<RmsNorm>,
    /// gate, up (or one fused gate_up).
    pub gate_up: Vec<Linear>,
    pub down_proj: Linear,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub attention_dropout: f64,
    /// Phi-3's `resid_pdrop` (0 elsewhere).
    pub residual_dropout: f64,
    #[module(skip)]
    pub act: Activation,
    /// Multiplies the queries so that the `head_dim^-0.5` scaling of attention becomes
    /// `query_pre_attn_scalar^-0.5` (Gemma 2/3); 1 elsewhere.
    #[module(skip)]
    pub query_factor: f32,
    #[module(skip)]
    pub attn_softcap: Option<f64>,
    #[module(skip)]
    pub kind: LayerKind,
}

impl LlamaLayer {
    fn load(vb: &Weights, c: &LlamaConfig, kind: LayerKind) -> Result<Self> {
        let (h, hd) = (c.hidden_size, c.head_dim());
        let (nq, nkv) = (c.num_attention_heads, c.kv_heads());
        let (eps, offset) = (c.rms_norm_eps, c.norm_offset());
        let lin =
            |name: &str, i, o, bias| Linear::load(&vb.pp(name), i, o, bias, TorchLinear::Linear);
        let norm = |name: &str, dim| -> Result<RmsNorm> {
            Ok(RmsNorm::load(&vb.pp(name), dim, eps)?.with_offset(offset))
        };
        let fused = c.fused_projections();
        let qkv_widths = [nq * hd, nkv * hd, nkv * hd];
        let qkv = if fused {
            vec![lin(qkv_names(true)[0], h, qkv_widths.iter().sum(), false)?]
        } else {
            qkv_names(false)
                .iter()
                .zip(qkv_widths)
                .map(|(name, w)| lin(name, h, w, c.qkv_bias()))
                .collect::<Result<_>>()?
        };
        let inter = c.intermediate_size;
        let gate_up = if fused {
            vec![lin(gate_up_names(true)[0], h, 2 * inter, false)?]
        } else {
            gate_up_names(false)
                .iter()
                .map(|name| lin(name, h, inter, c.mlp_bias))
                .collect::<Result<_>>()?
        };
        let (q_norm, k_norm) = if c.qk_norm() {
            (
                Some(norm("self_attn.q_norm", hd)?),
                Some(norm("self_attn.k_norm", hd)?),
            )
        } else {
            (None, None)
        };
        let sandwich = |name: &str| c.sandwich_norms().then(|| norm(name, h)).transpose();
        let query_factor = c
            .query_pre_attn_scalar()
            .map_or(1.0, |s| (hd as f64 / s).sqrt() as f32);
        Ok(Self {
            input_layernorm: norm("input_layernorm", h)?,
            qkv,
            q_norm,
            k_norm,
            o_proj: lin("self_attn.o_proj", nq * hd, h, c.attention_bias)?,
            post_attention_layernorm: norm("post_attention_layernorm", h)?,
            pre_feedforward_layernorm: sandwich("pre_feedforward_layernorm")?,
            post_feedforward_layernorm: sandwich("post_feedforward_layernorm")?,
            gate_up,
            down_proj: lin("mlp.down_proj", inter, h, c.mlp_bias && !fused)?,
            heads: nq,
            kv_heads: nkv,
            head_dim: hd,
            attention_dropout: c.attention_dropout,
            residual_dropout: c.variant.resid_pdrop.unwrap_or(0.0),
            act: c.activation(),
            query_factor,
            attn_softcap: c.attn_logit_softcapping(),
            kind,
        })
    }

    /// q, k, v `[B, T, *]` of the input normalised by `norm`, split from one product when
    /// fused.
    fn project_qkv(&self, norm: &RmsNorm, x: Tensor<3>, mode: Mode) -> [Tensor<3>; 3] {
        let layers: Vec<&Linear> = self.qkv.iter().collect();
        match <[Tensor<3>; 3]>::try_from(normed_projections(norm, x, &layers, mode)) {
            Ok(qkv) => qkv,
            // `load` builds three projections or Phi-3's one.
            Err(mut fused) => {
                let (q, kv) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
                crate::kernels::split_last(fused.remove(0), [q, kv, kv])
            }
        }
    }

    /// The gated MLP of the input normalised by `norm`: `down(act(gate(h)) * up(h))`.
    fn mlp(&self, norm: &RmsNorm, x: Tensor<3>, mode: Mode) -> Tensor<3> {
        let layers: Vec<&Linear> = self.gate_up.iter().collect();
        let [gate, up] =
            match <[Tensor<3>; 2]>::try_from(normed_projections(norm, x, &layers, mode)) {
                Ok(gate_up) => gate_up,
                // `load` builds two projections or Phi-3's one.
                Err(mut fused) => {
                    let inter = self.down_proj.dims().0;
                    crate::kernels::split_last(fused.remove(0), [inter, inter])
                }
            };
        match self.act {
            Activation::Silu => self.down_proj.forward_swiglu(gate, up, mode),
            act => self.down_proj.forward(act.forward(gate) * up, mode),
        }
    }

    /// Token-wise layers run in `layout`, attention on padded rows or, padding-free on the
    /// CPU, on the flattened tokens with `rope`'s flattened tables (`rope.1`, see
    /// [`Layout::attend`]).
    ///
    /// # Shapes
    /// - x `[B, T, H]` (`[1, N, H]` padding-free), bias `[B, 1, T, T_past + T]`
    /// - output as x
    fn forward(
        &self,
        x: Tensor<3>,
        layout: &Layout,
        rope: (&Rope, Option<&Rope>),
        bias: Tensor<4>,
        cache: Option<(&mut KvCache, usize)>,
        mode: Mode,
    ) -> Tensor<3> {
        // The flattened tokens where keys and values are this call's own (no cache) and the
        // kernel computes the scores (no soft-capping).
        let flat_rope = rope
            .1
            .filter(|_| cache.is_none() && self.attn_softcap.is_none());
        let attend = layout.attend(&x, flat_rope.is_some());
        let rope = match flat_rope {
            Some(flat) if attend.is_flat() => flat,
            _ => rope.0,
        };
        let heads = |y: Tensor<3>, n| attend.heads(y, n);
        let [q, k, v] = self.project_qkv(&self.input_layernorm, x.clone(), mode);
        let (mut q, mut k) = (heads(q, self.heads), heads(k, self.kv_heads));
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            (q, k) = (qn.forward(q), kn.forward(k));
        }
        let mut q = rope.apply(q);
        if self.query_factor != 1.0 {
            q = q.mul_scalar(self.query_factor);
        }
        let mut k = rope.apply(k);
        let mut v = heads(v, self.kv_heads);
        if let Some((cache, layer)) = cache {
            (k, v) = cache.append(layer, k, v);
        }
        let ctx = match self.attn_softcap {
            None => attend.run([q, k, v], bias, self.attention_dropout, mode),
            Some(cap) => {
                let rep = self.heads / self.kv_heads;
                let (k, v) = (repeat_kv(k, rep), repeat_kv(v, rep));
                let p = if mode == Mode::Eval {
                    0.0
                } else {
                    self.attention_dropout
                };
                let scale = (self.head_dim as f64).powf(-0.5);
                // (B, H, Tq, hd) x (B, H, hd, Tk) -> (B, H, Tq, Tk)
                let scores = crate::precision::matmul(q, k.swap_dims(2, 3)).mul_scalar(scale);
                let probs = crate::kernels::attention_probs(softcap(scores, cap), bias, 1.0, p);
                crate::precision::matmul(probs, v)
            }
        };
        let attn = self.o_proj.forward(attend.merge(ctx), mode);
        match (
            &self.pre_feedforward_layernorm,
            &self.post_feedforward_layernorm,
        ) {
            (Some(pre), Some(post)) => {
                let x = x + self.post_attention_layernorm.forward(attn);
                let m = self.mlp(pre, x.clone(), mode);
                x + post.forward(m)
            }
            _ => {
                let x = x + dropout(attn, self.residual_dropout, mode);
                let m = self.mlp(&self.post_attention_layernorm, x.clone(), mode);
                x + dropout(m, self.residual_dropout, mode)
            }
        }
    }
}

impl VisitParams for LlamaLayer {
    fn visit_params(&mut self, p: &str, v: &mut dyn Visitor) {
        self.input_layernorm
            .visit_params(&join(p, "input_layernorm"), v);
        let fused = self.qkv.len() == 1;
        for (proj, name) in self.qkv.iter_mut().zip(qkv_names(fused)) {
            proj.visit_params(&join(p, name), v);
        }
        if let Some(n) = &mut self.q_norm {
            n.visit_params(&join(p, "self_attn.q_norm"), v);
        }
        if let Some(n) = &mut self.k_norm {
            n.visit_params(&join(p, "self_attn.k_norm"), v);
        }
        self.o_proj.visit_params(&join(p, "self_attn.o_proj"), v);
        self.post_attention_layernorm
            .visit_params(&join(p, "post_attention_layernorm"), v);
        if let Some(n) = &mut self.pre_feedforward_layernorm {
            n.visit_params(&join(p, "pre_feedforward_layernorm"), v);
        }
        if let Some(n) = &mut self.post_feedforward_layernorm {
            n.visit_params(&join(p, "post_feedforward_layernorm"), v);
        }
        let fused = self.gate_up.len() == 1;
        for (proj, name) in self.gate_up.iter_mut().zip(gate_up_names(fused)) {
            proj.visit_params(&join(p, name), v);
        }
        self.down_proj.visit_params(&join(p, "mlp.down_proj"), v);
    }
}

/// The band a sliding-window layer adds to the causal mask: query `i` (absolute index
/// `past + i`) sees key `j` only when `past + i - j < window`, as transformers'
/// `sliding_window_overlay` compares cache positions.
///
/// # Shapes
/// - bias `[B, 1, T, T_past + T]`, output the same
fn sliding_bias(bias: Tensor<4>, window: usize) -> Tensor<4> {
    let [_, _, t, tk] = bias.dims();
    let past = tk - t;
    crate::layers::mask_pairs(bias, |i, j| past + i >= j + window)
}

/// The decoder stack (`LlamaModel`).
#[derive(Module, Debug)]
pub struct LlamaModel {
    pub embed_tokens: Embedding,
    pub layers: Vec<LlamaLayer>,
    pub norm: RmsNorm,
    /// `[hd / 2]`, a constant (not trained): full-attention layers.
    #[module(skip)]
    pub inv_freq: Tensor<1>,
    /// `[hd / 2]`: sliding-window layers (Gemma 3 gives them their own base).
    #[module(skip)]
    pub inv_freq_local: Tensor<1>,
    /// Gemma: `sqrt(hidden_size)` on the token embeddings.
    #[module(skip)]
    pub embed_scale: Option<f32>,
    /// The window of sliding-window layers.
    #[module(skip)]
    pub sliding_window: Option<usize>,
    /// LongRoPE: the long factors' table, the length past which they apply, and the factor
    /// cos and sin are multiplied by (1 elsewhere).
    #[module(skip)]
    pub long_inv_freq: Option<(Tensor<1>, usize)>,
    #[module(skip)]
    pub rope_scale: f32,
    /// Virtual tokens of prompt learning, attached from outside (whet-peft).
    pub prompt: Option<PromptEncoder>,
}

impl LlamaModel {
    /// Loads from `vb` scoped to the `model.` prefix.
    pub fn load(vb: &Weights, c: &LlamaConfig) -> Result<Self> {
        let embed_tokens = Embedding::load(&vb.pp("embed_tokens"), c.vocab_size, c.hidden_size)?
            .with_padding_idx(c.pad_token_id);
        let layers = (0..c.num_hidden_layers)
            .map(|i| LlamaLayer::load(&vb.pp(format!("layers.{i}")), c, c.layer_kind(i)))
            .collect::<Result<_>>()?;
        // After the layers: their q projections' shapes have confirmed the head size the
        // rotary table is sized from.
        let table = |kind| -> Result<Tensor<1>> {
            let f = c.inv_freq(kind)?;
            let n = f.len();
            Ok(Tensor::from_data(TensorData::new(f, [n]), vb.device()))
        };
        Ok(Self {
            embed_tokens,
            layers,
            norm: RmsNorm::load(&vb.pp("norm"), c.hidden_size, c.rms_norm_eps)?
                .with_offset(c.norm_offset()),
            inv_freq: table(LayerKind::Full)?,
            inv_freq_local: table(LayerKind::Sliding)?,
            embed_scale: c.embed_scale(),
            sliding_window: c.sliding_window(),
            long_inv_freq: c.longrope(LayerKind::Full)?.map(|l| {
                let n = l.long.len();
                (
                    Tensor::from_data(TensorData::new(l.long, [n]), vb.device()),
                    l.original_max,
                )
            }),
            rope_scale: c.rope_attention_factor(LayerKind::Full),
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
        if let Some(scale) = self.embed_scale {
            x = x.mul_scalar(scale);
        }
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
        let sliding = self.layers.iter().any(|l| l.kind == LayerKind::Sliding);
        let inv_freq = match &self.long_inv_freq {
            // `longrope_frequency_update`: the long factors once max(position) + 1 exceeds
            // the pretraining context.
            Some((long, original)) => {
                let longest = positions.clone().max().into_scalar::<i64>() + 1;
                if longest as usize > *original {
                    long.clone()
                } else {
                    self.inv_freq.clone()
                }
            }
            None => self.inv_freq.clone(),
        };
        let rope = Rope::scaled(positions.clone(), inv_freq, self.rope_scale);
        let (rope_local, bias_local) = match self.sliding_window.filter(|_| sliding) {
            Some(w) => (
                Rope::new(positions, self.inv_freq_local.clone()),
                sliding_bias(bias.clone(), w),
            ),
            None => (rope.clone(), bias.clone()),
        };
        let unpadded = input
            .unpadded
            .map(|u| u.widen(t - input.input_ids.dims()[1]));
        let layout = Layout::new(unpadded.as_ref(), &x.device());
        let (flat, flat_local) = (rope.flatten(&layout), rope_local.flatten(&layout));
        let mut x = layout.enter(x);
        for (i, layer) in self.layers.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|c| (c, i));
            let (rope, bias) = match layer.kind {
                LayerKind::Full => ((&rope, flat.as_ref()), bias.clone()),
                LayerKind::Sliding => ((&rope_local, flat_local.as_ref()), bias_local.clone()),
            };
            x = layer.forward(x, &layout, rope, bias, layer_cache, mode);
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
        PromptShape {
            layers: self.layers.len(),
            hidden: self.embed_tokens.weight.dims()[1],
            kv_heads: first.kv_heads,
            head_dim: first.head_dim,
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
    /// Gemma 2's `final_logit_softcapping`.
    #[module(skip)]
    pub logit_softcap: Option<f64>,
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
            logit_softcap: c.final_logit_softcapping(),
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
        let logits = match &self.lm_head {
            Some(head) => head.forward(hidden, Mode::Eval),
            None => crate::decoder::tied_logits(hidden, self.model.embed_tokens.weight.val()),
        };
        match self.logit_softcap {
            Some(cap) => softcap(logits, cap),
            None => logits,
        }
    }

    fn lm_cross_entropy_sum(&self, hidden: Tensor<2>, targets: &[u32]) -> Tensor<1> {
        use crate::layers::LinearWeight;
        if self.logit_softcap.is_some() {
            // The fused kernel takes plain logits; capped ones go through the full matrix.
            return crate::decoder::logits_cross_entropy_sum(self, hidden, targets);
        }
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

    fn rope_switch(&self) -> Option<usize> {
        self.model
            .long_inv_freq
            .as_ref()
            .map(|(_, original)| *original)
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
