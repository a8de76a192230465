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
//!
//! The module by concern: [`maths`] (rewards, GAE, whitening, the clipped losses), [`rollout`]
//! (sampling responses and what the updates need of them), [`scoring`] (the reward model),
//! [`step`] (PPO's step on the shared loop and its evaluation), [`task`] (`whet train`'s run).

use std::path::Path;

use burn::module::{Module, Param};
use burn::tensor::{Device, Tensor};
use whet_models::weights::{Layout, Visitor, join};
use whet_models::{CausalLm, CausalModel, Checkpoint, VisitParams};
use whet_peft::{ParamCounts, PeftConfig};

use crate::causal_lm::LanguageModelling;
use crate::error::{Result, TrainError};
use crate::trainer::{Observer, TrainSummary};

pub mod maths;
pub mod rollout;
pub mod scoring;
pub mod step;
pub mod task;

pub use maths::{PpoLosses, gae, ppo_losses, token_rewards, whiten};
pub use rollout::Rollout;
pub use scoring::RewardScorer;
pub use step::{PolicyEval, Ppo};
pub use task::PpoTask;

pub use crate::recipe::PpoConfig;

// ---------------------------------------------------------------------------------------------
// The trained model: the policy with a value head.

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

// ---------------------------------------------------------------------------------------------
// The prompts and the prepared run.

/// A prompt, tokenized (cut to its last `max_length` tokens), and its text.
#[derive(Debug, Clone)]
pub struct Prompt {
    pub ids: Vec<u32>,
    pub text: String,
}

/// Everything a PPO run prepared before training.
pub struct PpoPrepared {
    pub checkpoint: Checkpoint,
    pub train: Vec<Prompt>,
    pub validation: Option<Vec<Prompt>>,
    pub test: Option<Vec<Prompt>>,
    pub model: PolicyWithValue,
    pub counts: ParamCounts,
    pub adapter: Option<PeftConfig>,
    /// The step: configuration, tokenizer, reference and reward model.
    pub objective: Ppo,
    /// Prompts cut to max_length.
    pub truncated: usize,
}

/// A prompt as read: text, or a conversation (a list of messages) that is rendered with the
/// chat template and its generation prompt, as trl's `maybe_apply_chat_template` renders
/// prompt-only data.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PromptText {
    Plain(String),
    Chat(Vec<whet_text::ChatMessage>),
}

impl PromptText {
    /// The text and token ids the policy continues: plain text with the tokenizer's special
    /// tokens; a conversation rendered with the generation prompt, tokenized as it is (no
    /// special tokens added, as `apply_chat_template(tokenize=True)`).
    pub fn encode(&self, tokenizer: &whet_models::TextTokenizer) -> Result<(String, Vec<u32>)> {
        match self {
            PromptText::Plain(t) => Ok((t.clone(), tokenizer.encode(t, true)?)),
            PromptText::Chat(turns) => {
                let text = tokenizer
                    .apply_chat_template(turns, true)
                    .map_err(|e| TrainError::Recipe(format!("the chat template: {e}")))?;
                let ids = tokenizer.encode(&text, false)?;
                Ok((text, ids))
            }
        }
    }

    fn is_blank(&self) -> bool {
        match self {
            PromptText::Plain(t) => t.trim().is_empty(),
            PromptText::Chat(turns) => turns.is_empty(),
        }
    }
}

/// The prompts of preference pairs; a conversational pair's prompt turns (taken out of both
/// conversations, as trl's `extract_prompt` does, when the pair has no prompt).
fn prompts_of(pairs: Vec<whet_data::PreferencePair>) -> Result<Vec<PromptText>> {
    pairs
        .into_iter()
        .map(|p| {
            let Some(m) = &p.messages else {
                return Ok(PromptText::Plain(p.prompt));
            };
            let m = if m.prompt.is_empty() {
                whet_data::preference::extract_prompt_turns(m)
            } else {
                m.clone()
            };
            if m.prompt.last().is_some_and(|t| t.role == "assistant") {
                return Err(TrainError::row(
                    p.origin,
                    "the prompt ends with an assistant turn: PPO continues the user's turn",
                ));
            }
            Ok(PromptText::Chat(m.prompt))
        })
        .collect()
}

