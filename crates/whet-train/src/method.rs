//! The recipe's method applied to a loaded model the same way for every task: full training,
//! the task's head (what counts as the head, and the top layers, is the task's to say), or an
//! adapter (LoRA, QLoRA, IA3, bottleneck, prefix or prompt tuning) over a frozen base, possibly
//! quantised, saved with the task's head modules.

use burn::tensor::Device;
use whet_models::{ExportParams, QuantPolicy, TextTokenizer, VisitParams};
use whet_peft::{ParamCounts, PeftConfig, PromptConfig, PromptInit, set_trainable};

use crate::error::{Result, TrainError};
use crate::recipe::{Method, Recipe};

/// Which linear layers the loader keeps quantised for this recipe: every layer of the base
/// except the task's head modules and `modules_to_save`, as `BitsAndBytesConfig` leaves the
/// output head in full precision. None when the recipe quantises nothing.
pub fn quant_policy(recipe: &Recipe, head_modules: &[&str]) -> Option<QuantPolicy> {
    let spec = recipe.quant_spec()?;
    let mut skip: Vec<String> = head_modules.iter().map(|s| s.to_string()).collect();
    skip.push("lm_head".into());
    if let Some(c) = adapter_config(recipe, &[]) {
        let mut c = c;
        skip.append(c.modules_to_save_mut());
    }
    Some(QuantPolicy { spec, skip })
}

/// The adapter configuration of an adapter method, with the task's head modules added to
/// `modules_to_save` (as peft's `task_type` does); None for full and head training.
pub fn adapter_config(recipe: &Recipe, head_modules: &[&str]) -> Option<PeftConfig> {
    let mut config = match recipe.method {
        Method::Lora | Method::Qlora => PeftConfig::Lora(recipe.lora.clone()?),
        Method::Ia3 => PeftConfig::Ia3(recipe.ia3.clone()?),
        // The defaults (Houlsby, reduction 16, ReLU) need no table.
        Method::Bottleneck => PeftConfig::Bottleneck(recipe.bottleneck.clone().unwrap_or(
            whet_peft::BottleneckConfig {
                adapter_type: Default::default(),
                reduction_factor: 16,
                non_linearity: whet_models::config::Activation::Relu,
                modules_to_save: vec![],
            },
        )),
        Method::PrefixTuning => {
            PeftConfig::Prompt(PromptConfig::Prefix(recipe.prefix_tuning.clone()?))
        }
        Method::PromptTuning => {
            PeftConfig::Prompt(PromptConfig::Prompt(recipe.prompt_tuning.clone()?))
        }
        Method::Full | Method::Head => return None,
    };
    let modules = config.modules_to_save_mut();
    for m in head_modules {
        if !modules.iter().any(|x| x == m) {
            modules.push(m.to_string());
        }
    }
    Some(config)
}

/// Makes every parameter trainable; returns the counts.
pub fn full<M: VisitParams + ExportParams>(model: &mut M) -> ParamCounts {
    set_trainable(model, &|_| true);
    let n = crate::output::param_count(model, &|_| true);
    ParamCounts {
        trainable: n,
        all: n,
    }
}

/// Attaches the recipe's adapter (the head modules train and are saved with it); None for
/// full and head training. A soft prompt that starts from a text gets that text's token ids
/// from `tokenizer`, special tokens included, as peft tokenizes it.
pub fn attach_adapter<M: VisitParams>(
    model: &mut M,
    recipe: &Recipe,
    head_modules: &[&str],
    tokenizer: &TextTokenizer,
    device: &Device,
) -> Result<Option<(ParamCounts, PeftConfig)>> {
    let Some(mut config) = adapter_config(recipe, head_modules) else {
        return Ok(None);
    };
    if let PeftConfig::Prompt(PromptConfig::Prompt(c)) = &mut config
        && c.prompt_tuning_init == PromptInit::Text
    {
        let text = c.prompt_tuning_init_text.as_deref().unwrap_or_default();
        c.init_token_ids = tokenizer
            .encode(text, true)
            .map_err(|e| TrainError::encode("prompt_tuning.prompt_tuning_init_text", e))?;
    }
    let report = config.apply(model, device)?;
    Ok(Some((report.counts, config)))
}

/// Applies the recipe's method to `model`: every parameter trains (`full`); only those `head`
/// accepts train (`head`; None where the task has no head to train); or the recipe's adapter
/// is attached and the task's `head_modules` train and are saved with it, as peft's
/// `task_type` does. Returns the parameter counts and the adapter's configuration.
pub fn apply<M: VisitParams + ExportParams>(
    model: &mut M,
    recipe: &Recipe,
    head: Option<&dyn Fn(&str) -> bool>,
    head_modules: &[&str],
    tokenizer: &TextTokenizer,
    device: &Device,
) -> Result<(ParamCounts, Option<PeftConfig>)> {
    match recipe.method {
        Method::Full => Ok((full(model), None)),
        Method::Head => {
            let head = head.ok_or_else(|| TrainError::NoHead {
                task: format!("{:?}", recipe.task),
            })?;
            set_trainable(model, head);
            let counts = ParamCounts {
                trainable: crate::output::param_count(model, head),
                all: crate::output::param_count(model, &|_| true),
            };
            Ok((counts, None))
        }
        _ => {
            let (counts, config) = attach_adapter(model, recipe, head_modules, tokenizer, device)?
                .ok_or(TrainError::NoAdapterTable)?;
            Ok((counts, Some(config)))
        }
    }
}
