//! The `whet` binary end to end: info, generate (greedy, sampling, chat), convert, --help.

use crate::common;

use std::path::Path;

use common::*;

fn smollm2() -> std::path::PathBuf {
    asset("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

#[test]
fn info_describes_folder_and_gguf_models() {
    let tiny = root().join("tests/fixtures/tiny-llama");
    let text = ok(&["info", tiny.to_str().unwrap()]);
    assert!(text.contains("architecture: llama"), "{text}");
    assert!(text.contains("Hugging Face folder"), "{text}");
    assert!(text.contains("2 key/value"), "{text}");

    let text = ok(&["info", smollm2().to_str().unwrap()]);
    assert!(text.contains("GGUF"), "{text}");
    assert!(
        text.contains("30 layers, hidden 576, 9 heads (3 key/value)"),
        "{text}"
    );
    assert!(text.contains("Q4_1"), "{text}");
    assert!(text.contains("49152 tokens"), "{text}");
    assert!(text.contains("chat template: yes"), "{text}");
}

#[test]
fn generate_is_greedy_by_default_and_seeded_when_sampling() {
    let model = smollm2();
    let m = model.to_str().unwrap();
    let args = [
        "generate",
        "--model",
        m,
        "--prompt",
        "The capital of France is",
        "--max-new-tokens",
        "8",
    ];
    let a = ok(&args);
    let b = ok(&args);
    assert!(a.starts_with("The capital of France is"), "{a}");
    assert!(
        a.len() > "The capital of France is".len() + 2,
        "no continuation: {a}"
    );
    assert_eq!(a, b, "greedy decoding is deterministic");

    let sample = |seed: &str| {
        ok(&[
            "generate",
            "--model",
            m,
            "--prompt",
            "Once upon a time",
            "--max-new-tokens",
            "12",
            "--temperature",
            "1.0",
            "--top-p",
            "0.95",
            "--seed",
            seed,
        ])
    };
    assert_eq!(sample("1"), sample("1"), "same seed, same text");
    let chat = ok(&[
        "generate",
        "--model",
        m,
        "--chat",
        "--prompt",
        "Say hello.",
        "--max-new-tokens",
        "8",
    ]);
    assert!(!chat.trim().is_empty());
    assert!(
        !chat.contains("<|im_start|>"),
        "special tokens are not printed: {chat}"
    );
}

/// Stop strings end the output right after the string; a repetition penalty changes greedy
/// decoding; few-shot examples change what follows the prompt (plain and chat).
#[test]
fn generate_stops_at_stop_strings_and_takes_penalty_and_few_shot() {
    let model = smollm2();
    let m = model.to_str().unwrap();
    let base = [
        "generate",
        "--model",
        m,
        "--prompt",
        "1, 2, 3, 4,",
        "--max-new-tokens",
        "24",
    ];
    let plain = ok(&base);
    let new = plain
        .trim_end()
        .strip_prefix("1, 2, 3, 4,")
        .unwrap()
        .to_string();
    // Stop at the first comma the model writes, whatever it is.
    let cut = new.find(',').expect("the model continues the list");
    let mut args = base.to_vec();
    args.extend(["--stop", ","]);
    let stopped = ok(&args);
    assert_eq!(
        stopped.trim_end(),
        format!("1, 2, 3, 4,{}", &new[..=cut]),
        "the output ends with the stop string"
    );
    let mut args = base.to_vec();
    args.extend(["--repetition-penalty", "1.8"]);
    assert_ne!(ok(&args), plain, "a strong penalty changes greedy decoding");
    let e = err(&[&base[..], &["--repetition-penalty", "0"]].concat());
    assert!(e.contains("repetition_penalty"), "{e}");

    let dir = tempfile::tempdir().unwrap();
    let shots = dir.path().join("shots.txt");
    std::fs::write(&shots, "Q: 2 + 2?\nA: 4\nQ: 3 + 5?\nA: 8\n").unwrap();
    let q = [
        "generate",
        "--model",
        m,
        "--prompt",
        "Q: 1 + 1?\nA:",
        "--max-new-tokens",
        "3",
    ];
    let without = ok(&q);
    let with = ok(&[&q[..], &["--few-shot", shots.to_str().unwrap()]].concat());
    assert!(
        with.starts_with("Q: 1 + 1?"),
        "only the prompt is echoed: {with}"
    );
    assert_ne!(with, without, "the examples steer the answer");
    let chat_shots = dir.path().join("shots.jsonl");
    std::fs::write(
        &chat_shots,
        "{\"user\": \"Reply with one word: colour of the sky?\", \"assistant\": \"Blue\"}\n",
    )
    .unwrap();
    let c = [
        "generate",
        "--model",
        m,
        "--chat",
        "--prompt",
        "Colour of grass?",
        "--max-new-tokens",
        "6",
    ];
    let with = ok(&[&c[..], &["--few-shot", chat_shots.to_str().unwrap()]].concat());
    assert_ne!(with, ok(&c), "an earlier exchange changes the reply");
    std::fs::write(&chat_shots, "{\"user\": \"hi\"}\n").unwrap();
    let e = err(&[&c[..], &["--few-shot", chat_shots.to_str().unwrap()]].concat());
    assert!(
        e.contains("shots.jsonl:1") && e.contains("assistant"),
        "{e}"
    );
}

/// A LoRA adapter on SmolLM2 (random, non-zero B so it changes the output) generates through
/// `--adapter`, and through the adapter folder alone (base from adapter_config.json).
#[test]
fn generate_applies_a_lora_adapter() {
    use burn::module::Param;
    use burn::tensor::{Device, Distribution, Tensor};
    let model = smollm2();
    let m = model.to_str().unwrap();
    let device = Device::flex();
    let mut lm = whet_models::Checkpoint::open(&model)
        .unwrap()
        .load_causal_lm(&device)
        .unwrap();
    let cfg = whet_peft::LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.0,
        target_modules: vec!["q_proj".into(), "v_proj".into()],
        bias: "none".into(),
        modules_to_save: vec![],
        use_rslora: false,
    };
    whet_peft::apply_lora(&mut lm, &cfg, &device).unwrap();
    whet_peft::for_each_adapter(&mut lm, &mut |_, a| {
        let dims = a.b.shape().dims::<2>();
        a.b = Param::from_tensor(Tensor::random(
            dims,
            Distribution::Normal(0.0, 0.5),
            &device,
        ));
    });
    let dir = tempfile::tempdir().unwrap();
    whet_peft::save_adapter(&lm, &cfg, m, "CAUSAL_LM", dir.path()).unwrap();
    let d = dir.path().to_str().unwrap();
    let args = [
        "--prompt",
        "The capital of France is",
        "--max-new-tokens",
        "6",
    ];
    let base = ok(&[&["generate", "--model", m][..], &args].concat());
    let explicit = ok(&[&["generate", "--model", m, "--adapter", d][..], &args].concat());
    let implicit = ok(&[&["generate", "--model", d][..], &args].concat());
    assert_ne!(explicit, base, "the adapter changes generation");
    assert_eq!(explicit, implicit, "the adapter folder names its base");
}

#[test]
fn generate_refuses_an_encoder_with_a_clear_message() {
    let tiny = root().join("tests/fixtures/tiny-bert");
    let out = whet(&[
        "generate",
        "--model",
        tiny.to_str().unwrap(),
        "--prompt",
        "x",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tokenizer") || err.contains("decoder"),
        "{err}"
    );
}

#[test]
fn convert_writes_a_folder_whet_loads_back_with_the_same_config() {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("smollm2-hf");
    let text = ok(&[
        "convert",
        smollm2().to_str().unwrap(),
        dir.to_str().unwrap(),
    ]);
    assert!(text.contains("tensors"), "{text}");
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "LlamaForCausalLM");
    assert_eq!(config["num_key_value_heads"], 3);
    assert_eq!(config["tie_word_embeddings"], true);
    let tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert!(
        tok["chat_template"]
            .as_str()
            .unwrap()
            .contains("<|im_start|>")
    );
    let info = ok(&["info", dir.to_str().unwrap()]);
    assert!(info.contains("30 layers, hidden 576"), "{info}");
    // The folder generates what the GGUF generates.
    let generated = |m: &Path| {
        ok(&[
            "generate",
            "--model",
            m.to_str().unwrap(),
            "--prompt",
            "Hello, my name is",
            "--max-new-tokens",
            "6",
        ])
    };
    assert_eq!(generated(&dir), generated(&smollm2()));
}

#[test]
fn help_explains_every_option() {
    let text = ok(&["generate", "--help"]);
    for (opt, phrase) in [
        ("--model", "Model folder or .gguf file"),
        ("--prompt", "The text to continue"),
        ("--max-new-tokens", "Most tokens to generate"),
        ("--temperature", "Sample with this temperature"),
        ("--top-k", "most likely tokens"),
        ("--top-p", "smallest set of tokens"),
        ("--seed", "Random seed"),
        ("--chat", "chat template"),
        ("--system", "system message"),
        ("--repetition-penalty", "repetition_penalty"),
        ("--stop", "stop_strings"),
        ("--few-shot", "Few-shot prompting"),
    ] {
        assert!(text.contains(opt), "{opt} missing from --help:\n{text}");
        assert!(
            text.contains(phrase),
            "{opt} is not explained ({phrase:?}):\n{text}"
        );
    }
    let top = ok(&["--help"]);
    for cmd in ["info", "generate", "convert"] {
        assert!(top.contains(cmd), "{cmd} missing from --help");
    }
}

/// Several prompts are generated in left-padded batches: each JSON line holds what the prompt
/// generates alone (greedy), whatever the batch size.
#[test]
fn generate_batches_several_prompts() {
    let model = smollm2();
    let m = model.to_str().unwrap();
    let prompts = ["The capital of France is", "1, 2, 3, 4,", "Hello"];
    let alone: Vec<String> = prompts
        .iter()
        .map(|p| {
            ok(&[
                "generate",
                "--model",
                m,
                "--prompt",
                p,
                "--max-new-tokens",
                "6",
            ])
            .trim_end_matches('\n')
            .to_string()
        })
        .collect();
    for batch in ["2", "3"] {
        let mut args = vec![
            "generate",
            "--model",
            m,
            "--max-new-tokens",
            "6",
            "--batch-size",
            batch,
        ];
        for p in &prompts {
            args.extend(["--prompt", p]);
        }
        let out = ok(&args);
        let lines: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3, "{out}");
        for ((line, p), single) in lines.iter().zip(&prompts).zip(&alone) {
            assert_eq!(line["prompt"], *p);
            let text = format!("{p}{}", line["generated_text"].as_str().unwrap());
            assert_eq!(&text, single, "batch size {batch}");
        }
    }
}

