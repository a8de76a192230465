//! `whet merge`: fold a LoRA or IA3 adapter into its base and write a Hugging Face folder, as
//! peft's `merge_and_unload()` followed by `save_pretrained`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use whet_models::{Checkpoint, Format, VisitParams};
use whet_peft::PeftConfig;

/// The adapter's `task_type` and the base it names.
fn adapter_meta(adapter: &Path) -> Result<(String, Option<PathBuf>)> {
    let path = adapter.join("adapter_config.json");
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?,
    )
    .with_context(|| format!("{}: malformed JSON", path.display()))?;
    let task = json["task_type"]
        .as_str()
        .unwrap_or("CAUSAL_LM")
        .to_string();
    let base = match json["base_model_name_or_path"].as_str() {
        Some(_) => whet_models::adapter_base(adapter)?,
        None => None,
    };
    Ok((task, base))
}

/// Whether the run that trained the adapter kept its base quantised (its resolved recipe,
/// written beside the adapter, says so).
fn trained_quantised(adapter: &Path) -> Option<String> {
    let text = std::fs::read_to_string(adapter.join("recipe.resolved.toml")).ok()?;
    let recipe = whet_train::Recipe::parse(&text, &[]).ok()?;
    recipe.quant_spec().map(|q| format!("{q:?}"))
}

fn fold<M: VisitParams>(model: &mut M, config: &PeftConfig) -> Vec<String> {
    match config {
        PeftConfig::Lora(_) => whet_peft::merge_lora(model),
        PeftConfig::Ia3(_) => whet_peft::merge_ia3(model),
        // Refused in `merge` before anything is loaded.
        PeftConfig::Bottleneck(_) | PeftConfig::Prompt(_) => vec![],
    }
}

