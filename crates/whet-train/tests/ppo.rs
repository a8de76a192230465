//! PPO's arithmetic against trl 0.19's (`tests/fixtures/ppo/steps.safetensors`, from
//! `scripts/fixtures/make_ppo_fixture.py`, which runs trl 0.19.1's own functions and the lines of
//! `PPOTrainer.train`): per-token KL-penalised rewards, GAE, whitened advantages and rewards,
//! returns, the clipped policy and value losses, their clip fractions, approxkl and ratio
//! statistics and gradients, and `[ppo]`'s defaults against `PPOConfig`'s.

use crate::common;

use burn::tensor::{Device, Tensor, TensorData};
use common::fixtures;
use safetensors::SafeTensors;
use whet_train::ppo::{gae, ppo_losses, token_rewards, whiten};

fn floats(st: &SafeTensors, k: &str) -> Vec<f32> {
    st.tensor(k)
        .unwrap_or_else(|_| panic!("no {k}"))
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// The real (non-padding) positions of a `[B, T]` array, flat in row order.
fn real(v: &[f32], lengths: &[usize], t: usize) -> Vec<f32> {
    lengths
        .iter()
        .enumerate()
        .flat_map(|(r, &l)| v[r * t..r * t + l].to_vec())
        .collect()
}

fn close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() <= tol, "{what}: {got:?} vs {want:?}");
    }
}

