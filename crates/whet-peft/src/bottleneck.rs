//! Bottleneck adapters: Houlsby (Houlsby et al. 2019, <https://arxiv.org/abs/1902.00751>: after
//! the attention and the feed-forward sub-layers) and Pfeiffer (Pfeiffer et al. 2021,
//! <https://arxiv.org/abs/2005.00247>: after the feed-forward sub-layer only). Each adapter sits
//! on a sub-layer's output projection, before its dropout and residual: `y + up(act(down(y)))`,
//! `down` `[d, d / reduction_factor]` drawn from N(0, 0.02), `up` zero, so training starts from
//! the base model.
//!
//! `peft` has no bottleneck adapters, so the files are whet's own, laid out as peft's (see
//! [`FORMAT`]).

use std::path::Path;

use burn::module::Param;
use burn::tensor::{Device, Distribution, Tensor};
use serde::{Deserialize, Serialize};
use whet_models::VisitParams;
use whet_models::config::Activation;
use whet_models::layers::Bottleneck;

use crate::AdapterReport;
use crate::{
    PREFIX, PeftError, Result, attach_each, collect_tensors, freeze_all_but, write_adapter,
};

/// The file format, for the README and `--help`.
pub const FORMAT: &str = "\
adapter_config.json: {\"peft_type\": \"BOTTLENECK\", \"adapter_type\": \"houlsby\" | \"pfeiffer\",
  \"reduction_factor\": N, \"non_linearity\": \"relu\" | \"silu\" | \"gelu\" | \"gelu_new\",
  \"target_modules\": [the adapted output projections], \"modules_to_save\", \"task_type\",
  \"base_model_name_or_path\", \"format\": \"whet\"}
adapter_model.safetensors: for each adapted module M (d outputs, r = d / reduction_factor),
  base_model.model.M.adapter_down.weight [r, d], .adapter_down.bias [r],
  base_model.model.M.adapter_up.weight [d, r], .adapter_up.bias [d] (PyTorch nn.Linear layout),
  and base_model.model.<param> for modules_to_save.";

/// Which sub-layers get an adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BottleneckKind {
    /// After attention and after the feed-forward block.
    #[default]
    Houlsby,
    /// After the feed-forward block only.
    Pfeiffer,
}

/// Bottleneck adapter hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BottleneckConfig {
    /// Houlsby or Pfeiffer placement.
    #[serde(default)]
    pub adapter_type: BottleneckKind,
    /// Hidden size divided by this is the bottleneck width.
    #[serde(default = "d_reduction")]
    pub reduction_factor: usize,
    /// The non-linearity between the projections.
    #[serde(default = "d_act")]
    pub non_linearity: Activation,
    /// Modules trained in full and saved with the adapter (the classification head).
    #[serde(default)]
    pub modules_to_save: Vec<String>,
}

fn d_reduction() -> usize {
    16
}
fn d_act() -> Activation {
    Activation::Relu
}

/// Output projections of the attention sub-layer, by family (BERT, DistilBERT, GPT-2, LLaMA).
const ATTENTION_OUT: &[&str] = &[
    "attention.output.dense",
    "attention.out_lin",
    "attn.c_proj",
    "self_attn.o_proj",
];
/// Output projections of the feed-forward sub-layer (BERT's is `layer.N.output.dense`).
const FFN_OUT: &[&str] = &["mlp.down_proj", "mlp.c_proj", "ffn.lin2"];

fn is_attention_out(name: &str) -> bool {
    ATTENTION_OUT.iter().any(|k| name.ends_with(k))
}

fn is_ffn_out(name: &str) -> bool {
    FFN_OUT.iter().any(|k| name.ends_with(k))
        || (name.ends_with(".output.dense") && !name.ends_with("attention.output.dense"))
}

impl BottleneckConfig {
    fn targets(&self, name: &str) -> bool {
        is_ffn_out(name) || (self.adapter_type == BottleneckKind::Houlsby && is_attention_out(name))
    }
}

/// Attaches bottleneck adapters after the sub-layers `config.adapter_type` names, freezes every
/// other parameter except `modules_to_save`, and returns the adapted modules and the counts.
pub fn apply_bottleneck<M: VisitParams>(
    model: &mut M,
    config: &BottleneckConfig,
    device: &Device,
) -> Result<AdapterReport> {
    if config.reduction_factor == 0 {
        return Err(PeftError::Config(
            "bottleneck reduction_factor must be at least 1".into(),
        ));
    }
    let targeted = attach_each(model, &mut |name, layer| {
        if !config.targets(name) {
            return false;
        }
        let (_, d) = layer.dims();
        let r = (d / config.reduction_factor).max(1);
        layer.bottleneck = Some(Bottleneck {
            down: Param::from_tensor(whet_models::device::random(
                [d, r],
                Distribution::Normal(0.0, 0.02),
                device,
            )),
            down_bias: Param::from_tensor(Tensor::zeros([r], device)),
            up: Param::from_tensor(Tensor::zeros([r, d], device)),
            up_bias: Param::from_tensor(Tensor::zeros([d], device)),
            act: config.non_linearity,
            enabled: true,
        });
        true
    });
    if targeted.is_empty() {
        return Err(PeftError::Config(
            "no attention or feed-forward output projection found for bottleneck adapters".into(),
        ));
    }
    Ok(freeze_all_but(model, &config.modules_to_save, targeted))
}

/// Saves the adapters (and `modules_to_save`) into `dir` in whet's format ([`FORMAT`]).
pub fn save_adapter<M: VisitParams + Clone>(
    model: &M,
    config: &BottleneckConfig,
    base_model: &str,
    task_type: &str,
    dir: &Path,
) -> Result<()> {
    let tensors = collect_tensors(model, &config.modules_to_save);
    let targets: Vec<&str> = tensors
        .iter()
        .filter_map(|(key, _, _)| {
            key.strip_prefix(PREFIX)?
                .strip_suffix(".adapter_down.weight")
        })
        .collect();
    let json = serde_json::json!({
        "peft_type": "BOTTLENECK",
        "format": "whet",
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "adapter_type": config.adapter_type,
        "reduction_factor": config.reduction_factor,
        "non_linearity": config.non_linearity,
        "target_modules": targets,
        "modules_to_save": config.modules_to_save,
    });
    write_adapter(dir, &tensors, &json)
}
