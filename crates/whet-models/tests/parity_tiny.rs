//! Parity of the four families against `transformers` on tiny random models
//! (`tests/fixtures/tiny-*`, made by `scripts/fixtures/make_fixtures.py`): logits of padded batches
//! within 1e-4, and the loss and the gradient of every parameter within 1e-4 relative error.
//! The LLaMA family also as Mistral and Qwen2, with linear and llama3 rope scaling, and from
//! sharded, float16 and bfloat16 safetensors.

use crate::common;

use std::collections::BTreeSet;
use std::path::Path;

use burn::tensor::{Device, Tensor};
use common::*;
use whet_models::bert::{BertConfig, BertForQuestionAnswering, EncoderInput};
use whet_models::decoder::{causal_lm_loss, position_ids};
use whet_models::layers::cross_entropy;
use whet_models::unpad::Unpadded;
use whet_models::{
    CausalLm, Checkpoint, Classifier, ClassifierInput, DecoderInput, ExportParams, Mode, NamedParam,
};

const LOGITS_TOL: f32 = 1e-4;
const GRAD_TOL: f32 = 1e-4;

/// `WHET_TEST_DEVICE` (default cpu): the same tolerances hold on every device.
fn eval_device() -> Device {
    whet_models::device::for_tests()
}

fn grad_device() -> Device {
    eval_device().autodiff()
}

/// Backpropagates `loss` and compares it and every parameter's gradient with the fixture.
fn check_loss_and_grads(fx: &Fixture, loss: Tensor<1>, params: Vec<NamedParam>) {
    common::check_loss_and_grads(fx, loss, params, GRAD_TOL);
}

/// The padding-free layout of the fixture's `[B, T]` mask `name`, when `padding_free`; the
/// mask must have padding, or padding-free would test nothing.
fn unpadded(fx: &Fixture, name: &str, padding_free: bool) -> Option<Unpadded> {
    let mask = fx.i64(name);
    assert!(mask.contains(&0), "{name} has no padding");
    let [b, t] = fx.ids2(name, &Device::flex()).dims();
    padding_free.then(|| Unpadded::from_mask(&mask, b, t))
}

/// Logits, loss and every gradient equal transformers', padded and padding-free.
fn classifier_case(dir: &str) {
    for padding_free in [false, true] {
        classifier_case_with(dir, padding_free);
    }
}

fn classifier_case_with(dir: &str, padding_free: bool) {
    let root = fixtures().join(dir);
    let fx = Fixture::open(&root.join("fixture.safetensors"));
    let ckpt = Checkpoint::open(&root).unwrap();

    // Logits in eval mode.
    let device = eval_device();
    let (model, fresh) = ckpt.load_classifier(&device).unwrap();
    assert!(
        fresh.is_empty(),
        "head should load from the checkpoint: {fresh:?}"
    );
    let input = |d: &Device| ClassifierInput {
        input_ids: fx.ids2("input_ids", d),
        attention_mask: fx.ids2("attention_mask", d),
        token_type_ids: fx
            .has("token_type_ids")
            .then(|| fx.ids2("token_type_ids", d)),
        unpadded: unpadded(&fx, "attention_mask", padding_free),
    };
    let logits = model.forward(input(&device), Mode::Eval).unwrap();
    assert_close("logits", &values(logits), &fx.f32("logits"), LOGITS_TOL);

    // Loss and gradients.
    let device = grad_device();
    let (model, _) = ckpt.load_classifier(&device).unwrap();
    let logits = model.forward(input(&device), Mode::Eval).unwrap();
    let loss = cross_entropy(logits, fx.ids1("labels", &device), -100);
    check_loss_and_grads(&fx, loss, model.named_params());
}

#[test]
fn tiny_bert_sequence_classification() {
    classifier_case("tiny-bert");
}

#[test]
fn tiny_distilbert_sequence_classification() {
    classifier_case("tiny-distilbert");
}

#[test]
fn tiny_gpt2_sequence_classification() {
    classifier_case("tiny-gpt2-cls");
}

#[test]
fn tiny_llama_sequence_classification() {
    classifier_case("tiny-llama-cls");
}

