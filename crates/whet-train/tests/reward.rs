//! The reward-model objective against trl's `RewardTrainer.compute_loss`
//! (`tests/fixtures/tiny-bert-reward/`, from `scripts/fixtures/make_reward_fixture.py`): loss, rewards
//! and gradients of a one-output BERT on three fixed pairs, and the pairwise metrics.

use crate::common;

use burn::tensor::Device;
use common::fixtures;
use safetensors::SafeTensors;
use whet_models::{Checkpoint, Classifier, ExportParams};
use whet_train::Objective;
use whet_train::reward::{PairwiseReward, encode_pair};

fn values<T: Copy>(
    st: &SafeTensors,
    k: &str,
    f: fn(&[u8]) -> T,
    width: usize,
) -> (Vec<T>, Vec<usize>) {
    let t = st.tensor(k).unwrap_or_else(|_| panic!("no {k}"));
    (
        t.data().chunks_exact(width).map(f).collect(),
        t.shape().to_vec(),
    )
}

fn f32s(st: &SafeTensors, k: &str) -> Vec<f32> {
    values(st, k, |b| f32::from_le_bytes(b.try_into().unwrap()), 4).0
}

/// The fixture's six rows (chosen 0-2, rejected 3-5) as three unpadded pairs.
fn pairs(st: &SafeTensors) -> Vec<whet_train::reward::EncodedPair> {
    let (ids, shape) = values(
        st,
        "input_ids",
        |b| i64::from_le_bytes(b.try_into().unwrap()),
        8,
    );
    let (mask, _) = values(
        st,
        "attention_mask",
        |b| i64::from_le_bytes(b.try_into().unwrap()),
        8,
    );
    let t = shape[1];
    let row = |r: usize| {
        let n = mask[r * t..(r + 1) * t].iter().filter(|&&m| m == 1).count();
        let ids: Vec<u32> = ids[r * t..r * t + n].iter().map(|&i| i as u32).collect();
        (ids, vec![0; n])
    };
    (0..3).map(|i| encode_pair(row(i), row(i + 3))).collect()
}

fn grad(model: &Classifier, grads: &burn::tensor::Gradients, name: &str) -> Vec<f32> {
    let p = model
        .named_params()
        .into_iter()
        .find(|p| p.name == name)
        .unwrap();
    p.checkpoint_grad(grads).unwrap().1
}

fn rel(a: &[f32], b: &[f32]) -> f32 {
    let d = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    d / b.iter().map(|x| x.abs()).fold(1e-6, f32::max)
}

/// Padded and padding-free, the loss, gradients and metrics are trl's.
#[test]
fn pairwise_loss_and_gradients_match_trl() {
    for padding_free in [false, true] {
        check_pairwise(padding_free);
    }
}

fn check_pairwise(padding_free: bool) {
    let root = fixtures().join("tiny-bert-reward");
    let bytes = std::fs::read(root.join("pairs.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let device = Device::flex().autodiff();
    let (mut model, fresh) = Checkpoint::open(&root)
        .unwrap()
        .load_classifier(&device)
        .unwrap();
    assert!(fresh.is_empty(), "the fixture holds its head: {fresh:?}");
    whet_peft::set_trainable(&mut model, &|_| true);
    let objective = PairwiseReward {
        pad_id: 0,
        with_types: true,
        padding_free,
    };
    let data = pairs(&st);
    let batch = objective.collate(&data.iter().collect::<Vec<_>>());
    let lengths: std::collections::BTreeSet<usize> = data
        .iter()
        .flat_map(|p| [p.chosen.ids.len(), p.rejected.ids.len()])
        .collect();
    assert!(
        lengths.len() > 1,
        "rows of several lengths: the batch is padded"
    );
    let units = objective.counts(&batch).units;
    assert_eq!(units, 3, "the loss averages over pairs");
    let loss = objective
        .summed_loss(&model, &batch, &device)
        .unwrap()
        .div_scalar(units as f64);
    let got = loss.clone().into_scalar::<f32>();
    let want = f32s(&st, "loss")[0];
    assert!(
        (got - want).abs() < 1e-5,
        "padding-free {padding_free}: {got} vs trl {want}"
    );
    let grads = loss.backward();
    for (name, key) in [
        ("classifier.weight", "grad.classifier.weight"),
        (
            "bert.encoder.layer.0.attention.self.query.weight",
            "grad.query.weight",
        ),
    ] {
        let r = rel(&grad(&model, &grads, name), &f32s(&st, key));
        assert!(r < 1e-4, "{name}: relative gradient difference {r}");
    }

    // Evaluation: trl's metrics from the same rewards.
    let rewards = f32s(&st, "rewards");
    let eval = objective.evaluate(&model, &data, 2, &device).unwrap();
    let right = (0..3).filter(|&i| rewards[i] > rewards[i + 3]).count() as f64 / 3.0;
    assert_eq!(eval.metrics["accuracy"], right);
    let margin = (0..3)
        .map(|i| (rewards[i] - rewards[i + 3]) as f64)
        .sum::<f64>()
        / 3.0;
    assert!((eval.metrics["rewards/margins"] - margin).abs() < 1e-5);
    assert!(
        (eval.loss - want as f64).abs() < 1e-5,
        "eval loss {} vs {want}",
        eval.loss
    );
}
