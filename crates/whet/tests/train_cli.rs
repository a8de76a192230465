//! `whet train`, `whet predict` and `whet eval` end to end on MiniLM with a few examples, and
//! the errors bad recipes and data get.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn minilm() -> std::path::PathBuf {
    asset("minilm")
}

const POS: [&str; 6] = [
    "great movie",
    "I loved it",
    "wonderful acting",
    "a joy to watch",
    "brilliant and fun",
    "best film this year",
];
const NEG: [&str; 6] = [
    "terrible movie",
    "I hated it",
    "awful acting",
    "a waste of time",
    "boring and dull",
    "worst film this year",
];

fn write_data(dir: &Path) -> (PathBuf, PathBuf) {
    let line = |t: &str, l: &str| format!("{{\"text\": \"{t}\", \"label\": \"{l}\"}}\n");
    let mut train = String::new();
    for i in 0..4 {
        for (p, n) in POS.iter().zip(NEG) {
            train += &line(&format!("{p} {i}"), "pos");
            train += &line(&format!("{n} {i}"), "neg");
        }
    }
    let mut val = String::new();
    for (p, n) in POS.iter().zip(NEG) {
        val += &line(p, "pos");
        val += &line(n, "neg");
    }
    let (t, v) = (dir.join("train.jsonl"), dir.join("val.jsonl"));
    std::fs::write(&t, train).unwrap();
    std::fs::write(&v, val).unwrap();
    (t, v)
}

fn recipe(dir: &Path, method: &str, extra: &str) -> PathBuf {
    let (t, v) = write_data(dir);
    let text = format!(
        r#"model = "{}"
method = "{method}"
[data]
train = "{}"
validation = "{}"
max_length = 32
{extra}
[training]
output_dir = "{}"
learning_rate = 1e-3
per_device_train_batch_size = 8
max_steps = 3
eval_strategy = "epoch"
logging_steps = 1
"#,
        minilm().display(),
        t.display(),
        v.display(),
        dir.join("out").display()
    );
    let p = dir.join("recipe.toml");
    std::fs::write(&p, text).unwrap();
    p
}

/// A resumed run started at checkpoint `from` and ran exactly the steps left to the run's
/// end (`train_steps` in `all_results.json`), no more, no fewer.
fn assert_resumed(text: &str, from: usize, out: &Path) {
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("all_results.json")).unwrap())
            .unwrap();
    let end = results["train_steps"].as_u64().unwrap() as usize;
    assert!(end > from, "the run ended at {end}, not after {from}");
    let want = format!(
        "resumed at step {from}: ran steps {}..={end} ({} optimizer steps in this process)",
        from + 1,
        end - from
    );
    assert!(text.contains(&want), "expected {want:?} in:\n{text}");
}

const LORA: &str = "[lora]\nr = 4\nlora_alpha = 8\ntarget_modules = [\"query\", \"value\"]";

#[test]
fn lora_training_writes_a_peft_adapter_that_predict_and_eval_use() {
    let dir = tempfile::tempdir().unwrap();
    let r = recipe(dir.path(), "lora", LORA);
    let text = ok(&["train", r.to_str().unwrap()]);
    // peft's count: 12 adapted layers x (384 x 4 + 4 x 384) + classifier (384 x 2 + 2) trainable;
    // all = MiniLM's 22,713,216 + classifier + its peft copy + adapters.
    assert!(
        text.contains("trainable params: 37,634 || all params: 22,751,620"),
        "{text}"
    );
    assert!(
        text.contains("before training") && text.contains("after training"),
        "{text}"
    );
    let out = dir.path().join("out");
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "all_results.json",
        "trainer_state.json",
        "recipe.resolved.toml",
        "labels.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let png = std::fs::read(out.join("loss_curve.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("all_results.json")).unwrap())
            .unwrap();
    for k in [
        "eval_accuracy",
        "eval_f1",
        "eval_matthews_correlation",
        "train_runtime",
        "train_samples_per_second",
        "train_tokens_per_second",
        "train_peak_rss_mb",
    ] {
        assert!(
            results[k].is_number(),
            "all_results.json lacks {k}: {results}"
        );
    }
    assert_eq!(results["train_steps"], 3);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 4);

    let pred = ok(&[
        "predict",
        "--model",
        out.to_str().unwrap(),
        "--text",
        "what a great movie",
        "--text",
        "dull",
    ]);
    let lines: Vec<serde_json::Value> = pred
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for l in &lines {
        assert!(
            ["pos", "neg"].contains(&l["label"].as_str().unwrap()),
            "{l}"
        );
        let s = l["score"].as_f64().unwrap();
        assert!((0.5..=1.0).contains(&s), "{l}");
    }
    let top = ok(&[
        "predict",
        "--model",
        out.to_str().unwrap(),
        "--text",
        "fine",
        "--top-k",
        "2",
    ]);
    let top: serde_json::Value = serde_json::from_str(top.trim()).unwrap();
    assert_eq!(top.as_array().unwrap().len(), 2);

    let val = dir.path().join("val.jsonl");
    let e = ok(&[
        "eval",
        "--model",
        out.to_str().unwrap(),
        "--data",
        val.to_str().unwrap(),
    ]);
    let metrics: serde_json::Value = serde_json::from_str(e.lines().last().unwrap()).unwrap();
    assert_eq!(
        metrics["eval_accuracy"], results["eval_accuracy"],
        "eval reproduces the training-time evaluation"
    );
}

/// The leakage check runs before training: a validation file holding a training row (up to
/// whitespace) is reported and written to leakage.json; with `data.leakage = "error"` the run
/// refuses to start, naming the file; `"off"` skips the check.
#[test]
fn leaked_validation_rows_are_reported_or_refused() {
    let dir = tempfile::tempdir().unwrap();
    let r = recipe(dir.path(), "head", "");
    let (train, _) = write_data(dir.path());
    let first = std::fs::read_to_string(&train)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_string();
    let row: serde_json::Value = serde_json::from_str(&first).unwrap();
    let leaked = dir.path().join("leaked.jsonl");
    let copy = serde_json::json!({"text": format!("  {}  ", row["text"].as_str().unwrap()), "label": row["label"]});
    std::fs::write(
        &leaked,
        format!(
            "{copy}\n{{\"text\": \"an unrelated sentence about weather\", \"label\": \"neg\"}}\n"
        ),
    )
    .unwrap();
    let validation = format!("data.validation=\"{}\"", leaked.display());
    let text = ok(&[
        "train",
        r.to_str().unwrap(),
        "--set",
        &validation,
        "--set",
        "training.max_steps=1",
    ]);
    assert!(
        text.contains("validation rows found in train: 1 exact"),
        "{text}"
    );
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("out/leakage.json")).unwrap(),
    )
    .unwrap();
    let f = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["split"] == "validation")
        .unwrap();
    assert_eq!(f["exact"], 1);
    assert!(
        f["examples"][0][0]
            .as_str()
            .unwrap()
            .contains("leaked.jsonl:1"),
        "{f}"
    );
    let e = err(&[
        "train",
        r.to_str().unwrap(),
        "--set",
        &validation,
        "--set",
        "data.leakage=\"error\"",
    ]);
    assert!(
        e.contains("data.leakage") && e.contains("leakage.json"),
        "{e}"
    );
    let text = ok(&[
        "train",
        r.to_str().unwrap(),
        "--set",
        &validation,
        "--set",
        "data.leakage=\"off\"",
        "--set",
        "training.max_steps=1",
    ]);
    assert!(!text.contains("leakage check"), "{text}");
}

/// A classifier's data report: each split's label counts, a warning when one label has 10x the
/// training examples of another, and after training the most confident wrong predictions on
/// validation in errors.jsonl (each wrong, most confident first).
#[test]
fn label_counts_imbalance_and_confident_errors_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let r = recipe(dir.path(), "head", "");
    let line = |t: &str, l: &str| format!("{{\"text\": \"{t}\", \"label\": \"{l}\"}}\n");
    let mut train = String::new();
    for i in 0..30 {
        train += &line(&format!("{} {i}", POS[i % POS.len()]), "pos");
    }
    train += &line(NEG[0], "neg");
    train += &line(NEG[1], "neg");
    let mut val = String::new();
    for (p, n) in POS.iter().zip(NEG) {
        val += &line(&format!("{p}!"), "pos");
        val += &line(&format!("{n}!"), "neg");
    }
    let (t, v) = (
        dir.path().join("imbalanced.jsonl"),
        dir.path().join("val2.jsonl"),
    );
    std::fs::write(&t, train).unwrap();
    std::fs::write(&v, val).unwrap();
    let text = ok(&[
        "train",
        r.to_str().unwrap(),
        "--set",
        &format!("data.train=\"{}\"", t.display()),
        "--set",
        &format!("data.validation=\"{}\"", v.display()),
        "--set",
        "training.max_steps=1",
    ]);
    assert!(
        text.contains("labels in train: neg 2 (6.2%), pos 30 (93.8%)"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "labels in validation: neg {n} (50.0%), pos {n} (50.0%)",
            n = POS.len()
        )),
        "{text}"
    );
    assert!(
        text.contains(
            "warning: strong imbalance: \"pos\" has 15x the training examples of \"neg\""
        ),
        "{text}"
    );
    let errors = std::fs::read_to_string(dir.path().join("out/errors.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = errors
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!rows.is_empty() && rows.len() <= 2 * POS.len(), "{errors}");
    for w in rows.windows(2) {
        assert!(
            w[0]["confidence"].as_f64() >= w[1]["confidence"].as_f64(),
            "{errors}"
        );
    }
    for row in &rows {
        assert_ne!(row["label"], row["predicted"], "{row}");
        assert!(
            row["origin"].as_str().unwrap().contains("val2.jsonl:"),
            "{row}"
        );
        let c = row["confidence"].as_f64().unwrap();
        assert!((0.5..=1.0).contains(&c), "{row}");
    }
    assert!(text.contains("errors.jsonl: the"), "{text}");
    assert!(
        text.contains("also wrote: leakage.json, errors.jsonl"),
        "{text}"
    );
    // A label named but absent from the training split.
    let text = ok(&[
        "train",
        r.to_str().unwrap(),
        "--set",
        &format!("data.train=\"{}\"", t.display()),
        "--set",
        &format!("data.validation=\"{}\"", v.display()),
        "--set",
        "data.label_names=[\"neg\", \"pos\", \"other\"]",
        "--set",
        "training.max_steps=1",
    ]);
    assert!(
        text.contains("labels in train: neg 2 (6.2%), pos 30 (93.8%), other 0 (0.0%)"),
        "{text}"
    );
    assert!(
        text.contains("warning: label \"other\" has no training example"),
        "{text}"
    );
}

#[test]
fn full_fine_tuning_writes_a_transformers_folder() {
    let dir = tempfile::tempdir().unwrap();
    let r = recipe(dir.path(), "full", "");
    ok(&[
        "train",
        r.to_str().unwrap(),
        "--set",
        "training.max_steps=1",
        "--set",
        "training.learning_rate=5e-5",
    ]);
    let out = dir.path().join("out");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "BertForSequenceClassification");
    assert_eq!(cfg["id2label"]["0"], "neg");
    assert_eq!(cfg["label2id"]["pos"], 1);
    let info = ok(&["info", out.to_str().unwrap()]);
    assert!(info.contains("architecture: bert"), "{info}");
    let pred = ok(&[
        "predict",
        "--model",
        out.to_str().unwrap(),
        "--text",
        "great",
    ]);
    assert!(pred.contains("\"label\""), "{pred}");
}

#[test]
fn head_training_freezes_the_base() {
    let dir = tempfile::tempdir().unwrap();
    let r = recipe(dir.path(), "head", "");
    let text = ok(&[
        "train",
        r.to_str().unwrap(),
        "--set",
        "training.max_steps=1",
    ]);
    // classifier 384 x 2 + 2
    assert!(text.contains("trainable params: 770 ||"), "{text}");
    let text = ok(&[
        "train",
        r.to_str().unwrap(),
        "--set",
        "training.max_steps=1",
        "--set",
        "head.unfreeze_top_layers=1",
    ]);
    assert!(!text.contains("trainable params: 770 ||"), "{text}");
}

