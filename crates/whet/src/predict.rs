//! `whet eval` and `whet predict`: a trained classifier on a labelled file, and predictions of a
//! trained classifier or question-answering model, as `pipeline(...)` returns them.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::json;
use whet_data::{Columns, Table, examples, tokenize};
use whet_infer::classification as classify;
use whet_infer::question_answering as qa;
use whet_train::classification::{metric_map, scores_table};

/// The columns `whet eval` reads: each as given, else as the model was trained on
/// (`labels.json`), else `text` / no pair / `label`.
pub struct EvalColumns {
    pub text: Option<String>,
    pub text_pair: Option<String>,
    pub label: Option<String>,
}

/// `whet eval`: loss and the classification (or regression) report of a trained classifier
/// on a labelled file.
pub fn eval(
    model: &Path,
    data: &Path,
    columns: EvalColumns,
    encoding: &str,
    batch: usize,
) -> Result<()> {
    refuse_token_classifier(model)?;
    if is_question_answering(model) {
        if columns.text.is_some() || columns.text_pair.is_some() || columns.label.is_some() {
            bail!(
                "--text-column, --text-pair-column and --label-column are for classifiers; {} is \
                 a question-answering model, which reads the question, context and answers \
                 columns (SQuAD's format)",
                model.display()
            );
        }
        return eval_question_answering(model, data, encoding, batch);
    }
    let device = crate::device()?.device;
    let t = classify::load(model, &device)?;
    let table = Table::read(data, encoding.parse().map_err(|e: String| anyhow!(e))?)?;
    let trained = t.columns.clone();
    let cols = Columns {
        text: columns
            .text
            .or(trained.as_ref().map(|c| c.text.clone()))
            .unwrap_or_else(|| "text".into()),
        text_pair: columns
            .text_pair
            .or(trained.as_ref().and_then(|c| c.text_pair.clone())),
        label: columns
            .label
            .or(trained.map(|c| c.label))
            .unwrap_or_else(|| "label".into()),
    };
    let ex = examples(&table, &cols, &t.labels, t.kind)?;
    let enc = tokenize(&t.tokenizer, &ex, t.max_length, Default::default())?;
    let (loss, r, _) = whet_train::evaluate(
        &t.model,
        &enc,
        t.labels.len(),
        batch,
        t.pad_id,
        true,
        &device,
    )?;
    println!(
        "{}",
        scores_table(
            &format!("{} on {}", model.display(), data.display()),
            loss,
            &r,
            &t.labels.0
        )
    );
    println!(
        "{}",
        serde_json::Value::Object(metric_map("eval", loss, &r, &t.labels))
    );
    Ok(())
}

/// Whether a model folder holds a model with the head a peft `task_type` or a
/// `*For{class}` config names.
fn has_head(dir: &Path, task_type: &str, class: &str) -> bool {
    let json = |name: &str| -> Option<serde_json::Value> {
        serde_json::from_str(&std::fs::read_to_string(dir.join(name)).ok()?).ok()
    };
    json("adapter_config.json").is_some_and(|c| c["task_type"] == task_type)
        || json("config.json").is_some_and(|c| {
            c["architectures"][0]
                .as_str()
                .is_some_and(|a| a.ends_with(class))
        })
}

/// Whether a model folder holds a question-answering model: `qa.json` (whet's), a peft
/// adapter of task type `QUESTION_ANS`, or a `*ForQuestionAnswering` config.
fn is_question_answering(dir: &Path) -> bool {
    dir.join("qa.json").is_file() || has_head(dir, "QUESTION_ANS", "ForQuestionAnswering")
}

/// A token classifier is not read by `whet eval` and `whet predict` yet: said by name rather
/// than failing as a classifier without its pooler.
fn refuse_token_classifier(dir: &Path) -> Result<()> {
    if has_head(dir, "TOKEN_CLS", "ForTokenClassification") {
        bail!(
            "{} is a token-classification model: whet eval and whet predict do not read it yet \
             (its run's all_results.json holds the evaluation; transformers' \
             pipeline(\"token-classification\") loads the folder)",
            dir.display()
        );
    }
    Ok(())
}

