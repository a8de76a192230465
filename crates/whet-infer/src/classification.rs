//! The text-classification pipeline: a trained classifier folder (a `transformers` folder, or
//! a `peft` adapter over its base, with `labels.json`) loaded with its labels, and per-label
//! probabilities for texts as `pipeline("text-classification")` gives them. Also the model
//! input of a padded batch, which training builds the same way.

use std::path::Path;

use burn::tensor::{Device, Int, Tensor, TensorData};
use whet_data::{Batch, Columns, Encoded, Example, LabelKind, Labels, Target, collate, tokenize};
use whet_models::config::ProblemType;
use whet_models::unpad::Unpadded;
use whet_models::{Checkpoint, Classifier, ClassifierInput, Mode, TextTokenizer};

use crate::error::{InferError, Result};
use crate::saved;

/// The labels of a batch as tensors.
pub enum BatchLabels {
    /// `[B]` class ids.
    Class(Tensor<1, Int>),
    /// `[B, C]` multi-hot.
    MultiHot(Tensor<2>),
    /// `[B]` regression targets.
    Value(Tensor<1>),
}

/// Builds model inputs and labels of a padded batch on `device` (`n_labels` sizes the
/// multi-hot rows of multi-label targets); `padding_free` runs the model without the batch's
/// padding ([`whet_models::unpad`]).
pub fn to_input(
    b: &Batch,
    device: &Device,
    with_types: bool,
    n_labels: usize,
    padding_free: bool,
) -> (ClassifierInput, BatchLabels) {
    let t = |v: &Vec<i64>| {
        Tensor::<2, Int>::from_data(TensorData::new(v.clone(), [b.batch, b.len]), device)
    };
    let values: Option<Vec<f32>> = b
        .targets
        .iter()
        .map(|t| match t {
            Target::Value(v) => Some(*v),
            _ => None,
        })
        .collect();
    let labels = if let Some(values) = values.filter(|v| !v.is_empty()) {
        BatchLabels::Value(Tensor::from_data(
            TensorData::new(values, [b.batch]),
            device,
        ))
    } else if b.targets.iter().any(|t| matches!(t, Target::Multi(_))) {
        let mut hot = vec![0f32; b.batch * n_labels];
        for (r, t) in b.targets.iter().enumerate() {
            for &k in t.ids() {
                hot[r * n_labels + k] = 1.0;
            }
        }
        BatchLabels::MultiHot(Tensor::from_data(
            TensorData::new(hot, [b.batch, n_labels]),
            device,
        ))
    } else {
        let ids: Vec<i64> = b.targets.iter().map(|t| t.ids()[0] as i64).collect();
        BatchLabels::Class(Tensor::from_data(TensorData::new(ids, [b.batch]), device))
    };
    (
        ClassifierInput {
            input_ids: t(&b.input_ids),
            attention_mask: t(&b.attention_mask),
            token_type_ids: with_types.then(|| t(&b.token_type_ids)),
            unpadded: padding_free.then(|| Unpadded::from_mask(&b.attention_mask, b.batch, b.len)),
        },
        labels,
    )
}

/// Per-label scores for texts: softmax probabilities, for a multi-label model one sigmoid per
/// label, for a regression model its one output as it is (as `pipeline("text-classification")`
/// picks by `problem_type`).
pub fn predict(
    model: &Classifier,
    tokenizer: &TextTokenizer,
    texts: &[String],
    max_length: usize,
    pad_id: u32,
    kind: LabelKind,
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
    predict_examples(model, tokenizer, &ex, max_length, pad_id, kind, device)
}

