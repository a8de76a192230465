//! `whet plan RECIPE.toml` and the memory check `whet train` makes before its first step: the
//! predicted peak (whet_train::plan) against the memory this machine has.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Result, bail};
use burn::tensor::Device;
use whet_train::Recipe;
use whet_train::plan::{self, MemoryPlan};
use whet_train::task::Run;

/// Set by `whet train --no-memory-check`.
pub(crate) static SKIP_CHECK: AtomicBool = AtomicBool::new(false);

/// Prints the plan and refuses a run whose predicted peak exceeds the memory available.
pub(crate) fn check(plan: &MemoryPlan) -> Result<()> {
    let mb = |b: u64| b as f64 / (1u64 << 20) as f64;
    let Some(available) = plan::available_bytes() else {
        return Ok(());
    };
    println!(
        "memory plan: peak {:.0} MB of {:.0} MB available (whet plan shows the parts)",
        mb(plan.total),
        mb(available)
    );
    if plan.total > available && !SKIP_CHECK.load(Ordering::Relaxed) {
        bail!(
            "this run needs about {:.0} MB at its peak and the machine has {:.0} MB available:\n{}\n\
             to fit, change (largest part first):\n{}\n(--no-memory-check runs it anyway)",
            mb(plan.total),
            mb(available),
            plan.table(),
            plan.advice()
        );
    }
    Ok(())
}

/// `whet plan`: loads the model and tokenizes the data as `whet train` would, then prints the
/// predicted peak by part (and as JSON with --json).
pub fn run(recipe_path: &Path, set: &[String], json: bool) -> Result<()> {
    let (recipe, chosen) = Recipe::load_for_model(recipe_path, set)?;
    if let Some(line) = chosen {
        eprintln!("{line}");
    }
    let kind = recipe.task;
    let mut task = whet_train::open(Run {
        recipe,
        device: Device::flex().autodiff(),
        resume: None,
    })?;
    let Some(plan) = task.plan() else {
        bail!(
            "whet plan does not cover task {kind:?} yet (for PPO, generation and the reward \
             model change the peak); run it and read train_peak_rss_mb in all_results.json"
        )
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&plan)?);
        return Ok(());
    }
    println!(
        "{}: predicted peak memory of a training step\n{}",
        recipe_path.display(),
        plan.table()
    );
    if let Some(a) = plan::available_bytes() {
        let mb = |b: u64| b as f64 / (1u64 << 20) as f64;
        let verdict = if plan.total <= a {
            "fits"
        } else {
            "does not fit"
        };
        println!("  available    {:>9.1} MB: {verdict}", mb(a));
        if plan.total > a {
            println!("to fit, change (largest part first):\n{}", plan.advice());
        }
    }
    Ok(())
}