/// `whet export --format gguf`: SmolLM2 as a Hugging Face folder (from `whet convert`) written
/// as F16, Q8_0 and Q4_0 GGUF files that whet loads back: same config, the tokenizer and chat
/// template in the metadata (encoding as the folder's tokenizer does), logits within each
/// type's rounding of the folder's.
#[test]
fn export_writes_gguf_files_that_load_back_to_the_same_model() {
    use burn::tensor::{Device, Tensor, TensorData};
    use whet_models::{CausalLm, Checkpoint, DecoderInput, FamilyConfig, Mode};
    let tmp = tempfile::tempdir().unwrap();
    let folder = tmp.path().join("smollm2-hf");
    ok(&[
        "convert",
        smollm2().to_str().unwrap(),
        folder.to_str().unwrap(),
    ]);
    let device = Device::flex();
    let reference = Checkpoint::open(&folder).unwrap();
    let ref_tok = reference.tokenizer().unwrap();
    let text = "The capital of France is Paris. Ünïcode, too!";
    let ids: Vec<i64> = ref_tok
        .inner
        .encode(text, true)
        .unwrap()
        .get_ids()
        .iter()
        .map(|&i| i as i64)
        .collect();
    let logits = |c: &Checkpoint| -> Vec<f32> {
        let t = ids.len();
        let input = DecoderInput::unpadded(Tensor::from_data(
            TensorData::new(ids.clone(), [1, t]),
            &device,
        ));
        c.load_causal_lm(&device)
            .unwrap()
            .forward_logits(input, Mode::Eval)
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .unwrap()
    };
    let want = logits(&reference);
    // (max, mean) bounds: SmolLM2's Q4_1-derived weights are large (up to 5), so a Q8_0 step
    // (a block's max / 127) moves its logits by tenths; scripts/check/check_gguf_export.py checks
    // the Q8_0 bytes against gguf's own quantiser.
    for (ty, tol, mean_tol) in [("f16", 0.1, 0.01), ("q8_0", 2.0, 0.3)] {
        let out = tmp.path().join(format!("smollm2-{ty}.gguf"));
        let said = ok(&[
            "export",
            folder.to_str().unwrap(),
            out.to_str().unwrap(),
            "--type",
            ty,
        ]);
        assert!(said.contains("tensors"), "{said}");
        let info = ok(&["info", out.to_str().unwrap()]);
        assert!(info.contains(&ty.to_uppercase()), "{info}");
        assert!(info.contains("chat template: yes"), "{info}");
        let back = Checkpoint::open(&out).unwrap();
        let (FamilyConfig::Llama(a), FamilyConfig::Llama(b)) = (&back.config, &reference.config)
        else {
            panic!("not llama")
        };
        assert_eq!(
            (
                a.num_hidden_layers,
                a.hidden_size,
                a.kv_heads(),
                a.vocab_size,
                a.tie_word_embeddings
            ),
            (
                b.num_hidden_layers,
                b.hidden_size,
                b.kv_heads(),
                b.vocab_size,
                b.tie_word_embeddings
            )
        );
        assert!(
            (a.theta(whet_models::llama::LayerKind::Full)
                - b.theta(whet_models::llama::LayerKind::Full))
            .abs()
                < 1e-6
                && (a.rms_norm_eps - b.rms_norm_eps).abs() < 1e-9
        );
        let tok = back.tokenizer().unwrap();
        assert_eq!(
            tok.inner.encode(text, true).unwrap().get_ids(),
            ref_tok.inner.encode(text, true).unwrap().get_ids(),
            "{ty}: tokenizer"
        );
        assert_eq!(tok.chat_template, ref_tok.chat_template);
        assert_eq!(
            tok.eos.as_ref().map(|s| s.id),
            ref_tok.eos.as_ref().map(|s| s.id)
        );
        let got = logits(&back);
        let d = got
            .iter()
            .zip(&want)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        let mean = got
            .iter()
            .zip(&want)
            .map(|(x, y)| (x - y).abs())
            .sum::<f32>()
            / got.len() as f32;
        assert!(
            d < tol && mean < mean_tol,
            "{ty}: logits differ by {d} (mean {mean})"
        );
    }
    // Q4_0 from the original GGUF file: re-quantising a 4-bit model to another 4-bit layout
    // moves SmolLM2's logits about as much as NF4 does (a mean of about 2), so only a bound.
    let out = tmp.path().join("smollm2-q4_0.gguf");
    ok(&[
        "export",
        smollm2().to_str().unwrap(),
        out.to_str().unwrap(),
        "--type",
        "q4_0",
    ]);
    let got = logits(&Checkpoint::open(&out).unwrap());
    let mean = got
        .iter()
        .zip(&want)
        .map(|(x, y)| (x - y).abs())
        .sum::<f32>()
        / got.len() as f32;
    assert!(
        got.iter().all(|v| v.is_finite()) && mean < 4.0,
        "Q4_0: mean logit difference {mean}"
    );
    let err = err(&[
        "export",
        folder.to_str().unwrap(),
        out.to_str().unwrap(),
        "--type",
        "q5_k",
    ]);
    assert!(err.contains("q5_k"), "{err}");
}
