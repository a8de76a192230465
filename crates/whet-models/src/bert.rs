//! BERT encoder (covers BERT and MiniLM / sentence-transformers checkpoints), and RoBERTa and
//! XLM-RoBERTa, which are BERT with three changes: positions numbered from `padding_idx + 1`
//! over non-pad tokens, one token type, and a classification head of its own
//! (`classifier.dense`, tanh, `classifier.out_proj`) in place of the pooler.
//!
//! Papers: Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional Transformers"
//! (<https://arxiv.org/abs/1810.04805>); Liu et al. 2019, "RoBERTa: A Robustly Optimized BERT
//! Pretraining Approach" (<https://arxiv.org/abs/1907.11692>). Matches
//! `transformers.models.bert.modeling_bert` (`BertModel`, `BertForSequenceClassification`,
//! `BertForQuestionAnswering`) and `roberta` / `xlm_roberta`; parameter names are those
//! modules', with or without the `bert.` / `roberta.` prefix.

use std::path::Path;

use burn::module::Module;
use burn::tensor::{Device, Int, Tensor};
use serde::Deserialize;

use crate::config::{Activation, HeadFields, read_json};
use crate::error::Result;
use crate::layers::{Embedding, LayerNorm, Linear, Mode, TorchLinear, attention_bias, dropout};
use crate::prompt::{PromptEncoder, PromptShape, PromptSlot, VirtualTokens, widen_mask};
use crate::unpad::{Layout, Unpadded};
use crate::weights::{VisitParams, Visitor, Weights, join};

/// BERT hyper-parameters, as in `transformers.BertConfig`.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    /// `bert`, `roberta` or `xlm-roberta`.
    #[serde(default = "default_model_type")]
    pub model_type: String,
    /// Only `absolute` is implemented.
    #[serde(default)]
    pub position_embedding_type: Option<String>,
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
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_ln_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_init_range")]
    pub initializer_range: f64,
    #[serde(default)]
    pub classifier_dropout: Option<f64>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(flatten)]
    pub head: HeadFields,
}

fn default_model_type() -> String {
    "bert".into()
}
fn default_act() -> Activation {
    Activation::Gelu
}
fn default_dropout() -> f64 {
    0.1
}
fn default_type_vocab() -> usize {
    2
}
fn default_ln_eps() -> f64 {
    1e-12
}
fn default_init_range() -> f64 {
    0.02
}

impl BertConfig {
    /// Reads `config.json` from a model folder.
    pub fn from_folder(dir: &Path) -> Result<Self> {
        read_json(&dir.join("config.json"))
    }

    /// RoBERTa and XLM-RoBERTa.
    pub fn is_roberta(&self) -> bool {
        matches!(self.model_type.as_str(), "roberta" | "xlm-roberta")
    }

    /// The padding index RoBERTa numbers positions after (1 by default).
    fn padding_idx(&self) -> usize {
        self.pad_token_id
            .unwrap_or(if self.is_roberta() { 1 } else { 0 }) as usize
    }

    /// The longest input the position table holds: RoBERTa's first position is
    /// `padding_idx + 1`.
    pub fn positions(&self) -> usize {
        if self.is_roberta() {
            self.max_position_embeddings
                .saturating_sub(self.padding_idx() + 1)
        } else {
            self.max_position_embeddings
        }
    }

    /// Refuses what whet does not implement, by name.
    pub fn validate(&self) -> std::result::Result<(), String> {
        match self.position_embedding_type.as_deref() {
            None | Some("absolute") => Ok(()),
            Some(other) => Err(format!(
                "position_embedding_type = {other:?} is not implemented (absolute is)"
            )),
        }
    }
}

/// The inputs of an encoder forward pass.
#[derive(Debug, Clone)]
pub struct EncoderInput {
    /// `[B, T]`
    pub input_ids: Tensor<2, Int>,
    /// `[B, T]`, 1 for real tokens and 0 for padding.
    pub attention_mask: Tensor<2, Int>,
    /// `[B, T]`, segment ids; zeros when absent.
    pub token_type_ids: Option<Tensor<2, Int>>,
    /// Where the real tokens are, to run padding-free ([`crate::unpad`]); `None` runs the
    /// padded rows as they are.
    pub unpadded: Option<Unpadded>,
}

