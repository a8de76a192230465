//! ModernBERT: a pre-norm encoder with rotary position embeddings, local (sliding-window) layers
//! alternating with global ones, each with its own rope base, a GeGLU feed-forward, and no
//! biases by default.
//!
//! Paper: Warner et al. 2024, "Smarter, Better, Faster, Longer: A Modern Bidirectional Encoder
//! for Fast, Memory Efficient, and Long Context Finetuning and Inference"
//! (<https://arxiv.org/abs/2412.13663>). Matches `transformers.models.modernbert.modeling_modernbert`
//! (`ModernBertModel`, `ModernBertForSequenceClassification`, `ModernBertForQuestionAnswering`)
//! with eager attention; parameter names are that module's.

use burn::module::Module;
use burn::tensor::{Int, Tensor, TensorData};
use serde::Deserialize;

use crate::bert::{EncoderInput, SpanLogits};
use crate::config::{Activation, HeadFields};
use crate::error::Result;
use crate::layers::{Embedding, LayerNorm, Linear, Mode, TorchLinear, attention_bias, dropout};
use crate::llama::{LayerKind, Rope};
use crate::unpad::Layout;
use crate::weights::{VisitParams, Visitor, Weights, join};

/// ModernBERT hyper-parameters, as in `transformers.ModernBertConfig` (its defaults).
#[derive(Debug, Clone, Deserialize)]
pub struct ModernBertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_act")]
    pub hidden_activation: Activation,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_init")]
    pub initializer_range: f64,
    #[serde(default = "default_eps")]
    pub norm_eps: f64,
    #[serde(default)]
    pub norm_bias: bool,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub attention_dropout: f64,
    /// `"full_attention"` or `"sliding_attention"` per layer.
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    /// Configs before `layer_types`: every n-th layer (from the first) is global.
    #[serde(default)]
    pub global_attn_every_n_layers: Option<usize>,
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    pub global_rope_theta: Option<f64>,
    #[serde(default)]
    pub local_rope_theta: Option<f64>,
    /// Refused: whet implements the default rope only for this family.
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// The local layers' whole window: a token sees those at most `local_attention / 2` away.
    #[serde(default = "default_local")]
    pub local_attention: usize,
    #[serde(default)]
    pub embedding_dropout: f64,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub mlp_dropout: f64,
    /// `"cls"` (the first token) or `"mean"` (over the real tokens).
    #[serde(default = "default_pooling")]
    pub classifier_pooling: String,
    #[serde(default)]
    pub classifier_dropout: f64,
    #[serde(default)]
    pub classifier_bias: bool,
    #[serde(default = "default_act")]
    pub classifier_activation: Activation,
    #[serde(flatten)]
    pub head: HeadFields,
}

fn default_act() -> Activation {
    Activation::Gelu
}
fn default_max_pos() -> usize {
    8192
}
fn default_init() -> f64 {
    0.02
}
fn default_eps() -> f64 {
    1e-5
}
fn default_local() -> usize {
    128
}
fn default_pooling() -> String {
    "cls".into()
}