/// [`predict`] for examples, each a text or a pair of texts (their labels are not read).
pub fn predict_examples(
    model: &Classifier,
    tokenizer: &TextTokenizer,
    ex: &[Example],
    max_length: usize,
    pad_id: u32,
    kind: LabelKind,
    device: &Device,
) -> Result<Vec<Vec<f32>>> {
    // The labels are not read: the batches carry none.
    let ex: Vec<Example> = ex
        .iter()
        .map(|e| Example {
            label: Target::Class(0),
            ..e.clone()
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
        let b = collate(&items, pad_id);
        let (input, _) = to_input(&b, device, with_types, 0, true);
        let logits = model.forward(input, Mode::Eval)?;
        let probs = match kind {
            LabelKind::Single => burn::tensor::activation::softmax(logits, 1),
            LabelKind::Multi => burn::tensor::activation::sigmoid(logits),
            LabelKind::Real => logits,
        };
        let [n, c] = probs.dims();
        let v: Vec<f32> = probs
            .into_data()
            .convert::<f32>()
            .try_to_vec()
            .map_err(InferError::TensorData)?;
        out.extend((0..n).map(|i| v[i * c..(i + 1) * c].to_vec()));
    }
    Ok(out)
}

/// A trained classifier ready for use.
pub struct Trained {
    pub model: Classifier,
    pub tokenizer: TextTokenizer,
    pub labels: Labels,
    /// What the head predicts: a class (softmax), labels (a sigmoid each) or a number.
    pub kind: LabelKind,
    pub max_length: usize,
    pub pad_id: u32,
    /// The columns it was trained on (`labels.json`), for evaluating on data of the same shape.
    pub columns: Option<Columns>,
}

impl Trained {
    /// Per-label scores for texts and, where given, their second texts (see
    /// [`predict_examples`]), at the length the model was trained with.
    pub fn predict_pairs(
        &self,
        texts: &[String],
        pairs: Option<&[String]>,
        device: &Device,
    ) -> Result<Vec<Vec<f32>>> {
        let ex: Vec<Example> = texts
            .iter()
            .enumerate()
            .map(|(i, t)| Example {
                text: t.clone(),
                text_pair: pairs.and_then(|p| p.get(i).cloned()),
                label: Target::Class(0),
                origin: "input".into(),
            })
            .collect();
        predict_examples(
            &self.model,
            &self.tokenizer,
            &ex,
            self.max_length,
            self.pad_id,
            self.kind,
            device,
        )
    }

    /// Per-label scores for texts (see [`predict`]), at the length the model was trained with.
    pub fn predict(&self, texts: &[String], device: &Device) -> Result<Vec<Vec<f32>>> {
        predict(
            &self.model,
            &self.tokenizer,
            texts,
            self.max_length,
            self.pad_id,
            self.kind,
            device,
        )
    }
}

/// Loads what `whet train` saves for a classification task (a `peft` adapter folder or a full
/// model folder, with `labels.json`), or any `transformers` sequence-classification folder.
pub fn load(dir: &Path, device: &Device) -> Result<Trained> {
    load_on(dir, None, device)
}

/// As [`load`], with the base of an adapter folder given (`None`: the base it names).
pub fn load_on(dir: &Path, base: Option<&Path>, device: &Device) -> Result<Trained> {
    let meta = saved::meta(dir, "labels.json");
    let max_length = meta
        .as_ref()
        .and_then(|m| m["max_length"].as_u64())
        .unwrap_or(128) as usize;
    let (base, is_adapter) = saved::base_model(dir, base, meta.as_ref())?;
    let mut checkpoint = Checkpoint::open(&base)?;
    let labels = match meta.as_ref().and_then(|m| m["labels"].as_array()) {
        Some(l) => Labels(
            l.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect(),
        ),
        None => Labels(checkpoint.head().labels()),
    };
    let problem_type = match meta.as_ref().and_then(|m| m["problem_type"].as_str()) {
        Some("multi_label_classification") => Some(ProblemType::MultiLabelClassification),
        Some("regression") => Some(ProblemType::Regression),
        Some(_) => Some(ProblemType::SingleLabelClassification),
        None => checkpoint.head().problem_type,
    };
    let kind = match problem_type {
        Some(ProblemType::MultiLabelClassification) => LabelKind::Multi,
        Some(ProblemType::Regression) => LabelKind::Real,
        _ => LabelKind::Single,
    };
    let columns = meta.as_ref().and_then(|m| {
        Some(Columns {
            text: m["text_column"].as_str()?.to_string(),
            text_pair: m["text_pair_column"].as_str().map(String::from),
            label: m["label_column"].as_str()?.to_string(),
        })
    });
    let tokenizer = match TextTokenizer::from_folder(dir) {
        Ok(t) => t,
        Err(_) => checkpoint.tokenizer()?,
    };
    let pad_id = checkpoint
        .pad_token_id()
        .or(tokenizer.pad.as_ref().map(|p| p.id))
        .or(tokenizer.eos.as_ref().map(|p| p.id))
        .ok_or(InferError::NoPadToken)?;
    checkpoint.set_pad_token_id(pad_id);
    checkpoint.set_labels(&labels.0);
    let (mut model, fresh) = checkpoint.load_classifier(device)?;
    if is_adapter {
        whet_peft::load_adapter(&mut model, dir, device)?;
    } else if !fresh.is_empty() {
        return Err(InferError::UntrainedHead {
            path: dir.to_path_buf(),
            head: "classification",
            missing: fresh,
        });
    }
    Ok(Trained {
        model,
        tokenizer,
        labels,
        kind,
        max_length,
        pad_id,
        columns,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// `cache/minilm` (`scripts/fetch_assets.sh --only minilm`): a BERT encoder without a
    /// classification or span head.
    pub(crate) fn minilm() -> std::path::PathBuf {
        let dir = std::env::var_os("WHET_CACHE")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../cache"))
            .join("minilm");
        assert!(
            dir.join("model.safetensors").is_file(),
            "{} is missing: run scripts/fetch_assets.sh --only minilm",
            dir.display()
        );
        dir
    }

    #[test]
    fn a_folder_without_a_trained_head_is_refused() {
        let dir = minilm();
        let Err(e) = load(&dir, &Device::flex()) else {
            panic!("an encoder without a head loaded as a classifier");
        };
        let text = e.to_string();
        assert!(
            text.contains("has no trained classification head (missing classifier."),
            "{text}"
        );
        assert!(text.ends_with("train it first with `whet train`"), "{text}");
    }
}