#[test]
fn bad_data_and_recipes_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let r = recipe(dir.path(), "lora", LORA);
    let rs = r.to_str().unwrap();
    // a malformed JSONL line: file and line
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"text\": \"a\", \"label\": \"pos\"}\n{\"text\": \"b\", \"label\"\n",
    )
    .unwrap();
    let e = err(&[
        "train",
        rs,
        "--set",
        &format!("data.train=\"{}\"", bad.display()),
    ]);
    assert!(e.contains("bad.jsonl:2"), "{e}");
    // a missing column
    let e = err(&["train", rs, "--set", "data.text_column=sentence"]);
    assert!(
        e.contains("no column \"sentence\"") && e.contains("label, text"),
        "{e}"
    );
    // a label outside the label set (validation has one the training data lacks)
    let val = dir.path().join("val2.jsonl");
    std::fs::write(
        &val,
        "{\"text\": \"a\", \"label\": \"pos\"}\n{\"text\": \"b\", \"label\": \"meh\"}\n",
    )
    .unwrap();
    let e = err(&[
        "train",
        rs,
        "--set",
        &format!("data.validation=\"{}\"", val.display()),
    ]);
    assert!(e.contains("val2.jsonl:2") && e.contains("meh"), "{e}");
    // an empty split
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "\n").unwrap();
    let e = err(&[
        "train",
        rs,
        "--set",
        &format!("data.train=\"{}\"", empty.display()),
    ]);
    assert!(e.contains("empty.jsonl") && e.contains("no rows"), "{e}");
    // undecodable text
    let latin = dir.path().join("latin.csv");
    std::fs::write(&latin, b"text,label\ncaf\xe9,pos\nok,neg\n").unwrap();
    let e = err(&[
        "train",
        rs,
        "--set",
        &format!("data.train=\"{}\"", latin.display()),
    ]);
    assert!(e.contains("latin.csv:2") && e.contains("encoding"), "{e}");
    // max_length beyond the model's positions
    let e = err(&["train", rs, "--set", "data.max_length=1024"]);
    assert!(e.contains("max_length = 1024") && e.contains("512"), "{e}");
    // a misspelt option
    let e = err(&["train", rs, "--set", "training.learning_rat=1"]);
    assert!(e.contains("learning_rat"), "{e}");
    // a misspelt adapter key: named with its table and the key meant, in train and plan
    for cmd in ["train", "plan"] {
        let e = err(&[cmd, rs, "--set", "lora.lora_alfa=32"]);
        assert!(
            e.contains("\"lora_alfa\" in [lora]")
                && e.contains("closest valid key is \"lora_alpha\""),
            "{e}"
        );
    }
    // a stray integer label is named, not turned into four billion classes
    let stray = dir.path().join("stray.jsonl");
    std::fs::write(
        &stray,
        "{\"text\": \"a\", \"label\": 0}\n{\"text\": \"b\", \"label\": 1}\n{\"text\": \"c\", \"label\": 4000000000}\n",
    )
    .unwrap();
    let e = err(&[
        "train",
        rs,
        "--set",
        &format!("data.train=\"{}\"", stray.display()),
    ]);
    assert!(
        e.contains("stray.jsonl:3") && e.contains("4000000000"),
        "{e}"
    );
}

/// `method = "lora"` with no `[lora]` table trains with what peft's `LoraConfig()` picks for
/// BERT (query and value, r 8, alpha 8) and says so.
#[test]
fn lora_without_a_table_uses_peft_defaults_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let r = recipe(dir.path(), "lora", "");
    let out = whet(&[
        "train",
        r.to_str().unwrap(),
        "--set",
        "training.max_steps=1",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("LoraConfig()") && stderr.contains("[\"query\", \"value\"]"),
        "{stderr}"
    );
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("out/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (cfg["r"].as_u64(), cfg["lora_alpha"].as_f64()),
        (Some(8), Some(8.0))
    );
    let mut targets: Vec<&str> = cfg["target_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    targets.sort();
    assert_eq!(targets, ["query", "value"]);
}

#[test]
fn train_help_explains_its_options() {
    let text = ok(&["train", "--help"]);
    assert!(
        text.contains("--set") && text.contains("Override a recipe value"),
        "{text}"
    );
    // every recipe section and the less obvious keys are explained
    for key in [
        "[data]",
        "[lora]",
        "[training]",
        "multi-label-classification",
        ".parquet",
        "tokenization_cache",
        "truncation_side",
        "unfreeze_top_layers",
        "use_rslora",
        "metric_for_best_model",
        "early_stopping_patience",
        "revision",
        "gguf_file",
        "hf://datasets/",
        "HF_HUB_OFFLINE",
        "[eval]",
        "general_text",
        "leakage",
    ] {
        assert!(text.contains(key), "{key}: {text}");
    }
    // Every [training] key the recipe takes (serialised defaults include the unset ones), every
    // method and every task is named, in `whet train --help` and the summary of `whet --help`.
    let args = serde_json::to_value(whet_train::TrainingArguments::new("out")).unwrap();
    for key in args.as_object().unwrap().keys() {
        assert!(
            text.contains(key.as_str()),
            "[training] {key} is not in train --help"
        );
    }
    let summary = ok(&["--help"]);
    for name in [
        "full",
        "head",
        "lora",
        "qlora",
        "ia3",
        "bottleneck",
        "prefix_tuning",
        "prompt_tuning",
    ] {
        assert!(
            text.contains(name) && summary.contains(name),
            "method {name}"
        );
    }
    for task in [
        "causal-lm",
        "question-answering",
        "reward-model",
        "dpo",
        "ppo",
    ] {
        assert!(text.contains(task), "task {task}");
    }
    for task in [
        "causal LM",
        "question answering",
        "reward model",
        "DPO",
        "PPO",
    ] {
        assert!(summary.contains(task), "task {task} in whet --help");
    }
    let text = ok(&["predict", "--help"]);
    for phrase in [
        "--model",
        "--text",
        "--file",
        "--top-k",
        "one text per line",
    ] {
        assert!(text.contains(phrase), "{phrase}: {text}");
    }
}

/// A run that dies at many points (inside a step, halfway through writing a checkpoint, halfway
/// through loading one on resume), resumed after each death, ends on exactly the weights of an
/// uninterrupted run; a half-written checkpoint is never used and never left behind.
#[test]
fn a_run_crashed_at_many_points_resumes_each_time_to_the_same_weights() {
    let dir = tempfile::tempdir().unwrap();
    let r = recipe(dir.path(), "lora", LORA);
    let rs = r.to_str().unwrap();
    let args = |out: &Path| -> Vec<String> {
        [
            "train",
            rs,
            "--set",
            "training.max_steps=6",
            "--set",
            "training.save_steps=2",
            "--set",
            "training.eval_strategy=\"no\"",
            "--set",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([format!("training.output_dir=\"{}\"", out.display())])
        .collect()
    };
    let whole = dir.path().join("whole");
    let a = args(&whole);
    ok(&a.iter().map(String::as_str).collect::<Vec<_>>());

    let out = dir.path().join("crashed");
    let run = |crash: Option<&str>, resume: bool| -> std::process::Output {
        let mut a = args(&out);
        if resume {
            a.push("--resume".into());
        }
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_whet"));
        cmd.env("WHET_CACHE", cache()).args(&a);
        if let Some(c) = crash {
            cmd.env("WHET_CRASH_AT", c);
        }
        cmd.output().unwrap()
    };
    let latest = || {
        whet_train::checkpoint::latest(&out).and_then(|p| p.file_name()?.to_str().map(String::from))
    };
    let half_written = || {
        std::fs::read_dir(&out)
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().contains(".tmp-"))
    };
    // (where it dies, whether it resumes, the newest complete checkpoint after the death)
    let deaths = [
        ("step:3", false, "checkpoint-2"),
        ("load:2", true, "checkpoint-2"),
        ("save:4", true, "checkpoint-2"),
        ("step:6", true, "checkpoint-4"),
        ("save:6", true, "checkpoint-4"),
        ("load:4", true, "checkpoint-4"),
    ];
    for (crash, resume, newest) in deaths {
        let o = run(Some(crash), resume);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && stderr.contains(&format!("WHET_CRASH_AT={crash}")),
            "{crash}: the run did not die there:\n{stderr}"
        );
        assert!(!out.join("all_results.json").exists(), "{crash}");
        assert_eq!(latest().as_deref(), Some(newest), "after dying at {crash}");
        if crash.starts_with("save") {
            assert!(
                half_written(),
                "{crash}: the half-written checkpoint is not where it died"
            );
        }
    }
    let o = run(None, true);
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_resumed(&text, 4, &out);
    assert!(
        std::fs::read(whole.join("adapter_model.safetensors")).unwrap()
            == std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
        "after six deaths the run ended on other weights than an uninterrupted one"
    );
    assert!(!half_written(), "a half-written checkpoint was left behind");
}

/// A run killed with SIGKILL after a checkpoint and resumed with --resume ends with exactly the
/// weights of an uninterrupted run (dropout on, LoRA, checkpoints every 2 steps).
#[test]
fn a_killed_run_resumes_to_the_same_weights() {
    let dir = tempfile::tempdir().unwrap();
    let r = recipe(dir.path(), "lora", LORA);
    let rs = r.to_str().unwrap();
    let common = [
        "--set",
        "training.max_steps=12",
        "--set",
        "training.save_steps=2",
        "--set",
        "training.eval_strategy=\"no\"",
    ];
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    let mut args_a = vec!["train", rs];
    args_a.extend(common);
    let set_a = format!("training.output_dir=\"{}\"", a.display());
    args_a.extend(["--set", &set_a]);
    ok(&args_a);

    let set_b = format!("training.output_dir=\"{}\"", b.display());
    let mut args_b = vec!["train", rs];
    args_b.extend(common);
    args_b.extend(["--set", &set_b]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_whet"))
        .env("WHET_CACHE", cache())
        .args(&args_b)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    while !b.join("checkpoint-4").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint-4 appeared"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        !b.join("all_results.json").exists(),
        "the run was killed before it finished"
    );
    assert!(!b.join("checkpoint-12").exists());
    let from: usize = whet_train::checkpoint::latest(&b)
        .and_then(|p| {
            p.file_name()?
                .to_str()?
                .strip_prefix("checkpoint-")?
                .parse()
                .ok()
        })
        .unwrap();

    let mut resume = args_b.clone();
    resume.push("--resume");
    let text = ok(&resume);
    assert!(text.contains("resuming from"), "{text}");
    assert_resumed(&text, from, &b);
    let wa = std::fs::read(a.join("adapter_model.safetensors")).unwrap();
    let wb = std::fs::read(b.join("adapter_model.safetensors")).unwrap();
    assert!(
        wa == wb,
        "resumed weights differ from the uninterrupted run's"
    );
    // checkpoints are complete folders, none half-written
    for entry in std::fs::read_dir(&b).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!name.contains(".tmp-"), "leftover temporary {name}");
    }
}

/// Sentence pairs with real-valued scores (STS-B's shape, as CSV): `sequence-classification`
/// becomes a regression as run_glue.py decides (one output, problem_type "regression" in the
/// config), evaluation reports MSE and the correlations, errors.jsonl ranks absolute errors,
/// and `whet eval` / `whet predict` read the saved model back: eval with the trained pair
/// columns by default, predict with the number under LABEL_0 as the pipeline gives it. A
/// regression with named classes is refused.
#[test]
fn real_valued_labels_train_a_regression_head_that_eval_and_predict_read() {
    let dir = tempfile::tempdir().unwrap();
    let mut rows = String::from("sentence1,sentence2,score\n");
    for i in 0..4 {
        for (k, (p, n)) in POS.iter().zip(NEG).enumerate() {
            rows += &format!("{p} {i},{p},4.{k}\n{p} {i},{n},0.{k}\n{n} {i},{n},3.5\n");
        }
    }
    let data = dir.path().join("sts.csv");
    std::fs::write(&data, rows).unwrap();
    let out = dir.path().join("out");
    let r = dir.path().join("r.toml");
    std::fs::write(
        &r,
        format!(
            r#"model = "{}"
method = "full"
[data]
train = "{}"
text_column = "sentence1"
text_pair_column = "sentence2"
label_column = "score"
split = {{ validation = 12, test = 12 }}
max_length = 32
leakage = "off"
[training]
output_dir = "{}"
learning_rate = 1e-4
per_device_train_batch_size = 8
max_steps = 4
eval_strategy = "steps"
eval_steps = 2
metric_for_best_model = "pearson"
load_best_model_at_end = true
"#,
            minilm().display(),
            data.display(),
            out.display()
        ),
    )
    .unwrap();
    let text = ok(&["train", r.to_str().unwrap()]);
    assert!(
        text.contains("labels are real numbers: regression")
            && text.contains("targets in train: 0.0000 to 4.5000"),
        "{text}"
    );
    assert!(text.contains("MSE") && text.contains("Pearson"), "{text}");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["problem_type"], "regression");
    assert_eq!(cfg["id2label"], serde_json::json!({"0": "LABEL_0"}));
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("all_results.json")).unwrap())
            .unwrap();
    for key in ["eval_mse", "eval_pearson", "eval_spearmanr", "test_mse"] {
        assert!(results[key].is_number(), "{key} in {results}");
    }
    assert!(results.get("eval_accuracy").is_none(), "{results}");
    // eval_loss is the mean squared error of the same predictions.
    let (loss, mse) = (
        results["eval_loss"].as_f64().unwrap(),
        results["eval_mse"].as_f64().unwrap(),
    );
    assert!((loss - mse).abs() <= 1e-5 * mse.max(1.0), "{loss} vs {mse}");
    let errors = std::fs::read_to_string(out.join("errors.jsonl")).unwrap();
    let errs: Vec<f64> = errors
        .lines()
        .map(|l| {
            let row: serde_json::Value = serde_json::from_str(l).unwrap();
            assert!(row["text_pair"].is_string(), "{row}");
            let (t, p) = (
                row["label"].as_f64().unwrap(),
                row["predicted"].as_f64().unwrap(),
            );
            let e = row["error"].as_f64().unwrap();
            assert!((e - (t - p).abs()).abs() < 1e-5, "{row}");
            e
        })
        .collect();
    assert_eq!(errs.len(), 12);
    assert!(
        errs.windows(2).all(|w| w[0] >= w[1]),
        "largest first: {errs:?}"
    );

    // whet eval: the trained columns (a pair and `score`) without flags, the same numbers as the
    // run's evaluation of the whole file would give.
    let said = ok(&[
        "eval",
        "--model",
        out.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
    assert!(said.contains("MSE") && said.contains("Spearman"), "{said}");
    let json: serde_json::Value = serde_json::from_str(said.lines().last().unwrap()).unwrap();
    assert_eq!(json["eval_samples"], 72, "{json}");
    let said = ok(&[
        "predict",
        "--model",
        out.to_str().unwrap(),
        "--text",
        "great movie",
    ]);
    let p: serde_json::Value = serde_json::from_str(said.trim()).unwrap();
    assert_eq!(p["label"], "LABEL_0", "{p}");
    assert!(p["score"].is_number(), "{p}");
    // A pair is classified as a pair (the model was trained on pairs); one --text-pair a --text.
    let said = ok(&[
        "predict",
        "--model",
        out.to_str().unwrap(),
        "--text",
        "great movie",
        "--text-pair",
        "terrible movie",
    ]);
    let paired: serde_json::Value = serde_json::from_str(said.trim()).unwrap();
    assert_ne!(
        paired["score"], p["score"],
        "the second text changes the score"
    );
    // A data file: one prediction a row, of the trained pair columns; the first row's is the
    // one --text / --text-pair give for it.
    let said = ok(&[
        "predict",
        "--model",
        out.to_str().unwrap(),
        "--file",
        data.to_str().unwrap(),
    ]);
    let rows: Vec<serde_json::Value> = said
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 72);
    let first = ok(&[
        "predict",
        "--model",
        out.to_str().unwrap(),
        "--text",
        &format!("{} 0", POS[0]),
        "--text-pair",
        POS[0],
    ]);
    let first: serde_json::Value = serde_json::from_str(first.trim()).unwrap();
    let (a, b) = (
        rows[0]["score"].as_f64().unwrap(),
        first["score"].as_f64().unwrap(),
    );
    assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    let e = err(&[
        "predict",
        "--model",
        out.to_str().unwrap(),
        "--text",
        "a",
        "--text",
        "b",
        "--text-pair",
        "c",
    ]);
    assert!(e.contains("--text-pair: 1 given for 2 --text"), "{e}");
    let e = err(&[
        "predict",
        "--model",
        out.to_str().unwrap(),
        "--text",
        "a",
        "--question",
        "q?",
    ]);
    assert!(e.contains("--question and --context are for"), "{e}");

    // task = "regression" with class names is refused, naming the key.
    let e = err(&[
        "train",
        r.to_str().unwrap(),
        "--set",
        "task=\"regression\"",
        "--set",
        "data.label_names=[\"a\", \"b\"]",
    ]);
    assert!(
        e.contains("data.label_names") && e.contains("regression"),
        "{e}"
    );
}

