//! A recipe from a model and a data file (`whet init`, and `whet train --model --data` without a
//! recipe): the task from the data's columns and the model's family, the method LoRA, a seeded
//! validation split of the one file, and `TrainingArguments`' defaults otherwise. The recipe is
//! written out, so the next run starts from it and every choice can be read and changed.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use whet_data::table::{Encoding, Table};
use whet_models::{Checkpoint, Family};

/// What was inferred, for the person to read, and the recipe's TOML.
pub struct Inferred {
    /// The recipe's TOML, `header` first.
    pub toml: String,
    /// A comment line saying where the recipe came from.
    pub header: String,
    pub lines: Vec<String>,
}

/// Columns a text column goes by in the datasets people fine-tune on.
const TEXT_COLUMNS: [&str; 6] = ["text", "sentence", "content", "review", "tweet", "document"];
/// Columns a class label goes by.
const LABEL_COLUMNS: [&str; 6] = ["label", "labels", "class", "category", "target", "score"];
/// Pairs of text columns, as GLUE's tasks name them (MRPC, RTE, STS-B, WNLI; MNLI; QQP; QNLI),
/// and the pipeline's own `text` / `text_pair`.
const PAIR_COLUMNS: [(&str, &str); 5] = [
    ("sentence1", "sentence2"),
    ("premise", "hypothesis"),
    ("question1", "question2"),
    ("question", "sentence"),
    ("text", "text_pair"),
];

/// The model a recipe is inferred for: a local path or a Hub repo id, with `from_pretrained`'s
/// `revision` and `gguf_file`.
pub struct ModelSpec<'a> {
    pub model: &'a Path,
    pub revision: Option<&'a str>,
    pub gguf_file: Option<&'a str>,
}

