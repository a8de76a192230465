//! DeBERTa-v2 and DeBERTa-v3: BERT's post-norm encoder with disentangled attention. Each score
//! adds, to the content-to-content product, content-to-position (`c2p`: the query against the
//! key's relative position) and position-to-content (`p2c`) terms, read from a table of relative
//! position embeddings shared by every layer and indexed by log-bucketed distances.
//!
//! Papers: He et al. 2021, "DeBERTa: Decoding-enhanced BERT with Disentangled Attention"
//! (<https://arxiv.org/abs/2006.03654>); He et al. 2023, "DeBERTaV3"
//! (<https://arxiv.org/abs/2111.09543>). Matches `transformers.models.deberta_v2.modeling_deberta_v2`
//! (`DebertaV2Model`, `DebertaV2ForSequenceClassification`, `DebertaV2ForQuestionAnswering`);
//! parameter names are that module's, with or without the `deberta.` prefix. The convolution
//! layer of DeBERTa-v2 xlarge / xxlarge (`conv_kernel_size`) is refused by name.

use burn::module::Module;
use burn::tensor::{Int, Tensor, TensorData};
use serde::Deserialize;

use crate::bert::{EncoderInput, PostNorm, SpanLogits};
use crate::config::{Activation, HeadFields};
use crate::error::Result;
use crate::layers::{
    Embedding, LayerNorm, Linear, MASK_VALUE, Mode, TorchLinear, dropout, merge_heads, split_heads,
};
use crate::unpad::Layout;
use crate::weights::{VisitParams, Visitor, Weights, join};

/// DeBERTa-v2/v3 hyper-parameters, as `transformers.DebertaV2Config` reads them (with its
/// defaults, and those of the attributes it reads with `getattr`).
#[derive(Debug, Clone, Deserialize)]
pub struct DebertaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: Activation,
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f64,
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f64,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub type_vocab_size: usize,
    #[serde(default = "default_init")]
    pub initializer_range: f64,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub relative_attention: bool,
    #[serde(default = "minus_one")]
    pub max_relative_positions: i64,
    #[serde(default = "minus_one")]
    pub position_buckets: i64,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default = "default_true")]
    pub position_biased_input: bool,
    /// `["p2c", "c2p"]`, or the legacy string `"p2c|c2p"`.
    #[serde(default)]
    pub pos_att_type: Option<serde_json::Value>,
    #[serde(default)]
    pub share_att_key: bool,
    /// `"layer_norm"` normalises the relative position embeddings.
    #[serde(default)]
    pub norm_rel_ebd: Option<String>,
    #[serde(default)]
    pub embedding_size: Option<usize>,
    #[serde(default)]
    pub pooler_hidden_size: Option<usize>,
    #[serde(default)]
    pub pooler_dropout: f64,
    #[serde(default = "default_act")]
    pub pooler_hidden_act: Activation,
    #[serde(default)]
    pub cls_dropout: Option<f64>,
    /// DeBERTa-v2 xlarge's convolution after the first layer: refused.
    #[serde(default)]
    pub conv_kernel_size: usize,
    #[serde(default)]
    pub attention_head_size: Option<usize>,
    #[serde(flatten)]
    pub head: HeadFields,
}

fn default_act() -> Activation {
    Activation::Gelu
}
fn default_dropout() -> f64 {
    0.1
}
fn default_max_pos() -> usize {
    512
}
fn default_init() -> f64 {
    0.02
}
fn default_eps() -> f64 {
    1e-7
}
fn minus_one() -> i64 {
    -1
}
fn default_true() -> bool {
    true
}