/// Token classification on words and tags (run_ner.py's layout): the task trains and
/// evaluates (seqeval's entity scores), writes a `BertForTokenClassification` folder with the
/// tags as id2label (or a `TOKEN_CLS` adapter) and its exact splits; a decoder is refused by
/// name.
#[test]
fn token_classification_trains_a_tagger_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let (names, cities) = (
        ["Anna", "Peter", "Ines", "Omar", "Lena", "Paul"],
        ["Paris", "Quito", "Oslo", "Lima", "Rome", "Cairo"],
    );
    let mut rows = String::new();
    for (i, n) in names.iter().enumerate() {
        for (j, c) in cities.iter().enumerate() {
            let (words, tags) = if (i + j) % 2 == 0 {
                (
                    vec![*n, "lives", "in", *c, "."],
                    vec!["B-PER", "O", "O", "B-LOC", "O"],
                )
            } else {
                (
                    vec!["In", *c, "we", "met", *n],
                    vec!["O", "B-LOC", "O", "O", "B-PER"],
                )
            };
            rows += &format!(
                "{}\n",
                serde_json::json!({"tokens": words, "ner_tags": tags})
            );
        }
    }
    let data = dir.path().join("ner.jsonl");
    std::fs::write(&data, rows).unwrap();
    for method in ["full", "lora"] {
        let out = dir.path().join(method);
        let r = dir.path().join(format!("{method}.toml"));
        std::fs::write(
            &r,
            format!(
                "model = \"{}\"\ntask = \"token-classification\"\nmethod = \"{method}\"\n\
                 [data]\ntrain = \"{}\"\nmax_length = 16\nsplit = {{ validation = 8 }}\n\
                 leakage = \"off\"\n[training]\noutput_dir = \"{}\"\nlearning_rate = {}\n\
                 per_device_train_batch_size = 8\nnum_train_epochs = 3\n\
                 eval_strategy = \"epoch\"\nmetric_for_best_model = \"f1\"\n",
                minilm().display(),
                data.display(),
                out.display(),
                if method == "full" { "1e-4" } else { "2e-3" }
            ),
        )
        .unwrap();
        let text = ok(&["train", r.to_str().unwrap()]);
        assert!(
            text.contains("token classification, 3 tags: B-LOC, B-PER, O")
                && text.contains("entity precision")
                && text.contains("(word/true/predicted)"),
            "{text}"
        );
        let results: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("all_results.json")).unwrap())
                .unwrap();
        for key in ["eval_f1", "eval_precision", "eval_recall", "eval_accuracy"] {
            let v = results[key].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&v), "{key} {v}");
        }
        let state: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("trainer_state.json")).unwrap())
                .unwrap();
        let evals: Vec<f64> = state["log_history"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e["eval_loss"].as_f64())
            .collect();
        assert!(
            evals.len() == 3 && evals[2] < evals[0],
            "{method}: {evals:?}"
        );
        let rows = std::fs::read_to_string(out.join("data/validation.jsonl")).unwrap();
        assert_eq!(rows.lines().count(), 8);
        if method == "full" {
            let cfg: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                    .unwrap();
            assert_eq!(cfg["architectures"][0], "BertForTokenClassification");
            assert_eq!(
                cfg["id2label"],
                serde_json::json!({"0": "B-LOC", "1": "B-PER", "2": "O"})
            );
        } else {
            let cfg: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(out.join("adapter_config.json")).unwrap(),
            )
            .unwrap();
            assert_eq!(cfg["task_type"], "TOKEN_CLS");
            // Merged, it is a transformers folder with the tags.
            let merged = dir.path().join("merged");
            ok(&[
                "merge",
                "--adapter",
                out.to_str().unwrap(),
                merged.to_str().unwrap(),
            ]);
            let cfg: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(merged.join("config.json")).unwrap())
                    .unwrap();
            assert_eq!(cfg["architectures"][0], "BertForTokenClassification");
            assert_eq!(cfg["id2label"]["2"], "O");
            assert!(merged.join("model.safetensors").is_file());
        }
    }
    let e = err(&[
        "predict",
        "--model",
        dir.path().join("full").to_str().unwrap(),
        "--text",
        "Anna lives in Oslo",
    ]);
    assert!(e.contains("is a token-classification model"), "{e}");
    let decoder = tiny_decoder("tiny-llama", dir.path());
    let e = err(&[
        "train",
        dir.path().join("full.toml").to_str().unwrap(),
        "--set",
        &format!("model=\"{}\"", decoder.display()),
    ]);
    assert!(
        e.contains("token classification is implemented for bert") && e.contains("llama"),
        "{e}"
    );
}

/// Multi-label training (`task = "multi-label-classification"`, lists of label names) writes a
/// `transformers` config with `problem_type`, scores with sigmoids and reports subset accuracy.
#[test]
fn multi_label_training_uses_sigmoids_and_saves_the_problem_type() {
    let dir = tempfile::tempdir().unwrap();
    let mut train = String::new();
    for i in 0..5 {
        for (p, n) in POS.iter().zip(NEG) {
            let tags = if i % 2 == 0 {
                "[\"pos\", \"review\"]"
            } else {
                "[\"pos\"]"
            };
            train += &format!("{{\"text\": \"{p} {i}\", \"label\": {tags}}}\n");
            train += &format!("{{\"text\": \"{n} {i}\", \"label\": [\"neg\"]}}\n");
        }
    }
    let (data, val) = (
        dir.path().join("multi.jsonl"),
        dir.path().join("multi-val.jsonl"),
    );
    let lines: Vec<&str> = train.lines().collect();
    std::fs::write(&data, lines[..48].join("\n")).unwrap();
    std::fs::write(&val, lines[48..].join("\n")).unwrap();
    let r = recipe(dir.path(), "full", "");
    let out = dir.path().join("out");
    let text = ok(&[
        "train",
        r.to_str().unwrap(),
        "--set",
        "task=\"multi-label-classification\"",
        "--set",
        &format!("data.train=\"{}\"", data.display()),
        "--set",
        &format!("data.validation=\"{}\"", val.display()),
        "--set",
        "training.max_steps=2",
    ]);
    assert!(text.contains("after training"), "{text}");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["problem_type"], "multi_label_classification");
    // Wrong predictions of a multi-label model name label sets.
    for line in std::fs::read_to_string(out.join("errors.jsonl"))
        .unwrap()
        .lines()
    {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(
            row["label"].is_array() && row["predicted"].is_array(),
            "{row}"
        );
        assert_ne!(row["label"], row["predicted"], "{row}");
    }
    assert_eq!(cfg["id2label"]["2"], "review");
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("all_results.json")).unwrap())
            .unwrap();
    assert!(results["eval_accuracy"].is_number(), "{results}");
    assert_eq!(
        results["eval_confusion_matrix"].as_array().unwrap().len(),
        3,
        "one [tn, fp, fn, tp] row per label"
    );
    let split = std::fs::read_to_string(out.join("data/validation.jsonl")).unwrap();
    assert!(split.contains("\"label\":["), "{split}");
    let pred = ok(&[
        "predict",
        "--model",
        out.to_str().unwrap(),
        "--text",
        "great movie",
        "--top-k",
        "3",
    ]);
    let scores: Vec<f64> = serde_json::from_str::<serde_json::Value>(pred.trim())
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["score"].as_f64().unwrap())
        .collect();
    assert_eq!(scores.len(), 3);
    let sum: f64 = scores.iter().sum();
    assert!(
        (sum - 1.0).abs() > 1e-3,
        "independent sigmoids, not a softmax: {scores:?}"
    );
}

/// Parquet data (written by pyarrow, or by `datasets` with ClassLabel names) trains like JSONL.
#[test]
fn parquet_data_trains() {
    let dir = tempfile::tempdir().unwrap();
    let r = recipe(dir.path(), "head", "");
    let pq = root().join("tests/fixtures/data/reviews.parquet");
    ok(&[
        "train",
        r.to_str().unwrap(),
        "--set",
        &format!("data.train=\"{}\"", pq.display()),
        "--set",
        &format!("data.validation=\"{}\"", pq.display()),
        "--set",
        "training.max_steps=1",
    ]);
    let labels = std::fs::read_to_string(dir.path().join("out/labels.json")).unwrap();
    assert!(labels.contains("[\"neg\",\"pos\"]"), "{labels}");
    // A file `datasets` wrote holds integer ids and its ClassLabel names: the model is labelled
    // with the names, as the dataset's features name them.
    let named = root().join("tests/fixtures/data/reviews-classlabel.parquet");
    ok(&[
        "train",
        r.to_str().unwrap(),
        "--set",
        &format!("data.train=\"{}\"", named.display()),
        "--set",
        &format!("data.validation=\"{}\"", named.display()),
        "--set",
        "training.max_steps=1",
        "--set",
        "method=\"full\"",
    ]);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("out/config.json")).unwrap())
            .unwrap();
    assert_eq!(
        cfg["id2label"],
        serde_json::json!({"0": "neg", "1": "pos"}),
        "{cfg}"
    );
}

/// A copy of a tiny random decoder fixture (no pad token) with a word-level tokenizer over its
/// 99 ids: `<unk>` 0, `<bos>` 1, `<eos>` 2, `w3` .. `w98`.
pub(crate) fn tiny_decoder(fixture: &str, dir: &Path) -> PathBuf {
    let src = root().join("tests/fixtures").join(fixture);
    let dst = dir.join(fixture);
    std::fs::create_dir_all(&dst).unwrap();
    std::fs::copy(src.join("model.safetensors"), dst.join("model.safetensors")).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg.as_object_mut().unwrap().remove("pad_token_id");
    std::fs::write(dst.join("config.json"), cfg.to_string()).unwrap();
    let mut vocab = serde_json::Map::new();
    for (i, t) in ["<unk>", "<bos>", "<eos>"].iter().enumerate() {
        vocab.insert(t.to_string(), i.into());
    }
    for i in 3..99 {
        vocab.insert(format!("w{i}"), i.into());
    }
    let special = |id: usize, t: &str| {
        serde_json::json!({"id": id, "content": t, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
    };
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(0, "<unk>"), special(1, "<bos>"), special(2, "<eos>")],
        "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    std::fs::write(dst.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    std::fs::write(
        dst.join("tokenizer_config.json"),
        r#"{"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}"#,
    )
    .unwrap();
    dst
}

/// Texts of 3-6 words; the label is whether `w7` occurs.
fn word_data(dir: &Path) -> PathBuf {
    let mut x: u64 = 5;
    let mut next = || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (x >> 33) as usize
    };
    let mut text = String::new();
    for _ in 0..32 {
        let len = 3 + next() % 4;
        let mut words: Vec<String> = (0..len).map(|_| format!("w{}", 10 + next() % 80)).collect();
        let yes = next() % 2 == 1;
        if yes {
            let at = next() % len;
            words[at] = "w7".into();
        }
        let label = if yes { "yes" } else { "no" };
        text += &format!(
            "{{\"text\": \"{}\", \"label\": \"{label}\"}}\n",
            words.join(" ")
        );
    }
    let p = dir.join("words.jsonl");
    std::fs::write(&p, text).unwrap();
    p
}

