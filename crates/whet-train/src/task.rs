//! One fine-tuning task, as `whet train` drives it: [`crate::open`] reads the recipe's task once and
//! prepares that task's data and model; the [`Task`] then describes itself, plans its memory,
//! shows a few predictions or samples, trains on the shared loop ([`crate::trainer`]),
//! evaluates its held-out splits and saves. The CLI has one driver over this trait; a new task
//! is one implementation of it and one arm in [`crate::open`].

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use whet_peft::ParamCounts;

use crate::error::Result;
use crate::plan::MemoryPlan;
use crate::recipe::Recipe;
use crate::trainer::{Observer, TrainSummary};

/// A prepared task: its data tokenized, its model loaded with the method applied.
pub trait Task {
    /// The header of a run: model, method, data sizes, trainable parameters.
    fn describe(&self) -> Vec<String>;
    /// The predicted peak memory of a training step; None where the plan does not cover the
    /// task.
    fn plan(&mut self) -> Option<MemoryPlan>;
    /// Writes the splits as used, as JSONL files in `dir`, where the task keeps them (so another
    /// tool can repeat the run).
    fn write_data(&self, _dir: &Path) -> Result<()> {
        Ok(())
    }
    /// The text of each row of each split (`train`, `validation`, `test`), for the leakage
    /// check before training; empty where the task has none to give.
    fn split_texts(&self) -> Vec<(&'static str, Vec<whet_data::leakage::Text>)> {
        vec![]
    }
    /// A few predictions or samples on held-out data, before (`before`) or after training, as
    /// lines to print.
    fn sample(&mut self, _before: bool) -> Result<Vec<String>> {
        Ok(vec![])
    }
    /// Perplexity on general text (`text`, its first `tokens` tokens in blocks of
    /// `data.max_length`): the forgetting report of decoder fine-tuning, measured before and
    /// after training. None where the task trains no language model.
    fn general_perplexity(&mut self, _text: &str, _tokens: usize) -> Result<Option<f64>> {
        Ok(None)
    }
    /// The model's continuations of the held-out prompts `eval.generate` names, now (before
    /// and after training; the evaluations in between log their own); empty elsewhere.
    fn samples(&mut self) -> Result<Vec<crate::trainer::Sample>> {
        Ok(vec![])
    }
    /// The optimizer steps the run takes.
    fn total_steps(&self) -> usize;
    /// Class names, for the evaluation tables of classification; empty elsewhere.
    fn labels(&self) -> Vec<String> {
        vec![]
    }
    /// Trains on the shared loop, from the checkpoint [`crate::open`] was given when there is one.
    fn train(&mut self, observer: &mut dyn Observer) -> Result<TrainSummary>;
    /// Evaluates the held-out splits after training.
    fn evaluate(&mut self, summary: &TrainSummary) -> Result<Outcome>;
    /// Saves the model (a `transformers` folder) or the adapter (peft's files) and the task's
    /// own files into `out`.
    fn save(&self, out: &Path) -> Result<()>;
    /// Trainable and total parameters, as peft counts them.
    fn counts(&self) -> ParamCounts;
    /// How the run reports itself.
    fn report(&self) -> Report;
    /// Charts beyond the loss curve (PPO's reward and KL).
    fn charts(&self, _summary: &TrainSummary) -> Vec<Chart> {
        vec![]
    }
}

/// The splits a run has, by name (`train`, then `validation` and `test` when present).
/// Writes each split as `{name}.jsonl` in `dir`, a JSON row an example: the exact splits a run
/// used, which another tool (or `whet eval`) can read.
pub fn write_splits<'a, S: 'a>(
    dir: &Path,
    splits: impl Iterator<Item = (&'static str, &'a S)>,
    rows: impl Fn(&S) -> Vec<serde_json::Value>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| crate::error::TrainError::io(dir, e))?;
    for (name, split) in splits {
        let mut text = String::new();
        for row in rows(split) {
            text.push_str(&row.to_string());
            text.push('\n');
        }
        whet_text::write_atomic(&dir.join(format!("{name}.jsonl")), text.as_bytes())?;
    }
    Ok(())
}

pub fn splits<'a, S>(
    train: &'a S,
    validation: Option<&'a S>,
    test: Option<&'a S>,
) -> impl Iterator<Item = (&'static str, &'a S)> {
    [
        ("train", Some(train)),
        ("validation", validation),
        ("test", test),
    ]
    .into_iter()
    .filter_map(|(name, split)| Some((name, split?)))
}

/// What evaluation after training found.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// `eval_*` and `test_*` entries of `all_results.json`.
    pub results: serde_json::Map<String, serde_json::Value>,
    /// Lines to print at the end of the run.
    pub lines: Vec<String>,
    /// Files for the output folder: name and contents (a classifier's `errors.jsonl`).
    pub files: Vec<(String, Vec<u8>)>,
}

/// How a run of a task reports itself.
#[derive(Debug, Clone)]
pub struct Report {
    /// What throughput counts: "samples", "pairs", "windows", "responses".
    pub unit: &'static str,
    /// The evaluation metric drawn on the loss curve (empty: none).
    pub curve_metric: &'static str,
    /// Whether the output folder holds a peft adapter rather than a full model.
    pub adapter: bool,
    /// The files the run leaves beyond the model, for the closing line.
    pub files: &'static str,
}

/// A line chart: named series of `(x, y)` points.
#[derive(Debug, Clone)]
pub struct Chart {
    /// File name in the output folder.
    pub file: &'static str,
    pub x_label: &'static str,
    pub y_label: &'static str,
    pub series: Vec<Series>,
}

/// One line of a chart.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// RGB.
    pub color: [u8; 3],
    pub style: Style,
}

/// How a series is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// A line with a small cross at each point.
    Line,
    /// A thin faint line, no markers: raw values under their smoothed curve.
    Faint,
    /// A line without markers (a smoothed curve).
    Plain,
    /// A line with a large square at each point (evaluations, few and exact).
    Marked,
}

/// Where a run starts: the recipe, the device, and the checkpoint to resume from.
#[derive(Debug, Clone)]
pub struct Run {
    pub recipe: Recipe,
    pub device: Device,
    pub resume: Option<PathBuf>,
}

/// The last lines of a run's header: the head tensors newly initialised (not in the
/// checkpoint), if any, and the trainable parameters as peft prints them.
pub fn closing_lines(fresh: &[String], counts: &ParamCounts) -> Vec<String> {
    let mut lines = Vec::new();
    if !fresh.is_empty() {
        lines.push(format!(
            "newly initialised (not in the checkpoint): {}",
            fresh.join(", ")
        ));
    }
    lines.push(counts.line());
    lines
}

/// Text on one line, cut to `n` characters with an ellipsis.
pub fn one_line(s: &str, n: usize) -> String {
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
