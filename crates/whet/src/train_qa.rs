//! `whet train` for `task = "question-answering"` and `whet predict --task
//! question-answering`: the run's header, answers to a few held-out questions before and
//! after training, the progress bar, exact match and F1, and the files left in the output
//! folder.

use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow};
use burn::tensor::Device;
use serde_json::json;
use whet_train::Recipe;
use whet_train::qa::{self, QaPrepared};

use crate::train::{print_summary, progress, train_results, truncate, write_run_files};

/// The pipeline's best answer to a few questions of the held-out split, with the gold answer.
fn show_answers(title: &str, p: &QaPrepared, recipe: &Recipe, device: &Device) -> Result<()> {
    let split = p
        .validation
        .as_ref()
        .or(p.test.as_ref())
        .unwrap_or(&p.train);
    println!("{title}");
    for ex in split.examples.iter().take(3) {
        let best = qa::answer(
            &p.model,
            &p.tokenizer,
            &ex.question,
            &ex.context,
            recipe.data.max_length,
            p.doc_stride,
            15,
            1,
            device,
        )?;
        let gold = ex.answers.first().map_or("", |a| a.text.as_str());
        println!(
            "  {:<50} gold {:<20} predicted {:<20} ({:.2})",
            truncate(&ex.question, 50),
            truncate(gold, 20),
            truncate(&best[0].answer, 20),
            best[0].score
        );
    }
    Ok(())
}

pub fn train(recipe: Recipe, resume: Option<PathBuf>) -> Result<()> {
    let out = recipe.training.output_dir.clone();
    let device = Device::flex().autodiff();
    device.seed(recipe.training.seed);
    let start = std::time::Instant::now();
    let mut p = qa::prepare(&recipe, &device)?;
    crate::plan::check(&whet_train::plan::for_question_answering(&mut p, &recipe))?;
    println!(
        "model {} ({}), method {:?}, extractive question answering",
        recipe.model.display(),
        p.checkpoint.family(),
        recipe.method
    );
    let sizes = |s: Option<&qa::QaSplit>| {
        s.map_or("0".to_string(), |s| {
            format!("{} ({} windows)", s.examples.len(), s.features.len())
        })
    };
    println!(
        "data: {} train / {} validation / {} test questions, max_length {}, doc_stride {}",
        sizes(Some(&p.train)),
        sizes(p.validation.as_ref()),
        sizes(p.test.as_ref()),
        recipe.data.max_length,
        p.doc_stride
    );
    if !p.fresh.is_empty() {
        println!(
            "newly initialised (not in the checkpoint): {}",
            p.fresh.join(", ")
        );
    }
    println!("{}", p.counts.line());
    show_answers("before training:", &p, &recipe, &device)?;

    let total = recipe.training.total_steps(p.train.features.len());
    let mut progress = progress(total, recipe.training.logging_steps, vec![]);
    if let Some(r) = &resume {
        println!("resuming from {}", r.display());
    }
    let summary = qa::run_training(&mut p, &recipe, &device, &mut progress, resume.as_deref())?;
    progress.bar.finish_and_clear();

    let mut results = serde_json::Map::new();
    let mut lines = Vec::new();
    for (name, split) in [("eval", &p.validation), ("test", &p.test)] {
        if let Some(split) = split {
            let e = qa::evaluate_split(&p, &recipe, split, &device);
            results.extend(e.results(name));
            lines.push(format!(
                "{name}: loss {:.4}, exact match {:.2}, F1 {:.2} ({} questions)",
                e.loss,
                e.metrics["exact_match"],
                e.metrics["f1"],
                split.examples.len()
            ));
        }
    }
    results.extend(train_results(&summary, &p.counts));
    write_run_files(&out, results, &progress, &summary, "")?;
    qa::save(&p, &recipe, &out)?;

    show_answers("after training:", &p, &recipe, &device)?;
    for l in lines {
        println!("{l}");
    }
    print_summary(
        &summary,
        start,
        "windows",
        &out,
        p.adapter.is_some(),
        "qa.json, all_results.json, trainer_state.json, recipe.resolved.toml, loss_curve.png",
    );
    Ok(())
}

/// `whet predict --task question-answering`: JSON lines `{"score", "start", "end", "answer"}`
/// as `pipeline("question-answering")` returns them.
pub fn predict(
    model_dir: &Path,
    question: &str,
    context: &str,
    top_k: Option<usize>,
) -> Result<()> {
    let device = Device::flex();
    let info: serde_json::Value = std::fs::read_to_string(model_dir.join("qa.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(json!({}));
    let max_length = info["max_length"].as_u64().unwrap_or(384) as usize;
    let doc_stride = info["doc_stride"].as_u64().unwrap_or(128) as usize;
    let is_adapter = model_dir.join("adapter_config.json").is_file();
    let base = if is_adapter {
        let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
            model_dir.join("adapter_config.json"),
        )?)?;
        let cfg = cfg["base_model_name_or_path"].as_str().map(PathBuf::from);
        info["base_model"]
            .as_str()
            .map(PathBuf::from)
            .filter(|p| p.exists())
            .or(cfg)
            .ok_or_else(|| {
                anyhow!(
                    "{}: the adapter does not name its base model",
                    model_dir.display()
                )
            })?
    } else {
        model_dir.to_path_buf()
    };
    let checkpoint = whet_models::Checkpoint::open(&base)?;
    let (mut model, fresh) = checkpoint.load_question_answering(&device)?;
    if is_adapter {
        whet_peft::load_adapter(&mut model, model_dir, &device)?;
    } else if !fresh.is_empty() {
        return Err(anyhow!(
            "{} has no trained question-answering head (missing {}); train it first with `whet train`",
            model_dir.display(),
            fresh.join(", ")
        ));
    }
    let tokenizer =
        whet_models::TextTokenizer::from_folder(model_dir).or_else(|_| checkpoint.tokenizer())?;
    let answers = qa::answer(
        &model,
        &tokenizer,
        question,
        context,
        max_length,
        doc_stride,
        15,
        top_k.unwrap_or(1),
        &device,
    )?;
    for a in answers {
        println!("{}", json!(a));
    }
    Ok(())
}