/// Start and end logits, loss and gradients equal transformers'; padding-free, the logits at the
/// real tokens do (transformers' loss takes the padding positions' logits into its softmax, and
/// a padding-free batch has none: the trainer leaves them out, see whet-train's QA objective).
#[test]
fn tiny_bert_question_answering() {
    let root = fixtures().join("tiny-bert-qa");
    let fx = Fixture::open(&root.join("fixture.safetensors"));
    let ckpt = Checkpoint::open(&root).unwrap();
    let config = BertConfig::from_folder(&root).unwrap();
    let mask = fx.i64("attention_mask");
    let real = |v: Vec<f32>| -> Vec<f32> {
        v.into_iter()
            .zip(&mask)
            .filter(|(_, m)| **m == 1)
            .map(|(x, _)| x)
            .collect()
    };
    {
        let device = eval_device();
        let (model, _) = BertForQuestionAnswering::load(&ckpt.weights(&device), &config).unwrap();
        let out = model.forward(
            EncoderInput {
                input_ids: fx.ids2("input_ids", &device),
                attention_mask: fx.ids2("attention_mask", &device),
                token_type_ids: Some(fx.ids2("token_type_ids", &device)),
                unpadded: unpadded(&fx, "attention_mask", true),
            },
            Mode::Eval,
        );
        for (name, got) in [("start", out.start), ("end", out.end)] {
            assert_close(
                &format!("{name} (padding-free)"),
                &real(values(got)),
                &real(fx.f32(&format!("{name}_logits"))),
                LOGITS_TOL,
            );
        }
    }
    for (device, grads) in [(eval_device(), false), (grad_device(), true)] {
        let (model, fresh) =
            BertForQuestionAnswering::load(&ckpt.weights(&device), &config).unwrap();
        assert!(fresh.is_empty());
        let out = model.forward(
            EncoderInput {
                input_ids: fx.ids2("input_ids", &device),
                attention_mask: fx.ids2("attention_mask", &device),
                token_type_ids: fx
                    .has("token_type_ids")
                    .then(|| fx.ids2("token_type_ids", &device)),
                unpadded: None,
            },
            Mode::Eval,
        );
        if !grads {
            assert_close(
                "start",
                &values(out.start),
                &fx.f32("start_logits"),
                LOGITS_TOL,
            );
            assert_close("end", &values(out.end), &fx.f32("end_logits"), LOGITS_TOL);
            continue;
        }
        // transformers: (CE(start) + CE(end)) / 2
        let loss = (cross_entropy(out.start, fx.ids1("start_positions", &device), -100)
            + cross_entropy(out.end, fx.ids1("end_positions", &device), -100))
            / 2.0;
        check_loss_and_grads(&fx, loss, model.named_params());
    }
}

/// Compares the eval-mode logits of the checkpoint at `root` with the fixture's right- and
/// left-padded `logits_*`, at the real tokens, padded and padding-free.
fn check_causal_logits(root: &Path, fx: &Fixture) {
    let device = eval_device();
    let model = Checkpoint::open(root)
        .unwrap()
        .load_causal_lm(&device)
        .unwrap();
    let vocab = model.vocab_size();
    for (side, padding_free) in [
        ("right", false),
        ("left", false),
        ("right", true),
        ("left", true),
    ] {
        let ids = fx.ids2(&format!("input_ids_{side}"), &device);
        let mask_values = fx.i64(&format!("attention_mask_{side}"));
        let [b, t] = ids.dims();
        let positions = Tensor::from_data(
            burn::tensor::TensorData::new(position_ids(&mask_values, b, t), [b, t]),
            &device,
        );
        let input = DecoderInput {
            input_ids: ids,
            attention_mask: fx.ids2(&format!("attention_mask_{side}"), &device),
            position_ids: (side == "left").then_some(positions),
            document_ids: None,
            unpadded: unpadded(fx, &format!("attention_mask_{side}"), padding_free),
        };
        let logits = values(model.forward_logits(input, Mode::Eval));
        // Padded positions carry no meaning (and differ between attention kernels): compare the
        // real tokens.
        assert_close(
            &format!("logits ({side} padding, padding-free {padding_free})"),
            &masked_rows(&logits, &mask_values, vocab),
            &masked_rows(&fx.f32(&format!("logits_{side}")), &mask_values, vocab),
            LOGITS_TOL,
        );
    }
}

fn causal_case(dir: &str) {
    let root = fixtures().join(dir);
    let fx = Fixture::open(&root.join("fixture.safetensors"));
    check_causal_logits(&root, &fx);

    for padding_free in [false, true] {
        let device = grad_device();
        let model = Checkpoint::open(&root)
            .unwrap()
            .load_causal_lm(&device)
            .unwrap();
        let input = DecoderInput {
            input_ids: fx.ids2("input_ids_right", &device),
            attention_mask: fx.ids2("attention_mask_right", &device),
            position_ids: None,
            document_ids: None,
            unpadded: unpadded(&fx, "attention_mask_right", padding_free),
        };
        let logits = model.forward_logits(input, Mode::Eval);
        let loss = causal_lm_loss(logits, fx.ids2("labels", &device));
        check_loss_and_grads(&fx, loss, model.named_params());
    }
}

#[test]
fn tiny_gpt2_causal_lm() {
    causal_case("tiny-gpt2");
}

#[test]
fn tiny_llama_causal_lm() {
    causal_case("tiny-llama");
}

