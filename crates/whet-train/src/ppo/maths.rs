//! The arithmetic of PPO (trl's formulas), on flat per-token arrays: `offsets[r]..offsets[r + 1]`
//! is row r. Pure functions of their inputs; `tests/ppo.rs` checks them against trl 0.19.

use burn::tensor::{Tensor, TensorData};

/// GAE (Schulman et al. 2016) over each row's tokens: `delta_t = r_t + gamma V_{t+1} - V_t`
/// (`V` after the last token is 0), `A_t = delta_t + gamma lam A_{t+1}`; returns `A + V`.
pub fn gae(
    rewards: &[f32],
    values: &[f32],
    offsets: &[usize],
    gamma: f64,
    lam: f64,
) -> (Vec<f32>, Vec<f32>) {
    let mut adv = vec![0f32; rewards.len()];
    for w in offsets.windows(2) {
        let (start, end) = (w[0], w[1]);
        let mut last = 0f64;
        for t in (start..end).rev() {
            let next = if t + 1 < end {
                values[t + 1] as f64
            } else {
                0.0
            };
            let delta = rewards[t] as f64 + gamma * next - values[t] as f64;
            last = delta + gamma * lam * last;
            adv[t] = last as f32;
        }
    }
    let returns = adv.iter().zip(values).map(|(a, v)| a + v).collect();
    (adv, returns)
}

/// `(x - mean) / sqrt(var + 1e-8)` with the unbiased variance (trl's `masked_whiten`);
/// `shift_mean = false` adds the mean back.
pub fn whiten(x: &[f32], shift_mean: bool) -> Vec<f32> {
    let n = x.len() as f64;
    if n < 2.0 {
        return x.to_vec();
    }
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0);
    let scale = 1.0 / (var + 1e-8).sqrt();
    x.iter()
        .map(|&v| {
            let w = (v as f64 - mean) * scale;
            (if shift_mean { w } else { w + mean }) as f32
        })
        .collect()
}

/// Per-token rewards: `-kl_coef * (logp - ref)`, plus the row's score on its last token.
pub fn token_rewards(
    logps: &[f32],
    ref_logps: &[f32],
    scores: &[f32],
    offsets: &[usize],
    kl_coef: f64,
) -> Vec<f32> {
    let mut r: Vec<f32> = logps
        .iter()
        .zip(ref_logps)
        .map(|(l, q)| (-kl_coef * (*l as f64 - *q as f64)) as f32)
        .collect();
    for (row, w) in offsets.windows(2).enumerate() {
        if w[1] > w[0] {
            r[w[1] - 1] += scores[row];
        }
    }
    r
}

/// The clipped losses of a minibatch, summed over its tokens (the caller divides by the
/// minibatch's token count), and their statistics.
pub struct PpoLosses {
    /// `[1]`: `Σ max(-A r, -A clip(r))`.
    pub policy: Tensor<1>,
    /// `[1]`: `Σ 0.5 max((V - R)^2, (V_clipped - R)^2)`.
    pub value: Tensor<1>,
    /// Tokens whose policy term was clipped, whose value term was clipped.
    pub policy_clipped: usize,
    pub value_clipped: usize,
    /// `Σ (log r)^2 / 2` and `Σ r`, for approxkl and the mean ratio.
    pub half_sq_log_ratio: f64,
    pub ratio_sum: f64,
}

/// PPO's clipped objectives (trl's formulas) for per-token `new_logps` and `new_values`
/// `[N]`, against the rollout's `old_logps`, `old_values`, `advantages` and `returns`.
#[allow(clippy::too_many_arguments)]
pub fn ppo_losses(
    new_logps: Tensor<1>,
    new_values: Tensor<1>,
    old_logps: &[f32],
    old_values: &[f32],
    advantages: &[f32],
    returns: &[f32],
    cliprange: f64,
    cliprange_value: f64,
) -> PpoLosses {
    let device = new_logps.device();
    let n = old_logps.len();
    let c = |v: &[f32]| Tensor::<1>::from_data(TensorData::new(v.to_vec(), [n]), &device);
    let (old_l, old_v, adv, ret) = (c(old_logps), c(old_values), c(advantages), c(returns));
    let log_ratio = new_logps - old_l;
    let ratio = log_ratio.clone().exp();
    let pg1 = adv.clone().neg() * ratio.clone();
    let pg2 = adv.neg() * ratio.clone().clamp(1.0 - cliprange, 1.0 + cliprange);
    let policy_clipped = count(pg2.clone().greater(pg1.clone()));
    let policy = pg1.max_pair(pg2).sum();
    let clipped =
        old_v.clone() + (new_values.clone() - old_v).clamp(-cliprange_value, cliprange_value);
    let vf1 = (new_values - ret.clone()).powi_scalar(2);
    let vf2 = (clipped - ret).powi_scalar(2);
    let value_clipped = count(vf2.clone().greater(vf1.clone()));
    let value = vf1.max_pair(vf2).sum().mul_scalar(0.5);
    let lr: Vec<f32> = values(log_ratio.detach());
    PpoLosses {
        policy,
        value,
        policy_clipped,
        value_clipped,
        half_sq_log_ratio: lr.iter().map(|&x| 0.5 * (x as f64).powi(2)).sum(),
        ratio_sum: lr.iter().map(|&x| (x as f64).exp()).sum(),
    }
}

fn count(mask: Tensor<1, burn::tensor::Bool>) -> usize {
    mask.int().sum().into_scalar::<i64>() as usize
}

/// A tensor's values, as `f32`.
pub(super) fn values(t: Tensor<1>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap_or_default()
}
