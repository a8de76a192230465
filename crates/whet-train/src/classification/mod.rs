//! The sequence-classification task end to end: data, labels, method, training, evaluation,
//! and output the Python world loads (a `transformers` folder, or a `peft` adapter).

pub mod objective;

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use serde_json::json;
use whet_data::{
    Columns, Encoded, Encoding, Example, LabelKind, Labels, Table, Target, examples, real_valued,
    tokenize, tokenize_cached,
};
use whet_infer::classification::predict_examples;
use whet_models::config::ProblemType;
use whet_models::{Checkpoint, Classifier, ExportParams, TextTokenizer};
use whet_peft::{ParamCounts, PeftConfig};

use crate::error::{Result, TrainError};
use crate::recipe::{Recipe, TaskKind};
use crate::task::{Outcome, Report, Task, one_line};
use crate::trainer::{Observer, TrainSummary};
use objective::{Scores, evaluate, train_classifier};

/// A labelled split: examples and their tokens.
pub struct Split {
    pub examples: Vec<Example>,
    pub encoded: Vec<Encoded>,
}

/// Everything a run prepared before training.
pub struct Prepared {
    pub checkpoint: Checkpoint,
    pub tokenizer: TextTokenizer,
    pub labels: Labels,
    /// One label a text (softmax, cross-entropy), several (a sigmoid each, binary
    /// cross-entropy), or a number (one output, squared error).
    pub kind: LabelKind,
    /// Whether the run became a regression because its labels are real numbers (the recipe
    /// said sequence-classification).
    pub inferred_regression: bool,
    pub train: Split,
    pub validation: Option<Split>,
    pub test: Option<Split>,
    pub pad_id: u32,
    pub model: Classifier,
    pub counts: ParamCounts,
    /// The adapter method's configuration (None for full and head training).
    pub adapter: Option<PeftConfig>,
    /// Head tensors that were initialised (not in the checkpoint).
    pub fresh: Vec<String>,
}

fn encoding(name: &str) -> Result<Encoding> {
    name.parse().map_err(TrainError::Encoding)
}

/// Reads the data, fixes the labels, tokenizes, loads the model and applies the method.
pub fn prepare(recipe: &Recipe, device: &Device) -> Result<Prepared> {
    let d = &recipe.data;
    let enc = encoding(&d.encoding)?;
    let read = |p: &Path| Table::read(p, enc).map_err(TrainError::from);
    let train_table = read(&d.train)?;
    // Real-valued labels make sequence classification a regression, as run_glue.py decides
    // from the label column's type; named classes (data.label_names) keep it classification.
    let inferred_regression = recipe.task == TaskKind::SequenceClassification
        && d.label_names.is_none()
        && real_valued(&train_table, &d.label_column);
    let kind = match recipe.task {
        TaskKind::MultiLabelClassification => LabelKind::Multi,
        TaskKind::Regression => LabelKind::Real,
        _ if inferred_regression => LabelKind::Real,
        _ => LabelKind::Single,
    };
    let labels = match (&d.label_names, kind) {
        // transformers' id2label of a one-output head.
        (_, LabelKind::Real) => {
            train_table.require(&[&d.label_column])?;
            Labels(vec!["LABEL_0".into()])
        }
        (Some(names), _) => Labels(names.clone()),
        (None, _) => Labels::infer(&train_table, &d.label_column)?,
    };
    if kind != LabelKind::Real && labels.len() < 2 {
        return Err(TrainError::dataset(
            &d.train,
            format!(
                "found {} label(s); classification needs at least 2",
                labels.len()
            ),
        ));
    }
    let cols = Columns {
        text: d.text_column.clone(),
        text_pair: d.text_pair_column.clone(),
        label: d.label_column.clone(),
    };
    let all_train = examples(&train_table, &cols, &labels, kind)?;
    let load_split = |p: &Option<PathBuf>| -> Result<Option<Vec<Example>>> {
        match p {
            Some(p) => Ok(Some(examples(&read(p)?, &cols, &labels, kind)?)),
            None => Ok(None),
        }
    };
    let validation = load_split(&d.validation)?;
    let test = load_split(&d.test)?;
    let (train, validation, test) = d.parts(all_train, validation, test)?;
    if train.is_empty() {
        return Err(TrainError::dataset(&d.train, "the training split is empty"));
    }

    let (mut checkpoint, tokenizer, pad_id) = open_checkpoint(recipe)?;
    checkpoint.set_labels(&labels.0);
    match kind {
        LabelKind::Multi => checkpoint.set_problem_type(ProblemType::MultiLabelClassification),
        LabelKind::Real => checkpoint.set_problem_type(ProblemType::Regression),
        LabelKind::Single => {}
    }
    let tok = |ex: Vec<Example>| -> Result<Split> {
        let encoded = if d.tokenization_cache {
            let dir = crate::recipe::cache_dir().join("tokenized");
            tokenize_cached(
                &tokenizer,
                &ex,
                d.max_length,
                d.side(whet_data::Side::Right),
                &dir,
            )?
            .0
        } else {
            tokenize(
                &tokenizer,
                &ex,
                d.max_length,
                d.side(whet_data::Side::Right),
            )?
        };
        Ok(Split {
            examples: ex,
            encoded,
        })
    };
    let train = tok(train)?;
    let validation = validation.map(tok).transpose()?;
    let test = test.map(tok).transpose()?;

    let (mut model, fresh) = checkpoint.load_classifier(device)?;
    let (counts, adapter) = apply_method(&mut model, recipe, &tokenizer, device)?;
    Ok(Prepared {
        checkpoint,
        tokenizer,
        labels,
        kind,
        inferred_regression,
        train,
        validation,
        test,
        pad_id,
        model,
        counts,
        adapter,
        fresh,
    })
}