#[test]
fn ppo_arithmetic_matches_trl() {
    let bytes = std::fs::read(fixtures().join("ppo/steps.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let lengths: Vec<usize> = st
        .tensor("lengths")
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as usize)
        .collect();
    let t = 5;
    // trl's lengths (`sequence_lengths + 1`) count the response up to and with its first EOS
    // (id 2), the whole row when there is none: the tokens whet's rollouts learn.
    let responses: Vec<i64> = st
        .tensor("responses")
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let to_eos: Vec<usize> = responses
        .chunks(t)
        .map(|row| row.iter().position(|&id| id == 2).map_or(t, |i| i + 1))
        .collect();
    assert_eq!(to_eos, lengths);
    let mut offsets = vec![0];
    for &l in &lengths {
        offsets.push(offsets.last().unwrap() + l);
    }
    let get = |k: &str| real(&floats(&st, k), &lengths, t);
    let (logps, ref_logps, values) = (get("logprobs"), get("ref_logprobs"), get("values"));
    let scores = floats(&st, "scores");
    let rewards = token_rewards(&logps, &ref_logps, &scores, &offsets, 0.05);
    close(&rewards, &get("rewards"), 1e-6, "rewards");
    close(
        &whiten(&rewards, false),
        &get("whitened_rewards"),
        1e-5,
        "whitened rewards",
    );
    let (adv, returns) = gae(&rewards, &values, &offsets, 1.0, 0.95);
    close(&returns, &get("returns"), 1e-5, "returns");
    let adv = whiten(&adv, true);
    close(&adv, &get("advantages"), 1e-5, "advantages");

    let device = Device::flex().autodiff();
    let n = logps.len();
    let leaf =
        |v: Vec<f32>| Tensor::<1>::from_data(TensorData::new(v, [n]), &device).require_grad();
    let (new_l, new_v) = (leaf(get("new_logprobs")), leaf(get("new_values")));
    let l = ppo_losses(
        new_l.clone(),
        new_v.clone(),
        &logps,
        &values,
        &adv,
        &returns,
        0.2,
        0.2,
    );
    let scalar = |t: &Tensor<1>| t.clone().into_scalar::<f32>() / n as f32;
    let one = |k: &str| floats(&st, k)[0];
    close(&[scalar(&l.policy)], &[one("pg_loss")], 1e-6, "policy loss");
    close(&[scalar(&l.value)], &[one("vf_loss")], 1e-5, "value loss");
    close(
        &[
            l.policy_clipped as f32 / n as f32,
            l.value_clipped as f32 / n as f32,
        ],
        &[one("pg_clipfrac"), one("vf_clipfrac")],
        1e-6,
        "clip fractions",
    );
    // trl logs approxkl and the ratio as means over all B * T positions, padding included,
    // where the log-ratio is 0 (whet's logs divide by the response tokens instead).
    let positions = (lengths.len() * t) as f64;
    let pads = positions - n as f64;
    close(
        &[l.half_sq_log_ratio as f32],
        &[one("approxkl") * positions as f32],
        1e-5,
        "approxkl",
    );
    close(
        &[(l.ratio_sum + pads) as f32],
        &[one("ratio_mean") * positions as f32],
        1e-5,
        "ratio",
    );
    let loss = (l.policy + l.value.mul_scalar(0.1)).div_scalar(n as f64);
    let grads = loss.backward();
    let grad = |p: &Tensor<1>| {
        p.grad(&grads)
            .unwrap()
            .into_data()
            .try_to_vec::<f32>()
            .unwrap()
    };
    close(
        &grad(&new_l),
        &get("grad_new_logprobs"),
        1e-6,
        "d loss / d logps",
    );
    close(
        &grad(&new_v),
        &get("grad_new_values"),
        1e-6,
        "d loss / d values",
    );
}

/// `[ppo]`'s defaults are trl 0.19.1's `PPOConfig` defaults (the fixture's `ppo_config`
/// metadata, read from a `PPOConfig()`).
#[test]
fn ppo_defaults_are_trl_ppo_config_defaults() {
    let bytes = std::fs::read(fixtures().join("ppo/steps.safetensors")).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let trl: serde_json::Value =
        serde_json::from_str(&meta.metadata().as_ref().unwrap()["ppo_config"]).unwrap();
    let ours: whet_train::ppo::PpoConfig =
        serde_json::from_value(serde_json::json!({"reward_model": "rm"})).unwrap();
    let ours = serde_json::to_value(ours).unwrap();
    let trl = trl.as_object().unwrap();
    assert_eq!(trl.len(), 12);
    for (k, want) in trl {
        let got = &ours[k];
        let same = match (got.as_f64(), want.as_f64()) {
            (Some(a), Some(b)) => a == b,
            _ => got == want,
        };
        assert!(same, "{k}: whet {got} vs trl {want}");
    }
}

/// GAE's two limits: lam = 1 gives returns equal to the rewards to go (gamma 1, values
/// cancel), lam = 0 gives the one-step TD errors.
#[test]
fn gae_limits() {
    let rewards = [0.5, -1.0, 2.0, 1.0, 0.25];
    let values = [0.3, 0.1, -0.2, 0.7, 0.4];
    let offsets = [0, 3, 5];
    let (_, returns) = gae(&rewards, &values, &offsets, 1.0, 1.0);
    close(
        &returns,
        &[1.5, 1.0, 2.0, 1.25, 0.25],
        1e-6,
        "rewards to go",
    );
    let (adv, _) = gae(&rewards, &values, &offsets, 0.9, 0.0);
    let td = [
        0.5 + 0.9 * 0.1 - 0.3,
        -1.0 + 0.9 * -0.2 - 0.1,
        2.0 + 0.2,
        1.0 + 0.9 * 0.4 - 0.7,
        0.25 - 0.4,
    ];
    close(&adv, &td, 1e-6, "TD errors");
    let w = whiten(&[1.0, 2.0, 3.0, 4.0], true);
    let mean: f32 = w.iter().sum::<f32>() / 4.0;
    let var: f32 = w.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / 3.0;
    assert!(mean.abs() < 1e-6 && (var - 1.0).abs() < 1e-4, "{w:?}");
}

/// Rollouts generate with the KV cache in left-padded batches; with virtual tokens (peft's
/// prefix tuning of tiny-llama, prompt tuning of tiny-gpt2) the batch gives the tokens that
/// greedy decoding without a cache gives, one prompt at a time.
#[test]
fn batched_generation_with_virtual_tokens_matches_uncached_decoding() {
    use burn::tensor::Int;
    use whet_infer::{GenerationConfig, generate_batch};
    use whet_models::{CausalLm, Checkpoint, DecoderInput, Mode};
    let device = Device::flex();
    for (base, adapter) in [
        ("tiny-llama", "peft/llama-prefix-lm"),
        ("tiny-gpt2", "peft/gpt2-prompt-lm"),
    ] {
        let mut model = Checkpoint::open(fixtures().join(base))
            .unwrap()
            .load_causal_lm(&device)
            .unwrap();
        whet_peft::load_adapter(&mut model, &fixtures().join(adapter), &device).unwrap();
        let prompts: Vec<Vec<u32>> = vec![vec![5, 17, 33, 8], vec![40, 2 + 7]];
        let config = GenerationConfig::greedy(5, vec![]);
        let batched = generate_batch(&model, &prompts, &config, 0, &device).unwrap();
        for (p, got) in prompts.iter().zip(&batched) {
            let mut ids = p.clone();
            for _ in 0..5 {
                let n = ids.len();
                let input = Tensor::<2, Int>::from_data(
                    TensorData::new(ids.iter().map(|&i| i as i64).collect(), [1, n]),
                    &device,
                );
                let logits = model.forward_logits(DecoderInput::unpadded(input), Mode::Eval);
                let [_, t, v] = logits.dims();
                let last: Vec<f32> = logits
                    .slice([0..1, t - 1..t, 0..v])
                    .into_data()
                    .try_to_vec::<f32>()
                    .unwrap();
                ids.push(whet_infer::generate::argmax(&last));
            }
            assert_eq!(&ids[p.len()..], &got[..], "{adapter}: prompt {p:?}");
        }
    }
}

/// Conversational PPO prompts: a prompt column of `{role, content}` lists, and the prompts of
/// conversational preference pairs (explicit, or taken out of both conversations by turns),
/// render with the chat template and its generation prompt exactly as trl's
/// `maybe_apply_chat_template` renders prompt-only data on SmolLM2
/// (`tests/fixtures/lm/smollm2-chat-preferences.json`), and tokenize as the template's tokens
/// alone; a prompt ending with the assistant's turn is refused by file and line.
#[test]
fn conversational_prompts_render_with_the_generation_prompt() {
    use whet_train::ppo::{PromptText, read_prompts};
    let cache = std::env::var_os("WHET_CACHE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| fixtures().join("../../cache"));
    let tok = whet_models::Checkpoint::open(cache.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
        .expect("cache/smollm2: run scripts/fetch_assets.sh --only smollm2")
        .tokenizer()
        .unwrap();
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("lm/smollm2-chat-preferences.json")).unwrap(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let enc = whet_data::Encoding::Utf8;
    let mut checked = 0;
    for (i, case) in fixture["cases"].as_array().unwrap().iter().enumerate() {
        let want = case["prompt"].as_str().unwrap();
        if want.is_empty() {
            continue;
        }
        // The prompt alone, in a prompt column.
        let path = dir.path().join(format!("prompts-{i}.jsonl"));
        let row = serde_json::json!({ "prompt": case["row"]["prompt"] });
        std::fs::write(&path, format!("{row}\n{row}\n")).unwrap();
        let prompts = read_prompts(&path, enc, "prompt").unwrap();
        assert_eq!(prompts.len(), 1, "each distinct prompt once");
        assert!(matches!(prompts[0], PromptText::Chat(_)));
        let (text, ids) = prompts[0].encode(&tok).unwrap();
        assert_eq!(text, want, "case {i}");
        assert_eq!(ids, tok.encode(want, false).unwrap());
        // The same pair as preference data.
        let path = dir.path().join(format!("pairs-{i}.jsonl"));
        std::fs::write(&path, format!("{}\n", case["row"])).unwrap();
        let (text, _) = read_prompts(&path, enc, "prompt").unwrap()[0]
            .encode(&tok)
            .unwrap();
        assert_eq!(text, want, "case {i} as a pair");
        checked += 1;
    }
    assert_eq!(checked, 2);
    // An implicit pair: its prompt is the turns before the answers differ.
    let path = dir.path().join("implicit.jsonl");
    let turn = |role: &str, content: &str| serde_json::json!({"role": role, "content": content});
    let row = serde_json::json!({
        "chosen": [turn("user", "Say hi"), turn("assistant", "Hi!")],
        "rejected": [turn("user", "Say hi"), turn("assistant", "No.")],
    });
    std::fs::write(&path, format!("{row}\n")).unwrap();
    let (text, _) = read_prompts(&path, enc, "prompt").unwrap()[0]
        .encode(&tok)
        .unwrap();
    let want = tok
        .apply_chat_template(
            &[whet_text::ChatMessage {
                role: "user".into(),
                content: "Say hi".into(),
            }],
            true,
        )
        .unwrap();
    assert_eq!(text, want);
    assert!(text.ends_with("<|im_start|>assistant\n"), "{text:?}");
    // A prompt that ends with the assistant's turn.
    let path = dir.path().join("bad.jsonl");
    let row = serde_json::json!({"prompt": [turn("user", "a"), turn("assistant", "b")]});
    std::fs::write(&path, format!("{row}\n")).unwrap();
    let e = read_prompts(&path, enc, "prompt").unwrap_err().to_string();
    assert!(
        e.contains("bad.jsonl:1") && e.contains("assistant turn"),
        "{e}"
    );
}
