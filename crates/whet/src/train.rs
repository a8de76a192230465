//! `whet train`: one driver for every task. What a person sees of training — the run's header,
//! predictions or samples before and after, the progress bar, evaluation tables, the summary —
//! and the files left in the output folder. What differs between tasks comes from the task
//! ([`whet_train::Task`]); `whet_train::open` is the only place that looks at the task kind.

use std::fs::File;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use whet_train::classification::report_table;
use whet_train::task::{Run, one_line};
use whet_train::{EvalLog, Observer, Recipe, StepLog, TrainSummary};

use crate::plot::{Series, Style, line_chart, smooth};
use crate::report::EventWriter;

/// Peak resident memory of this process in MB (VmHWM), where /proc exists.
pub(crate) fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

struct Progress {
    bar: ProgressBar,
    logging_steps: usize,
    log: Vec<serde_json::Value>,
    /// Class names for evaluation tables (empty for language modelling).
    labels: Vec<String>,
    /// stderr is not a terminal (a log file, CI, `nohup`): the bar draws nothing there, so
    /// each log is a line of its own, as `Trainer` prints it.
    plain: bool,
    /// `report_to = ["jsonl"]`: `OUT/logs.jsonl`.
    jsonl: Option<File>,
    /// `report_to = ["tensorboard"]`: an event file in `OUT/runs`.
    tensorboard: Option<EventWriter>,
    /// End training after this step (a sweep's rung).
    stop_at: Option<usize>,
}

impl Progress {
    /// Sends one log to the files `report_to` names. A write that fails is said once and
    /// that file is dropped: the run goes on.
    fn report(&mut self, entry: &serde_json::Value, step: usize, scalars: Vec<(String, f32)>) {
        if let Some(f) = &mut self.jsonl
            && let Err(e) = writeln!(f, "{entry}")
        {
            self.bar.suspend(|| {
                eprintln!("note: logs.jsonl cannot be written ({e}); no more logs go there")
            });
            self.jsonl = None;
        }
        if let Some(w) = &mut self.tensorboard
            && let Err(e) = w.scalars(wall_time(), step as i64, &scalars)
        {
            self.bar.suspend(|| {
                eprintln!("note: the TensorBoard event file cannot be written ({e:#}); no more logs go there")
            });
            self.tensorboard = None;
        }
    }
}

/// Seconds since the Unix epoch, as an event's `wall_time`.
fn wall_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl Observer for Progress {
    fn tick(&mut self, step: usize, _total: usize) {
        self.bar.set_position(step as u64);
    }

    fn step(&mut self, s: &StepLog) {
        self.bar.set_message(format!(
            "epoch {:.2} | loss {:.4} | lr {:.2e} | {:.0} tokens/s",
            s.epoch, s.loss, s.learning_rate, s.tokens_per_second
        ));
        if s.step.is_multiple_of(self.logging_steps) || s.step == s.total_steps {
            let entry = json!(s);
            if self.plain {
                eprintln!("{entry}");
            }
            let mut scalars = vec![
                ("train/loss".to_string(), s.loss as f32),
                ("train/learning_rate".to_string(), s.learning_rate as f32),
                ("train/grad_norm".to_string(), s.grad_norm as f32),
                ("train/epoch".to_string(), s.epoch as f32),
                (
                    "train/tokens_per_second".to_string(),
                    s.tokens_per_second as f32,
                ),
            ];
            scalars.extend(
                s.metrics
                    .iter()
                    .map(|(k, v)| (format!("train/{k}"), *v as f32)),
            );
            self.report(&entry, s.step, scalars);
            self.log.push(entry);
        }
    }

    fn eval(&mut self, e: &EvalLog) {
        let title = format!("evaluation at step {} (epoch {:.2})", e.step, e.epoch);
        let text = match &e.report {
            Some(r) => report_table(&title, e.loss, r, &self.labels),
            None => format!("{title}\n  loss {:.4}{}", e.loss, metric_line(&e.metrics)),
        };
        self.bar.suspend(|| println!("{text}"));
        if !e.samples.is_empty() {
            let lines: Vec<String> = e
                .samples
                .iter()
                .map(|s| {
                    format!(
                        "  {} → {}",
                        tail(&s.prompt, 40),
                        one_line(&s.continuation, 70)
                    )
                })
                .collect();
            self.bar
                .suspend(|| println!("samples at step {}:\n{}", e.step, lines.join("\n")));
        }
        let mut entry = json!({"step": e.step, "epoch": e.epoch, "eval_loss": e.loss});
        if !e.samples.is_empty() {
            entry["samples"] = json!(e.samples);
        }
        let mut scalars = vec![("eval/loss".to_string(), e.loss as f32)];
        for (k, v) in &e.metrics {
            entry[format!("eval_{k}")] = json!(v);
            scalars.push((format!("eval/{k}"), *v as f32));
        }
        self.report(&entry, e.step, scalars);
        self.log.push(entry);
    }

    fn note(&mut self, text: &str) {
        self.bar.suspend(|| eprintln!("note: {text}"));
    }

    fn stop(&mut self, step: usize) -> bool {
        self.stop_at.is_some_and(|s| step >= s)
    }
}

