//! `--device` through the CLI: LoRA, full and QLoRA training on the test device
//! (`WHET_TEST_DEVICE`, default cpu; CI sets `wgpu:cpu`) end with the weights the CPU ends
//! with, a checkpoint written on one device resumes on the other, and a device that cannot be
//! had is a clear error.

use crate::common;
use crate::train_cli::{dpo_pairs, qa_data, tiny_decoder};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::*;

/// The device under test, as `--device` spells it.
fn test_device() -> String {
    std::env::var("WHET_TEST_DEVICE")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| "cpu".into())
}

/// Every tensor of a safetensors file, as f32.
fn tensors(path: &Path) -> BTreeMap<String, Vec<f32>> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
            let v = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (name, v)
        })
        .collect()
}

/// The same tensors within `tol` relative to each tensor's largest value.
fn assert_same_weights(a: &Path, b: &Path, tol: f32, what: &str) {
    let (a, b) = (tensors(a), tensors(b));
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "{what}: tensor names"
    );
    for (name, x) in &a {
        let y = &b[name];
        let scale = x.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
        let d = x.iter().zip(y).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        assert!(
            d <= tol * scale,
            "{what}: {name} differs by {d:e} (largest value {scale:e})"
        );
    }
}

/// A causal-LM recipe on tiny-llama: 4 steps, checkpoints every 2, dropout on (LLaMA's
/// attention dropout is 0, so dropout masks do not enter the comparison).
fn recipe(dir: &Path, method: &str, extra: &str) -> PathBuf {
    let model = tiny_decoder("tiny-llama", dir);
    let data = qa_data(dir);
    let r = dir.join(format!("{method}.toml"));
    std::fs::write(
        &r,
        format!(
            "model = \"{}\"\ntask = \"causal-lm\"\nmethod = \"{method}\"\n[data]\ntrain = \"{}\"\n\
             max_length = 16\ntemplate = {{ prompt = \"{{q}} <bos>\", completion = \"{{a}}\" }}\n\
             {extra}\n[training]\nlearning_rate = 1e-2\nper_device_train_batch_size = 4\n\
             max_steps = 4\nsave_steps = 2\nlogging_steps = 1\noutput_dir = \"{}\"\n",
            model.display(),
            data.display(),
            dir.join("out").display(),
        ),
    )
    .unwrap();
    r
}

fn train(recipe: &Path, device: &str, out: &Path, extra: &[&str]) -> String {
    let out_set = format!("training.output_dir=\"{}\"", out.display());
    let mut args = vec![
        "train",
        recipe.to_str().unwrap(),
        "--device",
        device,
        "--set",
        &out_set,
    ];
    args.extend(extra);
    ok(&args)
}

/// How far four Adam steps at learning rate 1e-2 may carry float-rounding differences between
/// devices, relative to a tensor's largest value. Measured: below 1e-4 on an AVX2 EPYC, 1.5e-4
/// on an AVX-512 EPYC (Adam's first steps move a weight by about the learning rate whatever its
/// gradient's size, so a near-zero gradient rounded differently moves it differently).
const WEIGHTS_TOL: f32 = 1e-3;

const LORA: &str =
    "[lora]\nr = 4\nlora_alpha = 8\ntarget_modules = [\"q_proj\", \"v_proj\", \"down_proj\"]";