/// `MistralForCausalLM` with a sliding window (16) longer than the sequence (9); the window
/// itself is checked by the family suite (`whet`'s `families::`, windows of 4 tokens).
#[test]
fn tiny_mistral_causal_lm() {
    causal_case("tiny-mistral");
}

/// `Qwen2ForCausalLM`: biased q/k/v projections (their gradients are among those checked) and a
/// tied LM head.
#[test]
fn tiny_qwen2_causal_lm() {
    causal_case("tiny-qwen2");
}

/// LLaMA with `rope_parameters` `{"rope_type": "linear", "factor": 2}`.
#[test]
fn tiny_llama_linear_rope_scaling() {
    causal_case("tiny-llama-rope-linear");
}

/// LLaMA with llama3 rope scaling (factor 8, original context 128): head_dim 8 puts one frequency
/// in each of the kept, interpolated and divided bands.
#[test]
fn tiny_llama_llama3_rope_scaling() {
    causal_case("tiny-llama-rope-llama3");
}

/// The same checkpoints with their config rewritten as transformers 4 wrote it (top-level
/// `rope_theta` and `rope_scaling`, linear with the old `"type"` key) give the same logits.
#[test]
fn rope_scaling_in_the_transformers_4_config_form() {
    for (dir, scaling) in [
        (
            "tiny-llama-rope-linear",
            serde_json::json!({"type": "linear", "factor": 2.0}),
        ),
        (
            "tiny-llama-rope-llama3",
            serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 128}),
        ),
    ] {
        let root = fixtures().join(dir);
        let tmp = tempfile::tempdir().unwrap();
        let mut config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(root.join("config.json")).unwrap()).unwrap();
        let config_map = config.as_object_mut().unwrap();
        let params = config_map.remove("rope_parameters").unwrap();
        assert_eq!(params["rope_theta"], 10000.0, "{dir}");
        config_map.insert("rope_theta".into(), params["rope_theta"].clone());
        config_map.insert("rope_scaling".into(), scaling);
        std::fs::write(
            tmp.path().join("config.json"),
            serde_json::to_vec(&config).unwrap(),
        )
        .unwrap();
        std::fs::copy(
            root.join("model.safetensors"),
            tmp.path().join("model.safetensors"),
        )
        .unwrap();
        check_causal_logits(
            tmp.path(),
            &Fixture::open(&root.join("fixture.safetensors")),
        );
    }
}

/// The storage dtypes named in a safetensors file's header.
fn stored_dtypes(path: &Path) -> BTreeSet<String> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(_, v)| v["dtype"].as_str().unwrap().to_string())
        .collect()
}

/// tiny-llama saved in shards (`model.safetensors.index.json` + four files) loads and gives
/// transformers' logits.
#[test]
fn tiny_llama_from_sharded_safetensors() {
    let root = fixtures().join("tiny-llama-sharded");
    assert!(!root.join("model.safetensors").exists());
    assert!(root.join("model.safetensors.index.json").is_file());
    check_causal_logits(&root, &Fixture::open(&root.join("fixture.safetensors")));
}

/// tiny-llama saved in float16 and bfloat16: whet upcasts to f32 and matches transformers
/// loading the same file with `dtype=float32` (the rounding moves the logits by 6e-3 and 3e-2
/// from tiny-llama's, far beyond the tolerance).
#[test]
fn tiny_llama_from_f16_and_bf16_safetensors() {
    for (dir, dtype) in [("tiny-llama-f16", "F16"), ("tiny-llama-bf16", "BF16")] {
        let root = fixtures().join(dir);
        assert_eq!(
            stored_dtypes(&root.join("model.safetensors")),
            BTreeSet::from([dtype.to_string()]),
            "{dir}"
        );
        check_causal_logits(&root, &Fixture::open(&root.join("fixture.safetensors")));
    }
}

/// Every tensor of the checkpoint comes back out under its own name with its own values: the
/// loaders and the exporters agree on names and layouts.
#[test]
fn export_round_trips_every_checkpoint_tensor() {
    for dir in [
        "tiny-bert",
        "tiny-distilbert",
        "tiny-gpt2-cls",
        "tiny-llama-cls",
    ] {
        let ckpt = Checkpoint::open(fixtures().join(dir)).unwrap();
        let (model, _) = ckpt.load_classifier(&eval_device()).unwrap();
        let params = model.named_params();
        let mut names: Vec<String> = params.iter().map(|p| p.name.clone()).collect();
        names.sort();
        assert_eq!(names, ckpt.source.names(), "{dir}: exported names");
        for p in &params {
            let (shape, got) = p.to_checkpoint_values();
            assert_eq!(Some(shape), ckpt.source.shape(&p.name), "{dir}: {}", p.name);
            assert_eq!(
                got,
                ckpt.source.read_f32(&p.name).unwrap(),
                "{dir}: {}",
                p.name
            );
        }
    }
    // The causal LMs too (GPT-2's head is tied, so lm_head is not a separate tensor).
    for dir in ["tiny-gpt2", "tiny-llama"] {
        let ckpt = Checkpoint::open(fixtures().join(dir)).unwrap();
        let model = ckpt.load_causal_lm(&eval_device()).unwrap();
        let mut names: Vec<String> = model
            .named_params()
            .iter()
            .map(|p| p.name.clone())
            .collect();
        names.sort();
        let mut file: Vec<String> = ckpt.source.names();
        file.retain(|n| n != "lm_head.weight" || dir == "tiny-llama");
        assert_eq!(names, file, "{dir}: exported names");
    }
}