/// The task, method and columns for `model` trained on `data`; `task` and `method` override
/// what would be inferred.
pub fn infer(
    spec: &ModelSpec,
    data: &Path,
    task: Option<&str>,
    method: Option<&str>,
) -> Result<Inferred> {
    // Local paths absolute, so that the recipe works from wherever it is written and run; a
    // Hub id or an hf:// path as given.
    let absolute = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let (model, data) = (&absolute(spec.model), &absolute(data));
    let checkpoint = Checkpoint::from_pretrained(model, spec.revision, spec.gguf_file)
        .with_context(|| format!("--model {}: cannot open it as a model", model.display()))?;
    let decoder = matches!(checkpoint.family(), Family::Gpt2 | Family::Llama);
    // A folder of split files (data/train-*.parquet beside data/test-*.parquet) is its splits,
    // as load_dataset takes it: the columns come from the training files.
    let splits = whet_data::table::split_sources(data)
        .with_context(|| format!("--data {}: cannot read it as a dataset", data.display()))?;
    let train_source = match splits.as_ref().and_then(|s| s.get("train")) {
        Some(t) => PathBuf::from(t),
        None => data.clone(),
    };
    let table = Table::read(&train_source, Encoding::Utf8)
        .with_context(|| format!("--data {}: cannot read it as a dataset", data.display()))?;
    if table.rows.is_empty() {
        bail!("--data {}: the file has no rows", data.display());
    }
    let has = |c: &str| table.columns.iter().any(|x| x == c);
    let first = |names: &[&str]| names.iter().find(|c| has(c)).map(|c| c.to_string());
    let mut lines = vec![];
    let mut data_keys: Vec<(String, toml::Value)> = vec![];
    let inferred_task = if has("chosen") && has("rejected") {
        lines.push("columns chosen / rejected: preference pairs".to_string());
        if decoder { "dpo" } else { "reward-model" }
    } else if has("question") && has("context") && has("answers") {
        lines.push("columns question / context / answers: extractive question answering".into());
        "question-answering"
    } else if let (true, Some(tags)) = (
        has("tokens"),
        table
            .columns
            .iter()
            .find(|c| c.ends_with("_tags") || *c == "tags"),
    ) {
        // run_ner.py's layout: tokens, and ner_tags (or pos_tags, chunk_tags, ...).
        lines.push(format!(
            "columns tokens / {tags}: a tag a word, token classification"
        ));
        data_keys.push(("text_column".into(), "tokens".into()));
        data_keys.push(("label_column".into(), tags.clone().into()));
        "token-classification"
    } else if has("paragraphs") && !decoder {
        lines.push(
            "column paragraphs: SQuAD's own JSON (contexts with their questions and answers), \
             extractive question answering"
                .into(),
        );
        "question-answering"
    } else if has("messages") {
        lines.push("column messages: conversations, rendered with the chat template".into());
        data_keys.push(("messages_column".into(), "messages".into()));
        "causal-lm"
    } else if has("prompt") && has("completion") {
        lines.push("columns prompt / completion: the loss on the completion".into());
        data_keys.push((
            "template".into(),
            table_of(&[
                ("prompt", "{prompt}".into()),
                ("completion", "{completion}".into()),
            ]),
        ));
        "causal-lm"
    } else if has("instruction") && has("output") && decoder {
        lines.push(format!(
            "columns instruction{} / output: the Alpaca template, the loss on the output",
            if has("input") { " / input" } else { "" }
        ));
        data_keys.push(("template".into(), "alpaca".into()));
        "causal-lm"
    } else if let (Some((text, pair)), Some(label)) = (
        PAIR_COLUMNS
            .iter()
            .find(|(a, b)| has(a) && has(b))
            .map(|(a, b)| (a.to_string(), Some(b.to_string())))
            .or_else(|| first(&TEXT_COLUMNS).map(|t| (t, None))),
        first(&LABEL_COLUMNS),
    ) {
        let multi = table
            .rows
            .iter()
            .any(|(_, r)| r.get(&label).is_some_and(|v| v.is_array()));
        let real = !multi && whet_data::real_valued(&table, &label);
        let texts = match &pair {
            Some(p) => format!("{text} + {p}"),
            None => text.clone(),
        };
        lines.push(format!(
            "columns {texts} / {label}: {}",
            if multi {
                "several labels a text"
            } else if real {
                "a real number a text (regression, as run_glue.py decides from a float column)"
            } else if pair.is_some() {
                "one label a pair of texts"
            } else {
                "one label a text"
            }
        ));
        data_keys.push(("text_column".into(), text.clone().into()));
        if let Some(p) = &pair {
            data_keys.push(("text_pair_column".into(), p.clone().into()));
        }
        data_keys.push(("label_column".into(), label.clone().into()));
        if multi {
            "multi-label-classification"
        } else if real {
            "regression"
        } else {
            "sequence-classification"
        }
    } else if let (Some(text), true) = (first(&TEXT_COLUMNS), decoder) {
        lines.push(format!(
            "column {text} and a decoder: next-token training on the text"
        ));
        data_keys.push(("text_column".into(), text.into()));
        "causal-lm"
    } else {
        return Err(anyhow!(
            "--data {}: cannot tell the task from its columns ({}); expected text + label \
             (classification; a pair such as sentence1 + sentence2 + label; a label of real \
             numbers: regression), chosen + rejected (preferences), messages or prompt + \
             completion (SFT), instruction + output with a decoder (Alpaca), question + context \
             + answers (QA), tokens + ner_tags (token classification), or text alone with a \
             decoder; name it with --task and the columns with `whet init` and an edit",
            data.display(),
            table.columns.join(", ")
        ));
    };
    let task = task.unwrap_or(inferred_task);
    let classifier = |t: &str| {
        matches!(
            t,
            "sequence-classification" | "multi-label-classification" | "regression"
        )
    };
    if task != inferred_task && !(classifier(task) && classifier(inferred_task)) {
        // The columns found were for the inferred task; another task keeps only the text.
        data_keys.retain(|(k, _)| k == "text_column");
    }
    let method = method.unwrap_or("lora");
    lines.insert(
        0,
        format!(
            "task {task}, method {method}{}",
            if task == inferred_task {
                ""
            } else {
                " (task as given)"
            }
        ),
    );

    // One file: a seeded tenth for validation, evaluated each epoch, when there is enough.
    let validation = (table.rows.len() / 10).min(1000);
    let stem = |p: &Path| {
        p.file_stem()
            .map(|s| {
                s.to_string_lossy()
                    .chars()
                    .map(|c| {
                        if c.is_alphanumeric() || c == '_' {
                            c
                        } else {
                            '-'
                        }
                    })
                    .collect::<String>()
            })
            .unwrap_or_else(|| "run".into())
    };
    let output_dir = PathBuf::from("runs").join(format!("{}-{}", stem(model), stem(data)));
    let mut recipe = toml::Table::new();
    recipe.insert("model".into(), model.display().to_string().into());
    if let Some(r) = spec.revision {
        recipe.insert("revision".into(), r.into());
    }
    if let Some(g) = spec.gguf_file {
        recipe.insert("gguf_file".into(), g.into());
    }
    recipe.insert("task".into(), task.into());
    recipe.insert("method".into(), method.into());
    let mut d = toml::Table::new();
    d.insert("train".into(), train_source.display().to_string().into());
    for (split, source) in splits.iter().flatten() {
        if *split != "train" {
            d.insert(split.to_string(), source.clone().into());
            lines.push(format!("{split}: {source} (the folder's {split} files)"));
        }
    }
    // The folder's own validation files replace the seeded tenth.
    let d_has_validation = splits
        .as_ref()
        .is_some_and(|s| s.contains_key("validation"));
    let validation = if d_has_validation { 0 } else { validation };
    for (k, v) in data_keys {
        d.insert(k, v);
    }
    if validation >= 1 {
        d.insert(
            "split".into(),
            table_of(&[
                ("validation", (validation as i64).into()),
                ("seed", 42.into()),
            ]),
        );
        lines.push(format!(
            "validation: {validation} of the {} rows, seed 42",
            table.rows.len()
        ));
    }
    recipe.insert("data".into(), toml::Value::Table(d));
    let mut t = toml::Table::new();
    t.insert("output_dir".into(), output_dir.display().to_string().into());
    // LoRA's usual rate (peft's examples, trl's SFT scripts); TrainingArguments' for the rest.
    let lr = if method == "full" { 5e-5 } else { 2e-4 };
    t.insert("learning_rate".into(), lr.into());
    t.insert(
        "eval_strategy".into(),
        if validation >= 1 || d_has_validation {
            "epoch"
        } else {
            "no"
        }
        .into(),
    );
    t.insert("logging_steps".into(), 10.into());
    recipe.insert("training".into(), toml::Value::Table(t));
    let header = format!(
        "# Written by whet from {} and {}: every key can be changed (see `whet train --help`).",
        model.display(),
        data.display(),
    );
    let toml = format!("{header}\n{}", toml::to_string(&recipe)?);
    // The recipe must load as written.
    whet_train::Recipe::parse(&toml, &[]).map_err(|e| anyhow!("the inferred recipe: {e}"))?;
    Ok(Inferred {
        toml,
        header,
        lines,
    })
}

fn table_of(pairs: &[(&str, toml::Value)]) -> toml::Value {
    toml::Value::Table(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
    )
}