impl ModernBertConfig {
    fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }

    /// Checks what loading divides by or would otherwise ignore.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let (h, n) = (self.hidden_size, self.num_attention_heads);
        if n == 0 || !h.is_multiple_of(n) || !(h / n).is_multiple_of(2) {
            return Err(format!(
                "hidden_size = {h} must split into num_attention_heads = {n} heads of an even size"
            ));
        }
        if !matches!(self.classifier_pooling.as_str(), "cls" | "mean") {
            return Err(format!(
                "classifier_pooling = {:?} is not implemented (cls and mean are)",
                self.classifier_pooling
            ));
        }
        if self.rope_scaling.is_some() {
            return Err("rope_scaling is not implemented for ModernBERT".into());
        }
        for kind in [LayerKind::Full, LayerKind::Sliding] {
            let ty = self.rope_field(kind, "rope_type").and_then(|v| v.as_str());
            if let Some(t) = ty.filter(|t| *t != "default") {
                return Err(format!(
                    "rope_type {t:?} is not implemented for ModernBERT (default is)"
                ));
            }
        }
        if let Some(types) = &self.layer_types {
            if types.len() != self.num_hidden_layers {
                return Err(format!(
                    "layer_types has {} entries for num_hidden_layers = {}",
                    types.len(),
                    self.num_hidden_layers
                ));
            }
            if let Some(t) = types
                .iter()
                .find(|t| !matches!(t.as_str(), "full_attention" | "sliding_attention"))
            {
                return Err(format!("layer_types: {t:?} is not implemented"));
            }
        }
        Ok(())
    }

    /// Layer `i`'s attention, as transformers derives `layer_types` from
    /// `global_attn_every_n_layers` (3) when a config has none.
    pub fn layer_kind(&self, i: usize) -> LayerKind {
        let sliding = match &self.layer_types {
            Some(types) => types.get(i).is_some_and(|t| t == "sliding_attention"),
            None => !i.is_multiple_of(self.global_attn_every_n_layers.unwrap_or(3).max(1)),
        };
        if sliding {
            LayerKind::Sliding
        } else {
            LayerKind::Full
        }
    }

    fn rope_field(&self, kind: LayerKind, key: &str) -> Option<&serde_json::Value> {
        let name = match kind {
            LayerKind::Full => "full_attention",
            LayerKind::Sliding => "sliding_attention",
        };
        self.rope_parameters.as_ref()?.get(name)?.get(key)
    }

    /// The rotary inverse frequencies of a layer kind: global base 160000, local 10000 unless
    /// the config sets them.
    fn inv_freq(&self, kind: LayerKind) -> Vec<f32> {
        let set = self.rope_field(kind, "rope_theta").and_then(|v| v.as_f64());
        let theta = match kind {
            LayerKind::Full => set.or(self.global_rope_theta).unwrap_or(160_000.0),
            LayerKind::Sliding => set.or(self.local_rope_theta).unwrap_or(10_000.0),
        };
        let d = self.head_dim();
        (0..d / 2)
            .map(|i| (1.0 / theta.powf((2 * i) as f64 / d as f64)) as f32)
            .collect()
    }
}

/// One pre-norm block: `x + attn(norm(x))` (no norm before the first layer's attention), then
/// `x + mlp(norm(x))` with a GeGLU feed-forward.
#[derive(Module, Debug)]
pub struct ModernBertLayer {
    /// `None` in layer 0 (`nn.Identity`).
    pub attn_norm: Option<LayerNorm>,
    /// `[q | k | v]` in one projection.
    pub wqkv: Linear,
    pub attn_out: Linear,
    pub mlp_norm: LayerNorm,
    /// `[input | gate]` in one projection.
    pub wi: Linear,
    pub mlp_out: Linear,
    pub heads: usize,
    pub attention_dropout: f64,
    pub mlp_dropout: f64,
    #[module(skip)]
    pub act: Activation,
    #[module(skip)]
    pub kind: LayerKind,
}

impl ModernBertLayer {
    fn load(vb: &Weights, c: &ModernBertConfig, i: usize) -> Result<Self> {
        let h = c.hidden_size;
        let norm = |name: &str| LayerNorm::load_with_bias(&vb.pp(name), h, c.norm_eps, c.norm_bias);
        let lin =
            |name: &str, i, o, bias| Linear::load(&vb.pp(name), i, o, bias, TorchLinear::Linear);
        Ok(Self {
            attn_norm: (i > 0).then(|| norm("attn_norm")).transpose()?,
            wqkv: lin("attn.Wqkv", h, 3 * h, c.attention_bias)?,
            attn_out: lin("attn.Wo", h, h, c.attention_bias)?,
            mlp_norm: norm("mlp_norm")?,
            wi: lin("mlp.Wi", h, 2 * c.intermediate_size, c.mlp_bias)?,
            mlp_out: lin("mlp.Wo", c.intermediate_size, h, c.mlp_bias)?,
            heads: c.num_attention_heads,
            attention_dropout: c.attention_dropout,
            mlp_dropout: c.mlp_dropout,
            act: c.hidden_activation,
            kind: c.layer_kind(i),
        })
    }

