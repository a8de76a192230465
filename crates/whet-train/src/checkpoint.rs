//! Checkpoints that resume exactly: `checkpoint-N/` holds the trainable parameters (adapters and
//! head for LoRA, everything for full fine-tuning) in whet's layout, the optimizer moments, and
//! the trainer state (step, data position, running sums, best metric). The data order and the
//! dropout masks are functions of the seed and the step, so nothing else is needed to continue
//! where the run stopped. Written into a temporary folder and renamed, so a crash leaves either
//! the previous checkpoint or the new one, never half of one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use whet_models::weights::{
    Layout, SafetensorsSource, TensorSource, tensor_values, write_safetensors,
};
use whet_models::{VisitParams, Visitor};

use crate::error::{Result, TrainError};
use crate::optim::{Moments, Moments8, Optimizer};
use whet_models::quant::Blockwise8;

/// Where a run stands.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct TrainerState {
    pub global_step: usize,
    pub optimizer_steps: usize,
    pub loss_sum: f64,
    pub samples: usize,
    pub tokens: usize,
    /// Padded batch positions (absent in checkpoints of earlier versions).
    #[serde(default)]
    pub positions: usize,
    pub best_metric: Option<f64>,
    pub best_step: Option<usize>,
    pub patience_left: Option<usize>,
    /// fp16's loss scale, when the run has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scaler: Option<crate::scaler::LossScaler>,
}

/// Visits trainable parameters (those requiring gradients: adapters, heads, or all) with
/// mutable access.
fn for_trainable<M: VisitParams + ?Sized>(
    model: &mut M,
    f: &mut dyn FnMut(String, &mut dyn ParamSlot),
) {
    struct V<'a>(&'a mut dyn FnMut(String, &mut dyn ParamSlot));
    impl Visitor for V<'_> {
        fn vector(&mut self, name: &str, p: &mut Param<Tensor<1>>) {
            if p.val().is_require_grad() {
                (self.0)(name.to_string(), p);
            }
        }
        fn matrix(&mut self, name: &str, p: &mut Param<Tensor<2>>, _: Layout) {
            if p.val().is_require_grad() {
                (self.0)(name.to_string(), p);
            }
        }
    }
    model.visit_params("", &mut V(f));
}

/// A parameter of any rank, read and written as flat values.
trait ParamSlot {
    fn get(&self) -> (Vec<usize>, Vec<f32>);
    /// Err: the parameter's shape, which `values` do not fill.
    fn set(&mut self, values: Vec<f32>, device: &Device) -> Result<(), Vec<usize>>;
}

impl<const D: usize> ParamSlot for Param<Tensor<D>> {
    fn get(&self) -> (Vec<usize>, Vec<f32>) {
        let t = self.val();
        (t.dims().to_vec(), tensor_values(t.into_data()))
    }

    fn set(&mut self, values: Vec<f32>, device: &Device) -> Result<(), Vec<usize>> {
        let dims = self.val().dims();
        if dims.iter().product::<usize>() != values.len() {
            return Err(dims.to_vec());
        }
        let t = Tensor::<D>::from_data(
            TensorData::new(values, dims),
            &device.clone().without_autodiff(),
        );
        *self = Param::initialized(self.id, Tensor::from_inner(t).require_grad());
        Ok(())
    }
}

/// Fault injection for the crash tests: with `WHET_CRASH_AT=POINT:STEP` the process aborts, as
/// a kill would, at that point: `step` inside optimizer step STEP (parameters updated, the step
/// not yet counted), `save` halfway through writing checkpoint-STEP, `load` halfway through
/// reading it. Unset, it does nothing.
pub fn crash_point(point: &str, step: usize) {
    if std::env::var("WHET_CRASH_AT").is_ok_and(|v| v == format!("{point}:{step}")) {
        eprintln!("WHET_CRASH_AT={point}:{step}: aborting");
        std::process::abort();
    }
}

