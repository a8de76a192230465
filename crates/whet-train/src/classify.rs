//! The sequence-classification task end to end: data, labels, method, training, evaluation,
//! and output the Python world loads (a `transformers` folder, or a `peft` adapter).

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use serde_json::json;
use whet_data::{
    Columns, Encoded, Encoding, Example, Labels, Table, Target, examples, tokenize, tokenize_cached,
};
use whet_models::config::ProblemType;
use whet_models::{Checkpoint, Classifier, ExportParams, TextTokenizer};
use whet_peft::{ParamCounts, PeftConfig, set_trainable};

use crate::error::{Result, TrainError};
use crate::recipe::{Method, Recipe};
use crate::seqcls::{evaluate, train_classifier};
use crate::trainer::{Observer, TrainSummary};

/// A labelled split: examples and their tokens.
pub struct Split {
    pub examples: Vec<Example>,
    pub encoded: Vec<Encoded>,
}

/// Everything a run prepared before training.
pub struct Prepared {
    pub checkpoint: Checkpoint,
    pub tokenizer: TextTokenizer,
    pub labels: Labels,
    /// Several labels per text (sigmoid per label, binary cross-entropy).
    pub multi_label: bool,
    pub train: Split,
    pub validation: Option<Split>,
    pub test: Option<Split>,
    pub pad_id: u32,
    pub model: Classifier,
    pub counts: ParamCounts,
    /// The adapter method's configuration (None for full and head training).
    pub adapter: Option<PeftConfig>,
    /// Head tensors that were initialised (not in the checkpoint).
    pub fresh: Vec<String>,
}

fn encoding(name: &str) -> Result<Encoding> {
    name.parse().map_err(TrainError::Encoding)
}

/// Reads the data, fixes the labels, tokenizes, loads the model and applies the method.
pub fn prepare(recipe: &Recipe, device: &Device) -> Result<Prepared> {
    let d = &recipe.data;
    let multi = recipe.task.multi_label();
    let enc = encoding(&d.encoding)?;
    let read = |p: &Path| Table::read(p, enc).map_err(TrainError::from);
    let train_table = read(&d.train)?;
    let labels = match &d.label_names {
        Some(names) => Labels(names.clone()),
        None => Labels::infer(&train_table, &d.label_column)?,
    };
    if labels.len() < 2 {
        return Err(TrainError::dataset(
            &d.train,
            format!(
                "found {} label(s); classification needs at least 2",
                labels.len()
            ),
        ));
    }
    let cols = Columns {
        text: d.text_column.clone(),
        text_pair: d.text_pair_column.clone(),
        label: d.label_column.clone(),
    };
    let all_train = examples(&train_table, &cols, &labels, multi)?;
    let load_split = |p: &Option<PathBuf>| -> Result<Option<Vec<Example>>> {
        match p {
            Some(p) => Ok(Some(examples(&read(p)?, &cols, &labels, multi)?)),
            None => Ok(None),
        }
    };
    let validation = load_split(&d.validation)?;
    let test = load_split(&d.test)?;
    let (train, validation, test) = d.parts(all_train, validation, test)?;
    if train.is_empty() {
        return Err(TrainError::dataset(&d.train, "the training split is empty"));
    }

    let (mut checkpoint, tokenizer, pad_id) = open_checkpoint(recipe)?;
    checkpoint.set_labels(&labels.0);
    if multi {
        checkpoint.set_problem_type(ProblemType::MultiLabelClassification);
    }
    let tok = |ex: Vec<Example>| -> Result<Split> {
        let encoded = if d.tokenization_cache {
            let dir = crate::recipe::cache_dir().join("tokenized");
            tokenize_cached(
                &tokenizer,
                &ex,
                d.max_length,
                d.side(whet_data::Side::Right),
                &dir,
            )?
            .0
        } else {
            tokenize(
                &tokenizer,
                &ex,
                d.max_length,
                d.side(whet_data::Side::Right),
            )?
        };
        Ok(Split {
            examples: ex,
            encoded,
        })
    };
    let train = tok(train)?;
    let validation = validation.map(tok).transpose()?;
    let test = test.map(tok).transpose()?;

    let (mut model, fresh) = checkpoint.load_classifier(device)?;
    let (counts, adapter) = apply_method(&mut model, recipe, &tokenizer, device)?;
    Ok(Prepared {
        checkpoint,
        tokenizer,
        labels,
        multi_label: multi,
        train,
        validation,
        test,
        pad_id,
        model,
        counts,
        adapter,
        fresh,
    })
}