/// Four steps of LoRA, full fine-tuning and QLoRA (NF4 base) on the test device end within
/// [`WEIGHTS_TOL`] of the CPU's weights (relative to each tensor's largest value): float sums in
/// another order, compounded over four Adam steps at a high learning rate, stay below it, while
/// a wrong kernel or a step that ran twice is far above it. Full fine-tuning runs once more with
/// `adamw_bnb_8bit`, over a vocabulary widened so that the embedding and the LM head keep
/// 8-bit moments (quantised on the device there, on the host on the CPU).
#[test]
fn training_on_the_test_device_ends_with_the_cpu_weights() {
    let device = test_device();
    for (method, extra, file, optim) in [
        ("lora", LORA, "adapter_model.safetensors", None),
        ("full", "", "model.safetensors", None),
        ("qlora", LORA, "adapter_model.safetensors", None),
        ("full", "", "model.safetensors", Some("adamw_bnb_8bit")),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let r = recipe(dir.path(), method, extra);
        let (set, what) = match optim {
            Some(optim) => {
                widen_vocabulary(&dir.path().join("tiny-llama"), 150);
                let set = vec!["--set".to_string(), format!("training.optim=\"{optim}\"")];
                (set, format!("{method}, {optim}"))
            }
            None => (vec![], method.to_string()),
        };
        let set: Vec<&str> = set.iter().map(String::as_str).collect();
        let (cpu, dev) = (dir.path().join("cpu"), dir.path().join("dev"));
        train(&r, "cpu", &cpu, &set);
        let text = train(&r, &device, &dev, &set);
        assert!(text.contains("after training"), "{what}: {text}");
        assert_same_weights(&cpu.join(file), &dev.join(file), WEIGHTS_TOL, &what);
        if optim.is_some() {
            // The widened matrices did keep 8-bit moments (codes and block maxima saved).
            let saved = tensors(&dev.join("checkpoint-4/optimizer.safetensors"));
            for name in ["model.embed_tokens.weight", "lm_head.weight"] {
                assert_eq!(
                    saved[&format!("m8absmax.{name}")].len(),
                    19,
                    "{what}: {name}"
                );
            }
        }
    }
}

/// Widens the vocabulary of the tiny-llama copy in `model` to `vocab` rows (new embedding and
/// LM-head rows of small fixed values; the tokenizer never emits their ids), so that both
/// matrices reach `adamw_bnb_8bit`'s 8-bit moments: 4096 values and up (the fixture's are
/// 99 × 32), 150 × 32 making 18 blocks of 256 and a partial one.
fn widen_vocabulary(model: &Path, vocab: usize) {
    let file = model.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let widened: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let mut shape = view.shape().to_vec();
            let mut data = view.data().to_vec();
            if name == "model.embed_tokens.weight" || name == "lm_head.weight" {
                let hidden = shape[1];
                let fixed = (shape[0] * hidden..vocab * hidden)
                    .map(|i| ((i * 37 % 101) as f32 - 50.0) * 4e-4);
                data.extend(fixed.flat_map(f32::to_le_bytes));
                shape[0] = vocab;
            }
            (name, shape, data)
        })
        .collect();
    let views = widened.iter().map(|(name, shape, data)| {
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        (name.clone(), view)
    });
    std::fs::write(&file, safetensors::serialize(views, None).unwrap()).unwrap();
    let config = model.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    cfg["vocab_size"] = vocab.into();
    std::fs::write(&config, cfg.to_string()).unwrap();
}

/// A checkpoint written on the CPU resumes on the test device, and one written there resumes
/// on the CPU; both end with the weights of an uninterrupted CPU run. The first half dies at
/// step 3 (`WHET_CRASH_AT`), after writing checkpoint-2.
#[test]
fn a_checkpoint_resumes_on_the_other_device() {
    let device = test_device();
    let dir = tempfile::tempdir().unwrap();
    let r = recipe(dir.path(), "lora", LORA);
    let whole = dir.path().join("whole");
    train(&r, "cpu", &whole, &[]);
    let want = whole.join("adapter_model.safetensors");
    for (first, second) in [("cpu", device.as_str()), (device.as_str(), "cpu")] {
        let out = dir.path().join(format!("{first}-then-{second}"));
        let out_set = format!("training.output_dir=\"{}\"", out.display());
        let args = ["train", r.to_str().unwrap(), "--set", &out_set, "--device"];
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_whet"))
            .env("WHET_CACHE", cache())
            .env("WHET_CRASH_AT", "step:3")
            .args(args)
            .arg(first)
            .output()
            .unwrap();
        assert!(!o.status.success(), "{first}: the first half did not die");
        assert!(
            out.join("checkpoint-2").is_dir(),
            "{first}: no checkpoint-2"
        );
        let text = train(&r, second, &out, &["--resume"]);
        assert!(text.contains("resuming from"), "{text}");
        let got = out.join("adapter_model.safetensors");
        assert_same_weights(&want, &got, WEIGHTS_TOL, &format!("{first} then {second}"));
    }
}

