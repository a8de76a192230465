//! Seeded fuzzing of the recipe reader: [`Recipe::parse`] with `--set` overrides, over the
//! committed recipes and one with every table, with truncations, bit flips, stray TOML
//! fragments, values of every TOML type at the edges, and random overrides. Every case must
//! end in `Ok` or `Err`: no panic, no hang, and no allocation out of proportion to the text.
//! An accepted recipe is also written back (`to_toml`), given peft's defaults and split.
//!
//! The cases repeat exactly (a hand-written SplitMix64); a failure names the case to rerun.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write as _;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

use whet_train::recipe::Recipe;

// ---------------------------------------------------------------------------------------------
// The harness, shared by the four fuzz tests (tests/fuzz_harness.rs): a counting allocator, a
// watchdog, a seeded mutator, and a runner that turns a panic, a hang or an oversized allocation
// into a failure naming the case.
include!("../../../tests/fuzz_harness.rs");

// Text fragments and the text mutator (tests/fuzz_text.rs).
include!("../../../tests/fuzz_text.rs");

// ---------------------------------------------------------------------------------------------
// Recipes

/// A recipe with every table, so each one's fields meet the mutations.
const FULL: &str = r#"
model = "<cache>/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
task = "causal-lm"
method = "lora"

[data]
train = "<cache>/data/train.jsonl"
validation = "data/validation.jsonl"
text_column = "text"
label_names = ["neg", "pos"]
max_length = 256
truncation_side = "left"
encoding = "latin-1"
split = { train = 0.8, validation = 0.1, test = 0.1, seed = 7 }
tokenization_cache = false
template = { prompt = "Q: {question}\n### A:", completion = " {answer}" }
completion_only_loss = true
too_long = "truncate"
doc_stride = 64
max_answer_length = 30

[lora]
r = 8
lora_alpha = 16.0
lora_dropout = 0.05
target_modules = ["q_proj", "v_proj"]
bias = "none"
modules_to_save = ["score"]
use_rslora = true

[quantization]
keep_gguf_quantized = true

[head]
unfreeze_top_layers = 1

[dpo]
beta = 0.1
loss_type = "sigmoid"

[ppo]
reward_model = "<cache>/reward"

[training]
output_dir = "runs/full"
learning_rate = 2e-4
per_device_train_batch_size = 4
per_device_eval_batch_size = 8
num_train_epochs = 1.5
max_steps = -1
gradient_accumulation_steps = 2
weight_decay = 0.01
max_grad_norm = 1.0
lr_scheduler_type = "cosine"
warmup_ratio = 0.1
eval_strategy = "steps"
eval_steps = 10
save_strategy = "steps"
save_steps = 20
save_total_limit = 2
load_best_model_at_end = true
metric_for_best_model = "eval_loss"
greater_is_better = false
early_stopping_patience = 3
logging_steps = 5
seed = 42
"#;

/// TOML values at the edges of what a field can hold, of every TOML type.
fn edge_toml(rng: &mut Rng) -> toml::Value {
    use toml::Value;
    match rng.below(16) {
        0 => Value::Integer(0),
        1 => Value::Integer(-1),
        2 => Value::Integer(i64::MAX),
        3 => Value::Integer(i64::MIN),
        4 => Value::Integer(rng.edge() as i64),
        5 => Value::Float(f64::NAN),
        6 => Value::Float(f64::INFINITY),
        7 => Value::Float(-0.0),
        8 => Value::Float(1e308),
        9 => Value::Float(0.5),
        10 => Value::String(String::new()),
        11 => Value::String(["steps", "no", "x", "<cache>", "../.."][rng.below(5)].into()),
        12 => Value::Boolean(rng.below(2) == 1),
        13 => Value::Array(vec![Value::Integer(1), Value::String("a".into())]),
        14 => Value::Table(toml::Table::new()),
        _ => "1979-05-27T07:32:00Z".parse().map(Value::Datetime).unwrap(),
    }
}

/// Every value's path in `t` (table keys and array indices).
fn toml_paths(v: &toml::Value, at: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    out.push(at.clone());
    let children: Vec<(String, &toml::Value)> = match v {
        toml::Value::Table(t) => t.iter().map(|(k, v)| (k.clone(), v)).collect(),
        toml::Value::Array(a) => a
            .iter()
            .enumerate()
            .map(|(i, v)| (i.to_string(), v))
            .collect(),
        _ => return,
    };
    for (k, child) in children {
        at.push(k);
        toml_paths(child, at, out);
        at.pop();
    }
}

fn toml_at<'a>(v: &'a mut toml::Value, path: &[String]) -> &'a mut toml::Value {
    path.iter().fold(v, |v, k| match v {
        toml::Value::Table(t) => t.get_mut(k).expect("a path from `toml_paths`"),
        toml::Value::Array(a) => &mut a[k.parse::<usize>().expect("an index")],
        _ => unreachable!("`toml_paths` descends into containers only"),
    })
}

/// One to three edits of a TOML document: a value replaced by an edge value, a key removed,
/// or an unknown key added.
fn mutate_toml(seed: &toml::Value, rng: &mut Rng) -> String {
    let mut v = seed.clone();
    for _ in 0..1 + rng.below(3) {
        let mut all = vec![];
        toml_paths(&v, &mut vec![], &mut all);
        let path = all[rng.below(all.len())].clone();
        match rng.below(5) {
            0 if !path.is_empty() => {
                let (last, parent) = path.split_last().expect("not empty");
                if let toml::Value::Table(t) = toml_at(&mut v, parent) {
                    t.remove(last);
                }
            }
            1 => {
                if let toml::Value::Table(t) = toml_at(&mut v, &path) {
                    t.insert(format!("unknown_{}", rng.below(10)), edge_toml(rng));
                }
            }
            _ if path.is_empty() => {}
            _ => *toml_at(&mut v, &path) = edge_toml(rng),
        }
    }
    // A value TOML cannot write (a datetime as a table key's parent, ...) leaves the seed.
    toml::to_string(&v).unwrap_or_default()
}