/// The sequence-classification heads of the families (trained in full with an adapter).
const HEAD_MODULES: &[&str] = &["classifier", "score"];

/// Name fragments of the top `n` transformer layers (`layer.5.`, `layers.29.`, `h.11.`).
fn top_layers(model: &Classifier, n: usize) -> Vec<String> {
    if n == 0 {
        return vec![];
    }
    let mut layers: Vec<(String, usize)> = model
        .named_params()
        .iter()
        .filter_map(|p| {
            let parts: Vec<&str> = p.name.split('.').collect();
            parts.windows(2).find_map(|w| {
                matches!(w[0], "layer" | "layers" | "h")
                    .then(|| w[1].parse::<usize>().ok().map(|i| (w[0].to_string(), i)))?
            })
        })
        .collect();
    layers.sort_by_key(|(_, i)| *i);
    layers.dedup();
    let max = layers.iter().map(|(_, i)| *i).max().unwrap_or(0);
    layers
        .into_iter()
        .filter(|(_, i)| *i + n > max)
        .map(|(k, i)| format!(".{k}.{i}."))
        .collect()
}

/// Per-label scores for texts: softmax probabilities, or for a multi-label model one sigmoid
/// per label (as `pipeline("text-classification")` picks by `problem_type`).
pub fn predict(
    model: &Classifier,
    tokenizer: &TextTokenizer,
    texts: &[String],
    max_length: usize,
    pad_id: u32,
    multi_label: bool,
    device: &Device,
) -> Result<Vec<Vec<f32>>> {
    let ex: Vec<Example> = texts
        .iter()
        .map(|t| Example {
            text: t.clone(),
            text_pair: None,
            label: Target::Class(0),
            origin: "input".into(),
        })
        .collect();
    let enc = tokenize(tokenizer, &ex, max_length, Default::default())?;
    // Inference on the plain backend: no autodiff graph is recorded.
    let model = &burn::module::Module::valid(model);
    let device = &device.clone().without_autodiff();
    let with_types = matches!(model, Classifier::Bert(_));
    let mut out = Vec::new();
    for chunk in enc.chunks(32) {
        let items: Vec<&Encoded> = chunk.iter().collect();
        let b = whet_data::collate(&items, pad_id);
        let (input, _) = crate::seqcls::to_input(&b, device, with_types, 0);
        let logits = model.forward(input, whet_models::Mode::Eval)?;
        let probs = if multi_label {
            burn::tensor::activation::sigmoid(logits)
        } else {
            burn::tensor::activation::softmax(logits, 1)
        };
        let [n, c] = probs.dims();
        let v: Vec<f32> = probs
            .into_data()
            .convert::<f32>()
            .try_to_vec()
            .map_err(TrainError::TensorData)?;
        out.extend((0..n).map(|i| v[i * c..(i + 1) * c].to_vec()));
    }
    Ok(out)
}

/// Metrics of one split as `eval_*` / `test_*` keys.
pub fn metric_map(
    prefix: &str,
    loss: f64,
    r: &whet_metrics::ClassificationReport,
    labels: &Labels,
) -> serde_json::Map<String, serde_json::Value> {
    let mut m = serde_json::Map::new();
    let mut put = |k: &str, v: serde_json::Value| {
        m.insert(format!("{prefix}_{k}"), v);
    };
    put("loss", json!(loss));
    put("accuracy", json!(r.accuracy));
    put("f1", json!(r.macro_avg.f1));
    put("precision", json!(r.macro_avg.precision));
    put("recall", json!(r.macro_avg.recall));
    put("f1_micro", json!(r.micro_avg.f1));
    put("f1_weighted", json!(r.weighted_avg.f1));
    put("matthews_correlation", json!(r.matthews_correlation));
    put("samples", json!(r.samples));
    put(
        "per_class",
        json!(
            labels
                .0
                .iter()
                .zip(&r.per_class)
                .map(|(l, c)| (l.clone(), json!(c)))
                .collect::<serde_json::Map<_, _>>()
        ),
    );
    put("confusion_matrix", json!(r.confusion));
    m
}

/// A model without a token to pad with.
fn no_pad() -> TrainError {
    TrainError::Unsuitable("the model has neither a pad nor an EOS token".into())
}

