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
/// base model as the recipe gave it when it is a Hub repo id (with its `revision`, as peft
/// writes them), else by its absolute path.
pub fn save_adapter<M: VisitParams + Clone>(
    model: &M,
    config: &PeftConfig,
    recipe: &crate::Recipe,
    task_type: &str,
    out: &Path,
) -> Result<()> {
    config.save(model, &recipe.base_model_name(), task_type, out)?;
    if let Some(revision) = &recipe.revision {
        let path = out.join("adapter_config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| crate::TrainError::io(&path, e))?;
        let mut json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| crate::TrainError::Recipe(format!("{}: {e}", path.display())))?;
        json["revision"] = serde_json::Value::String(revision.clone());
        let text = serde_json::to_string_pretty(&json).unwrap_or_default();
        whet_models::fsutil::write_atomic(&path, text.as_bytes())?;
    }
    Ok(())
}