/// A `--set key=value` override: known keys and broken ones, values of every kind.
fn random_override(rng: &mut Rng) -> String {
    const KEYS: &[&str] = &[
        "model",
        "task",
        "method",
        "data.max_length",
        "data.split.train",
        "data.split.validation",
        "data.split.seed",
        "data.template",
        "lora.r",
        "lora.target_modules",
        "quantization.load_in_4bit",
        "training.learning_rate",
        "training.eval_strategy",
        "training.per_device_train_batch_size",
        "training.num_train_epochs",
        "training.warmup_ratio",
        "training",
        "a..b",
        ".",
        "",
        "data.",
        "data.split.train.x",
        "training.output_dir.x",
    ];
    const VALUES: &[&str] = &[
        "0",
        "-1",
        "1e308",
        "nan",
        "-inf",
        "9223372036854775808",
        "\"qlora\"",
        "qlora",
        "[1, \"a\"]",
        "{ x = 1 }",
        "",
        "=",
        "\"",
        "[[[",
        "true",
        "0.5",
        "1979-05-27",
    ];
    let key = KEYS[rng.below(KEYS.len())];
    let value = VALUES[rng.below(VALUES.len())];
    match rng.below(8) {
        0 => format!("{key}{value}"),
        _ => format!("{key}={value}"),
    }
}

/// Parses, and for an accepted recipe writes it back, fills in peft's defaults for two model
/// types, reads the quantisation and template, and applies the split to 50 items.
fn exercise(text: &str, overrides: &[String]) -> bool {
    let Ok(recipe) = Recipe::parse(text, overrides) else {
        return false;
    };
    let _ = recipe.to_toml();
    let _ = recipe.quant_spec();
    if let Some(t) = &recipe.data.template {
        let _ = t.resolve();
    }
    let items: Vec<u32> = (0..50).collect();
    let _ = recipe.data.parts(items, None, None);
    for model_type in ["llama", "distilbert"] {
        let _ = recipe.clone().resolve_peft_defaults(model_type);
    }
    true
}

/// Inputs that broke the reader, kept as they were found.
fn regressions() -> Vec<(&'static str, String, Vec<String>)> {
    let split = "split = { train = 0.8, validation = 0.1, test = 0.1, seed = 7 }";
    assert!(FULL.contains(split));
    vec![
        // Two counts near usize::MAX overflowed the sum of the parts (whet-data's
        // `seeded_split`).
        (
            "split counts summing past usize::MAX",
            FULL.replace(split, "split = { train = 1e300, validation = 1e300 }"),
            vec![],
        ),
        (
            "--set split counts summing past usize::MAX",
            FULL.into(),
            vec![
                "data.split.train=1e300".into(),
                "data.split.test=1e300".into(),
            ],
        ),
    ]
}

#[test]
fn recipes_survive_mutation() {
    if !alone("recipes_survive_mutation") {
        return;
    }
    let mut run = Run::new("recipe");
    let mut rng = Rng(0x7265_6369_7065);
    let go = |run: &mut Run, label: &str, text: &str, overrides: &[String]| {
        let len = text.len() + overrides.iter().map(String::len).sum::<usize>();
        run.case(label, len, || exercise(text, overrides));
    };
    run.group("regressions");
    for (name, text, overrides) in regressions() {
        go(&mut run, &format!("regression {name}"), &text, &overrides);
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../recipes");
    let mut seeds: Vec<(String, String)> = vec![("full".into(), FULL.into())];
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    for p in files {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        seeds.push((name, std::fs::read_to_string(&p).unwrap()));
    }
    for (name, text) in &seeds {
        run.group(name.clone());
        if let Err(e) = Recipe::parse(text, &[]) {
            panic!("the seed {name} must parse: {e}");
        }
        let seed: toml::Value = toml::from_str(text).unwrap();
        let bytes = text.as_bytes();
        for cut in cuts(bytes.len(), 0, scaled(150), &mut rng) {
            let cut_text = String::from_utf8_lossy(&bytes[..cut]);
            go(&mut run, &format!("{name} cut at {cut}"), &cut_text, &[]);
        }
        for i in 0..scaled(400) {
            let text = mutate_toml(&seed, &mut rng);
            go(&mut run, &format!("{name} value #{i}"), &text, &[]);
        }
        for i in 0..scaled(400) {
            let text = String::from_utf8_lossy(&mutate_text(bytes, &mut rng)).into_owned();
            go(&mut run, &format!("{name} text #{i}"), &text, &[]);
        }
        for i in 0..scaled(200) {
            let overrides: Vec<String> = (0..1 + rng.below(3))
                .map(|_| random_override(&mut rng))
                .collect();
            go(
                &mut run,
                &format!("{name} overrides #{i}"),
                text,
                &overrides,
            );
        }
    }
    run.group("deep nesting");
    for depth in [10, 100, 1_000, 10_000] {
        for (open, close) in [("[", "]"), ("{ a = ", " }")] {
            let text = format!("model = {}1{}", open.repeat(depth), close.repeat(depth));
            go(
                &mut run,
                &format!("{open:?} nested {depth} deep"),
                &text,
                &[],
            );
        }
        let dotted = format!("{} = 1", vec!["a"; depth].join("."));
        go(&mut run, &format!("dotted key {depth} deep"), &dotted, &[]);
        let set = vec![format!("{}=1", vec!["a"; depth].join("."))];
        go(&mut run, &format!("--set key {depth} deep"), FULL, &set);
    }
    run.finish();
}