/// An unknown device names the choices; a runtime this build lacks names the feature to build
/// with; neither starts any work.
#[test]
fn a_device_that_cannot_be_had_is_a_clear_error() {
    let e = err(&["train", "no-such-recipe.toml", "--device", "tpu"]);
    assert!(
        e.contains("unknown device \"tpu\"") && e.contains("wgpu:cpu"),
        "{e}"
    );
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_whet"))
        .env("WHET_DEVICE", "tpu")
        .args(["info", "no-such-model"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("\"tpu\""),
        "WHET_DEVICE: {e}"
    );
    if !cfg!(feature = "cuda") {
        let dir = tempfile::tempdir().unwrap();
        let r = recipe(dir.path(), "lora", LORA);
        let e = err(&["train", r.to_str().unwrap(), "--device", "cuda:1"]);
        assert!(e.contains("cuda:1") && e.contains("--features cuda"), "{e}");
    }
}

/// The largest difference between two runs' tensors, relative to each tensor's largest value.
fn largest_difference(a: &Path, b: &Path) -> f32 {
    let (a, b) = (tensors(a), tensors(b));
    let mut worst = 0f32;
    for (name, x) in &a {
        let scale = x.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
        let d = x
            .iter()
            .zip(&b[name])
            .fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        worst = worst.max(d / scale);
    }
    worst
}

/// The train loss of each logged step, from the output folder's trainer_state.json.
fn train_losses(out: &Path) -> Vec<f64> {
    let text = std::fs::read_to_string(out.join("trainer_state.json")).unwrap();
    let state: serde_json::Value = serde_json::from_str(&text).unwrap();
    state["log_history"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e.get("loss").and_then(|l| l.as_f64()))
        .collect()
}

/// Mixed precision on the test device: `fp16 = true`, and `bf16 = true` where the device has
/// bf16 arithmetic, train LoRA with each step's loss near the f32 run's (measured: 1e-4
/// relative for fp16, 1e-3 for bf16; the bounds are ten times that) but f32 weights not equal
/// to the f32 run's (the products round to 16 bits: a flag that did nothing would end exactly
/// on the f32 weights);
/// `training.tf32 = true` asks for TF32 in f32 products, which only a CUDA device has: on any
/// other device it is refused, naming the key, before any work (transformers refuses it too).
#[test]
fn tf32_is_refused_on_a_device_without_it() {
    let device = test_device();
    if device.starts_with("cuda") {
        eprintln!("skipped: {device} may have TF32");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let r = recipe(dir.path(), "lora", LORA);
    let out = dir.path().join("tf32");
    let out_set = format!("training.output_dir=\"{}\"", out.display());
    let args = ["train", r.to_str().unwrap(), "--device", &device];
    let e = err(&[
        &args[..],
        &["--set", &out_set, "--set", "training.tf32=true"],
    ]
    .concat());
    assert!(e.contains("training.tf32") && e.contains("TF32"), "{e}");
    assert!(
        !out.join("checkpoint-2").exists(),
        "tf32 refused after starting"
    );
}

/// fp16's loss scale is kept in the checkpoint; bf16 on a device without it is refused,
/// naming the key, before any work, except on a CPU without AVX512-BF16, which says so and runs
/// the f32 products (the f32 run's weights exactly).
#[test]
fn mixed_precision_trains_near_the_f32_run() {
    let device = test_device();
    let dir = tempfile::tempdir().unwrap();
    let r = recipe(dir.path(), "lora", LORA);
    let f32_run = dir.path().join("f32");
    train(&r, &device, &f32_run, &[]);
    let want = f32_run.join("adapter_model.safetensors");
    let bf16_refused = device.starts_with("wgpu");
    // The CPU computes bf16 products only with AVX512-BF16; elsewhere it says so and runs f32.
    let bf16_is_f32 = device == "cpu" && !whet_models::kernels::bf16::available();
    for (key, tol) in [("fp16", 1e-3), ("bf16", 1e-2)] {
        let out = dir.path().join(key);
        let set = format!("training.{key}=true");
        if key == "bf16" && bf16_is_f32 {
            let out_set = format!("training.output_dir=\"{}\"", out.display());
            let args = ["train", r.to_str().unwrap(), "--device", &device];
            let o = whet(&[&args[..], &["--set", &out_set, "--set", &set]].concat());
            let e = String::from_utf8_lossy(&o.stderr);
            assert!(o.status.success(), "{e}");
            assert!(
                e.contains("AVX512-BF16") && e.contains("f32"),
                "no note: {e}"
            );
            let d = largest_difference(&want, &out.join("adapter_model.safetensors"));
            assert_eq!(d, 0.0, "bf16 on a CPU without it should be the f32 run");
            continue;
        }
        if key == "bf16" && bf16_refused {
            let out_set = format!("training.output_dir=\"{}\"", out.display());
            let args = [
                "train",
                r.to_str().unwrap(),
                "--device",
                &device,
                "--set",
                &out_set,
            ];
            let e = err(&[&args[..], &["--set", &set]].concat());
            assert!(e.contains("training.bf16") && e.contains("fp16"), "{e}");
            assert!(
                !out.join("checkpoint-2").exists(),
                "bf16 refused after starting"
            );
            continue;
        }
        let text = train(&r, &device, &out, &["--set", &set]);
        assert!(text.contains("after training"), "{key}: {text}");
        let d = largest_difference(&want, &out.join("adapter_model.safetensors"));
        assert!(
            d > 0.0,
            "{key}: the weights equal the f32 run's: nothing ran in 16 bits"
        );
        let (base, got) = (train_losses(&f32_run), train_losses(&out));
        assert_eq!(base.len(), got.len(), "{key}: logged steps");
        for (step, (a, b)) in base.iter().zip(&got).enumerate() {
            assert!(
                (a - b).abs() <= tol * a.abs(),
                "{key}: step {} loss {b}, f32 run {a}",
                step + 1
            );
        }
        let state = std::fs::read_to_string(out.join("checkpoint-2/trainer_state.json")).unwrap();
        assert_eq!(
            state.contains("loss_scaler"),
            key == "fp16",
            "{key}: {state}"
        );
    }
}

/// DPO with LoRA on the test device (the reference is the adapter switched off, computed
/// without autodiff and used as a constant on the training device): the CPU's weights within
/// 1e-4, and trl's reward metrics, kept on the device until each second step is logged, equal
/// to the CPU's logged ones.
#[test]
fn dpo_on_the_test_device_logs_and_ends_as_the_cpu() {
    let device = test_device();
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_decoder("tiny-llama", dir.path());
    let (train_file, _) = dpo_pairs(dir.path());
    let r = dir.path().join("dpo.toml");
    std::fs::write(
        &r,
        format!(
            "model = \"{}\"\ntask = \"dpo\"\nmethod = \"lora\"\n[data]\ntrain = \"{}\"\n\
             max_length = 16\n{LORA}\n[dpo]\nbeta = 0.5\n[training]\noutput_dir = \"{}\"\n\
             learning_rate = 5e-3\nper_device_train_batch_size = 2\n\
             gradient_accumulation_steps = 2\nmax_steps = 4\nlogging_steps = 2\n\
             save_strategy = \"no\"\n",
            model.display(),
            train_file.display(),
            dir.path().join("out").display(),
        ),
    )
    .unwrap();
    let (cpu, dev) = (dir.path().join("cpu"), dir.path().join("dev"));
    train(&r, "cpu", &cpu, &[]);
    train(&r, &device, &dev, &[]);
    let file = "adapter_model.safetensors";
    assert_same_weights(&cpu.join(file), &dev.join(file), 1e-4, "dpo");
    let logs = |out: &Path| -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(out.join("trainer_state.json")).unwrap();
        let state: serde_json::Value = serde_json::from_str(&text).unwrap();
        state["log_history"].as_array().unwrap().clone()
    };
    let (a, b) = (logs(&cpu), logs(&dev));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        for key in [
            "loss",
            "rewards/chosen",
            "rewards/rejected",
            "rewards/margins",
            "rewards/accuracies",
        ] {
            let (p, q) = (x[key].as_f64(), y[key].as_f64());
            let (Some(p), Some(q)) = (p, q) else {
                panic!("step {}: {key} missing: {x} / {y}", x["step"]);
            };
            assert!(
                (p - q).abs() <= 1e-4 * (1.0 + p.abs()),
                "{key}: {p} on cpu, {q}"
            );
        }
    }
}