/// Dropout really drops in training mode and does nothing in evaluation.
#[test]
fn train_mode_applies_dropout() {
    let root = fixtures().join("tiny-bert");
    let fx = Fixture::open(&root.join("fixture.safetensors"));
    let device = eval_device();
    let (model, _) = Checkpoint::open(&root)
        .unwrap()
        .load_classifier(&device)
        .unwrap();
    let model: Classifier = model;
    let input = ClassifierInput {
        input_ids: fx.ids2("input_ids", &device),
        attention_mask: fx.ids2("attention_mask", &device),
        token_type_ids: None,
        unpadded: None,
    };
    let eval_a = values(model.forward(input.clone(), Mode::Eval).unwrap());
    let eval_b = values(model.forward(input.clone(), Mode::Eval).unwrap());
    assert_eq!(eval_a, eval_b);
    let train = values(model.forward(input, Mode::Train).unwrap());
    assert!(
        max_abs_diff(&train, &eval_a) > 1e-4,
        "training forward should differ"
    );
}

/// Phi-3's `resid_pdrop` (0.1 in the family fixture, whose attention dropout is 0) drops the
/// attention and MLP outputs in training only; with it set to 0 training equals evaluation up
/// to rounding.
#[test]
fn phi3_residual_dropout_applies_in_training_only() {
    let root = fixtures().join("families/phi3-causal");
    let fx = Fixture::open(&root.join("fixture.safetensors"));
    let device = eval_device();
    let mut ckpt = Checkpoint::open(&root).unwrap();
    let run = |ckpt: &Checkpoint, mode| {
        let model = ckpt.load_causal_lm(&device).unwrap();
        let input = DecoderInput::unpadded(fx.ids2("input_ids_right", &device));
        values(model.forward_logits(input, mode))
    };
    let eval = run(&ckpt, Mode::Eval);
    assert!(max_abs_diff(&run(&ckpt, Mode::Train), &eval) > 1e-4);
    let whet_models::FamilyConfig::Llama(c) = &mut ckpt.config else {
        panic!("phi3 is a rotary decoder");
    };
    assert_eq!(c.variant.resid_pdrop, Some(0.1));
    c.variant.resid_pdrop = Some(0.0);
    // Training runs attention through other kernels: equal up to float rounding.
    let d = max_abs_diff(&run(&ckpt, Mode::Train), &eval);
    assert!(d < 1e-4, "without resid_pdrop training differs by {d}");
}

/// A decoder loaded for training and made `valid()` evaluates entirely off autodiff: its rotary
/// tables (a skipped field, left on the autodiff device by `valid()`) follow the input's device.
/// Before, every op after the rotary embedding ran on the autodiff backend, each leaving a graph
/// entry that was never freed (SmolLM2 LoRA: +200 MB over three greedy samples). The logits
/// equal those of the model loaded for evaluation.
#[test]
fn a_valid_decoder_evaluates_off_autodiff() {
    use burn::module::Module;
    let root = fixtures().join("tiny-llama");
    let fx = Fixture::open(&root.join("fixture.safetensors"));
    let trained = Checkpoint::open(&root)
        .unwrap()
        .load_causal_lm(&grad_device())
        .unwrap()
        .valid();
    let plain = Checkpoint::open(&root)
        .unwrap()
        .load_causal_lm(&eval_device())
        .unwrap();
    let device = eval_device();
    let input = || DecoderInput {
        input_ids: fx.ids2("input_ids_right", &device),
        attention_mask: fx.ids2("attention_mask_right", &device),
        position_ids: None,
        document_ids: None,
        unpadded: None,
    };
    let logits = trained.forward_logits(input(), Mode::Eval);
    assert!(
        !logits.is_autodiff(),
        "a valid() model's logits went through autodiff"
    );
    let want = plain.forward_logits(input(), Mode::Eval);
    let diff = (logits - want).abs().max().into_scalar::<f32>();
    assert!(diff == 0.0, "logits differ by {diff}");
}