/// Word + position + token-type embeddings, then LayerNorm and dropout.
#[derive(Module, Debug)]
pub struct BertEmbeddings {
    pub word_embeddings: Embedding,
    pub position_embeddings: Embedding,
    pub token_type_embeddings: Embedding,
    pub layer_norm: LayerNorm,
    pub dropout: f64,
    /// RoBERTa: positions count non-pad tokens from `padding_idx + 1`, and the one token type
    /// is 0.
    #[module(skip)]
    pub roberta_padding_idx: Option<usize>,
}

impl BertEmbeddings {
    fn load(vb: &Weights, c: &BertConfig) -> Result<Self> {
        Ok(Self {
            word_embeddings: Embedding::load(
                &vb.pp("word_embeddings"),
                c.vocab_size,
                c.hidden_size,
            )?
            .with_padding_idx(Some(c.pad_token_id.unwrap_or(0))),
            // RoBERTa's padding position gets no gradient (`padding_idx`), as its word does.
            position_embeddings: Embedding::load(
                &vb.pp("position_embeddings"),
                c.max_position_embeddings,
                c.hidden_size,
            )?
            .with_padding_idx(c.is_roberta().then(|| c.padding_idx() as u32)),
            token_type_embeddings: Embedding::load(
                &vb.pp("token_type_embeddings"),
                c.type_vocab_size,
                c.hidden_size,
            )?,
            layer_norm: LayerNorm::load(&vb.pp("LayerNorm"), c.hidden_size, c.layer_norm_eps)?,
            dropout: c.hidden_dropout_prob,
            roberta_padding_idx: c.is_roberta().then(|| c.padding_idx()),
        })
    }

    /// Embeds the tokens, after a soft prompt when there is one (it gets positions `0..P` and
    /// token type 0, as peft's prompt tuning passes it through `inputs_embeds`); `first` is the
    /// first position's number (`P` after a key/value prefix, as transformers numbers tokens
    /// after `past_key_values`).
    ///
    /// # Shapes
    /// - ids, token types `[B, T]`, soft prompt `[B, P, H]`
    /// - output `[B, P + T, H]` (`P` = 0 without a soft prompt)
    fn forward(
        &self,
        ids: Tensor<2, Int>,
        types: Tensor<2, Int>,
        soft_prompt: Option<Tensor<3>>,
        first: usize,
        mode: Mode,
    ) -> Tensor<3> {
        let device = ids.device();
        let [b, t] = ids.dims();
        let positions = match self.roberta_padding_idx {
            // `create_position_ids_from_input_ids`: (cumsum(ids != pad) + past) * (ids != pad)
            // + pad, so pads keep position `pad` wherever they are.
            Some(pad) if soft_prompt.is_none() => {
                let real = ids.clone().not_equal_elem(pad as i64).int();
                (real.clone().cumsum(1).add_scalar(first as i64) * real).add_scalar(pad as i64)
            }
            // With `inputs_embeds` (a soft prompt in front), positions run on from `pad + 1`.
            Some(pad) => {
                let n = t + soft_prompt.as_ref().map_or(0, |e| e.dims()[1]);
                Tensor::<1, Int>::arange((pad + 1) as i64..(pad + 1 + n) as i64, &device)
                    .reshape([1, n])
                    .expand([b, n])
            }
            None => {
                let n = t + soft_prompt.as_ref().map_or(0, |e| e.dims()[1]);
                Tensor::<1, Int>::arange(first as i64..(first + n) as i64, &device)
                    .reshape([1, n])
                    .expand([b, n])
            }
        };
        let mut words = self.word_embeddings.forward(ids);
        let mut types = match self.roberta_padding_idx {
            Some(_) => types.zeros_like(),
            None => types,
        };
        if let Some(e) = soft_prompt {
            let [b, p, _] = e.dims();
            // (B, P, H) ++ (B, T, H) -> (B, P + T, H)
            words = Tensor::cat(vec![e, words], 1);
            types = Tensor::cat(vec![Tensor::zeros([b, p], &types.device()), types], 1);
        }
        let x = words
            + self.position_embeddings.forward(positions)
            + self.token_type_embeddings.forward(types);
        dropout(self.layer_norm.forward(x), self.dropout, mode)
    }
}

