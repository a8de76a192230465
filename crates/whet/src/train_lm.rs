//! `whet train` for `task = "causal-lm"`: the run's header, greedy continuations of a few
//! held-out prompts before and after training, the progress bar, the summary, and the files
//! left in the output folder.

use std::path::PathBuf;

use anyhow::Result;
use burn::module::Module;
use burn::tensor::Device;
use serde_json::json;
use whet_data::{IGNORE, LmExample};
use whet_infer::{GenerationConfig, generate};
use whet_train::Recipe;
use whet_train::causal::{self, LmPrepared};

use crate::train::{print_summary, progress, train_results, truncate, write_run_files};

/// Up to three examples' prompts (the tokens before the first learnt one; for plain text the
/// first quarter) and their greedy continuations.
fn show_generations(title: &str, p: &LmPrepared, device: &Device) -> Result<()> {
    let split: &[LmExample] = p.validation.as_deref().unwrap_or(&p.train);
    let model = p.model.valid();
    let device = device.clone().without_autodiff();
    let config = GenerationConfig::greedy(32, p.checkpoint.eos_token_ids());
    println!("{title}");
    for ex in split.iter().take(3) {
        // A packed row's first document only.
        let doc_end = ex
            .document_ids
            .iter()
            .position(|&d| d != ex.document_ids[0])
            .unwrap_or(ex.ids.len());
        let first_learnt = (1..doc_end).find(|&k| ex.labels[k] != IGNORE).unwrap_or(1);
        let cut = if first_learnt > 1 {
            first_learnt
        } else {
            (doc_end / 4).clamp(1, 32)
        };
        let prompt = &ex.ids[..cut];
        let out = generate(&model, prompt, &config, &device, |_| true)?;
        let decode = |ids: &[u32]| p.tokenizer.inner.decode(ids, true).unwrap_or_default();
        let prompt_text = decode(prompt);
        let one_line: Vec<char> = prompt_text
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .chars()
            .collect();
        let tail: String = one_line[one_line.len().saturating_sub(50)..]
            .iter()
            .collect();
        println!("  …{tail:<50} → {}", truncate(&decode(&out), 90));
    }
    Ok(())
}

pub fn train(recipe: Recipe, resume: Option<PathBuf>) -> Result<()> {
    let out = recipe.training.output_dir.clone();
    let device = Device::flex().autodiff();
    device.seed(recipe.training.seed);
    let start = std::time::Instant::now();
    let mut p = causal::prepare(&recipe, &device)?;
    crate::plan::check(&whet_train::plan::for_causal_lm(&mut p, &recipe))?;
    println!(
        "model {} ({}), method {:?}, causal language modelling",
        recipe.model.display(),
        p.checkpoint.family(),
        recipe.method
    );
    println!(
        "data: {}; {} train / {} validation / {} test examples, max_length {}{}",
        p.data_kind,
        p.train.len(),
        p.validation.as_ref().map_or(0, |s| s.len()),
        p.test.as_ref().map_or(0, |s| s.len()),
        recipe.data.max_length,
        if p.skipped > 0 {
            format!(
                "; skipped {} (too long with too_long = \"skip\", or nothing to learn)",
                p.skipped
            )
        } else {
            String::new()
        }
    );
    println!("{}", p.counts.line());
    let data_dir = out.join("data");
    std::fs::create_dir_all(&data_dir)?;
    for (name, rows) in &p.rows {
        let text: String = rows.iter().map(|r| json!(r).to_string() + "\n").collect();
        whet_models::fsutil::write_atomic(
            &data_dir.join(format!("{name}.jsonl")),
            text.as_bytes(),
        )?;
    }
    show_generations("before training (greedy):", &p, &device)?;

    let total = recipe.training.total_steps(p.train.len());
    let mut progress = progress(total, recipe.training.logging_steps, vec![]);
    if let Some(r) = &resume {
        println!("resuming from {}", r.display());
    }
    let summary = causal::run_training(&mut p, &recipe, &device, &mut progress, resume.as_deref())?;
    progress.bar.finish_and_clear();

    let mut results = serde_json::Map::new();
    let eval_bs = recipe.training.per_device_eval_batch_size;
    let mut lines = Vec::new();
    for (name, split) in [("eval", &p.validation), ("test", &p.test)] {
        if let Some(data) = split {
            let (loss, tokens) = causal::evaluate_lm(&p.model, data, eval_bs, p.pad_id, &device);
            results.insert(format!("{name}_loss"), json!(loss));
            results.insert(format!("{name}_perplexity"), json!(loss.exp()));
            results.insert(format!("{name}_tokens"), json!(tokens));
            lines.push(format!(
                "{name}: loss {loss:.4}, perplexity {:.3} over {tokens} learnt tokens",
                loss.exp()
            ));
        }
    }
    results.extend(train_results(&summary, &p.counts));
    write_run_files(&out, results, &progress, &summary, "")?;
    causal::save(&p, &recipe, &out)?;

    show_generations("after training (greedy):", &p, &device)?;
    for l in lines {
        println!("{l}");
    }
    print_summary(
        &summary,
        start,
        "samples",
        &out,
        p.adapter.is_some(),
        "all_results.json, trainer_state.json, recipe.resolved.toml, loss_curve.png: blue train loss, red eval loss",
    );
    Ok(())
}
