//! Pieces of the Hugging Face `config.json` schema shared by every family.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::Tensor;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::error::{ModelError, Result};

/// Reads and deserialises a `config.json`, naming the file and field on error.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        let mut err = ModelError::io(path, e);
        if let ModelError::MissingFile { hint, .. } = &mut err {
            *hint = "a Hugging Face model folder needs config.json".into();
        }
        err
    })?;
    serde_json::from_str(&text).map_err(|e| ModelError::Config {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Element-wise activations named as `transformers`' `ACT2FN` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
pub enum Activation {
    /// Exact GELU with erf.
    #[serde(rename = "gelu")]
    Gelu,
    /// Tanh approximation of GELU (GPT-2's `gelu_new`).
    #[serde(
        rename = "gelu_new",
        alias = "gelu_pytorch_tanh",
        alias = "gelu_fast",
        alias = "gelu_approximate"
    )]
    GeluTanh,
    /// max(0, x).
    #[serde(rename = "relu")]
    Relu,
    /// x * sigmoid(x).
    #[serde(rename = "silu", alias = "swish")]
    Silu,
}

impl Activation {
    /// Applies the activation.
    pub fn forward<const D: usize>(self, x: Tensor<D>) -> Tensor<D> {
        use burn::tensor::activation as act;
        match self {
            Activation::Gelu => crate::kernels::gelu(x),
            Activation::GeluTanh => act::gelu_approximate(x),
            Activation::Relu => act::relu(x),
            Activation::Silu => act::silu(x),
        }
    }
}

/// Whether a sequence-classification head predicts one class or independent labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ProblemType {
    /// Softmax over classes, cross-entropy loss.
    #[default]
    SingleLabelClassification,
    /// Sigmoid per label, binary cross-entropy loss.
    MultiLabelClassification,
    /// One output, mean-squared error.
    Regression,
}

/// The classification-head fields every `config.json` may carry.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct HeadFields {
    /// `{"0": "negative", ...}`
    #[serde(default)]
    pub id2label: Option<BTreeMap<String, String>>,
    /// Explicit label count (older configs).
    #[serde(default)]
    pub num_labels: Option<usize>,
    /// Loss family.
    #[serde(default)]
    pub problem_type: Option<ProblemType>,
}

/// The most labels a classification head may have. A new head (and its `LABEL_i` names) is
/// sized from the config alone, so the count is bounded before anything is allocated from it;
/// text classification sets have hundreds or thousands of labels.
pub const MAX_LABELS: usize = 1 << 16;

impl HeadFields {
    /// Checks the label count before a head or the label names are sized from it.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let n = self.num_labels();
        if n > MAX_LABELS {
            return Err(format!(
                "num_labels = {n}: a classification head has at most {MAX_LABELS} labels"
            ));
        }
        Ok(())
    }

    /// Number of labels (`transformers` defaults to 2).
    pub fn num_labels(&self) -> usize {
        self.id2label
            .as_ref()
            .map(|m| m.len())
            .or(self.num_labels)
            .unwrap_or(2)
    }

    /// Label names in id order (`LABEL_i` where the config has none).
    pub fn labels(&self) -> Vec<String> {
        let n = self.num_labels();
        (0..n)
            .map(|i| {
                self.id2label
                    .as_ref()
                    .and_then(|m| m.get(&i.to_string()).cloned())
                    .unwrap_or_else(|| format!("LABEL_{i}"))
            })
            .collect()
    }
}