/// GPT-2 and LLaMA sequence classification through the CLI: a decoder without a pad token
/// pads with EOS (and says so in the saved config), a new `score` head is trained (full for
/// GPT-2, LoRA for LLaMA), and the result predicts.
#[test]
fn decoder_classification_trains_through_the_cli() {
    for (fixture, method, arch, extra) in [
        (
            "tiny-gpt2",
            "full",
            Some("GPT2ForSequenceClassification"),
            "",
        ),
        (
            "tiny-llama",
            "lora",
            None,
            "[lora]\nr = 4\nlora_alpha = 8\ntarget_modules = [\"q_proj\", \"v_proj\"]",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let model = tiny_decoder(fixture, dir.path());
        let data = word_data(dir.path());
        let out = dir.path().join("out");
        let recipe = format!(
            "model = \"{}\"\nmethod = \"{method}\"\n[data]\ntrain = \"{}\"\nmax_length = 16\n\
             [data.split]\nvalidation = 8\n{extra}\n[training]\noutput_dir = \"{}\"\n\
             learning_rate = 1e-2\nper_device_train_batch_size = 8\nmax_steps = 4\n\
             eval_strategy = \"epoch\"\n",
            model.display(),
            data.display(),
            out.display()
        );
        let r = dir.path().join("recipe.toml");
        std::fs::write(&r, recipe).unwrap();
        let text = ok(&["train", r.to_str().unwrap()]);
        assert!(text.contains("after training"), "{fixture}: {text}");
        let results: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("all_results.json")).unwrap())
                .unwrap();
        assert!(
            results["eval_loss"].as_f64().unwrap().is_finite(),
            "{results}"
        );
        match arch {
            Some(arch) => {
                let cfg: serde_json::Value = serde_json::from_str(
                    &std::fs::read_to_string(out.join("config.json")).unwrap(),
                )
                .unwrap();
                assert_eq!(cfg["architectures"][0], arch);
                assert_eq!(cfg["pad_token_id"], 2, "EOS pads");
            }
            None => {
                let cfg: serde_json::Value = serde_json::from_str(
                    &std::fs::read_to_string(out.join("adapter_config.json")).unwrap(),
                )
                .unwrap();
                assert_eq!(cfg["task_type"], "SEQ_CLS");
                assert!(
                    cfg["modules_to_save"]
                        .as_array()
                        .unwrap()
                        .contains(&"score".into()),
                    "{cfg}"
                );
            }
        }
        let pred = ok(&[
            "predict",
            "--model",
            out.to_str().unwrap(),
            "--text",
            "w12 w7 w40",
        ]);
        let p: serde_json::Value = serde_json::from_str(pred.trim()).unwrap();
        assert!(["yes", "no"].contains(&p["label"].as_str().unwrap()), "{p}");
        if arch.is_none() {
            // The merged classifier predicts what base + adapter predicts.
            let merged = dir.path().join("merged");
            ok(&[
                "merge",
                "--model",
                model.to_str().unwrap(),
                "--adapter",
                out.to_str().unwrap(),
                merged.to_str().unwrap(),
            ]);
            let cfg: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(merged.join("config.json")).unwrap())
                    .unwrap();
            assert_eq!(cfg["architectures"][0], "LlamaForSequenceClassification");
            let again = ok(&[
                "predict",
                "--model",
                merged.to_str().unwrap(),
                "--text",
                "w12 w7 w40",
            ]);
            let q: serde_json::Value = serde_json::from_str(again.trim()).unwrap();
            assert_eq!(p["label"], q["label"]);
            let (a, b) = (p["score"].as_f64().unwrap(), q["score"].as_f64().unwrap());
            assert!((a - b).abs() < 1e-5, "merged score {b} vs {a}");
        }
    }
}

/// Question / answer rows over the tiny word vocabulary: the answer repeats the question's last
/// word, so there is something to learn.
pub(crate) fn qa_data(dir: &Path) -> PathBuf {
    let mut text = String::new();
    for i in 0..24 {
        let (a, b) = (10 + i % 40, 50 + (i * 7) % 40);
        text += &format!("{{\"q\": \"w{a} w{b}\", \"a\": \"w{b} w{b}\"}}\n");
    }
    let p = dir.join("qa.jsonl");
    std::fs::write(&p, text).unwrap();
    p
}

/// Instruction tuning with a template (LoRA on LLaMA) and packed plain text (full GPT-2)
/// through the CLI: eval loss and perplexity in all_results.json, a peft CAUSAL_LM adapter or a
/// GPT2LMHeadModel folder, the split written, and the result generating text.
#[test]
fn causal_lm_trains_through_the_cli() {
    for (fixture, method, data_opts, extra) in [
        (
            "tiny-llama",
            "lora",
            "template = { prompt = \"{q} <bos>\", completion = \"{a}\" }",
            "[lora]\nr = 4\nlora_alpha = 8\ntarget_modules = [\"q_proj\", \"v_proj\", \"down_proj\"]",
        ),
        (
            "tiny-gpt2",
            "full",
            "text_column = \"q\"\npacking = true",
            "",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let model = tiny_decoder(fixture, dir.path());
        let data = qa_data(dir.path());
        let out = dir.path().join("out");
        // General text in words the training rows never use (w3..w9), for the forgetting report.
        let general = dir.path().join("general.txt");
        let words: Vec<String> = (0..200).map(|i| format!("w{}", 3 + (i * 5) % 7)).collect();
        std::fs::write(&general, words.join(" ")).unwrap();
        let recipe = format!(
            "model = \"{}\"\ntask = \"causal-lm\"\nmethod = \"{method}\"\n[data]\ntrain = \"{}\"\n\
             max_length = 16\n{data_opts}\n[data.split]\nvalidation = 6\n{extra}\n[eval]\n\
             general_text = \"{}\"\ngeneral_tokens = 128\ngenerate = 2\n[training]\n\
             output_dir = \"{}\"\nlearning_rate = 1e-2\nper_device_train_batch_size = 4\n\
             max_steps = 4\neval_strategy = \"steps\"\neval_steps = 2\nlogging_steps = 1\n",
            model.display(),
            data.display(),
            general.display(),
            out.display()
        );
        let r = dir.path().join("recipe.toml");
        std::fs::write(&r, recipe).unwrap();
        let text = ok(&["train", r.to_str().unwrap()]);
        assert!(
            text.contains("before training") && text.contains("after training"),
            "{fixture}: {text}"
        );
        assert!(text.contains("perplexity"), "{fixture}: {text}");
        let results: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("all_results.json")).unwrap())
                .unwrap();
        let (loss, ppl) = (
            results["eval_loss"].as_f64().unwrap(),
            results["eval_perplexity"].as_f64().unwrap(),
        );
        assert!((ppl - loss.exp()).abs() < 1e-6 * ppl, "{results}");
        assert!(results["eval_tokens"].as_u64().unwrap() > 0, "{results}");
        // Forgetting: training on other words moves the general text's perplexity.
        let f = |k: &str| {
            results[k]
                .as_f64()
                .unwrap_or_else(|| panic!("{k}: {results}"))
        };
        let (before, after) = (
            f("general_perplexity_before"),
            f("general_perplexity_after"),
        );
        assert!(
            before.is_finite() && after.is_finite() && before > 1.0,
            "{results}"
        );
        assert!((f("general_perplexity_change") - (after - before)).abs() < 1e-9);
        assert!(
            (after - before).abs() > 1e-3 * before,
            "{fixture}: {before} -> {after}"
        );
        assert!(
            text.contains("forgetting: perplexity on general text (general.txt, 128 tokens)"),
            "{text}"
        );
        // Samples: two prompts at both evaluations, and the before / during / after table.
        let state: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("trainer_state.json")).unwrap())
                .unwrap();
        let evals: Vec<&serde_json::Value> = state["log_history"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e.get("eval_loss").is_some())
            .collect();
        assert_eq!(evals.len(), 2, "{state}");
        for e in &evals {
            assert_eq!(e["samples"].as_array().map(Vec::len), Some(2), "{e}");
        }
        let table = std::fs::read_to_string(out.join("samples.md")).unwrap();
        assert!(
            table.contains("| prompt | before training | step 2 | step 4 | after training |"),
            "{table}"
        );
        assert_eq!(
            table.lines().filter(|l| l.starts_with("| ")).count(),
            3,
            "{table}"
        );
        let state = std::fs::read_to_string(out.join("trainer_state.json")).unwrap();
        assert!(state.contains("eval_perplexity"), "{state}");
        assert!(out.join("loss_curve.png").is_file());
        let train_rows = std::fs::read_to_string(out.join("data/train.jsonl")).unwrap();
        assert_eq!(
            train_rows.lines().count(),
            18,
            "24 rows less 6 for validation"
        );
        if method == "lora" {
            let cfg: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(out.join("adapter_config.json")).unwrap(),
            )
            .unwrap();
            assert_eq!(cfg["task_type"], "CAUSAL_LM");
            assert!(out.join("adapter_model.safetensors").is_file());
        } else {
            let cfg: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                    .unwrap();
            assert_eq!(cfg["architectures"][0], "GPT2LMHeadModel");
            assert!(
                out.join("model.safetensors").is_file() && out.join("tokenizer.json").is_file()
            );
        }
        let generated = ok(&[
            "generate",
            "--model",
            out.to_str().unwrap(),
            "--prompt",
            "w12 w57",
            "--max-new-tokens",
            "3",
        ]);
        assert!(generated.contains("w12 w57"), "{fixture}: {generated}");
    }
}

/// Bad causal-LM data: a template naming a missing field (file and line), an example longer
/// than max_length (or counted when skipped), a classification-only method.
#[test]
fn bad_causal_lm_input_gets_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_decoder("tiny-llama", dir.path());
    let data = qa_data(dir.path());
    let recipe = |extra: &str| {
        let r = dir.path().join("recipe.toml");
        std::fs::write(
            &r,
            format!(
                "model = \"{}\"\ntask = \"causal-lm\"\n[data]\ntrain = \"{}\"\n{extra}\n{}\n\
                 [training]\noutput_dir = \"{}\"\nmax_steps = 1\n",
                model.display(),
                data.display(),
                if extra.contains("max_length") {
                    ""
                } else {
                    "max_length = 16"
                },
                dir.path().join("out").display()
            ),
        )
        .unwrap();
        r
    };
    let e = err(&[
        "train",
        recipe("template = { prompt = \"{question}\", completion = \"{a}\" }")
            .to_str()
            .unwrap(),
    ]);
    assert!(e.contains("question") && e.contains("qa.jsonl:1"), "{e}");

    let e = err(&[
        "train",
        recipe("template = { prompt = \"{q}\", completion = \"{a}\" }\nmax_length = 3")
            .to_str()
            .unwrap(),
    ]);
    assert!(e.contains("qa.jsonl:1") && e.contains("too_long"), "{e}");

    let e = err(&[
        "train",
        recipe(
            "template = { prompt = \"{q}\", completion = \"{a}\" }\nmax_length = 4\n\
             too_long = \"skip\"",
        )
        .to_str()
        .unwrap(),
    ]);
    assert!(
        e.contains("skipped 24"),
        "every row is too long, and counted: {e}"
    );

    let e = err(&["train", recipe("template = \"alpaca\"").to_str().unwrap()]);
    assert!(
        e.contains("instruction"),
        "the alpaca template needs an instruction field: {e}"
    );

    let e = err(&["train", recipe("").to_str().unwrap()]);
    assert!(e.contains("\"text\""), "no text column: {e}");

    let e = err(&["train", recipe("template = \"vicuna\"").to_str().unwrap()]);
    assert!(e.contains("alpaca"), "{e}");
}

