//! LoRA (Hu et al. 2021, <https://arxiv.org/abs/2106.09685>) as `peft`'s `LoraConfig` and
//! `LoraModel` define it: adapters on the activations of the targeted linear layers,
//! `y = x W + b + dropout(x) A B · alpha / r` (or `alpha / sqrt(r)` with rsLoRA), `A` from
//! Kaiming-uniform and `B` zero so training starts from the base model.
//!
//! Files are `peft`'s: `adapter_config.json` and `adapter_model.safetensors` with keys
//! `base_model.model.<module>.lora_A.weight` (`[r, in]`), `.lora_B.weight` (`[out, r]`) and
//! `base_model.model.<param>` for `modules_to_save`.

use std::path::Path;

use burn::module::Param;
use burn::tensor::{Device, Distribution, Tensor};
use serde::{Deserialize, Serialize};
use whet_models::layers::{Linear, LinearWeight, LowRank};
use whet_models::{VisitParams, Visitor};

use crate::{
    AdapterReport, PeftError, Result, attach_each, collect_tensors, in_modules, matches_target,
    set_trainable, write_adapter,
};

/// LoRA hyper-parameters, named and defaulted as `peft.LoraConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// Rank of the update.
    #[serde(default = "default_r")]
    pub r: usize,
    /// Scale numerator.
    #[serde(default = "default_alpha")]
    pub lora_alpha: f64,
    /// Dropout on the adapter input.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Module names (or name suffixes) to adapt, e.g. `["query", "value"]`; empty in a
    /// recipe means peft's choice for the architecture.
    #[serde(default)]
    pub target_modules: Vec<String>,
    /// Which biases train: "none", "all" or "lora_only".
    #[serde(default = "default_bias")]
    pub bias: String,
    /// Modules trained in full and saved with the adapter (the classification head).
    #[serde(default)]
    pub modules_to_save: Vec<String>,
    /// Scale by `alpha / sqrt(r)` (rank-stabilised LoRA).
    #[serde(default)]
    pub use_rslora: bool,
}

fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    8.0
}
fn default_bias() -> String {
    "none".into()
}

impl LoraConfig {
    /// The factor applied to `x A B`.
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(PeftError::Config("lora r must be at least 1".into()));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(PeftError::Config(format!(
                "lora_dropout must be in [0, 1), got {}",
                self.lora_dropout
            )));
        }
        if !matches!(self.bias.as_str(), "none" | "all" | "lora_only") {
            return Err(PeftError::Config(format!(
                "lora bias must be \"none\", \"all\" or \"lora_only\", got {:?}",
                self.bias
            )));
        }
        if self.target_modules.is_empty() {
            return Err(PeftError::Config(
                "lora target_modules is empty: name the linear layers to adapt (e.g. [\"query\", \"value\"])"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// Attaches fresh LoRA adapters to the layers `config.target_modules` names, freezes every
/// other parameter except `modules_to_save` (and biases as `config.bias` says), and returns
/// the adapted modules and the parameter counts.
pub fn apply_lora<M: VisitParams>(
    model: &mut M,
    config: &LoraConfig,
    device: &Device,
) -> Result<AdapterReport> {
    config.validate()?;
    let targeted = attach_each(model, &mut |name, layer| {
        if !matches_target(name, &config.target_modules) {
            return false;
        }
        let (d_in, d_out) = layer.dims();
        let r = config.r;
        // kaiming_uniform_(a = sqrt(5)) on lora_A [r, in]: bound = 1 / sqrt(in)
        let bound = 1.0 / (d_in as f64).sqrt();
        layer.adapter = Some(LowRank {
            a: Param::from_tensor(whet_models::device::random(
                [d_in, r],
                Distribution::Uniform(-bound, bound),
                device,
            )),
            b: Param::from_tensor(Tensor::zeros([r, d_out], device)),
            scaling: config.scaling(),
            dropout: config.lora_dropout,
            enabled: true,
        });
        true
    });
    if targeted.is_empty() {
        return Err(crate::targets_not_found(
            model,
            "lora",
            &config.target_modules,
        ));
    }
    let trainable = |name: &str| {
        in_modules(name, &config.modules_to_save)
            || (name.ends_with(".bias")
                && match config.bias.as_str() {
                    "all" => true,
                    "lora_only" => in_modules(name, &targeted),
                    _ => false,
                })
    };
    set_trainable(model, &trainable);
    let counts = crate::count(model, &config.modules_to_save, &trainable);
    Ok(AdapterReport { targeted, counts })
}

/// The `adapter_config.json` peft writes, with whet's values.
fn adapter_config_json(
    config: &LoraConfig,
    base_model: &str,
    task_type: &str,
) -> serde_json::Value {
    serde_json::json!({
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": config.target_modules,
        "bias": config.bias,
        "modules_to_save": if config.modules_to_save.is_empty() { serde_json::Value::Null } else { serde_json::json!(config.modules_to_save) },
        "use_rslora": config.use_rslora,
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "use_dora": false,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
    })
}

/// Saves the adapters (and `modules_to_save`) of `model` as `peft` does, into `dir`.
pub fn save_adapter<M: VisitParams + Clone>(
    model: &M,
    config: &LoraConfig,
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

/// Folds every adapter into its base weight (`W += A B · scaling`) and removes it, as
/// `merge_and_unload` does. A quantised base weight is dequantised to f32 first (merging into
/// NF4 would round the update away); the names of those layers are returned so the caller can
/// say so.
pub fn merge_lora<M: VisitParams>(model: &mut M) -> Vec<String> {
    struct Merge(Vec<String>);
    impl Visitor for Merge {
        fn linear(&mut self, name: &str, layer: &mut Linear) -> bool {
            if let Some(a) = layer.adapter.take() {
                let device = a.a.val().device();
                if layer.is_quantized() {
                    self.0.push(name.to_string());
                }
                let merged = layer.dense_weight(&device) + a.delta();
                layer.weight = LinearWeight::Dense(Param::from_tensor(Tensor::from_data(
                    merged.into_data(),
                    &device,
                )));
            }
            true
        }
    }
    let mut m = Merge(vec![]);
    model.visit_params("", &mut m);
    m.0
}

/// Calls `f` with the module name and adapter of every adapted linear layer.
pub fn for_each_adapter<M: VisitParams>(model: &mut M, f: &mut dyn FnMut(&str, &mut LowRank)) {
    struct Each<'a>(&'a mut dyn FnMut(&str, &mut LowRank));
    impl Visitor for Each<'_> {
        fn linear(&mut self, name: &str, layer: &mut Linear) -> bool {
            if let Some(a) = &mut layer.adapter {
                (self.0)(name, a);
            }
            true
        }
    }
    model.visit_params("", &mut Each(f));
}