/// ` | name value` for each metric.
/// The last `n` characters of a text, on one line.
fn tail(s: &str, n: usize) -> String {
    let one: Vec<char> = one_line(s, usize::MAX).chars().collect();
    let t: String = one[one.len().saturating_sub(n)..].iter().collect();
    if one.len() > n { format!("…{t}") } else { t }
}

/// `samples.md`: each held-out prompt's continuation before training, at every evaluation and
/// after training, as a Markdown table (one row per prompt).
fn samples_table(
    before: &[whet_train::Sample],
    during: &[(usize, Vec<whet_train::Sample>)],
    after: &[whet_train::Sample],
) -> String {
    let cell = |s: &str| one_line(s, 200).replace('|', "\\|");
    let mut head = vec!["prompt".to_string()];
    let mut columns: Vec<&[whet_train::Sample]> = vec![];
    if !before.is_empty() {
        head.push("before training".into());
        columns.push(before);
    }
    for (step, s) in during {
        head.push(format!("step {step}"));
        columns.push(s);
    }
    if !after.is_empty() {
        head.push("after training".into());
        columns.push(after);
    }
    let prompts: &[whet_train::Sample] = columns.first().copied().unwrap_or(&[]);
    let mut text = format!(
        "# Samples: greedy continuations of held-out prompts\n\n| {} |\n|{}\n",
        head.join(" | "),
        "---|".repeat(head.len())
    );
    for (i, p) in prompts.iter().enumerate() {
        let mut row = vec![cell(&p.prompt)];
        for c in &columns {
            row.push(c.get(i).map(|s| cell(&s.continuation)).unwrap_or_default());
        }
        text.push_str(&format!("| {} |\n", row.join(" | ")));
    }
    text
}

fn metric_line(metrics: &std::collections::BTreeMap<String, f64>) -> String {
    metrics
        .iter()
        .map(|(k, v)| format!(" | {k} {v:.4}"))
        .collect()
}

/// Reads the recipe, resolves `--resume`, creates the output folder and writes the resolved
/// recipe into it.
fn start_run(
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

/// The progress bar of a run of `total` optimizer steps, and the log files of `report_to`.
fn progress(
    total: usize,
    training: &whet_train::TrainingArguments,
    labels: Vec<String>,
) -> Result<Progress> {
    let out = &training.output_dir;
    let jsonl = if training.reports_to("jsonl") {
        let path = out.join("logs.jsonl");
        // Appended to, so that a resumed run continues the file.
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        Some(f)
    } else {
        None
    };
    let tensorboard = if training.reports_to("tensorboard") {
        Some(EventWriter::create(&out.join("runs"), wall_time())?)
    } else {
        None
    };
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps | {msg} | ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(250));
    Ok(Progress {
        bar,
        logging_steps: training.logging_steps,
        log: vec![],
        labels,
        plain: !std::io::stderr().is_terminal(),
        jsonl,
        tensorboard,
        stop_at: None,
    })
}

/// The `train_*` keys of `all_results.json`.
fn train_results(
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
    if summary.train_positions > 0 {
        let padding = summary.train_positions.saturating_sub(summary.train_tokens);
        results.insert(
            "train_padding_fraction".into(),
            json!(padding as f64 / summary.train_positions as f64),
        );
    }
    if let Some(mb) = peak_rss_mb() {
        results.insert("train_peak_rss_mb".into(), json!(mb));
    }
    results.insert("trainable_params".into(), json!(counts.trainable));
    results.insert("all_params".into(), json!(counts.all));
    results
}

