//! `whet train` for `task = "dpo"`: a decoder trained on preference pairs with trl's DPO loss
//! against a frozen reference; the reward metrics of the held-out pairs in `all_results.json`.

use std::path::PathBuf;

use anyhow::Result;
use burn::tensor::Device;
use serde_json::json;
use whet_train::Objective;
use whet_train::Recipe;
use whet_train::dpo::{self, Reference};

use crate::train::{print_summary, progress, train_results, write_run_files};

pub fn train(recipe: Recipe, resume: Option<PathBuf>) -> Result<()> {
    let out = recipe.training.output_dir.clone();
    let device = Device::flex().autodiff();
    device.seed(recipe.training.seed);
    let start = std::time::Instant::now();
    let mut p = dpo::prepare(&recipe, &device)?;
    crate::plan::check(&whet_train::plan::for_dpo(&mut p, &recipe))?;
    let cfg = recipe.dpo.clone().unwrap_or_default();
    println!(
        "model {} ({}), method {:?}, DPO (beta {}, {:?} loss; reference: {})",
        recipe.model.display(),
        p.checkpoint.family(),
        recipe.method,
        cfg.beta,
        cfg.loss_type,
        match p.objective.reference {
            Reference::AdapterOff => "the base with the adapter off",
            Reference::Frozen(_) => "a frozen copy of the starting model",
            Reference::Precomputed => "log-probabilities precomputed before training",
        }
    );
    println!(
        "data: {} train / {} validation / {} test pairs, max_length {}{}",
        p.train.len(),
        p.validation.as_ref().map_or(0, |s| s.len()),
        p.test.as_ref().map_or(0, |s| s.len()),
        recipe.data.max_length,
        if p.dropped > 0 {
            format!(
                " ({} pairs dropped: the prompt fills max_length)",
                p.dropped
            )
        } else {
            String::new()
        }
    );
    println!("{}", p.counts.line());
    let data_dir = out.join("data");
    std::fs::create_dir_all(&data_dir)?;
    for (name, pairs) in &p.rows {
        let text: String = pairs
            .iter()
            .map(|r| {
                json!({"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected}).to_string()
                    + "\n"
            })
            .collect();
        whet_models::fsutil::write_atomic(
            &data_dir.join(format!("{name}.jsonl")),
            text.as_bytes(),
        )?;
    }

    let total = recipe.training.total_steps(p.train.len());
    let mut progress = progress(total, recipe.training.logging_steps, vec![]);
    if let Some(r) = &resume {
        println!("resuming from {}", r.display());
    }
    let summary = p
        .run_training(&recipe, &device, &mut progress, resume.as_deref())?;
    progress.bar.finish_and_clear();

    let batch = recipe.training.per_device_eval_batch_size;
    let mut results = serde_json::Map::new();
    let mut lines = Vec::new();
    for (name, split) in [("eval", &p.validation), ("test", &p.test)] {
        if let Some(split) = split {
            let e = p
                .objective
                .evaluate(&p.model, split, batch, &device)?;
            results.extend(e.results(name));
            lines.push(format!(
                "{name}: loss {:.4}, reward accuracy {:.4}, mean margin {:.3} ({} pairs)",
                e.loss,
                e.metrics["rewards/accuracies"],
                e.metrics["rewards/margins"],
                split.len()
            ));
        }
    }
    results.extend(train_results(&summary, &p.counts));
    write_run_files(&out, results, &progress, &summary, "rewards/accuracies")?;
    p.save(&recipe, &out)?;
    for l in lines {
        println!("{l}");
    }
    print_summary(
        &summary,
        start,
        "pairs",
        &out,
        p.adapter.is_some(),
        "all_results.json, trainer_state.json, recipe.resolved.toml, loss_curve.png",
    );
    Ok(())
}
