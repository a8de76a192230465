//! DistilBERT encoder with its sequence-classification head.
//!
//! Paper: Sanh et al. 2019, "DistilBERT, a distilled version of BERT"
//! (<https://arxiv.org/abs/1910.01108>). Matches `transformers.models.distilbert.
//! modeling_distilbert` (`DistilBertModel`, `DistilBertForSequenceClassification`); its tensor
//! names (`q_lin`, `transformer.layer.N`, `sa_layer_norm`, ...) are kept.

use burn::module::Module;
use burn::tensor::{Int, Tensor};
use serde::Deserialize;

use crate::bert::EncoderInput;
use crate::config::{Activation, HeadFields};
use crate::error::Result;
use crate::layers::{Embedding, LayerNorm, Linear, Mode, TorchLinear, attention_bias, dropout};
use crate::prompt::{PromptEncoder, PromptShape, PromptSlot, VirtualTokens, widen_mask};
use crate::unpad::Layout;
use crate::weights::{VisitParams, Visitor, Weights, join};

/// DistilBERT hyper-parameters, as in `transformers.DistilBertConfig`.
#[derive(Debug, Clone, Deserialize)]
pub struct DistilBertConfig {
    pub vocab_size: usize,
    pub dim: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub hidden_dim: usize,
    #[serde(default = "default_dropout")]
    pub dropout: f64,
    #[serde(default = "default_dropout")]
    pub attention_dropout: f64,
    #[serde(default = "default_act")]
    pub activation: Activation,
    pub max_position_embeddings: usize,
    #[serde(default = "default_init")]
    pub initializer_range: f64,
    #[serde(default = "default_cls_dropout")]
    pub seq_classif_dropout: f64,
    #[serde(default)]
    pub sinusoidal_pos_embds: bool,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(flatten)]
    pub head: HeadFields,
}

fn default_dropout() -> f64 {
    0.1
}
fn default_act() -> Activation {
    Activation::Gelu
}
fn default_init() -> f64 {
    0.02
}
fn default_cls_dropout() -> f64 {
    0.2
}

/// DistilBERT's LayerNorm epsilon (fixed in the reference code).
const LN_EPS: f64 = 1e-12;

/// One transformer block (post-norm).
#[derive(Module, Debug)]
pub struct DistilBertLayer {
    pub q_lin: Linear,
    pub k_lin: Linear,
    pub v_lin: Linear,
    pub out_lin: Linear,
    pub sa_layer_norm: LayerNorm,
    pub lin1: Linear,
    pub lin2: Linear,
    pub output_layer_norm: LayerNorm,
    pub heads: usize,
    pub attention_dropout: f64,
    pub dropout: f64,
    #[module(skip)]
    pub act: Activation,
}

impl DistilBertLayer {
    fn load(vb: &Weights, c: &DistilBertConfig) -> Result<Self> {
        let d = c.dim;
        let lin = |name: &str, i, o| Linear::load(&vb.pp(name), i, o, true, TorchLinear::Linear);
        Ok(Self {
            q_lin: lin("attention.q_lin", d, d)?,
            k_lin: lin("attention.k_lin", d, d)?,
            v_lin: lin("attention.v_lin", d, d)?,
            out_lin: lin("attention.out_lin", d, d)?,
            sa_layer_norm: LayerNorm::load(&vb.pp("sa_layer_norm"), d, LN_EPS)?,
            lin1: lin("ffn.lin1", d, c.hidden_dim)?,
            lin2: lin("ffn.lin2", c.hidden_dim, d)?,
            output_layer_norm: LayerNorm::load(&vb.pp("output_layer_norm"), d, LN_EPS)?,
            heads: c.n_heads,
            attention_dropout: c.attention_dropout,
            dropout: c.dropout,
            act: c.activation,
        })
    }