/// The sequence-classification heads of the families (trained in full with an adapter).
const HEAD_MODULES: &[&str] = &["classifier", "score"];

/// Name fragments of the top `n` transformer layers (`layer.5.`, `layers.29.`, `h.11.`).
fn top_layers(model: &Classifier, n: usize) -> Vec<String> {
    if n == 0 {
        return vec![];
    }
    let mut layers: Vec<(String, usize)> = model
        .named_params()
        .iter()
        .filter_map(|p| {
            let parts: Vec<&str> = p.name.split('.').collect();
            parts.windows(2).find_map(|w| {
                matches!(w[0], "layer" | "layers" | "h")
                    .then(|| w[1].parse::<usize>().ok().map(|i| (w[0].to_string(), i)))?
            })
        })
        .collect();
    layers.sort_by_key(|(_, i)| *i);
    layers.dedup();
    let max = layers.iter().map(|(_, i)| *i).max().unwrap_or(0);
    layers
        .into_iter()
        .filter(|(_, i)| *i + n > max)
        .map(|(k, i)| format!(".{k}.{i}."))
        .collect()
}

/// Metrics of one split as `eval_*` / `test_*` keys.
pub fn metric_map(
    prefix: &str,
    loss: f64,
    scores: &Scores,
    labels: &Labels,
) -> serde_json::Map<String, serde_json::Value> {
    let mut m = serde_json::Map::new();
    let mut put = |k: &str, v: serde_json::Value| {
        m.insert(format!("{prefix}_{k}"), v);
    };
    put("loss", json!(loss));
    let r = match scores {
        Scores::Classes(r) => r,
        Scores::Regression(r) => {
            put("mse", json!(r.mse));
            put("pearson", json!(r.pearson));
            put("spearmanr", json!(r.spearmanr));
            put("samples", json!(r.samples));
            return m;
        }
    };
    put("accuracy", json!(r.accuracy));
    put("f1", json!(r.macro_avg.f1));
    put("precision", json!(r.macro_avg.precision));
    put("recall", json!(r.macro_avg.recall));
    put("f1_micro", json!(r.micro_avg.f1));
    put("f1_weighted", json!(r.weighted_avg.f1));
    put("matthews_correlation", json!(r.matthews_correlation));
    put("samples", json!(r.samples));
    put(
        "per_class",
        json!(
            labels
                .0
                .iter()
                .zip(&r.per_class)
                .map(|(l, c)| (l.clone(), json!(c)))
                .collect::<serde_json::Map<_, _>>()
        ),
    );
    put("confusion_matrix", json!(r.confusion));
    m
}

/// A model without a token to pad with.
fn no_pad() -> TrainError {
    TrainError::Unsuitable("the model has neither a pad nor an EOS token".into())
}

