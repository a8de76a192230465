//! Parameter-efficient fine-tuning for whet, attached from outside the model code.
//!
//! The models expose every parameter and every linear layer under its Hugging Face name
//! through [`VisitParams`]; this crate walks them to freeze the base, to attach adapters
//! (LoRA in [`lora`], IA3 in [`ia3`]) to the layers `target_modules` names (matched as `peft`
//! matches them), to count trainable parameters as `peft` prints them, and to save and load
//! adapters in `peft`'s file format ([`PeftConfig`] dispatches on `peft_type`).

pub mod bottleneck;
pub mod defaults;
pub mod ia3;
pub mod lora;
pub mod prompt;

pub use bottleneck::{BottleneckConfig, BottleneckKind, apply_bottleneck};
pub use ia3::{Ia3Config, apply_ia3, merge_ia3};
pub use lora::{LoraConfig, apply_lora, for_each_adapter, merge_lora, save_adapter};
pub use prompt::{PrefixTuningConfig, PromptConfig, PromptInit, PromptTuningConfig, apply_prompt};

use std::collections::HashMap;
use std::path::Path;

use burn::module::Param;
use burn::tensor::{Device, Tensor, TensorData};
use whet_models::layers::{Linear, is_adapter_param};
use whet_models::weights::{Layout, SafetensorsSource, TensorSource, write_safetensors};
use whet_models::{ExportParams, VisitParams, Visitor};

/// An adapter method's configuration, as `peft` writes it in `adapter_config.json`.
#[derive(Debug, Clone, PartialEq)]
pub enum PeftConfig {
    /// `peft_type = "LORA"`.
    Lora(LoraConfig),
    /// `peft_type = "IA3"`.
    Ia3(Ia3Config),
    /// whet's `peft_type = "BOTTLENECK"` (Houlsby / Pfeiffer adapters; peft has none).
    Bottleneck(BottleneckConfig),
    /// `peft_type = "PREFIX_TUNING"` or `"PROMPT_TUNING"` (virtual tokens).
    Prompt(PromptConfig),
}

impl PeftConfig {
    /// Attaches fresh adapters and freezes the rest (see [`apply_lora`], [`apply_ia3`]).
    pub fn apply<M: VisitParams>(&self, model: &mut M, device: &Device) -> Result<AdapterReport> {
        match self {
            PeftConfig::Lora(c) => apply_lora(model, c, device),
            PeftConfig::Ia3(c) => apply_ia3(model, c, device),
            PeftConfig::Bottleneck(c) => apply_bottleneck(model, c, device),
            PeftConfig::Prompt(c) => apply_prompt(model, c, device),
        }
    }

    /// Saves the adapters of `model` in `peft`'s format into `dir`.
    pub fn save<M: VisitParams + Clone>(
        &self,
        model: &M,
        base_model: &str,
        task_type: &str,
        dir: &Path,
    ) -> Result<()> {
        match self {
            PeftConfig::Lora(c) => lora::save_adapter(model, c, base_model, task_type, dir),
            PeftConfig::Ia3(c) => ia3::save_adapter(model, c, base_model, task_type, dir),
            PeftConfig::Bottleneck(c) => {
                bottleneck::save_adapter(model, c, base_model, task_type, dir)
            }
            PeftConfig::Prompt(c) => prompt::save_adapter(model, c, base_model, task_type, dir),
        }
    }

    /// The modules trained in full and saved with the adapter.
    pub fn modules_to_save_mut(&mut self) -> &mut Vec<String> {
        match self {
            PeftConfig::Lora(c) => &mut c.modules_to_save,
            PeftConfig::Ia3(c) => &mut c.modules_to_save,
            PeftConfig::Bottleneck(c) => &mut c.modules_to_save,
            PeftConfig::Prompt(PromptConfig::Prefix(c)) => &mut c.modules_to_save,
            PeftConfig::Prompt(PromptConfig::Prompt(c)) => &mut c.modules_to_save,
        }
    }