/// Extractive question answering on MiniLM through the CLI: SQuAD-format data with long
/// contexts cut into windows, exact match and F1 in all_results.json, a
/// BertForQuestionAnswering folder (full) or a QUESTION_ANS adapter (LoRA), and the
/// question-answering pipeline returning a span of the context.
#[test]
fn question_answering_trains_and_answers_through_the_cli() {
    let data = root().join("tests/fixtures/qa/facts.jsonl");
    for (method, lr, extra) in [
        ("full", "3e-4", ""),
        (
            "lora",
            "2e-3",
            "[lora]\nr = 8\nlora_alpha = 16\ntarget_modules = [\"query\", \"value\"]",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let r = dir.path().join("recipe.toml");
        std::fs::write(
            &r,
            format!(
                "model = \"{}\"\ntask = \"question-answering\"\nmethod = \"{method}\"\n[data]\n\
                 train = \"{}\"\nmax_length = 48\ndoc_stride = 16\n[data.split]\nvalidation = 12\n\
                 {extra}\n[training]\noutput_dir = \"{}\"\nlearning_rate = {lr}\n\
                 per_device_train_batch_size = 8\nnum_train_epochs = 4\neval_strategy = \"epoch\"\n\
                 metric_for_best_model = \"f1\"\n",
                minilm().display(),
                data.display(),
                out.display()
            ),
        )
        .unwrap();
        let text = ok(&["train", r.to_str().unwrap()]);
        assert!(
            text.contains("windows") && text.contains("exact match"),
            "{text}"
        );
        let results: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("all_results.json")).unwrap())
                .unwrap();
        let (em, f1) = (
            results["eval_exact_match"].as_f64().unwrap(),
            results["eval_f1"].as_f64().unwrap(),
        );
        assert!(
            (0.0..=100.0).contains(&em) && em <= f1 && f1 <= 100.0,
            "{results}"
        );
        // The facts are easy: a few epochs of full fine-tuning find most answers; LoRA's few
        // steps at least lower the evaluation loss.
        if method == "full" {
            assert!(f1 > 50.0, "{method}: F1 {f1} after training\n{text}");
        }
        // `whet eval` on the run's own validation split (written to out/data) gives the run's
        // evaluation: the same windows, post-processing and batches.
        let said = ok(&[
            "eval",
            "--model",
            out.to_str().unwrap(),
            "--data",
            out.join("data/validation.jsonl").to_str().unwrap(),
            "--batch-size",
            "8",
        ]);
        assert!(said.contains("exact match"), "{said}");
        let again: serde_json::Value = serde_json::from_str(said.lines().last().unwrap()).unwrap();
        assert_eq!(again["eval_samples"], 12, "{again}");
        for key in ["eval_exact_match", "eval_f1", "eval_loss"] {
            let (a, b) = (again[key].as_f64().unwrap(), results[key].as_f64().unwrap());
            assert!(
                (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                "{method} {key}: {a} vs {b}"
            );
        }
        let e = err(&[
            "eval",
            "--model",
            out.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--label-column",
            "answers",
        ]);
        assert!(e.contains("question-answering model"), "{e}");
        let state: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("trainer_state.json")).unwrap())
                .unwrap();
        let evals: Vec<f64> = state["log_history"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e["eval_loss"].as_f64())
            .collect();
        assert!(
            evals.len() == 4 && evals[3] < evals[0],
            "{method}: {evals:?}"
        );
        if method == "full" {
            let cfg: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                    .unwrap();
            assert_eq!(cfg["architectures"][0], "BertForQuestionAnswering");
        } else {
            let cfg: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(out.join("adapter_config.json")).unwrap(),
            )
            .unwrap();
            assert_eq!(cfg["task_type"], "QUESTION_ANS");
        }
        let context = "Ines was born in Quito in 1977. Ines works as a chemist.";
        let answer = ok(&[
            "predict",
            "--task",
            "question-answering",
            "--model",
            out.to_str().unwrap(),
            "--question",
            "Where was Ines born?",
            "--context",
            context,
            "--top-k",
            "2",
        ]);
        let lines: Vec<serde_json::Value> = answer
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{answer}");
        for a in &lines {
            let (s, e) = (
                a["start"].as_u64().unwrap() as usize,
                a["end"].as_u64().unwrap() as usize,
            );
            assert_eq!(a["answer"].as_str().unwrap(), &context[s..e], "{a}");
            assert!((0.0..=1.0).contains(&a["score"].as_f64().unwrap()));
        }
        assert!(lines[0]["score"].as_f64() >= lines[1]["score"].as_f64());
    }
    let e = err(&[
        "predict",
        "--task",
        "question-answering",
        "--model",
        minilm().to_str().unwrap(),
        "--question",
        "q",
    ]);
    assert!(e.contains("--context"), "{e}");
}

/// Logits of a causal LM folder (or base + adapter) on a fixed prompt.
fn lm_logits(model: &Path, adapter: Option<&Path>) -> Vec<f32> {
    use burn::tensor::{Device, Tensor, TensorData};
    use whet_models::{CausalLm, Checkpoint, DecoderInput, Mode};
    let device = Device::flex();
    let mut lm = Checkpoint::open(model)
        .unwrap()
        .load_causal_lm(&device)
        .unwrap();
    if let Some(a) = adapter {
        whet_peft::load_adapter(&mut lm, a, &device).unwrap();
    }
    let ids: Vec<i64> = vec![1, 12, 57, 33, 2, 40];
    let input = DecoderInput::unpadded(Tensor::from_data(TensorData::new(ids, [1, 6]), &device));
    lm.forward_logits(input, Mode::Eval)
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// QLoRA and IA3 (over an f32 and an NF4 base) train a causal LM through the CLI and write peft
/// adapters; `whet merge` folds each into its base, the merged folder gives the logits of
/// base + adapter within 1e-5, and merging an adapter trained over NF4 says it merges into f32.
#[test]
fn qlora_and_ia3_train_and_merge_through_the_cli() {
    for (method, extra, peft_type, quantised) in [
        (
            "qlora",
            "[lora]\nr = 4\nlora_alpha = 8\ntarget_modules = [\"q_proj\", \"v_proj\", \"down_proj\"]",
            "LORA",
            true,
        ),
        (
            "ia3",
            "[ia3]\ntarget_modules = [\"k_proj\", \"v_proj\", \"down_proj\"]\nfeedforward_modules = [\"down_proj\"]",
            "IA3",
            false,
        ),
        (
            "ia3",
            "[ia3]\ntarget_modules = [\"k_proj\", \"v_proj\", \"down_proj\"]\nfeedforward_modules = [\"down_proj\"]\n\
             [quantization]\nload_in_4bit = true",
            "IA3",
            true,
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let model = tiny_decoder("tiny-llama", dir.path());
        let data = qa_data(dir.path());
        let out = dir.path().join("out");
        let recipe = format!(
            "model = \"{}\"\ntask = \"causal-lm\"\nmethod = \"{method}\"\n[data]\ntrain = \"{}\"\n\
             max_length = 16\ntemplate = {{ prompt = \"{{q}} <bos>\", completion = \"{{a}}\" }}\n\
             {extra}\n[training]\noutput_dir = \"{}\"\nlearning_rate = 5e-2\n\
             per_device_train_batch_size = 4\nmax_steps = 3\nlogging_steps = 1\n",
            model.display(),
            data.display(),
            out.display()
        );
        let r = dir.path().join("recipe.toml");
        std::fs::write(&r, recipe).unwrap();
        let text = ok(&["train", r.to_str().unwrap()]);
        assert!(text.contains("after training"), "{method}: {text}");
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["peft_type"], peft_type, "{cfg}");
        assert_eq!(cfg["task_type"], "CAUSAL_LM", "{cfg}");

        let merged = dir.path().join("merged");
        let o = whet(&[
            "merge",
            "--adapter",
            out.to_str().unwrap(),
            merged.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(
            stderr.contains("trained over a quantised base"),
            quantised,
            "{method}: {stderr}"
        );
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(merged.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
        assert!(merged.join("tokenizer.json").is_file());
        let unmerged = lm_logits(&model, Some(&out));
        let folded = lm_logits(&merged, None);
        let base = lm_logits(&model, None);
        assert!(
            max_diff(&unmerged, &base) > 1e-4,
            "{method}: training changed nothing"
        );
        let d = max_diff(&folded, &unmerged);
        assert!(d < 1e-5, "{method}: merged logits differ by {d}");
    }
}

/// Prefix tuning (with peft's projection) and prompt tuning (started from a text) train a causal
/// LM through the CLI and save peft's format; the adapter changes the model; merge refuses them
/// with the reason; packing is refused for them before anything loads.
#[test]
fn prefix_and_prompt_tuning_train_through_the_cli() {
    for (method, extra, peft_type, width) in [
        (
            "prefix_tuning",
            "[prefix_tuning]\nnum_virtual_tokens = 3\nprefix_projection = true\nencoder_hidden_size = 8",
            "PREFIX_TUNING",
            2 * 2 * 16, // layers * 2 * (kv heads * head dim)
        ),
        (
            "prompt_tuning",
            "[prompt_tuning]\nnum_virtual_tokens = 4\nprompt_tuning_init = \"TEXT\"\n\
             prompt_tuning_init_text = \"answer the question\"",
            "PROMPT_TUNING",
            32, // hidden size
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let model = tiny_decoder("tiny-llama", dir.path());
        let data = qa_data(dir.path());
        let out = dir.path().join("out");
        let recipe = format!(
            "model = \"{}\"\ntask = \"causal-lm\"\nmethod = \"{method}\"\n[data]\ntrain = \"{}\"\n\
             max_length = 16\ntemplate = {{ prompt = \"{{q}} <bos>\", completion = \"{{a}}\" }}\n\
             {extra}\n[training]\noutput_dir = \"{}\"\nlearning_rate = 5e-2\n\
             per_device_train_batch_size = 4\nmax_steps = 3\nlogging_steps = 1\n",
            model.display(),
            data.display(),
            out.display()
        );
        let r = dir.path().join("recipe.toml");
        std::fs::write(&r, &recipe).unwrap();
        let text = ok(&["train", r.to_str().unwrap()]);
        assert!(text.contains("after training"), "{method}: {text}");
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["peft_type"], peft_type, "{cfg}");
        assert_eq!(cfg["task_type"], "CAUSAL_LM", "{cfg}");
        let bytes = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let e = st.tensor("prompt_embeddings").unwrap();
        assert_eq!(
            e.shape(),
            [cfg["num_virtual_tokens"].as_u64().unwrap() as usize, width]
        );

        let base = lm_logits(&model, None);
        let tuned = lm_logits(&model, Some(&out));
        // A soft prompt adds its positions in front: compare the input's own positions.
        let tail = &tuned[tuned.len() - base.len()..];
        assert!(
            max_diff(tail, &base) > 1e-4,
            "{method}: the adapter changes nothing"
        );

        let o = whet(&[
            "merge",
            "--adapter",
            out.to_str().unwrap(),
            dir.path().join("merged").to_str().unwrap(),
        ]);
        assert!(!o.status.success());
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(stderr.contains("nothing to fold"), "{stderr}");

        std::fs::write(
            &r,
            recipe.replace("max_length = 16\n", "max_length = 16\npacking = true\n"),
        )
        .unwrap();
        let o = whet(&["train", r.to_str().unwrap()]);
        assert!(!o.status.success());
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(stderr.contains("packing"), "{stderr}");
    }
}

/// `whet plan` predicts a peak whose parts follow the method (full training holds gradients and
/// AdamW state for every weight, LoRA for its adapters only), and `whet train` refuses, with
/// the parts and the advice, a run whose plan exceeds the memory budget; --no-memory-check
/// runs it anyway.
#[test]
fn plan_predicts_by_part_and_train_refuses_what_cannot_fit() {
    let dir = tempfile::tempdir().unwrap();
    let plan = |method: &str, extra: &str| -> serde_json::Value {
        let r = recipe(dir.path(), method, extra);
        serde_json::from_str(&ok(&["plan", r.to_str().unwrap(), "--json"])).unwrap()
    };
    let full = plan("full", "");
    let lora = plan(
        "lora",
        "[lora]\nr = 4\ntarget_modules = [\"query\", \"value\"]",
    );
    let n = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap();
    // MiniLM-L6: 22.7M f32 weights.
    assert!(
        (n(&full, "weights") as f64 - 4.0 * 22.7e6).abs() < 4.0 * 0.2e6,
        "{full}"
    );
    assert_eq!(
        n(&full, "optimizer"),
        2 * n(&full, "weights"),
        "two moments per weight"
    );
    assert_eq!(n(&full, "gradients"), n(&full, "weights"));
    assert!(
        n(&lora, "optimizer") < n(&full, "optimizer") / 100,
        "{lora}"
    );
    assert!(n(&lora, "activations") > 0);

    let r = recipe(dir.path(), "full", "");
    let text = ok(&["plan", r.to_str().unwrap()]);
    assert!(
        text.contains("activations") && text.contains("peak"),
        "{text}"
    );

    let limited = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_whet"))
            .env("WHET_CACHE", cache())
            .env("WHET_MEMORY_LIMIT_MB", "200")
            .args(args)
            .output()
            .unwrap()
    };
    let o = limited(&["train", r.to_str().unwrap()]);
    assert!(!o.status.success());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("needs about")
            && stderr.contains("adamw_bnb_8bit")
            && stderr.contains("lora"),
        "{stderr}"
    );
    let o = limited(&["train", r.to_str().unwrap(), "--no-memory-check"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// A reward model trains on preference pairs through the CLI (MiniLM, full and LoRA): the
/// saved model has one output, all_results.json holds the held-out pairwise accuracy, and
/// training raises it on pairs whose better answer is always the positive one. Bad pairs get
/// errors naming the file, line and field.
#[test]
fn reward_model_trains_on_preference_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let line = |p: &str, c: &str, r: &str| {
        format!("{{\"prompt\": \"{p}\", \"chosen\": \" {c}\", \"rejected\": \" {r}\"}}\n")
    };
    let (mut train, mut val) = (String::new(), String::new());
    for i in 0..4 {
        for (p, n) in POS.iter().zip(NEG) {
            train += &line(&format!("review {i}:"), p, n);
        }
    }
    for (p, n) in POS.iter().zip(NEG) {
        val += &line("review:", p, n);
    }
    let (t, v) = (dir.path().join("pairs.jsonl"), dir.path().join("val.jsonl"));
    std::fs::write(&t, &train).unwrap();
    std::fs::write(&v, &val).unwrap();
    for (method, extra) in [
        ("full", ""),
        (
            "lora",
            "[lora]\nr = 4\nlora_alpha = 8\ntarget_modules = [\"query\", \"value\"]",
        ),
    ] {
        let out = dir.path().join(format!("out-{method}"));
        let recipe = format!(
            "model = \"{}\"\ntask = \"reward-model\"\nmethod = \"{method}\"\n[data]\ntrain = \"{}\"\n\
             validation = \"{}\"\nmax_length = 32\n{extra}\n[training]\noutput_dir = \"{}\"\n\
             learning_rate = 1e-3\nper_device_train_batch_size = 8\nnum_train_epochs = 3\n\
             eval_strategy = \"epoch\"\nlogging_steps = 1\nsave_strategy = \"epoch\"\n",
            minilm().display(),
            t.display(),
            v.display(),
            out.display()
        );
        let r = dir.path().join("reward.toml");
        std::fs::write(&r, &recipe).unwrap();
        let text = ok(&["train", r.to_str().unwrap()]);
        assert!(text.contains("pairwise accuracy"), "{method}: {text}");
        let results: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("all_results.json")).unwrap())
                .unwrap();
        let acc = results["eval_accuracy"].as_f64().unwrap();
        assert!(
            acc >= 0.8,
            "{method}: held-out pairwise accuracy {acc}: {results}"
        );
        assert!(results["eval_rewards/margins"].as_f64().unwrap() > 0.0);
        let config_file = if method == "full" {
            "config.json"
        } else {
            "adapter_config.json"
        };
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join(config_file)).unwrap()).unwrap();
        if method == "full" {
            assert_eq!(cfg["id2label"].as_object().unwrap().len(), 1, "{cfg}");
            assert_eq!(cfg["architectures"][0], "BertForSequenceClassification");
        } else {
            assert_eq!(cfg["task_type"], "SEQ_CLS");
            // Resume from the step-3 checkpoint in a fresh folder: the same final adapter.
            let again = dir.path().join("out-lora-resumed");
            let copy = again.join("checkpoint-3");
            std::fs::create_dir_all(&copy).unwrap();
            for f in std::fs::read_dir(out.join("checkpoint-3")).unwrap() {
                let f = f.unwrap().path();
                std::fs::copy(&f, copy.join(f.file_name().unwrap())).unwrap();
            }
            let r2 = dir.path().join("reward-resumed.toml");
            let moved = recipe.replace(&out.display().to_string(), &again.display().to_string());
            std::fs::write(&r2, moved).unwrap();
            let text = ok(&["train", r2.to_str().unwrap(), "--resume"]);
            assert!(text.contains("resuming from"), "{text}");
            assert_resumed(&text, 3, &again);
            assert!(
                std::fs::read(out.join("adapter_model.safetensors")).unwrap()
                    == std::fs::read(again.join("adapter_model.safetensors")).unwrap(),
                "the resumed reward-model run ended on other weights"
            );
        }
    }

    // Bad input: identical answers, a missing field, an empty file.
    let bad = |name: &str, text: &str| -> String {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        let recipe = format!(
            "model = \"{}\"\ntask = \"reward-model\"\n[data]\ntrain = \"{}\"\n[training]\n\
             output_dir = \"{}\"\nmax_steps = 1\n",
            minilm().display(),
            p.display(),
            dir.path().join("bad-out").display()
        );
        let r = dir.path().join("bad.toml");
        std::fs::write(&r, recipe).unwrap();
        err(&["train", r.to_str().unwrap()])
    };
    let e = bad("same.jsonl", &(line("q", "a", "b") + &line("q", "x", "x")));
    assert!(e.contains("same.jsonl:2") && e.contains("identical"), "{e}");
    let e = bad(
        "missing.jsonl",
        &(line("q", "a", "b") + "{\"prompt\": \"q\", \"chosen\": \"a\"}\n"),
    );
    assert!(
        e.contains("missing.jsonl:2") && e.contains("rejected"),
        "{e}"
    );
    let e = bad("empty.jsonl", "");
    assert!(e.contains("empty.jsonl") && e.contains("no rows"), "{e}");
}

