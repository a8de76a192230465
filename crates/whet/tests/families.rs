//! The conformance suite every model family passes, over `tests/fixtures/families/<type>-<task>/`
//! (made by `scripts/fixtures/make_family_fixtures.py` with transformers and peft): one tiny
//! random model per family and task, its config switching on every feature of the family.
//!
//! 1. Parity: logits with right and left padding (padded and padding-free), the loss and every
//!    parameter's gradient within 1e-4 of transformers'.
//! 2. peft: the default LoRA targets of the model type equal peft's; an adapter peft saved loads
//!    to peft's logits; whet saves it back under peft's keys and values; merged equals unmerged.
//! 3. Decoders: greedy generation with the key/value cache equals transformers' `generate`.
//! 4. Classification end to end through the CLI: `whet train` fine-tunes the family's
//!    classifier and saves the tensors under transformers' names, with its class.
//! 5. Decoders: the chat template renders a conversation to transformers' text and ids.
//! 6. Decoders: `whet export` writes a GGUF file that loads back to transformers' logits, with the
//!    tokenizer and chat template; a config the format cannot carry is refused, naming why.
//!
//! Adding a family means adding its fixtures to the script; every test here then covers it.
//! Each test checks every family and reports all that fail.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};
use whet_models::decoder::{causal_lm_loss, position_ids};
use whet_models::layers::cross_entropy;
use whet_models::unpad::Unpadded;
use whet_models::{
    CausalLm, Checkpoint, ClassifierInput, DecoderInput, ExportParams, Mode, NamedParam,
};

use crate::common::ok;
use crate::model_fixture::{Fixture, assert_close, masked_rows, values};

const LOGITS_TOL: f32 = 1e-4;
const GRAD_TOL: f32 = 1e-4;

fn families() -> PathBuf {
    crate::common::root().join("tests/fixtures/families")
}