impl VisitParams for BertEmbeddings {
    fn visit_params(&mut self, p: &str, v: &mut dyn Visitor) {
        self.word_embeddings
            .visit_params(&join(p, "word_embeddings"), v);
        self.position_embeddings
            .visit_params(&join(p, "position_embeddings"), v);
        self.token_type_embeddings
            .visit_params(&join(p, "token_type_embeddings"), v);
        self.layer_norm.visit_params(&join(p, "LayerNorm"), v);
    }
}

/// What follows self-attention in a post-norm block (BERT's, and DeBERTa's): the attention
/// output projection, add & norm, the feed-forward, add & norm; under transformers' names
/// `attention.output.*`, `intermediate.dense`, `output.*`.
#[derive(Module, Debug)]
pub struct PostNorm {
    pub attention_output: Linear,
    pub attention_norm: LayerNorm,
    pub intermediate: Linear,
    pub output: Linear,
    pub output_norm: LayerNorm,
    pub hidden_dropout: f64,
    #[module(skip)]
    pub act: Activation,
}

impl PostNorm {
    /// Loads the block's tensors after attention (`vb` scoped to the layer).
    pub(crate) fn load(
        vb: &Weights,
        hidden: usize,
        intermediate: usize,
        eps: f64,
        hidden_dropout: f64,
        act: Activation,
    ) -> Result<Self> {
        let lin = |name: &str, i, o| Linear::load(&vb.pp(name), i, o, true, TorchLinear::Linear);
        Ok(Self {
            attention_output: lin("attention.output.dense", hidden, hidden)?,
            attention_norm: LayerNorm::load(&vb.pp("attention.output.LayerNorm"), hidden, eps)?,
            intermediate: lin("intermediate.dense", hidden, intermediate)?,
            output: lin("output.dense", intermediate, hidden)?,
            output_norm: LayerNorm::load(&vb.pp("output.LayerNorm"), hidden, eps)?,
            hidden_dropout,
            act,
        })
    }

    /// `ctx` is the attention context, `x` the block's input.
    ///
    /// # Shapes
    /// - ctx, x `[B, T, H]` (`[1, N, H]` padding-free); output as x
    pub(crate) fn forward(&self, ctx: Tensor<3>, x: Tensor<3>, mode: Mode) -> Tensor<3> {
        let attn = dropout(
            self.attention_output.forward(ctx, mode),
            self.hidden_dropout,
            mode,
        );
        let x = self.attention_norm.forward(attn + x);
        let ff = self.output.forward(
            self.act.forward(self.intermediate.forward(x.clone(), mode)),
            mode,
        );
        self.output_norm
            .forward(dropout(ff, self.hidden_dropout, mode) + x)
    }
}

impl VisitParams for PostNorm {
    fn visit_params(&mut self, p: &str, v: &mut dyn Visitor) {
        self.attention_output
            .visit_params(&join(p, "attention.output.dense"), v);
        self.attention_norm
            .visit_params(&join(p, "attention.output.LayerNorm"), v);
        self.intermediate
            .visit_params(&join(p, "intermediate.dense"), v);
        self.output.visit_params(&join(p, "output.dense"), v);
        self.output_norm
            .visit_params(&join(p, "output.LayerNorm"), v);
    }
}

/// One encoder block: self-attention, add & norm, feed-forward, add & norm (post-norm).
#[derive(Module, Debug)]
pub struct BertLayer {
    pub query: Linear,
    pub key: Linear,
    pub value: Linear,
    pub post: PostNorm,
    pub heads: usize,
    pub attention_dropout: f64,
}

impl BertLayer {
    fn load(vb: &Weights, c: &BertConfig) -> Result<Self> {
        let h = c.hidden_size;
        let lin = |name: &str, i, o| Linear::load(&vb.pp(name), i, o, true, TorchLinear::Linear);
        Ok(Self {
            query: lin("attention.self.query", h, h)?,
            key: lin("attention.self.key", h, h)?,
            value: lin("attention.self.value", h, h)?,
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
        })
    }