impl DebertaConfig {
    /// The disentangled terms: `c2p`, `p2c` (each may be absent).
    pub fn pos_att_type(&self) -> Vec<String> {
        match &self.pos_att_type {
            Some(serde_json::Value::String(s)) => s
                .to_lowercase()
                .split('|')
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
                .collect(),
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_str().map(|s| s.to_lowercase()))
                .collect(),
            _ => vec![],
        }
    }

    /// The farthest relative position: `max_relative_positions`, else the position table.
    fn max_relative(&self) -> i64 {
        if self.max_relative_positions < 1 {
            self.max_position_embeddings as i64
        } else {
            self.max_relative_positions
        }
    }

    /// Half the relative embedding table: the buckets, else the farthest position.
    fn span(&self) -> usize {
        if self.position_buckets > 0 {
            self.position_buckets as usize
        } else {
            self.max_relative() as usize
        }
    }

    fn embedding_size(&self) -> usize {
        self.embedding_size.unwrap_or(self.hidden_size)
    }

    /// Checks what loading divides by or would otherwise ignore.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let (h, n) = (self.hidden_size, self.num_attention_heads);
        if n == 0 || !h.is_multiple_of(n) {
            return Err(format!(
                "hidden_size = {h} must be a multiple of num_attention_heads = {n}"
            ));
        }
        if self.attention_head_size.is_some_and(|d| d * n != h) {
            return Err(
                "attention_head_size other than hidden_size / heads is not implemented".into(),
            );
        }
        if self.conv_kernel_size > 0 {
            return Err(format!(
                "conv_kernel_size = {}: DeBERTa-v2's convolution layer is not implemented",
                self.conv_kernel_size
            ));
        }
        if let Some(t) = self
            .pos_att_type()
            .into_iter()
            .find(|t| !matches!(t.as_str(), "c2p" | "p2c"))
        {
            return Err(format!(
                "pos_att_type {t:?} is not implemented (c2p and p2c are)"
            ));
        }
        if self.pooler_hidden_size.is_some_and(|p| p != h) {
            return Err("pooler_hidden_size other than hidden_size is not implemented".into());
        }
        let norm = self
            .norm_rel_ebd
            .as_deref()
            .unwrap_or("none")
            .to_lowercase();
        if norm
            .split('|')
            .map(str::trim)
            .any(|t| !matches!(t, "none" | "layer_norm"))
        {
            return Err(format!("norm_rel_ebd = {norm:?} is not implemented"));
        }
        Ok(())
    }

    fn norm_rel_ebd(&self) -> bool {
        self.norm_rel_ebd.as_deref().is_some_and(|n| {
            n.to_lowercase()
                .split('|')
                .any(|t| t.trim() == "layer_norm")
        })
    }
}

/// `make_log_bucket_position`: distances within `bucket_size / 2` stay as they are; farther
/// ones are compressed logarithmically up to `max_position`. Computed in f32 as PyTorch does
/// (the ceiling makes the rounding matter).
fn log_bucket(rel: i64, bucket_size: i64, max_position: i64) -> i64 {
    let mid = bucket_size / 2;
    let abs = if rel < mid && rel > -mid {
        mid - 1
    } else {
        rel.abs()
    };
    if abs <= mid {
        return rel;
    }
    let ratio = (abs as f32 / mid as f32).ln() / ((max_position - 1) as f32 / mid as f32).ln();
    let log_pos = (ratio * (mid - 1) as f32).ceil() + mid as f32;
    log_pos as i64 * rel.signum()
}

/// Word (+ position, + token type) embeddings, an optional projection, LayerNorm, padding
/// zeroed, dropout.
#[derive(Module, Debug)]
pub struct DebertaEmbeddings {
    pub word_embeddings: Embedding,
    pub position_embeddings: Option<Embedding>,
    pub token_type_embeddings: Option<Embedding>,
    pub embed_proj: Option<Linear>,
    pub layer_norm: LayerNorm,
    pub dropout: f64,
}