    /// Token-wise layers run in `layout`, attention on padded rows.
    ///
    /// # Shapes
    /// - x `[B, T, H]` (`[1, N, H]` padding-free), bias `[B, 1, T, T]`
    fn forward(
        &self,
        x: Tensor<3>,
        layout: &Layout,
        rope: (&Rope, Option<&Rope>),
        bias: Tensor<4>,
        mode: Mode,
    ) -> Tensor<3> {
        let attend = layout.attend(&x, rope.1.is_some());
        let rope = match rope.1 {
            Some(flat) if attend.is_flat() => flat,
            _ => rope.0,
        };
        let h = match &self.attn_norm {
            Some(n) => n.forward(x.clone()),
            None => x.clone(),
        };
        let qkv = self.wqkv.forward(h, mode);
        let width = qkv.dims()[2] / 3;
        let heads = |p: Tensor<3>| attend.heads(p, self.heads);
        let [q, k, v] = crate::kernels::split_last(qkv, [width, width, width]);
        let (q, k, v) = (rope.apply(heads(q)), rope.apply(heads(k)), heads(v));
        let ctx = attend.run([q, k, v], bias, self.attention_dropout, mode);
        let attn = self.attn_out.forward(attend.merge(ctx), mode);
        let x = x + dropout(attn, self.attention_dropout, mode);
        let y = self.wi.forward(self.mlp_norm.forward(x.clone()), mode);
        let inter = y.dims()[2] / 2;
        let [input, gate] = crate::kernels::split_last(y, [inter, inter]);
        let gated = dropout(self.act.forward(input) * gate, self.mlp_dropout, mode);
        x + self.mlp_out.forward(gated, mode)
    }
}

impl VisitParams for ModernBertLayer {
    fn visit_params(&mut self, p: &str, v: &mut dyn Visitor) {
        if let Some(n) = &mut self.attn_norm {
            n.visit_params(&join(p, "attn_norm"), v);
        }
        self.wqkv.visit_params(&join(p, "attn.Wqkv"), v);
        self.attn_out.visit_params(&join(p, "attn.Wo"), v);
        self.mlp_norm.visit_params(&join(p, "mlp_norm"), v);
        self.wi.visit_params(&join(p, "mlp.Wi"), v);
        self.mlp_out.visit_params(&join(p, "mlp.Wo"), v);
    }
}

/// The band of a local layer: `|i - j| > window` is masked, as transformers'
/// `sliding_window_bidirectional_overlay` (window = `local_attention / 2`).
///
/// # Shapes
/// - bias `[B, 1, T, T]`, output the same
fn local_bias(bias: Tensor<4>, window: usize) -> Tensor<4> {
    crate::layers::mask_pairs(bias, |i, j| i.abs_diff(j) > window)
}

/// The encoder (`ModernBertModel`).
#[derive(Module, Debug)]
pub struct ModernBertModel {
    pub tok_embeddings: Embedding,
    pub embedding_norm: LayerNorm,
    pub layers: Vec<ModernBertLayer>,
    pub final_norm: LayerNorm,
    pub embedding_dropout: f64,
    /// `[hd / 2]` of the global and the local layers (constants).
    #[module(skip)]
    pub inv_freq: Tensor<1>,
    #[module(skip)]
    pub inv_freq_local: Tensor<1>,
    pub window: usize,
}

impl ModernBertModel {
    /// Loads from `vb` scoped to the `model.` prefix.
    pub fn load(vb: &Weights, c: &ModernBertConfig) -> Result<Self> {
        let h = c.hidden_size;
        let layers = (0..c.num_hidden_layers)
            .map(|i| ModernBertLayer::load(&vb.pp(format!("layers.{i}")), c, i))
            .collect::<Result<_>>()?;
        let table = |kind| {
            let f = c.inv_freq(kind);
            let n = f.len();
            Tensor::from_data(TensorData::new(f, [n]), vb.device())
        };
        Ok(Self {
            tok_embeddings: Embedding::load(&vb.pp("embeddings.tok_embeddings"), c.vocab_size, h)?
                .with_padding_idx(c.pad_token_id),
            embedding_norm: LayerNorm::load_with_bias(
                &vb.pp("embeddings.norm"),
                h,
                c.norm_eps,
                c.norm_bias,
            )?,
            layers,
            final_norm: LayerNorm::load_with_bias(
                &vb.pp("final_norm"),
                h,
                c.norm_eps,
                c.norm_bias,
            )?,
            embedding_dropout: c.embedding_dropout,
            inv_freq: table(LayerKind::Full),
            inv_freq_local: table(LayerKind::Sliding),
            window: c.local_attention / 2,
        })
    }

