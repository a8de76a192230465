//! Invariants every parameter-efficient method keeps (peft's `test_custom_models` checks the
//! same): LoRA, QLoRA (LoRA over an NF4 base) and IA3, on an f32 and an NF4 base, trained by the
//! real loop. Only adapter parameters change; a disabled adapter gives exactly the base output;
//! save then load round-trips; merged equals unmerged. Plus QLoRA's gradients against LoRA over
//! the dequantised base.

use crate::common;

use std::path::Path;

use burn::module::Param;
use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};
use common::*;
use whet_data::{Encoded, Target};
use whet_models::layers::{Linear, LinearWeight, cross_entropy, is_adapter_param};
use whet_models::quant::{QuantMatrix, QuantSpec};
use whet_models::{
    Checkpoint, Classifier, ClassifierInput, ExportParams, Mode, QuantPolicy, VisitParams, Visitor,
};
use whet_peft::{Ia3Config, LoraConfig, PeftConfig, load_adapter, set_adapters_enabled};
use whet_train::*;

fn load(dir: &Path, nf4: bool, device: &Device) -> Classifier {
    let mut ckpt = Checkpoint::open(dir).unwrap();
    if nf4 {
        ckpt.quantization = Some(QuantPolicy {
            spec: QuantSpec::Nf4 { double_quant: true },
            skip: vec!["classifier".into(), "score".into()],
        });
    }
    ckpt.load_classifier(device).unwrap().0
}

/// Rows whose label is whether token 7 occurs.
fn toy(n: usize) -> Vec<Encoded> {
    let mut x = 3u64;
    let mut next = || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (x >> 33) as u32
    };
    (0..n)
        .map(|_| {
            let len = 4 + (next() % 4) as usize;
            let mut ids: Vec<u32> = (0..len).map(|_| 10 + next() % 80).collect();
            let label = (next() % 2) as usize;
            if label == 1 {
                ids[0] = 7;
            }
            Encoded {
                type_ids: vec![0; ids.len()],
                ids,
                label: Target::Class(label),
            }
        })
        .collect()
}

fn batch(device: &Device) -> ClassifierInput {
    let ids: Vec<i64> = vec![5, 17, 7, 33, 41, 9, 12, 60, 70, 7, 11, 0];
    let mask: Vec<i64> = vec![1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0];
    let t = |v: Vec<i64>| Tensor::<2, Int>::from_data(TensorData::new(v, [2, 6]), device);
    ClassifierInput {
        input_ids: t(ids),
        attention_mask: t(mask),
        token_type_ids: None,
        unpadded: None,
    }
}