    /// `peft_type` as peft spells it.
    pub fn peft_type(&self) -> &'static str {
        match self {
            PeftConfig::Lora(_) => "LORA",
            PeftConfig::Ia3(_) => "IA3",
            PeftConfig::Bottleneck(_) => "BOTTLENECK",
            PeftConfig::Prompt(PromptConfig::Prefix(_)) => "PREFIX_TUNING",
            PeftConfig::Prompt(PromptConfig::Prompt(_)) => "PROMPT_TUNING",
        }
    }

    /// Whether the method adds virtual tokens (prefix or prompt tuning) rather than changing
    /// layers: nothing to merge, and packed rows cannot take it.
    pub fn is_prompt_learning(&self) -> bool {
        matches!(self, PeftConfig::Prompt(_))
    }
}

/// Reads `adapter_config.json` of a peft adapter folder (LoRA or IA3).
pub fn read_adapter_config(dir: &Path) -> Result<PeftConfig> {
    let path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| PeftError::Adapter {
        path: path.clone(),
        message: e.to_string(),
    })?;
    let mut json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| PeftError::Adapter {
            path: path.clone(),
            message: e.to_string(),
        })?;
    // peft writes null for "no modules to save" (and for IA3's default feedforward modules).
    for key in ["modules_to_save", "feedforward_modules"] {
        if json.get(key).is_some_and(|v| v.is_null()) {
            json[key] = serde_json::json!([]);
        }
    }
    let bad = |e: serde_json::Error| PeftError::Adapter {
        path: path.clone(),
        message: e.to_string(),
    };
    let peft_type = json
        .get("peft_type")
        .and_then(|v| v.as_str())
        .unwrap_or("LORA")
        .to_string();
    match peft_type.as_str() {
        "LORA" => Ok(PeftConfig::Lora(serde_json::from_value(json).map_err(bad)?)),
        "IA3" => Ok(PeftConfig::Ia3(serde_json::from_value(json).map_err(bad)?)),
        "BOTTLENECK" => Ok(PeftConfig::Bottleneck(
            serde_json::from_value(json).map_err(bad)?,
        )),
        "PREFIX_TUNING" | "PROMPT_TUNING" => Ok(PeftConfig::Prompt(
            prompt::from_json(&peft_type, json).map_err(bad)?,
        )),
        other => Err(PeftError::Adapter {
            path,
            message: format!(
                "peft_type {other:?} is not supported (LORA, IA3, PREFIX_TUNING, PROMPT_TUNING \
                 and whet's BOTTLENECK are)"
            ),
        }),
    }
}

/// Loads a peft adapter folder (LoRA or IA3) onto `model`: attaches adapters as the config says
/// and fills them (and the `modules_to_save` tensors) from `adapter_model.safetensors`.
pub fn load_adapter<M: VisitParams>(
    model: &mut M,
    dir: &Path,
    device: &Device,
) -> Result<PeftConfig> {
    let mut config = read_adapter_config(dir)?;
    let file = dir.join("adapter_model.safetensors");
    let source = SafetensorsSource::open(&file)?;
    // peft adds the head of a SEQ_CLS model to modules_to_save itself; the saved keys say
    // which base tensors the adapter replaces.
    if config.is_prompt_learning() {
        let modules = config.modules_to_save_mut();
        for m in prompt::saved_modules(&source) {
            if !modules.iter().any(|k| m.ends_with(k.as_str())) {
                modules.push(m);
            }
        }
    }
    for name in source.names() {
        if let Some(rest) = name.strip_prefix(PREFIX)
            && !is_adapter_param(rest)
            && let Some((module, _)) = rest.rsplit_once('.')
        {
            let modules = config.modules_to_save_mut();
            if !modules.iter().any(|k| module.ends_with(k.as_str())) {
                modules.push(module.to_string());
            }
        }
    }
    match &config {
        PeftConfig::Prompt(c) => {
            // The saved embeddings replace the start at once, so it is drawn, whatever it was.
            let mut start = c.clone();
            if let PromptConfig::Prompt(p) = &mut start {
                p.prompt_tuning_init = PromptInit::Random;
            }
            apply_prompt(model, &start, device)?;
        }
        _ => {
            config.apply(model, device)?;
        }
    }
    let mut reader = Reader {
        source: &source,
        device,
        used: 0,
        error: None,
        file: &file,
    };
    match &config {
        PeftConfig::Prompt(c) => {
            prompt::fill_embeddings(model, c, &mut reader)?;
            // Prompt learning saves the head under `base_model.`, without `model.`.
            fill(model, &mut reader, prompt::PROMPT_PREFIX);
        }
        _ => fill(model, &mut reader, PREFIX),
    }
    if let Some(e) = reader.error {
        return Err(e);
    }
    check_all_used(&file, reader.used, source.names().len())?;
    Ok(config)
}