    /// # Shapes
    /// - output `[B, T, H]`
    pub fn forward(&self, input: EncoderInput, mode: Mode) -> Tensor<3> {
        let device = input.input_ids.device();
        let [b, t] = input.input_ids.dims();
        let x = self.tok_embeddings.forward(input.input_ids);
        let x = dropout(self.embedding_norm.forward(x), self.embedding_dropout, mode);
        let bias = attention_bias(input.attention_mask.equal_elem(1), t, false);
        let bias_local = local_bias(bias.clone(), self.window);
        let positions = Tensor::<1, Int>::arange(0..t as i64, &device)
            .reshape([1, t])
            .expand([b, t]);
        let rope = Rope::new(positions.clone(), self.inv_freq.clone());
        let rope_local = Rope::new(positions, self.inv_freq_local.clone());
        let layout = Layout::new(input.unpadded.as_ref(), &device);
        let (flat, flat_local) = (rope.flatten(&layout), rope_local.flatten(&layout));
        let mut x = layout.enter(x);
        for layer in &self.layers {
            let (rope, bias) = match layer.kind {
                LayerKind::Full => ((&rope, flat.as_ref()), bias.clone()),
                LayerKind::Sliding => ((&rope_local, flat_local.as_ref()), bias_local.clone()),
            };
            x = layer.forward(x, &layout, rope, bias, mode);
        }
        layout.pad(self.final_norm.forward(x))
    }
}

impl VisitParams for ModernBertModel {
    fn visit_params(&mut self, p: &str, v: &mut dyn Visitor) {
        self.tok_embeddings
            .visit_params(&join(p, "embeddings.tok_embeddings"), v);
        self.embedding_norm
            .visit_params(&join(p, "embeddings.norm"), v);
        for (i, l) in self.layers.iter_mut().enumerate() {
            l.visit_params(&join(p, &format!("layers.{i}")), v);
        }
        self.final_norm.visit_params(&join(p, "final_norm"), v);
    }
}

/// `ModernBertPredictionHead`: `norm(act(dense(x)))`, loaded from the checkpoint (a masked-LM
/// checkpoint has it) or initialised as transformers initialises it.
#[derive(Module, Debug)]
pub struct PredictionHead {
    pub dense: Linear,
    pub norm: LayerNorm,
    #[module(skip)]
    pub act: Activation,
}

impl PredictionHead {
    fn load(vb: &Weights, c: &ModernBertConfig, fresh: &mut Vec<String>) -> Result<Self> {
        let h = c.hidden_size;
        // transformers: dense ~ the "out" std, initializer_range / sqrt(2 * layers).
        let std = c.initializer_range / (2.0 * c.num_hidden_layers.max(1) as f64).sqrt();
        let (dense, mut new) = if vb.contains("dense.weight") {
            (
                Linear::load(
                    &vb.pp("dense"),
                    h,
                    h,
                    c.classifier_bias,
                    TorchLinear::Linear,
                )?,
                vec![],
            )
        } else {
            let mut names = vec![vb.path("dense.weight")];
            if c.classifier_bias {
                names.push(vb.path("dense.bias"));
            }
            let l = Linear::init(
                h,
                h,
                c.classifier_bias,
                std,
                TorchLinear::Linear,
                vb.device(),
            );
            (l, names)
        };
        let norm = if vb.contains("norm.weight") {
            LayerNorm::load_with_bias(&vb.pp("norm"), h, c.norm_eps, c.norm_bias)?
        } else {
            new.push(vb.path("norm.weight"));
            if c.norm_bias {
                new.push(vb.path("norm.bias"));
            }
            LayerNorm::init(h, c.norm_eps, c.norm_bias, vb.device())
        };
        fresh.extend(new);
        Ok(Self {
            dense,
            norm,
            act: c.classifier_activation,
        })
    }

    fn forward<const D: usize>(&self, x: Tensor<D>, mode: Mode) -> Tensor<D> {
        self.norm
            .forward(self.act.forward(self.dense.forward(x, mode)))
    }
}

impl VisitParams for PredictionHead {
    fn visit_params(&mut self, p: &str, v: &mut dyn Visitor) {
        self.dense.visit_params(&join(p, "dense"), v);
        self.norm.visit_params(&join(p, "norm"), v);
    }
}

