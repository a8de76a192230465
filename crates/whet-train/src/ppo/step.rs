//! PPO's step on the shared loop ([`crate::trainer::train`]): one optimizer step of the loop is
//! one PPO iteration, a rollout on the prompts the loop picked and its `num_ppo_epochs x
//! num_mini_batches` updates; and its evaluation, responses to held-out prompts scored by the
//! reward model.

use std::collections::BTreeMap;

use burn::tensor::Device;
use serde::Serialize;
use whet_data::{LmExample, epoch_order};
use whet_models::{CausalModel, TextTokenizer};

use super::maths::ppo_losses;
use super::rollout::{Rollout, token_stats};
use super::scoring::RewardScorer;
use super::{PolicyWithValue, PpoConfig, Prompt};
use crate::args::TrainingArguments;
use crate::causal_lm::LanguageModelling;
use crate::error::{Result, TrainError};
use crate::optim::{GradStore, Optimizer};
use crate::schedule::lr_factor;
use crate::trainer::{Evaluation, StepAt, StepResult, TrainStep};
use crate::trainer::{finish_step, read_all};

/// PPO as a [`TrainStep`]: everything a step needs besides the trained policy and value head.
pub struct Ppo {
    pub config: PpoConfig,
    pub tokenizer: TextTokenizer,
    /// The frozen reference of full training (None: the adapter switched off).
    pub frozen: Option<CausalModel>,
    pub reward: RewardScorer,
    pub pad_id: u32,
    pub eos: Vec<u32>,
    /// Seeds the responses of every evaluation during training (the same each time).
    pub eval_seed: u64,
    /// Collates rows and reads the policy's soft-prompt positions.
    pub lm: LanguageModelling,
}

/// What one evaluation of the policy measured.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyEval {
    /// Mean reward-model score of the responses.
    pub score: f64,
    /// Mean summed `log p - log p_ref` of a response.
    pub kl: f64,
    /// Mean response length in tokens.
    pub length: f64,
    /// Share of responses that ended with EOS.
    pub ended: f64,
    /// The first two responses, with their prompt's index and score (for the run's output).
    #[serde(skip)]
    pub examples: Vec<(usize, String, f32)>,
}

impl PolicyEval {
    pub fn metrics(&self) -> BTreeMap<String, f64> {
        BTreeMap::from([
            ("score".to_string(), self.score),
            ("kl".to_string(), self.kl),
            ("length".to_string(), self.length),
            ("ended".to_string(), self.ended),
        ])
    }
}

impl TrainStep for Ppo {
    type Model = PolicyWithValue;
    type Example = Prompt;

    /// One iteration: a response to each of `prompts` (sampled with a seed of the run's seed
    /// and the step), then the PPO epochs over them, each an optimizer step per minibatch on
    /// its own schedule over all the run's updates.
    fn step(
        &self,
        model: &mut PolicyWithValue,
        opt: &mut Optimizer,
        prompts: &[&Prompt],
        at: &StepAt,
    ) -> Result<StepResult> {
        let (args, cfg) = (at.args, &self.config);
        let micro = args.per_device_train_batch_size.max(1);
        let total_updates = at.total * cfg.num_ppo_epochs * cfg.num_mini_batches;
        let warmup = args.warmup(total_updates);
        let seed = args
            .seed
            .wrapping_mul(1_000_003)
            .wrapping_add(at.step as u64);
        let r = self.rollout(model, prompts, seed, micro, at.device)?;
        let stats = self.update(
            model,
            &r,
            opt,
            args,
            at.step,
            warmup,
            total_updates,
            at.device,
        )?;
        let (kl, nll, score) = r.summary();
        let non_score = -cfg.kl_coef * kl;
        let mut metrics = stats.metrics;
        metrics.insert("objective/kl".into(), kl);
        metrics.insert("objective/entropy".into(), nll);
        metrics.insert("objective/non_score_reward".into(), non_score);
        metrics.insert("objective/rlhf_reward".into(), score + non_score);
        metrics.insert("objective/scores".into(), score);
        metrics.insert("val/num_eos_tokens".into(), r.ended as f64);
        Ok(StepResult {
            loss: stats.loss.into(),
            learning_rate: stats.lr,
            grad_norm: stats.grad_norm.into(),
            samples: r.rows.len(),
            tokens: r.rows.iter().map(|e| e.ids.len()).sum(),
            // Not counted: the rollouts' minibatches are padded as the policy generated them.
            positions: 0,
            metrics: metrics.into_iter().map(|(k, v)| (k, v.into())).collect(),
        })
    }

    /// PPO has no evaluation loss: the loss is minus the RLHF objective, `-(score - kl_coef
    /// KL)`, so lower is better as for a loss. The responses are sampled with the same seed at
    /// every evaluation.
    fn evaluate(
        &self,
        model: &PolicyWithValue,
        data: &[Prompt],
        batch_size: usize,
        device: &Device,
    ) -> Result<Evaluation> {
        let e = self.evaluate_policy(model, data, self.eval_seed, batch_size, device)?;
        Ok(Evaluation {
            loss: -(e.score - self.config.kl_coef * e.kl),
            metrics: e.metrics(),
            report: None,
        })
    }

    /// The starting policy's score and KL (0) are where the curves start.
    fn evaluates_at_start(&self) -> bool {
        true
    }

    /// The prompt's tokens: generation pads prompts to the batch's longest.
    fn length(&self, prompt: &Prompt) -> usize {
        prompt.ids.len()
    }
}