/// Opens the recipe's model for a classifier head: the checkpoint (its base quantised as the
/// method asks), its tokenizer, and the padding id (EOS for a decoder without a pad token).
pub(crate) fn open_checkpoint(recipe: &Recipe) -> Result<(Checkpoint, TextTokenizer, u32)> {
    let d = &recipe.data;
    let mut checkpoint = Checkpoint::open(&recipe.model)?;
    checkpoint.quantization = crate::method::quant_policy(recipe, HEAD_MODULES);
    if d.max_length > checkpoint.max_positions() {
        return Err(TrainError::ExceedsPositions {
            key: "data.max_length",
            value: d.max_length,
            positions: checkpoint.max_positions(),
            model: recipe.model.clone(),
        });
    }
    let mut tokenizer = checkpoint.tokenizer()?;
    if let Some(template) = d.chat_template()? {
        tokenizer.chat_template = Some(template);
    }
    let pad_id = match checkpoint
        .pad_token_id()
        .or(tokenizer.pad.as_ref().map(|p| p.id))
    {
        Some(p) => p,
        None => {
            // A decoder without a pad token pads with EOS, as the GPT-2 tutorial does.
            let eos = tokenizer.eos.as_ref().map(|e| e.id).ok_or_else(no_pad)?;
            checkpoint.set_pad_token_id(eos);
            eos
        }
    };
    Ok((checkpoint, tokenizer, pad_id))
}

/// Applies the recipe's method to a classifier: full training, the head (and top layers), or
/// an adapter that saves the head with it (peft's `task_type = "SEQ_CLS"`).
pub(crate) fn apply_method(
    model: &mut Classifier,
    recipe: &Recipe,
    tokenizer: &TextTokenizer,
    device: &Device,
) -> Result<(ParamCounts, Option<PeftConfig>)> {
    let head = |name: &str| {
        let module = name.rsplit_once('.').map(|(m, _)| m).unwrap_or(name);
        ["classifier", "score"].iter().any(|k| module.ends_with(k))
    };
    let top = top_layers(model, recipe.head.unfreeze_top_layers);
    let trainable = |name: &str| head(name) || top.iter().any(|p| name.contains(p.as_str()));
    // peft's task_type = "SEQ_CLS" saves the head with the adapter.
    crate::method::apply(
        model,
        recipe,
        Some(&trainable),
        HEAD_MODULES,
        tokenizer,
        device,
    )
}

/// Runs training (from a checkpoint folder when `resume` names one) and returns the summary.
pub fn run_training(
    p: &mut Prepared,
    recipe: &Recipe,
    device: &Device,
    observer: &mut dyn Observer,
    resume: Option<&Path>,
) -> Result<TrainSummary> {
    let eval = p.validation.as_ref().map(|s| s.encoded.as_slice());
    train_classifier(
        &mut p.model,
        &p.train.encoded,
        eval,
        p.labels.len(),
        p.pad_id,
        &recipe.training,
        device,
        observer,
        resume,
    )
}

/// Evaluates a split (padding-free when asked): loss, report, each example's scores.
pub fn evaluate_split(
    p: &Prepared,
    split: &Split,
    batch: usize,
    padding_free: bool,
    device: &Device,
) -> Result<(f64, Scores, Vec<Vec<f32>>)> {
    Ok(evaluate(
        &p.model,
        &split.encoded,
        p.labels.len(),
        batch,
        p.pad_id,
        padding_free,
        device,
    )?)
}

/// The most frequent label of the training split outnumbering the rarest this many times is a
/// strong imbalance.
const IMBALANCE: f64 = 10.0;

/// How many wrong predictions `errors.jsonl` keeps.
const ERRORS: usize = 50;

/// Examples per label of a split (a multi-label example counts once for each of its labels).
pub fn label_counts(split: &Split, n_labels: usize) -> Vec<usize> {
    let mut counts = vec![0; n_labels];
    for e in &split.examples {
        match &e.label {
            Target::Class(c) => counts[*c] += 1,
            Target::Multi(ids) => ids.iter().for_each(|&i| counts[i] += 1),
            Target::Value(_) => {}
        }
    }
    counts
}

