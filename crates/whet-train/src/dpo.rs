//! Direct preference optimisation (Rafailov et al. 2023, <https://arxiv.org/abs/2305.18290>)
//! as `trl` 1.16's `DPOTrainer` computes it: sequence log-probabilities of the completion
//! (summed over its tokens), log-ratios against a frozen reference, and the sigmoid loss
//! `-log sigmoid(beta (chosen_logratio - rejected_logratio))` or IPO's
//! `((chosen_logratio / |chosen| - rejected_logratio / |rejected|) - 1 / (2 beta))^2` (trl
//! divides IPO's log-ratios by the completion lengths). Implicit rewards are
//! `beta * logratio`, logged as trl logs them.

use std::collections::BTreeMap;

use burn::tensor::Tensor;
use burn::tensor::activation::log_sigmoid;
use serde::{Deserialize, Serialize};

/// Which DPO loss (`loss_type` of `DPOConfig`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DpoLossType {
    /// The DPO paper's loss.
    #[default]
    Sigmoid,
    /// Identity preference optimisation (Azar et al. 2023), length-normalised as trl does.
    Ipo,
}

/// Sequence log-probabilities of a batch: `[2B]`, chosen rows first.
#[derive(Debug, Clone)]
pub struct PairLogps {
    /// `[2B]` summed completion log-probabilities.
    pub logps: Tensor<1>,
    /// Completion tokens of each row (IPO's normalisation; at least 1).
    pub lengths: Vec<usize>,
}

/// The loss of a batch and the implicit rewards.
#[derive(Debug, Clone)]
pub struct DpoOutput {
    /// `[1]`, the mean over pairs.
    pub loss: Tensor<1>,
    /// `[B]`: `beta * (policy - reference)` of the chosen rows.
    pub chosen_rewards: Tensor<1>,
    /// `[B]`, of the rejected rows.
    pub rejected_rewards: Tensor<1>,
}

/// Sums per-token log-probabilities over the completion.
///
/// # Shapes
/// - per_token `[N, T]`, mask `[N, T]` (1 on completion tokens)
/// - output `[N]`
pub fn sequence_logps(per_token: Tensor<2>, mask: Tensor<2>) -> Tensor<1> {
    let [n, _] = per_token.dims();
    (per_token * mask).sum_dim(1).reshape([n])
}

/// The DPO loss of `policy` against `reference` log-probabilities (same rows and lengths).
pub fn dpo_loss(
    policy: &PairLogps,
    reference: Tensor<1>,
    beta: f64,
    kind: DpoLossType,
) -> DpoOutput {
    let n = policy.logps.dims()[0];
    let b = n / 2;
    // (2B) -> (B) chosen, (B) rejected
    let ratios = policy.logps.clone() - reference.detach();
    let chosen = ratios.clone().slice(0..b);
    let rejected = ratios.slice(b..n);
    let per_pair = match kind {
        DpoLossType::Sigmoid => {
            log_sigmoid((chosen.clone() - rejected.clone()).mul_scalar(beta)).neg()
        }
        DpoLossType::Ipo => {
            let device = chosen.device();
            let inv = |lens: &[usize]| {
                let v: Vec<f32> = lens.iter().map(|&l| 1.0 / l.max(1) as f32).collect();
                Tensor::<1>::from_data(burn::tensor::TensorData::new(v, [lens.len()]), &device)
            };
            let (lc, lr) = policy.lengths.split_at(b);
            let delta = chosen.clone() * inv(lc) - rejected.clone() * inv(lr);
            delta.sub_scalar(1.0 / (2.0 * beta)).powi_scalar(2)
        }
    };
    DpoOutput {
        loss: per_pair.mean(),
        chosen_rewards: chosen.mul_scalar(beta).detach(),
        rejected_rewards: rejected.mul_scalar(beta).detach(),
    }
}

impl DpoOutput {
    /// trl's logged reward metrics: means of the chosen and rejected rewards, of the margin,
    /// and the share of pairs whose chosen reward is higher.
    pub fn metrics(&self) -> BTreeMap<String, f64> {
        let v = |t: &Tensor<1>| -> Vec<f32> {
            t.clone()
                .into_data()
                .convert::<f32>()
                .try_to_vec::<f32>()
                .unwrap_or_default()
        };
        let (c, r) = (v(&self.chosen_rewards), v(&self.rejected_rewards));
        let n = c.len().max(1) as f64;
        let mean = |x: &[f32]| x.iter().map(|&a| a as f64).sum::<f64>() / n;
        let right = c.iter().zip(&r).filter(|(a, b)| a > b).count() as f64 / n;
        BTreeMap::from([
            ("rewards/chosen".into(), mean(&c)),
            ("rewards/rejected".into(), mean(&r)),
            ("rewards/margins".into(), mean(&c) - mean(&r)),
            ("rewards/accuracies".into(), right),
        ])
    }
}