/// An adapter file whose tensors were not all used was made for another model.
fn check_all_used(file: &Path, used: usize, total: usize) -> Result<()> {
    if used != total {
        return Err(PeftError::Adapter {
            path: file.to_path_buf(),
            message: format!(
                "{} of its {total} tensors match no module of the model (was it trained on another base?)",
                total - used
            ),
        });
    }
    Ok(())
}

/// Offers every linear layer of `model` to `attach`, which returns whether it attached an
/// adapter; returns the names of the adapted layers (the visiting shared by every method).
pub(crate) fn attach_each<M: VisitParams>(
    model: &mut M,
    attach: &mut dyn FnMut(&str, &mut Linear) -> bool,
) -> Vec<String> {
    struct Attach<'a> {
        attach: &'a mut dyn FnMut(&str, &mut Linear) -> bool,
        targeted: Vec<String>,
    }
    impl Visitor for Attach<'_> {
        fn linear(&mut self, name: &str, layer: &mut Linear) -> bool {
            if (self.attach)(name, layer) {
                self.targeted.push(name.to_string());
            }
            true
        }
    }
    let mut a = Attach {
        attach,
        targeted: vec![],
    };
    model.visit_params("", &mut a);
    a.targeted
}

/// The error for target modules that match no linear layer of `model`, naming the model's own
/// linear layers: the distinct last parts of their names (what `target_modules` matches) and
/// one full name, as they differ between families (BERT's `query`, GPT-2's `c_attn`, LLaMA's
/// `q_proj`).
pub(crate) fn targets_not_found<M: VisitParams>(
    model: &mut M,
    method: &str,
    targets: &[String],
) -> PeftError {
    let mut names = Vec::new();
    attach_each(model, &mut |name, _| {
        names.push(name.to_string());
        false
    });
    let mut last_parts: Vec<&str> = Vec::new();
    for name in &names {
        let last = name.rsplit('.').next().unwrap_or(name);
        if !last_parts.contains(&last) {
            last_parts.push(last);
        }
    }
    let example = names
        .first()
        .map_or(String::new(), |n| format!(", e.g. \"{n}\""));
    PeftError::Config(format!(
        "{method} target modules {targets:?} not found in the base model: its linear layers are \
         named {}{example}",
        last_parts.join(", ")
    ))
}

/// Freezes every base parameter except `modules_to_save` and counts as peft does (the adapters
/// attached before are trainable by construction).
pub(crate) fn freeze_all_but<M: VisitParams>(
    model: &mut M,
    modules_to_save: &[String],
    targeted: Vec<String>,
) -> AdapterReport {
    let trainable = |name: &str| in_modules(name, modules_to_save);
    set_trainable(model, &trainable);
    let counts = count(model, modules_to_save, &trainable);
    AdapterReport { targeted, counts }
}

/// Key prefix of every tensor in a peft adapter file.
pub(crate) const PREFIX: &str = "base_model.model.";

/// Whether parameter `name` belongs to a module listed in `modules_to_save`. peft matches
/// these by plain suffix (`key.endswith(name)`), so "classifier" also takes DistilBERT's
/// `pre_classifier`; whet does the same so both train and save the same tensors.
pub(crate) fn in_modules(name: &str, modules: &[String]) -> bool {
    let module = name.rsplit_once('.').map(|(m, _)| m).unwrap_or(name);
    modules.iter().any(|k| module.ends_with(k.as_str()))
}