impl DebertaEmbeddings {
    fn load(vb: &Weights, c: &DebertaConfig) -> Result<Self> {
        let e = c.embedding_size();
        Ok(Self {
            word_embeddings: Embedding::load(&vb.pp("word_embeddings"), c.vocab_size, e)?
                .with_padding_idx(Some(c.pad_token_id.unwrap_or(0))),
            position_embeddings: c
                .position_biased_input
                .then(|| {
                    Embedding::load(&vb.pp("position_embeddings"), c.max_position_embeddings, e)
                })
                .transpose()?,
            token_type_embeddings: (c.type_vocab_size > 0)
                .then(|| Embedding::load(&vb.pp("token_type_embeddings"), c.type_vocab_size, e))
                .transpose()?,
            embed_proj: (e != c.hidden_size)
                .then(|| {
                    Linear::load(
                        &vb.pp("embed_proj"),
                        e,
                        c.hidden_size,
                        false,
                        TorchLinear::Linear,
                    )
                })
                .transpose()?,
            layer_norm: LayerNorm::load(&vb.pp("LayerNorm"), c.hidden_size, c.layer_norm_eps)?,
            dropout: c.hidden_dropout_prob,
        })
    }

    /// # Shapes
    /// - ids, types, mask `[B, T]`
    /// - output `[B, T, H]`
    fn forward(
        &self,
        ids: Tensor<2, Int>,
        types: Option<Tensor<2, Int>>,
        mask: Tensor<2, Int>,
        mode: Mode,
    ) -> Tensor<3> {
        let [b, t] = ids.dims();
        let device = ids.device();
        let mut x = self.word_embeddings.forward(ids);
        if let Some(p) = &self.position_embeddings {
            let positions = Tensor::<1, Int>::arange(0..t as i64, &device)
                .reshape([1, t])
                .expand([b, t]);
            x = x + p.forward(positions);
        }
        if let Some(tt) = &self.token_type_embeddings {
            x = x + tt.forward(types.unwrap_or_else(|| Tensor::zeros([b, t], &device)));
        }
        if let Some(proj) = &self.embed_proj {
            x = proj.forward(x, mode);
        }
        let x = self.layer_norm.forward(x) * mask.float().reshape([b, t, 1]);
        dropout(x, self.dropout, mode)
    }
}

impl VisitParams for DebertaEmbeddings {
    fn visit_params(&mut self, p: &str, v: &mut dyn Visitor) {
        self.word_embeddings
            .visit_params(&join(p, "word_embeddings"), v);
        if let Some(e) = &mut self.position_embeddings {
            e.visit_params(&join(p, "position_embeddings"), v);
        }
        if let Some(e) = &mut self.token_type_embeddings {
            e.visit_params(&join(p, "token_type_embeddings"), v);
        }
        if let Some(l) = &mut self.embed_proj {
            l.visit_params(&join(p, "embed_proj"), v);
        }
        self.layer_norm.visit_params(&join(p, "LayerNorm"), v);
    }
}

/// One block: disentangled self-attention, add & norm, feed-forward, add & norm.
#[derive(Module, Debug)]
pub struct DebertaLayer {
    pub query_proj: Linear,
    pub key_proj: Linear,
    pub value_proj: Linear,
    /// Without `share_att_key`: the projections of the relative embeddings.
    pub pos_key_proj: Option<Linear>,
    pub pos_query_proj: Option<Linear>,
    /// BERT's output projection, add & norm and feed-forward.
    pub post: PostNorm,
    pub heads: usize,
    pub attention_dropout: f64,
    /// Dropout of the relative embeddings (`hidden_dropout_prob`).
    pub hidden_dropout: f64,
    pub c2p: bool,
    pub p2c: bool,
}

impl DebertaLayer {
    fn load(vb: &Weights, c: &DebertaConfig) -> Result<Self> {
        let h = c.hidden_size;
        let lin = |name: &str, i, o| Linear::load(&vb.pp(name), i, o, true, TorchLinear::Linear);
        let types = c.pos_att_type();
        let (c2p, p2c) = (
            c.relative_attention && types.iter().any(|t| t == "c2p"),
            c.relative_attention && types.iter().any(|t| t == "p2c"),
        );
        let own = !c.share_att_key;
        Ok(Self {
            query_proj: lin("attention.self.query_proj", h, h)?,
            key_proj: lin("attention.self.key_proj", h, h)?,
            value_proj: lin("attention.self.value_proj", h, h)?,
            pos_key_proj: (own && c2p)
                .then(|| lin("attention.self.pos_key_proj", h, h))
                .transpose()?,
            pos_query_proj: (own && p2c)
                .then(|| lin("attention.self.pos_query_proj", h, h))
                .transpose()?,
            post: PostNorm::load(
                vb,
                h,
                c.intermediate_size,
                c.layer_norm_eps,
                c.hidden_dropout_prob,
                c.hidden_act,
            )?,
            heads: c.num_attention_heads,
            attention_dropout: c.attention_probs_dropout_prob,
            hidden_dropout: c.hidden_dropout_prob,
            c2p,
            p2c,
        })
    }