/// The prompts of a data file: a table's `prompt_column` (text, or lists of `{role, content}`
/// messages), the prompts of preference pairs, or BIG-bench task folders; each distinct prompt
/// once, in file order.
pub fn read_prompts(
    path: &Path,
    encoding: whet_data::Encoding,
    column: &str,
) -> Result<Vec<PromptText>> {
    let bigbench = path.file_name().is_some_and(|n| n == "task.json")
        || (path.is_dir()
            && std::fs::read_dir(path)
                .into_iter()
                .flatten()
                .flatten()
                .any(|e| e.path().join("task.json").is_file()));
    let texts: Vec<PromptText> = if bigbench {
        prompts_of(whet_data::read_pairs(path, encoding)?)?
    } else {
        let table = whet_data::Table::read(path, encoding)?;
        if table.rows.is_empty() {
            return Err(TrainError::dataset(path, "no rows (an empty prompt set)"));
        }
        if table.rows[0].1.contains_key(column) {
            let mut out = Vec::with_capacity(table.rows.len());
            for (line, row) in &table.rows {
                match row.get(column) {
                    Some(serde_json::Value::String(s)) => out.push(PromptText::Plain(s.clone())),
                    Some(v @ serde_json::Value::Array(_)) => {
                        let turns = whet_data::causal_lm::chat_messages(v).map_err(|m| {
                            TrainError::row(table.origin(*line), format!("field {column:?}: {m}"))
                        })?;
                        if turns.last().is_some_and(|t| t.role == "assistant") {
                            return Err(TrainError::row(
                                table.origin(*line),
                                "the prompt ends with an assistant turn: PPO continues the \
                                 user's turn",
                            ));
                        }
                        out.push(PromptText::Chat(turns));
                    }
                    Some(other) => {
                        return Err(TrainError::row(
                            table.origin(*line),
                            format!(
                                "field {column:?} is neither text nor a list of messages ({other})"
                            ),
                        ));
                    }
                    None => {
                        return Err(TrainError::row(
                            table.origin(*line),
                            format!("no field {column:?} (ppo.prompt_column)"),
                        ));
                    }
                }
            }
            out
        } else if table.rows[0].1.contains_key("chosen") {
            prompts_of(whet_data::preference::preference_pairs(&table)?)?
        } else {
            return Err(TrainError::dataset(
                path,
                format!("no column {column:?} (ppo.prompt_column) and no preference pairs"),
            ));
        }
    };
    let mut seen = std::collections::HashSet::new();
    let mut out: Vec<PromptText> = Vec::new();
    for t in texts {
        if t.is_blank() {
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
        return Err(TrainError::dataset(
            path,
            "no prompts (an empty prompt set)",
        ));
    }
    Ok(out)
}

/// Reads the prompts, loads the policy (with the method applied and a value head), the
/// reference and the reward model.
pub fn prepare(recipe: &crate::Recipe, device: &Device) -> Result<PpoPrepared> {
    let d = &recipe.data;
    let config = recipe.ppo.clone().ok_or_else(|| {
        TrainError::Recipe("task = \"ppo\" needs a [ppo] table (at least reward_model)".into())
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
    let (checkpoint, tokenizer, pad_id) = crate::causal_lm::open_decoder(recipe, "ppo")?;
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
    let mut encode = |texts: Vec<PromptText>| -> Result<Vec<Prompt>> {
        let mut prompts = Vec::with_capacity(texts.len());
        for given in texts {
            let (text, mut ids) = given.encode(&tokenizer)?;
            if ids.len() > d.max_length {
                truncated += 1;
                match side {
                    whet_data::Side::Left => drop(ids.drain(..ids.len() - d.max_length)),
                    whet_data::Side::Right => ids.truncate(d.max_length),
                }
            }
            prompts.push(Prompt { ids, text });
        }
        Ok(prompts)
    };
    let train = encode(train)?;
    let validation = validation.map(&mut encode).transpose()?;
    let test = test.map(&mut encode).transpose()?;
    let reward = RewardScorer::open(&config.reward_model, config.reward_max_length)?;
    let mut policy = checkpoint.load_causal_lm(device)?;
    let frozen = (recipe.method == crate::Method::Full).then(|| policy.valid());
    let (mut counts, adapter) =
        crate::causal_lm::apply_decoder_method(&mut policy, recipe, &tokenizer, device)?;
    let hidden = checkpoint_hidden(&checkpoint);
    counts.trainable += hidden + 1;
    counts.all += hidden + 1;
    let mut eos = checkpoint.eos_token_ids();
    if eos.is_empty()
        && let Some(e) = &tokenizer.eos
    {
        eos.push(e.id);
    }
    let lm = LanguageModelling {
        pad_id,
        soft_prompt: policy.virtual_positions(),
        padding_free: recipe.padding_free(),
        sampler: None,
    };
    Ok(PpoPrepared {
        checkpoint,
        train,
        validation,
        test,
        model: PolicyWithValue {
            policy,
            value_head: ValueHead::new(hidden, device),
        },
        counts,
        adapter,
        objective: Ppo {
            config,
            tokenizer,
            frozen,
            reward,
            pad_id,
            eos,
            eval_seed: recipe.training.seed.wrapping_add(0x5eed),
            lm,
        },
        truncated,
    })
}

fn checkpoint_hidden(ck: &Checkpoint) -> usize {
    crate::plan::ModelDims::of(ck).hidden
}

impl PpoPrepared {
    /// Runs PPO on the shared loop (from a checkpoint folder when `resume` names one). One step
    /// of the summary is one iteration: a rollout batch and its `num_ppo_epochs x
    /// num_mini_batches` updates.
    pub fn run_training(
        &mut self,
        recipe: &crate::Recipe,
        device: &Device,
        observer: &mut dyn Observer,
        resume: Option<&Path>,
    ) -> Result<TrainSummary> {
        crate::trainer::train(
            &self.objective,
            &mut self.model,
            &self.train,
            self.validation.as_deref(),
            &recipe.training,
            device,
            observer,
            resume,
        )
    }

    /// Scores the policy's responses to `prompts` (`eval_samples` each, sampled with `seed`).
    pub fn evaluate(
        &self,
        prompts: &[Prompt],
        seed: u64,
        batch: usize,
        device: &Device,
    ) -> Result<PolicyEval> {
        self.objective
            .evaluate_policy(&self.model, prompts, seed, batch, device)
    }

    /// Writes the policy (a peft `CAUSAL_LM` adapter or a transformers folder, with the
    /// tokenizer) and `value_head.safetensors` (trl's `v_head.summary.weight` `[1, H]` and
    /// `v_head.summary.bias`).
    pub fn save(&self, recipe: &crate::Recipe, out: &Path) -> Result<()> {
        crate::causal_lm::save_decoder(
            &self.checkpoint,
            &self.objective.tokenizer,
            &self.model.policy,
            self.adapter.as_ref(),
            recipe,
            out,
        )?;
        let hidden = self.model.value_head.weight.val().dims()[0];
        let w = maths::values(self.model.value_head.weight.val().reshape([hidden]));
        let b = maths::values(self.model.value_head.bias.val());
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