/// What both task models hold: the encoder, the prediction head, and an `outputs`-wide
/// `classifier` (new: N(0, hidden^-0.5), bias 0, as transformers initialises it); the names
/// of the tensors initialised.
fn load_parts(
    vb: &Weights,
    c: &ModernBertConfig,
    outputs: usize,
) -> Result<(ModernBertModel, PredictionHead, Linear, Vec<String>)> {
    let mut fresh = vec![];
    let model = ModernBertModel::load(&vb.pp("model"), c)?;
    let head = PredictionHead::load(&vb.pp("head"), c, &mut fresh)?;
    let std = (c.hidden_size as f64).powf(-0.5);
    let (classifier, new) =
        crate::load_or_init_linear(&vb.pp("classifier"), c.hidden_size, outputs, std)?;
    fresh.extend(new);
    Ok((model, head, classifier, fresh))
}

/// `ModernBertForSequenceClassification`: the first token or the mean of the real tokens,
/// the prediction head, dropout, a linear classifier.
#[derive(Module, Debug)]
pub struct ModernBertForSequenceClassification {
    pub model: ModernBertModel,
    pub head: PredictionHead,
    pub classifier: Linear,
    pub dropout: f64,
    pub mean_pooling: bool,
}

impl ModernBertForSequenceClassification {
    /// Loads the encoder and head; head tensors the checkpoint lacks are initialised and named
    /// in the second value.
    pub fn load(vb: &Weights, c: &ModernBertConfig) -> Result<(Self, Vec<String>)> {
        let (model, head, classifier, fresh) = load_parts(vb, c, c.head.num_labels())?;
        Ok((
            Self {
                model,
                head,
                classifier,
                dropout: c.classifier_dropout,
                mean_pooling: c.classifier_pooling == "mean",
            },
            fresh,
        ))
    }

    /// # Shapes
    /// - logits `[B, num_labels]`
    pub fn forward(&self, input: EncoderInput, mode: Mode) -> Tensor<2> {
        let mask = input.attention_mask.clone();
        let x = self.model.forward(input, mode);
        let [b, t, h] = x.dims();
        let pooled = if self.mean_pooling {
            // (B, T, 1) mask: the mean over the real tokens.
            let m = mask.float().reshape([b, t, 1]);
            let sum = (x * m.clone()).sum_dim(1).reshape([b, h]);
            sum / m.sum_dim(1).reshape([b, 1])
        } else {
            x.slice([0..b, 0..1]).reshape([b, h])
        };
        let pooled = dropout(self.head.forward(pooled, mode), self.dropout, mode);
        self.classifier.forward(pooled, mode)
    }
}

impl VisitParams for ModernBertForSequenceClassification {
    fn visit_params(&mut self, p: &str, v: &mut dyn Visitor) {
        self.model.visit_params(&join(p, "model"), v);
        self.head.visit_params(&join(p, "head"), v);
        self.classifier.visit_params(&join(p, "classifier"), v);
    }
}

/// `ModernBertForQuestionAnswering`: the prediction head on every token, dropout, and a
/// two-output `classifier` for start and end.
#[derive(Module, Debug)]
pub struct ModernBertForQuestionAnswering {
    pub model: ModernBertModel,
    pub head: PredictionHead,
    pub classifier: Linear,
    pub dropout: f64,
}

impl ModernBertForQuestionAnswering {
    /// Loads the encoder and the span head (initialised when absent, names returned).
    pub fn load(vb: &Weights, c: &ModernBertConfig) -> Result<(Self, Vec<String>)> {
        let (model, head, classifier, fresh) = load_parts(vb, c, 2)?;
        Ok((
            Self {
                model,
                head,
                classifier,
                dropout: c.classifier_dropout,
            },
            fresh,
        ))
    }

    /// # Shapes
    /// - start and end logits `[B, T]`
    pub fn forward(&self, input: EncoderInput, mode: Mode) -> SpanLogits {
        let x = self.model.forward(input, mode);
        let [b, t, _] = x.dims();
        let x = dropout(self.head.forward(x, mode), self.dropout, mode);
        // (B, T, H) -> (B, T, 2)
        let logits = self.classifier.forward(x, mode);
        SpanLogits {
            start: logits.clone().slice([0..b, 0..t, 0..1]).reshape([b, t]),
            end: logits.slice([0..b, 0..t, 1..2]).reshape([b, t]),
        }
    }
}

impl VisitParams for ModernBertForQuestionAnswering {
    fn visit_params(&mut self, p: &str, v: &mut dyn Visitor) {
        self.model.visit_params(&join(p, "model"), v);
        self.head.visit_params(&join(p, "head"), v);
        self.classifier.visit_params(&join(p, "classifier"), v);
    }
}
