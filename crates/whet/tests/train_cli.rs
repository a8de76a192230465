//! `whet train`, `whet predict` and `whet eval` end to end on MiniLM with a few examples, and
//! the errors bad recipes and data get.

mod common;

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
}

#[test]
fn train_help_explains_its_options() {
    let text = ok(&["train", "--help"]);
    assert!(
        text.contains("--set") && text.contains("Override a recipe value"),
        "{text}"
    );
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

    let mut resume = args_b.clone();
    resume.push("--resume");
    let text = ok(&resume);
    assert!(text.contains("resuming from"), "{text}");
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
