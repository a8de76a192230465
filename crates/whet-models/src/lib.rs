//! Pretrained transformer families for whet, on burn.
//!
//! One family per file, each readable top to bottom (config, layers in data order, model,
//! loader): [`bert`] (BERT, MiniLM, RoBERTa, XLM-RoBERTa), [`deberta`] (DeBERTa-v2/v3),
//! [`distilbert`], [`modernbert`],
//! [`gpt2`], [`llama`] (the rotary decoders: LLaMA, Mistral, Qwen2/3, SmolLM2, Phi-3, Gemma 1-3). [`Checkpoint`] opens a Hugging Face folder or a GGUF file, tells which
//! family it holds and loads it with its tokenizer. Models know nothing of training: forward
//! passes take an explicit [`Mode`], and the training crates compute losses.

pub mod bert;
pub mod config;
pub mod deberta;
pub mod decoder;
pub mod device;
pub mod distilbert;
pub mod error;
pub mod gguf;
pub mod gpt2;
pub mod kernels;
pub mod layers;
pub mod llama;
pub mod modernbert;
pub mod precision;
pub mod prompt;
pub mod quant;
pub mod unpad;
pub mod weights;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::tensor::{Device, Tensor};

pub use decoder::{CausalLm, DecoderInput, KvCache};
pub use error::{ModelError, Result};
pub use layers::Mode;
pub use prompt::{PromptEncoder, PromptKind, PromptShape, VirtualTokens};
pub use weights::{
    ExportParams, NamedParam, QuantPolicy, TensorSource, VisitParams, Visitor, Weights,
};
// The tokenizer moved to whet-text; re-exported so `whet_models::TextTokenizer` and
// `whet_models::tokenizer::*` still resolve. `fsutil` below wraps whet-text's.
pub use whet_text::tokenizer;
pub use whet_text::{ChatMessage, TextTokenizer};

use crate::bert::BertConfig;
use crate::deberta::DebertaConfig;
use crate::distilbert::DistilBertConfig;
use crate::gpt2::Gpt2Config;
use crate::layers::{Linear, TorchLinear};
use crate::llama::LlamaConfig;
use crate::modernbert::ModernBertConfig;
use crate::weights::SafetensorsSource;

/// Crash-safe file writing: [`whet_text::fsutil`], with this crate's error type.
pub mod fsutil {
    use std::path::Path;

    /// Writes `bytes` to `path` atomically: see [`whet_text::fsutil::write_atomic`].
    pub fn write_atomic(path: &Path, bytes: &[u8]) -> crate::Result<()> {
        Ok(whet_text::fsutil::write_atomic(path, bytes)?)
    }

    /// [`whet_text::fsutil::replace_atomic`].
    pub fn replace_atomic(
        path: &Path,
        write: impl FnOnce(&Path) -> std::io::Result<()>,
    ) -> crate::Result<()> {
        Ok(whet_text::fsutil::replace_atomic(path, write)?)
    }
}

/// Loads a linear head from the checkpoint, or initialises it as `transformers` does for a new
/// head (weight ~ N(0, std), bias 0). Returns the names it had to initialise.
pub(crate) fn load_or_init_linear(
    vb: &Weights,
    d_in: usize,
    d_out: usize,
    std: f64,
) -> Result<(Linear, Vec<String>)> {
    load_or_init(vb, d_in, d_out, true, std)
}

/// As [`load_or_init_linear`], for bias-free heads (`score` of the decoders).
pub(crate) fn load_or_init_linear_nobias(
    vb: &Weights,
    d_in: usize,
    d_out: usize,
    std: f64,
) -> Result<(Linear, Vec<String>)> {
    load_or_init(vb, d_in, d_out, false, std)
}

fn load_or_init(
    vb: &Weights,
    d_in: usize,
    d_out: usize,
    bias: bool,
    std: f64,
) -> Result<(Linear, Vec<String>)> {
    if vb.contains("weight") {
        return Ok((
            Linear::load(vb, d_in, d_out, bias, TorchLinear::Linear)?,
            vec![],
        ));
    }
    let mut fresh = vec![vb.path("weight")];
    if bias {
        fresh.push(vb.path("bias"));
    }
    let layer = Linear::init(d_in, d_out, bias, std, TorchLinear::Linear, vb.device());
    Ok((layer, fresh))
}

/// The model families whet implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// BERT, MiniLM, RoBERTa, XLM-RoBERTa.
    Bert,
    /// DistilBERT.
    DistilBert,
    /// DeBERTa-v2 and DeBERTa-v3.
    Deberta,
    /// ModernBERT.
    ModernBert,
    /// GPT-2.
    Gpt2,
    /// The rotary decoders: LLaMA, Mistral, Qwen2/3, SmolLM2, Phi-3, Gemma 1/2/3.
    Llama,
}

impl Family {
    /// Whether the family is a causal decoder.
    pub fn is_decoder(self) -> bool {
        matches!(self, Family::Gpt2 | Family::Llama)
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Family::Bert => "bert",
            Family::DistilBert => "distilbert",
            Family::Deberta => "deberta-v2",
            Family::ModernBert => "modernbert",
            Family::Gpt2 => "gpt2",
            Family::Llama => "llama",
        })
    }
}

const SUPPORTED: &str = "model_type bert, roberta, xlm-roberta, deberta-v2, distilbert, modernbert, gpt2, llama, mistral, \
                         qwen2, qwen3, phi3, gemma, gemma2, gemma3_text (and .gguf files of the \
                         llama family)";

