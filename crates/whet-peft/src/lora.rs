//! LoRA (Hu et al. 2021, <https://arxiv.org/abs/2106.09685>) as `peft`'s `LoraConfig` and
//! `LoraModel` define it: adapters on the activations of the targeted linear layers,
//! `y = x W + b + dropout(x) A B · alpha / r` (or `alpha / sqrt(r)` with rsLoRA), `A` from
//! Kaiming-uniform and `B` zero so training starts from the base model.
//!
//! Files are `peft`'s: `adapter_config.json` and `adapter_model.safetensors` with keys
//! `base_model.model.<module>.lora_A.weight` (`[r, in]`), `.lora_B.weight` (`[out, r]`) and
//! `base_model.model.<param>` for `modules_to_save`.

use std::collections::HashMap;
use std::path::Path;

use burn::module::Param;
use burn::tensor::{Device, Distribution, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use whet_models::layers::{Linear, LowRank};
use whet_models::weights::{
    Layout, SafetensorsSource, TensorSource, tensor_values, write_safetensors,
};
use whet_models::{VisitParams, Visitor};

use crate::{ParamCounts, PeftError, Result, matches_target, set_trainable};

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
    /// Module names (or name suffixes) to adapt, e.g. `["query", "value"]`.
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

/// What [`apply_lora`] did.
#[derive(Debug, Clone)]
pub struct LoraReport {
    /// Names of the adapted modules.
    pub targeted: Vec<String>,
    /// Trainable and total parameters, counted as `peft` counts them.
    pub counts: ParamCounts,
}

/// Whether parameter `name` belongs to a module listed in `modules_to_save`. peft matches
/// these by plain suffix (`key.endswith(name)`), so "classifier" also takes DistilBERT's
/// `pre_classifier`; whet does the same so both train and save the same tensors.
fn in_modules(name: &str, modules: &[String]) -> bool {
    let module = name.rsplit_once('.').map(|(m, _)| m).unwrap_or(name);
    modules.iter().any(|k| module.ends_with(k.as_str()))
}

/// Attaches fresh LoRA adapters to the layers `config.target_modules` names, freezes every
/// other parameter except `modules_to_save` (and biases as `config.bias` says), and returns
/// the adapted modules and the parameter counts.
pub fn apply_lora<M: VisitParams>(
    model: &mut M,
    config: &LoraConfig,
    device: &Device,
) -> Result<LoraReport> {
    config.validate()?;
    struct Attach<'a> {
        config: &'a LoraConfig,
        device: &'a Device,
        targeted: Vec<String>,
    }
    impl Visitor for Attach<'_> {
        fn linear(&mut self, name: &str, layer: &mut Linear) -> bool {
            if matches_target(name, &self.config.target_modules) {
                let (d_in, d_out) = layer.dims();
                let r = self.config.r;
                // kaiming_uniform_(a = sqrt(5)) on lora_A [r, in]: bound = 1 / sqrt(in)
                let bound = 1.0 / (d_in as f64).sqrt();
                layer.adapter = Some(LowRank {
                    a: Param::from_tensor(Tensor::random(
                        [d_in, r],
                        Distribution::Uniform(-bound, bound),
                        self.device,
                    )),
                    b: Param::from_tensor(Tensor::zeros([r, d_out], self.device)),
                    scaling: self.config.scaling(),
                    dropout: self.config.lora_dropout,
                    enabled: true,
                });
                self.targeted.push(name.to_string());
            }
            true
        }
    }
    let mut attach = Attach {
        config,
        device,
        targeted: vec![],
    };
    model.visit_params("", &mut attach);
    if attach.targeted.is_empty() {
        return Err(PeftError::Config(format!(
            "target modules {:?} not found in the base model (linear layers are named like \
             \"encoder.layer.0.attention.self.query\")",
            config.target_modules
        )));
    }
    let targeted = attach.targeted;
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
    let counts = count(model, config, &trainable);
    Ok(LoraReport { targeted, counts })
}

/// Counts as `peft` does: adapters and trainable base parameters are trainable; "all" adds the
/// adapters and a second copy of every `modules_to_save` parameter (peft keeps the original
/// and trains a copy).
fn count<M: VisitParams>(
    model: &mut M,
    config: &LoraConfig,
    trainable: &dyn Fn(&str) -> bool,
) -> ParamCounts {
    struct Count<'a> {
        config: &'a LoraConfig,
        trainable: &'a dyn Fn(&str) -> bool,
        c: ParamCounts,
    }
    impl Count<'_> {
        fn add(&mut self, name: &str, n: usize) {
            self.c.all += n;
            if (self.trainable)(name) {
                self.c.trainable += n;
            }
            if in_modules(name, &self.config.modules_to_save) {
                self.c.all += n;
            }
        }
    }
    impl Visitor for Count<'_> {
        fn vector(&mut self, name: &str, p: &mut Param<Tensor<1>>) {
            self.add(name, p.shape().num_elements());
        }
        fn matrix(&mut self, name: &str, p: &mut Param<Tensor<2>>, _: Layout) {
            self.add(name, p.shape().num_elements());
        }
        fn linear(&mut self, _: &str, layer: &mut Linear) -> bool {
            if let Some(a) = &layer.adapter {
                let n = a.a.shape().num_elements() + a.b.shape().num_elements();
                self.c.all += n;
                self.c.trainable += n;
            }
            false
        }
    }
    let mut v = Count {
        config,
        trainable,
        c: ParamCounts {
            trainable: 0,
            all: 0,
        },
    };
    model.visit_params("", &mut v);
    v.c
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