    /// # Shapes
    /// - x `[B, T, H]` (`[1, N, H]` padding-free)
    /// - mask: `keep` `[B, 1, T, T]` (1 where query and key are both real) and its additive bias
    /// - rel: relative embeddings `[2S, H]` and the c2p / p2c indices `[T, T]`
    fn forward(
        &self,
        x: Tensor<3>,
        layout: &Layout,
        mask: &PairMask,
        rel: Option<&Relative>,
        mode: Mode,
    ) -> Tensor<3> {
        let heads = |y: Tensor<3>| split_heads(layout.pad(y), self.heads);
        let q = heads(self.query_proj.forward(x.clone(), mode));
        let k = heads(self.key_proj.forward(x.clone(), mode));
        let v = heads(self.value_proj.forward(x.clone(), mode));
        let [b, nh, t, hd] = q.dims();
        let factor = 1 + usize::from(self.c2p) + usize::from(self.p2c);
        let scale = ((hd * factor) as f64).sqrt();
        // (B, H, T, hd) x (B, H, hd, T) -> (B, H, T, T)
        let mut scores =
            crate::precision::matmul(q.clone(), k.clone().swap_dims(2, 3)).div_scalar(scale);
        if let Some(rel) = rel {
            let two_s = rel.embeddings.dims()[0];
            let emb = dropout(rel.embeddings.clone(), self.hidden_dropout, mode).reshape([
                1,
                two_s,
                rel.embeddings.dims()[1],
            ]);
            // (1, 2S, H) -> (1, H_heads, 2S, hd), broadcast over the batch.
            let project = |l: &Linear| -> Tensor<4> {
                split_heads(l.forward(emb.clone(), mode), self.heads).expand([b, nh, two_s, hd])
            };
            if self.c2p {
                let pos_key = project(self.pos_key_proj.as_ref().unwrap_or(&self.key_proj));
                // (B, H, T, hd) x (B, H, hd, 2S) -> (B, H, T, 2S), then each query's key positions.
                let c2p = crate::precision::matmul(q, pos_key.swap_dims(2, 3));
                let index = rel.c2p.clone().reshape([1, 1, t, t]).expand([b, nh, t, t]);
                scores = scores + c2p.gather(3, index).div_scalar(scale);
            }
            if self.p2c {
                let pos_query = project(self.pos_query_proj.as_ref().unwrap_or(&self.query_proj));
                // (B, H, Tk, hd) x (B, H, hd, 2S) -> (B, H, Tk, 2S), gathered then transposed.
                let p2c = crate::precision::matmul(k, pos_query.swap_dims(2, 3));
                let index = rel.p2c.clone().reshape([1, 1, t, t]).expand([b, nh, t, t]);
                scores = scores + p2c.gather(3, index).swap_dims(2, 3).div_scalar(scale);
            }
        }
        // transformers fills masked scores (`masked_fill`), so no gradient reaches them; a
        // padding query's row is all masked, and its uniform probabilities would pass one on
        // through an added bias. Zeroing the masked scores first blocks it as the fill does.
        let [_, _, tq, tk] = scores.dims();
        let scores = scores * mask.keep.clone().expand([b, nh, tq, tk]);
        let probs = crate::kernels::attention_probs(
            scores,
            mask.bias.clone(),
            1.0,
            if mode == Mode::Eval {
                0.0
            } else {
                self.attention_dropout
            },
        );
        // (B, H, T, T) x (B, H, T, hd) -> (B, H, T, hd)
        let ctx = layout.enter(merge_heads(crate::precision::matmul(probs, v)));
        self.post.forward(ctx, x, mode)
    }
}