/// A family's parsed config.
// One per checkpoint: the size difference of the variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum FamilyConfig {
    Bert(BertConfig),
    DistilBert(DistilBertConfig),
    Deberta(DebertaConfig),
    ModernBert(ModernBertConfig),
    Gpt2(Gpt2Config),
    Llama(LlamaConfig),
}

impl FamilyConfig {
    /// Checks what loading would divide by, or size a new table from, before a checkpoint
    /// tensor can confirm it: every family's label count, LLaMA's heads and head size.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let head = match self {
            FamilyConfig::Bert(c) => &c.head,
            FamilyConfig::DistilBert(c) => &c.head,
            FamilyConfig::Deberta(c) => &c.head,
            FamilyConfig::ModernBert(c) => &c.head,
            FamilyConfig::Gpt2(c) => &c.head,
            FamilyConfig::Llama(c) => &c.head,
        };
        head.validate()?;
        match self {
            FamilyConfig::Llama(c) => c.validate(),
            FamilyConfig::Bert(c) => c.validate(),
            FamilyConfig::ModernBert(c) => c.validate(),
            FamilyConfig::Deberta(c) => c.validate(),
            _ => Ok(()),
        }
    }
}

/// The base model an adapter folder names (`base_model_name_or_path` of its
/// `adapter_config.json`) as a local path: a Hub repo id is fetched into the Hugging Face
/// cache at the config's `revision`, as peft's `AutoPeftModel` loads its base. `None` when the
/// config names no base.
pub fn adapter_base(dir: &Path) -> Result<Option<PathBuf>> {
    let path = dir.join("adapter_config.json");
    let cfg: serde_json::Value = config::read_json(&path)?;
    let Some(base) = cfg["base_model_name_or_path"].as_str() else {
        return Ok(None);
    };
    let base = PathBuf::from(base);
    if base.exists() || whet_hub::check_id(&base.to_string_lossy()).is_err() {
        return Ok(Some(base));
    }
    Ok(Some(whet_hub::model_path(
        &base,
        cfg["revision"].as_str(),
        None,
    )?))
}

/// The task heads a saved folder's `architectures` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    /// `*ForCausalLM` (`GPT2LMHeadModel`).
    CausalLm,
    /// `*ForSequenceClassification`.
    SequenceClassification,
    /// `*ForQuestionAnswering`.
    QuestionAnswering,
    /// `*ForTokenClassification`.
    TokenClassification,
}

/// The transformers class of `model_type` with `head`, as `architectures` names it.
pub fn architecture(model_type: &str, head: Head) -> String {
    let base = match model_type {
        "bert" => "Bert",
        "roberta" => "Roberta",
        "xlm-roberta" => "XLMRoberta",
        "distilbert" => "DistilBert",
        "modernbert" => "ModernBert",
        "deberta-v2" => "DebertaV2",
        "gpt2" => "GPT2",
        "mistral" => "Mistral",
        "qwen2" => "Qwen2",
        "qwen3" => "Qwen3",
        "phi3" => "Phi3",
        "gemma" => "Gemma",
        "gemma2" => "Gemma2",
        "gemma3_text" if head == Head::SequenceClassification => "Gemma3Text",
        "gemma3_text" => "Gemma3",
        _ => "Llama",
    };
    match (base, head) {
        ("GPT2", Head::CausalLm) => "GPT2LMHeadModel".into(),
        (_, Head::CausalLm) => format!("{base}ForCausalLM"),
        (_, Head::SequenceClassification) => format!("{base}ForSequenceClassification"),
        (_, Head::QuestionAnswering) => format!("{base}ForQuestionAnswering"),
        (_, Head::TokenClassification) => format!("{base}ForTokenClassification"),
    }
}

/// Where the weights are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A Hugging Face folder (config.json + safetensors).
    Folder,
    /// A GGUF file.
    Gguf,
}

/// An opened checkpoint: family, config, tensors; nothing loaded onto a device yet.
pub struct Checkpoint {
    /// The folder or file.
    pub path: PathBuf,
    /// Folder or GGUF.
    pub format: Format,
    /// Parsed config.
    pub config: FamilyConfig,
    /// Tensors under Hugging Face names.
    pub source: Arc<dyn TensorSource>,
    /// Which linear layers the loaders keep quantised (QLoRA); None loads everything in f32.
    pub quantization: Option<weights::QuantPolicy>,
    gguf: Option<Arc<whet_gguf::GgufFile>>,
}