const PREFIX: &str = "base_model.model.";

/// Saves the adapters (and `modules_to_save`) of `model` as `peft` does, into `dir`.
pub fn save_adapter<M: VisitParams + Clone>(
    model: &M,
    config: &LoraConfig,
    base_model: &str,
    task_type: &str,
    dir: &Path,
) -> Result<()> {
    struct Collect<'a> {
        config: &'a LoraConfig,
        out: Vec<(String, Vec<usize>, Vec<f32>)>,
    }
    impl Collect<'_> {
        fn push(&mut self, name: String, t: Tensor<2>) {
            let dims = t.dims().to_vec();
            self.out.push((name, dims, tensor_values(t.into_data())));
        }
    }
    impl Visitor for Collect<'_> {
        fn vector(&mut self, name: &str, p: &mut Param<Tensor<1>>) {
            if in_modules(name, &self.config.modules_to_save) {
                let t = p.val();
                let dims = t.dims().to_vec();
                self.out.push((
                    format!("{PREFIX}{name}"),
                    dims,
                    tensor_values(t.into_data()),
                ));
            }
        }
        fn matrix(&mut self, name: &str, p: &mut Param<Tensor<2>>, layout: Layout) {
            if in_modules(name, &self.config.modules_to_save) {
                let t = match layout {
                    Layout::Same => p.val(),
                    Layout::Transposed => p.val().transpose(),
                };
                self.push(format!("{PREFIX}{name}"), t);
            }
        }
        fn linear(&mut self, name: &str, layer: &mut Linear) -> bool {
            if let Some(a) = &layer.adapter {
                // whet holds A [in, r] and B [r, out]; peft stores lora_A [r, in], lora_B [out, r].
                self.push(
                    format!("{PREFIX}{name}.lora_A.weight"),
                    a.a.val().transpose(),
                );
                self.push(
                    format!("{PREFIX}{name}.lora_B.weight"),
                    a.b.val().transpose(),
                );
            }
            false
        }
    }
    let mut c = Collect {
        config,
        out: vec![],
    };
    model.clone().visit_params("", &mut c);
    std::fs::create_dir_all(dir).map_err(|e| PeftError::Adapter {
        path: dir.to_path_buf(),
        message: e.to_string(),
    })?;
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    write_safetensors(&dir.join("adapter_model.safetensors"), &c.out, Some(meta))?;
    let text = serde_json::to_string_pretty(&adapter_config_json(config, base_model, task_type))
        .map_err(|e| PeftError::Config(e.to_string()))?;
    whet_models::fsutil::write_atomic(&dir.join("adapter_config.json"), text.as_bytes())?;
    Ok(())
}

/// Reads `adapter_config.json` of a peft LoRA adapter folder.
pub fn read_adapter_config(dir: &Path) -> Result<LoraConfig> {
    let path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| PeftError::Adapter {
        path: path.clone(),
        message: e.to_string(),
    })?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| PeftError::Adapter {
        path: path.clone(),
        message: e.to_string(),
    })?;
    let peft_type = json
        .get("peft_type")
        .and_then(|v| v.as_str())
        .unwrap_or("LORA");
    if peft_type != "LORA" {
        return Err(PeftError::Adapter {
            path,
            message: format!("peft_type {peft_type:?} is not supported here (LORA is)"),
        });
    }
    let mut json = json;
    // peft writes null for "no modules to save" and may write a set-like list order.
    if json.get("modules_to_save").is_some_and(|v| v.is_null()) {
        json["modules_to_save"] = serde_json::json!([]);
    }
    serde_json::from_value(json).map_err(|e| PeftError::Adapter {
        path,
        message: e.to_string(),
    })
}