    /// Token-wise layers run in `layout`, attention on padded rows.
    ///
    /// # Shapes
    /// - x `[B, T, H]` (`[1, N, H]` padding-free), bias `[B, 1, T, P + T]`, prefix keys and
    ///   values `[B, heads, P, hd]`
    /// - output as x
    fn forward(
        &self,
        x: Tensor<3>,
        layout: &Layout,
        bias: Tensor<4>,
        prefix: Option<&(Tensor<4>, Tensor<4>)>,
        mode: Mode,
    ) -> Tensor<3> {
        let attend = layout.attend(&x, prefix.is_none());
        let heads = |y: Tensor<3>| attend.heads(y, self.heads);
        let q = heads(self.query.forward(x.clone(), mode));
        let mut k = heads(self.key.forward(x.clone(), mode));
        let mut v = heads(self.value.forward(x.clone(), mode));
        if let Some((pk, pv)) = prefix {
            // (B, h, P, hd) ++ (B, h, T, hd) -> (B, h, P + T, hd)
            k = Tensor::cat(vec![pk.clone(), k], 2);
            v = Tensor::cat(vec![pv.clone(), v], 2);
        }
        let ctx = attend.merge(attend.run([q, k, v], bias, self.attention_dropout, mode));
        self.post.forward(ctx, x, mode)
    }
}

impl VisitParams for BertLayer {
    fn visit_params(&mut self, p: &str, v: &mut dyn Visitor) {
        self.query.visit_params(&join(p, "attention.self.query"), v);
        self.key.visit_params(&join(p, "attention.self.key"), v);
        self.value.visit_params(&join(p, "attention.self.value"), v);
        self.post.visit_params(p, v);
    }
}

/// The bare encoder with its pooler (`BertModel`).
#[derive(Module, Debug)]
pub struct BertModel {
    pub embeddings: BertEmbeddings,
    pub layers: Vec<BertLayer>,
    /// Dense + tanh on the first token; absent in some checkpoints.
    pub pooler: Option<Linear>,
    /// Virtual tokens of prompt learning, attached from outside (whet-peft).
    pub prompt: Option<PromptEncoder>,
}

/// Outputs of [`BertModel::forward`].
#[derive(Debug, Clone)]
pub struct EncoderOutput {
    /// `[B, T, H]`
    pub last_hidden_state: Tensor<3>,
    /// `[B, H]`, tanh(dense(first token)); None without a pooler.
    pub pooler_output: Option<Tensor<2>>,
}

impl BertModel {
    /// Loads the encoder from `vb` (already scoped to the `bert.` prefix if any).
    pub fn load(vb: &Weights, c: &BertConfig) -> Result<Self> {
        let layers = (0..c.num_hidden_layers)
            .map(|i| BertLayer::load(&vb.pp(format!("encoder.layer.{i}")), c))
            .collect::<Result<_>>()?;
        let pooler = if vb.contains("pooler.dense.weight") {
            Some(Linear::load(
                &vb.pp("pooler.dense"),
                c.hidden_size,
                c.hidden_size,
                true,
                TorchLinear::Linear,
            )?)
        } else {
            None
        };
        Ok(Self {
            embeddings: BertEmbeddings::load(&vb.pp("embeddings"), c)?,
            layers,
            pooler,
            prompt: None,
        })
    }