/// Word pairs for DPO on the tiny decoders: the prompt `wA wB`, the chosen answer holds `w7`,
/// the rejected one `w9`.
pub(crate) fn dpo_pairs(dir: &Path) -> (PathBuf, PathBuf) {
    let line = |p: &str, c: &str, r: &str| {
        format!("{{\"prompt\": \"{p}\", \"chosen\": \" {c}\", \"rejected\": \" {r}\"}}\n")
    };
    let (mut train, mut val) = (String::new(), String::new());
    for i in 0..16 {
        let p = format!("w{} w{}", 10 + i, 40 + i % 5);
        train += &line(
            &p,
            &format!("w7 w{}", 60 + i % 3),
            &format!("w9 w{}", 60 + i % 3),
        );
    }
    for i in 0..6 {
        let p = format!("w{} w{}", 30 + i, 50 + i);
        val += &line(&p, "w7 w61", "w9 w61");
    }
    let (t, v) = (dir.join("dpo.jsonl"), dir.join("dpo-val.jsonl"));
    std::fs::write(&t, train).unwrap();
    std::fs::write(&v, val).unwrap();
    (t, v)
}

/// `task = "dpo"` with LoRA (reference: the adapter switched off) and full training (a frozen
/// copy): the held-out implicit reward prefers the chosen answers, trl's reward metrics are
/// logged per step, the output is a peft CAUSAL_LM adapter or a transformers folder, a resumed
/// run ends on the same weights, and bad pairs get errors naming file and line.
#[test]
fn dpo_prefers_the_chosen_answers() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_decoder("tiny-llama", dir.path());
    let (t, v) = dpo_pairs(dir.path());
    let general = dir.path().join("general.txt");
    let words: Vec<String> = (0..100).map(|i| format!("w{}", 3 + (i * 5) % 7)).collect();
    std::fs::write(&general, words.join(" ")).unwrap();
    let recipe = |method: &str, extra: &str, out: &Path| -> PathBuf {
        let text = format!(
            "model = \"{}\"\ntask = \"dpo\"\nmethod = \"{method}\"\n[data]\ntrain = \"{}\"\n\
             validation = \"{}\"\nmax_length = 16\n{extra}\n[dpo]\nbeta = 0.5\n[eval]\n\
             general_text = \"{}\"\ngeneral_tokens = 64\n[training]\n\
             output_dir = \"{}\"\nlearning_rate = 5e-3\nper_device_train_batch_size = 4\n\
             num_train_epochs = 4\neval_strategy = \"epoch\"\nlogging_steps = 1\nsave_steps = 4\n\
             save_strategy = \"steps\"\n",
            model.display(),
            t.display(),
            v.display(),
            general.display(),
            out.display()
        );
        let r = out.with_extension("toml");
        std::fs::write(&r, text).unwrap();
        r
    };
    let lora =
        "[lora]\nr = 4\nlora_alpha = 8\ntarget_modules = [\"q_proj\", \"v_proj\", \"o_proj\"]";
    for (method, extra) in [("lora", lora), ("full", "")] {
        let out = dir.path().join(format!("dpo-{method}"));
        let r = recipe(method, extra, &out);
        let text = ok(&["train", r.to_str().unwrap()]);
        assert!(text.contains("reward accuracy"), "{method}: {text}");
        let reference = if method == "lora" {
            "the adapter off"
        } else {
            "frozen copy"
        };
        assert!(text.contains(reference), "{method}: {text}");
        let results: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("all_results.json")).unwrap())
                .unwrap();
        let acc = results["eval_rewards/accuracies"].as_f64().unwrap();
        let margin = results["eval_rewards/margins"].as_f64().unwrap();
        assert!(acc >= 0.8 && margin > 0.0, "{method}: {results}");
        // The forgetting report of the policy: DPO moved the general text's perplexity.
        let (before, after) = (
            results["general_perplexity_before"].as_f64().unwrap(),
            results["general_perplexity_after"].as_f64().unwrap(),
        );
        assert!(
            before.is_finite() && (after - before).abs() > 1e-6 * before,
            "{results}"
        );
        // Before any update the policy is the reference: loss log 2 at step 1 is trl's start.
        let state: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("trainer_state.json")).unwrap())
                .unwrap();
        let first = &state["log_history"][0];
        assert!(
            (first["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-5,
            "{first}"
        );
        assert!(
            first["rewards/margins"].as_f64().unwrap().abs() < 1e-6,
            "{first}"
        );
        let logged = state["log_history"].as_array().unwrap();
        assert!(
            logged
                .iter()
                .any(|e| e["rewards/accuracies"].as_f64() == Some(1.0))
        );
        if method == "lora" {
            let cfg: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(out.join("adapter_config.json")).unwrap(),
            )
            .unwrap();
            assert_eq!(cfg["task_type"], "CAUSAL_LM");
            // Resume from the step-8 checkpoint in a fresh folder: the same final adapter.
            let again = dir.path().join("dpo-lora-resumed");
            std::fs::create_dir_all(&again).unwrap();
            let ck = out.join("checkpoint-8");
            let copy = again.join("checkpoint-8");
            std::fs::create_dir_all(&copy).unwrap();
            for f in std::fs::read_dir(&ck).unwrap() {
                let f = f.unwrap().path();
                std::fs::copy(&f, copy.join(f.file_name().unwrap())).unwrap();
            }
            let r2 = recipe(method, extra, &again);
            let text = ok(&["train", r2.to_str().unwrap(), "--resume"]);
            assert!(text.contains("resuming from"), "{text}");
            assert_resumed(&text, 8, &again);
            let wa = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
            let wb = std::fs::read(again.join("adapter_model.safetensors")).unwrap();
            assert!(wa == wb, "the resumed DPO run ended on other weights");
        } else {
            let cfg: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                    .unwrap();
            assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
        }
    }

    // Bad input: identical answers, a missing field, an empty file, a prompt filling max_length.
    let bad = |name: &str, text: &str| -> String {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        let recipe = format!(
            "model = \"{}\"\ntask = \"dpo\"\n[data]\ntrain = \"{}\"\nmax_length = 4\n[training]\n\
             output_dir = \"{}\"\nmax_steps = 1\n",
            model.display(),
            p.display(),
            dir.path().join("bad-out").display()
        );
        let r = dir.path().join("bad.toml");
        std::fs::write(&r, recipe).unwrap();
        err(&["train", r.to_str().unwrap()])
    };
    let line = |p: &str, c: &str, r: &str| {
        format!("{{\"prompt\": \"{p}\", \"chosen\": \"{c}\", \"rejected\": \"{r}\"}}\n")
    };
    let e = bad(
        "same.jsonl",
        &(line("w3", " w4", " w5") + &line("w3", " w6", " w6")),
    );
    assert!(e.contains("same.jsonl:2") && e.contains("identical"), "{e}");
    let e = bad(
        "missing.jsonl",
        &(line("w3", " w4", " w5") + "{\"prompt\": \"w3\", \"rejected\": \"w4\"}\n"),
    );
    assert!(e.contains("missing.jsonl:2") && e.contains("chosen"), "{e}");
    let e = bad("empty.jsonl", "");
    assert!(e.contains("empty.jsonl") && e.contains("no rows"), "{e}");
    let e = bad("long.jsonl", &line("w3 w4 w5 w6 w7", " w8", " w9"));
    assert!(
        e.contains("long.jsonl") && e.contains("no training pair is left"),
        "{e}"
    );
    // A model that is not a decoder.
    let p = dir.path().join("ok.jsonl");
    std::fs::write(&p, line("w3", " w4", " w5")).unwrap();
    let r = dir.path().join("enc.toml");
    std::fs::write(
        &r,
        format!(
            "model = \"{}\"\ntask = \"dpo\"\n[data]\ntrain = \"{}\"\n[training]\noutput_dir = \"{}\"\n",
            minilm().display(),
            p.display(),
            dir.path().join("enc-out").display()
        ),
    )
    .unwrap();
    let e = err(&["train", r.to_str().unwrap()]);
    assert!(e.contains("needs a decoder"), "{e}");
}

/// A reward model on the tiny LLaMA (a new one-output head) that prefers answers with `w7`.
fn tiny_reward_model(dir: &Path, model: &Path, pairs: &Path) -> PathBuf {
    let out = dir.join("tiny-rm");
    let recipe = format!(
        "model = \"{}\"\ntask = \"reward-model\"\n[data]\ntrain = \"{}\"\nmax_length = 16\n\
         [training]\noutput_dir = \"{}\"\nlearning_rate = 1e-2\nper_device_train_batch_size = 8\n\
         num_train_epochs = 10\nsave_strategy = \"no\"\n",
        model.display(),
        pairs.display(),
        out.display()
    );
    let r = dir.join("tiny-rm.toml");
    std::fs::write(&r, recipe).unwrap();
    ok(&["train", r.to_str().unwrap()]);
    out
}

