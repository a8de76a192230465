//! Prompt learning as `peft` defines it: prefix tuning (`PrefixTuningConfig`, trainable keys and
//! values in front of every attention layer, optionally produced by a two-layer tanh MLP, peft's
//! `prefix_projection`) and prompt tuning (`PromptTuningConfig`, a soft prompt in front of the
//! token embeddings, initialised at random, from a text's token embeddings, or from random
//! vocabulary rows). The models place the virtual tokens (`whet_models::prompt`); this module
//! creates, saves and loads their encoder.
//!
//! Files are `peft`'s: `adapter_config.json` (`peft_type = "PREFIX_TUNING"` or
//! `"PROMPT_TUNING"`, with `num_virtual_tokens`, `token_dim`, `num_layers`,
//! `num_attention_heads`) and `adapter_model.safetensors` holding `prompt_embeddings` (for prefix
//! tuning the projection's output `[P, layers * 2 * token_dim]`, as `get_prompt_embedding_to_save`
//! computes it, so a loaded prefix has no projection, as in peft's inference mode) and
//! `base_model.<param>` for `modules_to_save` (prompt learning has no `model.` level).

use std::path::Path;

use burn::module::Param;
use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use whet_models::layers::{Linear, LinearWeight, TorchLinear};
use whet_models::prompt::{PromptEncoder, PromptKind, PromptShape, PromptSlot};
use whet_models::weights::{SafetensorsSource, TensorSource, tensor_values};
use whet_models::{VisitParams, Visitor};

use crate::AdapterReport;
use crate::{PeftError, Reader, Result, SavedTensor, in_modules, write_adapter};

/// Key prefix of `modules_to_save` tensors in a prompt-learning adapter file.
pub(crate) const PROMPT_PREFIX: &str = "base_model.";

/// The tensor holding the virtual tokens.
const EMBEDDINGS_KEY: &str = "prompt_embeddings";

/// Prefix-tuning hyper-parameters, named and defaulted as `peft.PrefixTuningConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrefixTuningConfig {
    /// `P`, the prefix length.
    pub num_virtual_tokens: usize,
    /// Produce the prefix with peft's MLP (`Linear, tanh, Linear`) from a `[P, token_dim]`
    /// embedding, rather than training it directly.
    #[serde(default)]
    pub prefix_projection: bool,
    /// Hidden width of that MLP (peft's default: `token_dim`).
    #[serde(default)]
    pub encoder_hidden_size: Option<usize>,
    /// Modules trained in full and saved with the adapter (the classification head).
    #[serde(default)]
    pub modules_to_save: Vec<String>,
}

/// How a soft prompt starts (peft's `PromptTuningInit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PromptInit {
    /// N(0, 1), as `nn.Embedding` starts.
    #[default]
    Random,
    /// The token embeddings of `prompt_tuning_init_text`, repeated or cut to `P`.
    Text,
    /// Embeddings of `P` token ids drawn uniformly from the vocabulary.
    SampleVocab,
}

/// Prompt-tuning hyper-parameters, named and defaulted as `peft.PromptTuningConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptTuningConfig {
    /// `P`, the soft prompt's length.
    pub num_virtual_tokens: usize,
    /// How the prompt starts.
    #[serde(default)]
    pub prompt_tuning_init: PromptInit,
    /// The text whose token embeddings start the prompt (with `prompt_tuning_init = "TEXT"`).
    #[serde(default)]
    pub prompt_tuning_init_text: Option<String>,
    /// The text's token ids, set by the caller that holds the tokenizer (as peft tokenizes
    /// with the model's tokenizer, special tokens included).
    #[serde(skip)]
    pub init_token_ids: Vec<u32>,
    /// Modules trained in full and saved with the adapter (the classification head).
    #[serde(default)]
    pub modules_to_save: Vec<String>,
}

/// Either prompt-learning method.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptConfig {
    Prefix(PrefixTuningConfig),
    Prompt(PromptTuningConfig),
}

impl PromptConfig {
    fn num_virtual_tokens(&self) -> usize {
        match self {
            PromptConfig::Prefix(c) => c.num_virtual_tokens,
            PromptConfig::Prompt(c) => c.num_virtual_tokens,
        }
    }