    /// Virtual tokens (prompt learning) go in front: a soft prompt makes the output `P`
    /// positions longer, and the first of them is what the pooler reads, as in peft.
    ///
    /// # Shapes
    /// - input ids and mask `[B, T]`
    /// - last hidden state `[B, P + T, H]` (`P` = 0 without a soft prompt), pooler output `[B, H]`
    pub fn forward(&self, input: EncoderInput, mode: Mode) -> EncoderOutput {
        let [b, t] = input.input_ids.dims();
        let types = input
            .token_type_ids
            .unwrap_or_else(|| Tensor::zeros([b, t], &input.input_ids.device()));
        let (mut mask, mut soft_prompt, mut prefix, mut first) =
            (input.attention_mask, None, None, 0);
        if let Some(vt) = self.prompt.as_ref().and_then(|e| e.virtual_tokens(b)) {
            mask = widen_mask(mask, vt.len());
            match vt {
                VirtualTokens::Embeddings(e) => soft_prompt = Some(e),
                VirtualTokens::KeyValues(kv) => {
                    first = mask.dims()[1] - t;
                    prefix = Some(kv);
                }
            }
        }
        let p = soft_prompt.as_ref().map_or(0, |e| e.dims()[1]);
        let layout = Layout::new(
            input.unpadded.map(|u| u.widen(p)).as_ref(),
            &input.input_ids.device(),
        );
        let x = self
            .embeddings
            .forward(input.input_ids, types, soft_prompt, first, mode);
        let bias = attention_bias(mask.equal_elem(1), x.dims()[1], false);
        let mut x = layout.enter(x);
        for (i, layer) in self.layers.iter().enumerate() {
            let prefix = prefix.as_ref().map(|kv| &kv[i]);
            x = layer.forward(x, &layout, bias.clone(), prefix, mode);
        }
        let x = layout.pad(x);
        let pooler_output = self.pooler.as_ref().map(|p| pool(p, x.clone(), mode));
        EncoderOutput {
            last_hidden_state: x,
            pooler_output,
        }
    }

    /// The sizes of this model's virtual tokens.
    pub fn prompt_shape(&self) -> PromptShape {
        let hidden = self.embeddings.word_embeddings.weight.dims()[1];
        let heads = self.layers[0].heads;
        PromptShape {
            layers: self.layers.len(),
            hidden,
            kv_heads: heads,
            head_dim: hidden / heads,
            takes_prefix: true,
        }
    }

    /// Positions a soft prompt adds in front of the output.
    pub fn virtual_positions(&self) -> usize {
        self.prompt.as_ref().map_or(0, |e| e.output_offset())
    }
}

impl VisitParams for BertModel {
    fn visit_params(&mut self, p: &str, v: &mut dyn Visitor) {
        self.embeddings.visit_params(&join(p, "embeddings"), v);
        for (i, l) in self.layers.iter_mut().enumerate() {
            l.visit_params(&join(p, &format!("encoder.layer.{i}")), v);
        }
        if let Some(pooler) = &mut self.pooler {
            pooler.visit_params(&join(p, "pooler.dense"), v);
        }
        let shape = self.prompt_shape();
        let slot = PromptSlot {
            encoder: &mut self.prompt,
            shape,
            word_embeddings: &self.embeddings.word_embeddings,
        };
        crate::prompt::visit_slot(slot, p, v);
    }
}

/// The checkpoint prefix of the encoder: `bert` / `roberta` in task checkpoints, none in bare
/// ones.
fn base_prefix(vb: &Weights) -> &'static str {
    ["bert", "roberta"]
        .into_iter()
        .find(|p| vb.contains(&format!("{p}.embeddings.word_embeddings.weight")))
        .unwrap_or("")
}