impl Ppo {
    /// `eval_samples` responses to every prompt of `prompts` (sampled with `seed`, as in
    /// training, `batch` prompts at a time), scored, with their KL to the reference.
    pub fn evaluate_policy(
        &self,
        model: &PolicyWithValue,
        prompts: &[Prompt],
        seed: u64,
        batch: usize,
        device: &Device,
    ) -> Result<PolicyEval> {
        let k = self.config.eval_samples.max(1);
        let all: Vec<&Prompt> = prompts
            .iter()
            .flat_map(|p| std::iter::repeat_n(p, k))
            .collect();
        let r = self.rollout(model, &all, seed, batch, device)?;
        let (kl, _, score) = r.summary();
        let n = r.rows.len().max(1) as f64;
        let examples = r
            .responses
            .iter()
            .zip(&r.scores)
            .enumerate()
            .step_by(k)
            .take(2)
            .map(|(j, (text, &s))| (j / k, text.clone(), s))
            .collect();
        Ok(PolicyEval {
            score,
            kl,
            length: r.logps.len() as f64 / n,
            ended: r.ended as f64 / n,
            examples,
        })
    }

    /// The PPO epochs over one rollout: `step` is the 0-based iteration, `warmup` and
    /// `total_updates` the schedule's over all updates of the run.
    #[allow(clippy::too_many_arguments)]
    fn update(
        &self,
        model: &mut PolicyWithValue,
        r: &Rollout,
        opt: &mut Optimizer,
        args: &TrainingArguments,
        step: usize,
        warmup: usize,
        total_updates: usize,
        device: &Device,
    ) -> Result<UpdateStats> {
        let cfg = &self.config;
        let lm = &self.lm;
        let rows = r.rows.len();
        let mini = rows.div_ceil(cfg.num_mini_batches).max(1);
        let micro = args.per_device_train_batch_size.max(1);
        let mut acc = Acc::default();
        let mut lr = 0.0;
        let mut grad_norm = 0.0;
        for epoch in 0..cfg.num_ppo_epochs {
            let seed = args.seed ^ ((step as u64) << 16) ^ epoch as u64;
            let order = epoch_order(rows, seed, 0);
            for (k, minibatch) in order.chunks(mini).enumerate() {
                let update = step * cfg.num_ppo_epochs * cfg.num_mini_batches
                    + epoch * cfg.num_mini_batches
                    + k;
                let tokens: usize = minibatch
                    .iter()
                    .map(|&i| r.offsets[i + 1] - r.offsets[i])
                    .sum();
                let mut grads = GradStore::default();
                for mb in minibatch.chunks(micro) {
                    let refs: Vec<&LmExample> = mb.iter().map(|&i| &r.rows[i]).collect();
                    let s = token_stats(&model.policy, lm, &refs, cfg.temperature, device);
                    let (old_l, old_v, adv, ret) = r.slice(mb);
                    let l = ppo_losses(
                        s.logps,
                        model.value_head.forward(s.hidden),
                        &old_l,
                        &old_v,
                        &adv,
                        &ret,
                        cfg.cliprange,
                        cfg.cliprange_value,
                    );
                    let denom = tokens.max(1) as f64;
                    let loss = (l.policy.clone() + l.value.clone().mul_scalar(cfg.vf_coef))
                        .div_scalar(denom);
                    let value = loss.clone().into_scalar::<f32>() as f64;
                    if !value.is_finite() {
                        return Err(TrainError::NonFiniteLoss {
                            loss: "PPO loss",
                            step: step + 1,
                            value,
                        });
                    }
                    acc.loss += value;
                    acc.policy += l.policy.into_scalar::<f32>() as f64;
                    acc.value += l.value.into_scalar::<f32>() as f64;
                    acc.policy_clipped += l.policy_clipped;
                    acc.value_clipped += l.value_clipped;
                    acc.approxkl += l.half_sq_log_ratio;
                    acc.ratio += l.ratio_sum;
                    acc.entropy += s.entropy.iter().map(|&e| e as f64).sum::<f64>();
                    acc.tokens += old_l.len();
                    let g = loss.mul_scalar(opt.loss_scale()).backward();
                    grads.accumulate(model, &g);
                }
                acc.updates += 1;
                lr = args.learning_rate
                    * lr_factor(args.lr_scheduler_type, update, warmup, total_updates);
                grad_norm = read_all(vec![finish_step(
                    opt,
                    model,
                    &mut grads,
                    lr,
                    args.max_grad_norm,
                    device,
                )])[0];
            }
        }
        let t = acc.tokens.max(1) as f64;
        Ok(UpdateStats {
            loss: acc.loss / acc.updates.max(1) as f64,
            lr,
            grad_norm,
            metrics: BTreeMap::from([
                ("loss/policy_avg".to_string(), acc.policy / t),
                ("loss/value_avg".to_string(), acc.value / t),
                (
                    "policy/clipfrac_avg".to_string(),
                    acc.policy_clipped as f64 / t,
                ),
                ("val/clipfrac_avg".to_string(), acc.value_clipped as f64 / t),
                ("policy/approxkl_avg".to_string(), acc.approxkl / t),
                ("policy/entropy_avg".to_string(), acc.entropy / t),
                ("val/ratio".to_string(), acc.ratio / t),
            ]),
        })
    }
}

/// Sums over the updates of one iteration.
#[derive(Default)]
struct Acc {
    loss: f64,
    policy: f64,
    value: f64,
    policy_clipped: usize,
    value_clipped: usize,
    approxkl: f64,
    ratio: f64,
    entropy: f64,
    tokens: usize,
    updates: usize,
}

/// What the updates of one iteration did: the mean loss per update, the last update's learning
/// rate and gradient norm, and trl's statistics.
struct UpdateStats {
    loss: f64,
    lr: f64,
    grad_norm: f64,
    metrics: BTreeMap<String, f64>,
}
