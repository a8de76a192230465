//! PPO against a reward model (`task = "ppo"`, issue 6): the RLHF step of InstructGPT, as
//! `trl`'s `PPOTrainer` (0.x, removed from trl 1.x) runs it. Each iteration
//! 1. samples responses to a batch of prompts with the policy (KV cache, temperature);
//! 2. scores prompt + response with a trained reward model (one output);
//! 3. takes per-token log-probabilities of the policy and of the reference (the base with the
//!    adapter switched off, or a frozen copy) and values from a value head on the policy's
//!    last hidden states;
//! 4. rewards each token with `-kl_coef * (log p - log p_ref)`, the last one also with the score;
//!    advantages by GAE (`gamma`, `lam`), whitened;
//! 5. runs `num_ppo_epochs` passes over the rollouts in `num_mini_batches` shuffled minibatches,
//!    each an optimizer step on the clipped policy loss plus `vf_coef` times the clipped value
//!    loss.
//!
//! Departures from trl 0.19, on purpose: the score goes on the last response token (trl puts it
//! one position past the EOS, on a padding slot whose value it also trains), and losses average
//! over the tokens of a whole minibatch rather than each micro-batch. Dropout is off in every
//! pass (trl's `disable_dropout`), so the first pass of each iteration has ratio 1 exactly.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::{Module, Param};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use whet_data::{Encoded, IGNORE, LmExample, Target, collate, epoch_order};
use whet_infer::{GenerationConfig, Sampling, generate_batch};
use whet_models::weights::{Layout, Visitor, join};
use whet_models::{
    CausalLm, CausalModel, Checkpoint, Classifier, Mode, TextTokenizer, VisitParams,
};
use whet_peft::{ParamCounts, PeftConfig};

use crate::args::Strategy;
use crate::causal::LanguageModelling;
use crate::checkpoint::{self, TrainerState};
use crate::optim::{GradStore, OptimConfig, Optimizer};
use crate::schedule::lr_factor;
use crate::trainer::{EvalLog, Objective, Observer, StepLog, TrainSummary};
use crate::error::{Result, TrainError};

/// The `[ppo]` table of a recipe (the names and defaults of trl's `PPOConfig`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PpoConfig {
    /// A reward model folder: a one-output `*ForSequenceClassification` (`task =
    /// "reward-model"` writes one).
    pub reward_model: PathBuf,
    /// Passes over each batch of rollouts.
    #[serde(default = "d_ppo_epochs")]
    pub num_ppo_epochs: usize,
    /// Optimizer steps per pass (the rollout batch is cut into this many minibatches).
    #[serde(default = "d_one")]
    pub num_mini_batches: usize,
    /// Weight of the per-token KL penalty to the reference.
    #[serde(default = "d_kl_coef")]
    pub kl_coef: f64,
    /// Clip range of the policy ratio.
    #[serde(default = "d_clip")]
    pub cliprange: f64,
    /// Weight of the value loss.
    #[serde(default = "d_vf_coef")]
    pub vf_coef: f64,
    /// Clip range of the value update.
    #[serde(default = "d_clip")]
    pub cliprange_value: f64,
    #[serde(default = "d_gamma")]
    pub gamma: f64,
    /// GAE's lambda.
    #[serde(default = "d_lam")]
    pub lam: f64,
    /// Whiten the rewards (before GAE) too.
    #[serde(default)]
    pub whiten_rewards: bool,
    /// Sampling temperature; log-probabilities are of the tempered distribution, as in trl.
    #[serde(default = "d_temperature")]
    pub temperature: f64,
    /// New tokens per response at most (a response ends at EOS).
    #[serde(default = "d_response_length")]
    pub response_length: usize,
    /// Subtracted from the score of a response that did not reach EOS.
    #[serde(default)]
    pub missing_eos_penalty: Option<f64>,
    /// The prompt column of a table (a table of preference pairs gives its prompts).
    #[serde(default = "d_prompt_column")]
    pub prompt_column: String,
    /// Tokens of prompt + response the reward model reads (the start of a longer text is cut).
    #[serde(default = "d_reward_max_length")]
    pub reward_max_length: usize,
    /// Responses sampled per held-out prompt at each evaluation (their scores are averaged).
    #[serde(default = "d_one")]
    pub eval_samples: usize,
}

