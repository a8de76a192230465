//! Rollouts: responses sampled from the policy, scored by the reward model, with the old
//! log-probabilities, values, reference log-probabilities, per-token rewards, advantages and
//! returns PPO's updates train on.

use burn::module::Module;
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use whet_data::{IGNORE, LmExample};
use whet_infer::{GenerationConfig, Sampling, generate_batch};
use whet_models::{CausalLm, CausalModel, Mode};

use super::maths::{gae, token_rewards, values, whiten};
use super::{PolicyWithValue, Ppo, Prompt};
use crate::causal_lm::LanguageModelling;
use crate::error::Result;
use crate::trainer::Objective;

/// Per-token statistics of the response tokens of some rows, flat in row order.
pub(super) struct TokenStats {
    /// `[N]` log-probabilities of the tempered distribution.
    pub logps: Tensor<1>,
    /// `[N, H]` last hidden states at those positions (what a value head reads).
    pub hidden: Tensor<2>,
    /// Entropy of each token's tempered distribution.
    pub entropy: Vec<f32>,
}

pub(super) fn token_stats(
    policy: &CausalModel,
    lm: &LanguageModelling,
    rows: &[&LmExample],
    temperature: f64,
    device: &Device,
) -> TokenStats {
    let b = lm.collate(rows);
    let hidden = policy.forward_hidden(lm.input(&b, device), None, Mode::Eval);
    let [r, t, h] = hidden.dims();
    let (predicting, targets) = b.after_soft_prompt(policy.virtual_positions());
    let n = predicting.len();
    let index = Tensor::<1, Int>::from_data(TensorData::new(predicting, [n]), device);
    // (B, T, H) -> (B*T, H) -> (N, H)
    let picked = hidden.reshape([r * t, h]).select(0, index);
    // (1, N, H) -> (1, N, V) -> (N, V)
    let logits = policy.lm_logits(picked.clone().reshape([1, n, h]));
    let v = logits.dims()[2];
    let logp_all = log_softmax(logits.reshape([n, v]).div_scalar(temperature), 1);
    let target = Tensor::<2, Int>::from_data(TensorData::new(targets, [n, 1]), device);
    let logps = logp_all.clone().gather(1, target).reshape([n]);
    let detached = logp_all.detach();
    let entropy = values(
        (detached.clone().exp() * detached)
            .sum_dim(1)
            .neg()
            .reshape([n]),
    );
    TokenStats {
        logps,
        hidden: picked,
        entropy,
    }
}

/// A batch of sampled responses with everything PPO needs of them.
pub struct Rollout {
    /// Prompt + response, the response tokens learnt.
    pub rows: Vec<LmExample>,
    /// Row `r`'s tokens are `offsets[r]..offsets[r + 1]` of the flat arrays.
    pub offsets: Vec<usize>,
    pub logps: Vec<f32>,
    pub ref_logps: Vec<f32>,
    pub values: Vec<f32>,
    pub advantages: Vec<f32>,
    pub returns: Vec<f32>,
    pub scores: Vec<f32>,
    /// Entropy of the sampling distribution, per token.
    pub entropy: Vec<f32>,
    /// Responses that ended with EOS.
    pub ended: usize,
    /// The response texts (for the log).
    pub responses: Vec<String>,
}

impl Rollout {
    /// The old log-probabilities, values, advantages and returns of `rows`, flat.
    pub(super) fn slice(&self, rows: &[usize]) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
        let mut out = (vec![], vec![], vec![], vec![]);
        for &r in rows {
            let span = self.offsets[r]..self.offsets[r + 1];
            out.0.extend_from_slice(&self.logps[span.clone()]);
            out.1.extend_from_slice(&self.values[span.clone()]);
            out.2.extend_from_slice(&self.advantages[span.clone()]);
            out.3.extend_from_slice(&self.returns[span]);
        }
        out
    }

    /// Means per response of the summed KL (`log p - log p_ref`), of the summed `-log p`, and of
    /// the score.
    pub fn summary(&self) -> (f64, f64, f64) {
        let rows = self.rows.len().max(1) as f64;
        let kl: f64 = self
            .logps
            .iter()
            .zip(&self.ref_logps)
            .map(|(a, b)| (*a - *b) as f64)
            .sum();
        let nll: f64 = self.logps.iter().map(|&l| -(l as f64)).sum();
        let score: f64 = self.scores.iter().map(|&s| s as f64).sum();
        (kl / rows, nll / rows, score / rows)
    }
}

