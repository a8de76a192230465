//! The DPO loss against trl's (`tests/fixtures/dpo/losses.safetensors`, from
//! `scripts/fixtures/make_dpo_fixture.py`, which runs `DPOTrainer._compute_loss` on fixed log-probs):
//! loss, gradient with respect to the per-token log-probabilities, and the logged rewards, for
//! the sigmoid and IPO losses.

use crate::common;

use burn::tensor::{Device, Tensor, TensorData};
use common::fixtures;
use safetensors::SafeTensors;
use whet_train::dpo::{DpoLossType, PairLogps, dpo_loss, sequence_logps};

fn floats(st: &SafeTensors, k: &str) -> (Vec<f32>, Vec<usize>) {
    let t = st.tensor(k).unwrap_or_else(|_| panic!("no {k}"));
    let v = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    (v, t.shape().to_vec())
}

#[test]
fn dpo_losses_gradients_and_rewards_match_trl() {
    let bytes = std::fs::read(fixtures().join("dpo/losses.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let device = Device::flex().autodiff();
    let (per_token, shape) = floats(&st, "per_token_logps");
    let mask_t = st.tensor("completion_mask").unwrap();
    let mask: Vec<i64> = mask_t
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let [n, t1] = [shape[0], shape[1]];
    let t = t1 + 1;
    // trl sums the completion's log-probs of the shifted positions; IPO counts the unshifted
    // completion mask.
    let shifted: Vec<f32> = (0..n)
        .flat_map(|r| (1..t).map(move |c| (r, c)))
        .map(|(r, c)| mask[r * t + c] as f32)
        .collect();
    let lengths: Vec<usize> = mask
        .chunks(t)
        .map(|row| row.iter().sum::<i64>() as usize)
        .collect();
    let (reference, _) = floats(&st, "ref_logps");
    for (kind, name) in [(DpoLossType::Sigmoid, "sigmoid"), (DpoLossType::Ipo, "ipo")] {
        let leaf = Tensor::<2>::from_data(TensorData::new(per_token.clone(), [n, t1]), &device)
            .require_grad();
        let m = Tensor::<2>::from_data(TensorData::new(shifted.clone(), [n, t1]), &device);
        let policy = PairLogps {
            logps: sequence_logps(leaf.clone(), m),
            lengths: lengths.clone(),
        };
        let r = Tensor::<1>::from_data(TensorData::new(reference.clone(), [n]), &device);
        let out = dpo_loss(&policy, r, 0.1, kind);
        let loss = out.loss.clone().into_scalar::<f32>();
        let want = floats(&st, &format!("{name}.loss")).0[0];
        assert!(
            (loss - want).abs() < 1e-5 * want.abs().max(1.0),
            "{name}: loss {loss} vs trl {want}"
        );
        let grads = out.loss.clone().backward();
        let g: Vec<f32> = leaf.grad(&grads).unwrap().into_data().try_to_vec().unwrap();
        let want_g = floats(&st, &format!("{name}.grad")).0;
        // Compared on the completion: trl's model zeroes the log-probs of labels set to -100, so
        // no gradient reaches the prompt there; the stub's plain tensor passes one through.
        let d = g
            .iter()
            .zip(&want_g)
            .zip(&shifted)
            .filter(|(_, m)| **m > 0.0)
            .map(|((a, b), _)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(d < 1e-5, "{name}: gradient differs by {d}");
        let metrics = out.metrics();
        for k in ["chosen", "rejected", "margins", "accuracies"] {
            let want = floats(&st, &format!("{name}.rewards_{k}")).0[0] as f64;
            let got = metrics[&format!("rewards/{k}")];
            assert!(
                (got - want).abs() < 1e-5,
                "{name}: rewards/{k} {got} vs trl {want}"
            );
        }
    }
}

use whet_data::{IGNORE, LmExample, PreferencePair, Side};
use whet_models::{Checkpoint, Mode};
use whet_train::Objective;
use whet_train::causal_lm::LanguageModelling;
use whet_train::dpo::{Dpo, DpoConfig, DpoExample, Reference, encode_dpo_pair, row_logps};

fn ints(st: &SafeTensors, k: &str) -> Vec<i64> {
    st.tensor(k)
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// Rows of tiny-llama's transformers fixture whose tokens from position 3 on are the answer.
fn answer_rows(st: &SafeTensors) -> (Vec<LmExample>, Vec<f64>) {
    let ids = ints(st, "input_ids_right");
    let mask = ints(st, "attention_mask_right");
    let (logits, shape) = floats(st, "logits_right");
    let [rows, t, v] = [shape[0], shape[1], shape[2]];
    let mut examples = Vec::new();
    let mut want = Vec::new();
    for r in 0..rows {
        let len = mask[r * t..(r + 1) * t].iter().sum::<i64>() as usize;
        let row: Vec<u32> = ids[r * t..r * t + len].iter().map(|&i| i as u32).collect();
        let labels = row
            .iter()
            .enumerate()
            .map(|(k, &i)| if k < 3 { IGNORE } else { i as i64 })
            .collect();
        // transformers' log-softmax at each position k predicting token k + 1 of the answer.
        let mut sum = 0.0f64;
        for k in 2..len - 1 {
            let l = &logits[(r * t + k) * v..(r * t + k + 1) * v];
            let max = l.iter().cloned().fold(f32::MIN, f32::max) as f64;
            let lse = max + l.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
            sum += l[row[k + 1] as usize] as f64 - lse;
        }
        want.push(sum);
        examples.push(LmExample {
            position_ids: (0..len as u32).collect(),
            document_ids: vec![0; len],
            ids: row,
            labels,
            origin: format!("row {r}"),
        });
    }
    (examples, want)
}

/// The policy's sequence log-probabilities equal those of transformers' logits for the same
/// tiny LLaMA (`tests/fixtures/tiny-llama`), over the answer tokens only, with padding, padded and
/// padding-free.
#[test]
fn sequence_logps_match_transformers_logits() {
    let bytes = std::fs::read(fixtures().join("tiny-llama/fixture.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (examples, want) = answer_rows(&st);
    let device = Device::flex();
    let model = Checkpoint::open(fixtures().join("tiny-llama"))
        .unwrap()
        .load_causal_lm(&device)
        .unwrap();
    for padding_free in [false, true] {
        let lm = LanguageModelling {
            pad_id: 0,
            soft_prompt: 0,
            padding_free,
            sampler: None,
        };
        let rows: Vec<&LmExample> = examples.iter().collect();
        let b = lm.collate(&rows);
        assert!(b.tokens < b.batch * b.len, "the rows are padded");
        let got: Vec<f32> = row_logps(&model, &lm, &b, Mode::Eval, &device)
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (*g as f64 - w).abs() < 1e-4,
                "padding-free {padding_free}: {got:?} vs {want:?}"
            );
        }
    }
}

/// With a trained adapter (peft's prefix tuning of tiny-llama), the adapter-off reference gives
/// exactly the base model's log-probabilities (and the policy others); precomputing stores the
/// same numbers.
#[test]
fn the_adapter_off_reference_is_the_base_model() {
    let bytes = std::fs::read(fixtures().join("tiny-llama/fixture.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (examples, _) = answer_rows(&st);
    let device = Device::flex().autodiff();
    let ck = Checkpoint::open(fixtures().join("tiny-llama")).unwrap();
    let base = ck.load_causal_lm(&device).unwrap();
    let mut policy = base.clone();
    whet_peft::load_adapter(
        &mut policy,
        &fixtures().join("peft/llama-prefix-lm"),
        &device,
    )
    .unwrap();
    let lm = || LanguageModelling {
        pad_id: 0,
        soft_prompt: 0,
        padding_free: true,
        sampler: None,
    };
    let mut pairs = vec![DpoExample {
        chosen: examples[0].clone(),
        rejected: examples[1].clone(),
        reference: None,
    }];
    let dpo = Dpo::new(lm(), &DpoConfig::default(), Reference::AdapterOff);
    let b = dpo.collate(&pairs.iter().collect::<Vec<_>>());
    let values = |t: Tensor<1>| t.into_data().try_to_vec::<f32>().unwrap();
    let reference = values(dpo.reference_logps(&policy, &b, &device).unwrap());
    let plain = device.clone().without_autodiff();
    let base_logps = values(row_logps(&base, &lm(), &b.rows, Mode::Eval, &plain));
    let policy_logps = values(row_logps(&policy, &lm(), &b.rows, Mode::Eval, &plain));
    assert_eq!(reference, base_logps);
    assert!(
        (reference[0] - policy_logps[0]).abs() > 1e-3,
        "{reference:?} {policy_logps:?}"
    );
    dpo.precompute(&policy, &mut pairs, 4, &device).unwrap();
    assert_eq!(pairs[0].reference, Some((base_logps[0], base_logps[1])));
}

fn word_tokenizer() -> whet_models::TextTokenizer {
    let dir = tempfile::tempdir().unwrap();
    let mut vocab = serde_json::Map::new();
    for (i, t) in ["<unk>", "<eos>", "a", "b", "c", "d", "e"]
        .iter()
        .enumerate()
    {
        vocab.insert(t.to_string(), i.into());
    }
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": 1, "content": "<eos>", "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    std::fs::write(dir.path().join("tokenizer.json"), tokenizer.to_string()).unwrap();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"eos_token": "<eos>", "unk_token": "<unk>"}"#,
    )
    .unwrap();
    whet_models::TextTokenizer::from_folder(dir.path()).unwrap()
}

/// Pairs become rows as trl's DPOTrainer makes them: EOS after each answer, the answer learnt
/// and the prompt not, the prompt taken from the common start when there is no prompt column,
/// `keep_start` truncation, and a prompt that fills max_length drops the pair.
#[test]
fn pairs_are_tokenized_as_trl_does() {
    let tok = word_tokenizer();
    let pair = |p: &str, c: &str, r: &str| PreferencePair {
        prompt: p.into(),
        chosen: c.into(),
        rejected: r.into(),
        origin: "pairs.jsonl:1".into(),
        messages: None,
    };
    let e = encode_dpo_pair(&tok, &pair("a b", " c", " d e"), 16, Side::Right)
        .unwrap()
        .unwrap();
    assert_eq!(e.chosen.ids, vec![2, 3, 4, 1]);
    assert_eq!(e.chosen.labels, vec![IGNORE, IGNORE, 4, 1]);
    assert_eq!(e.rejected.ids, vec![2, 3, 5, 6, 1]);
    assert_eq!(e.rejected.labels, vec![IGNORE, IGNORE, 5, 6, 1]);
    // The implicit prompt: the same rows.
    let implicit = encode_dpo_pair(&tok, &pair("", "a b c", "a b d e"), 16, Side::Right)
        .unwrap()
        .unwrap();
    assert_eq!(implicit.chosen.labels, e.chosen.labels);
    assert_eq!(implicit.rejected.labels, e.rejected.labels);
    // keep_start: the first 3 tokens.
    let cut = encode_dpo_pair(&tok, &pair("a b", " c", " d e"), 3, Side::Right)
        .unwrap()
        .unwrap();
    assert_eq!(cut.rejected.ids, vec![2, 3, 5]);
    assert!(
        encode_dpo_pair(&tok, &pair("a b c", " d", " e"), 3, Side::Right)
            .unwrap()
            .is_none()
    );
    // An answer that tokenizes to nothing but EOS still has a token to learn; an empty answer
    // after truncation from the left is an error naming the pair.
    let err = encode_dpo_pair(&tok, &pair("a b c d", " e", " c"), 1, Side::Left)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(err.contains("pairs.jsonl:1"), "{err}");
}

/// SmolLM2's real tokenizer, from its GGUF (`scripts/fetch_assets.sh --only smollm2`).
fn smollm2() -> whet_models::TextTokenizer {
    let cache = std::env::var_os("WHET_CACHE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| fixtures().join("../../cache"));
    Checkpoint::open(cache.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
        .expect("cache/smollm2: run scripts/fetch_assets.sh --only smollm2")
        .tokenizer()
        .unwrap()
}

/// trl's collated row as whet's ids and labels: the answer (`completion_mask` 1) learnt.
fn trl_row(row: &serde_json::Value) -> (Vec<u32>, Vec<i64>) {
    let ints = |k: &str| -> Vec<i64> {
        row[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect()
    };
    let (ids, mask) = (ints("input_ids"), ints("completion_mask"));
    let labels = ids
        .iter()
        .zip(&mask)
        .map(|(&i, &m)| if m == 1 { i } else { IGNORE })
        .collect();
    (ids.iter().map(|&i| i as u32).collect(), labels)
}

/// On SmolLM2's real tokenizer, whet's rows equal the ones trl 1.16's own `DPOTrainer` prepares
/// and collates (`tests/fixtures/dpo/smollm2-tokenization.json`, from
/// `scripts/fixtures/make_dpo_tokenization_fixture.py`): ids and learnt tokens of the chosen and rejected
/// rows for 20 pairs at BPE boundaries (prompts ending in spaces, answers merging with the
/// prompt's last token, whitespace, non-ASCII, digits, special tokens, EOS text, implicit
/// prompts), `keep_start` truncation at max_length 48, and exactly trl's dropped pairs.
#[test]
fn smollm2_pairs_are_tokenized_as_trl_dpo_trainer_does() {
    let text = std::fs::read_to_string(fixtures().join("dpo/smollm2-tokenization.json")).unwrap();
    let fixture: serde_json::Value = serde_json::from_str(&text).unwrap();
    let max_length = fixture["max_length"].as_u64().unwrap() as usize;
    let tok = smollm2();
    let cases = fixture["pairs"].as_array().unwrap();
    assert_eq!(cases.len(), 20);
    let (mut dropped, mut truncated) = (0, 0);
    for (i, case) in cases.iter().enumerate() {
        let s = |k: &str| case[k].as_str().unwrap().to_string();
        let pair = PreferencePair {
            prompt: s("prompt"),
            chosen: s("chosen"),
            rejected: s("rejected"),
            origin: format!("pair {i}"),
            messages: None,
        };
        assert_eq!(
            case["kind"] == "implicit",
            pair.prompt.is_empty(),
            "pair {i}"
        );
        let got = encode_dpo_pair(&tok, &pair, max_length, Side::Right)
            .unwrap_or_else(|e| panic!("pair {i}: {e}"));
        if case["dropped"].as_bool().unwrap() {
            assert!(got.is_none(), "pair {i}: trl drops it, whet keeps it");
            dropped += 1;
            continue;
        }
        let got = got.unwrap_or_else(|| panic!("pair {i}: trl keeps it, whet drops it"));
        for (side, row) in [("chosen", &got.chosen), ("rejected", &got.rejected)] {
            let (ids, labels) = trl_row(&case[format!("{side}_row")]);
            let context = || {
                format!(
                    "pair {i} {side} ({:?} + {:?}):\n whet {:?} / {:?}\n trl  {ids:?} / {labels:?}",
                    pair.prompt, case[side], row.ids, row.labels
                )
            };
            assert_eq!(row.ids, ids, "{}", context());
            assert_eq!(row.labels, labels, "{}", context());
            assert_eq!(row.position_ids, (0..ids.len() as u32).collect::<Vec<_>>());
            truncated += usize::from(ids.len() == max_length);
        }
    }
    // The fixture covers both ends of max_length.
    assert_eq!(dropped, 1);
    assert!(truncated >= 2, "{truncated}");
}

/// whet's implicit prompt is `trl.data_utils.extract_prompt`'s (the same fixture's
/// `extract_prompt` cases: a space before the first difference goes to the answers, one answer
/// a prefix of the other, non-ASCII, no common start), except where trl's index turns -1:
/// texts that differ from the first character with `chosen` ending in a space, where whet keeps
/// the prompt empty instead of taking all of `chosen` but its last character.
#[test]
fn implicit_prompts_are_split_as_trl_extract_prompt_does() {
    let text = std::fs::read_to_string(fixtures().join("dpo/smollm2-tokenization.json")).unwrap();
    let fixture: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut departures = 0;
    for case in fixture["extract_prompt"].as_array().unwrap() {
        let s = |v: &serde_json::Value| v.as_str().unwrap().to_string();
        let (chosen, rejected) = (s(&case["chosen"]), s(&case["rejected"]));
        let trl = &case["trl"];
        let want = (s(&trl["prompt"]), s(&trl["chosen"]), s(&trl["rejected"]));
        let got = whet_train::dpo::split_implicit_prompt(&chosen, &rejected);
        if chosen.chars().next() != rejected.chars().next() && chosen.ends_with(' ') {
            assert_ne!(
                got, want,
                "{chosen:?} / {rejected:?}: no longer a departure"
            );
            assert_eq!(got, (String::new(), chosen.clone(), rejected.clone()));
            departures += 1;
        } else {
            assert_eq!(got, want, "{chosen:?} / {rejected:?}");
        }
    }
    assert_eq!(departures, 1);
}

/// Conversational pairs (and plain ones for the reward model) on SmolLM2's real tokenizer and
/// chat template, read from JSONL as a user gives them, tokenize to exactly the ids trl 1.16's
/// own `DPOTrainer` and `RewardTrainer` prepare (`tests/fixtures/dpo/smollm2-chat-tokenization.json`,
/// from `scripts/fixtures/make_chat_preference_tokenization_fixture.py`): DPO's implicit
/// prompt cut at the first differing turn (answers sharing their start stay whole), no EOS
/// after a conversation, the prompt rendered with the generation prompt; the reward model's
/// whole conversations, and plain texts with the EOS text appended.
#[test]
fn chat_pairs_are_tokenized_as_trl_dpo_and_reward_trainers_do() {
    let text =
        std::fs::read_to_string(fixtures().join("dpo/smollm2-chat-tokenization.json")).unwrap();
    let fixture: serde_json::Value = serde_json::from_str(&text).unwrap();
    let tok = smollm2();
    let dir = tempfile::tempdir().unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let cases = fixture["cases"].as_array().unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for (i, case) in cases.iter().enumerate() {
        let path = dir.path().join(format!("case-{i}.jsonl"));
        std::fs::write(&path, format!("{}\n", case["row"])).unwrap();
        let pairs = whet_data::read_pairs(&path, whet_data::Encoding::Utf8).unwrap();
        let pairs = whet_data::preference::render_chats(pairs, &tok).unwrap();
        let pair = &pairs[0];
        let (trainer, kind) = (
            case["trainer"].as_str().unwrap(),
            case["kind"].as_str().unwrap(),
        );
        seen.insert(format!("{trainer} {kind}"));
        let context = format!("case {i} ({trainer}, {kind}): {}", case["row"]);
        if trainer == "dpo" {
            let got = encode_dpo_pair(&tok, pair, 512, Side::Right)
                .unwrap_or_else(|e| panic!("{context}: {e}"))
                .unwrap();
            for (side, row) in [("chosen", &got.chosen), ("rejected", &got.rejected)] {
                let (want_ids, want_labels) = trl_row(&case[format!("{side}_row")]);
                assert_eq!(row.ids, want_ids, "{context} {side}");
                assert_eq!(row.labels, want_labels, "{context} {side}");
            }
        } else {
            let (c, r) = whet_train::reward::pair_ids(&tok, pair).unwrap();
            assert_eq!(c, ids(&case["chosen_ids"]), "{context} chosen");
            assert_eq!(r, ids(&case["rejected_ids"]), "{context} rejected");
        }
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        [
            "dpo explicit",
            "dpo implicit",
            "reward explicit",
            "reward implicit",
            "reward plain",
            "reward plain-implicit"
        ]
    );
}