/// Loads a peft LoRA adapter folder onto `model`: attaches adapters as the config says and
/// fills them (and the `modules_to_save` tensors) from `adapter_model.safetensors`.
pub fn load_adapter<M: VisitParams>(
    model: &mut M,
    dir: &Path,
    device: &Device,
) -> Result<LoraConfig> {
    let mut config = read_adapter_config(dir)?;
    let file = dir.join("adapter_model.safetensors");
    let source = SafetensorsSource::open(&file)?;
    // peft adds the head of a SEQ_CLS model to modules_to_save itself; the saved keys say
    // which base tensors the adapter replaces.
    for name in source.names() {
        if let Some(rest) = name.strip_prefix(PREFIX)
            && !rest.contains(".lora_")
            && let Some((module, _)) = rest.rsplit_once('.')
            && !config
                .modules_to_save
                .iter()
                .any(|k| module.ends_with(k.as_str()))
        {
            config.modules_to_save.push(module.to_string());
        }
    }
    apply_lora(model, &config, device)?;
    struct Fill<'a> {
        source: &'a SafetensorsSource,
        device: &'a Device,
        used: usize,
        error: Option<PeftError>,
        file: &'a Path,
    }
    impl Fill<'_> {
        fn read(&mut self, key: &str, shape: [usize; 2]) -> Option<Tensor<2>> {
            let got = self.source.shape(key)?;
            if got != shape {
                self.error.get_or_insert(PeftError::Adapter {
                    path: self.file.to_path_buf(),
                    message: format!("tensor {key} has shape {got:?}, the model needs {shape:?}"),
                });
                return None;
            }
            let values = self.source.read_f32(key).ok()?;
            self.used += 1;
            Some(Tensor::from_data(
                TensorData::new(values, shape),
                self.device,
            ))
        }
    }
    impl Visitor for Fill<'_> {
        fn vector(&mut self, name: &str, p: &mut Param<Tensor<1>>) {
            let key = format!("{PREFIX}{name}");
            if let Some(shape) = self.source.shape(&key) {
                let n = p.shape().num_elements();
                if shape != [n] {
                    self.error.get_or_insert(PeftError::Adapter {
                        path: self.file.to_path_buf(),
                        message: format!("tensor {key} has shape {shape:?}, the model needs [{n}]"),
                    });
                    return;
                }
                if let Ok(v) = self.source.read_f32(&key) {
                    self.used += 1;
                    let t = Tensor::from_data(TensorData::new(v, [n]), self.device);
                    *p = Param::from_tensor(t).set_require_grad(p.val().is_require_grad());
                }
            }
        }
        fn matrix(&mut self, name: &str, p: &mut Param<Tensor<2>>, layout: Layout) {
            let key = format!("{PREFIX}{name}");
            let [a, b] = p.shape().dims();
            let stored = match layout {
                Layout::Same => [a, b],
                Layout::Transposed => [b, a],
            };
            if let Some(t) = self.read(&key, stored) {
                let t = if layout == Layout::Transposed {
                    t.transpose()
                } else {
                    t
                };
                // Re-laid out on the host: see Weights::tensor_transposed.
                let t = Tensor::from_data(t.into_data(), self.device);
                *p = Param::from_tensor(t).set_require_grad(p.val().is_require_grad());
            }
        }
        fn linear(&mut self, name: &str, layer: &mut Linear) -> bool {
            let (d_in, d_out) = layer.dims();
            if let Some(ad) = &mut layer.adapter {
                let r = ad.a.shape().dims::<2>()[1];
                let a = self.read(&format!("{PREFIX}{name}.lora_A.weight"), [r, d_in]);
                let b = self.read(&format!("{PREFIX}{name}.lora_B.weight"), [d_out, r]);
                match (a, b) {
                    (Some(a), Some(b)) => {
                        ad.a = Param::from_tensor(Tensor::from_data(
                            a.transpose().into_data(),
                            self.device,
                        ));
                        ad.b = Param::from_tensor(Tensor::from_data(
                            b.transpose().into_data(),
                            self.device,
                        ));
                    }
                    _ => {
                        self.error.get_or_insert(PeftError::Adapter {
                            path: self.file.to_path_buf(),
                            message: format!("no lora_A / lora_B weights for module {name}"),
                        });
                    }
                }
            }
            false
        }
    }
    let mut fill = Fill {
        source: &source,
        device,
        used: 0,
        error: None,
        file: &file,
    };
    model.visit_params("", &mut fill);
    if let Some(e) = fill.error {
        return Err(e);
    }
    let used = fill.used;
    let total = source.names().len();
    if used != total {
        return Err(PeftError::Adapter {
            path: file,
            message: format!(
                "{} of its {total} tensors match no module of the model (was it trained on another base?)",
                total - used
            ),
        });
    }
    Ok(config)
}

/// Folds every adapter into its base weight (`W += A B · scaling`) and removes it, as
/// `merge_and_unload` does.
pub fn merge_lora<M: VisitParams>(model: &mut M) {
    struct Merge;
    impl Visitor for Merge {
        fn linear(&mut self, _: &str, layer: &mut Linear) -> bool {
            if let Some(a) = layer.adapter.take() {
                let merged = layer.weight.val() + a.delta();
                let device = merged.device();
                layer.weight = Param::from_tensor(Tensor::from_data(merged.into_data(), &device));
            }
            true
        }
    }
    model.visit_params("", &mut Merge);
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

/// Switches every adapter on or off (peft's `disable_adapter` context).
pub fn set_adapters_enabled<M: VisitParams>(model: &mut M, enabled: bool) {
    for_each_adapter(model, &mut |_, a| a.enabled = enabled);
}