    /// Token-wise layers run in `layout`, attention on padded rows.
    ///
    /// # Shapes
    /// - x `[B, T, D]` (`[1, N, D]` padding-free), bias `[B, 1, T, T]`
    /// - output as x
    fn forward(&self, x: Tensor<3>, layout: &Layout, bias: Tensor<4>, mode: Mode) -> Tensor<3> {
        let attend = layout.attend(&x, true);
        let heads = |y: Tensor<3>| attend.heads(y, self.heads);
        let q = heads(self.q_lin.forward(x.clone(), mode));
        let k = heads(self.k_lin.forward(x.clone(), mode));
        let v = heads(self.v_lin.forward(x.clone(), mode));
        let ctx = attend.merge(attend.run([q, k, v], bias, self.attention_dropout, mode));
        let sa = self
            .sa_layer_norm
            .forward(self.out_lin.forward(ctx, mode) + x);
        let ff = self
            .lin2
            .forward(self.act.forward(self.lin1.forward(sa.clone(), mode)), mode);
        self.output_layer_norm
            .forward(dropout(ff, self.dropout, mode) + sa)
    }
}

impl VisitParams for DistilBertLayer {
    fn visit_params(&mut self, p: &str, v: &mut dyn Visitor) {
        self.q_lin.visit_params(&join(p, "attention.q_lin"), v);
        self.k_lin.visit_params(&join(p, "attention.k_lin"), v);
        self.v_lin.visit_params(&join(p, "attention.v_lin"), v);
        self.out_lin.visit_params(&join(p, "attention.out_lin"), v);
        self.sa_layer_norm
            .visit_params(&join(p, "sa_layer_norm"), v);
        self.lin1.visit_params(&join(p, "ffn.lin1"), v);
        self.lin2.visit_params(&join(p, "ffn.lin2"), v);
        self.output_layer_norm
            .visit_params(&join(p, "output_layer_norm"), v);
    }
}

/// The bare encoder (`DistilBertModel`).
#[derive(Module, Debug)]
pub struct DistilBertModel {
    pub word_embeddings: Embedding,
    pub position_embeddings: Embedding,
    pub embeddings_norm: LayerNorm,
    pub layers: Vec<DistilBertLayer>,
    pub dropout: f64,
    /// A soft prompt (prompt tuning), attached from outside (whet-peft).
    pub prompt: Option<PromptEncoder>,
}

impl DistilBertModel {
    /// Loads from `vb` scoped to the `distilbert.` prefix if any.
    pub fn load(vb: &Weights, c: &DistilBertConfig) -> Result<Self> {
        let layers = (0..c.n_layers)
            .map(|i| DistilBertLayer::load(&vb.pp(format!("transformer.layer.{i}")), c))
            .collect::<Result<_>>()?;
        Ok(Self {
            word_embeddings: Embedding::load(
                &vb.pp("embeddings.word_embeddings"),
                c.vocab_size,
                c.dim,
            )?
            .with_padding_idx(Some(c.pad_token_id.unwrap_or(0))),
            position_embeddings: Embedding::load(
                &vb.pp("embeddings.position_embeddings"),
                c.max_position_embeddings,
                c.dim,
            )?,
            embeddings_norm: LayerNorm::load(&vb.pp("embeddings.LayerNorm"), c.dim, LN_EPS)?,
            layers,
            dropout: c.dropout,
            prompt: None,
        })
    }

    /// A soft prompt goes in front with positions `0..P`, as peft passes it through
    /// `inputs_embeds`; the first-token head then reads the first virtual token, as in peft.
    ///
    /// # Shapes
    /// - ids and mask `[B, T]`
    /// - output `[B, P + T, D]` (`P` = 0 without a soft prompt)
    pub fn forward(&self, input: EncoderInput, mode: Mode) -> Tensor<3> {
        let [b, _] = input.input_ids.dims();
        let mut words = self.word_embeddings.forward(input.input_ids);
        let mut mask = input.attention_mask;
        let mut unpadded = input.unpadded;
        match self.prompt.as_ref().and_then(|e| e.virtual_tokens(b)) {
            None => {}
            Some(VirtualTokens::Embeddings(e)) => {
                mask = widen_mask(mask, e.dims()[1]);
                unpadded = unpadded.map(|u| u.widen(e.dims()[1]));
                // (B, P, D) ++ (B, T, D) -> (B, P + T, D)
                words = Tensor::cat(vec![e, words], 1);
            }
            // whet-peft refuses to attach one: `prompt_shape().takes_prefix` is false.
            Some(VirtualTokens::KeyValues(_)) => {
                unreachable!("DistilBERT takes no key/value prefix")
            }
        }
        let t = words.dims()[1];
        let positions = Tensor::<1, Int>::arange(0..t as i64, &mask.device())
            .reshape([1, t])
            .expand([b, t]);
        let x = words + self.position_embeddings.forward(positions);
        let x = dropout(self.embeddings_norm.forward(x), self.dropout, mode);
        let layout = Layout::new(unpadded.as_ref(), &mask.device());
        let bias = attention_bias(mask.equal_elem(1), t, false);
        let mut x = layout.enter(x);
        for layer in &self.layers {
            x = layer.forward(x, &layout, bias.clone(), mode);
        }
        layout.pad(x)
    }