impl Checkpoint {
    /// Opens a Hugging Face model folder or a `.gguf` file; a path that does not exist and is
    /// a repo id (`ORG/NAME`) is the Hub's model at its main revision, downloaded into the
    /// Hugging Face cache (see [`Checkpoint::from_pretrained`]).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::from_pretrained(path, None, None)
    }

    /// Opens a model as transformers' `from_pretrained(spec, revision=, gguf_file=)` finds it:
    /// a local folder or file always wins (`gguf_file` names a file inside the folder);
    /// otherwise `spec` is a Hub repo id, whose files whet reads (config, tokenizer, chat
    /// template, safetensors; or the one GGUF file) are downloaded into the cache
    /// huggingface_hub shares, or found there (`HF_HUB_OFFLINE=1`).
    pub fn from_pretrained(
        spec: impl AsRef<Path>,
        revision: Option<&str>,
        gguf_file: Option<&str>,
    ) -> Result<Self> {
        let spec = spec.as_ref();
        if !spec.exists() && whet_hub::check_id(&spec.to_string_lossy()).is_err() {
            return Err(ModelError::MissingFile {
                path: spec.to_path_buf(),
                hint: "expected a Hugging Face model folder, a .gguf file, or a Hub repo id \
                       (ORG/NAME)"
                    .into(),
            });
        }
        let path = whet_hub::model_path(spec, revision, gguf_file).map_err(|e| {
            if spec.exists() {
                ModelError::from(e)
            } else {
                ModelError::NotLocal {
                    spec: spec.display().to_string(),
                    source: Box::new(e),
                }
            }
        })?;
        Self::open_local(path)
    }

    fn open_local(path: PathBuf) -> Result<Self> {
        if path.is_file() {
            let (file, config) = gguf::open(&path)?;
            let source = Arc::new(gguf::GgufSource::new(file.clone(), &config));
            return Ok(Self {
                path,
                format: Format::Gguf,
                config: FamilyConfig::Llama(config),
                source,
                quantization: None,
                gguf: Some(file),
            });
        }
        if !path.is_dir() {
            return Err(ModelError::MissingFile {
                path,
                hint: "expected a Hugging Face model folder or a .gguf file".into(),
            });
        }
        let config_path = path.join("config.json");
        let raw: serde_json::Value = config::read_json(&config_path)?;
        let model_type = raw
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string();
        let parse = |v: serde_json::Value| -> Result<FamilyConfig> {
            let bad = |e: serde_json::Error| ModelError::Config {
                path: config_path.clone(),
                message: e.to_string(),
            };
            Ok(match model_type.as_str() {
                "bert" | "roberta" | "xlm-roberta" => {
                    FamilyConfig::Bert(serde_json::from_value(v).map_err(bad)?)
                }
                "distilbert" => FamilyConfig::DistilBert(serde_json::from_value(v).map_err(bad)?),
                "modernbert" => FamilyConfig::ModernBert(serde_json::from_value(v).map_err(bad)?),
                "deberta-v2" => FamilyConfig::Deberta(serde_json::from_value(v).map_err(bad)?),
                "gpt2" => FamilyConfig::Gpt2(serde_json::from_value(v).map_err(bad)?),
                t if llama::MODEL_TYPES.contains(&t) => {
                    FamilyConfig::Llama(serde_json::from_value(v).map_err(bad)?)
                }
                "gemma3" => {
                    return Err(ModelError::Config {
                        path: config_path.clone(),
                        message: "model_type gemma3 is Gemma 3 with its vision tower; whet \
                                  reads the text-only checkpoints (model_type gemma3_text: \
                                  Gemma 3 270M and 1B)"
                            .into(),
                    });
                }
                _ => {
                    return Err(ModelError::UnknownArchitecture {
                        name: model_type.clone(),
                        path: config_path.clone(),
                        supported: SUPPORTED,
                    });
                }
            })
        };
        let config = parse(raw.clone())?;
        config.validate().map_err(|message| ModelError::Config {
            path: config_path.clone(),
            message,
        })?;
        let source = Arc::new(SafetensorsSource::open_folder(&path)?);
        Ok(Self {
            path,
            format: Format::Folder,
            config,
            source,
            quantization: None,
            gguf: None,
        })
    }

    /// The family.
    pub fn family(&self) -> Family {
        match self.config {
            FamilyConfig::Bert(_) => Family::Bert,
            FamilyConfig::DistilBert(_) => Family::DistilBert,
            FamilyConfig::ModernBert(_) => Family::ModernBert,
            FamilyConfig::Deberta(_) => Family::Deberta,
            FamilyConfig::Gpt2(_) => Family::Gpt2,
            FamilyConfig::Llama(_) => Family::Llama,
        }
    }

    /// `config.json`'s `model_type` (a GGUF file's `general.architecture`): the key peft's
    /// per-architecture defaults are looked up by.
    pub fn model_type(&self) -> &str {
        match &self.config {
            FamilyConfig::Bert(c) => &c.model_type,
            FamilyConfig::DistilBert(_) => "distilbert",
            FamilyConfig::ModernBert(_) => "modernbert",
            FamilyConfig::Deberta(_) => "deberta-v2",
            FamilyConfig::Gpt2(_) => "gpt2",
            FamilyConfig::Llama(c) => &c.model_type,
        }
    }

    /// The GGUF file, when the checkpoint is one.
    pub fn gguf(&self) -> Option<&whet_gguf::GgufFile> {
        self.gguf.as_deref()
    }

    /// A weight reader creating tensors on `device`.
    pub fn weights(&self, device: &Device) -> Weights {
        Weights::new(self.source.clone(), device).with_quantization(self.quantization.clone())
    }

    /// The tokenizer stored with the model.
    pub fn tokenizer(&self) -> Result<TextTokenizer> {
        Ok(match &self.gguf {
            Some(file) => gguf::tokenizer(file)?,
            None => TextTokenizer::from_folder(&self.path)?,
        })
    }

    /// Token ids that end generation: the config's `eos_token_id` (one or a list).
    pub fn eos_token_ids(&self) -> Vec<u32> {
        let v = match &self.config {
            FamilyConfig::Gpt2(c) => return c.eos_token_id.into_iter().collect(),
            FamilyConfig::Llama(c) => c.eos_token_id.clone(),
            _ => None,
        };
        match v {
            Some(serde_json::Value::Number(n)) => {
                n.as_u64().map(|n| vec![n as u32]).unwrap_or_default()
            }
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|n| n.as_u64())
                .map(|n| n as u32)
                .collect(),
            _ => vec![],
        }
    }

    /// Loads the model with its language-modelling head (decoders only).
    pub fn load_causal_lm(&self, device: &Device) -> Result<CausalModel> {
        self.causal_lm_from(self.weights(device))
    }

    /// [`Self::load_causal_lm`] for generation only: a GGUF file on the CPU keeps its Q4_0,
    /// Q4_1 and Q8_0 linear layers in their blocks, which a generation step reads in place
    /// (`kernels/flex.rs`, `quant_skinny`) with the weights transformers dequantises the file
    /// to, so a step reads 4.5 to 8.5 bits a weight instead of 32. Other files and devices load
    /// as [`Self::load_causal_lm`] does, and so does a CPU without AVX-512 (whose scalar
    /// decoding was slower than reading f32). The layers are frozen: not for training.
    pub fn load_causal_lm_for_generation(&self, device: &Device) -> Result<CausalModel> {
        if self.gguf.is_none()
            || self.quantization.is_some()
            || !crate::device::is_flex(device)
            || !crate::kernels::quant_steps_in_place()
        {
            return self.load_causal_lm(device);
        }
        let policy = weights::QuantPolicy {
            spec: quant::QuantSpec::Gguf,
            skip: vec![],
        };
        let vb = self.weights(device).with_quantization(Some(policy));
        let mut model = self.causal_lm_from(vb.clone())?;
        // A head tied to a quantised embedding (SmolLM2's Q8_0 `token_embd`) reads its blocks
        // too: the embedding stays f32 for the lookups, the head is the same values in 8.5 bits.
        if let CausalModel::Llama(m) = &mut model
            && m.lm_head.is_none()
        {
            let [vocab, hidden] = m.model.embed_tokens.weight.dims();
            let embed = vb.pp("model").pp("embed_tokens");
            if let Some(q) =
                embed.quantized_linear("weight", hidden, vocab, layers::TorchLinear::Linear)?
            {
                m.lm_head = Some(layers::Linear::frozen(q));
            }
        }
        Ok(model)
    }

    fn causal_lm_from(&self, vb: Weights) -> Result<CausalModel> {
        match &self.config {
            FamilyConfig::Gpt2(c) => Ok(CausalModel::Gpt2(gpt2::Gpt2LmHeadModel::load(&vb, c)?)),
            FamilyConfig::Llama(c) => {
                Ok(CausalModel::Llama(llama::LlamaForCausalLm::load(&vb, c)?))
            }
            _ => Err(ModelError::Input(format!(
                "{} is a {} encoder; text generation needs a decoder (gpt2 or llama family)",
                self.path.display(),
                self.family()
            ))),
        }
    }

    /// Loads the model with a sequence-classification head; head tensors missing from the
    /// checkpoint are initialised and named in the second value.
    pub fn load_classifier(&self, device: &Device) -> Result<(Classifier, Vec<String>)> {
        let vb = self.weights(device);
        Ok(match &self.config {
            FamilyConfig::Bert(c) => {
                let (m, f) = bert::BertForSequenceClassification::load(&vb, c)?;
                (Classifier::Bert(m), f)
            }
            FamilyConfig::DistilBert(c) => {
                let (m, f) = distilbert::DistilBertForSequenceClassification::load(&vb, c)?;
                (Classifier::DistilBert(m), f)
            }
            FamilyConfig::ModernBert(c) => {
                let (m, f) = modernbert::ModernBertForSequenceClassification::load(&vb, c)?;
                (Classifier::ModernBert(m), f)
            }
            FamilyConfig::Deberta(c) => {
                let (m, f) = deberta::DebertaForSequenceClassification::load(&vb, c)?;
                (Classifier::Deberta(m), f)
            }
            FamilyConfig::Gpt2(c) => {
                let (m, f) = gpt2::Gpt2ForSequenceClassification::load(&vb, c)?;
                (Classifier::Gpt2(m), f)
            }
            FamilyConfig::Llama(c) => {
                let (m, f) = llama::LlamaForSequenceClassification::load(&vb, c)?;
                (Classifier::Llama(m), f)
            }
        })
    }

    /// Loads an encoder with the extractive question-answering head (BERT's `qa_outputs`,
    /// ModernBERT's `head` and `classifier`; initialised when absent and then named in the
    /// second value).
    pub fn load_question_answering(
        &self,
        device: &Device,
    ) -> Result<(QuestionAnswerer, Vec<String>)> {
        let vb = self.weights(device);
        match &self.config {
            FamilyConfig::Bert(c) => {
                let (m, f) = bert::BertForQuestionAnswering::load(&vb, c)?;
                Ok((QuestionAnswerer::Bert(m), f))
            }
            FamilyConfig::ModernBert(c) => {
                let (m, f) = modernbert::ModernBertForQuestionAnswering::load(&vb, c)?;
                Ok((QuestionAnswerer::ModernBert(m), f))
            }
            FamilyConfig::Deberta(c) => {
                let (m, f) = deberta::DebertaForQuestionAnswering::load(&vb, c)?;
                Ok((QuestionAnswerer::Deberta(m), f))
            }
            _ => Err(ModelError::Input(format!(
                "question answering is implemented for bert, roberta, xlm-roberta, deberta-v2 \
                 and modernbert; {} is {}",
                self.path.display(),
                self.family()
            ))),
        }
    }

    /// Loads the encoder with a token-classification head sized to the labels
    /// ([`Checkpoint::set_labels`]); a head the checkpoint lacks is initialised and named in the
    /// second value. BERT (WordPiece) only: other families are refused by name.
    pub fn load_token_classifier(&self, device: &Device) -> Result<(TokenClassifier, Vec<String>)> {
        let vb = self.weights(device);
        match &self.config {
            FamilyConfig::Bert(c) if self.model_type() == "bert" => {
                let (m, f) = bert::BertForTokenClassification::load(&vb, c)?;
                Ok((TokenClassifier::Bert(m), f))
            }
            _ => Err(ModelError::Input(format!(
                "token classification is implemented for bert (WordPiece words split as \
                 datasets gives them); {} is {}",
                self.path.display(),
                self.model_type()
            ))),
        }
    }

    /// Writes the checkpoint's `config.json` with `BertForQuestionAnswering` as architecture.
    pub fn write_question_answering_config(&self, out: &Path) -> Result<()> {
        let mut json: serde_json::Value = config::read_json(&self.path.join("config.json"))?;
        if let serde_json::Value::Object(map) = &mut json {
            map.retain(|_, v| !v.is_null());
            map.insert(
                "architectures".into(),
                serde_json::json!([architecture(self.model_type(), Head::QuestionAnswering)]),
            );
        }
        let text =
            serde_json::to_string_pretty(&json).map_err(|e| ModelError::Input(e.to_string()))?;
        std::fs::create_dir_all(out).map_err(|e| ModelError::io(out, e))?;
        fsutil::write_atomic(&out.join("config.json"), text.as_bytes())
    }

    /// Sets the classification labels (id order); the head is sized to them when it is new.
    pub fn set_labels(&mut self, labels: &[String]) {
        let head = self.head_mut();
        head.id2label = Some(
            labels
                .iter()
                .enumerate()
                .map(|(i, l)| (i.to_string(), l.clone()))
                .collect(),
        );
        head.num_labels = Some(labels.len());
    }

    /// The classification-head fields of the config (labels, problem type).
    pub fn head(&self) -> &config::HeadFields {
        match &self.config {
            FamilyConfig::Bert(c) => &c.head,
            FamilyConfig::DistilBert(c) => &c.head,
            FamilyConfig::ModernBert(c) => &c.head,
            FamilyConfig::Deberta(c) => &c.head,
            FamilyConfig::Gpt2(c) => &c.head,
            FamilyConfig::Llama(c) => &c.head,
        }
    }

    fn head_mut(&mut self) -> &mut config::HeadFields {
        match &mut self.config {
            FamilyConfig::Bert(c) => &mut c.head,
            FamilyConfig::DistilBert(c) => &mut c.head,
            FamilyConfig::ModernBert(c) => &mut c.head,
            FamilyConfig::Deberta(c) => &mut c.head,
            FamilyConfig::Gpt2(c) => &mut c.head,
            FamilyConfig::Llama(c) => &mut c.head,
        }
    }

    /// Sets the head's problem type (written into `config.json` by
    /// [`Checkpoint::write_classifier_config`], so `transformers` picks the same loss).
    pub fn set_problem_type(&mut self, problem_type: config::ProblemType) {
        self.head_mut().problem_type = Some(problem_type);
    }

    /// Uses EOS as the padding token when the config has none, as the GPT-2 classification
    /// tutorial does (`model.config.pad_token_id = tokenizer.eos_token_id`).
    pub fn set_pad_token_id(&mut self, pad: u32) {
        match &mut self.config {
            FamilyConfig::Gpt2(c) if c.pad_token_id.is_none() => c.pad_token_id = Some(pad),
            FamilyConfig::Llama(c) if c.pad_token_id.is_none() => c.pad_token_id = Some(pad),
            _ => {}
        }
    }

    /// The padding token id the config declares.
    pub fn pad_token_id(&self) -> Option<u32> {
        match &self.config {
            FamilyConfig::Bert(c) => c.pad_token_id,
            FamilyConfig::DistilBert(c) => c.pad_token_id,
            FamilyConfig::ModernBert(c) => c.pad_token_id,
            FamilyConfig::Deberta(c) => c.pad_token_id,
            FamilyConfig::Gpt2(c) => c.pad_token_id,
            FamilyConfig::Llama(c) => c.pad_token_id,
        }
    }

    /// The longest input the position embeddings allow.
    pub fn max_positions(&self) -> usize {
        match &self.config {
            FamilyConfig::Bert(c) => c.positions(),
            FamilyConfig::DistilBert(c) => c.max_position_embeddings,
            FamilyConfig::ModernBert(c) => c.max_position_embeddings,
            FamilyConfig::Deberta(c) => c.max_position_embeddings,
            FamilyConfig::Gpt2(c) => c.n_positions,
            FamilyConfig::Llama(c) => c.positions(),
        }
    }

    /// Writes the checkpoint's `config.json` with `id2label` / `label2id` for `labels` and the
    /// architecture set to the family's sequence-classification class, to `out`.
    pub fn write_classifier_config(&self, labels: &[String], out: &Path) -> Result<()> {
        self.write_labelled_config(labels, Head::SequenceClassification, out)
    }

    /// As [`Checkpoint::write_classifier_config`], for a labelled `head` (sequence or token
    /// classification).
    pub fn write_labelled_config(&self, labels: &[String], head: Head, out: &Path) -> Result<()> {
        let mut json: serde_json::Value = match self.format {
            Format::Folder => config::read_json(&self.path.join("config.json"))?,
            Format::Gguf => match &self.config {
                FamilyConfig::Llama(c) => {
                    serde_json::to_value(c).map_err(|e| ModelError::Input(e.to_string()))?
                }
                _ => serde_json::json!({}),
            },
        };
        let class = architecture(self.model_type(), head);
        if let serde_json::Value::Object(map) = &mut json {
            map.retain(|_, v| !v.is_null());
            map.insert("architectures".into(), serde_json::json!([class]));
            let id2label: serde_json::Map<String, serde_json::Value> = labels
                .iter()
                .enumerate()
                .map(|(i, l)| (i.to_string(), l.clone().into()))
                .collect();
            let label2id: serde_json::Map<String, serde_json::Value> = labels
                .iter()
                .enumerate()
                .map(|(i, l)| (l.clone(), i.into()))
                .collect();
            map.insert("id2label".into(), id2label.into());
            map.insert("label2id".into(), label2id.into());
            map.remove("num_labels");
            if let Some(p) = self.head().problem_type {
                map.insert("problem_type".into(), serde_json::json!(p));
            }
            if let Some(pad) = self.pad_token_id() {
                map.insert("pad_token_id".into(), pad.into());
            }
        }
        let text =
            serde_json::to_string_pretty(&json).map_err(|e| ModelError::Input(e.to_string()))?;
        std::fs::create_dir_all(out).map_err(|e| ModelError::io(out, e))?;
        fsutil::write_atomic(&out.join("config.json"), text.as_bytes())
    }

    /// Writes the checkpoint's `config.json` with the architecture set to the family's
    /// causal-LM class (`GPT2LMHeadModel`, `LlamaForCausalLM`, ...), to `out`.
    pub fn write_causal_lm_config(&self, out: &Path) -> Result<()> {
        let mut json: serde_json::Value = match self.format {
            Format::Folder => config::read_json(&self.path.join("config.json"))?,
            Format::Gguf => match &self.config {
                FamilyConfig::Llama(c) => {
                    serde_json::to_value(c).map_err(|e| ModelError::Input(e.to_string()))?
                }
                _ => serde_json::json!({}),
            },
        };
        if !self.family().is_decoder() {
            return Err(ModelError::Input(format!(
                "{} has no causal-LM head ({})",
                self.model_type(),
                self.path.display()
            )));
        }
        let class = architecture(self.model_type(), Head::CausalLm);
        if let serde_json::Value::Object(map) = &mut json {
            map.retain(|_, v| !v.is_null());
            map.insert("architectures".into(), serde_json::json!([class]));
            map.insert("torch_dtype".into(), "float32".into());
        }
        let text =
            serde_json::to_string_pretty(&json).map_err(|e| ModelError::Input(e.to_string()))?;
        std::fs::create_dir_all(out).map_err(|e| ModelError::io(out, e))?;
        fsutil::write_atomic(&out.join("config.json"), text.as_bytes())
    }

    /// Writes the tokenizer next to a saved model so `AutoTokenizer` loads it from `out`:
    /// `tokenizer.json`, and the folder's other tokenizer files (or, from a GGUF,
    /// a `tokenizer_config.json` with the special tokens and chat template).
    pub fn write_tokenizer_files(&self, tokenizer: &TextTokenizer, out: &Path) -> Result<()> {
        let json = tokenizer
            .inner
            .to_string(true)
            .map_err(|e| ModelError::Input(format!("tokenizer: {e}")))?;
        std::fs::create_dir_all(out).map_err(|e| ModelError::io(out, e))?;
        fsutil::write_atomic(&out.join("tokenizer.json"), json.as_bytes())?;
        match (&self.format, self.gguf()) {
            (Format::Gguf, Some(file)) => {
                let cfg = gguf::tokenizer_config(file, tokenizer, self.max_positions());
                let text = serde_json::to_string_pretty(&cfg)
                    .map_err(|e| ModelError::Input(e.to_string()))?;
                fsutil::write_atomic(&out.join("tokenizer_config.json"), text.as_bytes())?;
            }
            _ => {
                for f in [
                    "tokenizer_config.json",
                    "special_tokens_map.json",
                    "vocab.txt",
                    "vocab.json",
                    "merges.txt",
                    "chat_template.jinja",
                ] {
                    let src = self.path.join(f);
                    if src.is_file() {
                        std::fs::copy(&src, out.join(f)).map_err(|e| ModelError::io(&src, e))?;
                    }
                }
                // The template the run used (a recipe's `chat_template_path` replaces the
                // folder's): transformers reads this file before tokenizer_config.json's entry.
                if let Some(t) = &tokenizer.chat_template {
                    fsutil::write_atomic(&out.join("chat_template.jinja"), t.as_bytes())?;
                }
            }
        }
        Ok(())
    }

    /// Total parameter count (all tensors of the checkpoint).
    pub fn parameter_count(&self) -> usize {
        self.source
            .names()
            .iter()
            .filter_map(|n| self.source.shape(n))
            .map(|s| s.iter().product::<usize>())
            .sum()
    }
}

