//! What peft chooses when a configuration leaves the target modules out: its per-architecture
//! tables, keyed by `config.json`'s `model_type`, for the model types whet loads.
//!
//! Copied from peft 0.21.2 `src/peft/utils/constants.py`
//! (`TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`,
//! `TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING`,
//! `TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING`). peft has no entry for DistilBERT
//! or Phi-3, so `LoraConfig()` on them fails there as here.

/// `LoraConfig()`'s `target_modules` for a model type.
pub fn lora_target_modules(model_type: &str) -> Option<&'static [&'static str]> {
    Some(match model_type {
        "bert" | "roberta" | "xlm-roberta" => &["query", "value"],
        "deberta-v2" => &["query_proj", "value_proj"],
        "gpt2" => &["c_attn"],
        "llama" | "mistral" | "qwen2" | "qwen3" | "gemma" | "gemma2" | "gemma3_text" => {
            &["q_proj", "v_proj"]
        }
        _ => return None,
    })
}

/// `IA3Config()`'s `target_modules` and `feedforward_modules` for a model type.
pub fn ia3_modules(model_type: &str) -> Option<(&'static [&'static str], &'static [&'static str])> {
    Some(match model_type {
        "bert" | "roberta" => (&["key", "value", "output.dense"], &["output.dense"]),
        "deberta-v2" => (
            &["key_proj", "value_proj", "output.dense"],
            &["output.dense"],
        ),
        "gpt2" => (&["c_attn", "mlp.c_proj"], &["mlp.c_proj"]),
        "llama" | "mistral" => (&["k_proj", "v_proj", "down_proj"], &["down_proj"]),
        "qwen2" | "qwen3" | "gemma" | "gemma2" | "gemma3_text" => {
            (&["q_proj", "v_proj", "down_proj"], &["down_proj"])
        }
        _ => return None,
    })
}