/// Opens the recipe's model for a classifier head: the checkpoint (its base quantised as the
/// method asks), its tokenizer, and the padding id (EOS for a decoder without a pad token).
pub(crate) fn open_checkpoint(recipe: &Recipe) -> Result<(Checkpoint, TextTokenizer, u32)> {
    let d = &recipe.data;
    let mut checkpoint = Checkpoint::open(&recipe.model)?;
    checkpoint.quantization = crate::method::quant_policy(recipe, HEAD_MODULES);
    if d.max_length > checkpoint.max_positions() {
        return Err(TrainError::ExceedsPositions {
            key: "data.max_length",
            value: d.max_length,
            positions: checkpoint.max_positions(),
            model: recipe.model.clone(),
        });
    }
    let tokenizer = checkpoint.tokenizer()?;
    let pad_id = match checkpoint
        .pad_token_id()
        .or(tokenizer.pad.as_ref().map(|p| p.id))
    {
        Some(p) => p,
        None => {
            // A decoder without a pad token pads with EOS, as the GPT-2 tutorial does.
            let eos = tokenizer.eos.as_ref().map(|e| e.id).ok_or_else(no_pad)?;
            checkpoint.set_pad_token_id(eos);
            eos
        }
    };
    Ok((checkpoint, tokenizer, pad_id))
}

/// Applies the recipe's method to a classifier: full training, the head (and top layers), or
/// an adapter that saves the head with it (peft's `task_type = "SEQ_CLS"`).
pub(crate) fn apply_method(
    model: &mut Classifier,
    recipe: &Recipe,
    tokenizer: &TextTokenizer,
    device: &Device,
) -> Result<(ParamCounts, Option<PeftConfig>)> {
    let head = |name: &str| {
        let module = name.rsplit_once('.').map(|(m, _)| m).unwrap_or(name);
        ["classifier", "score"].iter().any(|k| module.ends_with(k))
    };
    Ok(match recipe.method {
        Method::Full => (crate::method::full(model), None),
        Method::Head => {
            let top = top_layers(model, recipe.head.unfreeze_top_layers);
            let trainable =
                |name: &str| head(name) || top.iter().any(|p| name.contains(p.as_str()));
            set_trainable(model, &trainable);
            let all = crate::output::param_count(model, &|_| true);
            let trainable_n = crate::output::param_count(model, &trainable);
            (
                ParamCounts {
                    trainable: trainable_n,
                    all,
                },
                None,
            )
        }
        Method::Lora
        | Method::Qlora
        | Method::Ia3
        | Method::Bottleneck
        | Method::PrefixTuning
        | Method::PromptTuning => {
            // peft's task_type = "SEQ_CLS" saves the head with the adapter.
            let (counts, cfg) =
                crate::method::attach_adapter(model, recipe, HEAD_MODULES, tokenizer, device)?
                    .ok_or(TrainError::NoAdapterTable)?;
            (counts, Some(cfg))
        }
    })
}

/// Runs training (from a checkpoint folder when `resume` names one) and returns the summary.
pub fn run_training(
    p: &mut Prepared,
    recipe: &Recipe,
    device: &Device,
    observer: &mut dyn Observer,
    resume: Option<&Path>,
) -> Result<TrainSummary> {
    let eval = p.validation.as_ref().map(|s| s.encoded.as_slice());
    train_classifier(
        &mut p.model,
        &p.train.encoded,
        eval,
        p.labels.len(),
        p.pad_id,
        &recipe.training,
        device,
        observer,
        resume,
    )
}

/// Evaluates a split.
pub fn evaluate_split(
    p: &Prepared,
    split: &Split,
    batch: usize,
    device: &Device,
) -> Result<(f64, whet_metrics::ClassificationReport)> {
    let (loss, report, _) = evaluate(
        &p.model,
        &split.encoded,
        p.labels.len(),
        batch,
        p.pad_id,
        device,
    )?;
    Ok((loss, report))
}

/// Saves the result into `out`: a `peft` adapter folder for LoRA, a `transformers` folder
/// otherwise; both with the tokenizer and `labels.json`.
pub fn save(p: &Prepared, recipe: &Recipe, out: &Path) -> Result<()> {
    let problem_type = if p.multi_label {
        ProblemType::MultiLabelClassification
    } else {
        ProblemType::SingleLabelClassification
    };
    let saved = Saved {
        checkpoint: &p.checkpoint,
        tokenizer: &p.tokenizer,
        model: &p.model,
        adapter: p.adapter.as_ref(),
        labels: &p.labels.0,
        problem_type,
    };
    saved.write(recipe, out)
}

/// What a classifier run writes: the model or adapter, the tokenizer, `labels.json`.
pub(crate) struct Saved<'a> {
    pub checkpoint: &'a Checkpoint,
    pub tokenizer: &'a TextTokenizer,
    pub model: &'a Classifier,
    pub adapter: Option<&'a PeftConfig>,
    pub labels: &'a [String],
    pub problem_type: ProblemType,
}