impl VisitParams for DebertaLayer {
    fn visit_params(&mut self, p: &str, v: &mut dyn Visitor) {
        self.query_proj
            .visit_params(&join(p, "attention.self.query_proj"), v);
        self.key_proj
            .visit_params(&join(p, "attention.self.key_proj"), v);
        self.value_proj
            .visit_params(&join(p, "attention.self.value_proj"), v);
        if let Some(l) = &mut self.pos_key_proj {
            l.visit_params(&join(p, "attention.self.pos_key_proj"), v);
        }
        if let Some(l) = &mut self.pos_query_proj {
            l.visit_params(&join(p, "attention.self.pos_query_proj"), v);
        }
        self.post.visit_params(p, v);
    }
}

/// transformers' DeBERTa mask: a pair is kept when both its query and its key are real tokens.
struct PairMask {
    /// `[B, 1, T, T]`, 1 or 0.
    keep: Tensor<4>,
    /// `[B, 1, T, T]`, 0 or [`MASK_VALUE`].
    bias: Tensor<4>,
}

/// What every layer reads of the relative positions in one forward pass.
struct Relative {
    /// `[2S, H]`, normalised when the config says so.
    embeddings: Tensor<2>,
    /// `[T, T]`: `clamp(rel + S, 0, 2S - 1)`, the c2p column of query `q` and key `k`.
    c2p: Tensor<2, Int>,
    /// `[T, T]`: `clamp(-rel + S, 0, 2S - 1)`, indexed by key then query before the transpose.
    p2c: Tensor<2, Int>,
}

/// The encoder (`DebertaV2Model`).
#[derive(Module, Debug)]
pub struct DebertaModel {
    pub embeddings: DebertaEmbeddings,
    pub layers: Vec<DebertaLayer>,
    /// `encoder.rel_embeddings`: `[2S, H]`.
    pub rel_embeddings: Option<Embedding>,
    /// `encoder.LayerNorm` over the relative embeddings (`norm_rel_ebd = "layer_norm"`).
    pub rel_norm: Option<LayerNorm>,
    #[module(skip)]
    config: DebertaRuntime,
}

/// The few config values the forward pass needs.
#[derive(Debug, Clone)]
struct DebertaRuntime {
    span: usize,
    buckets: i64,
    max_relative: i64,
}

impl DebertaModel {
    /// Loads the encoder from `vb` (already scoped to the `deberta.` prefix if any).
    pub fn load(vb: &Weights, c: &DebertaConfig) -> Result<Self> {
        let layers = (0..c.num_hidden_layers)
            .map(|i| DebertaLayer::load(&vb.pp(format!("encoder.layer.{i}")), c))
            .collect::<Result<_>>()?;
        let rel_embeddings = c
            .relative_attention
            .then(|| {
                Embedding::load(
                    &vb.pp("encoder.rel_embeddings"),
                    2 * c.span(),
                    c.hidden_size,
                )
            })
            .transpose()?;
        let rel_norm = (c.relative_attention && c.norm_rel_ebd())
            .then(|| LayerNorm::load(&vb.pp("encoder.LayerNorm"), c.hidden_size, c.layer_norm_eps))
            .transpose()?;
        Ok(Self {
            embeddings: DebertaEmbeddings::load(&vb.pp("embeddings"), c)?,
            layers,
            rel_embeddings,
            rel_norm,
            config: DebertaRuntime {
                span: c.span(),
                buckets: c.position_buckets,
                max_relative: c.max_relative(),
            },
        })
    }