    /// The modules trained in full and saved with the adapter.
    pub fn modules_to_save(&self) -> &[String] {
        match self {
            PromptConfig::Prefix(c) => &c.modules_to_save,
            PromptConfig::Prompt(c) => &c.modules_to_save,
        }
    }

    fn validate(&self) -> Result<()> {
        if self.num_virtual_tokens() == 0 {
            return Err(PeftError::Config(
                "num_virtual_tokens is 0: prompt learning needs at least one virtual token".into(),
            ));
        }
        if let PromptConfig::Prompt(c) = self
            && c.prompt_tuning_init == PromptInit::Text
            && c.prompt_tuning_init_text
                .as_deref()
                .unwrap_or("")
                .is_empty()
        {
            return Err(PeftError::Config(
                "prompt_tuning_init = \"TEXT\" needs prompt_tuning_init_text (the words the soft \
                 prompt starts from)"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// Whether `name` is a prompt encoder's parameter.
fn is_prompt_param(name: &str) -> bool {
    name.starts_with("prompt_encoder.") || name.contains(".prompt_encoder.")
}

/// A linear layer initialised as `nn.Linear` is (weight and bias ~ U(-1/sqrt(in), 1/sqrt(in))).
fn torch_linear(d_in: usize, d_out: usize, device: &Device) -> Linear {
    let bound = 1.0 / (d_in as f64).sqrt();
    let u = Distribution::Uniform(-bound, bound);
    Linear {
        weight: LinearWeight::Dense(Param::from_tensor(whet_models::device::random(
            [d_in, d_out],
            u,
            device,
        ))),
        bias: Some(Param::from_tensor(whet_models::device::random(
            [d_out],
            u,
            device,
        ))),
        stored_as: TorchLinear::Linear,
        adapter: None,
        ia3: None,
        bottleneck: None,
    }
}

/// The encoder `config` asks for, for a model of `shape`.
fn new_encoder(
    config: &PromptConfig,
    shape: PromptShape,
    word_embeddings: &Tensor<2>,
    device: &Device,
) -> Result<PromptEncoder> {
    let p = config.num_virtual_tokens();
    let normal =
        |d: usize| whet_models::device::random([p, d], Distribution::Normal(0.0, 1.0), device);
    let (embedding, transform_in, transform_out, kind) = match config {
        PromptConfig::Prefix(c) => {
            if !shape.takes_prefix {
                return Err(PeftError::Config(
                    "prefix tuning needs a model that takes past keys and values; transformers' \
                     DistilBERT takes none (so peft cannot prefix-tune it either): use prompt \
                     tuning, LoRA or IA3"
                        .into(),
                ));
            }
            let kv = shape.kv_dim();
            let out = shape.layers * 2 * kv;
            if c.prefix_projection {
                let hidden = c.encoder_hidden_size.unwrap_or(kv);
                (
                    normal(kv),
                    Some(torch_linear(kv, hidden, device)),
                    Some(torch_linear(hidden, out, device)),
                    PromptKind::Prefix,
                )
            } else {
                (normal(out), None, None, PromptKind::Prefix)
            }
        }
        PromptConfig::Prompt(c) => {
            let vocab = word_embeddings.dims()[0];
            let rows = |ids: Vec<i64>| {
                let n = ids.len();
                let index = Tensor::<1, Int>::from_data(TensorData::new(ids, [n]), device);
                // A copy on the host, so the prompt does not share the base's autodiff node.
                let t = word_embeddings.clone().select(0, index);
                Tensor::<2>::from_data(t.into_data(), device)
            };
            let e = match c.prompt_tuning_init {
                PromptInit::Random => normal(shape.hidden),
                PromptInit::Text => {
                    let ids = &c.init_token_ids;
                    if ids.is_empty() {
                        return Err(PeftError::Config(
                            "prompt_tuning_init_text tokenized to no tokens".into(),
                        ));
                    }
                    if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
                        return Err(PeftError::Config(format!(
                            "prompt_tuning_init_text has token id {bad}, beyond the model's {vocab} embeddings"
                        )));
                    }
                    // peft: repeat the text's ids until they cover P, then cut to P.
                    rows((0..p).map(|i| ids[i % ids.len()] as i64).collect())
                }
                PromptInit::SampleVocab => {
                    let ids = whet_models::device::random(
                        [p],
                        Distribution::Uniform(0.0, vocab as f64),
                        device,
                    );
                    let ids: Vec<i64> = tensor_values(ids.into_data())
                        .into_iter()
                        .map(|x| (x as i64).min(vocab as i64 - 1))
                        .collect();
                    rows(ids)
                }
            };
            (e, None, None, PromptKind::Prompt)
        }
    };
    Ok(PromptEncoder {
        embedding: Param::from_tensor(embedding),
        transform_in,
        transform_out,
        kind,
        shape,
        enabled: true,
    })
}

/// Calls `f` on the model's prompt slot; an error if the model has none.
fn with_slot<M: VisitParams>(
    model: &mut M,
    f: &mut dyn FnMut(&mut PromptSlot<'_>) -> Result<()>,
) -> Result<()> {
    struct Find<'a> {
        f: &'a mut dyn FnMut(&mut PromptSlot<'_>) -> Result<()>,
        result: Option<Result<()>>,
    }
    impl Visitor for Find<'_> {
        fn prompt(&mut self, _: &str, slot: &mut PromptSlot<'_>) -> bool {
            if self.result.is_none() {
                self.result = Some((self.f)(slot));
            }
            true
        }
    }
    let mut find = Find { f, result: None };
    model.visit_params("", &mut find);
    find.result.unwrap_or_else(|| {
        Err(PeftError::Config(
            "this model offers no slot for virtual tokens".into(),
        ))
    })
}

/// Attaches a fresh prompt encoder, freezes every other parameter except `modules_to_save`, and
/// returns the parameter counts (as peft counts them).
pub fn apply_prompt<M: VisitParams>(
    model: &mut M,
    config: &PromptConfig,
    device: &Device,
) -> Result<AdapterReport> {
    config.validate()?;
    with_slot(model, &mut |slot| {
        let encoder = new_encoder(
            config,
            slot.shape,
            &slot.word_embeddings.weight.val(),
            device,
        )?;
        *slot.encoder = Some(encoder);
        Ok(())
    })?;
    let modules = config.modules_to_save().to_vec();
    let trainable = |name: &str| is_prompt_param(name) || in_modules(name, &modules);
    crate::set_trainable(model, &trainable);
    let counts = crate::count(model, &modules, &trainable);
    Ok(AdapterReport {
        targeted: vec!["prompt_encoder".into()],
        counts,
    })
}

/// Switches the virtual tokens on or off.
pub(crate) fn set_enabled<M: VisitParams>(model: &mut M, enabled: bool) {
    let _ = with_slot(model, &mut |slot| {
        if let Some(e) = slot.encoder.as_mut() {
            e.enabled = enabled;
        }
        Ok(())
    });
}

/// The attached encoder's saved form, `prompt_embeddings`, and the model's shape.
fn saved_embeddings<M: VisitParams + Clone>(model: &M) -> Result<(Tensor<2>, PromptShape)> {
    let mut out = None;
    with_slot(&mut model.clone(), &mut |slot| {
        let e = slot
            .encoder
            .as_ref()
            .ok_or_else(|| PeftError::Config("no prompt encoder is attached to save".into()))?;
        let t = match e.kind {
            PromptKind::Prefix => e.prefix_values(),
            PromptKind::Prompt => e.embedding.val(),
        };
        out = Some((t, slot.shape));
        Ok(())
    })?;
    out.ok_or_else(|| PeftError::Config("no prompt encoder is attached to save".into()))
}

/// The `modules_to_save` tensors in checkpoint layout, under prompt learning's key prefix.
fn head_tensors<M: VisitParams + Clone>(model: &M, modules: &[String]) -> Vec<SavedTensor> {
    crate::collect_tensors(model, modules)
        .into_iter()
        .map(|(k, dims, v)| {
            let name = k.strip_prefix(crate::PREFIX).unwrap_or(&k);
            (format!("{PROMPT_PREFIX}{name}"), dims, v)
        })
        .collect()
}

/// The `adapter_config.json` peft writes for these methods.
fn adapter_config_json(
    config: &PromptConfig,
    shape: PromptShape,
    base_model: &str,
    task_type: &str,
) -> serde_json::Value {
    // peft sizes a prefix by the key/value heads (grouped-query attention) and a soft prompt
    // by the embedding width.
    let (token_dim, heads) = match config {
        PromptConfig::Prefix(_) => (shape.kv_dim(), shape.kv_heads),
        PromptConfig::Prompt(_) => (shape.hidden, shape.hidden / shape.head_dim.max(1)),
    };
    let mut json = serde_json::json!({
        "auto_mapping": null,
        "base_model_name_or_path": base_model,
        "inference_mode": true,
        "modules_to_save": config.modules_to_save(),
        "num_attention_heads": heads,
        "num_layers": shape.layers,
        "num_transformer_submodules": 1,
        "num_virtual_tokens": config.num_virtual_tokens(),
        "revision": null,
        "task_type": task_type,
        "token_dim": token_dim,
    });
    let extra = match config {
        PromptConfig::Prefix(c) => serde_json::json!({
            "peft_type": "PREFIX_TUNING",
            "prefix_projection": c.prefix_projection,
            "encoder_hidden_size": c.encoder_hidden_size.unwrap_or(token_dim),
        }),
        PromptConfig::Prompt(c) => serde_json::json!({
            "peft_type": "PROMPT_TUNING",
            "prompt_tuning_init": c.prompt_tuning_init,
            "prompt_tuning_init_text": c.prompt_tuning_init_text,
            "tokenizer_name_or_path": c.prompt_tuning_init_text.as_ref().map(|_| base_model),
        }),
    };
    if let (Some(map), serde_json::Value::Object(more)) = (json.as_object_mut(), extra) {
        map.extend(more);
    }
    json
}

/// Saves the virtual tokens and the `modules_to_save` tensors in peft's format into `dir`.
pub fn save_adapter<M: VisitParams + Clone>(
    model: &M,
    config: &PromptConfig,
    base_model: &str,
    task_type: &str,
    dir: &Path,
) -> Result<()> {
    let (embeddings, shape) = saved_embeddings(model)?;
    let dims = embeddings.dims().to_vec();
    let mut tensors = vec![(
        EMBEDDINGS_KEY.to_string(),
        dims,
        tensor_values(embeddings.into_data()),
    )];
    tensors.extend(head_tensors(model, config.modules_to_save()));
    write_adapter(
        dir,
        &tensors,
        &adapter_config_json(config, shape, base_model, task_type),
    )
}

/// Fills the attached encoder from the file's `prompt_embeddings`, without a projection: a
/// loaded prefix is the saved one, as in peft's inference mode.
pub(crate) fn fill_embeddings<M: VisitParams>(
    model: &mut M,
    config: &PromptConfig,
    reader: &mut Reader,
) -> Result<()> {
    let mut read = None;
    with_slot(model, &mut |slot| {
        let p = config.num_virtual_tokens();
        let s = slot.shape;
        let want = match config {
            PromptConfig::Prefix(_) => [p, s.layers * 2 * s.kv_dim()],
            PromptConfig::Prompt(_) => [p, s.hidden],
        };
        read = Some(reader.read(EMBEDDINGS_KEY, want));
        if let (Some(Some(t)), Some(e)) = (&read, slot.encoder.as_mut()) {
            let trains = e.embedding.val().is_require_grad();
            e.embedding = Param::from_tensor(t.clone()).set_require_grad(trains);
            e.transform_in = None;
            e.transform_out = None;
        }
        Ok(())
    })?;
    if let Some(None) = read
        && reader.error.is_none()
    {
        reader.fail(format!("no {EMBEDDINGS_KEY} tensor"));
    }
    Ok(())
}

/// Reads the method out of a prompt-learning `adapter_config.json`.
pub(crate) fn from_json(
    peft_type: &str,
    json: serde_json::Value,
) -> serde_json::Result<PromptConfig> {
    Ok(match peft_type {
        "PREFIX_TUNING" => PromptConfig::Prefix(serde_json::from_value(json)?),
        _ => PromptConfig::Prompt(serde_json::from_value(json)?),
    })
}

/// The `modules_to_save` a prompt-learning file carries (`base_model.<module>.<param>` keys).
pub(crate) fn saved_modules(source: &SafetensorsSource) -> Vec<String> {
    source
        .names()
        .iter()
        .filter_map(|n| n.strip_prefix(PROMPT_PREFIX))
        .filter_map(|rest| rest.rsplit_once('.').map(|(m, _)| m.to_string()))
        .collect()
}
