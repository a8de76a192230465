//! The causal-LM objective against `transformers` (`tests/fixtures/tiny-*`, from
//! `scripts/fixtures/make_fixtures.py`: `model(input_ids, attention_mask, labels=labels).loss` and its
//! gradients), and packed rows against the same documents in rows of their own.

use crate::common;

use burn::tensor::{Device, Tensor};
use common::fixtures;
use safetensors::SafeTensors;
use whet_data::{IGNORE, LmExample, pack};
use whet_models::{Checkpoint, VisitParams, Visitor};
use whet_train::Objective;
use whet_train::causal_lm::{LanguageModelling, evaluate_lm};

fn values<T: Copy>(st: &SafeTensors, k: &str, f: fn(&[u8]) -> T, width: usize) -> Vec<T> {
    st.tensor(k)
        .unwrap_or_else(|_| panic!("no {k}"))
        .data()
        .chunks_exact(width)
        .map(f)
        .collect()
}

fn f32s(st: &SafeTensors, k: &str) -> Vec<f32> {
    values(st, k, |b| f32::from_le_bytes(b.try_into().unwrap()), 4)
}

fn i64s(st: &SafeTensors, k: &str) -> Vec<i64> {
    values(st, k, |b| i64::from_le_bytes(b.try_into().unwrap()), 8)
}

/// The fixture's right-padded rows as unpadded examples with the fixture's labels.
fn fixture_examples(st: &SafeTensors) -> Vec<LmExample> {
    let (ids, mask, labels) = (
        i64s(st, "input_ids_right"),
        i64s(st, "attention_mask_right"),
        i64s(st, "labels"),
    );
    let t = st.tensor("input_ids_right").unwrap().shape()[1];
    (0..ids.len() / t)
        .map(|r| {
            let n = mask[r * t..(r + 1) * t].iter().filter(|&&m| m == 1).count();
            LmExample {
                ids: ids[r * t..r * t + n].iter().map(|&i| i as u32).collect(),
                labels: labels[r * t..r * t + n].to_vec(),
                position_ids: (0..n as u32).collect(),
                document_ids: vec![0; n],
                origin: format!("row {r}"),
            }
        })
        .collect()
}

fn rel(a: f32, b: f32) -> f32 {
    (a - b).abs() / b.abs().max(1e-6)
}