impl Ppo {
    /// Samples a response to each of `prompts` with `model`'s policy (`micro` prompts per
    /// batch, sampling seeded with `seed`), scores them, and takes the old log-probabilities,
    /// values, the reference's log-probabilities, the rewards, advantages and returns. The
    /// reference runs on the same rows.
    pub(super) fn rollout(
        &self,
        model: &PolicyWithValue,
        prompts: &[&Prompt],
        seed: u64,
        micro: usize,
        device: &Device,
    ) -> Result<Rollout> {
        let cfg = &self.config;
        let plain = device.clone().without_autodiff();
        let model = model.valid();
        let generation = GenerationConfig {
            max_new_tokens: cfg.response_length,
            sampling: Sampling::Sample {
                temperature: cfg.temperature as f32,
                top_k: None,
                top_p: 1.0,
                seed,
            },
            eos_token_ids: self.eos.clone(),
            repetition_penalty: 1.0,
        };
        let mut rows = Vec::with_capacity(prompts.len());
        let mut responses = Vec::with_capacity(prompts.len());
        let mut texts = Vec::with_capacity(prompts.len());
        let mut ended = 0;
        let mut missing_eos = Vec::with_capacity(prompts.len());
        for chunk in prompts.chunks(micro.max(1)) {
            let batch: Vec<Vec<u32>> = chunk.iter().map(|p| p.ids.clone()).collect();
            let outs = generate_batch(&model.policy, &batch, &generation, self.pad_id, &plain)?;
            for (prompt, out) in chunk.iter().zip(outs) {
                let reached = out.last().is_some_and(|t| self.eos.contains(t));
                ended += reached as usize;
                missing_eos.push(!reached);
                let text = self.tokenizer.decode(&out, true)?;
                let prompt_text = self.tokenizer.decode(&prompt.ids, true)?;
                texts.push(format!("{prompt_text}{text}"));
                responses.push(text);
                let p = &prompt.ids;
                let ids: Vec<u32> = p.iter().chain(&out).copied().collect();
                let n = ids.len();
                let labels = (0..n)
                    .map(|k| if k < p.len() { IGNORE } else { ids[k] as i64 })
                    .collect();
                rows.push(LmExample {
                    ids,
                    labels,
                    position_ids: (0..n as u32).collect(),
                    document_ids: vec![0; n],
                    origin: format!("response {}", rows.len()),
                });
            }
        }
        let mut scores = self.reward.score(&texts)?;
        if let Some(p) = cfg.missing_eos_penalty {
            for (s, &m) in scores.iter_mut().zip(&missing_eos) {
                if m {
                    *s -= p as f32;
                }
            }
        }
        let mut offsets = vec![0];
        let mut end = 0;
        for r in &rows {
            end += r.labels.iter().skip(1).filter(|&&l| l != IGNORE).count();
            offsets.push(end);
        }
        let lm = &self.lm;
        let (mut logps, mut ref_logps, mut vals, mut entropy) = (vec![], vec![], vec![], vec![]);
        let mut base = model.policy.clone();
        if self.frozen.is_none() {
            whet_peft::set_adapters_enabled(&mut base, false);
        }
        let reference = self.frozen.as_ref().unwrap_or(&base);
        for chunk in rows.chunks(micro.max(1)) {
            let refs: Vec<&LmExample> = chunk.iter().collect();
            let s = token_stats(&model.policy, lm, &refs, cfg.temperature, &plain);
            logps.extend(values(s.logps));
            vals.extend(values(model.value_head.forward(s.hidden)));
            entropy.extend(s.entropy);
            let r = token_stats(reference, lm, &refs, cfg.temperature, &plain);
            ref_logps.extend(values(r.logps));
        }
        let mut rewards = token_rewards(&logps, &ref_logps, &scores, &offsets, cfg.kl_coef);
        if cfg.whiten_rewards {
            rewards = whiten(&rewards, false);
        }
        let (adv, returns) = gae(&rewards, &vals, &offsets, cfg.gamma, cfg.lam);
        Ok(Rollout {
            rows,
            offsets,
            logps,
            ref_logps,
            values: vals,
            advantages: whiten(&adv, true),
            returns,
            scores,
            entropy,
            ended,
            responses,
        })
    }
}