/// Merges `adapter` into `base` (or the base the adapter names) and writes `out`.
pub fn merge(base: Option<&Path>, adapter: &Path, out: &Path) -> Result<()> {
    let (task, named) = adapter_meta(adapter)?;
    let base = match base {
        Some(b) => b.to_path_buf(),
        None => named.ok_or_else(|| {
            anyhow!(
                "{}/adapter_config.json names no base model: give it with --model",
                adapter.display()
            )
        })?,
    };
    let config = whet_peft::read_adapter_config(adapter)?;
    if let PeftConfig::Prompt(_) = config {
        bail!(
            "{}: {} adds virtual tokens in front of the input and changes no weight, so there is \
             nothing to fold into the base; use the adapter folder with its base instead",
            adapter.display(),
            config.peft_type()
        );
    }
    if let PeftConfig::Bottleneck(_) = config {
        bail!(
            "{}: bottleneck adapters are non-linear (y + up(act(down(y)))) and cannot be folded \
             into the base weights; use the adapter folder with its base instead",
            adapter.display()
        );
    }
    let ckpt = Checkpoint::open(&base)?;
    // Never merge into a quantised base silently: whet loads it in f32 and merges there.
    if ckpt.format == Format::Gguf {
        let mut types: Vec<String> = ckpt
            .source
            .names()
            .iter()
            .filter_map(|n| ckpt.source.dtype(n))
            .filter(|t| !matches!(t.as_str(), "F32" | "F16" | "BF16"))
            .collect();
        types.sort();
        types.dedup();
        if !types.is_empty() {
            eprintln!(
                "note: {} stores {} weights; they are dequantised to f32 and the adapter is \
                 merged there (the output is an f32 folder, not re-quantised)",
                base.display(),
                types.join("/")
            );
        }
    }
    if let Some(q) = trained_quantised(adapter) {
        eprintln!(
            "note: the adapter was trained over a quantised base ({q}); it is merged into the f32 \
             base weights, which the quantised ones approximated, not back into 4 bits"
        );
    }
    let device = crate::device()?.device;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let folded = match task.as_str() {
        "CAUSAL_LM" => {
            let mut model = ckpt.load_causal_lm(&device)?;
            whet_peft::load_adapter(&mut model, adapter, &device)
                .with_context(|| format!("cannot apply the adapter {}", adapter.display()))?;
            let folded = fold(&mut model, &config);
            ckpt.write_causal_lm_config(out)?;
            whet_train::output::save_weights(&model, out)?;
            let tok = ckpt.tokenizer()?;
            ckpt.write_tokenizer_files(&tok, out)?;
            folded
        }
        "SEQ_CLS" => {
            let mut t = whet_infer::classification::load_on(adapter, Some(&base), &device)?;
            let folded = fold(&mut t.model, &config);
            let mut ckpt = Checkpoint::open(&base)?;
            ckpt.set_pad_token_id(t.pad_id);
            ckpt.set_labels(&t.labels.0);
            match t.kind {
                whet_data::LabelKind::Multi => ckpt
                    .set_problem_type(whet_models::config::ProblemType::MultiLabelClassification),
                whet_data::LabelKind::Real => {
                    ckpt.set_problem_type(whet_models::config::ProblemType::Regression)
                }
                whet_data::LabelKind::Single => {}
            }
            ckpt.write_classifier_config(&t.labels.0, out)?;
            whet_train::output::save_weights(&t.model, out)?;
            ckpt.write_tokenizer_files(&t.tokenizer, out)?;
            for f in ["labels.json"] {
                if adapter.join(f).is_file() {
                    std::fs::copy(adapter.join(f), out.join(f))
                        .with_context(|| format!("cannot copy {f}"))?;
                }
            }
            folded
        }
        "QUESTION_ANS" => {
            let (mut model, _) = ckpt.load_question_answering(&device)?;
            whet_peft::load_adapter(&mut model, adapter, &device)
                .with_context(|| format!("cannot apply the adapter {}", adapter.display()))?;
            let folded = fold(&mut model, &config);
            ckpt.write_question_answering_config(out)?;
            whet_train::output::save_weights(&model, out)?;
            let tok = match whet_models::TextTokenizer::from_folder(adapter) {
                Ok(t) => t,
                Err(_) => ckpt.tokenizer()?,
            };
            ckpt.write_tokenizer_files(&tok, out)?;
            if adapter.join("qa.json").is_file() {
                std::fs::copy(adapter.join("qa.json"), out.join("qa.json"))?;
            }
            folded
        }
        "TOKEN_CLS" => {
            // The tags live in the run's labels.json (the adapter's head is sized to them).
            let path = adapter.join("labels.json");
            let meta: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(&path)
                    .with_context(|| format!("cannot read {}", path.display()))?,
            )
            .with_context(|| format!("{}: malformed JSON", path.display()))?;
            let tags: Vec<String> = serde_json::from_value(meta["labels"].clone())
                .with_context(|| format!("{}: no tag list", path.display()))?;
            let mut ckpt = Checkpoint::open(&base)?;
            ckpt.set_labels(&tags);
            let (mut model, _) = ckpt.load_token_classifier(&device)?;
            whet_peft::load_adapter(&mut model, adapter, &device)
                .with_context(|| format!("cannot apply the adapter {}", adapter.display()))?;
            let folded = fold(&mut model, &config);
            ckpt.write_labelled_config(&tags, whet_models::Head::TokenClassification, out)?;
            whet_train::output::save_weights(&model, out)?;
            let tok = match whet_models::TextTokenizer::from_folder(adapter) {
                Ok(t) => t,
                Err(_) => ckpt.tokenizer()?,
            };
            ckpt.write_tokenizer_files(&tok, out)?;
            std::fs::copy(adapter.join("labels.json"), out.join("labels.json"))?;
            folded
        }
        other => bail!(
            "{}: task_type {other:?} cannot be merged here (CAUSAL_LM, SEQ_CLS, QUESTION_ANS, \
             TOKEN_CLS can)",
            adapter.display()
        ),
    };
    if !folded.is_empty() {
        eprintln!(
            "note: {} quantised layers were dequantised before merging",
            folded.len()
        );
    }
    println!(
        "merged {} ({}) into {}: wrote {}",
        adapter.display(),
        config.peft_type(),
        base.display(),
        out.display()
    );
    Ok(())
}