/// A decoder with its language-modelling head.
#[allow(clippy::large_enum_variant)]
#[derive(burn::module::Module, Debug)]
pub enum CausalModel {
    Gpt2(gpt2::Gpt2LmHeadModel),
    Llama(llama::LlamaForCausalLm),
}

impl CausalLm for CausalModel {
    fn forward_hidden(
        &self,
        input: DecoderInput,
        cache: Option<&mut KvCache>,
        mode: Mode,
    ) -> Tensor<3> {
        match self {
            CausalModel::Gpt2(m) => m.forward_hidden(input, cache, mode),
            CausalModel::Llama(m) => m.forward_hidden(input, cache, mode),
        }
    }

    fn lm_logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        match self {
            CausalModel::Gpt2(m) => m.lm_logits(hidden),
            CausalModel::Llama(m) => m.lm_logits(hidden),
        }
    }

    fn lm_cross_entropy_sum(&self, hidden: Tensor<2>, targets: &[u32]) -> Tensor<1> {
        match self {
            CausalModel::Gpt2(m) => m.lm_cross_entropy_sum(hidden, targets),
            CausalModel::Llama(m) => m.lm_cross_entropy_sum(hidden, targets),
        }
    }

    fn new_cache(&self) -> KvCache {
        match self {
            CausalModel::Gpt2(m) => m.new_cache(),
            CausalModel::Llama(m) => m.new_cache(),
        }
    }

    fn max_positions(&self) -> usize {
        match self {
            CausalModel::Gpt2(m) => m.max_positions(),
            CausalModel::Llama(m) => m.max_positions(),
        }
    }

    fn vocab_size(&self) -> usize {
        match self {
            CausalModel::Gpt2(m) => m.vocab_size(),
            CausalModel::Llama(m) => m.vocab_size(),
        }
    }

    fn virtual_positions(&self) -> usize {
        match self {
            CausalModel::Gpt2(m) => m.virtual_positions(),
            CausalModel::Llama(m) => m.virtual_positions(),
        }
    }

    fn rope_switch(&self) -> Option<usize> {
        match self {
            CausalModel::Gpt2(m) => m.rope_switch(),
            CausalModel::Llama(m) => m.rope_switch(),
        }
    }
}