/// `whet eval` of a question-answering model on SQuAD-format data: loss, exact match and F1,
/// windowed and scored as the training run's evaluation (run_qa.py's post-processing).
fn eval_question_answering(model: &Path, data: &Path, encoding: &str, batch: usize) -> Result<()> {
    let device = crate::device()?.device;
    let t = qa::load(model, &device)?;
    let table = Table::read(data, encoding.parse().map_err(|e: String| anyhow!(e))?)?;
    let examples = whet_data::qa_examples(&table, &whet_data::QaColumns::default())?;
    let windows = whet_train::question_answering::QaWindows {
        max_length: t.max_length,
        doc_stride: t.doc_stride,
        max_answer_length: t.max_answer_length,
        padding_free: t.padding_free,
        pad_id: t.pad_id,
    };
    let e = whet_train::question_answering::evaluate_examples(
        &t.model,
        &t.tokenizer,
        &examples,
        windows,
        batch,
        &device,
    )?;
    println!(
        "{} on {}\n  loss {:.4} | exact match {:.2} | F1 {:.2} | {} questions\n",
        model.display(),
        data.display(),
        e.loss,
        e.metrics["exact_match"],
        e.metrics["f1"],
        examples.len()
    );
    let mut results = e.results("eval");
    results.insert("eval_samples".into(), examples.len().into());
    println!("{}", serde_json::Value::Object(results));
    Ok(())
}

/// `whet predict --task text-classification`: the top label (or the top `k`) per text (or pair
/// of texts, `pairs` matching `texts` one to one), as JSON lines.
pub fn predict(
    model: &Path,
    mut texts: Vec<String>,
    mut pairs: Vec<String>,
    file: Option<PathBuf>,
    top_k: Option<usize>,
) -> Result<()> {
    if !pairs.is_empty() && (file.is_some() || pairs.len() != texts.len()) {
        bail!(
            "--text-pair: {} given for {} --text{}; give one for each --text, as the pipeline's \
             {{text, text_pair}}",
            pairs.len(),
            texts.len(),
            if file.is_some() {
                " and a --file of single texts"
            } else {
                ""
            }
        );
    }
    refuse_token_classifier(model)?;
    let device = crate::device()?.device;
    let t = classify::load(model, &device)?;
    match file {
        // A data file (JSONL, JSON, CSV, Parquet, ...): the columns the model was trained on.
        Some(f) if is_table(&f) => {
            if !texts.is_empty() {
                bail!(
                    "--file {} is a data file: give it or --text, not both",
                    f.display()
                );
            }
            let table = Table::read(&f, Default::default())?;
            let trained = t.columns.clone();
            let text = trained.as_ref().map_or("text", |c| c.text.as_str());
            let pair = trained.as_ref().and_then(|c| c.text_pair.as_deref());
            let columns: Vec<&str> = [Some(text), pair].into_iter().flatten().collect();
            table.require(&columns)?;
            for (line, row) in &table.rows {
                let cell = |c: &str| match row.get(c) {
                    Some(serde_json::Value::String(s)) => Ok(s.clone()),
                    Some(serde_json::Value::Number(n)) => Ok(n.to_string()),
                    other => Err(anyhow!(
                        "{}: column {c:?}: expected text, got {}",
                        table.origin(*line),
                        other.unwrap_or(&serde_json::Value::Null)
                    )),
                };
                texts.push(cell(text)?);
                if let Some(p) = pair {
                    pairs.push(cell(p)?);
                }
            }
        }
        Some(f) => {
            let content = std::fs::read_to_string(&f)
                .with_context(|| format!("cannot read {}", f.display()))?;
            texts.extend(
                content
                    .lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(String::from),
            );
        }
        None => {}
    }
    if texts.is_empty() {
        bail!("nothing to classify: give --text or --file");
    }
    let probs = t.predict_pairs(&texts, (!pairs.is_empty()).then_some(&pairs[..]), &device)?;
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

/// Whether `--file` is a data file read as a table (by its extension; `.txt` and files without
/// one are a text a line).
fn is_table(f: &Path) -> bool {
    let name = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    whet_data::table::is_data_file(name) && !name.ends_with(".txt") && !name.ends_with(".text")
}

/// `whet predict --task question-answering`: JSON lines `{"score", "start", "end", "answer"}`
/// as `pipeline("question-answering")` returns them.
pub fn answer(model_dir: &Path, question: &str, context: &str, top_k: Option<usize>) -> Result<()> {
    let device = crate::device()?.device;
    let t = qa::load(model_dir, &device)?;
    let answers = t.answer(question, context, 15, top_k.unwrap_or(1), &device)?;
    for a in answers {
        println!("{}", json!(a));
    }
    Ok(())
}
