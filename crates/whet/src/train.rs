//! `whet train`, `whet eval`, `whet predict`: what a person sees of training — progress bar,
//! evaluation tables, example predictions before and after, the summary — and the files left
//! in the output folder.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use burn::tensor::Device;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use whet_data::{Columns, Table, Target, examples, tokenize};
use whet_metrics::ClassificationReport;
use whet_train::classify::{self, Prepared};
use whet_train::{EvalLog, Observer, Recipe, StepLog, Task, TrainSummary};

use crate::plot::{Series, line_chart};

/// Peak resident memory of this process in MB (VmHWM), where /proc exists.
pub(crate) fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

pub(crate) struct Progress {
    pub(crate) bar: ProgressBar,
    logging_steps: usize,
    log: Vec<serde_json::Value>,
    /// Class names for evaluation tables (empty for language modelling).
    labels: Vec<String>,
}

impl Observer for Progress {
    fn step(&mut self, s: &StepLog) {
        self.bar.set_position(s.step as u64);
        self.bar.set_message(format!(
            "epoch {:.2} | loss {:.4} | lr {:.2e} | {:.1} samples/s",
            s.epoch, s.loss, s.learning_rate, s.samples_per_second
        ));
        if s.step.is_multiple_of(self.logging_steps) || s.step == s.total_steps {
            self.log.push(json!(s));
        }
    }

    fn eval(&mut self, e: &EvalLog) {
        let title = format!("evaluation at step {} (epoch {:.2})", e.step, e.epoch);
        let text = match &e.report {
            Some(r) => eval_table(&title, e.loss, r, &self.labels),
            None => format!("{title}\n  loss {:.4}{}", e.loss, metric_line(&e.metrics)),
        };
        self.bar.suspend(|| println!("{text}"));
        let mut entry = json!({"step": e.step, "epoch": e.epoch, "eval_loss": e.loss});
        for (k, v) in &e.metrics {
            entry[format!("eval_{k}")] = json!(v);
        }
        self.log.push(entry);
    }
}

/// ` | name value` for each metric.
fn metric_line(metrics: &std::collections::BTreeMap<String, f64>) -> String {
    metrics
        .iter()
        .map(|(k, v)| format!(" | {k} {v:.4}"))
        .collect()
}

fn eval_table(title: &str, loss: f64, r: &ClassificationReport, labels: &[String]) -> String {
    let mut s = format!(
        "{title}\n  loss {loss:.4} | accuracy {:.4} | macro F1 {:.4} | weighted F1 {:.4} | MCC {:.4} | {} samples\n",
        r.accuracy, r.macro_avg.f1, r.weighted_avg.f1, r.matthews_correlation, r.samples
    );
    s.push_str(&format!(
        "  {:<14} {:>9} {:>9} {:>9} {:>8}\n",
        "label", "precision", "recall", "f1", "support"
    ));
    for (l, c) in labels.iter().zip(&r.per_class) {
        s.push_str(&format!(
            "  {:<14} {:>9.4} {:>9.4} {:>9.4} {:>8}\n",
            truncate(l, 14),
            c.precision,
            c.recall,
            c.f1,
            c.support
        ));
    }
    s
}

pub(crate) fn truncate(s: &str, n: usize) -> String {
    let one_line: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() <= n {
        one_line
    } else {
        one_line
            .chars()
            .take(n.saturating_sub(1))
            .collect::<String>()
            + "…"
    }
}

/// Prints a few texts with their true and predicted labels.
fn show_examples(title: &str, p: &Prepared, recipe: &Recipe, device: &Device) -> Result<()> {
    let split = p
        .test
        .as_ref()
        .or(p.validation.as_ref())
        .unwrap_or(&p.train);
    let picked: Vec<&whet_data::Example> = split.examples.iter().take(5).collect();
    let texts: Vec<String> = picked.iter().map(|e| e.text.clone()).collect();
    let probs = classify::predict(
        &p.model,
        &p.tokenizer,
        &texts,
        recipe.data.max_length,
        p.pad_id,
        p.multi_label,
        device,
    )?;
    println!("{title}");
    for (e, pr) in picked.iter().zip(&probs) {
        let best = whet_infer_argmax(pr);
        let predicted = if p.multi_label {
            Target::Multi((0..pr.len()).filter(|&k| pr[k] > 0.5).collect())
        } else {
            Target::Class(best)
        };
        println!(
            "  {:<62} true {:<10} predicted {:<10} ({:.2})",
            truncate(&e.text, 62),
            truncate(&label_text(&p.labels, &e.label), 10),
            truncate(&label_text(&p.labels, &predicted), 10),
            pr[best]
        );
    }
    Ok(())
}