fn logits(model: &Classifier, device: &Device) -> Vec<f32> {
    model
        .forward(batch(device), Mode::Eval)
        .unwrap()
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

/// Every base tensor, f32 parameters and quantised weights (dequantised), by name.
fn base_tensors(model: &Classifier) -> Vec<(String, Vec<f32>)> {
    struct Q(Vec<(String, Vec<f32>)>);
    impl Visitor for Q {
        fn quantized(&mut self, name: &str, m: &QuantMatrix) {
            self.0.push((name.to_string(), m.dequantize()));
        }
    }
    let mut q = Q(vec![]);
    model.clone().visit_params("", &mut q);
    let mut all: Vec<(String, Vec<f32>)> = model
        .named_params()
        .iter()
        .filter(|p| !p.name.contains("prompt_encoder.") && !is_adapter_param(&p.name))
        .map(|p| (p.name.clone(), p.to_checkpoint_values().1))
        .collect();
    all.extend(q.0);
    all
}

/// Adapter tensors (LoRA A and B, IA3 vectors, bottleneck projections, prompt encoders), by
/// name.
fn adapter_tensors(model: &Classifier) -> Vec<(String, Vec<f32>)> {
    model
        .named_params()
        .iter()
        .filter(|p| is_adapter_param(&p.name) || p.name.contains("prompt_encoder."))
        .map(|p| (p.name.clone(), p.to_checkpoint_values().1))
        .collect()
}

fn methods() -> Vec<(&'static str, PeftConfig, bool)> {
    // No modules_to_save: the head stays frozen, so "only adapters change" covers everything
    // and the disabled adapter must reproduce the loaded model exactly.
    let lora = PeftConfig::Lora(LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.0,
        target_modules: vec![
            "query".into(),
            "value".into(),
            "q_proj".into(),
            "v_proj".into(),
        ],
        bias: "none".into(),
        modules_to_save: vec![],
        use_rslora: false,
    });
    let ia3 = PeftConfig::Ia3(Ia3Config {
        target_modules: vec![
            "key".into(),
            "value".into(),
            "output.dense".into(),
            "k_proj".into(),
            "v_proj".into(),
            "down_proj".into(),
        ],
        feedforward_modules: Some(vec!["output.dense".into(), "down_proj".into()]),
        modules_to_save: vec![],
        init_ia3_weights: true,
    });
    let houlsby = PeftConfig::Bottleneck(whet_peft::BottleneckConfig {
        adapter_type: whet_peft::BottleneckKind::Houlsby,
        reduction_factor: 4,
        non_linearity: whet_models::config::Activation::Relu,
        modules_to_save: vec![],
    });
    let pfeiffer = PeftConfig::Bottleneck(whet_peft::BottleneckConfig {
        adapter_type: whet_peft::BottleneckKind::Pfeiffer,
        reduction_factor: 8,
        non_linearity: whet_models::config::Activation::Silu,
        modules_to_save: vec![],
    });
    let prefix = PeftConfig::Prompt(whet_peft::PromptConfig::Prefix(
        whet_peft::PrefixTuningConfig {
            num_virtual_tokens: 3,
            prefix_projection: true,
            encoder_hidden_size: Some(8),
            modules_to_save: vec![],
        },
    ));
    let prompt = PeftConfig::Prompt(whet_peft::PromptConfig::Prompt(
        whet_peft::PromptTuningConfig {
            num_virtual_tokens: 2,
            prompt_tuning_init: whet_peft::PromptInit::Random,
            prompt_tuning_init_text: None,
            init_token_ids: vec![],
            modules_to_save: vec![],
        },
    ));
    vec![
        ("prefix", prefix, false),
        ("prompt over nf4", prompt, true),
        ("houlsby", houlsby, false),
        ("pfeiffer over nf4", pfeiffer, true),
        ("lora", lora.clone(), false),
        ("qlora", lora, true),
        ("ia3", ia3.clone(), false),
        ("ia3 over nf4", ia3, true),
    ]
}

