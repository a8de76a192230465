//! `whet train` for `task = "ppo"`: RLHF against a trained reward model. Held-out prompts are
//! scored before and after; `reward_curve.png` and `kl_curve.png` show the mean score and the
//! KL to the reference per iteration.

use std::path::PathBuf;

use anyhow::Result;
use burn::tensor::Device;
use serde_json::json;
use whet_train::Recipe;
use whet_train::ppo;

use crate::plot::{Series, line_chart};
use crate::train::{print_summary, progress, train_results, write_run_files};

pub fn train(recipe: Recipe, resume: Option<PathBuf>) -> Result<()> {
    let out = recipe.training.output_dir.clone();
    let device = Device::flex().autodiff();
    device.seed(recipe.training.seed);
    let start = std::time::Instant::now();
    let mut p = ppo::prepare(&recipe, &device)?;
    let cfg = p.config.clone();
    println!(
        "model {} ({}), method {:?}, PPO against the reward model {} (kl_coef {}, {} PPO epochs x \
         {} minibatches, responses of up to {} tokens at temperature {}; reference: {})",
        recipe.model.display(),
        p.checkpoint.family(),
        recipe.method,
        cfg.reward_model.display(),
        cfg.kl_coef,
        cfg.num_ppo_epochs,
        cfg.num_mini_batches,
        cfg.response_length,
        cfg.temperature,
        if p.frozen.is_some() {
            "a frozen copy of the starting model"
        } else {
            "the base with the adapter off"
        }
    );
    println!(
        "prompts: {} train / {} validation / {} test, cut to their last {} tokens{}",
        p.train.ids.len(),
        p.validation.as_ref().map_or(0, |s| s.ids.len()),
        p.test.as_ref().map_or(0, |s| s.ids.len()),
        recipe.data.max_length,
        if p.truncated > 0 {
            format!(" ({} were longer)", p.truncated)
        } else {
            String::new()
        }
    );
    println!("{} (with the value head)", p.counts.line());
    let seed = recipe.training.seed.wrapping_add(0x7e57);
    let batch = recipe.training.per_device_eval_batch_size;
    let before = match (&p.test, &resume) {
        (Some(t), None) => Some(
            p.evaluate(t, seed, batch, &device)?,
        ),
        _ => None,
    };

    let total = recipe.training.total_steps(p.train.ids.len());
    let mut progress = progress(total, recipe.training.logging_steps, vec![]);
    if let Some(r) = &resume {
        println!("resuming from {}", r.display());
    }
    let summary = p
        .run_training(&recipe, &device, &mut progress, resume.as_deref())?;
    progress.bar.finish_and_clear();

    let mut results = serde_json::Map::new();
    let mut lines = Vec::new();
    let mut after_examples = Vec::new();
    if let Some(t) = &p.test {
        let after = p
            .evaluate(t, seed, batch, &device)?;
        after_examples = after.examples.clone();
        for (k, v) in after.metrics() {
            results.insert(format!("test_{k}"), json!(v));
        }
        if let Some(b) = &before {
            for (k, v) in b.metrics() {
                results.insert(format!("test_{k}_before"), json!(v));
            }
            lines.push(format!(
                "test prompts: mean score {:.4} -> {:.4}, KL to the reference {:.3} -> {:.3}, \
                 length {:.1} -> {:.1} tokens ({} prompts)",
                b.score,
                after.score,
                b.kl,
                after.kl,
                b.length,
                after.length,
                t.ids.len()
            ));
        } else {
            lines.push(format!(
                "test prompts: mean score {:.4}, KL {:.3} ({} prompts)",
                after.score,
                after.kl,
                t.ids.len()
            ));
        }
    }
    if let Some(e) = summary.evals.last() {
        for (k, v) in &e.metrics {
            results.insert(format!("eval_{k}"), json!(v));
        }
    }
    results.extend(train_results(&summary, &p.counts));
    write_run_files(&out, results, &progress, &summary, "score")?;
    let per_step = |k: &str| -> Vec<(f64, f64)> {
        summary
            .history
            .iter()
            .filter_map(|s| Some((s.step as f64, *s.metrics.get(k)?)))
            .collect()
    };
    let eval = |k: &str| -> Vec<(f64, f64)> {
        summary
            .evals
            .iter()
            .filter_map(|e| Some((e.step as f64, *e.metrics.get(k)?)))
            .collect()
    };
    line_chart(
        &out.join("reward_curve.png"),
        "PPO iteration",
        &[
            Series {
                name: "train mean score".into(),
                points: per_step("objective/scores"),
                color: [31, 119, 180],
            },
            Series {
                name: "eval mean score".into(),
                points: eval("score"),
                color: [44, 160, 44],
            },
        ],
    )?;
    line_chart(
        &out.join("kl_curve.png"),
        "PPO iteration",
        &[
            Series {
                name: "train KL".into(),
                points: per_step("objective/kl"),
                color: [255, 127, 14],
            },
            Series {
                name: "eval KL".into(),
                points: eval("kl"),
                color: [214, 39, 40],
            },
        ],
    )?;
    p.save(&recipe, &out)?;
    for l in lines {
        println!("{l}");
    }
    if let (Some(b), Some(t)) = (&before, &p.test) {
        for ((i, was, s0), (_, now, s1)) in b.examples.iter().zip(&after_examples) {
            let prompt = &t.texts[*i];
            let tail: String = prompt
                .chars()
                .rev()
                .take(120)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            println!("test prompt {i} (its end): {tail:?}");
            println!("  before (score {s0:.3}): {was:?}");
            println!("  after  (score {s1:.3}): {now:?}");
        }
    }
    print_summary(
        &summary,
        start,
        "responses",
        &out,
        p.adapter.is_some(),
        "value_head.safetensors, all_results.json, trainer_state.json, recipe.resolved.toml, \
         loss_curve.png, reward_curve.png, kl_curve.png",
    );
    Ok(())
}