impl Saved<'_> {
    pub(crate) fn write(&self, recipe: &Recipe, out: &Path) -> Result<()> {
        std::fs::create_dir_all(out).map_err(|e| TrainError::io(out, e))?;
        match self.adapter {
            Some(cfg) => {
                crate::output::save_adapter(self.model, cfg, &recipe.model, "SEQ_CLS", out)?;
            }
            None => {
                self.checkpoint.write_classifier_config(self.labels, out)?;
                crate::output::save_weights(self.model, out)?;
            }
        }
        let tok = self
            .tokenizer
            .inner
            .to_string(true)
            .map_err(TrainError::Tokenizer)?;
        whet_models::fsutil::write_atomic(&out.join("tokenizer.json"), tok.as_bytes())?;
        if recipe.model.is_dir() {
            for f in [
                "tokenizer_config.json",
                "special_tokens_map.json",
                "vocab.txt",
            ] {
                let src = recipe.model.join(f);
                if src.is_file() {
                    std::fs::copy(&src, out.join(f)).map_err(|e| TrainError::io(&src, e))?;
                }
            }
        }
        let labels = json!({
            "labels": self.labels,
            "problem_type": self.problem_type,
            "max_length": recipe.data.max_length,
            "base_model": recipe.model,
        });
        whet_models::fsutil::write_atomic(&out.join("labels.json"), labels.to_string().as_bytes())?;
        Ok(())
    }
}

/// A trained classifier ready for use.
pub struct Trained {
    pub model: Classifier,
    pub tokenizer: TextTokenizer,
    pub labels: Labels,
    /// Sigmoid per label rather than softmax.
    pub multi_label: bool,
    pub max_length: usize,
    pub pad_id: u32,
}

/// Loads what [`save`] wrote (a LoRA adapter folder or a full model folder), or any
/// `transformers` sequence-classification folder.
pub fn load_trained(dir: &Path, device: &Device) -> Result<Trained> {
    load_trained_on(dir, None, device)
}

/// As [`load_trained`], with the base of an adapter folder given (`None`: the base it names).
pub fn load_trained_on(dir: &Path, base: Option<&Path>, device: &Device) -> Result<Trained> {
    let meta: Option<serde_json::Value> = std::fs::read_to_string(dir.join("labels.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let max_length = meta
        .as_ref()
        .and_then(|m| m["max_length"].as_u64())
        .unwrap_or(128) as usize;
    let is_adapter = dir.join("adapter_config.json").is_file();
    let base = if is_adapter {
        let path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| TrainError::io(dir, e))?;
        let cfg: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| TrainError::JsonFile { path, source })?;
        let from_meta = meta
            .as_ref()
            .and_then(|m| m["base_model"].as_str())
            .map(PathBuf::from);
        let from_cfg = cfg["base_model_name_or_path"].as_str().map(PathBuf::from);
        base.map(Path::to_path_buf)
            .or(from_meta.filter(|p| p.exists()))
            .or(from_cfg)
            .ok_or_else(|| {
                TrainError::checkpoint(dir, "the adapter does not name its base model")
            })?
    } else {
        dir.to_path_buf()
    };
    let mut checkpoint = Checkpoint::open(&base)?;
    let labels = match meta.as_ref().and_then(|m| m["labels"].as_array()) {
        Some(l) => Labels(
            l.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect(),
        ),
        None => Labels(checkpoint.head().labels()),
    };
    let multi_label = meta
        .as_ref()
        .and_then(|m| m["problem_type"].as_str())
        .map(|p| p == "multi_label_classification")
        .unwrap_or(checkpoint.head().problem_type == Some(ProblemType::MultiLabelClassification));
    let tokenizer = match whet_models::TextTokenizer::from_folder(dir) {
        Ok(t) => t,
        Err(_) => checkpoint.tokenizer()?,
    };
    let pad_id = checkpoint
        .pad_token_id()
        .or(tokenizer.pad.as_ref().map(|p| p.id))
        .or(tokenizer.eos.as_ref().map(|p| p.id))
        .ok_or_else(no_pad)?;
    checkpoint.set_pad_token_id(pad_id);
    checkpoint.set_labels(&labels.0);
    let (mut model, fresh) = checkpoint.load_classifier(device)?;
    if is_adapter {
        whet_peft::load_adapter(&mut model, dir, device)?;
    } else if !fresh.is_empty() {
        return Err(TrainError::UntrainedHead {
            path: dir.to_path_buf(),
            missing: fresh,
        });
    }
    Ok(Trained {
        model,
        tokenizer,
        labels,
        multi_label,
        max_length,
        pad_id,
    })
}
