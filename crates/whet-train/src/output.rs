//! What every task saves the same way: a full model's weights under their Hugging Face names,
//! an adapter (LoRA, IA3) in `peft`'s format, and parameter counts.

use std::path::Path;

use crate::error::Result;
use whet_models::{ExportParams, VisitParams};
use whet_peft::PeftConfig;

/// Values in the parameters whose name `keep` accepts.
pub fn param_count<M: ExportParams>(model: &M, keep: &dyn Fn(&str) -> bool) -> usize {
    model
        .named_params()
        .iter()
        .filter(|p| keep(&p.name))
        .map(|p| p.to_checkpoint_values().0.iter().product::<usize>())
        .sum()
}

/// `out/model.safetensors`: every parameter under its `transformers` name and layout.
pub fn save_weights<M: ExportParams>(model: &M, out: &Path) -> Result<()> {
    let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = model
        .named_params()
        .iter()
        .map(|np| {
            let (s, v) = np.to_checkpoint_values();
            (np.name.clone(), s, v)
        })
        .collect();
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    whet_models::weights::write_safetensors(&out.join("model.safetensors"), &tensors, Some(meta))?;
    Ok(())
}

/// `adapter_config.json` + `adapter_model.safetensors` with `peft`'s `task_type`, naming the
/// base model by its absolute path.
pub fn save_adapter<M: VisitParams + Clone>(
    model: &M,
    config: &PeftConfig,
    base_model: &Path,
    task_type: &str,
    out: &Path,
) -> Result<()> {
    let base = base_model
        .canonicalize()
        .unwrap_or(base_model.to_path_buf());
    config.save(model, &base.to_string_lossy(), task_type, out)?;
    Ok(())
}