/// A target as label names: `pos`, or `joy,love` for several labels.
fn label_text(labels: &whet_data::Labels, t: &Target) -> String {
    let names: Vec<&str> = t.ids().iter().map(|&i| labels.0[i].as_str()).collect();
    names.join(",")
}

fn whet_infer_argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best
}

/// Reads the recipe, resolves `--resume`, creates the output folder and writes the resolved
/// recipe into it.
pub(crate) fn start_run(
    recipe_path: &Path,
    set: &[String],
    resume: Option<&str>,
) -> Result<(Recipe, Option<PathBuf>)> {
    let (recipe, chosen) = Recipe::load_for_model(recipe_path, set)?;
    if let Some(line) = chosen {
        eprintln!("{line}");
    }
    let out = recipe.training.output_dir.clone();
    let resume: Option<PathBuf> = match resume {
        None => None,
        Some("latest") => Some(
            whet_train::checkpoint::latest(&out)
                .ok_or_else(|| anyhow!("--resume: no checkpoint-N folder in {}", out.display()))?,
        ),
        Some(p) => Some(PathBuf::from(p)),
    };
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    whet_models::fsutil::write_atomic(
        &out.join("recipe.resolved.toml"),
        recipe.to_toml().as_bytes(),
    )?;
    Ok((recipe, resume))
}

/// The progress bar of a run of `total` optimizer steps.
pub(crate) fn progress(total: usize, logging_steps: usize, labels: Vec<String>) -> Progress {
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps | {msg} | ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(250));
    Progress {
        bar,
        logging_steps,
        log: vec![],
        labels,
    }
}

/// The `train_*` keys of `all_results.json`.
pub(crate) fn train_results(
    summary: &TrainSummary,
    counts: &whet_peft::ParamCounts,
) -> serde_json::Map<String, serde_json::Value> {
    let secs = summary.train_runtime;
    let mut results = serde_json::Map::new();
    results.insert("train_loss".into(), json!(summary.train_loss));
    results.insert("train_runtime".into(), json!(secs));
    results.insert("train_samples".into(), json!(summary.train_samples));
    results.insert("train_steps".into(), json!(summary.steps));
    results.insert("epoch".into(), json!(summary.epochs));
    results.insert(
        "train_samples_per_second".into(),
        json!(summary.train_samples as f64 / secs),
    );
    results.insert(
        "train_tokens_per_second".into(),
        json!(summary.train_tokens as f64 / secs),
    );
    if let Some(mb) = peak_rss_mb() {
        results.insert("train_peak_rss_mb".into(), json!(mb));
    }
    results.insert("trainable_params".into(), json!(counts.trainable));
    results.insert("all_params".into(), json!(counts.all));
    results
}

/// Writes `all_results.json`, `trainer_state.json` and `loss_curve.png` (train loss, eval
/// loss, and the eval metric `curve_metric` when evaluations have it).
pub(crate) fn write_run_files(
    out: &Path,
    results: serde_json::Map<String, serde_json::Value>,
    progress: &Progress,
    summary: &TrainSummary,
    curve_metric: &str,
) -> Result<()> {
    whet_models::fsutil::write_atomic(
        &out.join("all_results.json"),
        serde_json::to_string_pretty(&serde_json::Value::Object(results))?.as_bytes(),
    )?;
    whet_models::fsutil::write_atomic(
        &out.join("trainer_state.json"),
        serde_json::to_string_pretty(&json!({"log_history": progress.log, "best_step": summary.best_step, "global_step": summary.steps}))?
            .as_bytes(),
    )?;
    let points = |f: &dyn Fn(&EvalLog) -> Option<f64>| -> Vec<(f64, f64)> {
        summary
            .evals
            .iter()
            .filter_map(|e| Some((e.step as f64, f(e)?)))
            .collect()
    };
    let mut series = vec![
        Series {
            name: "train loss".into(),
            points: summary
                .history
                .iter()
                .map(|s| (s.step as f64, s.loss))
                .collect(),
            color: [31, 119, 180],
        },
        Series {
            name: "eval loss".into(),
            points: points(&|e| Some(e.loss)),
            color: [214, 39, 40],
        },
    ];
    let metric = points(&|e| e.metrics.get(curve_metric).copied());
    if !metric.is_empty() {
        series.push(Series {
            name: format!("eval {}", curve_metric.replace('_', " ")),
            points: metric,
            color: [44, 160, 44],
        });
    }
    line_chart(&out.join("loss_curve.png"), "optimizer step", &series)?;
    Ok(())
}

