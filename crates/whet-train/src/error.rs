//! The error type of training: every variant names what a person needs to fix the run, the
//! recipe file, the key or option and what it accepts, the data file and row, the checkpoint
//! folder, the step whose loss went wrong.

use std::path::PathBuf;

/// What can go wrong while reading a recipe, preparing data and a model, training, and
/// writing checkpoints and results.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    // -- The recipe and its options. ---------------------------------------------------------
    /// The recipe file cannot be read.
    #[error("cannot read recipe {path}: {source}")]
    RecipeRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Something in a recipe file is wrong: the file, then what.
    #[error("recipe {path}: {source}")]
    InRecipe {
        path: PathBuf,
        #[source]
        source: Box<TrainError>,
    },
    /// The recipe is not TOML, or a value does not fit its option's type.
    #[error(transparent)]
    Toml(#[from] toml::de::Error),
    /// A key no table of the recipe knows (a typo, usually).
    #[error(
        "unknown key {key:?} {}{} (valid keys: {})",
        place(.table),
        hint(.closest),
        .valid.join(", ")
    )]
    UnknownKey {
        key: String,
        /// The table, dotted (`data.split`); empty for the top level.
        table: String,
        /// The valid key closest to `key`.
        closest: Option<String>,
        valid: Vec<String>,
    },
    /// A `--set` override that is not `key=value`.
    #[error("--set {arg:?}: expected key=value")]
    OverrideSyntax { arg: String },
    /// A `--set` override whose key cannot be set.
    #[error("--set {key}: {message}")]
    Override { key: String, message: String },
    /// An option's value is out of range or meaningless: `key` names the option
    /// (`training.learning_rate`), `message` says what is wrong and what would be right.
    #[error("{key} {message}")]
    InvalidOption { key: String, message: String },
    /// `data.encoding` names an encoding whet does not read.
    #[error("data.encoding: {0}")]
    Encoding(String),
    /// `data.template` names no built-in template.
    #[error(
        "data.template = {name:?}: the built-in templates are \"alpaca\"; or give {{ prompt = \"...\", completion = \"...\" }}"
    )]
    UnknownTemplate { name: String },
    /// An adapter table without target modules, for an architecture peft has no default for.
    #[error(
        "[{table}] has no {what} and peft has no default for model_type {model_type:?} (LoRA's \
         cover bert, roberta, xlm-roberta, deberta-v2, gpt2, llama, mistral, qwen2, qwen3, gemma, \
         gemma2, gemma3_text): name them, e.g. {what} = [\"q_lin\", \"v_lin\"] for DistilBERT, \
         [\"qkv_proj\"] for Phi-3, [\"Wqkv\"] for ModernBERT"
    )]
    NoPeftDefault {
        table: &'static str,
        what: &'static str,
        model_type: String,
    },
    /// `training.metric_for_best_model` names no metric the evaluation reports.
    #[error("metric_for_best_model {name:?} is not one of loss, {}", .available.join(", "))]
    UnknownMetric {
        name: String,
        available: Vec<String>,
    },
    /// Options that do not go together, or a table the method or task needs.
    #[error("{0}")]
    Recipe(String),
    /// An adapter method without its table.
    #[error("the adapter method needs its table ([lora] or [ia3])")]
    NoAdapterTable,
    /// A length option beyond the model's positions.
    #[error("{key} = {value} exceeds the model's {positions} positions ({model})")]
    ExceedsPositions {
        key: &'static str,
        value: usize,
        positions: usize,
        model: PathBuf,
    },

    // -- The model does not suit the task or method. -----------------------------------------
    /// The task needs a decoder.
    #[error("task = \"{task}\" needs a decoder (GPT-2 or LLaMA family); {model} is {family}")]
    NeedsDecoder {
        task: String,
        model: PathBuf,
        family: String,
    },
    /// `method = "head"` for a task without a classification head.
    #[error(
        "method = \"head\" trains a new classification head; {task:?} has none (use full or lora)"
    )]
    /// The task, as the recipe's `Debug` names it (`CausalLm`).
    NoHead { task: String },
    /// The model lacks what the task needs (a pad or EOS token, a one-output head).
    #[error("{0}")]
    Unsuitable(String),
    /// The PPO reward model (`ppo.reward_model`) cannot be used.
    #[error("ppo.reward_model {path}: {source}")]
    RewardModel {
        path: PathBuf,
        #[source]
        source: Box<TrainError>,
    },

    // -- Data. -----------------------------------------------------------------------------
    /// Reading or tokenizing data failed (whet-data).
    #[error(transparent)]
    Data(#[from] whet_data::DataError),
    /// A data file as a whole does not fit the task (no rows, too few labels, nothing left).
    #[error("{path}: {message}")]
    Dataset { path: PathBuf, message: String },
    /// A row or example does not fit the task; `origin` is `path:line`.
    #[error("{origin}: {message}")]
    Row { origin: String, message: String },
    /// A text cannot be tokenized; `origin` is the row (`path:line`) or the option it came from.
    #[error("{origin}: {source}")]
    Encode {
        origin: String,
        #[source]
        source: whet_text::TextError,
    },
    /// There is nothing to train on.
    #[error("the training split is empty")]
    EmptyTrainingSplit,

    // -- Models, adapters, tokenizers, files. -----------------------------------------------
    /// Loading, running or writing a model failed (whet-models).
    #[error(transparent)]
    Model(#[from] whet_models::ModelError),
    /// Attaching, loading or saving an adapter failed (whet-peft).
    #[error(transparent)]
    Peft(#[from] whet_peft::PeftError),
    /// Loading a trained folder or running a pipeline on it failed (whet-infer).
    #[error(transparent)]
    Infer(#[from] whet_infer::InferError),
    /// Loading a tokenizer, encoding text or writing a file failed (whet-text).
    #[error(transparent)]
    Text(#[from] whet_text::TextError),
    /// The `tokenizers` library failed (serialising a tokenizer, offsets of a text).
    #[error("{0}")]
    Tokenizer(Box<dyn std::error::Error + Send + Sync>),
    /// A file or folder cannot be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A JSON file does not parse.
    #[error("{path}: {source}")]
    JsonFile {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A value cannot become JSON.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// A checkpoint or saved model folder is damaged or does not fit the model.
    #[error("{path}: {message}")]
    Checkpoint { path: PathBuf, message: String },

    // -- Numerics. ---------------------------------------------------------------------------
    /// The loss became NaN or infinite; `loss` names it (`loss`, `PPO loss`), `step` is the
    /// 1-based optimizer step.
    #[error("the {loss} became {value} at step {step} (learning rate too high?); stopping")]
    NonFiniteLoss {
        loss: &'static str,
        step: usize,
        value: f64,
    },
    /// DPO's `Precomputed` reference used before DPO's `precompute` filled it.
    #[error("reference log-probabilities were not precomputed")]
    NotPrecomputed,
}

/// Result alias for this crate.
pub type Result<T, E = TrainError> = std::result::Result<T, E>;

impl TrainError {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        TrainError::Io {
            path: path.into(),
            source,
        }
    }

    /// `key` (an option) `message` (what is wrong with its value).
    pub fn option(key: impl Into<String>, message: impl Into<String>) -> Self {
        TrainError::InvalidOption {
            key: key.into(),
            message: message.into(),
        }
    }

    /// A data file that does not fit the task.
    pub fn dataset(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        TrainError::Dataset {
            path: path.into(),
            message: message.into(),
        }
    }

    /// A row (`path:line`) that does not fit the task.
    pub fn row(origin: impl Into<String>, message: impl Into<String>) -> Self {
        TrainError::Row {
            origin: origin.into(),
            message: message.into(),
        }
    }

    /// A damaged or unfitting checkpoint folder or file.
    pub fn checkpoint(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        TrainError::Checkpoint {
            path: path.into(),
            message: message.into(),
        }
    }

    /// A tokenizer error on the text of `origin`.
    pub fn encode(origin: impl Into<String>, source: whet_text::TextError) -> Self {
        TrainError::Encode {
            origin: origin.into(),
            source,
        }
    }
}

fn place(table: &str) -> String {
    if table.is_empty() {
        "at the top level of the recipe".to_string()
    } else {
        format!("in [{table}]")
    }
}

fn hint(closest: &Option<String>) -> String {
    closest
        .as_ref()
        .map(|c| format!("; the closest valid key is {c:?}"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_reads_as_before() {
        let e = TrainError::UnknownKey {
            key: "lora_alfa".into(),
            table: "lora".into(),
            closest: Some("lora_alpha".into()),
            valid: vec!["r".into(), "lora_alpha".into()],
        };
        assert_eq!(
            e.to_string(),
            "unknown key \"lora_alfa\" in [lora]; the closest valid key is \"lora_alpha\" \
             (valid keys: r, lora_alpha)"
        );
        let top = TrainError::UnknownKey {
            key: "x".into(),
            table: String::new(),
            closest: None,
            valid: vec![],
        };
        assert_eq!(
            top.to_string(),
            "unknown key \"x\" at the top level of the recipe (valid keys: )"
        );
    }

    #[test]
    fn non_finite_loss_names_the_step() {
        let e = TrainError::NonFiniteLoss {
            loss: "loss",
            step: 3,
            value: f64::NAN,
        };
        assert_eq!(
            e.to_string(),
            "the loss became NaN at step 3 (learning rate too high?); stopping"
        );
    }

    #[test]
    fn errors_cross_threads_for_anyhow() {
        fn send_sync<T: Send + Sync + 'static>() {}
        send_sync::<TrainError>();
    }
}