    fn relative(&self, t: usize, device: &burn::tensor::Device) -> Option<Relative> {
        let table = self.rel_embeddings.as_ref()?.weight.val();
        let embeddings = match &self.rel_norm {
            Some(n) => n.forward(table),
            None => table,
        };
        let c = &self.config;
        let s = c.span as i64;
        let rel: Vec<i64> = (0..t as i64)
            .flat_map(|q| {
                (0..t as i64).map(move |k| {
                    if c.buckets > 0 && c.max_relative > 0 {
                        log_bucket(q - k, c.buckets, c.max_relative)
                    } else {
                        q - k
                    }
                })
            })
            .collect();
        let index = |sign: i64| {
            let v: Vec<i64> = rel
                .iter()
                .map(|r| (sign * r + s).clamp(0, 2 * s - 1))
                .collect();
            Tensor::<2, Int>::from_data(TensorData::new(v, [t, t]), device)
        };
        Some(Relative {
            embeddings,
            c2p: index(1),
            p2c: index(-1),
        })
    }

    /// # Shapes
    /// - output `[B, T, H]`
    pub fn forward(&self, input: EncoderInput, mode: Mode) -> Tensor<3> {
        let device = input.input_ids.device();
        let [b, t] = input.input_ids.dims();
        let mask = input.attention_mask;
        let x = self
            .embeddings
            .forward(input.input_ids, input.token_type_ids, mask.clone(), mode);
        // transformers masks padding as keys and as queries: a padding row attends uniformly.
        let keep = mask.equal_elem(1);
        let pair = keep
            .clone()
            .reshape([b, 1, 1, t])
            .expand([b, 1, t, t])
            .bool_and(keep.reshape([b, 1, t, 1]).expand([b, 1, t, t]));
        let mask = PairMask {
            keep: pair.clone().float(),
            bias: Tensor::<4>::zeros([b, 1, t, t], &device).mask_fill(pair.bool_not(), MASK_VALUE),
        };
        let rel = self.relative(t, &device);
        let layout = Layout::new(input.unpadded.as_ref(), &device);
        let mut x = layout.enter(x);
        for layer in &self.layers {
            x = layer.forward(x, &layout, &mask, rel.as_ref(), mode);
        }
        layout.pad(x)
    }
}

impl VisitParams for DebertaModel {
    fn visit_params(&mut self, p: &str, v: &mut dyn Visitor) {
        self.embeddings.visit_params(&join(p, "embeddings"), v);
        for (i, l) in self.layers.iter_mut().enumerate() {
            l.visit_params(&join(p, &format!("encoder.layer.{i}")), v);
        }
        if let Some(e) = &mut self.rel_embeddings {
            e.visit_params(&join(p, "encoder.rel_embeddings"), v);
        }
        if let Some(n) = &mut self.rel_norm {
            n.visit_params(&join(p, "encoder.LayerNorm"), v);
        }
    }
}

/// The encoder prefix of task checkpoints: `deberta` (none in bare ones).
fn prefix(vb: &Weights) -> &'static str {
    if vb.contains("deberta.embeddings.word_embeddings.weight") {
        "deberta"
    } else {
        ""
    }
}

/// `DebertaV2ForSequenceClassification`: `ContextPooler` (first token, dropout, dense, GELU),
/// dropout, linear classifier.
#[derive(Module, Debug)]
pub struct DebertaForSequenceClassification {
    pub deberta: DebertaModel,
    pub pooler: Linear,
    pub classifier: Linear,
    pub pooler_dropout: f64,
    pub dropout: f64,
    #[module(skip)]
    pub pooler_act: Activation,
}

impl DebertaForSequenceClassification {
    /// Loads the encoder and head; head tensors the checkpoint lacks are initialised
    /// (N(0, initializer_range), zero bias) and named in the second value.
    pub fn load(vb: &Weights, c: &DebertaConfig) -> Result<(Self, Vec<String>)> {
        let deberta = DebertaModel::load(&vb.pp(prefix(vb)), c)?;
        let h = c.hidden_size;
        let (pooler, mut fresh) =
            crate::load_or_init_linear(&vb.pp("pooler.dense"), h, h, c.initializer_range)?;
        let (classifier, more) = crate::load_or_init_linear(
            &vb.pp("classifier"),
            h,
            c.head.num_labels(),
            c.initializer_range,
        )?;
        fresh.extend(more);
        Ok((
            Self {
                deberta,
                pooler,
                classifier,
                pooler_dropout: c.pooler_dropout,
                dropout: c.cls_dropout.unwrap_or(c.hidden_dropout_prob),
                pooler_act: c.pooler_hidden_act,
            },
            fresh,
        ))
    }