impl VisitParams for CausalModel {
    fn visit_params(&mut self, prefix: &str, v: &mut dyn Visitor) {
        match self {
            CausalModel::Gpt2(m) => m.visit_params(prefix, v),
            CausalModel::Llama(m) => m.visit_params(prefix, v),
        }
    }
}

/// A model with a sequence-classification head.
// One model lives for a whole run, so the size difference of the variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(burn::module::Module, Debug)]
pub enum Classifier {
    Bert(bert::BertForSequenceClassification),
    DistilBert(distilbert::DistilBertForSequenceClassification),
    ModernBert(modernbert::ModernBertForSequenceClassification),
    Deberta(deberta::DebertaForSequenceClassification),
    Gpt2(gpt2::Gpt2ForSequenceClassification),
    Llama(llama::LlamaForSequenceClassification),
}

/// A padded batch for a classifier.
#[derive(Debug, Clone)]
pub struct ClassifierInput {
    /// `[B, T]`
    pub input_ids: Tensor<2, burn::tensor::Int>,
    /// `[B, T]`
    pub attention_mask: Tensor<2, burn::tensor::Int>,
    /// `[B, T]`, encoders only.
    pub token_type_ids: Option<Tensor<2, burn::tensor::Int>>,
    /// Where the real tokens are, to run padding-free ([`unpad`]); `None` runs the padded
    /// rows as they are.
    pub unpadded: Option<unpad::Unpadded>,
}