/// One line per split with its label counts and shares, and a warning when the training split
/// is strongly imbalanced (or lacks a label).
pub fn distribution_lines(p: &Prepared) -> Vec<String> {
    if p.kind == LabelKind::Real {
        return regression_lines(p);
    }
    let n = p.labels.len();
    let mut lines = vec![];
    for (name, split) in [
        ("train", Some(&p.train)),
        ("validation", p.validation.as_ref()),
        ("test", p.test.as_ref()),
    ] {
        let Some(split) = split else { continue };
        let counts = label_counts(split, n);
        let total = split.examples.len().max(1) as f64;
        let parts: Vec<String> = p
            .labels
            .0
            .iter()
            .zip(&counts)
            .map(|(l, c)| format!("{l} {c} ({:.1}%)", 100.0 * *c as f64 / total))
            .collect();
        lines.push(format!("labels in {name}: {}", parts.join(", ")));
        if name != "train" {
            continue;
        }
        let (max, min) = (
            counts.iter().copied().max().unwrap_or(0),
            counts.iter().copied().min().unwrap_or(0),
        );
        let label = |c: usize| p.labels.0[counts.iter().position(|&x| x == c).unwrap_or(0)].clone();
        if min == 0 && n > 1 {
            lines.push(format!(
                "warning: label {:?} has no training example; the model cannot learn it",
                label(0)
            ));
        } else if min > 0 && max as f64 / min as f64 >= IMBALANCE {
            lines.push(format!(
                "warning: strong imbalance: {:?} has {:.0}x the training examples of {:?}; \
                 accuracy flatters a model that predicts the frequent label (watch F1 and MCC)",
                label(max),
                max as f64 / min as f64,
                label(min)
            ));
        }
    }
    lines
}

/// For a regression: why it is one, when the recipe said classification, and each split's
/// targets (range, mean, standard deviation), so a scale mistake shows before training.
fn regression_lines(p: &Prepared) -> Vec<String> {
    let mut lines = vec![];
    if p.inferred_regression {
        lines.push(
            "labels are real numbers: regression (problem_type \"regression\", one output, mean \
             squared error), as run_glue.py decides from a float label column; set \
             data.label_names to take them as class names"
                .into(),
        );
    }
    for (name, split) in [
        ("train", Some(&p.train)),
        ("validation", p.validation.as_ref()),
        ("test", p.test.as_ref()),
    ] {
        let Some(split) = split else { continue };
        let v: Vec<f64> = split
            .examples
            .iter()
            .filter_map(|e| match e.label {
                Target::Value(x) => Some(x as f64),
                _ => None,
            })
            .collect();
        let n = v.len().max(1) as f64;
        let mean = v.iter().sum::<f64>() / n;
        let sd = (v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n).sqrt();
        let (lo, hi) = v
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
                (a.min(x), b.max(x))
            });
        lines.push(format!(
            "targets in {name}: {lo:.4} to {hi:.4}, mean {mean:.4}, sd {sd:.4}"
        ));
    }
    lines
}

/// The most confident wrong predictions on a split, most confident first (at most `limit`),
/// from its evaluation's probabilities: a JSON object each with the text, the label, the
/// prediction, its confidence and the origin. Single-label: the predicted class's probability;
/// multi-label: the most confident of the labels decided wrongly.
pub fn confident_errors(
    p: &Prepared,
    split: &Split,
    probs: &[Vec<f32>],
    limit: usize,
) -> Vec<serde_json::Value> {
    let names = &p.labels.0;
    let mut wrong: Vec<(f32, serde_json::Value)> = vec![];
    for (e, probs) in split.examples.iter().zip(probs) {
        let (confidence, truth, predicted) = match &e.label {
            Target::Class(c) => {
                let (best, &pb) = probs
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .unwrap_or((0, &0.0));
                if best == *c {
                    continue;
                }
                (pb, json!(names[*c]), json!(names[best]))
            }
            Target::Multi(ids) => {
                let predicted: Vec<usize> = (0..probs.len()).filter(|&k| probs[k] > 0.5).collect();
                let confidence = (0..probs.len())
                    .filter(|k| ids.contains(k) != predicted.contains(k))
                    .map(|k| probs[k].max(1.0 - probs[k]))
                    .fold(None, |m: Option<f32>, x| Some(m.map_or(x, |m| m.max(x))));
                let Some(confidence) = confidence else {
                    continue;
                };
                let names_of =
                    |v: &[usize]| v.iter().map(|&i| names[i].clone()).collect::<Vec<_>>();
                (
                    confidence,
                    json!(names_of(ids)),
                    json!(names_of(&predicted)),
                )
            }
            // Regression: the largest errors, largest first.
            Target::Value(t) => {
                let predicted = probs.first().copied().unwrap_or(f32::NAN);
                let error = (predicted - t).abs();
                wrong.push((
                    error,
                    json!({
                        "text": e.text,
                        "text_pair": e.text_pair,
                        "label": t,
                        "predicted": predicted,
                        "error": error,
                        "origin": e.origin,
                    }),
                ));
                continue;
            }
        };
        wrong.push((
            confidence,
            json!({
                "text": e.text,
                "text_pair": e.text_pair,
                "label": truth,
                "predicted": predicted,
                "confidence": confidence,
                "origin": e.origin,
            }),
        ));
    }
    wrong.sort_by(|a, b| b.0.total_cmp(&a.0));
    wrong.into_iter().take(limit).map(|(_, v)| v).collect()
}