    /// The sizes of this model's virtual tokens (a soft prompt only).
    pub fn prompt_shape(&self) -> PromptShape {
        let hidden = self.word_embeddings.weight.dims()[1];
        let heads = self.layers[0].heads;
        PromptShape {
            layers: self.layers.len(),
            hidden,
            kv_heads: heads,
            head_dim: hidden / heads,
            takes_prefix: false,
        }
    }
}

impl VisitParams for DistilBertModel {
    fn visit_params(&mut self, p: &str, v: &mut dyn Visitor) {
        self.word_embeddings
            .visit_params(&join(p, "embeddings.word_embeddings"), v);
        self.position_embeddings
            .visit_params(&join(p, "embeddings.position_embeddings"), v);
        self.embeddings_norm
            .visit_params(&join(p, "embeddings.LayerNorm"), v);
        for (i, l) in self.layers.iter_mut().enumerate() {
            l.visit_params(&join(p, &format!("transformer.layer.{i}")), v);
        }
        let shape = self.prompt_shape();
        let slot = PromptSlot {
            encoder: &mut self.prompt,
            shape,
            word_embeddings: &self.word_embeddings,
        };
        crate::prompt::visit_slot(slot, p, v);
    }
}

/// `DistilBertForSequenceClassification`: first token, pre-classifier + ReLU, dropout,
/// classifier.
#[derive(Module, Debug)]
pub struct DistilBertForSequenceClassification {
    pub distilbert: DistilBertModel,
    pub pre_classifier: Linear,
    pub classifier: Linear,
    pub dropout: f64,
}

impl DistilBertForSequenceClassification {
    /// Loads the encoder and the head; head layers missing from the checkpoint are initialised
    /// and their names returned.
    pub fn load(vb: &Weights, c: &DistilBertConfig) -> Result<(Self, Vec<String>)> {
        let prefix = if vb.contains("distilbert.embeddings.word_embeddings.weight") {
            "distilbert"
        } else {
            ""
        };
        let distilbert = DistilBertModel::load(&vb.pp(prefix), c)?;
        let (pre_classifier, mut fresh) = crate::load_or_init_linear(
            &vb.pp("pre_classifier"),
            c.dim,
            c.dim,
            c.initializer_range,
        )?;
        let (classifier, f2) = crate::load_or_init_linear(
            &vb.pp("classifier"),
            c.dim,
            c.head.num_labels(),
            c.initializer_range,
        )?;
        fresh.extend(f2);
        Ok((
            Self {
                distilbert,
                pre_classifier,
                classifier,
                dropout: c.seq_classif_dropout,
            },
            fresh,
        ))
    }

    /// # Shapes
    /// - logits `[B, num_labels]`
    pub fn forward(&self, input: EncoderInput, mode: Mode) -> Tensor<2> {
        let x = self.distilbert.forward(input, mode);
        let [b, _, d] = x.dims();
        // (B, T, D) -> (B, D): the first ([CLS]) token
        let first = x.slice([0..b, 0..1]).reshape([b, d]);
        let h = burn::tensor::activation::relu(self.pre_classifier.forward(first, mode));
        self.classifier
            .forward(dropout(h, self.dropout, mode), mode)
    }
}

impl VisitParams for DistilBertForSequenceClassification {
    fn visit_params(&mut self, p: &str, v: &mut dyn Visitor) {
        self.distilbert.visit_params(&join(p, "distilbert"), v);
        self.pre_classifier
            .visit_params(&join(p, "pre_classifier"), v);
        self.classifier.visit_params(&join(p, "classifier"), v);
    }
}