impl Classifier {
    /// # Shapes
    /// - logits `[B, num_labels]`
    pub fn forward(&self, input: ClassifierInput, mode: Mode) -> Result<Tensor<2>> {
        let enc = || bert::EncoderInput {
            input_ids: input.input_ids.clone(),
            attention_mask: input.attention_mask.clone(),
            token_type_ids: input.token_type_ids.clone(),
            unpadded: input.unpadded.clone(),
        };
        let dec = || DecoderInput {
            input_ids: input.input_ids.clone(),
            attention_mask: input.attention_mask.clone(),
            position_ids: None,
            document_ids: None,
            unpadded: input.unpadded.clone(),
        };
        match self {
            Classifier::Bert(m) => Ok(m.forward(enc(), mode)),
            Classifier::DistilBert(m) => Ok(m.forward(enc(), mode)),
            Classifier::ModernBert(m) => Ok(m.forward(enc(), mode)),
            Classifier::Deberta(m) => Ok(m.forward(enc(), mode)),
            Classifier::Gpt2(m) => m.forward(dec(), mode),
            Classifier::Llama(m) => m.forward(dec(), mode),
        }
    }
}

impl VisitParams for Classifier {
    fn visit_params(&mut self, prefix: &str, v: &mut dyn Visitor) {
        match self {
            Classifier::Bert(m) => m.visit_params(prefix, v),
            Classifier::DistilBert(m) => m.visit_params(prefix, v),
            Classifier::ModernBert(m) => m.visit_params(prefix, v),
            Classifier::Deberta(m) => m.visit_params(prefix, v),
            Classifier::Gpt2(m) => m.visit_params(prefix, v),
            Classifier::Llama(m) => m.visit_params(prefix, v),
        }
    }
}