/// Saves the result into `out`: a `peft` adapter folder for LoRA, a `transformers` folder
/// otherwise; both with the tokenizer and `labels.json`. `whet_infer::classification::load`
/// reads it back.
pub fn save(p: &Prepared, recipe: &Recipe, out: &Path) -> Result<()> {
    let problem_type = match p.kind {
        LabelKind::Single => ProblemType::SingleLabelClassification,
        LabelKind::Multi => ProblemType::MultiLabelClassification,
        LabelKind::Real => ProblemType::Regression,
    };
    let d = &recipe.data;
    let columns = Columns {
        text: d.text_column.clone(),
        text_pair: d.text_pair_column.clone(),
        label: d.label_column.clone(),
    };
    let saved = Saved {
        checkpoint: &p.checkpoint,
        tokenizer: &p.tokenizer,
        model: &p.model,
        adapter: p.adapter.as_ref(),
        labels: &p.labels.0,
        problem_type,
        columns: Some(&columns),
    };
    saved.write(recipe, out)
}

/// What a classifier run writes: the model or adapter, the tokenizer, `labels.json`.
pub(crate) struct Saved<'a> {
    pub checkpoint: &'a Checkpoint,
    pub tokenizer: &'a TextTokenizer,
    pub model: &'a Classifier,
    pub adapter: Option<&'a PeftConfig>,
    pub labels: &'a [String],
    pub problem_type: ProblemType,
    /// The data's columns, which `whet eval` reads by default.
    pub columns: Option<&'a Columns>,
}

impl Saved<'_> {
    pub(crate) fn write(&self, recipe: &Recipe, out: &Path) -> Result<()> {
        std::fs::create_dir_all(out).map_err(|e| TrainError::io(out, e))?;
        match self.adapter {
            Some(cfg) => {
                crate::output::save_adapter(self.model, cfg, recipe, "SEQ_CLS", out)?;
            }
            None => {
                self.checkpoint.write_classifier_config(self.labels, out)?;
                crate::output::save_weights(self.model, out)?;
            }
        }
        let tok = self
            .tokenizer
            .inner
            .to_string(true)
            .map_err(TrainError::Tokenizer)?;
        whet_models::fsutil::write_atomic(&out.join("tokenizer.json"), tok.as_bytes())?;
        if recipe.model.is_dir() {
            for f in [
                "tokenizer_config.json",
                "special_tokens_map.json",
                "vocab.txt",
            ] {
                let src = recipe.model.join(f);
                if src.is_file() {
                    std::fs::copy(&src, out.join(f)).map_err(|e| TrainError::io(&src, e))?;
                }
            }
        }
        let mut labels = json!({
            "labels": self.labels,
            "problem_type": self.problem_type,
            "max_length": recipe.data.max_length,
            "base_model": recipe.model,
        });
        if let Some(c) = self.columns {
            labels["text_column"] = json!(c.text);
            labels["text_pair_column"] = json!(c.text_pair);
            labels["label_column"] = json!(c.label);
        }
        whet_models::fsutil::write_atomic(&out.join("labels.json"), labels.to_string().as_bytes())?;
        Ok(())
    }
}