#[test]
fn every_method_trains_only_its_adapter_and_disables_saves_and_merges_exactly() {
    let bert = tiny_bert_no_dropout();
    let llama = fixtures().join("tiny-llama-cls");
    let data = toy(16);
    for (family, dir) in [("bert", bert.path()), ("llama", llama.as_path())] {
        for (name, config, nf4) in methods() {
            let what = format!("{family} {name}");
            let device = Device::flex().autodiff();
            let mut model = load(dir, nf4, &device);
            let base_logits = logits(&model, &device);
            let base = base_tensors(&model);
            let report = config.apply(&mut model, &device).unwrap();
            assert!(report.counts.trainable > 0 && report.counts.trainable < report.counts.all);
            let fresh = logits(&model, &device);
            // Virtual tokens change the output from the start (peft's start at random too).
            assert!(
                config.is_prompt_learning() || max_diff(&fresh, &base_logits) < 1e-6,
                "{what}: a fresh adapter changes the output"
            );
            let start = adapter_tensors(&model);
            if let PeftConfig::Bottleneck(b) = &config {
                // Houlsby: two adapters a layer (attention and feed-forward), Pfeiffer: one.
                let per_layer = if b.adapter_type == whet_peft::BottleneckKind::Houlsby {
                    2
                } else {
                    1
                };
                assert_eq!(
                    report.targeted.len(),
                    2 * per_layer,
                    "{what}: {:?}",
                    report.targeted
                );
            }

            let mut args = TrainingArguments::new("unused");
            args.max_steps = 3;
            args.per_device_train_batch_size = 8;
            args.learning_rate = 5e-2;
            args.lr_scheduler_type = Schedule::Constant;
            train_classifier(
                &mut model,
                &data,
                None,
                3,
                0,
                &args,
                &device,
                &mut Silent,
                None,
            )
            .unwrap();

            // Only adapter parameters changed, and they did.
            for ((n, before), (_, after)) in base.iter().zip(base_tensors(&model)) {
                assert!(before == &after, "{what}: base tensor {n} changed");
            }
            let end = adapter_tensors(&model);
            assert_eq!(start.len(), end.len());
            let moved = start
                .iter()
                .zip(&end)
                .map(|((_, a), (_, b))| max_diff(a, b))
                .fold(0.0, f32::max);
            assert!(
                moved > 1e-3,
                "{what}: training did not move the adapter ({moved})"
            );
            let trained = logits(&model, &device);
            assert!(
                max_diff(&trained, &base_logits) > 1e-4,
                "{what}: the adapter has no effect"
            );

            // A disabled adapter gives exactly the base output.
            set_adapters_enabled(&mut model, false);
            assert!(
                max_diff(&logits(&model, &device), &base_logits) < 1e-6,
                "{what}: disabled adapter"
            );
            set_adapters_enabled(&mut model, true);

            // Save then load round-trips (onto a freshly loaded, equally quantised base).
            let out = tempfile::tempdir().unwrap();
            config.save(&model, "base", "SEQ_CLS", out.path()).unwrap();
            let mut again = load(dir, nf4, &device);
            let loaded = load_adapter(&mut again, out.path(), &device).unwrap();
            assert_eq!(loaded.peft_type(), config.peft_type());
            assert!(
                max_diff(&logits(&again, &device), &trained) < 1e-6,
                "{what}: save / load round trip"
            );

            // Merged equals unmerged; a quantised base is dequantised and reported.
            let folded = match config {
                PeftConfig::Lora(_) => whet_peft::merge_lora(&mut again),
                PeftConfig::Ia3(_) => whet_peft::merge_ia3(&mut again),
                // Non-linear, or no layer to fold into: whet merge refuses them.
                PeftConfig::Bottleneck(_) | PeftConfig::Prompt(_) => continue,
            };
            assert_eq!(
                !folded.is_empty(),
                nf4,
                "{what}: merge reports dequantised layers"
            );
            assert!(
                max_diff(&logits(&again, &device), &trained) < 1e-5,
                "{what}: merged differs from unmerged"
            );
        }
    }
}

/// Replaces every quantised weight by its f32 dequantisation (a plain frozen parameter).
fn dequantise_base<M: VisitParams>(model: &mut M, device: &Device) {
    struct D<'a>(&'a Device);
    impl Visitor for D<'_> {
        fn linear(&mut self, _: &str, layer: &mut Linear) -> bool {
            if layer.is_quantized() {
                let w = layer.dense_weight(self.0);
                let w = Tensor::<2>::from_data(w.into_data(), self.0);
                layer.weight = LinearWeight::Dense(Param::from_tensor(w).set_require_grad(false));
            }
            true
        }
    }
    model.visit_params("", &mut D(device));
}

