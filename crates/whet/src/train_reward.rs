//! `whet train` for `task = "reward-model"`: a one-output classifier trained on preference
//! pairs with trl's pairwise loss; held-out pairwise accuracy in `all_results.json`.

use std::path::PathBuf;

use anyhow::Result;
use burn::tensor::Device;
use whet_train::Objective;
use whet_train::Recipe;
use whet_train::reward;

use crate::train::{print_summary, progress, train_results, write_run_files};

pub fn train(recipe: Recipe, resume: Option<PathBuf>) -> Result<()> {
    let out = recipe.training.output_dir.clone();
    let device = Device::flex().autodiff();
    device.seed(recipe.training.seed);
    let start = std::time::Instant::now();
    let mut p = reward::prepare(&recipe, &device)?;
    crate::plan::check(&whet_train::plan::for_reward_model(&mut p, &recipe))?;
    println!(
        "model {} ({}), method {:?}, reward model (one output, pairwise loss)",
        recipe.model.display(),
        p.checkpoint.family(),
        recipe.method
    );
    println!(
        "data: {} train / {} validation / {} test pairs, max_length {}{}",
        p.train.len(),
        p.validation.as_ref().map_or(0, |s| s.len()),
        p.test.as_ref().map_or(0, |s| s.len()),
        recipe.data.max_length,
        if p.truncated > 0 {
            format!(" ({} texts truncated)", p.truncated)
        } else {
            String::new()
        }
    );
    if !p.fresh.is_empty() {
        println!(
            "newly initialised (not in the checkpoint): {}",
            p.fresh.join(", ")
        );
    }
    println!("{}", p.counts.line());

    let total = recipe.training.total_steps(p.train.len());
    let mut progress = progress(total, recipe.training.logging_steps, vec![]);
    if let Some(r) = &resume {
        println!("resuming from {}", r.display());
    }
    let summary = p
        .run_training(&recipe, &device, &mut progress, resume.as_deref())?;
    progress.bar.finish_and_clear();

    let objective = p.objective();
    let batch = recipe.training.per_device_eval_batch_size;
    let mut results = serde_json::Map::new();
    let mut lines = Vec::new();
    for (name, split) in [("eval", &p.validation), ("test", &p.test)] {
        if let Some(split) = split {
            let e = objective
                .evaluate(&p.model, split, batch, &device)?;
            results.extend(e.results(name));
            lines.push(format!(
                "{name}: loss {:.4}, pairwise accuracy {:.4}, mean margin {:.3} ({} pairs)",
                e.loss,
                e.metrics["accuracy"],
                e.metrics["rewards/margins"],
                split.len()
            ));
        }
    }
    results.extend(train_results(&summary, &p.counts));
    write_run_files(&out, results, &progress, &summary, "accuracy")?;
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
        "labels.json, all_results.json, trainer_state.json, recipe.resolved.toml, loss_curve.png",
    );
    Ok(())
}