/// A classification run (`sequence-classification`, `multi-label-classification`,
/// `regression`).
pub struct ClassificationTask {
    p: Prepared,
    run: crate::task::Run,
}

impl ClassificationTask {
    /// Prepares the run's data and model.
    pub fn open(run: crate::task::Run) -> Result<Self> {
        Ok(Self {
            p: prepare(&run.recipe, &run.device)?,
            run,
        })
    }

    /// A few texts of the held-out split with their true and predicted labels.
    fn examples(&self, title: &str) -> Result<Vec<String>> {
        let p = &self.p;
        let split = p
            .test
            .as_ref()
            .or(p.validation.as_ref())
            .unwrap_or(&p.train);
        let picked: Vec<Example> = split.examples.iter().take(5).cloned().collect();
        let probs = predict_examples(
            &p.model,
            &p.tokenizer,
            &picked,
            self.run.recipe.data.max_length,
            p.pad_id,
            p.kind,
            &self.run.device,
        )?;
        let mut lines = vec![title.to_string()];
        for (e, pr) in picked.iter().zip(&probs) {
            let best = (0..pr.len())
                .reduce(|b, i| if pr[i] > pr[b] { i } else { b })
                .unwrap_or(0);
            let predicted = match p.kind {
                LabelKind::Multi => Target::Multi((0..pr.len()).filter(|&k| pr[k] > 0.5).collect()),
                LabelKind::Single => Target::Class(best),
                LabelKind::Real => {
                    let truth = match e.label {
                        Target::Value(v) => v,
                        _ => f32::NAN,
                    };
                    lines.push(format!(
                        "  {:<62} true {truth:<10.4} predicted {:<10.4}",
                        one_line(&e.text, 62),
                        pr[0]
                    ));
                    continue;
                }
            };
            lines.push(format!(
                "  {:<62} true {:<10} predicted {:<10} ({:.2})",
                one_line(&e.text, 62),
                one_line(&label_text(&p.labels, &e.label), 10),
                one_line(&label_text(&p.labels, &predicted), 10),
                pr[best]
            ));
        }
        Ok(lines)
    }
}

/// A target as label names: `pos`, or `joy,love` for several labels; a regression target as
/// its number.
fn label_text(labels: &Labels, t: &Target) -> String {
    if let Target::Value(v) = t {
        return format!("{v:.4}");
    }
    let names: Vec<&str> = t.ids().iter().map(|&i| labels.0[i].as_str()).collect();
    names.join(",")
}

/// A report as a table: the classification report, or a regression's error and correlations.
pub fn scores_table(title: &str, loss: f64, scores: &Scores, labels: &[String]) -> String {
    match scores {
        Scores::Classes(r) => report_table(title, loss, r, labels),
        Scores::Regression(r) => format!(
            "{title}\n  loss {loss:.4} | MSE {:.4} | Pearson {:.4} | Spearman {:.4} | {} samples\n",
            r.mse, r.pearson, r.spearmanr, r.samples
        ),
    }
}

/// A classification report as a table: the headline metrics, then one row per label.
pub fn report_table(
    title: &str,
    loss: f64,
    r: &whet_metrics::ClassificationReport,
    labels: &[String],
) -> String {
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
            one_line(l, 14),
            c.precision,
            c.recall,
            c.f1,
            c.support
        ));
    }
    s
}

impl Task for ClassificationTask {
    fn split_texts(&self) -> Vec<(&'static str, Vec<whet_data::leakage::Text>)> {
        let p = &self.p;
        crate::task::splits(&p.train, p.validation.as_ref(), p.test.as_ref())
            .map(|(name, split)| {
                let texts = split.examples.iter().map(|e| whet_data::leakage::Text {
                    origin: e.origin.clone(),
                    text: match &e.text_pair {
                        Some(pair) => format!("{}\n{pair}", e.text),
                        None => e.text.clone(),
                    },
                });
                (name, texts.collect())
            })
            .collect()
    }

