//! LoRA invariants (as peft's test_custom_models checks them) and parity with adapters that
//! `peft` saved (`tests/fixtures/peft/`, made by `scripts/fixtures/make_peft_fixtures.py`).

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use whet_models::layers::cross_entropy;
use whet_models::{Checkpoint, Classifier, ClassifierInput, ExportParams, Mode};
use whet_peft::*;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

struct Batch {
    ids: (Vec<i64>, [usize; 2]),
    mask: Vec<i64>,
    types: Option<Vec<i64>>,
}

fn read_i64(st: &safetensors::SafeTensors, name: &str) -> Option<(Vec<i64>, Vec<usize>)> {
    let t = st.tensor(name).ok()?;
    let v = t
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    Some((v, t.shape().to_vec()))
}

fn read_f32(st: &safetensors::SafeTensors, name: &str) -> Vec<f32> {
    let t = st.tensor(name).unwrap_or_else(|_| panic!("no {name}"));
    t.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn batch(file: &Path) -> Batch {
    let bytes = std::fs::read(file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (ids, shape) = read_i64(&st, "input_ids").unwrap();
    Batch {
        ids: (ids, [shape[0], shape[1]]),
        mask: read_i64(&st, "attention_mask").unwrap().0,
        types: read_i64(&st, "token_type_ids").map(|(v, _)| v),
    }
}

fn input(b: &Batch, device: &Device) -> ClassifierInput {
    let t = |v: &Vec<i64>| Tensor::<2, Int>::from_data(TensorData::new(v.clone(), b.ids.1), device);
    ClassifierInput {
        input_ids: t(&b.ids.0),
        attention_mask: t(&b.mask),
        token_type_ids: b.types.as_ref().map(t),
        unpadded: None,
    }
}

fn logits(model: &Classifier, b: &Batch, device: &Device) -> Vec<f32> {
    model
        .forward(input(b, device), Mode::Eval)
        .unwrap()
        .into_data()
        .convert::<f32>()
        .try_to_vec()
        .unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn config() -> LoraConfig {
    LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.1,
        target_modules: vec!["query".into(), "value".into()],
        bias: "none".into(),
        modules_to_save: vec!["classifier".into()],
        use_rslora: false,
    }
}

fn tiny_bert(device: &Device) -> (Classifier, Batch) {
    let dir = fixtures().join("tiny-bert");
    let (m, _) = Checkpoint::open(&dir)
        .unwrap()
        .load_classifier(device)
        .unwrap();
    (m, batch(&dir.join("fixture.safetensors")))
}

#[test]
fn a_fresh_adapter_leaves_the_output_unchanged_and_targets_by_suffix() {
    let device = Device::flex();
    let (mut model, b) = tiny_bert(&device);
    let before = logits(&model, &b, &device);
    let report = apply_lora(&mut model, &config(), &device).unwrap();
    assert_eq!(report.targeted.len(), 4, "{:?}", report.targeted);
    assert!(
        report
            .targeted
            .iter()
            .all(|n| n.ends_with(".query") || n.ends_with(".value"))
    );
    assert_eq!(
        max_diff(&logits(&model, &b, &device), &before),
        0.0,
        "B starts at zero"
    );
    let e = apply_lora(
        &mut tiny_bert(&device).0,
        &LoraConfig {
            target_modules: vec!["nope".into()],
            ..config()
        },
        &device,
    );
    let e = e.unwrap_err().to_string();
    assert!(
        e.contains("not found") && e.contains("query, key, value"),
        "{e}"
    );
    // The error names the model's own layers: GPT-2's, not BERT's.
    let (mut gpt2, _) = Checkpoint::open(fixtures().join("families/gpt2-cls"))
        .unwrap()
        .load_classifier(&device)
        .unwrap();
    let config = LoraConfig {
        target_modules: vec!["query".into()],
        ..config()
    };
    let e = apply_lora(&mut gpt2, &config, &device)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("c_attn, c_proj, c_fc")
            && e.contains("\"transformer.h.0.attn.c_attn\"")
            && !e.contains("value"),
        "{e}"
    );
}

#[test]
fn only_adapters_and_the_head_get_gradients() {
    let device = Device::flex().autodiff();
    let (mut model, b) = tiny_bert(&device);
    apply_lora(&mut model, &config(), &device).unwrap();
    let logits = model.forward(input(&b, &device), Mode::Train).unwrap();
    let labels = Tensor::<1, Int>::from_data(TensorData::new(vec![0i64, 1, 2], [3]), &device);
    let grads = cross_entropy(logits, labels, -100).backward();
    // Adapters are parameters like any other, under peft's names: they and the head get a
    // gradient, nothing else does.
    let mut adapters = 0;
    for p in model.named_params() {
        let has = match &p.tensor {
            whet_models::weights::AnyTensor::R1(t) => t.grad(&grads).is_some(),
            whet_models::weights::AnyTensor::R2(t) => t.grad(&grads).is_some(),
        };
        let adapter = p.name.ends_with(".lora_A.weight") || p.name.ends_with(".lora_B.weight");
        adapters += adapter as usize;
        assert_eq!(
            has,
            adapter || p.name.starts_with("classifier."),
            "{}: gradient {has}",
            p.name
        );
    }
    assert_eq!(adapters, 8, "A and B of query and value in two layers");
}

/// Sets every adapter's B to a non-zero value so adapters change the output.
fn perturb(model: &mut Classifier, device: &Device) {
    for_each_adapter(model, &mut |_, a| {
        let dims = a.b.shape().dims::<2>();
        let b = Tensor::random(dims, burn::tensor::Distribution::Normal(0.0, 0.1), device);
        a.b = burn::module::Param::from_tensor(b);
    });
}

#[test]
fn disabled_equals_base_merged_equals_unmerged_and_save_load_round_trips() {
    let device = Device::flex();
    let (mut model, b) = tiny_bert(&device);
    let base = logits(&model, &b, &device);
    apply_lora(&mut model, &config(), &device).unwrap();
    perturb(&mut model, &device);
    let adapted = logits(&model, &b, &device);
    assert!(
        max_diff(&adapted, &base) > 1e-3,
        "the perturbed adapter changes the output"
    );

    set_adapters_enabled(&mut model, false);
    assert!(max_diff(&logits(&model, &b, &device), &base) < 1e-6);
    set_adapters_enabled(&mut model, true);

    let dir = tempfile::tempdir().unwrap();
    save_adapter(&model, &config(), "tiny-bert", "SEQ_CLS", dir.path()).unwrap();
    let (mut fresh, _) = tiny_bert(&device);
    let loaded = load_adapter(&mut fresh, dir.path(), &device).unwrap();
    assert!(matches!(loaded, PeftConfig::Lora(LoraConfig { r: 4, .. })));
    assert!(
        max_diff(&logits(&fresh, &b, &device), &adapted) < 1e-6,
        "save/load round trip"
    );

    let mut merged = model.clone();
    merge_lora(&mut merged);
    assert!(
        max_diff(&logits(&merged, &b, &device), &adapted) < 1e-5,
        "merged equals unmerged"
    );
}

/// peft → whet: adapters saved by peft load onto the base and give peft's logits; whet counts
/// trainable and total parameters as peft does.
#[test]
fn adapters_saved_by_peft_load_to_the_same_logits_and_counts() {
    let root = fixtures().join("peft");
    let mut cases = 0;
    for entry in std::fs::read_dir(&root).unwrap() {
        let case = entry.unwrap().path();
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(case.join("expected.json")).unwrap())
                .unwrap();
        if meta.get("comparable_rows").is_some() {
            continue; // prompt learning: tests/prompt.rs
        }
        let base = fixtures().join(meta["base_fixture"].as_str().unwrap());
        let device = Device::flex();
        let (mut model, _) = Checkpoint::open(&base)
            .unwrap()
            .load_classifier(&device)
            .unwrap();
        let config = load_adapter(&mut model, &case, &device).unwrap();
        let expected = case.join("expected.safetensors");
        let b = batch(&expected);
        let bytes = std::fs::read(&expected).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let got = logits(&model, &b, &device);
        let d = max_diff(&got, &read_f32(&st, "logits"));
        assert!(d <= 1e-4, "{}: logits differ by {d}", case.display());

        let (mut fresh, _) = Checkpoint::open(&base)
            .unwrap()
            .load_classifier(&device)
            .unwrap();
        let report = config.apply(&mut fresh, &device).unwrap();
        assert_eq!(
            report.counts.trainable as u64,
            meta["trainable_parameters"]["trainable"].as_u64().unwrap(),
            "{}",
            case.display()
        );
        assert_eq!(
            report.counts.all as u64,
            meta["trainable_parameters"]["all"].as_u64().unwrap(),
            "{}",
            case.display()
        );
        assert_eq!(
            report.counts.line(),
            meta["print_trainable_parameters"].as_str().unwrap()
        );
        cases += 1;
    }
    assert!(cases >= 2, "peft fixtures missing");
}