/// Writes `output_dir/checkpoint-<step>` atomically and prunes old checkpoints beyond `limit`
/// (never the best one).
pub fn save<M: VisitParams + ?Sized>(
    output_dir: &Path,
    model: &mut M,
    opt: &Optimizer,
    state: &TrainerState,
    limit: Option<usize>,
) -> Result<PathBuf> {
    let final_dir = output_dir.join(format!("checkpoint-{}", state.global_step));
    let tmp = output_dir.join(format!(
        ".checkpoint-{}.tmp-{}",
        state.global_step,
        std::process::id()
    ));
    // Half-written checkpoints of a killed run are never used: clear them.
    for e in std::fs::read_dir(output_dir)
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(".checkpoint-") && name.contains(".tmp-") {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    std::fs::create_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    let mut params = Vec::new();
    for_trainable(model, &mut |name, p| {
        let (s, v) = p.get();
        params.push((name, s, v));
    });
    write_safetensors(&tmp.join("trainable.safetensors"), &params, None)?;
    let mut moments = Vec::new();
    let mut names: Vec<&String> = opt.moments.keys().collect();
    names.sort();
    for name in names {
        let m = &opt.moments[name];
        for (k, t) in [("m", &m.m), ("v", &m.v)] {
            let n = t.dims()[0];
            moments.push((
                format!("{k}.{name}"),
                vec![n],
                tensor_values(t.clone().into_data()),
            ));
        }
    }
    // 8-bit moments as they are (codes stored as exact small floats), so a resumed run
    // continues from the same quantised state; moments on a GPU are read back here.
    let mut names: Vec<&String> = opt.moments8.keys().collect();
    names.sort();
    for name in names {
        let (m, v) = opt.moments8[name].to_host();
        for (k, b) in [("m8", &m), ("v8", &v)] {
            let codes: Vec<f32> = b.codes.iter().map(|&c| c as f32).collect();
            moments.push((format!("{k}.{name}"), vec![codes.len()], codes));
            moments.push((
                format!("{k}absmax.{name}"),
                vec![b.absmax.len()],
                b.absmax.clone(),
            ));
        }
    }
    crash_point("save", state.global_step);
    write_safetensors(&tmp.join("optimizer.safetensors"), &moments, None)?;
    let text = serde_json::to_string_pretty(state)?;
    whet_models::fsutil::write_atomic(&tmp.join("trainer_state.json"), text.as_bytes())?;
    let _ = std::fs::remove_dir_all(&final_dir);
    std::fs::rename(&tmp, &final_dir).map_err(|e| TrainError::io(&final_dir, e))?;
    if let Some(limit) = limit {
        let mut all = list(output_dir);
        all.retain(|(s, _)| Some(*s) != state.best_step);
        let excess = all.len().saturating_sub(limit.max(1));
        for (_, p) in all.into_iter().take(excess) {
            let _ = std::fs::remove_dir_all(p);
        }
    }
    Ok(final_dir)
}

/// Checkpoints of a run, oldest first.
pub fn list(output_dir: &Path) -> Vec<(usize, PathBuf)> {
    let mut out: Vec<(usize, PathBuf)> = std::fs::read_dir(output_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("checkpoint-")?.parse().ok()?;
            e.path()
                .join("trainer_state.json")
                .is_file()
                .then(|| (step, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// The newest complete checkpoint.
pub fn latest(output_dir: &Path) -> Option<PathBuf> {
    list(output_dir).pop().map(|(_, p)| p)
}

/// Restores parameters, optimizer and state from a checkpoint folder.
pub fn load<M: VisitParams + ?Sized>(
    dir: &Path,
    model: &mut M,
    opt: &mut Optimizer,
    device: &Device,
) -> Result<TrainerState> {
    let path = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&path).map_err(|e| TrainError::io(&path, e))?;
    let state: TrainerState =
        serde_json::from_str(&text).map_err(|source| TrainError::JsonFile { path, source })?;
    load_params(dir, model, device)?;
    crash_point("load", state.global_step);
    let moments = SafetensorsSource::open(&dir.join("optimizer.safetensors"))?;
    let mut m: HashMap<String, Moments> = HashMap::new();
    let plain = device.clone().without_autodiff();
    for key in moments.names() {
        let Some(name) = key.strip_prefix("m.") else {
            continue;
        };
        let read = |k: &str| -> Result<Tensor<1>> {
            let v = moments.read_f32(k)?;
            let n = v.len();
            Ok(Tensor::from_data(TensorData::new(v, [n]), &plain))
        };
        m.insert(
            current_name(name),
            Moments {
                m: read(&key)?,
                v: read(&format!("v.{name}"))?,
            },
        );
    }
    opt.moments = m;
    let mut q8 = HashMap::new();
    for key in moments.names() {
        let Some(name) = key.strip_prefix("m8.") else {
            continue;
        };
        let read = |k: &str, signed: bool| -> Result<Blockwise8> {
            let codes = moments.read_f32(&format!("{k}.{name}"))?;
            let absmax = moments.read_f32(&format!("{k}absmax.{name}"))?;
            // A damaged file must not become silently wrong moments.
            if codes
                .iter()
                .any(|&c| !(0.0..=255.0).contains(&c) || c.fract() != 0.0)
                || absmax.len() != codes.len().div_ceil(whet_models::quant::DQ_BLOCK)
            {
                return Err(TrainError::checkpoint(
                    dir.join("optimizer.safetensors"),
                    format!(
                        "8-bit optimizer state {k}.{name} is damaged ({} codes, {} block scales)",
                        codes.len(),
                        absmax.len()
                    ),
                ));
            }
            Ok(Blockwise8 {
                codes: codes.iter().map(|&c| c as u8).collect(),
                absmax,
                signed,
            })
        };
        // Back where the optimizer keeps them: on a GPU in its memory, unless paged.
        q8.insert(
            current_name(name),
            Moments8::from_host(
                read("m8", true)?,
                read("v8", false)?,
                opt.config.kind,
                &plain,
            ),
        );
    }
    opt.moments8 = q8;
    opt.step = state.optimizer_steps;
    Ok(state)
}

/// A parameter's name as this version spells it: checkpoints written before adapters were
/// parameters named LoRA's factors `<module>.lora_A` / `.lora_B`, now peft's
/// `<module>.lora_A.weight`.
fn current_name(name: &str) -> String {
    if name.ends_with(".lora_A") || name.ends_with(".lora_B") {
        format!("{name}.weight")
    } else {
        name.to_string()
    }
}

/// Restores the trainable parameters of a checkpoint (used for resuming and for loading the
/// best model at the end).
pub fn load_params<M: VisitParams + ?Sized>(
    dir: &Path,
    model: &mut M,
    device: &Device,
) -> Result<()> {
    let file = dir.join("trainable.safetensors");
    let src = SafetensorsSource::open(&file)?;
    let mut error = None;
    let mut used = 0;
    for_trainable(model, &mut |name, p| {
        if error.is_some() {
            return;
        }
        let stored = src.read_f32(&name).or_else(|e| {
            // Checkpoints before adapters were parameters named LoRA's factors without
            // `.weight`; they resume as they are.
            match name.strip_suffix(".weight") {
                Some(old) if old.ends_with(".lora_A") || old.ends_with(".lora_B") => {
                    src.read_f32(old)
                }
                _ => Err(e),
            }
        });
        match stored {
            Ok(v) => {
                let n = v.len();
                if let Err(dims) = p.set(v, device) {
                    error = Some(TrainError::checkpoint(
                        &file,
                        format!("tensor {name}: shape {dims:?} does not hold {n} values"),
                    ));
                }
                used += 1;
            }
            Err(_) => {
                error = Some(TrainError::checkpoint(
                    &file,
                    format!("no tensor {name} (another model or method?)"),
                ))
            }
        }
    });
    if let Some(e) = error {
        return Err(e);
    }
    if used != src.names().len() {
        return Err(TrainError::checkpoint(
            &file,
            format!("{} tensors, the model trains {used}", src.names().len()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::current_name;

    /// LoRA factors saved before adapters were parameters resume under peft's names; nothing
    /// else is renamed.
    #[test]
    fn old_lora_names_map_to_peft_names() {
        assert_eq!(
            current_name("model.layers.0.self_attn.q_proj.lora_A"),
            "model.layers.0.self_attn.q_proj.lora_A.weight"
        );
        assert_eq!(current_name("x.lora_B"), "x.lora_B.weight");
        for same in [
            "x.lora_A.weight",
            "x.ia3_l",
            "x.adapter_up.bias",
            "classifier.weight",
        ] {
            assert_eq!(current_name(same), same);
        }
    }
}