    fn describe(&self) -> Vec<String> {
        let (p, recipe) = (&self.p, &self.run.recipe);
        let mut lines = vec![
            format!(
                "model {} ({}), method {:?}, {} labels: {}",
                recipe.model.display(),
                p.checkpoint.family(),
                recipe.method,
                p.labels.len(),
                p.labels.0.join(", ")
            ),
            format!(
                "data: {} train / {} validation / {} test examples, max_length {}",
                p.train.encoded.len(),
                p.validation.as_ref().map_or(0, |s| s.encoded.len()),
                p.test.as_ref().map_or(0, |s| s.encoded.len()),
                recipe.data.max_length
            ),
        ];
        lines.extend(distribution_lines(p));
        lines.extend(crate::task::closing_lines(&p.fresh, &p.counts));
        lines
    }

    fn plan(&mut self) -> Option<crate::plan::MemoryPlan> {
        let p = &mut self.p;
        let lens = p.train.encoded.iter().map(|e| (e.ids.len(), 0)).collect();
        let args = &self.run.recipe.training;
        Some(crate::plan::plan_of(
            &p.checkpoint,
            &mut p.model,
            args,
            lens,
            false,
            1,
        ))
    }

    /// The exact splits of the run as JSONL (`text`, `label` name), so a run can be repeated by
    /// another tool, e.g. the reference script.
    fn write_data(&self, dir: &Path) -> Result<()> {
        let p = &self.p;
        std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
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
                    Target::Value(v) => json!(v),
                };
                let mut row = json!({"text": e.text, "label": label});
                if let Some(pair) = &e.text_pair {
                    row["text_pair"] = json!(pair);
                }
                text.push_str(&row.to_string());
                text.push('\n');
            }
            whet_text::write_atomic(&dir.join(format!("{name}.jsonl")), text.as_bytes())?;
        }
        Ok(())
    }

    fn sample(&mut self, before: bool) -> Result<Vec<String>> {
        self.examples(if before {
            "before training (random head):"
        } else {
            "after training:"
        })
    }

    fn total_steps(&self) -> usize {
        self.run
            .recipe
            .training
            .total_steps(self.p.train.encoded.len())
    }

    fn labels(&self) -> Vec<String> {
        self.p.labels.0.clone()
    }

    fn train(&mut self, observer: &mut dyn Observer) -> Result<TrainSummary> {
        let run = &self.run;
        run_training(
            &mut self.p,
            &run.recipe,
            &run.device,
            observer,
            run.resume.as_deref(),
        )
    }

    fn evaluate(&mut self, _summary: &TrainSummary) -> Result<Outcome> {
        let p = &self.p;
        let batch = self.run.recipe.training.per_device_eval_batch_size;
        let padding_free = self.run.recipe.padding_free();
        let mut out = Outcome::default();
        if let Some(v) = &p.validation {
            let (loss, r, probs) = evaluate_split(p, v, batch, padding_free, &self.run.device)?;
            out.results.extend(metric_map("eval", loss, &r, &p.labels));
            let errors = confident_errors(p, v, &probs, ERRORS);
            out.lines.push(format!(
                "errors.jsonl: the {} {} on validation",
                errors.len(),
                if p.kind == LabelKind::Real {
                    "largest errors"
                } else {
                    "most confident wrong predictions"
                }
            ));
            let text: String = errors.iter().map(|e| format!("{e}\n")).collect();
            out.files.push(("errors.jsonl".into(), text.into_bytes()));
        }
        if let Some(t) = &p.test {
            let (loss, r, _) = evaluate_split(p, t, batch, padding_free, &self.run.device)?;
            out.results.extend(metric_map("test", loss, &r, &p.labels));
            out.lines
                .push(scores_table("test set", loss, &r, &p.labels.0));
        }
        Ok(out)
    }

    fn save(&self, out: &Path) -> Result<()> {
        save(&self.p, &self.run.recipe, out)
    }

    fn counts(&self) -> ParamCounts {
        self.p.counts
    }

    fn report(&self) -> Report {
        let regression = self.p.kind == LabelKind::Real;
        Report {
            unit: "samples",
            curve_metric: if regression { "pearson" } else { "accuracy" },
            adapter: self.p.adapter.is_some(),
            files: if regression {
                "all_results.json, trainer_state.json, recipe.resolved.toml, loss_curve.png: train loss faint with its smoothed curve in blue, eval loss red and eval Pearson correlation green, squares at the evaluations"
            } else {
                "all_results.json, trainer_state.json, recipe.resolved.toml, loss_curve.png: train loss faint with its smoothed curve in blue, eval loss red and eval accuracy green, squares at the evaluations"
            },
        }
    }
}