/// Evaluation loss (mean over learnt tokens) equals `transformers`' causal-LM loss.
#[test]
fn evaluation_loss_matches_transformers() {
    for dir in ["tiny-gpt2", "tiny-llama"] {
        let root = fixtures().join(dir);
        let bytes = std::fs::read(root.join("fixture.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let device = Device::flex();
        let model = Checkpoint::open(&root)
            .unwrap()
            .load_causal_lm(&device)
            .unwrap();
        for padding_free in [false, true] {
            let (loss, _) =
                evaluate_lm(&model, &fixture_examples(&st), 2, 0, padding_free, &device);
            let want = f32s(&st, "loss")[0];
            assert!(
                rel(loss as f32, want) < 1e-5,
                "{dir} (padding-free {padding_free}): {loss} vs {want}"
            );
        }
        let (_, units) = evaluate_lm(&model, &fixture_examples(&st), 2, 0, true, &device);
        let learnt: usize = fixture_examples(&st)
            .iter()
            .map(|e| e.labels.iter().skip(1).filter(|&&l| l != IGNORE).count())
            .sum();
        assert_eq!(units, learnt, "{dir}");
    }
}

/// The training loss and its gradients equal `transformers`' (tiny-llama has no dropout, so
/// training mode computes what the fixture's forward did).
#[test]
fn training_loss_and_gradients_match_transformers() {
    for padding_free in [false, true] {
        check_training_loss_and_gradients(padding_free);
    }
}

fn check_training_loss_and_gradients(padding_free: bool) {
    let root = fixtures().join("tiny-llama");
    let bytes = std::fs::read(root.join("fixture.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let device = Device::flex().autodiff();
    let mut model = Checkpoint::open(&root)
        .unwrap()
        .load_causal_lm(&device)
        .unwrap();
    whet_peft::set_trainable(&mut model, &|_| true);
    let objective = LanguageModelling {
        pad_id: 0,
        soft_prompt: 0,
        padding_free,
        sampler: None,
    };
    let examples = fixture_examples(&st);
    let batch = objective.collate(&examples.iter().collect::<Vec<_>>());
    assert!(
        batch.tokens < batch.batch * batch.len,
        "the fixture's rows are padded"
    );
    let units = objective.counts(&batch).units;
    let loss = objective
        .summed_loss(&model, &batch, &device)
        .unwrap()
        .div_scalar(units as f64);
    let want = f32s(&st, "loss")[0];
    let got = loss.clone().into_scalar::<f32>();
    assert!(
        rel(got, want) < 1e-5,
        "padding-free {padding_free}: {got} vs {want}"
    );
    let grads = loss.backward();

    // Every parameter's gradient in PyTorch's layout: linear weights (and the LM head) are held
    // as [in, out], so theirs are transposed back to [out, in].
    struct Grads<'a>(&'a burn::tensor::Gradients, Vec<(String, Vec<f32>)>);
    impl Visitor for Grads<'_> {
        fn vector(&mut self, name: &str, p: &mut burn::module::Param<Tensor<1>>) {
            if let Some(g) = p.val().grad(self.0) {
                self.1
                    .push((name.into(), g.into_data().try_to_vec::<f32>().unwrap()));
            }
        }
        fn matrix(
            &mut self,
            name: &str,
            p: &mut burn::module::Param<Tensor<2>>,
            layout: whet_models::weights::Layout,
        ) {
            if let Some(g) = p.val().grad(self.0) {
                let g = match layout {
                    whet_models::weights::Layout::Same => g,
                    whet_models::weights::Layout::Transposed => g.transpose(),
                };
                self.1
                    .push((name.into(), g.into_data().try_to_vec::<f32>().unwrap()));
            }
        }
    }
    let mut v = Grads(&grads, vec![]);
    model.visit_params("", &mut v);
    // Every parameter transformers has a gradient for, linear layers and lm_head included.
    let mut checked: Vec<String> = v.1.iter().map(|(n, _)| n.clone()).collect();
    checked.sort();
    let mut reference: Vec<String> = st
        .names()
        .into_iter()
        .filter_map(|n| n.strip_prefix("grad.").map(String::from))
        .collect();
    reference.sort();
    assert_eq!(checked, reference);
    assert!(checked.iter().any(|n| n == "lm_head.weight"));
    assert!(checked.iter().any(|n| n.ends_with("q_proj.weight")));
    for (name, got) in &v.1 {
        let want = f32s(&st, &format!("grad.{name}"));
        let scale = want.iter().map(|x| x.abs()).fold(0.0, f32::max).max(1e-6);
        let d = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(
            d / scale < 1e-4,
            "{name} (padding-free {padding_free}): relative error {}",
            d / scale
        );
    }
}

/// Documents packed into one row give the loss they give in rows of their own: attention stays
/// inside each document and positions restart (GPT-2's learnt positions and LLaMA's rotary
/// ones both depend on it).
#[test]
fn packed_rows_compute_what_separate_rows_do() {
    let docs: Vec<LmExample> = [
        vec![5u32, 9, 23, 40, 7],
        vec![61, 3, 18, 77],
        vec![11, 12, 13],
    ]
    .into_iter()
    .enumerate()
    .map(|(i, ids)| LmExample {
        labels: ids.iter().map(|&t| t as i64).collect(),
        position_ids: (0..ids.len() as u32).collect(),
        document_ids: vec![0; ids.len()],
        ids,
        origin: format!("doc {i}"),
    })
    .collect();
    let packed = pack(&docs, 16);
    assert_eq!(packed.len(), 1, "three short documents fit one row");
    for dir in ["tiny-gpt2", "tiny-llama"] {
        let device = Device::flex();
        let model = Checkpoint::open(fixtures().join(dir))
            .unwrap()
            .load_causal_lm(&device)
            .unwrap();
        let (separate, n1) = evaluate_lm(&model, &docs, 8, 0, true, &device);
        let (together, n2) = evaluate_lm(&model, &packed, 8, 0, true, &device);
        assert_eq!(n1, n2, "{dir}: the same tokens are learnt");
        assert!(
            rel(together as f32, separate as f32) < 1e-5,
            "{dir}: packed {together} vs separate {separate}"
        );
        // Without the document mask the packed row would see the previous documents.
        let mut leaky = packed.clone();
        leaky[0].document_ids.fill(0);
        leaky[0].document_ids[0] = 1; // keeps the batch "packed" but puts all later tokens together
        let (mixed, _) = evaluate_lm(&model, &leaky, 8, 0, true, &device);
        assert!(
            rel(mixed as f32, separate as f32) > 1e-4,
            "{dir}: the document mask must matter ({mixed} vs {separate})"
        );
    }
}

/// With peft-saved prefix and prompt tuning adapters, the objective's loss (mean over learnt
/// tokens) equals peft's: a soft prompt moves every position and its last virtual position
/// learns each row's first token, as peft's labels prefixed with -100 make it.
#[test]
fn loss_with_prefix_and_prompt_adapters_matches_peft() {
    for (case, base) in [
        ("llama-prefix-lm", "tiny-llama"),
        ("gpt2-prompt-lm", "tiny-gpt2"),
    ] {
        let root = fixtures().join(base);
        let bytes = std::fs::read(root.join("fixture.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let peft = fixtures().join("peft").join(case);
        let want_bytes = std::fs::read(peft.join("expected.safetensors")).unwrap();
        let want = f32s(&SafeTensors::deserialize(&want_bytes).unwrap(), "loss")[0];
        let device = Device::flex();
        let mut model = Checkpoint::open(&root)
            .unwrap()
            .load_causal_lm(&device)
            .unwrap();
        whet_peft::load_adapter(&mut model, &peft, &device).unwrap();
        let examples = fixture_examples(&st);
        let (loss, units) = evaluate_lm(&model, &examples, 2, 0, true, &device);
        assert!(rel(loss as f32, want) < 1e-5, "{case}: {loss} vs {want}");
        let soft = whet_models::CausalLm::virtual_positions(&model) > 0;
        let learnt: usize = examples
            .iter()
            .map(|e| {
                let skip = if soft { 0 } else { 1 };
                e.labels.iter().skip(skip).filter(|&&l| l != IGNORE).count()
            })
            .sum();
        assert_eq!(units, learnt, "{case}");
    }
}

/// The forgetting report's ids from a prefix of its text equal the whole text's first ids:
/// lines with runs of blank lines and spaces (which byte-level BPE merges across a cut), and
/// multi-byte characters at any byte offset, for counts that take one prefix, doubled ones,
/// and the whole text.
#[test]
fn encode_prefix_equals_the_whole_texts_first_ids() {
    let tokenizer =
        whet_text::TextTokenizer::from_folder(&fixtures().join("families/llama-causal")).unwrap();
    let text: String = (0..2000)
        .map(|i| {
            let gap = ["\n", "\n\n", "\n  \n\n", " \n"][i % 4];
            format!("line {i}: héllo wörld — ✓ {}{gap}", "ab ".repeat(i % 7))
        })
        .collect();
    let whole = tokenizer.encode(&text, false).unwrap();
    assert!(text.len() > 40_000 && whole.len() > 20_000);
    for tokens in [1, 37, 511, 4096, 9000, whole.len(), whole.len() + 5] {
        let ids = whet_train::causal_lm::encode_prefix(&tokenizer, &text, tokens).unwrap();
        assert_eq!(ids, whole[..tokens.min(whole.len())], "{tokens} tokens");
    }
}