/// QLoRA's gradients reach every LoRA parameter through the dequantised matmul: they equal the
/// gradients of LoRA over the same base dequantised to f32.
#[test]
fn qlora_gradients_equal_lora_over_the_dequantised_base() {
    for dir in [
        tiny_bert_no_dropout().path().to_path_buf(),
        fixtures().join("tiny-llama-cls"),
    ] {
        let device = Device::flex().autodiff();
        let mut q = load(&dir, true, &device);
        let Some((_, PeftConfig::Lora(cfg), _)) = methods().into_iter().find(|m| m.0 == "qlora")
        else {
            unreachable!()
        };
        let mut cfg = cfg;
        cfg.target_modules = vec![
            "query".into(),
            "key".into(),
            "value".into(),
            "dense".into(),
            "q_proj".into(),
            "k_proj".into(),
            "v_proj".into(),
            "o_proj".into(),
            "gate_proj".into(),
            "up_proj".into(),
            "down_proj".into(),
        ];
        whet_peft::apply_lora(&mut q, &cfg, &device).unwrap();
        // B starts at zero, which would hide A's gradient: draw it.
        whet_peft::for_each_adapter(&mut q, &mut |_, a| {
            let [r, o] = a.b.shape().dims();
            a.b = Param::from_tensor(Tensor::random(
                [r, o],
                Distribution::Normal(0.0, 0.1),
                &device,
            ));
        });
        let mut d = q.clone();
        dequantise_base(&mut d, &device);
        let labels = Tensor::<1, Int>::from_data(TensorData::new(vec![1i64, 2], [2]), &device);
        let grads = |m: &Classifier| {
            let loss = cross_entropy(
                m.forward(batch(&device), Mode::Train).unwrap(),
                labels.clone(),
                -100,
            );
            let value = loss.clone().into_scalar::<f32>();
            let g = loss.backward();
            let mut out = vec![];
            let mut m = m.clone();
            whet_peft::for_each_adapter(&mut m, &mut |name, a| {
                let v = |t: Tensor<2>| t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
                out.push((format!("{name}.A"), v(a.a.val().grad(&g).unwrap())));
                out.push((format!("{name}.B"), v(a.b.val().grad(&g).unwrap())));
            });
            (value, out)
        };
        let (lq, gq) = grads(&q);
        let (ld, gd) = grads(&d);
        assert!((lq - ld).abs() < 1e-5, "loss {lq} vs {ld}");
        assert!(gq.len() >= 8);
        for ((n, a), (_, b)) in gq.iter().zip(&gd) {
            let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
            let diff = max_diff(a, b);
            assert!(scale > 1e-7, "{n}: no gradient");
            assert!(
                diff <= 1e-4 * scale.max(1.0),
                "{n}: gradient differs by {diff} (scale {scale})"
            );
        }
    }
}

/// A checkpoint keeps 8-bit optimizer states exactly (codes and block maxima), next to f32
/// ones, so a resumed AdamW8bit run continues from the same quantised moments.
#[test]
fn checkpoints_keep_8bit_optimizer_states_exactly() {
    use whet_models::quant::{Blockwise8, Blockwise8State};
    use whet_train::optim::{Moments8, OptimConfig};
    let dir = tempfile::tempdir().unwrap();
    let device = Device::flex().autodiff();
    let mut model = load(tiny_bert_no_dropout().path(), false, &device);
    let mut opt = Optimizer::new(OptimConfig {
        kind: OptimizerKind::Adamw8bit,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
    });
    opt.step = 7;
    let values: Vec<f32> = (0..5000)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) * 1e-3)
        .collect();
    let squares: Vec<f32> = values.iter().map(|v| v * v).collect();
    let (m, v) = (
        Blockwise8::quantize(&values, true),
        Blockwise8::quantize(&squares, false),
    );
    let q = Moments8 {
        m: Blockwise8State::Host(m.clone()),
        v: Blockwise8State::Host(v.clone()),
    };
    opt.moments8
        .insert("bert.embeddings.word_embeddings.weight".into(), q.clone());
    let state = checkpoint::TrainerState {
        global_step: 7,
        optimizer_steps: 7,
        ..Default::default()
    };
    let saved = checkpoint::save(dir.path(), &mut model, &opt, &state, None).unwrap();
    let mut back = Optimizer::new(opt.config);
    let got = checkpoint::load(&saved, &mut model, &mut back, &device).unwrap();
    assert_eq!(got.optimizer_steps, 7);
    assert_eq!(back.moments8.len(), 1);
    assert_eq!(
        back.moments8["bert.embeddings.word_embeddings.weight"].to_host(),
        (m, v)
    );
    assert!(
        q.m.storage_bytes() * 3 < 4 * values.len(),
        "8-bit state is under a quarter"
    );
}