/// `task = "ppo"` on the tiny LLaMA with LoRA against a reward model trained by whet: at the
/// first iteration the policy is the reference (KL 0), the held-out mean score rises, trl's
/// statistics are logged, the adapter and value head are written, and a resumed run ends on the
/// same weights. Bad prompt sets and reward models get clear errors.
#[test]
fn ppo_raises_the_reward_with_a_bounded_kl() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_decoder("tiny-llama", dir.path());
    let (pairs, _) = dpo_pairs(dir.path());
    let rm = tiny_reward_model(dir.path(), &model, &pairs);
    let val = dir.path().join("prompts-val.jsonl");
    let prompts: String = (0..32)
        .map(|i| format!("{{\"prompt\": \"w{} w{}\"}}\n", 20 + i, 60 + i % 7))
        .collect();
    std::fs::write(&val, prompts).unwrap();
    let recipe = |out: &Path, extra: &str| -> PathBuf {
        let text = format!(
            "model = \"{}\"\ntask = \"ppo\"\nmethod = \"lora\"\n[data]\ntrain = \"{}\"\n\
             validation = \"{}\"\ntest = \"{}\"\nmax_length = 8\n[lora]\nr = 8\nlora_alpha = 16\n\
             target_modules = [\"q_proj\", \"v_proj\", \"o_proj\", \"gate_proj\", \"up_proj\", \"down_proj\"]\n\
             [ppo]\nreward_model = \"{}\"\nresponse_length = 4\ntemperature = 1.0\nkl_coef = 0.1\n\
             {extra}\n[training]\noutput_dir = \"{}\"\nlearning_rate = 1e-2\n\
             per_device_train_batch_size = 16\nmax_steps = 60\nlogging_steps = 1\n\
             eval_strategy = \"steps\"\neval_steps = 20\nsave_strategy = \"steps\"\nsave_steps = 10\n\
             per_device_eval_batch_size = 32\n",
            model.display(),
            pairs.display(),
            val.display(),
            val.display(),
            rm.display(),
            out.display()
        );
        let r = out.with_extension("toml");
        std::fs::write(&r, text).unwrap();
        r
    };
    let out = dir.path().join("ppo");
    let text = ok(&["train", recipe(&out, "").to_str().unwrap()]);
    assert!(text.contains("the base with the adapter off"), "{text}");
    assert!(
        text.contains("test prompts: mean score") && text.contains("before (score"),
        "{text}"
    );
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("trainer_state.json")).unwrap())
            .unwrap();
    let log = state["log_history"].as_array().unwrap();
    let steps: Vec<&serde_json::Value> = log.iter().filter(|e| e.get("loss").is_some()).collect();
    let evals: Vec<&serde_json::Value> = log
        .iter()
        .filter(|e| e.get("eval_score").is_some())
        .collect();
    assert_eq!(steps.len(), 60, "{state}");
    assert!(
        steps[0]["objective/kl"].as_f64().unwrap().abs() < 1e-6,
        "{}",
        steps[0]
    );
    for k in [
        "objective/entropy",
        "objective/scores",
        "objective/rlhf_reward",
        "policy/clipfrac_avg",
        "policy/approxkl_avg",
        "val/clipfrac_avg",
        "loss/policy_avg",
        "loss/value_avg",
    ] {
        assert!(
            steps[5][k].as_f64().unwrap().is_finite(),
            "{k}: {}",
            steps[5]
        );
    }
    let first = evals[0]["eval_score"].as_f64().unwrap();
    let last = evals.last().unwrap()["eval_score"].as_f64().unwrap();
    let kl = evals.last().unwrap()["eval_kl"].as_f64().unwrap();
    // Seeded: -0.10 -> 1.40 with a KL of 6.1 nats per response when written.
    assert!(
        last > first + 0.5,
        "held-out score {first} -> {last}: {state}"
    );
    assert!(kl.abs() < 10.0, "KL {kl}");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    for f in [
        "value_head.safetensors",
        "reward_curve.png",
        "kl_curve.png",
        "all_results.json",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }

    // QLoRA: the policy over an NF4 base (the reference is that base with the adapter off).
    let q = dir.path().join("ppo-qlora");
    let r = recipe(&q, "").to_string_lossy().into_owned();
    let text = ok(&[
        "train",
        &r,
        "--set",
        "method=\"qlora\"",
        "--set",
        "training.max_steps=3",
    ]);
    assert!(text.contains("Qlora"), "{text}");
    assert!(q.join("adapter_model.safetensors").is_file());

    // Resume from the step-10 checkpoint in a fresh folder: the same adapter and value head.
    let again = dir.path().join("ppo-resumed");
    let copy = again.join("checkpoint-10");
    std::fs::create_dir_all(&copy).unwrap();
    for f in std::fs::read_dir(out.join("checkpoint-10")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, copy.join(f.file_name().unwrap())).unwrap();
    }
    let text = ok(&["train", recipe(&again, "").to_str().unwrap(), "--resume"]);
    assert!(text.contains("resuming from"), "{text}");
    assert_resumed(&text, 10, &again);
    for f in ["adapter_model.safetensors", "value_head.safetensors"] {
        assert!(
            std::fs::read(out.join(f)).unwrap() == std::fs::read(again.join(f)).unwrap(),
            "the resumed PPO run ended with another {f}"
        );
    }

    // Bad input.
    let bad = |name: &str, data: &str, reward: &Path| -> String {
        let p = dir.path().join(name);
        std::fs::write(&p, data).unwrap();
        let text = format!(
            "model = \"{}\"\ntask = \"ppo\"\nmethod = \"lora\"\n[data]\ntrain = \"{}\"\n\
             max_length = 8\n[lora]\ntarget_modules = [\"q_proj\"]\n[ppo]\nreward_model = \"{}\"\n\
             response_length = 4\n\
             [training]\noutput_dir = \"{}\"\nmax_steps = 1\n",
            model.display(),
            p.display(),
            reward.display(),
            dir.path().join("bad-out").display()
        );
        let r = dir.path().join("bad-ppo.toml");
        std::fs::write(&r, text).unwrap();
        err(&["train", r.to_str().unwrap()])
    };
    let e = bad("empty.jsonl", "", &rm);
    assert!(e.contains("empty.jsonl") && e.contains("no rows"), "{e}");
    let e = bad("noprompt.jsonl", "{\"text\": \"w3 w4\"}\n", &rm);
    assert!(
        e.contains("noprompt.jsonl") && e.contains("\"prompt\""),
        "{e}"
    );
    let e = bad(
        "blank.jsonl",
        "{\"prompt\": \"w3\"}\n{\"prompt\": \"  \"}\n",
        &rm,
    );
    assert!(
        e.contains("blank.jsonl") && e.contains("empty prompt"),
        "{e}"
    );
    let good = "{\"prompt\": \"w3 w4\"}\n";
    let cls = root().join("tests/fixtures/tiny-llama-cls");
    let e = bad("ok1.jsonl", good, &cls);
    assert!(
        e.contains("one output") && e.contains("tiny-llama-cls"),
        "{e}"
    );
    let e = bad("ok2.jsonl", good, &dir.path().join("nowhere"));
    assert!(
        e.contains("ppo.reward_model") && e.contains("nowhere"),
        "{e}"
    );
}

/// With stderr not a terminal (here a pipe), every `logging_steps` prints one JSON line with
/// the loss, learning rate, grad norm, epoch and tokens/s; `report_to` writes the same logs and
/// the evaluations to `logs.jsonl`, and TensorBoard records (their framing and checksums read
/// back here; `report::tests` compares their bytes with TensorBoard's own writer). An
/// integration whet does not write is refused by name.
#[test]
fn logs_without_a_terminal_and_report_to_jsonl_and_tensorboard() {
    let dir = tempfile::tempdir().unwrap();
    let r = recipe(dir.path(), "lora", LORA);
    let out = dir.path().join("out");
    let run = whet(&[
        "train",
        r.to_str().unwrap(),
        "--set",
        "training.report_to=[\"jsonl\", \"tensorboard\"]",
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines.len(),
        3,
        "one line per step (logging_steps = 1):\n{stderr}"
    );
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["step"], i + 1, "{l}");
        for key in [
            "loss",
            "learning_rate",
            "grad_norm",
            "epoch",
            "tokens_per_second",
        ] {
            assert!(l[key].as_f64().is_some_and(f64::is_finite), "{key} in {l}");
        }
        assert!(l["tokens_per_second"].as_f64().unwrap() > 0.0, "{l}");
    }
    let jsonl = std::fs::read_to_string(out.join("logs.jsonl")).unwrap();
    let logged: Vec<serde_json::Value> = jsonl
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(&logged[..3], &lines[..], "the same train logs");
    assert!(
        logged[3..]
            .iter()
            .any(|l| l["eval_loss"].is_f64() && l["eval_accuracy"].is_f64()),
        "an evaluation: {jsonl}"
    );
    // TensorBoard: records of `len | crc(len) | data | crc(data)`; the file version, then an
    // event per train log and per evaluation, carrying their tags.
    let runs: Vec<_> = std::fs::read_dir(out.join("runs")).unwrap().collect();
    assert_eq!(runs.len(), 1);
    let bytes = std::fs::read(runs[0].as_ref().unwrap().path()).unwrap();
    let (mut at, mut records) = (0, vec![]);
    while at < bytes.len() {
        let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
        let data = &bytes[at + 12..at + 12 + len];
        let crc = u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap());
        let masked = crc32c::crc32c(data)
            .rotate_right(15)
            .wrapping_add(0xa282_ead8);
        assert_eq!(crc, masked, "record {} checksum", records.len());
        records.push(data.to_vec());
        at += 16 + len;
    }
    assert_eq!(at, bytes.len());
    // The file version, 3 train logs, at least one evaluation.
    assert!(records.len() >= 5, "{} records", records.len());
    let has = |tag: &str| {
        records
            .iter()
            .any(|r| r.windows(tag.len()).any(|w| w == tag.as_bytes()))
    };
    assert!(has("brain.Event:2") && has("train/loss") && has("train/grad_norm"));
    assert!(has("eval/loss") && has("eval/accuracy"));

    let bad = whet(&[
        "train",
        r.to_str().unwrap(),
        "--set",
        "training.report_to=\"wandb\"",
    ]);
    let text = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success());
    assert!(
        text.contains("training.report_to")
            && text.contains("\"wandb\"")
            && text.contains("\"tensorboard\""),
        "{text}"
    );
}