fn d_ppo_epochs() -> usize {
    4
}
fn d_one() -> usize {
    1
}
fn d_kl_coef() -> f64 {
    0.05
}
fn d_clip() -> f64 {
    0.2
}
fn d_vf_coef() -> f64 {
    0.1
}
fn d_gamma() -> f64 {
    1.0
}
fn d_lam() -> f64 {
    0.95
}
fn d_temperature() -> f64 {
    0.7
}
fn d_response_length() -> usize {
    53
}
fn d_prompt_column() -> String {
    "prompt".into()
}
fn d_reward_max_length() -> usize {
    512
}

// ---------------------------------------------------------------------------------------------
// The arithmetic of PPO, on flat per-token arrays (`offsets[r]..offsets[r + 1]` is row r).

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

fn values(t: Tensor<1>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// The models: policy with a value head, the reward model.

/// A linear value head on the policy's last hidden states (trl's `ValueHead`: `v_head.summary`,
/// saved `[1, H]` as PyTorch stores it). Starts at zero: every first value is 0.
#[derive(Module, Debug)]
pub struct ValueHead {
    /// `[H, 1]`.
    pub weight: Param<Tensor<2>>,
    /// `[1]`.
    pub bias: Param<Tensor<1>>,
}

impl ValueHead {
    pub fn new(hidden: usize, device: &Device) -> Self {
        Self {
            weight: Param::from_tensor(Tensor::zeros([hidden, 1], device)),
            bias: Param::from_tensor(Tensor::zeros([1], device)),
        }
    }

    /// # Shapes
    /// - x `[N, H]`
    /// - output `[N]`
    pub fn forward(&self, x: Tensor<2>) -> Tensor<1> {
        let n = x.dims()[0];
        (x.matmul(self.weight.val()) + self.bias.val().reshape([1, 1])).reshape([n])
    }
}

/// The policy and its value head, trained together (one optimizer, one checkpoint).
#[derive(Module, Debug)]
pub struct PolicyWithValue {
    pub policy: CausalModel,
    pub value_head: ValueHead,
}

impl VisitParams for PolicyWithValue {
    fn visit_params(&mut self, prefix: &str, v: &mut dyn Visitor) {
        self.policy.visit_params(prefix, v);
        v.matrix(
            &join(prefix, "v_head.summary.weight"),
            &mut self.value_head.weight,
            Layout::Transposed,
        );
        v.vector(
            &join(prefix, "v_head.summary.bias"),
            &mut self.value_head.bias,
        );
    }
}

/// A trained reward model and its tokenizer, scoring texts (in evaluation mode, on the CPU).
pub struct RewardScorer {
    model: Classifier,
    tokenizer: TextTokenizer,
    pad_id: u32,
    with_types: bool,
    max_length: usize,
    device: Device,
    path: PathBuf,
}

impl RewardScorer {
    /// Opens a reward model folder; refuses one whose head is not in the checkpoint or has more
    /// than one output.
    pub fn open(path: &Path, max_length: usize) -> Result<Self> {
        let origin = |e: TrainError| TrainError::RewardModel {
            path: path.to_path_buf(),
            source: Box::new(e),
        };
        let ck = Checkpoint::open(path).map_err(|e| origin(e.into()))?;
        let labels = ck
            .head()
            .id2label
            .as_ref()
            .map(|m| m.len())
            .or(ck.head().num_labels)
            .unwrap_or(2);
        if labels != 1 {
            return Err(origin(TrainError::Unsuitable(format!(
                "a reward model has one output; this one has {labels} labels (train one with \
                 task = \"reward-model\")"
            ))));
        }
        let tokenizer = ck.tokenizer().map_err(|e| origin(e.into()))?;
        let pad_id = ck
            .pad_token_id()
            .or(tokenizer.pad.as_ref().map(|p| p.id))
            .or(tokenizer.eos.as_ref().map(|p| p.id))
            .unwrap_or(0);
        let device = Device::flex();
        let (model, fresh) = ck
            .load_classifier(&device)
            .map_err(|e| origin(e.into()))?;
        if !fresh.is_empty() {
            return Err(origin(TrainError::Unsuitable(format!(
                "its head ({}) is not in the checkpoint: not a trained reward model",
                fresh.join(", ")
            ))));
        }
        Ok(Self {
            with_types: matches!(model, Classifier::Bert(_)),
            model,
            tokenizer,
            pad_id,
            max_length: max_length.min(ck.max_positions()),
            device,
            path: path.to_path_buf(),
        })
    }

    /// One score per text; a text over `max_length` tokens loses its start (after the first
    /// token, `[CLS]` for BERT), so the response is always read.
    pub fn score(&self, texts: &[String]) -> Result<Vec<f32>> {
        let mut encoded = Vec::with_capacity(texts.len());
        for t in texts {
            let mut ids = self
                .tokenizer
                .encode(t, true)
                .map_err(|e| TrainError::RewardModel {
                    path: self.path.clone(),
                    source: Box::new(e.into()),
                })?;
            if ids.len() > self.max_length {
                let cut = ids.len() - self.max_length;
                ids.drain(1..1 + cut);
            }
            let n = ids.len();
            encoded.push(Encoded {
                ids,
                type_ids: vec![0; n],
                label: Target::Class(0),
            });
        }
        let mut out = Vec::with_capacity(texts.len());
        for chunk in encoded.chunks(16) {
            let refs: Vec<&Encoded> = chunk.iter().collect();
            let b = collate(&refs, self.pad_id);
            let (input, _) = crate::seqcls::to_input(&b, &self.device, self.with_types, 1);
            let scores = self.model.forward(input, Mode::Eval)?;
            out.extend(values(scores.reshape([chunk.len()])));
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------------
// Rollouts.

/// Per-token statistics of the response tokens of some rows, flat in row order.
struct TokenStats {
    /// `[N]` log-probabilities of the tempered distribution.
    logps: Tensor<1>,
    /// `[N, H]` last hidden states at those positions (what a value head reads).
    hidden: Tensor<2>,
    /// Entropy of each token's tempered distribution.
    entropy: Vec<f32>,
}

fn token_stats(
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
    fn slice(&self, rows: &[usize]) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
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

/// Tokenized prompts (cut to their last `max_length` tokens) with their texts.
pub struct Prompts {
    pub ids: Vec<Vec<u32>>,
    pub texts: Vec<String>,
}

/// Everything a PPO run prepared before training.
pub struct PpoPrepared {
    pub checkpoint: Checkpoint,
    pub tokenizer: TextTokenizer,
    pub train: Prompts,
    pub validation: Option<Prompts>,
    pub test: Option<Prompts>,
    pub model: PolicyWithValue,
    pub counts: ParamCounts,
    pub adapter: Option<PeftConfig>,
    /// The frozen reference of full training (None: the adapter switched off).
    pub frozen: Option<CausalModel>,
    pub reward: RewardScorer,
    pub config: PpoConfig,
    pub pad_id: u32,
    pub eos: Vec<u32>,
    /// Prompts cut to max_length.
    pub truncated: usize,
}

/// The prompts of a data file: a table's `prompt_column`, the prompts of preference pairs, or
/// BIG-bench task folders; each distinct prompt once, in file order.
pub fn read_prompts(
    path: &Path,
    encoding: whet_data::Encoding,
    column: &str,
) -> Result<Vec<String>> {
    let pairs_only = path.is_dir() || path.file_name().is_some_and(|n| n == "task.json");
    let texts: Vec<String> = if pairs_only {
        whet_data::read_pairs(path, encoding)?
            .into_iter()
            .map(|p| p.prompt)
            .collect()
    } else {
        let table = whet_data::Table::read(path, encoding)?;
        if table.rows.is_empty() {
            return Err(TrainError::dataset(path, "no rows (an empty prompt set)"));
        }
        if table.rows[0].1.contains_key(column) {
            let mut out = Vec::with_capacity(table.rows.len());
            for (line, row) in &table.rows {
                match row.get(column) {
                    Some(serde_json::Value::String(s)) => out.push(s.clone()),
                    Some(other) => {
                        return Err(TrainError::row(
                            format!("{}:{line}", path.display()),
                            format!("field {column:?} is not text ({other})"),
                        ));
                    }
                    None => {
                        return Err(TrainError::row(
                            format!("{}:{line}", path.display()),
                            format!("no field {column:?} (ppo.prompt_column)"),
                        ));
                    }
                }
            }
            out
        } else if table.rows[0].1.contains_key("chosen") {
            whet_data::preference::preference_pairs(&table)?
                .into_iter()
                .map(|p| p.prompt)
                .collect()
        } else {
            return Err(TrainError::dataset(
                path,
                format!("no column {column:?} (ppo.prompt_column) and no preference pairs"),
            ));
        }
    };
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for t in texts {
        if t.trim().is_empty() {
            return Err(TrainError::dataset(
                path,
                "an empty prompt (PPO continues prompts; pairs need a prompt column)",
            ));
        }
        if seen.insert(t.clone()) {
            out.push(t);
        }
    }
    if out.is_empty() {
        return Err(TrainError::dataset(path, "no prompts (an empty prompt set)"));
    }
    Ok(out)
}

/// Reads the prompts, loads the policy (with the method applied and a value head), the
/// reference and the reward model.
pub fn prepare(recipe: &crate::Recipe, device: &Device) -> Result<PpoPrepared> {
    let d = &recipe.data;
    let config = recipe
        .ppo
        .clone()
        .ok_or_else(|| {
            TrainError::Recipe(
                "task = \"ppo\" needs a [ppo] table (at least reward_model)".into(),
            )
        })?;
    let positive = |v: f64, name: &str| -> Result<()> {
        if v > 0.0 && v.is_finite() {
            Ok(())
        } else {
            Err(TrainError::option(
                format!("ppo.{name}"),
                format!("must be positive, got {v}"),
            ))
        }
    };
    positive(config.temperature, "temperature")?;
    positive(config.cliprange, "cliprange")?;
    positive(config.cliprange_value, "cliprange_value")?;
    if config.num_ppo_epochs == 0 || config.num_mini_batches == 0 || config.response_length == 0 {
        return Err(TrainError::Recipe(
            "ppo.num_ppo_epochs, ppo.num_mini_batches and ppo.response_length must be at least 1"
                .into(),
        ));
    }
    let rollout =
        recipe.training.per_device_train_batch_size * recipe.training.gradient_accumulation_steps;
    if !rollout.is_multiple_of(config.num_mini_batches) {
        return Err(TrainError::option(
            "ppo.num_mini_batches",
            format!(
                "= {} must divide the rollout batch (per_device_train_batch_size \
                 x gradient_accumulation_steps = {rollout})",
                config.num_mini_batches
            ),
        ));
    }
    let enc: whet_data::Encoding = d.encoding.parse().map_err(TrainError::Encoding)?;
    let read = |p: &Path| read_prompts(p, enc, &config.prompt_column);
    let all = read(&d.train)?;
    let validation = d.validation.as_deref().map(read).transpose()?;
    let test = d.test.as_deref().map(read).transpose()?;
    let (train, validation, test) = d.parts(all, validation, test)?;
    if train.is_empty() {
        return Err(TrainError::dataset(
            &d.train,
            "the training split has no prompts",
        ));
    }
    let (checkpoint, tokenizer, pad_id) = crate::causal::open_decoder(recipe, "ppo")?;
    if d.max_length + config.response_length > checkpoint.max_positions() {
        return Err(TrainError::Recipe(format!(
            "data.max_length ({}) + ppo.response_length ({}) exceeds the model's {} positions",
            d.max_length,
            config.response_length,
            checkpoint.max_positions()
        )));
    }
    let mut truncated = 0;
    // A prompt is continued, so by default it keeps its end.
    let side = d.side(whet_data::Side::Left);
    let mut encode = |texts: Vec<String>| -> Result<Prompts> {
        let mut ids = Vec::with_capacity(texts.len());
        for t in &texts {
            let mut p = tokenizer.encode(t, true)?;
            if p.len() > d.max_length {
                truncated += 1;
                match side {
                    whet_data::Side::Left => drop(p.drain(..p.len() - d.max_length)),
                    whet_data::Side::Right => p.truncate(d.max_length),
                }
            }
            ids.push(p);
        }
        Ok(Prompts { ids, texts })
    };
    let train = encode(train)?;
    let validation = validation.map(&mut encode).transpose()?;
    let test = test.map(&mut encode).transpose()?;
    let reward = RewardScorer::open(&config.reward_model, config.reward_max_length)?;
    let mut policy = checkpoint.load_causal_lm(device)?;
    let frozen = (recipe.method == crate::Method::Full).then(|| policy.valid());
    let (mut counts, adapter) =
        crate::causal::apply_decoder_method(&mut policy, recipe, &tokenizer, device)?;
    let hidden = checkpoint_hidden(&checkpoint);
    counts.trainable += hidden + 1;
    counts.all += hidden + 1;
    let mut eos = checkpoint.eos_token_ids();
    if eos.is_empty()
        && let Some(e) = &tokenizer.eos
    {
        eos.push(e.id);
    }
    Ok(PpoPrepared {
        checkpoint,
        tokenizer,
        train,
        validation,
        test,
        model: PolicyWithValue {
            policy,
            value_head: ValueHead::new(hidden, device),
        },
        counts,
        adapter,
        frozen,
        reward,
        config,
        pad_id,
        eos,
        truncated,
    })
}

fn checkpoint_hidden(ck: &Checkpoint) -> usize {
    crate::plan::ModelDims::of(ck).hidden
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

impl PpoPrepared {
    fn lm(&self) -> LanguageModelling {
        LanguageModelling {
            pad_id: self.pad_id,
            soft_prompt: self.model.policy.virtual_positions(),
        }
    }

    /// Samples responses to `prompts` and scores them; with `with_values`, also the old
    /// log-probabilities and values for an update. The reference runs on the same rows.
    fn rollout(
        &self,
        prompts: &Prompts,
        picked: &[usize],
        seed: u64,
        micro: usize,
        device: &Device,
    ) -> Result<Rollout> {
        let cfg = &self.config;
        let plain = device.clone().without_autodiff();
        let model = self.model.valid();
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
        let mut rows = Vec::with_capacity(picked.len());
        let mut responses = Vec::with_capacity(picked.len());
        let mut texts = Vec::with_capacity(picked.len());
        let mut ended = 0;
        let mut missing_eos = Vec::with_capacity(picked.len());
        for chunk in picked.chunks(micro.max(1)) {
            let batch: Vec<Vec<u32>> = chunk.iter().map(|&i| prompts.ids[i].clone()).collect();
            let outs = generate_batch(&model.policy, &batch, &generation, self.pad_id, &plain)?;
            for (&i, out) in chunk.iter().zip(outs) {
                let reached = out.last().is_some_and(|t| self.eos.contains(t));
                ended += reached as usize;
                missing_eos.push(!reached);
                let text = self.tokenizer.decode(&out, true)?;
                let prompt_text = self.tokenizer.decode(&prompts.ids[i], true)?;
                texts.push(format!("{prompt_text}{text}"));
                responses.push(text);
                let p = &prompts.ids[i];
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
                    origin: format!("prompt {i}"),
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
        let lm = self.lm();
        let (mut logps, mut ref_logps, mut vals, mut entropy) = (vec![], vec![], vec![], vec![]);
        let mut base = model.policy.clone();
        if self.frozen.is_none() {
            whet_peft::set_adapters_enabled(&mut base, false);
        }
        let reference = self.frozen.as_ref().unwrap_or(&base);
        for chunk in rows.chunks(micro.max(1)) {
            let refs: Vec<&LmExample> = chunk.iter().collect();
            let s = token_stats(&model.policy, &lm, &refs, cfg.temperature, &plain);
            logps.extend(values(s.logps));
            vals.extend(values(model.value_head.forward(s.hidden)));
            entropy.extend(s.entropy);
            let r = token_stats(reference, &lm, &refs, cfg.temperature, &plain);
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

    /// `eval_samples` responses to every prompt of `prompts` (sampled with `seed`, as in
    /// training), scored, with their KL to the reference.
    pub fn evaluate(
        &self,
        prompts: &Prompts,
        seed: u64,
        batch: usize,
        device: &Device,
    ) -> Result<PolicyEval> {
        let k = self.config.eval_samples.max(1);
        let all: Vec<usize> = (0..prompts.ids.len())
            .flat_map(|i| std::iter::repeat_n(i, k))
            .collect();
        let r = self.rollout(prompts, &all, seed, batch, device)?;
        let (kl, _, score) = r.summary();
        let n = r.rows.len().max(1) as f64;
        let examples = all
            .iter()
            .zip(&r.responses)
            .zip(&r.scores)
            .step_by(k)
            .take(2)
            .map(|((&i, text), &s)| (i, text.clone(), s))
            .collect();
        Ok(PolicyEval {
            score,
            kl,
            length: r.logps.len() as f64 / n,
            ended: r.ended as f64 / n,
            examples,
        })
    }

    /// Runs PPO (from a checkpoint folder when `resume` names one). One step of the summary is
    /// one iteration: a rollout batch and its `num_ppo_epochs x num_mini_batches` updates.
    pub fn run_training(
        &mut self,
        recipe: &crate::Recipe,
        device: &Device,
        observer: &mut dyn Observer,
        resume: Option<&Path>,
    ) -> Result<TrainSummary> {
        let args = &recipe.training;
        args.validate()?;
        let cfg = self.config.clone();
        let n = self.train.ids.len();
        let total = args.total_steps(n);
        let per_epoch = args.steps_per_epoch(n);
        let micro = args.per_device_train_batch_size.max(1);
        let rollout_size = micro * args.gradient_accumulation_steps.max(1);
        let updates_per_step = cfg.num_ppo_epochs * cfg.num_mini_batches;
        let total_updates = total * updates_per_step;
        let warmup = args.warmup(total_updates);
        let mut opt = Optimizer::new(OptimConfig::from_args(args));
        let mut state = TrainerState::default();
        if let Some(dir) = resume {
            state = checkpoint::load(dir, &mut self.model, &mut opt, device)?;
        }
        let start = Instant::now();
        let (mut history, mut evals) = (Vec::new(), Vec::new());
        let eval_seed = args.seed.wrapping_add(0x5eed);
        let eval_batch = args.per_device_eval_batch_size;
        let run_eval = |me: &Self,
                        step: usize,
                        evals: &mut Vec<EvalLog>,
                        observer: &mut dyn Observer|
         -> Result<()> {
            if let Some(v) = &me.validation {
                let e = me.evaluate(v, eval_seed, eval_batch, device)?;
                let log = EvalLog {
                    step,
                    epoch: step as f64 / per_epoch as f64,
                    // PPO has no evaluation loss: this is minus the RLHF objective,
                    // -(score - kl_coef KL), so lower is better as for a loss.
                    loss: -(e.score - me.config.kl_coef * e.kl),
                    metrics: e.metrics(),
                    report: None,
                };
                observer.eval(&log);
                evals.push(log);
            }
            Ok(())
        };
        let evaluating = args.eval_strategy != Strategy::No;
        if evaluating && state.global_step == 0 {
            run_eval(self, 0, &mut evals, observer)?;
        }
        let mut step = state.global_step;
        let first_step = step;
        while step < total {
            let epoch = step / per_epoch;
            let order = epoch_order(n, args.seed, epoch);
            let within = step % per_epoch;
            let picked: Vec<usize> = order
                .chunks(rollout_size)
                .nth(within)
                .map(|c| c.to_vec())
                .unwrap_or_default();
            let seed = args.seed.wrapping_mul(1_000_003).wrapping_add(step as u64);
            let r = self.rollout(&self.train, &picked, seed, micro, device)?;
            let stats = self.update(
                &r,
                &cfg,
                &mut opt,
                args,
                step,
                warmup,
                total_updates,
                device,
            )?;
            step += 1;
            state.samples += r.rows.len();
            state.tokens += r.rows.iter().map(|e| e.ids.len()).sum::<usize>();
            state.loss_sum += stats.loss;
            let (kl, nll, score) = r.summary();
            let non_score = -cfg.kl_coef * kl;
            let mut metrics = stats.metrics;
            metrics.insert("objective/kl".into(), kl);
            metrics.insert("objective/entropy".into(), nll);
            metrics.insert("objective/non_score_reward".into(), non_score);
            metrics.insert("objective/rlhf_reward".into(), score + non_score);
            metrics.insert("objective/scores".into(), score);
            metrics.insert("val/num_eos_tokens".into(), r.ended as f64);
            let log = StepLog {
                step,
                total_steps: total,
                epoch: step as f64 / per_epoch as f64,
                loss: stats.loss,
                learning_rate: stats.lr,
                grad_norm: stats.grad_norm,
                samples_per_second: state.samples as f64 / start.elapsed().as_secs_f64(),
                metrics,
            };
            observer.step(&log);
            history.push(log);
            let end_of_epoch = step.is_multiple_of(per_epoch) || step == total;
            let do_eval = args.evaluates_at(step, total, end_of_epoch);
            if do_eval {
                run_eval(self, step, &mut evals, observer)?;
            }
            let do_save = args.saves_at(step, end_of_epoch);
            if do_save {
                state.global_step = step;
                state.optimizer_steps = opt.step;
                checkpoint::save(
                    &args.output_dir,
                    &mut self.model,
                    &opt,
                    &state,
                    args.save_total_limit,
                )?;
            }
        }
        Ok(TrainSummary {
            steps: step,
            first_step,
            epochs: step as f64 / per_epoch as f64,
            train_loss: state.loss_sum / step.max(1) as f64,
            train_runtime: start.elapsed().as_secs_f64(),
            train_samples: state.samples,
            train_tokens: state.tokens,
            history,
            evals,
            best_step: None,
        })
    }

    /// The PPO epochs over one rollout.
    #[allow(clippy::too_many_arguments)]
    fn update(
        &mut self,
        r: &Rollout,
        cfg: &PpoConfig,
        opt: &mut Optimizer,
        args: &crate::TrainingArguments,
        step: usize,
        warmup: usize,
        total_updates: usize,
        device: &Device,
    ) -> Result<UpdateStats> {
        let lm = self.lm();
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
                    let s = token_stats(&self.model.policy, &lm, &refs, cfg.temperature, device);
                    let (old_l, old_v, adv, ret) = r.slice(mb);
                    let l = ppo_losses(
                        s.logps,
                        self.model.value_head.forward(s.hidden),
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
                    let g = loss.backward();
                    grads.accumulate(&mut self.model, &g);
                }
                acc.updates += 1;
                lr = args.learning_rate
                    * lr_factor(args.lr_scheduler_type, update, warmup, total_updates);
                grad_norm = grads.clip(args.max_grad_norm);
                opt.step(&mut self.model, &grads, lr);
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

    /// Writes the policy (a peft `CAUSAL_LM` adapter or a transformers folder, with the
    /// tokenizer) and `value_head.safetensors` (trl's `v_head.summary.weight` `[1, H]` and
    /// `v_head.summary.bias`).
    pub fn save(&self, recipe: &crate::Recipe, out: &Path) -> Result<()> {
        crate::causal::save_decoder(
            &self.checkpoint,
            &self.tokenizer,
            &self.model.policy,
            self.adapter.as_ref(),
            recipe,
            out,
        )?;
        let hidden = self.model.value_head.weight.val().dims()[0];
        let w = values(self.model.value_head.weight.val().reshape([hidden]));
        let b = values(self.model.value_head.bias.val());
        let h = w.len();
        whet_models::weights::write_safetensors(
            &out.join("value_head.safetensors"),
            &[
                ("v_head.summary.weight".to_string(), vec![1, h], w),
                ("v_head.summary.bias".to_string(), vec![1], b),
            ],
            None,
        )?;
        Ok(())
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

struct UpdateStats {
    loss: f64,
    lr: f64,
    grad_norm: f64,
    metrics: BTreeMap<String, f64>,
}