/// An encoder with a token-classification head.
#[derive(burn::module::Module, Debug)]
pub enum TokenClassifier {
    Bert(bert::BertForTokenClassification),
}

impl TokenClassifier {
    /// # Shapes
    /// - logits `[B, T, num_labels]`
    pub fn forward(&self, input: bert::EncoderInput, mode: Mode) -> Tensor<3> {
        match self {
            TokenClassifier::Bert(m) => m.forward(input, mode),
        }
    }
}

impl VisitParams for TokenClassifier {
    fn visit_params(&mut self, prefix: &str, v: &mut dyn Visitor) {
        match self {
            TokenClassifier::Bert(m) => m.visit_params(prefix, v),
        }
    }
}

/// An encoder with an extractive question-answering head.
#[allow(clippy::large_enum_variant)]
#[derive(burn::module::Module, Debug)]
pub enum QuestionAnswerer {
    Bert(bert::BertForQuestionAnswering),
    ModernBert(modernbert::ModernBertForQuestionAnswering),
    Deberta(deberta::DebertaForQuestionAnswering),
}

impl QuestionAnswerer {
    /// # Shapes
    /// - start and end logits `[B, T]`
    pub fn forward(&self, input: bert::EncoderInput, mode: Mode) -> bert::SpanLogits {
        match self {
            QuestionAnswerer::Bert(m) => m.forward(input, mode),
            QuestionAnswerer::ModernBert(m) => m.forward(input, mode),
            QuestionAnswerer::Deberta(m) => m.forward(input, mode),
        }
    }
}