/// Every case folder with its `fixture.json`.
fn cases() -> Vec<(PathBuf, serde_json::Value)> {
    let mut out: Vec<_> = std::fs::read_dir(families())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("fixture.json").is_file())
        .map(|p| {
            let meta =
                serde_json::from_str(&std::fs::read_to_string(p.join("fixture.json")).unwrap())
                    .unwrap();
            (p, meta)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(out.len() >= 25, "family fixtures missing: {}", out.len());
    out
}

/// Runs `check` on every case, then fails naming each case that failed and why.
fn each_case(
    filter: impl Fn(&serde_json::Value) -> bool,
    check: impl Fn(&Path, &serde_json::Value),
) {
    let mut failures = vec![];
    let mut ran = 0;
    for (dir, meta) in cases().iter().filter(|(_, m)| filter(m)) {
        ran += 1;
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(dir, meta)));
        if let Err(e) = result {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failures.push(format!(
                "{}: {msg}",
                dir.file_name().unwrap().to_string_lossy()
            ));
        }
    }
    assert!(ran > 0, "no case matched");
    assert!(
        failures.is_empty(),
        "{} of {ran} cases fail:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

fn task(meta: &serde_json::Value) -> &str {
    meta["task"].as_str().unwrap()
}

fn device() -> Device {
    Device::flex()
}

fn check_loss_and_grads(fx: &Fixture, loss: Tensor<1>, params: Vec<NamedParam>) {
    crate::model_fixture::check_loss_and_grads(fx, loss, params, GRAD_TOL);
}

fn unpadded(fx: &Fixture, name: &str, padding_free: bool) -> Option<Unpadded> {
    let mask = fx.i64(name);
    let s = fx.shape(name);
    padding_free.then(|| Unpadded::from_mask(&mask, s[0], s[1]))
}

fn classifier_input(fx: &Fixture, d: &Device, padding_free: bool) -> ClassifierInput {
    ClassifierInput {
        input_ids: fx.ids2("input_ids", d),
        attention_mask: fx.ids2("attention_mask", d),
        token_type_ids: None,
        unpadded: unpadded(fx, "attention_mask", padding_free),
    }
}

fn decoder_input(fx: &Fixture, side: &str, d: &Device, padding_free: bool) -> DecoderInput {
    let ids = fx.ids2(&format!("input_ids_{side}"), d);
    let mask = fx.i64(&format!("attention_mask_{side}"));
    let [b, t] = ids.dims();
    let positions = Tensor::from_data(TensorData::new(position_ids(&mask, b, t), [b, t]), d);
    DecoderInput {
        input_ids: ids,
        attention_mask: fx.ids2(&format!("attention_mask_{side}"), d),
        position_ids: (side == "left").then_some(positions),
        document_ids: None,
        unpadded: unpadded(fx, &format!("attention_mask_{side}"), padding_free),
    }
}

/// Check 1: logits, loss and gradients equal transformers', padded and padding-free.
#[test]
fn every_family_matches_transformers() {
    each_case(
        |_| true,
        |dir, meta| {
            let fx = Fixture::open(
                &dir.join("fixture.json")
                    .with_file_name("fixture.safetensors"),
            );
            let ckpt = Checkpoint::open(dir).unwrap();
            assert_eq!(ckpt.model_type(), meta["model_type"].as_str().unwrap());
            let (d, g) = (device(), device().autodiff());
            for padding_free in [false, true] {
                match task(meta) {
                    "causal" => {
                        let model = ckpt.load_causal_lm(&d).unwrap();
                        let vocab = model.vocab_size();
                        for side in ["right", "left"] {
                            let mask = fx.i64(&format!("attention_mask_{side}"));
                            let got = values(model.forward_logits(
                                decoder_input(&fx, side, &d, padding_free),
                                Mode::Eval,
                            ));
                            assert_close(
                                &format!("logits ({side} padding, padding-free {padding_free})"),
                                &masked_rows(&got, &mask, vocab),
                                &masked_rows(&fx.f32(&format!("logits_{side}")), &mask, vocab),
                                LOGITS_TOL,
                            );
                        }
                        let model = ckpt.load_causal_lm(&g).unwrap();
                        let logits = model.forward_logits(
                            decoder_input(&fx, "right", &g, padding_free),
                            Mode::Eval,
                        );
                        let loss = causal_lm_loss(logits, fx.ids2("labels", &g));
                        check_loss_and_grads(&fx, loss, model.named_params());
                    }
                    "cls" => {
                        let (model, fresh) = ckpt.load_classifier(&d).unwrap();
                        assert!(fresh.is_empty(), "the head loads: {fresh:?}");
                        let logits = model
                            .forward(classifier_input(&fx, &d, padding_free), Mode::Eval)
                            .unwrap();
                        assert_close("logits", &values(logits), &fx.f32("logits"), LOGITS_TOL);
                        let (model, _) = ckpt.load_classifier(&g).unwrap();
                        let logits = model
                            .forward(classifier_input(&fx, &g, padding_free), Mode::Eval)
                            .unwrap();
                        let loss = cross_entropy(logits, fx.ids1("labels", &g), -100);
                        check_loss_and_grads(&fx, loss, model.named_params());
                    }
                    "qa" => {
                        let encoder = |dev: &Device| whet_models::bert::EncoderInput {
                            input_ids: fx.ids2("input_ids", dev),
                            attention_mask: fx.ids2("attention_mask", dev),
                            token_type_ids: None,
                            unpadded: unpadded(&fx, "attention_mask", padding_free),
                        };
                        let (model, fresh) = ckpt.load_question_answering(&d).unwrap();
                        assert!(fresh.is_empty(), "the head loads: {fresh:?}");
                        let out = model.forward(encoder(&d), Mode::Eval);
                        // Padding-free there are no padding positions: the real tokens' logits
                        // agree, and transformers' loss (whose softmax takes the padding's logits)
                        // is checked padded only, as the trainer leaves padding out.
                        let mask = fx.i64("attention_mask");
                        let real = |v: Vec<f32>| masked_rows(&v, &mask, 1);
                        assert_close(
                            "start",
                            &real(values(out.start)),
                            &real(fx.f32("start_logits")),
                            LOGITS_TOL,
                        );
                        assert_close(
                            "end",
                            &real(values(out.end)),
                            &real(fx.f32("end_logits")),
                            LOGITS_TOL,
                        );
                        if padding_free {
                            continue;
                        }
                        let (model, _) = ckpt.load_question_answering(&g).unwrap();
                        let out = model.forward(encoder(&g), Mode::Eval);
                        let loss = (cross_entropy(out.start, fx.ids1("start_positions", &g), -100)
                            + cross_entropy(out.end, fx.ids1("end_positions", &g), -100))
                            / 2.0;
                        check_loss_and_grads(&fx, loss, model.named_params());
                    }
                    other => panic!("unknown task {other}"),
                }
            }
        },
    );
}

/// Check 2: peft's default targets; peft's adapter loads to its logits, saves back under its
/// keys and values, and merges to the same logits.
#[test]
fn peft_defaults_and_adapters_round_trip() {
    each_case(
        |_| true,
        |dir, meta| {
            let model_type = meta["model_type"].as_str().unwrap();
            let ours = whet_peft::defaults::lora_target_modules(model_type)
                .map(|t| t.iter().map(|s| s.to_string()).collect::<Vec<_>>());
            let theirs: Option<Vec<String>> =
                serde_json::from_value(meta["peft_default_lora_targets"].clone()).unwrap();
            assert_eq!(ours, theirs, "default LoRA targets of {model_type}");
            if meta["adapter_targets"].is_null() {
                return;
            }
            let fx = Fixture::open(&dir.join("fixture.safetensors"));
            let ckpt = Checkpoint::open(dir).unwrap();
            let adapter = dir.join("adapter");
            let d = device();
            let saved = tempfile::tempdir().unwrap();
            let (adapted, merged) = match task(meta) {
                "causal" => {
                    let mut model = ckpt.load_causal_lm(&d).unwrap();
                    let config = whet_peft::load_adapter(&mut model, &adapter, &d).unwrap();
                    let run = |m: &whet_models::CausalModel| {
                        values(m.forward_logits(decoder_input(&fx, "right", &d, false), Mode::Eval))
                    };
                    config
                        .save(&model, "base", "CAUSAL_LM", saved.path())
                        .unwrap();
                    let mut merged = model.clone();
                    whet_peft::merge_lora(&mut merged);
                    (run(&model), run(&merged))
                }
                _ => {
                    let (mut model, _) = ckpt.load_classifier(&d).unwrap();
                    let config = whet_peft::load_adapter(&mut model, &adapter, &d).unwrap();
                    let run = |m: &whet_models::Classifier| {
                        values(
                            m.forward(classifier_input(&fx, &d, false), Mode::Eval)
                                .unwrap(),
                        )
                    };
                    config
                        .save(&model, "base", "SEQ_CLS", saved.path())
                        .unwrap();
                    let mut merged = model.clone();
                    whet_peft::merge_lora(&mut merged);
                    (run(&model), run(&merged))
                }
            };
            let want = fx.f32("adapter_logits");
            let mask = fx
                .has("attention_mask_right")
                .then(|| fx.i64("attention_mask_right"));
            let pick = |v: &[f32]| match &mask {
                Some(m) => masked_rows(v, m, v.len() / m.len()),
                None => v.to_vec(),
            };
            assert_close(
                "logits with peft's adapter",
                &pick(&adapted),
                &pick(&want),
                LOGITS_TOL,
            );
            assert_close("merged logits", &pick(&merged), &pick(&want), LOGITS_TOL);
            // whet's save: peft's tensor names, shapes and values.
            let read = |p: &Path| {
                let bytes = std::fs::read(p.join("adapter_model.safetensors")).unwrap();
                let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
                let mut out: Vec<(String, Vec<usize>, Vec<u8>)> = st
                    .tensors()
                    .into_iter()
                    .map(|(n, v)| (n, v.shape().to_vec(), v.data().to_vec()))
                    .collect();
                out.sort();
                out
            };
            let (ours, theirs) = (read(saved.path()), read(&adapter));
            let names = |v: &[(String, Vec<usize>, Vec<u8>)]| {
                v.iter()
                    .map(|(n, s, _)| format!("{n} {s:?}"))
                    .collect::<Vec<_>>()
            };
            assert_eq!(names(&ours), names(&theirs), "saved adapter tensors");
            assert!(ours == theirs, "saved adapter values differ from peft's");
        },
    );
}

/// Check 3: greedy generation with the cache, from a left-padded batch, equals transformers'.
#[test]
fn greedy_generation_equals_transformers() {
    each_case(
        |m| task(m) == "causal",
        |dir, meta| {
            let fx = Fixture::open(&dir.join("fixture.safetensors"));
            let model = Checkpoint::open(dir)
                .unwrap()
                .load_causal_lm(&device())
                .unwrap();
            let (ids, mask) = (fx.i64("gen_prompt_ids"), fx.i64("gen_prompt_mask"));
            let width = fx.shape("gen_prompt_ids")[1];
            let prompts: Vec<Vec<u32>> = ids
                .chunks(width)
                .zip(mask.chunks(width))
                .map(|(r, m)| {
                    r.iter()
                        .zip(m)
                        .filter(|(_, m)| **m == 1)
                        .map(|(t, _)| *t as u32)
                        .collect()
                })
                .collect();
            let want = fx.i64("gen_tokens");
            let new = want.len() / prompts.len();
            let config = whet_infer::generate::GenerationConfig::greedy(new, vec![]);
            let pad = meta["pad_id"].as_u64().unwrap() as u32;
            let got =
                whet_infer::generate::generate_batch(&model, &prompts, &config, pad, &device())
                    .unwrap();
            let got: Vec<i64> = got.concat().iter().map(|&t| t as i64).collect();
            assert_eq!(got, want, "greedy tokens");
        },
    );
}

/// Check 4: `whet train` fine-tunes each family's classifier from the CLI and saves it as
/// transformers names it.
#[test]
fn classification_trains_through_the_cli() {
    each_case(
        |m| task(m) == "cls",
        |dir, meta| {
            let tmp = tempfile::tempdir().unwrap();
            let row = |i: usize| {
                let label = ["a", "b", "c"][i % 3];
                format!(
                    "{{\"text\": \"w{} w{} w{}\", \"label\": \"{label}\"}}\n",
                    10 + i % 3,
                    20 + i % 7,
                    30 + i % 11
                )
            };
            let (train, val) = (tmp.path().join("train.jsonl"), tmp.path().join("val.jsonl"));
            std::fs::write(&train, (0..24).map(row).collect::<String>()).unwrap();
            std::fs::write(&val, (24..33).map(row).collect::<String>()).unwrap();
            let out = tmp.path().join("out");
            let recipe = tmp.path().join("recipe.toml");
            std::fs::write(
                &recipe,
                format!(
                    "model = \"{}\"\nmethod = \"full\"\n[data]\ntrain = \"{}\"\nvalidation = \"{}\"\n\
                     max_length = 16\n[training]\noutput_dir = \"{}\"\nlearning_rate = 1e-2\n\
                     per_device_train_batch_size = 8\nmax_steps = 4\neval_strategy = \"epoch\"\n",
                    dir.display(),
                    train.display(),
                    val.display(),
                    out.display()
                ),
            )
            .unwrap();
            ok(&["train", recipe.to_str().unwrap()]);
            let config: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                    .unwrap();
            assert_eq!(config["architectures"][0], meta["class"], "saved class");
            let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            let mut saved: Vec<String> = st.names().into_iter().map(String::from).collect();
            let mut want: Vec<String> = serde_json::from_value(meta["parameters"].clone()).unwrap();
            saved.sort();
            want.sort();
            // A tied head is saved once, under the embedding's name, as transformers saves it.
            assert_eq!(saved, want, "saved tensor names");
            let results: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(out.join("all_results.json")).unwrap(),
            )
            .unwrap();
            assert!(
                results["eval_loss"].as_f64().is_some_and(f64::is_finite),
                "{results}"
            );
        },
    );
}