/// The closing lines of a run: speed, loss, memory, and what was written where.
pub(crate) fn print_summary(
    summary: &TrainSummary,
    start: std::time::Instant,
    unit: &str,
    out: &Path,
    adapter: bool,
    files: &str,
) {
    let secs = summary.train_runtime;
    println!(
        "done: {} steps ({:.2} epochs) in {secs:.1}s, {:.1} {unit}/s, {:.0} tokens/s, train loss {:.4}, peak RSS {:.0} MB, total {:.1}s",
        summary.steps,
        summary.epochs,
        summary.train_samples as f64 / secs,
        summary.train_tokens as f64 / secs,
        summary.train_loss,
        peak_rss_mb().unwrap_or(0.0),
        start.elapsed().as_secs_f64()
    );
    if summary.first_step > 0 {
        println!(
            "resumed at step {}: ran steps {}..={} ({} optimizer steps in this process)",
            summary.first_step,
            summary.first_step + 1,
            summary.steps,
            summary.history.len()
        );
    }
    println!(
        "wrote {} ({}; {files})",
        out.display(),
        if adapter {
            "peft adapter: adapter_config.json, adapter_model.safetensors"
        } else {
            "transformers folder: config.json, model.safetensors"
        }
    );
}

pub fn train(recipe_path: &Path, set: &[String], resume: Option<&str>) -> Result<()> {
    let (recipe, resume) = start_run(recipe_path, set, resume)?;
    match recipe.task {
        Task::CausalLm => return crate::train_lm::train(recipe, resume),
        Task::QuestionAnswering => return crate::train_qa::train(recipe, resume),
        Task::RewardModel => return crate::train_reward::train(recipe, resume),
        Task::Dpo => return crate::train_dpo::train(recipe, resume),
        Task::Ppo => return crate::train_ppo::train(recipe, resume),
        Task::SequenceClassification | Task::MultiLabelClassification => {}
    }
    let out = recipe.training.output_dir.clone();

    let device = Device::flex().autodiff();
    device.seed(recipe.training.seed);
    let start = std::time::Instant::now();
    let mut p = classify::prepare(&recipe, &device)?;
    crate::plan::check(&whet_train::plan::for_classifier(&mut p, &recipe))?;
    println!(
        "model {} ({}), method {:?}, {} labels: {}",
        recipe.model.display(),
        p.checkpoint.family(),
        recipe.method,
        p.labels.len(),
        p.labels.0.join(", ")
    );
    println!(
        "data: {} train / {} validation / {} test examples, max_length {}",
        p.train.encoded.len(),
        p.validation.as_ref().map_or(0, |s| s.encoded.len()),
        p.test.as_ref().map_or(0, |s| s.encoded.len()),
        recipe.data.max_length
    );
    if !p.fresh.is_empty() {
        println!(
            "newly initialised (not in the checkpoint): {}",
            p.fresh.join(", ")
        );
    }
    println!("{}", p.counts.line());
    write_splits(&p, &out.join("data"))?;
    show_examples("before training (random head):", &p, &recipe, &device)?;

    let total = recipe.training.total_steps(p.train.encoded.len());
    let mut progress = progress(total, recipe.training.logging_steps, p.labels.0.clone());
    if let Some(r) = &resume {
        println!("resuming from {}", r.display());
    }
    let summary =
        classify::run_training(&mut p, &recipe, &device, &mut progress, resume.as_deref())?;
    progress.bar.finish_and_clear();

    let mut results = serde_json::Map::new();
    let eval_bs = recipe.training.per_device_eval_batch_size;
    if let Some(v) = &p.validation {
        let (loss, r) =
            classify::evaluate_split(&p, v, eval_bs, &device)?;
        results.extend(classify::metric_map("eval", loss, &r, &p.labels));
    }
    let mut test_report = None;
    if let Some(t) = &p.test {
        let (loss, r) =
            classify::evaluate_split(&p, t, eval_bs, &device)?;
        results.extend(classify::metric_map("test", loss, &r, &p.labels));
        test_report = Some((loss, r));
    }
    results.extend(train_results(&summary, &p.counts));
    write_run_files(&out, results, &progress, &summary, "accuracy")?;
    classify::save(&p, &recipe, &out)?;

    show_examples("after training:", &p, &recipe, &device)?;
    if let Some((loss, r)) = &test_report {
        println!("{}", eval_table("test set", *loss, r, &p.labels.0));
    }
    print_summary(
        &summary,
        start,
        "samples",
        &out,
        p.adapter.is_some(),
        "all_results.json, trainer_state.json, recipe.resolved.toml, loss_curve.png: blue train loss, red eval loss, green eval accuracy",
    );
    Ok(())
}

