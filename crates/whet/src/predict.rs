//! `whet eval` and `whet predict`: a trained classifier on a labelled file, and predictions of a
//! trained classifier or question-answering model, as `pipeline(...)` returns them.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::json;
use whet_data::{Columns, Table, examples, tokenize};
use whet_infer::classification as classify;
use whet_infer::question_answering as qa;
use whet_train::classification::{metric_map, report_table};

/// `whet eval`: loss and the classification report of a trained classifier on a labelled
/// file.
pub fn eval(
    model: &Path,
    data: &Path,
    text_column: &str,
    label_column: &str,
    encoding: &str,
    batch: usize,
) -> Result<()> {
    let device = crate::device()?.device;
    let t = classify::load(model, &device)?;
    let table = Table::read(data, encoding.parse().map_err(|e: String| anyhow!(e))?)?;
    let cols = Columns {
        text: text_column.into(),
        text_pair: None,
        label: label_column.into(),
    };
    let ex = examples(&table, &cols, &t.labels, t.multi_label)?;
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
        report_table(
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

/// `whet predict --task text-classification`: the top label (or the top `k`) per text, as JSON
/// lines.
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
    let device = crate::device()?.device;
    let t = classify::load(model, &device)?;
    let probs = t.predict(&texts, &device)?;
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