/// The prefix a task model saves its encoder under.
fn task_prefix(found: &'static str, c: &BertConfig) -> &'static str {
    match found {
        "" if c.is_roberta() => "roberta",
        "" => "bert",
        p => p,
    }
}

/// BERT's pooler: `tanh(dense(first token))`.
///
/// # Shapes
/// - x `[B, T, H]`
/// - output `[B, H]`
fn pool(dense: &Linear, x: Tensor<3>, mode: Mode) -> Tensor<2> {
    let [b, _, h] = x.dims();
    // (B, T, H) -> (B, 1, H) -> (B, H)
    let first = x.slice([0..b, 0..1]).reshape([b, h]);
    dense.forward(first, mode).tanh()
}

/// `BertForSequenceClassification`: pooler output, dropout, linear classifier. RoBERTa's head
/// (`RobertaClassificationHead`) is the same layers under other names, with dropout before the
/// dense layer as well: `out_proj(dropout(tanh(dense(dropout(first token)))))`.
#[derive(Module, Debug)]
pub struct BertForSequenceClassification {
    /// The encoder, its pooler moved out into `pooler` (the head always needs one).
    pub bert: BertModel,
    /// `bert.pooler.dense` of the checkpoint (RoBERTa: `classifier.dense`).
    pub pooler: Linear,
    /// `classifier` (RoBERTa: `classifier.out_proj`).
    pub classifier: Linear,
    pub dropout: f64,
    #[module(skip)]
    prefix: &'static str,
    #[module(skip)]
    roberta: bool,
}

impl BertForSequenceClassification {
    /// Loads the encoder and, when the checkpoint has one, the classifier; a missing classifier
    /// is initialised as `transformers` does (N(0, initializer_range), zero bias) and its name is
    /// returned in the second value.
    pub fn load(vb: &Weights, c: &BertConfig) -> Result<(Self, Vec<String>)> {
        let prefix = base_prefix(vb);
        let mut bert = BertModel::load(&vb.pp(prefix), c)?;
        let n = c.head.num_labels();
        if c.is_roberta() {
            // RoBERTa's classifier has no pooler (a pretrained one is left unused, as
            // `add_pooling_layer=False` leaves it).
            bert.pooler = None;
            let init = |name: &str, d_out| {
                crate::load_or_init_linear(&vb.pp(name), c.hidden_size, d_out, c.initializer_range)
            };
            let (dense, mut fresh) = init("classifier.dense", c.hidden_size)?;
            let (out_proj, more) = init("classifier.out_proj", n)?;
            fresh.extend(more);
            return Ok((
                Self {
                    bert,
                    pooler: dense,
                    classifier: out_proj,
                    dropout: c.classifier_dropout.unwrap_or(c.hidden_dropout_prob),
                    prefix: task_prefix(prefix, c),
                    roberta: true,
                },
                fresh,
            ));
        }
        let (classifier, mut fresh) = crate::load_or_init_linear(
            &vb.pp("classifier"),
            c.hidden_size,
            n,
            c.initializer_range,
        )?;
        let pooler = match bert.pooler.take() {
            Some(p) => p,
            None => {
                // A sentence-embedding checkpoint without pooler: a new one, trained with the head.
                let name = if prefix.is_empty() { "bert" } else { prefix };
                fresh.extend([
                    format!("{name}.pooler.dense.weight"),
                    format!("{name}.pooler.dense.bias"),
                ]);
                Linear::init(
                    c.hidden_size,
                    c.hidden_size,
                    true,
                    c.initializer_range,
                    TorchLinear::Linear,
                    vb.device(),
                )
            }
        };
        Ok((
            Self {
                bert,
                pooler,
                classifier,
                dropout: c.classifier_dropout.unwrap_or(c.hidden_dropout_prob),
                prefix: task_prefix(prefix, c),
                roberta: false,
            },
            fresh,
        ))
    }

    /// # Shapes
    /// - output logits `[B, num_labels]`
    pub fn forward(&self, input: EncoderInput, mode: Mode) -> Tensor<2> {
        let mut x = self.bert.forward(input, mode).last_hidden_state;
        if self.roberta {
            x = dropout(x, self.dropout, mode);
        }
        let pooled = pool(&self.pooler, x, mode);
        self.classifier
            .forward(dropout(pooled, self.dropout, mode), mode)
    }
}

impl VisitParams for BertForSequenceClassification {
    fn visit_params(&mut self, p: &str, v: &mut dyn Visitor) {
        let base = join(p, self.prefix);
        self.bert.visit_params(&base, v);
        if self.roberta {
            self.pooler.visit_params(&join(p, "classifier.dense"), v);
            self.classifier
                .visit_params(&join(p, "classifier.out_proj"), v);
        } else {
            self.pooler.visit_params(&join(&base, "pooler.dense"), v);
            self.classifier.visit_params(&join(p, "classifier"), v);
        }
    }
}

/// `BertForQuestionAnswering`: a linear layer to start and end logits per token.
#[derive(Module, Debug)]
pub struct BertForQuestionAnswering {
    pub bert: BertModel,
    pub qa_outputs: Linear,
    #[module(skip)]
    prefix: &'static str,
}

/// Start and end logits of extractive question answering.
#[derive(Debug, Clone)]
pub struct SpanLogits {
    /// `[B, T]`
    pub start: Tensor<2>,
    /// `[B, T]`
    pub end: Tensor<2>,
}

impl BertForQuestionAnswering {
    /// Loads the encoder and the span head (initialised when absent, name returned).
    pub fn load(vb: &Weights, c: &BertConfig) -> Result<(Self, Vec<String>)> {
        let prefix = base_prefix(vb);
        let mut bert = BertModel::load(&vb.pp(prefix), c)?;
        // `*ForQuestionAnswering` builds its encoder without the pooler.
        bert.pooler = None;
        let (qa_outputs, fresh) = crate::load_or_init_linear(
            &vb.pp("qa_outputs"),
            c.hidden_size,
            2,
            c.initializer_range,
        )?;
        Ok((
            Self {
                bert,
                qa_outputs,
                prefix: task_prefix(prefix, c),
            },
            fresh,
        ))
    }

    /// A soft prompt's positions are dropped, so the logits index the input tokens (peft
    /// would score the virtual positions as well).
    ///
    /// # Shapes
    /// - start and end logits `[B, T]`
    pub fn forward(&self, input: EncoderInput, mode: Mode) -> SpanLogits {
        let x = self.bert.forward(input, mode).last_hidden_state;
        let p = self.bert.virtual_positions();
        let [b, n, _] = x.dims();
        // (B, P + T, H) -> (B, T, H)
        let x = x.slice([0..b, p..n]);
        let t = n - p;
        // (B, T, H) -> (B, T, 2)
        let logits = self.qa_outputs.forward(x, mode);
        SpanLogits {
            start: logits.clone().slice([0..b, 0..t, 0..1]).reshape([b, t]),
            end: logits.slice([0..b, 0..t, 1..2]).reshape([b, t]),
        }
    }
}

impl VisitParams for BertForQuestionAnswering {
    fn visit_params(&mut self, p: &str, v: &mut dyn Visitor) {
        self.bert.visit_params(&join(p, self.prefix), v);
        self.qa_outputs.visit_params(&join(p, "qa_outputs"), v);
    }
}

/// `BertForTokenClassification`: a label's logits for every token (named entities, parts of
/// speech), from the encoder without its pooler.
#[derive(Module, Debug)]
pub struct BertForTokenClassification {
    pub bert: BertModel,
    pub classifier: Linear,
    pub dropout: f64,
    #[module(skip)]
    prefix: &'static str,
}

impl BertForTokenClassification {
    /// Loads the encoder and the token head (initialised when absent, as `transformers` does:
    /// N(0, initializer_range), zero bias; its names returned).
    pub fn load(vb: &Weights, c: &BertConfig) -> Result<(Self, Vec<String>)> {
        let prefix = base_prefix(vb);
        let mut bert = BertModel::load(&vb.pp(prefix), c)?;
        // `*ForTokenClassification` builds its encoder without the pooler.
        bert.pooler = None;
        let (classifier, fresh) = crate::load_or_init_linear(
            &vb.pp("classifier"),
            c.hidden_size,
            c.head.num_labels(),
            c.initializer_range,
        )?;
        Ok((
            Self {
                bert,
                classifier,
                dropout: c.classifier_dropout.unwrap_or(c.hidden_dropout_prob),
                prefix: task_prefix(prefix, c),
            },
            fresh,
        ))
    }

    /// A soft prompt's positions are dropped, so the logits index the input tokens.
    ///
    /// # Shapes
    /// - logits `[B, T, num_labels]`
    pub fn forward(&self, input: EncoderInput, mode: Mode) -> Tensor<3> {
        let x = self.bert.forward(input, mode).last_hidden_state;
        let p = self.bert.virtual_positions();
        let [b, n, _] = x.dims();
        let x = x.slice([0..b, p..n]);
        self.classifier
            .forward(dropout(x, self.dropout, mode), mode)
    }
}

impl VisitParams for BertForTokenClassification {
    fn visit_params(&mut self, p: &str, v: &mut dyn Visitor) {
        self.bert.visit_params(&join(p, self.prefix), v);
        self.classifier.visit_params(&join(p, "classifier"), v);
    }
}

/// Device-free helper for tests and callers: the ids of `[B, T]` as a tensor.
pub fn ids_tensor(ids: Vec<i64>, b: usize, t: usize, device: &Device) -> Tensor<2, Int> {
    Tensor::from_data(burn::tensor::TensorData::new(ids, [b, t]), device)
}