/// Writes the exact splits of the run as JSONL (`text`, `label` name), so a run can be repeated
/// by another tool, e.g. the reference script.
fn write_splits(p: &Prepared, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let splits = [
        ("train", Some(&p.train)),
        ("validation", p.validation.as_ref()),
        ("test", p.test.as_ref()),
    ];
    for (name, split) in splits {
        let Some(split) = split else { continue };
        let mut text = String::new();
        for e in &split.examples {
            let label = match &e.label {
                Target::Class(c) => json!(p.labels.0[*c]),
                Target::Multi(ids) => {
                    json!(ids.iter().map(|&i| &p.labels.0[i]).collect::<Vec<_>>())
                }
            };
            let mut row = json!({"text": e.text, "label": label});
            if let Some(pair) = &e.text_pair {
                row["text_pair"] = json!(pair);
            }
            text.push_str(&row.to_string());
            text.push('\n');
        }
        whet_models::fsutil::write_atomic(&dir.join(format!("{name}.jsonl")), text.as_bytes())?;
    }
    Ok(())
}

pub fn eval(
    model: &Path,
    data: &Path,
    text_column: &str,
    label_column: &str,
    encoding: &str,
    batch: usize,
) -> Result<()> {
    let device = Device::flex();
    let t = classify::load_trained(model, &device)?;
    let table = Table::read(data, encoding.parse().map_err(|e: String| anyhow!(e))?)?;
    let cols = Columns {
        text: text_column.into(),
        text_pair: None,
        label: label_column.into(),
    };
    let ex = examples(&table, &cols, &t.labels, t.multi_label)?;
    let enc = tokenize(&t.tokenizer, &ex, t.max_length, Default::default())?;
    let (loss, r, _) =
        whet_train::evaluate(&t.model, &enc, t.labels.len(), batch, t.pad_id, &device)?;
    println!(
        "{}",
        eval_table(
            &format!("{} on {}", model.display(), data.display()),
            loss,
            &r,
            &t.labels.0
        )
    );
    println!(
        "{}",
        serde_json::Value::Object(classify::metric_map("eval", loss, &r, &t.labels))
    );
    Ok(())
}

pub fn predict(
    model: &Path,
    mut texts: Vec<String>,
    file: Option<PathBuf>,
    top_k: Option<usize>,
) -> Result<()> {
    if let Some(f) = file {
        let content =
            std::fs::read_to_string(&f).with_context(|| format!("cannot read {}", f.display()))?;
        texts.extend(
            content
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(String::from),
        );
    }
    if texts.is_empty() {
        bail!("nothing to classify: give --text or --file");
    }
    let device = Device::flex();
    let t = classify::load_trained(model, &device)?;
    let probs = classify::predict(
        &t.model,
        &t.tokenizer,
        &texts,
        t.max_length,
        t.pad_id,
        t.multi_label,
        &device,
    )?;
    for pr in probs {
        let mut order: Vec<usize> = (0..pr.len()).collect();
        order.sort_by(|&a, &b| pr[b].total_cmp(&pr[a]));
        let item = |i: usize| json!({"label": t.labels.0[i], "score": pr[i]});
        match top_k {
            Some(k) => println!(
                "{}",
                json!(
                    order
                        .iter()
                        .take(k.max(1))
                        .map(|&i| item(i))
                        .collect::<Vec<_>>()
                )
            ),
            None => println!("{}", item(order[0])),
        }
    }
    Ok(())
}