/// Writes `all_results.json`, `trainer_state.json` and `loss_curve.png` (train loss, eval
/// loss, and the eval metric `curve_metric` when evaluations have it).
fn write_run_files(
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
    let train: Vec<(f64, f64)> = summary
        .history
        .iter()
        .map(|s| (s.step as f64, s.loss))
        .collect();
    let blue = [31, 119, 180];
    let mut series = vec![
        Series {
            name: "train loss".into(),
            points: train.clone(),
            color: blue,
            style: Style::Faint,
        },
        Series {
            name: "smoothed".into(),
            points: smooth(&train, 0.6),
            color: blue,
            style: Style::Plain,
        },
        Series {
            name: "eval loss".into(),
            points: points(&|e| Some(e.loss)),
            color: [214, 39, 40],
            style: Style::Marked,
        },
    ];
    let metric = points(&|e| e.metrics.get(curve_metric).copied());
    let y_title = if metric.is_empty() {
        "loss".to_string()
    } else {
        series.push(Series {
            name: format!("eval {}", curve_metric.replace('_', " ")),
            points: metric,
            color: [44, 160, 44],
            style: Style::Marked,
        });
        format!("loss / {}", curve_metric.replace('_', " "))
    };
    line_chart(
        &out.join("loss_curve.png"),
        "optimizer step",
        &y_title,
        &series,
    )?;
    Ok(())
}

/// How much of the training batches was padding, and whether the run computed it.
fn padding_line(summary: &TrainSummary, padding_free: bool) -> Option<String> {
    let (real, all) = (summary.train_tokens, summary.train_positions);
    (all > 0).then(|| {
        format!(
            "padding: {:.1}% of the training batches' {all} positions ({} real tokens); {}",
            100.0 * (all - real.min(all)) as f64 / all as f64,
            real,
            if padding_free {
                "padding_free kept it out of the projections and feed-forward layers"
            } else {
                "padding_free = false: every layer computed it"
            }
        )
    })
}

