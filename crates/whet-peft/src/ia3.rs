//! IA3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
//! In-Context Learning", <https://arxiv.org/abs/2205.05638>) as `peft`'s `IA3Config` and
//! `IA3Model` define it: one learned vector per targeted linear layer, scaling its output
//! (`y = base(x) ⊙ l`, keys and values) or, for `feedforward_modules`, its input
//! (`y = base(x ⊙ l)`); vectors start at one, so training starts from the base model.
//!
//! Files are `peft`'s: `adapter_config.json` (`peft_type = "IA3"`) and
//! `adapter_model.safetensors` with `base_model.model.<module>.ia3_l` of shape `[out, 1]`, or
//! `[1, in]` for feed-forward modules, and `base_model.model.<param>` for `modules_to_save`.

use std::path::Path;

use burn::module::Param;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};
use whet_models::layers::{Ia3, Linear, LinearWeight};
use whet_models::{VisitParams, Visitor};

use crate::AdapterReport;
use crate::{
    PeftError, Result, attach_each, collect_tensors, freeze_all_but, matches_target, write_adapter,
};

/// IA3 hyper-parameters, named and defaulted as `peft.IA3Config`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ia3Config {
    /// Module names (or name suffixes) to scale, e.g. `["key", "value", "output.dense"]`;
    /// empty in a recipe means peft's choice for the architecture.
    #[serde(default)]
    pub target_modules: Vec<String>,
    /// The targets whose input rather than output is scaled (a subset of `target_modules`,
    /// matched by suffix as peft does); None in a recipe means peft's choice.
    #[serde(default)]
    pub feedforward_modules: Option<Vec<String>>,
    /// Modules trained in full and saved with the adapter (the classification head).
    #[serde(default)]
    pub modules_to_save: Vec<String>,
    /// Start the vectors at one (peft's default); false draws them (for tests).
    #[serde(default = "yes")]
    pub init_ia3_weights: bool,
}

fn yes() -> bool {
    true
}

impl Ia3Config {
    fn validate(&self) -> Result<()> {
        if self.target_modules.is_empty() {
            return Err(PeftError::Config(
                "ia3 target_modules is empty: name the linear layers to scale (e.g. [\"key\", \"value\", \"output.dense\"])"
                    .into(),
            ));
        }
        if let Some(ff) = self
            .feedforward_modules
            .iter()
            .flatten()
            .find(|f| !self.target_modules.iter().any(|t| t == *f))
        {
            return Err(PeftError::Config(format!(
                "ia3 feedforward_modules {ff:?} is not in target_modules {:?} (peft requires a subset)",
                self.target_modules
            )));
        }
        Ok(())
    }

    /// peft's `is_feedforward`: the module name ends with one of `feedforward_modules`.
    fn is_feedforward(&self, module: &str) -> bool {
        self.feedforward_modules
            .iter()
            .flatten()
            .any(|k| module.ends_with(k.as_str()))
    }
}

/// Attaches IA3 vectors (ones) to the layers `config.target_modules` names, freezes every other
/// parameter except `modules_to_save`, and returns the scaled modules and the parameter counts.
pub fn apply_ia3<M: VisitParams>(
    model: &mut M,
    config: &Ia3Config,
    device: &Device,
) -> Result<AdapterReport> {
    config.validate()?;
    let targeted = attach_each(model, &mut |name, layer| {
        if !matches_target(name, &config.target_modules) {
            return false;
        }
        let (d_in, d_out) = layer.dims();
        let on_input = config.is_feedforward(name);
        let n = if on_input { d_in } else { d_out };
        let scale: Tensor<1> = if config.init_ia3_weights {
            Tensor::ones([n], device)
        } else {
            whet_models::device::random([n], burn::tensor::Distribution::Normal(1.0, 0.1), device)
        };
        // peft's shape: `[1, in]` for input scaling, `[out, 1]` otherwise.
        let shape = if on_input { [1, n] } else { [n, 1] };
        layer.ia3 = Some(Ia3 {
            scale: Param::from_tensor(scale.reshape(shape)),
            on_input,
            enabled: true,
        });
        true
    });
    if targeted.is_empty() {
        return Err(crate::targets_not_found(
            model,
            "ia3",
            &config.target_modules,
        ));
    }
    Ok(freeze_all_but(model, &config.modules_to_save, targeted))
}

fn adapter_config_json(config: &Ia3Config, base_model: &str, task_type: &str) -> serde_json::Value {
    serde_json::json!({
        "peft_type": "IA3",
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "target_modules": config.target_modules,
        "feedforward_modules": config.feedforward_modules,
        "modules_to_save": if config.modules_to_save.is_empty() { serde_json::Value::Null } else { serde_json::json!(config.modules_to_save) },
        "fan_in_fan_out": false,
        "init_ia3_weights": true,
        "inference_mode": true,
        "revision": null,
        "auto_mapping": null,
    })
}

/// Saves the IA3 vectors (and `modules_to_save`) of `model` as `peft` does, into `dir`.
pub fn save_adapter<M: VisitParams + Clone>(
    model: &M,
    config: &Ia3Config,
    base_model: &str,
    task_type: &str,
    dir: &Path,
) -> Result<()> {
    let tensors = collect_tensors(model, &config.modules_to_save);
    write_adapter(
        dir,
        &tensors,
        &adapter_config_json(config, base_model, task_type),
    )
}

/// Folds every IA3 vector into its layer and removes it, as peft's `merge_and_unload`: output
/// scaling multiplies the weight's output columns and the bias, input scaling the weight's input
/// rows. A quantised weight is dequantised first; those layers' names are returned.
pub fn merge_ia3<M: VisitParams>(model: &mut M) -> Vec<String> {
    struct Merge(Vec<String>);
    impl Visitor for Merge {
        fn linear(&mut self, name: &str, layer: &mut Linear) -> bool {
            if let Some(l) = layer.ia3.take() {
                let scale = l.vector();
                let device = scale.device();
                if layer.is_quantized() {
                    self.0.push(name.to_string());
                }
                // W is [in, out]: rows are inputs, columns outputs.
                let w = layer.dense_weight(&device);
                let merged = if l.on_input {
                    w * scale.clone().unsqueeze_dim::<2>(1)
                } else {
                    w * scale.clone().unsqueeze_dim::<2>(0)
                };
                layer.weight = LinearWeight::Dense(Param::from_tensor(Tensor::from_data(
                    merged.into_data(),
                    &device,
                )));
                if !l.on_input
                    && let Some(b) = &mut layer.bias
                {
                    let scaled = b.val() * scale;
                    *b = Param::from_tensor(Tensor::from_data(scaled.into_data(), &device))
                        .set_require_grad(b.val().is_require_grad());
                }
            }
            true
        }
    }
    let mut m = Merge(vec![]);
    model.visit_params("", &mut m);
    m.0
}