impl VisitParams for QuestionAnswerer {
    fn visit_params(&mut self, prefix: &str, v: &mut dyn Visitor) {
        match self {
            QuestionAnswerer::Bert(m) => m.visit_params(prefix, v),
            QuestionAnswerer::ModernBert(m) => m.visit_params(prefix, v),
            QuestionAnswerer::Deberta(m) => m.visit_params(prefix, v),
        }
    }
}

/// Makes this thread flush subnormal floats to zero (x86 MXCSR FTZ and DAZ bits; no-op
/// elsewhere). Attention probabilities, GELU tails and Adam moments produce subnormals, and on
/// Intel cores every FMA that touches one takes a microcode assist: a LoRA training step ran
/// 7x slower on an AVX-512 Xeon without this. PyTorch's CPU kernels (oneDNN) run with the same
/// setting. Values below 1.2e-38 become 0, far under any tolerance of training.
pub fn flush_denormals() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: reads and writes this thread's MXCSR only; FTZ (bit 15) and DAZ (bit 6) change
    // the results of subnormal operations, nothing else.
    unsafe {
        let mut csr: u32 = 0;
        std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack));
        csr |= 0x8040;
        std::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack));
    }
}

/// Keeps freed memory in the process for reuse (glibc): a training step allocates and frees
/// the same activation-sized buffers every step, and glibc hands buffers over 128 KiB back to
/// the kernel at once, so each step paid for page faults and the kernel zeroing fresh pages
/// (13% of a SmolLM2 step in `clear_page_erms`). With the mmap threshold at its maximum
/// (32 MiB) and no trimming, those buffers come from the heap and are reused.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning parameters; called before other threads
    // allocate.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Process-wide settings for numeric work, called once, first thing in `main`: freed memory
/// kept for reuse, and subnormals flushed to zero on this thread and every thread of rayon's
/// global pool (which burn's kernels and whet's run on), building the pool if nobody has yet.
pub fn init_threads() {
    keep_freed_memory();
    flush_denormals();
    // Err means the pool exists already; its threads then keep their own setting.
    let _ = rayon::ThreadPoolBuilder::new()
        .start_handler(|_| flush_denormals())
        .stack_size(WORKER_STACK)
        .build_global();
}

/// Stack of each thread of rayon's pool: the main thread's 8 MiB, as [`on_pool`] moves the
/// caller's work onto one of them (reserved address space; pages are touched only when used).
const WORKER_STACK: usize = 8 << 20;

/// Runs `work` on a thread of rayon's global pool and returns its result. Every parallel
/// kernel then starts from inside the pool: the calling thread takes its share of the work
/// and the other threads steal the rest, instead of handing each kernel to the pool and
/// sleeping until it is done (a futex wait and two wake-ups per kernel, about a tenth of a
/// MiniLM training step on 2 cores).
pub fn on_pool<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| work())
}

/// The device's random generator is one per process and unit tests run in parallel threads: a
/// test that seeds it or draws from it holds this lock, so a seeded test draws exactly what its
/// seed gives.
#[cfg(test)]
pub(crate) fn test_rng() -> std::sync::MutexGuard<'static, ()> {
    static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());
    RNG.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod pool_tests {
    /// `on_pool` runs its work on a thread of rayon's global pool (not the caller's), returns
    /// its result, and a parallel loop inside it still spreads over the pool and sums right.
    #[test]
    fn on_pool_runs_on_a_pool_thread() {
        use rayon::prelude::*;
        super::init_threads();
        assert!(
            rayon::current_thread_index().is_none(),
            "the test thread is not a pool thread"
        );
        let (index, sum) = super::on_pool(|| {
            let sum: u64 = (0..10_000u64).into_par_iter().sum();
            (rayon::current_thread_index(), sum)
        });
        assert!(index.is_some(), "the work ran off the pool");
        assert_eq!(sum, 49_995_000);
    }
}