/// One tensor for an adapter file: key, shape, row-major values.
pub(crate) type SavedTensor = (String, Vec<usize>, Vec<f32>);

/// The tensors of an adapter file: the adapters' parameters and the `modules_to_save`
/// parameters, under `base_model.model.<name>` in checkpoint layout.
pub(crate) fn collect_tensors<M: VisitParams + Clone>(
    model: &M,
    modules_to_save: &[String],
) -> Vec<SavedTensor> {
    model
        .named_params()
        .iter()
        .filter(|p| is_adapter_param(&p.name) || in_modules(&p.name, modules_to_save))
        .map(|p| {
            let (dims, values) = p.to_checkpoint_values();
            (format!("{PREFIX}{}", p.name), dims, values)
        })
        .collect()
}

/// Writes `adapter_model.safetensors` and `adapter_config.json` into `dir`.
pub(crate) fn write_adapter(
    dir: &Path,
    tensors: &[SavedTensor],
    config: &serde_json::Value,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| PeftError::Adapter {
        path: dir.to_path_buf(),
        message: e.to_string(),
    })?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    write_safetensors(&dir.join("adapter_model.safetensors"), tensors, Some(meta))?;
    let text =
        serde_json::to_string_pretty(config).map_err(|e| PeftError::Config(e.to_string()))?;
    whet_models::fsutil::write_atomic(&dir.join("adapter_config.json"), text.as_bytes())?;
    Ok(())
}

/// Reads an adapter file's tensors with their shapes checked, counting those used.
pub(crate) struct Reader<'a> {
    source: &'a SafetensorsSource,
    device: &'a Device,
    used: usize,
    error: Option<PeftError>,
    file: &'a Path,
}

impl Reader<'_> {
    /// Records the first error.
    pub(crate) fn fail(&mut self, message: String) {
        self.error.get_or_insert(PeftError::Adapter {
            path: self.file.to_path_buf(),
            message,
        });
    }

    /// The tensor `key` as `shape` (stored order), if present with that shape.
    pub(crate) fn read<const D: usize>(
        &mut self,
        key: &str,
        shape: [usize; D],
    ) -> Option<Tensor<D>> {
        let got = self.source.shape(key)?;
        if got != shape {
            self.fail(format!(
                "tensor {key} has shape {got:?}, the model needs {shape:?}"
            ));
            return None;
        }
        match self.source.read_f32(key) {
            Ok(values) => {
                self.used += 1;
                Some(Tensor::from_data(
                    TensorData::new(values, shape),
                    self.device,
                ))
            }
            Err(e) => {
                self.fail(e.to_string());
                None
            }
        }
    }

    /// The device tensors are made on.
    pub(crate) fn device(&self) -> &Device {
        self.device
    }
}

/// Fills the parameters the file holds (adapters and `modules_to_save`, under
/// `<prefix><name>`) from the reader; an adapter parameter the file lacks is an error.
fn fill<M: VisitParams>(model: &mut M, reader: &mut Reader, prefix: &str) {
    struct Fill<'a, 'b> {
        reader: &'a mut Reader<'b>,
        prefix: &'a str,
    }
    impl Fill<'_, '_> {
        /// The stored tensor for parameter `name` of stored shape `shape`, if the file has it.
        fn read<const D: usize>(&mut self, name: &str, shape: [usize; D]) -> Option<Tensor<D>> {
            let key = format!("{}{name}", self.prefix);
            if self.reader.source.shape(&key).is_none() {
                if is_adapter_param(name) {
                    self.reader
                        .fail(format!("no tensor {key} for the adapter of this model"));
                }
                return None;
            }
            self.reader.read(&key, shape)
        }
    }
    impl Visitor for Fill<'_, '_> {
        fn vector(&mut self, name: &str, p: &mut Param<Tensor<1>>) {
            let n = p.shape().num_elements();
            if let Some(t) = self.read(name, [n]) {
                *p = Param::from_tensor(t).set_require_grad(p.val().is_require_grad());
            }
        }
        fn matrix(&mut self, name: &str, p: &mut Param<Tensor<2>>, layout: Layout) {
            let [a, b] = p.shape().dims();
            let stored = match layout {
                Layout::Same => [a, b],
                Layout::Transposed => [b, a],
            };
            if let Some(t) = self.read(name, stored) {
                let t = if layout == Layout::Transposed {
                    t.transpose()
                } else {
                    t
                };
                // Re-laid out on the host: see Weights::tensor_transposed.
                let t = Tensor::from_data(t.into_data(), self.reader.device());
                *p = Param::from_tensor(t).set_require_grad(p.val().is_require_grad());
            }
        }
    }
    model.visit_params("", &mut Fill { reader, prefix });
}