/// The closing lines of a run: speed, loss, memory, and what was written where.
fn print_summary(
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

/// A training run; with `stop_at`, paused after that step's evaluation and checkpoint (a
/// sweep's rung), to be resumed from the checkpoint. Returns the run's wall-clock seconds.
pub fn run(
    recipe_path: &Path,
    set: &[String],
    resume: Option<&str>,
    stop_at: Option<usize>,
) -> Result<f64> {
    let (recipe, resume) = start_run(recipe_path, set, resume)?;
    let out = recipe.training.output_dir.clone();
    let training = recipe.training.clone();
    let padding_free = recipe.padding_free();
    let leakage = recipe.data.leakage;
    let general = match recipe.eval.general_text_path() {
        Some(path) => Some((
            whet_train::causal_lm::read_general_text(&path)?,
            path,
            recipe.eval.general_tokens,
        )),
        None => None,
    };
    let opened = crate::device()?;
    let device = opened.device.clone().autodiff();
    whet_models::device::seed(&device, recipe.training.seed);
    let start = std::time::Instant::now();
    let resuming = resume.clone();
    let mut task = whet_train::open(Run {
        recipe,
        device,
        resume,
    })?;
    if !opened.is_cpu() {
        // The plan predicts this process's host memory; on a GPU the weights, gradients,
        // optimizer state and activations live in device memory, which it does not measure.
        println!(
            "device: {} (the host-memory plan check does not apply)",
            opened.name
        );
    } else if let Some(plan) = task.plan() {
        crate::plan::check(&plan)?;
    }
    print_lines(&task.describe());
    let mut extra: Vec<String> = vec![];
    if check_leakage(task.as_ref(), leakage, &out)? {
        extra.push("leakage.json".into());
    }
    task.write_data(&out.join("data"))?;
    print_lines(&task.sample(true)?);

    // The forgetting report: perplexity on general text before training (not known when a run
    // resumes: its model has trained already).
    let samples_before = if resuming.is_none() {
        task.samples()?
    } else {
        vec![]
    };
    let before = match (&general, &resuming) {
        (Some((text, _, tokens)), None) => task.general_perplexity(text, *tokens)?,
        _ => None,
    };
    let mut progress = progress(task.total_steps(), &training, task.labels())?;
    if let Some(r) = &resuming {
        println!("resuming from {}", r.display());
    }
    progress.stop_at = stop_at;
    let summary = task.train(&mut progress)?;
    progress.bar.finish_and_clear();
    if stop_at.is_some_and(|s| summary.steps >= s) && summary.steps < task.total_steps() {
        // Paused: the logs so far, for the sweep that reads them; the checkpoint resumes it.
        whet_models::fsutil::write_atomic(
            &out.join("trainer_state.json"),
            serde_json::to_string_pretty(
                &json!({"log_history": progress.log, "global_step": summary.steps, "paused": true}),
            )?
            .as_bytes(),
        )?;
        println!("paused after step {} (resume with --resume)", summary.steps);
        return Ok(start.elapsed().as_secs_f64());
    }

    let outcome = task.evaluate(&summary)?;
    for (name, bytes) in &outcome.files {
        whet_models::fsutil::write_atomic(&out.join(name), bytes)?;
        extra.push(name.clone());
    }
    let mut results = outcome.results;
    results.extend(train_results(&summary, &task.counts()));
    let forgetting = match &general {
        Some((text, path, tokens)) => task
            .general_perplexity(text, *tokens)?
            .map(|after| forgetting_line(&mut results, path, *tokens, before, after)),
        None => None,
    };
    let report = task.report();
    write_run_files(&out, results, &progress, &summary, report.curve_metric)?;
    for chart in task.charts(&summary) {
        line_chart(
            &out.join(chart.file),
            chart.x_label,
            chart.y_label,
            &chart.series,
        )?;
    }
    task.save(&out)?;

    let samples_after = task.samples()?;
    if !samples_after.is_empty() {
        let during: Vec<(usize, Vec<whet_train::Sample>)> = progress
            .log
            .iter()
            .filter_map(|e| {
                let s: Vec<whet_train::Sample> =
                    serde_json::from_value(e.get("samples")?.clone()).ok()?;
                Some((e["step"].as_u64()? as usize, s))
            })
            .collect();
        whet_models::fsutil::write_atomic(
            &out.join("samples.md"),
            samples_table(&samples_before, &during, &samples_after).as_bytes(),
        )?;
        extra.push("samples.md".into());
    }
    print_lines(&task.sample(false)?);
    print_lines(&outcome.lines);
    print_lines(forgetting.as_slice());
    print_summary(
        &summary,
        start,
        report.unit,
        &out,
        report.adapter,
        report.files,
    );
    if !extra.is_empty() {
        println!("also wrote: {}", extra.join(", "));
    }
    if let Some(line) = padding_line(&summary, padding_free) {
        println!("{line}");
    }
    if progress.jsonl.is_some() {
        println!("logs: {}", out.join("logs.jsonl").display());
    }
    if let Some(w) = &progress.tensorboard {
        println!(
            "TensorBoard: {} (tensorboard --logdir {})",
            w.path().display(),
            out.join("runs").display()
        );
    }
    Ok(start.elapsed().as_secs_f64())
}

/// Records the forgetting report in `all_results.json` (`general_perplexity_before`, `_after`,
/// `_change`) and says it in one line.
fn forgetting_line(
    results: &mut serde_json::Map<String, serde_json::Value>,
    path: &Path,
    tokens: usize,
    before: Option<f64>,
    after: f64,
) -> String {
    results.insert("general_perplexity_after".into(), json!(after));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    match before {
        Some(before) => {
            results.insert("general_perplexity_before".into(), json!(before));
            results.insert("general_perplexity_change".into(), json!(after - before));
            format!(
                "forgetting: perplexity on general text ({name}, {tokens} tokens) {before:.2} -> \
                 {after:.2} ({:+.1}%)",
                100.0 * (after / before - 1.0)
            )
        }
        None => format!(
            "forgetting: perplexity on general text ({name}, {tokens} tokens) {after:.2} after \
             training (a resumed run has no figure from before)"
        ),
    }
}

/// The leakage check before training (`data.leakage`): printed, written to
/// `OUT/leakage.json`, and with "error" a refusal when a held-out split repeats training rows.
/// Whether it ran.
fn check_leakage(
    task: &dyn whet_train::task::Task,
    mode: whet_data::leakage::Mode,
    out: &Path,
) -> Result<bool> {
    use whet_data::leakage::Mode;
    if mode == Mode::Off {
        return Ok(false);
    }
    let splits = task.split_texts();
    if splits.is_empty() {
        return Ok(false);
    }
    let report = whet_data::leakage::check(&splits);
    print_lines(&report.lines());
    whet_models::fsutil::write_atomic(
        &out.join("leakage.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    if mode == Mode::Error && report.leaks() {
        anyhow::bail!(
            "data.leakage = \"error\": a held-out split repeats training rows (see above and {}); \
             remove them, or set data.leakage = \"warn\" to train anyway",
            out.join("leakage.json").display()
        );
    }
    Ok(true)
}

fn print_lines(lines: &[String]) {
    for l in lines {
        println!("{l}");
    }
}