/// Check 5: the chat template renders a conversation as transformers' `apply_chat_template`.
#[test]
fn chat_templates_render_as_transformers() {
    each_case(
        |m| task(m) == "causal",
        |dir, meta| {
            let tok = whet_models::TextTokenizer::from_folder(dir).unwrap();
            let messages: Vec<whet_models::ChatMessage> =
                serde_json::from_value(meta["chat_messages"].clone()).unwrap();
            let text = tok.apply_chat_template(&messages, true).unwrap();
            assert_eq!(text, meta["chat_text"].as_str().unwrap(), "rendering");
            let ids: Vec<u32> = serde_json::from_value(meta["chat_ids"].clone()).unwrap();
            assert_eq!(tok.encode(&text, false).unwrap(), ids, "token ids");
        },
    );
}

/// What a GGUF file cannot carry in the fixtures that switch it on, by folder: the phrase of
/// the refusal, and the config edits that make the folder expressible.
fn gguf_refusal(folder: &str) -> Option<(&'static str, serde_json::Value)> {
    use serde_json::json;
    Some(match folder {
        "qwen3-causal" => ("use_sliding_window", json!({"use_sliding_window": false})),
        "gemma2-causal" => (
            "query_pre_attn_scalar",
            json!({"query_pre_attn_scalar": 256}),
        ),
        "gemma3_text-causal" => (
            "layer types",
            json!({"query_pre_attn_scalar": 256, "sliding_window_pattern": 6}),
        ),
        "phi3-longrope-causal" => (
            "rope scaling",
            json!({"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
        ),
        "gpt2-causal" => ("GGUF export covers the rotary decoders", json!(null)),
        _ => return None,
    })
}

/// Exports `dir` to GGUF f32 with the CLI and loads the file back.
fn export_and_open(dir: &Path, tmp: &Path) -> std::result::Result<Checkpoint, String> {
    let out = tmp.join("model.gguf");
    let args = [
        "export",
        dir.to_str().unwrap(),
        out.to_str().unwrap(),
        "--type",
        "f32",
    ];
    let run = crate::common::whet(&args);
    if !run.status.success() {
        return Err(String::from_utf8_lossy(&run.stderr).into_owned());
    }
    Ok(Checkpoint::open(&out).unwrap())
}

/// The right-padded batch's logits at the real tokens.
fn real_logits(model: &impl CausalLm, fx: &Fixture) -> Vec<f32> {
    let mask = fx.i64("attention_mask_right");
    let got =
        values(model.forward_logits(decoder_input(fx, "right", &device(), false), Mode::Eval));
    masked_rows(&got, &mask, model.vocab_size())
}

/// Check 6: `whet export` to GGUF (f32) and back gives transformers' logits, the tokenizer's ids
/// and the chat template. A fixture switching on what a GGUF file cannot carry is refused,
/// naming it; made expressible (its config edited), it round-trips to the logits whet computes
/// from the edited folder. Every rotary decoder is thus written and read back.
#[test]
fn decoders_export_to_gguf_and_load_back() {
    each_case(
        |m| task(m) == "causal",
        |dir, meta| {
            let tmp = tempfile::tempdir().unwrap();
            let folder = dir.file_name().unwrap().to_string_lossy().into_owned();
            let fx = Fixture::open(&dir.join("fixture.safetensors"));
            let (why, edits) = match gguf_refusal(&folder) {
                None => {
                    let ckpt = export_and_open(dir, tmp.path()).unwrap();
                    assert_eq!(ckpt.model_type(), meta["model_type"].as_str().unwrap());
                    let model = ckpt.load_causal_lm(&device()).unwrap();
                    let mask = fx.i64("attention_mask_right");
                    assert_close(
                        "logits from the GGUF file",
                        &real_logits(&model, &fx),
                        &masked_rows(&fx.f32("logits_right"), &mask, model.vocab_size()),
                        LOGITS_TOL,
                    );
                    let tok = ckpt.tokenizer().unwrap();
                    let text = meta["chat_text"].as_str().unwrap();
                    let ids: Vec<u32> = serde_json::from_value(meta["chat_ids"].clone()).unwrap();
                    assert_eq!(
                        tok.encode(text, false).unwrap(),
                        ids,
                        "ids from the GGUF file"
                    );
                    let messages: Vec<whet_models::ChatMessage> =
                        serde_json::from_value(meta["chat_messages"].clone()).unwrap();
                    assert_eq!(tok.apply_chat_template(&messages, true).unwrap(), text);
                    return;
                }
                Some(refusal) => refusal,
            };
            let e = export_and_open(dir, tmp.path()).err().unwrap_or_default();
            assert!(e.contains(why), "expected a refusal naming {why:?}: {e}");
            if edits.is_null() {
                return;
            }
            // The expressible variant: a copy with the config edited.
            let copy = tmp.path().join("expressible");
            std::fs::create_dir(&copy).unwrap();
            for f in std::fs::read_dir(dir).unwrap() {
                let f = f.unwrap().path();
                if f.is_file() {
                    std::fs::copy(&f, copy.join(f.file_name().unwrap())).unwrap();
                }
            }
            let path = copy.join("config.json");
            let mut config: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            for (k, v) in edits.as_object().unwrap() {
                config[k] = v.clone();
            }
            std::fs::write(&path, config.to_string()).unwrap();
            let folder_logits = real_logits(
                &Checkpoint::open(&copy)
                    .unwrap()
                    .load_causal_lm(&device())
                    .unwrap(),
                &fx,
            );
            let ckpt = export_and_open(&copy, tmp.path()).unwrap();
            let gguf_logits = real_logits(&ckpt.load_causal_lm(&device()).unwrap(), &fx);
            assert_close(
                "logits of the expressible variant",
                &gguf_logits,
                &folder_logits,
                LOGITS_TOL,
            );
        },
    );
}