    /// # Shapes
    /// - logits `[B, num_labels]`
    pub fn forward(&self, input: EncoderInput, mode: Mode) -> Tensor<2> {
        let x = self.deberta.forward(input, mode);
        let [b, _, h] = x.dims();
        let first = dropout(
            x.slice([0..b, 0..1]).reshape([b, h]),
            self.pooler_dropout,
            mode,
        );
        let pooled = self.pooler_act.forward(self.pooler.forward(first, mode));
        self.classifier
            .forward(dropout(pooled, self.dropout, mode), mode)
    }
}

impl VisitParams for DebertaForSequenceClassification {
    fn visit_params(&mut self, p: &str, v: &mut dyn Visitor) {
        self.deberta.visit_params(&join(p, "deberta"), v);
        self.pooler.visit_params(&join(p, "pooler.dense"), v);
        self.classifier.visit_params(&join(p, "classifier"), v);
    }
}

/// `DebertaV2ForQuestionAnswering`: a linear layer to start and end logits per token.
#[derive(Module, Debug)]
pub struct DebertaForQuestionAnswering {
    pub deberta: DebertaModel,
    pub qa_outputs: Linear,
}

impl DebertaForQuestionAnswering {
    /// Loads the encoder and the span head (initialised when absent, name returned).
    pub fn load(vb: &Weights, c: &DebertaConfig) -> Result<(Self, Vec<String>)> {
        let deberta = DebertaModel::load(&vb.pp(prefix(vb)), c)?;
        let (qa_outputs, fresh) = crate::load_or_init_linear(
            &vb.pp("qa_outputs"),
            c.hidden_size,
            2,
            c.initializer_range,
        )?;
        Ok((
            Self {
                deberta,
                qa_outputs,
            },
            fresh,
        ))
    }

    /// # Shapes
    /// - start and end logits `[B, T]`
    pub fn forward(&self, input: EncoderInput, mode: Mode) -> SpanLogits {
        let x = self.deberta.forward(input, mode);
        let [b, t, _] = x.dims();
        // (B, T, H) -> (B, T, 2)
        let logits = self.qa_outputs.forward(x, mode);
        SpanLogits {
            start: logits.clone().slice([0..b, 0..t, 0..1]).reshape([b, t]),
            end: logits.slice([0..b, 0..t, 1..2]).reshape([b, t]),
        }
    }
}

impl VisitParams for DebertaForQuestionAnswering {
    fn visit_params(&mut self, p: &str, v: &mut dyn Visitor) {
        self.deberta.visit_params(&join(p, "deberta"), v);
        self.qa_outputs.visit_params(&join(p, "qa_outputs"), v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `make_log_bucket_position` as transformers 5.23 computes it: `arange(-12, 13)` with
    /// 4 buckets up to 8, and DeBERTa-v3's 256 buckets up to 512 over `arange(0, 601)` (its
    /// sum, and the values where the logarithm takes over).
    #[test]
    fn log_buckets_match_transformers() {
        let got: Vec<i64> = (-12..=12).map(|r| log_bucket(r, 4, 8)).collect();
        let want = [
            -4, -4, -4, -4, -4, -3, -3, -3, -3, -3, -2, -1, 0, 1, 2, 3, 3, 3, 3, 3, 4, 4, 4, 4, 4,
        ];
        assert_eq!(got, want);
        let v3: Vec<i64> = (0..=600).map(|r| log_bucket(r, 256, 512)).collect();
        assert_eq!(v3.iter().sum::<i64>(), 110718);
        assert_eq!(
            v3[129..140],
            [129, 130, 131, 131, 132, 133, 133, 134, 135, 135, 136]
        );
        assert_eq!(v3[600], 270);
        assert_eq!(log_bucket(-600, 256, 512), -270);
    }
}
