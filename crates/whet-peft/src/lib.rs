//! Parameter-efficient fine-tuning for whet, attached from outside the model code.
//!
//! The models expose every parameter and every linear layer under its Hugging Face name
//! through [`VisitParams`]; this crate walks them to freeze the base, to attach LoRA adapters
//! to the layers `target_modules` names (matched as `peft` matches them), to count trainable
//! parameters as `peft` prints them, and to save and load adapters in `peft`'s file format.

pub mod lora;

pub use lora::{
    LoraConfig, LoraReport, apply_lora, for_each_adapter, load_adapter, merge_lora,
    read_adapter_config, save_adapter, set_adapters_enabled,
};

use burn::module::Param;
use burn::tensor::Tensor;
use whet_models::weights::Layout;
use whet_models::{VisitParams, Visitor};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum PeftError {
    /// The configuration cannot apply to this model.
    #[error("{0}")]
    Config(String),
    /// An adapter file is missing, malformed or does not fit the model.
    #[error("adapter {path}: {message}")]
    Adapter {
        path: std::path::PathBuf,
        message: String,
    },
    /// Model-side failure (reading or writing tensors).
    #[error(transparent)]
    Model(#[from] whet_models::ModelError),
}

/// Result alias for this crate.
pub type Result<T, E = PeftError> = std::result::Result<T, E>;

/// `peft`'s module-name matching for a list of `target_modules`: a module matches a key when
/// its name equals the key or ends with `"." + key`.
pub fn matches_target(module: &str, keys: &[String]) -> bool {
    keys.iter()
        .any(|k| module == k || module.ends_with(&format!(".{k}")))
}

/// Sets which parameters train: `trainable(name)` decides for each base parameter. Adapters
/// attached later are trainable by construction.
pub fn set_trainable<M: VisitParams>(model: &mut M, trainable: &dyn Fn(&str) -> bool) {
    struct Freeze<'a>(&'a dyn Fn(&str) -> bool);
    impl Visitor for Freeze<'_> {
        fn vector(&mut self, name: &str, p: &mut Param<Tensor<1>>) {
            *p = p.clone().set_require_grad((self.0)(name));
        }
        fn matrix(&mut self, name: &str, p: &mut Param<Tensor<2>>, _: Layout) {
            *p = p.clone().set_require_grad((self.0)(name));
        }
    }
    model.visit_params("", &mut Freeze(trainable));
}

/// Parameter counts as `peft`'s `get_nb_trainable_parameters` reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamCounts {
    pub trainable: usize,
    pub all: usize,
}

impl ParamCounts {
    /// `peft`'s `print_trainable_parameters` line.
    pub fn line(&self) -> String {
        format!(
            "trainable params: {} || all params: {} || trainable%: {:.4}",
            group(self.trainable),
            group(self.all),
            100.0 * self.trainable as f64 / self.all.max(1) as f64
        )
    }
}

fn group(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