/// What attaching an adapter did.
#[derive(Debug, Clone)]
pub struct AdapterReport {
    /// Names of the adapted modules.
    pub targeted: Vec<String>,
    /// Trainable and total parameters, counted as `peft` counts them.
    pub counts: ParamCounts,
}

/// Counts as `peft` does: adapters and trainable base parameters are trainable; "all" adds the
/// adapters and a second copy of every `modules_to_save` parameter (peft keeps the original
/// and trains a copy).
pub(crate) fn count<M: VisitParams>(
    model: &mut M,
    modules_to_save: &[String],
    trainable: &dyn Fn(&str) -> bool,
) -> ParamCounts {
    struct Count<'a> {
        modules_to_save: &'a [String],
        trainable: &'a dyn Fn(&str) -> bool,
        c: ParamCounts,
    }
    impl Count<'_> {
        fn add(&mut self, name: &str, n: usize) {
            self.c.all += n;
            if is_adapter_param(name) || (self.trainable)(name) {
                self.c.trainable += n;
            }
            if in_modules(name, self.modules_to_save) {
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
        fn quantized(&mut self, _: &str, m: &whet_models::quant::QuantMatrix) {
            // Counted as the weights it stands for (peft counts a bitsandbytes 4-bit tensor by
            // its logical size too: numel × 2 of the packed bytes).
            self.c.all += m.num_elements();
        }
    }
    let mut v = Count {
        modules_to_save,
        trainable,
        c: ParamCounts {
            trainable: 0,
            all: 0,
        },
    };
    model.visit_params("", &mut v);
    v.c
}

/// Switches every adapter (LoRA, IA3, bottleneck, virtual tokens) on or off (peft's
/// `disable_adapter` context).
pub fn set_adapters_enabled<M: VisitParams>(model: &mut M, enabled: bool) {
    prompt::set_enabled(model, enabled);
    struct Switch(bool);
    impl Visitor for Switch {
        fn linear(&mut self, _: &str, layer: &mut Linear) -> bool {
            if let Some(a) = &mut layer.adapter {
                a.enabled = self.0;
            }
            if let Some(l) = &mut layer.ia3 {
                l.enabled = self.0;
            }
            if let Some(b) = &mut layer.bottleneck {
                b.enabled = self.0;
            }
            true
        }
    }
    model.visit_params("", &mut Switch(enabled));
}

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

/// Sets which parameters train: `trainable(name)` decides for each base parameter; the
/// parameters of attached adapters always train.
pub fn set_trainable<M: VisitParams>(model: &mut M, trainable: &dyn Fn(&str) -> bool) {
    struct Freeze<'a>(&'a dyn Fn(&str) -> bool);
    impl Freeze<'_> {
        fn trains(&self, name: &str) -> bool {
            is_adapter_param(name) || (self.0)(name)
        }
    }
    impl Visitor for Freeze<'_> {
        fn vector(&mut self, name: &str, p: &mut Param<Tensor<1>>) {
            *p = p.clone().set_require_grad(self.trains(name));
        }
        fn matrix(&mut self, name: &str, p: &mut Param<Tensor<2>>, _: Layout) {
            *p = p.clone().set_require_grad(self.trains(name));
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