/// `whet init` and `whet train --model --data` infer a recipe from the data's columns and the
/// model's family: text + label with an encoder is classification (lists of labels:
/// multi-label), chosen / rejected with a decoder is DPO and with an encoder a reward model,
/// messages are SFT. Training without a recipe writes it (with the --set values) into the
/// output folder, and that recipe runs again. Data whose task cannot be told, or whose format
/// whet cannot read, gets an error naming the file.
#[test]
fn a_recipe_is_inferred_from_the_model_and_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let (train, _) = write_data(dir.path());
    let (model, data) = (minilm(), train.to_str().unwrap().to_string());
    let recipe = dir.path().join("r.toml");
    let init = |model: &Path, data: &str, out: &Path| {
        ok(&[
            "init",
            "--model",
            model.to_str().unwrap(),
            "--data",
            data,
            "-o",
            out.to_str().unwrap(),
        ])
    };
    let said = init(&model, &data, &recipe);
    assert!(
        said.contains("task sequence-classification, method lora"),
        "{said}"
    );
    let text = std::fs::read_to_string(&recipe).unwrap();
    for want in [
        "task = \"sequence-classification\"",
        "method = \"lora\"",
        "text_column = \"text\"",
        "label_column = \"label\"",
        "validation = 4",
        "eval_strategy = \"epoch\"",
    ] {
        assert!(text.contains(want), "{want} in:\n{text}");
    }
    let again = err(&[
        "init",
        "--model",
        model.to_str().unwrap(),
        "--data",
        &data,
        "-o",
        recipe.to_str().unwrap(),
    ]);
    assert!(again.contains("exists"), "{again}");

    // Training without a recipe, then from the recipe it wrote.
    let out = dir.path().join("out");
    let set_out = format!("training.output_dir=\"{}\"", out.display());
    let text = ok(&[
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data",
        &data,
        "--set",
        "training.max_steps=2",
        "--set",
        &set_out,
    ]);
    assert!(
        text.contains("inferred: task sequence-classification"),
        "{text}"
    );
    let written = std::fs::read_to_string(out.join("recipe.toml")).unwrap();
    assert!(
        written.contains("max_steps = 2") && written.contains(&out.display().to_string()),
        "{written}"
    );
    assert!(out.join("adapter_model.safetensors").is_file());
    let rerun = ok(&["train", out.join("recipe.toml").to_str().unwrap()]);
    assert!(rerun.contains("done: 2 steps"), "{rerun}");

    // Other columns, other tasks.
    let lines = |rows: &[String]| {
        let p = dir.path().join(format!("d{}.jsonl", rows.len()));
        std::fs::write(&p, rows.join("\n")).unwrap();
        p.to_str().unwrap().to_string()
    };
    let multi: Vec<String> = (0..12)
        .map(|i| {
            format!(
                "{{\"text\": \"t {i}\", \"labels\": [\"a\", \"b{}\"]}}",
                i % 2
            )
        })
        .collect();
    let said = init(&model, &lines(&multi), &dir.path().join("m.toml"));
    assert!(said.contains("task multi-label-classification"), "{said}");
    let (pairs, _) = dpo_pairs(dir.path());
    let decoder = tiny_decoder("tiny-llama", dir.path());
    let said = init(
        &decoder,
        pairs.to_str().unwrap(),
        &dir.path().join("dpo.toml"),
    );
    assert!(said.contains("task dpo, method lora"), "{said}");
    let said = init(&model, pairs.to_str().unwrap(), &dir.path().join("rm.toml"));
    assert!(said.contains("task reward-model"), "{said}");
    let chats: Vec<String> = (0..5)
        .map(|i| format!("{{\"messages\": [{{\"role\": \"user\", \"content\": \"w{i}\"}}, {{\"role\": \"assistant\", \"content\": \"w7\"}}]}}"))
        .collect();
    let said = init(&decoder, &lines(&chats), &dir.path().join("sft.toml"));
    assert!(
        said.contains("task causal-lm") && said.contains("messages"),
        "{said}"
    );

    // GLUE's pair columns: STS-B's real-valued scores are a regression, MNLI's a class; an
    // Alpaca JSON array (one JSON value over many lines) with a decoder is the Alpaca template.
    let sts: Vec<String> = (0..12)
        .map(|i| format!("{{\"sentence1\": \"a {i}\", \"sentence2\": \"b\", \"label\": {i}.5}}"))
        .collect();
    let said = init(&model, &lines(&sts), &dir.path().join("sts.toml"));
    assert!(
        said.contains("task regression") && said.contains("sentence1 + sentence2"),
        "{said}"
    );
    let text = std::fs::read_to_string(dir.path().join("sts.toml")).unwrap();
    assert!(text.contains("text_pair_column = \"sentence2\""), "{text}");
    let nli: Vec<String> = (0..11)
        .map(|i| {
            format!(
                "{{\"premise\": \"a {i}\", \"hypothesis\": \"b\", \"label\": {}}}",
                i % 3
            )
        })
        .collect();
    let said = init(&model, &lines(&nli), &dir.path().join("nli.toml"));
    assert!(
        said.contains("task sequence-classification")
            && said.contains("premise + hypothesis / label: one label a pair"),
        "{said}"
    );
    let alpaca = dir.path().join("alpaca_data.json");
    let rows: Vec<String> = (0..10)
        .map(|i| format!("  {{\n    \"instruction\": \"say {i}\",\n    \"input\": \"\",\n    \"output\": \"{i}\"\n  }}"))
        .collect();
    std::fs::write(&alpaca, format!("[\n{}\n]\n", rows.join(",\n"))).unwrap();
    let said = init(
        &decoder,
        alpaca.to_str().unwrap(),
        &dir.path().join("alpaca.toml"),
    );
    assert!(
        said.contains("task causal-lm") && said.contains("Alpaca template"),
        "{said}"
    );
    let text = std::fs::read_to_string(dir.path().join("alpaca.toml")).unwrap();
    assert!(text.contains("template = \"alpaca\""), "{text}");

    // run_ner.py's layout: words and their tags.
    let ner: Vec<String> = (0..10)
        .map(|i| format!("{{\"tokens\": [\"a{i}\", \"b\"], \"ner_tags\": [1, 0]}}"))
        .collect();
    let said = init(&model, &lines(&ner), &dir.path().join("ner.toml"));
    assert!(
        said.contains("task token-classification") && said.contains("tokens / ner_tags"),
        "{said}"
    );

    // A folder of split files, as a dataset repository lays them out, is its splits: the
    // recipe names each split's files and takes no seeded validation split.
    let folder = dir.path().join("repo");
    std::fs::create_dir_all(folder.join("data")).unwrap();
    let rows = std::fs::read_to_string(&train).unwrap();
    for f in [
        "train-00000-of-00002",
        "train-00001-of-00002",
        "validation-00000-of-00001",
    ] {
        std::fs::write(folder.join(format!("data/{f}.jsonl")), &rows).unwrap();
    }
    let said = init(
        &model,
        folder.to_str().unwrap(),
        &dir.path().join("repo.toml"),
    );
    assert!(said.contains("the folder's validation files"), "{said}");
    let text = std::fs::read_to_string(dir.path().join("repo.toml")).unwrap();
    assert!(
        text.contains("data/train*.jsonl\"")
            && text.contains("data/validation-00000-of-00001.jsonl\"")
            && !text.contains("[data.split]"),
        "{text}"
    );

    // Bad input, named.
    let odd = lines(&["{\"a\": 1}".to_string()]);
    let e = err(&[
        "init",
        "--model",
        model.to_str().unwrap(),
        "--data",
        &odd,
        "-o",
        "unused.toml",
    ]);
    assert!(
        e.contains(&odd) && e.contains("cannot tell the task"),
        "{e}"
    );
    let xyz = dir.path().join("d.xyz");
    std::fs::write(&xyz, "x").unwrap();
    let e = err(&[
        "init",
        "--model",
        model.to_str().unwrap(),
        "--data",
        xyz.to_str().unwrap(),
        "-o",
        "unused.toml",
    ]);
    assert!(e.contains("d.xyz") && e.contains("extension"), "{e}");
}

/// `whet sweep` over three learning rates of which one learns (the planted best): successive
/// halving trains all three to step 3, stops the two that do not learn there, and takes the
/// best to step 9; killed mid-way (WHET_CRASH_AT), the same command resumes the sweep, running
/// no stopped trial again and continuing the best from its checkpoint; the table, best.toml
/// and the chart are written.
#[test]
fn a_sweep_finds_the_planted_best_stops_the_rest_early_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let r = recipe(dir.path(), "head", "leakage = \"off\"");
    let out = dir.path().join("out");
    let sweep = |crash: Option<&str>, jobs: &str| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_whet"));
        c.env("WHET_CACHE", crate::common::cache()).args([
            "sweep",
            r.to_str().unwrap(),
            "--set",
            "training.max_steps=9",
            "--grid",
            "training.learning_rate=1e-9,3e-3,1e-8",
        ]);
        if !jobs.is_empty() {
            c.args(["--jobs", jobs]);
        } else {
            // Handed on to the trials that run as processes.
            c.args(["--device", "cpu"]);
        }
        if let Some(at) = crash {
            c.env("WHET_CRASH_AT", at);
        }
        c.output().unwrap()
    };
    let state = || -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(out.join("sweep.json")).unwrap()).unwrap()
    };
    // The first rung's three trials run two at a time (processes of their own) where the
    // memory plan says they fit; the second rung's one trial runs in the sweep's process,
    // which the crash point aborts.
    let first = sweep(Some("step:6"), "");
    assert!(!first.status.success(), "the crash point aborts the sweep");
    if std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2 {
        let said = String::from_utf8_lossy(&first.stdout);
        assert!(said.contains("2 trial(s) at a time"), "{said}");
        let log = std::fs::read_to_string(out.join("trial-0/train.log")).unwrap();
        assert!(log.contains("paused after step 3"), "{log}");
    }
    let s = state();
    assert_eq!(s["rungs"], serde_json::json!([3, 9]));
    let status =
        |s: &serde_json::Value, i: usize| s["trials"][i]["status"].as_str().unwrap().to_string();
    assert_eq!(
        (status(&s, 0), status(&s, 1), status(&s, 2)),
        ("stopped".into(), "running".into(), "stopped".into())
    );
    for i in [0, 2] {
        assert_eq!(
            s["trials"][i]["evals"].as_array().unwrap().len(),
            1,
            "stopped at step 3: {s}"
        );
        assert!(!out.join(format!("trial-{i}/checkpoint-6")).exists());
    }

    let second = sweep(None, "1");
    let text = String::from_utf8_lossy(&second.stdout).into_owned();
    assert!(
        second.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&second.stderr)
    );
    assert!(text.contains("resuming the sweep"), "{text}");
    assert!(text.contains("trial-1/checkpoint-3"), "{text}");
    assert!(
        !text.contains("== trial 0") && !text.contains("== trial 2"),
        "{text}"
    );
    let s = state();
    assert_eq!(status(&s, 1), "done");
    let steps: Vec<u64> = s["trials"][1]["evals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e[0].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [3, 6, 9]);
    assert!(
        text.contains("best: trial 1 (training.learning_rate=3e-3)"),
        "{text}"
    );
    let best = std::fs::read_to_string(out.join("best.toml")).unwrap();
    let recipe = whet_train::Recipe::parse(&best, &[]).unwrap();
    assert_eq!(recipe.training.learning_rate, 3e-3);
    assert!(
        std::fs::read_to_string(out.join("sweep.md"))
            .unwrap()
            .contains("| 1 (best) |")
    );
    assert!(out.join("sweep.png").is_file() && out.join("trial-1/model.safetensors").is_file());
}

/// With `block_size`, the leakage check compares the blocks that train and are held out, not
/// the lines of the text: a line repeated throughout (a play's speaker name) is no leak when
/// every block differs.
#[test]
fn the_leakage_check_of_plain_text_blocks_compares_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_decoder("tiny-llama", dir.path());
    let text: Vec<String> = (0..80)
        .map(|i| {
            if i % 2 == 0 {
                "w5".to_string()
            } else {
                format!("w{}", 10 + i)
            }
        })
        .collect();
    let data = dir.path().join("play.txt");
    std::fs::write(&data, text.join("\n")).unwrap();
    let run = |block: &str, name: &str| {
        let out = dir.path().join(name);
        let recipe = format!(
            "model = \"{}\"\ntask = \"causal-lm\"\nmethod = \"full\"\n[data]\ntrain = \"{}\"\n\
             {block}\nsplit = {{ validation = 0.2, seed = 1 }}\n[training]\n\
             output_dir = \"{}\"\nmax_steps = 1\nper_device_train_batch_size = 2\n",
            model.display(),
            data.display(),
            out.display()
        );
        let r = dir.path().join(format!("{name}.toml"));
        std::fs::write(&r, recipe).unwrap();
        let said = ok(&["train", r.to_str().unwrap()]);
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("leakage.json")).unwrap())
                .unwrap();
        (said, report)
    };
    let (said, report) = run("block_size = 8", "blocks");
    assert!(
        said.contains("no duplicates within train or between the splits"),
        "{said}"
    );
    for f in report["findings"].as_array().unwrap() {
        assert_eq!(
            (f["exact"].as_u64(), f["near"].as_u64()),
            (Some(0), Some(0)),
            "{f}"
        );
    }
    // One example per line: the repeated line is seen.
    let (_, report) = run("max_length = 16", "lines");
    let train = &report["findings"][0];
    assert_eq!(train["split"], "train");
    assert!(train["exact"].as_u64().unwrap() >= 20, "{train}");
}

/// `data.chat_template_path` (trl's `chat_template_path`) renders conversations for a tokenizer
/// without a template, is saved with the model, and is refused where nothing is rendered.
#[test]
fn a_chat_template_path_renders_conversations_the_tokenizer_has_no_template_for() {
    let dir = tempfile::tempdir().unwrap();
    // families/llama-causal without its chat template.
    let model = dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(
            common::root()
                .join("tests/fixtures/families/llama-causal")
                .join(f),
            model.join(f),
        )
        .unwrap();
    }
    let data = dir.path().join("chats.jsonl");
    let rows: String = (0..12)
        .map(|i| {
            format!(
                "{{\"messages\": [{{\"role\": \"user\", \"content\": \"w{} w{}\"}}, \
                 {{\"role\": \"assistant\", \"content\": \"w{} w{}\"}}]}}\n",
                10 + i % 5,
                20 + i % 3,
                30 + i % 5,
                40 + i % 3
            )
        })
        .collect();
    std::fs::write(&data, rows).unwrap();
    let template = dir.path().join("turns.jinja");
    let text = "{% for m in messages %}<s> {{ m['content'] }} </s>{% endfor %}\
                {% if add_generation_prompt %}<s>{% endif %}";
    std::fs::write(&template, text).unwrap();
    let out = dir.path().join("out");
    let recipe = dir.path().join("recipe.toml");
    let write = |extra: &str, task: &str| {
        std::fs::write(
            &recipe,
            format!(
                "model = \"{}\"\ntask = \"{task}\"\nmethod = \"full\"\n[data]\ntrain = \"{}\"\n\
                 messages_column = \"messages\"\nmax_length = 16\n{extra}\n[data.split]\n\
                 validation = 4\n[training]\noutput_dir = \"{}\"\nlearning_rate = 1e-2\n\
                 per_device_train_batch_size = 4\nmax_steps = 2\n",
                model.display(),
                data.display(),
                out.display()
            ),
        )
        .unwrap();
    };
    let r = recipe.to_str().unwrap();
    write("", "causal-lm");
    let e = err(&["train", r]);
    assert!(e.contains("chat template"), "{e}");
    write(
        &format!("chat_template_path = \"{}\"", template.display()),
        "causal-lm",
    );
    ok(&["train", r]);
    assert_eq!(
        std::fs::read_to_string(out.join("chat_template.jinja")).unwrap(),
        text
    );
    // The saved folder's tokenizer loads with it.
    let saved = whet_models::TextTokenizer::from_folder(&out).unwrap();
    assert_eq!(saved.chat_template.as_deref(), Some(text));
    let not_jinja = dir.path().join("turns.txt");
    std::fs::write(&not_jinja, text).unwrap();
    write(
        &format!("chat_template_path = \"{}\"", not_jinja.display()),
        "causal-lm",
    );
    let e = err(&["train", r]);
    assert!(
        e.contains("data.chat_template_path") && e.contains(".jinja"),
        "{e}"
    );
    write(
        &format!("chat_template_path = \"{}\"", model.display()),
        "causal-lm",
    );
    let e = err(&["train", r]);
    assert!(e.contains("has no chat template"), "{e}");
    write(
        &format!("chat_template_path = \"{}\"", template.display()),
        "sequence-classification",
    );
    let e = err(&["train", r]);
    assert!(e.contains("data.chat_template_path"), "{e}");
}
