//! The DPO loss against trl's (`tests/fixtures/dpo/losses.safetensors`, from
//! `scripts/make_dpo_fixture.py`, which runs `DPOTrainer._compute_loss` on fixed log-probs):
//! loss, gradient with respect to the per-token log-probabilities, and the logged rewards, for
//! the sigmoid and IPO losses.

mod common;

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
