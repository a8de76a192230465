//! Direct preference optimisation (Rafailov et al. 2023, <https://arxiv.org/abs/2305.18290>)
//! as `trl` 1.16's `DPOTrainer` computes it: sequence log-probabilities of the completion
//! (summed over its tokens), log-ratios against a frozen reference, and the sigmoid loss
//! `-log sigmoid(beta (chosen_logratio - rejected_logratio))` or IPO's
//! `((chosen_logratio / |chosen| - rejected_logratio / |rejected|) - 1 / (2 beta))^2` (trl
//! divides IPO's log-ratios by the completion lengths). Implicit rewards are
//! `beta * logratio`, logged as trl logs them.

use std::collections::BTreeMap;

use crate::error::{Result, TrainError};
pub use crate::recipe::{DpoConfig, DpoLossType};
use burn::tensor::Tensor;
use burn::tensor::activation::log_sigmoid;

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
    /// Sums over the batch's pairs of the chosen and of the rejected rewards, and the number of
    /// pairs whose chosen reward is higher: `[3]`, left on the device.
    pub fn metric_sums(&self) -> Tensor<1> {
        let c = self.chosen_rewards.clone().inner();
        let r = self.rejected_rewards.clone().inner();
        let right = c.clone().greater(r.clone()).float().sum();
        Tensor::cat(vec![c.sum(), r.sum(), right], 0)
    }

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

// ---------------------------------------------------------------------------------------------
// The `dpo` task: pairs tokenized as trl tokenizes them, the policy's and the reference's
// sequence log-probabilities, the loss above.

use std::cell::RefCell;
use std::path::Path;

use burn::module::Module;
use burn::tensor::{Device, Int, TensorData};
use whet_data::{IGNORE, LmExample, PreferencePair};
use whet_models::{CausalLm, CausalModel, Checkpoint, Mode, TextTokenizer};
use whet_peft::{ParamCounts, PeftConfig};

use crate::causal_lm::{LanguageModelling, LmBatch};
use crate::task::{Outcome, Report, Task};
use crate::trainer::{BatchCounts, Evaluation, Objective, Reading};

/// A tokenized pair: prompt + chosen and prompt + rejected, the answer tokens learnt.
#[derive(Debug, Clone)]
pub struct DpoExample {
    pub chosen: LmExample,
    pub rejected: LmExample,
    /// The reference's sequence log-probabilities (chosen, rejected) when precomputed.
    pub reference: Option<(f32, f32)>,
}

/// Where the reference log-probabilities come from.
pub enum Reference {
    /// The policy with its adapter switched off (peft's `disable_adapter`): no second copy.
    AdapterOff,
    /// A frozen copy of the starting model (full fine-tuning).
    Frozen(Box<CausalModel>),
    /// Stored in each example before training.
    Precomputed,
}

/// The DPO objective. Its unit is the pair.
pub struct Dpo {
    pub lm: LanguageModelling,
    pub beta: f64,
    pub loss_type: DpoLossType,
    pub reference: Reference,
    /// [`DpoOutput::metric_sums`] over the micro-batches of the current step, and their pairs.
    logged: RefCell<(Option<Tensor<1>>, usize)>,
}

/// Chosen rows then rejected rows.
pub struct DpoBatch {
    pub pairs: usize,
    pub rows: LmBatch,
    /// Completion tokens of each row.
    pub lengths: Vec<usize>,
    /// `[2B]` precomputed reference log-probabilities.
    pub reference: Option<Vec<f32>>,
}

/// Summed log-probabilities of each row's learnt tokens: `[rows]`. The LM head runs only at
/// those positions, one row at a time, so no `[rows, T, V]` logits tensor exists.
pub fn row_logps(
    model: &CausalModel,
    lm: &LanguageModelling,
    b: &LmBatch,
    mode: Mode,
    device: &Device,
) -> Tensor<1> {
    let hidden = model.forward_hidden(lm.input(b, device), None, mode);
    let [rows, t, h] = hidden.dims();
    let (predicting, targets) = b.after_soft_prompt(model.virtual_positions());
    let flat = hidden.reshape([rows * t, h]);
    let mut per_row: Vec<(Vec<i64>, Vec<u32>)> = vec![(vec![], vec![]); rows];
    for (&at, &target) in predicting.iter().zip(&targets) {
        let r = at as usize / t;
        per_row[r].0.push(at);
        per_row[r].1.push(target as u32);
    }
    let sums: Vec<Tensor<1>> = per_row
        .into_iter()
        .map(|(at, targets)| {
            if at.is_empty() {
                return flat.clone().sum().mul_scalar(0.0);
            }
            let n = at.len();
            let index = Tensor::<1, Int>::from_data(TensorData::new(at, [n]), device);
            let picked = flat.clone().select(0, index);
            model.lm_cross_entropy_sum(picked, &targets).neg()
        })
        .collect();
    Tensor::cat(sums, 0)
}

impl Dpo {
    pub fn new(lm: LanguageModelling, cfg: &DpoConfig, reference: Reference) -> Self {
        Self {
            lm,
            beta: cfg.beta,
            loss_type: cfg.loss_type,
            reference,
            logged: RefCell::new((None, 0)),
        }
    }

    /// The reference's `[2B]` log-probabilities of a batch, a constant on `device`.
    pub fn reference_logps(
        &self,
        policy: &CausalModel,
        b: &DpoBatch,
        device: &Device,
    ) -> Result<Tensor<1>> {
        let plain = device.clone().without_autodiff();
        let logps = match &self.reference {
            Reference::Precomputed => {
                let v = b.reference.clone().ok_or(TrainError::NotPrecomputed)?;
                let n = v.len();
                return Ok(Tensor::from_data(TensorData::new(v, [n]), device));
            }
            Reference::Frozen(m) => row_logps(m, &self.lm, &b.rows, Mode::Eval, &plain),
            Reference::AdapterOff => {
                let mut base = policy.valid();
                whet_peft::set_adapters_enabled(&mut base, false);
                row_logps(&base, &self.lm, &b.rows, Mode::Eval, &plain)
            }
        };
        // Onto the training device as a constant: the same memory, nothing read back.
        Ok(if device.is_autodiff() {
            logps.autodiff()
        } else {
            logps
        })
    }

    fn output(
        &self,
        model: &CausalModel,
        b: &DpoBatch,
        mode: Mode,
        device: &Device,
    ) -> Result<DpoOutput> {
        let reference = self.reference_logps(model, b, device)?;
        let policy = PairLogps {
            logps: row_logps(model, &self.lm, &b.rows, mode, device),
            lengths: b.lengths.clone(),
        };
        Ok(dpo_loss(&policy, reference, self.beta, self.loss_type))
    }

    /// Stores each example's reference log-probabilities (in batches of `batch_size`), from
    /// the adapter-off base or the frozen copy: call before switching to `Precomputed`.
    pub fn precompute(
        &self,
        policy: &CausalModel,
        data: &mut [DpoExample],
        batch_size: usize,
        device: &Device,
    ) -> Result<()> {
        for chunk in data.chunks_mut(batch_size.max(1)) {
            let items: Vec<&DpoExample> = chunk.iter().collect();
            let mut b = self.collate(&items);
            b.reference = None;
            let r = self.reference_logps(policy, &b, device)?;
            let v: Vec<f32> = r
                .into_data()
                .convert::<f32>()
                .try_to_vec::<f32>()
                .unwrap_or_default();
            let n = chunk.len();
            for (i, e) in chunk.iter_mut().enumerate() {
                e.reference = Some((v[i], v[n + i]));
            }
        }
        Ok(())
    }
}

impl Objective for Dpo {
    type Model = CausalModel;
    type Example = DpoExample;
    type Batch = DpoBatch;

    fn length(&self, pair: &DpoExample) -> usize {
        pair.chosen.ids.len().max(pair.rejected.ids.len())
    }

    fn collate(&self, items: &[&DpoExample]) -> DpoBatch {
        let rows: Vec<&LmExample> = items
            .iter()
            .map(|p| &p.chosen)
            .chain(items.iter().map(|p| &p.rejected))
            .collect();
        // IPO divides by the completion mask's sum, as trl does.
        let lengths = rows
            .iter()
            .map(|e| e.labels.iter().filter(|&&l| l != IGNORE).count())
            .collect();
        let reference = items
            .iter()
            .map(|p| p.reference.map(|r| r.0))
            .chain(items.iter().map(|p| p.reference.map(|r| r.1)))
            .collect::<Option<Vec<f32>>>();
        DpoBatch {
            pairs: items.len(),
            rows: self.lm.collate(&rows),
            lengths,
            reference,
        }
    }

    fn counts(&self, b: &DpoBatch) -> BatchCounts {
        BatchCounts {
            units: b.pairs,
            samples: b.pairs,
            tokens: b.rows.tokens,
            positions: b.rows.batch * b.rows.len,
        }
    }

    fn summed_loss(&self, model: &CausalModel, b: &DpoBatch, device: &Device) -> Result<Tensor<1>> {
        let out = self.output(model, b, Mode::Train, device)?;
        let sums = out.metric_sums();
        let mut logged = self.logged.borrow_mut();
        logged.0 = Some(match logged.0.take() {
            Some(s) => s + sums,
            None => sums,
        });
        logged.1 += b.pairs;
        Ok(out.loss.mul_scalar(b.pairs as f64))
    }

    /// The step's mean chosen and rejected rewards, margin and accuracy, as trl logs them.
    /// On a GPU they stay there until the step is logged.
    fn take_step_metrics(&self) -> BTreeMap<String, Reading> {
        let (sums, n) = std::mem::take(&mut *self.logged.borrow_mut());
        let Some(sums) = sums else {
            return BTreeMap::new();
        };
        let means = sums.div_scalar(n.max(1) as f64);
        let at = |i: usize| means.clone().narrow(0, i, 1);
        BTreeMap::from([
            ("rewards/chosen".into(), Reading::of(at(0))),
            ("rewards/rejected".into(), Reading::of(at(1))),
            ("rewards/margins".into(), Reading::of(at(0) - at(1))),
            ("rewards/accuracies".into(), Reading::of(at(2))),
        ])
    }

    /// Mean loss and the reward metrics over `data`, in evaluation mode.
    fn evaluate(
        &self,
        model: &CausalModel,
        data: &[DpoExample],
        batch_size: usize,
        device: &Device,
    ) -> Result<Evaluation> {
        let model = &model.valid();
        let device = &device.clone().without_autodiff();
        let (mut loss, mut sums) = (0.0, BTreeMap::<String, f64>::new());
        for chunk in data.chunks(batch_size.max(1)) {
            let items: Vec<&DpoExample> = chunk.iter().collect();
            let b = self.collate(&items);
            let out = self.output(model, &b, Mode::Eval, device)?;
            let n = chunk.len() as f64;
            loss += out.loss.clone().into_scalar::<f32>() as f64 * n;
            for (k, v) in out.metrics() {
                *sums.entry(k).or_default() += v * n;
            }
        }
        let n = data.len().max(1) as f64;
        Ok(Evaluation {
            loss: loss / n,
            metrics: sums.into_iter().map(|(k, v)| (k, v / n)).collect(),
            report: None,
        })
    }
}

/// trl's implicit prompt (`trl.data_utils.extract_prompt`): the common start of `chosen` and
/// `rejected` (in characters), the answers being the rest. As trl does, a space just before
/// the first difference goes to the answers ("The sky is" + " blue."), and when one answer is a
/// prefix of the other, their last common character goes to the answers too ("ab" + "c" /
/// "cdef"). One departure: when the texts differ from their first character, trl's index `-1`
/// would make all of `chosen` but its last character the prompt if `chosen` ends in a space;
/// whet keeps the prompt empty there.
pub fn split_implicit_prompt(chosen: &str, rejected: &str) -> (String, String, String) {
    // Byte offsets of chosen's characters, with its length at the end.
    let starts: Vec<usize> = chosen
        .char_indices()
        .map(|(i, _)| i)
        .chain([chosen.len()])
        .collect();
    let shared = chosen
        .chars()
        .zip(rejected.chars())
        .take_while(|(a, b)| a == b)
        .count();
    let common = chosen.chars().count().min(rejected.chars().count());
    let at = if shared == common {
        // No difference within the shorter text: trl's loop ends on its last index.
        shared.saturating_sub(1)
    } else if shared > 0 && chosen[starts[shared - 1]..].starts_with(' ') {
        shared - 1
    } else {
        shared
    };
    // The first `at` characters are shared, so the offset is the same in both texts.
    let cut = starts[at];
    (
        chosen[..cut].to_string(),
        chosen[cut..].to_string(),
        rejected[cut..].to_string(),
    )
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Tokenizes a pair as trl 1.16's `DPOTrainer` does: no special tokens added, the EOS text
/// appended to each answer that does not end with it, the prompt split off as
/// [`split_implicit_prompt`] does when the pair has none, the answer starting where the
/// tokenized prompt and prompt + answer diverge (a conversation: the chat template's tokens,
/// the prompt rendered with the generation prompt, no EOS appended, its implicit prompt taken
/// out by turns in `render_chats`); then
/// each sequence cut to `max_length` (`Side::Right` keeps the start, trl's `keep_start`).
/// `None` when the prompt alone fills `max_length` with `keep_start` (trl drops those).
pub fn encode_dpo_pair(
    tokenizer: &TextTokenizer,
    pair: &PreferencePair,
    max_length: usize,
    side: whet_data::Side,
) -> Result<Option<DpoExample>> {
    let enc = |t: &str| {
        tokenizer
            .encode(t, false)
            .map_err(|e| TrainError::encode(&pair.origin, e))
    };
    let (p, c, r) = match &pair.messages {
        // Conversations as trl tokenizes them: the prompt with the generation prompt, prompt +
        // answer whole, the template's tokens only (no EOS appended).
        Some(m) => {
            let render = |turns: &[whet_text::ChatMessage], generation_prompt: bool| {
                tokenizer
                    .apply_chat_template(turns, generation_prompt)
                    .map_err(|e| TrainError::row(&pair.origin, e.to_string()))
            };
            let whole = |answer: &[whet_text::ChatMessage]| -> Result<Vec<u32>> {
                let turns: Vec<_> = m.prompt.iter().chain(answer).cloned().collect();
                enc(&render(&turns, false)?)
            };
            let p = if m.prompt.is_empty() {
                vec![]
            } else {
                enc(&render(&m.prompt, true)?)?
            };
            (p, whole(&m.chosen)?, whole(&m.rejected)?)
        }
        None => {
            let (prompt, chosen, rejected) = if pair.prompt.is_empty() {
                split_implicit_prompt(&pair.chosen, &pair.rejected)
            } else {
                (
                    pair.prompt.clone(),
                    pair.chosen.clone(),
                    pair.rejected.clone(),
                )
            };
            // trl appends the EOS *text* to each answer that does not end with it, then
            // tokenizes; an empty answer after a prompt ending in EOS text still gets one.
            let with_eos = |answer: &str| match &tokenizer.eos {
                Some(e) if !answer.ends_with(&e.text) => format!("{prompt}{answer}{}", e.text),
                _ => format!("{prompt}{answer}"),
            };
            (
                enc(&prompt)?,
                enc(&with_eos(&chosen))?,
                enc(&with_eos(&rejected))?,
            )
        }
    };
    let prompt_len = common_prefix(&p, &c).min(common_prefix(&p, &r));
    if side == whet_data::Side::Right && prompt_len >= max_length {
        return Ok(None);
    }
    let example = |ids: Vec<u32>| -> Result<LmExample> {
        let mut labels: Vec<i64> = ids
            .iter()
            .enumerate()
            .map(|(i, &t)| if i < prompt_len { IGNORE } else { t as i64 })
            .collect();
        let mut ids = ids;
        if ids.len() > max_length {
            let cut = match side {
                whet_data::Side::Right => 0..max_length,
                whet_data::Side::Left => ids.len() - max_length..ids.len(),
            };
            ids = ids[cut.clone()].to_vec();
            labels = labels[cut].to_vec();
        }
        if labels.iter().skip(1).all(|&l| l == IGNORE) {
            return Err(TrainError::row(
                &pair.origin,
                "the answer has no token to learn after tokenization (empty answer?)",
            ));
        }
        let n = ids.len();
        Ok(LmExample {
            ids,
            labels,
            position_ids: (0..n as u32).collect(),
            document_ids: vec![0; n],
            origin: pair.origin.clone(),
        })
    };
    Ok(Some(DpoExample {
        chosen: example(c)?,
        rejected: example(r)?,
        reference: None,
    }))
}

/// Everything a DPO run prepared before training.
pub struct DpoPrepared {
    pub checkpoint: Checkpoint,
    pub tokenizer: TextTokenizer,
    pub train: Vec<DpoExample>,
    pub validation: Option<Vec<DpoExample>>,
    pub test: Option<Vec<DpoExample>>,
    /// Pairs left out because the prompt alone fills `max_length`.
    pub dropped: usize,
    pub model: CausalModel,
    pub counts: ParamCounts,
    pub adapter: Option<PeftConfig>,
    pub objective: Dpo,
    /// The pairs of each split (`train`, `validation`, `test`) as read, for `OUT/data/`: another
    /// tool can repeat the run on the same split.
    pub rows: Vec<(&'static str, Vec<PreferencePair>)>,
}

/// Reads the pairs, tokenizes them, loads the decoder, keeps the reference (the base with the
/// adapter off, or a frozen copy for full training) and applies the method.
pub fn prepare(recipe: &crate::Recipe, device: &Device) -> Result<DpoPrepared> {
    let d = &recipe.data;
    let cfg = recipe.dpo.clone().unwrap_or_default();
    if !(cfg.beta > 0.0 && cfg.beta.is_finite()) {
        return Err(TrainError::option(
            "dpo.beta",
            format!("must be positive, got {}", cfg.beta),
        ));
    }
    let enc: whet_data::Encoding = d.encoding.parse().map_err(TrainError::Encoding)?;
    let read = |p: &Path| whet_data::read_pairs(p, enc).map_err(TrainError::from);
    let all = read(&d.train)?;
    let validation = d.validation.as_deref().map(read).transpose()?;
    let test = d.test.as_deref().map(read).transpose()?;
    let (train, validation, test) = d.parts(all, validation, test)?;
    let (checkpoint, tokenizer, pad_id) = crate::causal_lm::open_decoder(recipe, "dpo")?;
    // Conversational pairs become texts through the chat template, as trl renders them.
    let render = |p: Vec<PreferencePair>| {
        whet_data::preference::render_chats(p, &tokenizer).map_err(TrainError::from)
    };
    let (train, validation, test) = (
        render(train)?,
        validation.map(render).transpose()?,
        test.map(render).transpose()?,
    );
    if d.max_length > checkpoint.max_positions() {
        return Err(TrainError::ExceedsPositions {
            key: "data.max_length",
            value: d.max_length,
            positions: checkpoint.max_positions(),
            model: recipe.model.clone(),
        });
    }
    let mut rows = vec![("train", train.clone())];
    for (name, part) in [("validation", &validation), ("test", &test)] {
        if let Some(part) = part {
            rows.push((name, part.clone()));
        }
    }
    let mut dropped = 0;
    let mut encode = |pairs: Vec<PreferencePair>| -> Result<Vec<DpoExample>> {
        let mut out = Vec::with_capacity(pairs.len());
        for p in &pairs {
            match encode_dpo_pair(&tokenizer, p, d.max_length, d.side(whet_data::Side::Right))? {
                Some(e) => out.push(e),
                None => dropped += 1,
            }
        }
        Ok(out)
    };
    let mut train = encode(train)?;
    let mut validation = validation.map(&mut encode).transpose()?;
    let mut test = test.map(&mut encode).transpose()?;
    if train.is_empty() {
        return Err(TrainError::dataset(
            &d.train,
            format!(
                "no training pair is left (dropped {dropped} whose prompt fills max_length = {})",
                d.max_length
            ),
        ));
    }
    let mut model = checkpoint.load_causal_lm(device)?;
    let frozen = (recipe.method == crate::Method::Full).then(|| model.valid());
    let (counts, adapter) =
        crate::causal_lm::apply_decoder_method(&mut model, recipe, &tokenizer, device)?;
    let lm = LanguageModelling {
        pad_id,
        soft_prompt: model.virtual_positions(),
        padding_free: recipe.padding_free(),
        sampler: None,
    };
    let reference = match frozen {
        Some(m) => Reference::Frozen(Box::new(m)),
        None => Reference::AdapterOff,
    };
    let mut objective = Dpo::new(lm, &cfg, reference);
    if cfg.precompute_ref_log_probs {
        let batch = recipe.training.per_device_eval_batch_size;
        for split in [Some(&mut train), validation.as_mut(), test.as_mut()]
            .into_iter()
            .flatten()
        {
            objective.precompute(&model, split, batch, device)?;
        }
        // The frozen copy is no longer needed.
        objective.reference = Reference::Precomputed;
    }
    Ok(DpoPrepared {
        checkpoint,
        tokenizer,
        train,
        validation,
        test,
        dropped,
        model,
        counts,
        adapter,
        objective,
        rows,
    })
}

impl DpoPrepared {
    /// Trains (from a checkpoint folder when `resume` names one).
    pub fn run_training(
        &mut self,
        recipe: &crate::Recipe,
        device: &Device,
        observer: &mut dyn crate::Observer,
        resume: Option<&Path>,
    ) -> Result<crate::TrainSummary> {
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

    /// Saves a `peft` `CAUSAL_LM` adapter or a `transformers` folder, with the tokenizer.
    pub fn save(&self, recipe: &crate::Recipe, out: &Path) -> Result<()> {
        crate::causal_lm::save_decoder(
            &self.checkpoint,
            &self.tokenizer,
            &self.model,
            self.adapter.as_ref(),
            recipe,
            out,
        )
    }
}

/// A DPO run.
pub struct DpoTask {
    p: DpoPrepared,
    run: crate::task::Run,
}

impl DpoTask {
    /// Prepares the run's data, model and reference.
    pub fn open(run: crate::task::Run) -> Result<Self> {
        Ok(Self {
            p: prepare(&run.recipe, &run.device)?,
            run,
        })
    }
}

impl Task for DpoTask {
    fn general_perplexity(&mut self, text: &str, tokens: usize) -> Result<Option<f64>> {
        let p = &self.p;
        crate::causal_lm::general_perplexity(
            &p.model,
            &p.tokenizer,
            text,
            tokens,
            self.run.recipe.data.max_length,
            p.objective.lm.pad_id,
            &self.run.device,
        )
        .map(Some)
    }

    fn split_texts(&self) -> Vec<(&'static str, Vec<whet_data::leakage::Text>)> {
        self.p
            .rows
            .iter()
            .map(|(name, pairs)| (*name, crate::reward::pair_texts(pairs)))
            .collect()
    }

    fn describe(&self) -> Vec<String> {
        let (p, recipe) = (&self.p, &self.run.recipe);
        let cfg = recipe.dpo.clone().unwrap_or_default();
        vec![
            format!(
                "model {} ({}), method {:?}, DPO (beta {}, {:?} loss; reference: {})",
                recipe.model.display(),
                p.checkpoint.family(),
                recipe.method,
                cfg.beta,
                cfg.loss_type,
                match p.objective.reference {
                    Reference::AdapterOff => "the base with the adapter off",
                    Reference::Frozen(_) => "a frozen copy of the starting model",
                    Reference::Precomputed => "log-probabilities precomputed before training",
                }
            ),
            format!(
                "data: {} train / {} validation / {} test pairs, max_length {}{}",
                p.train.len(),
                p.validation.as_ref().map_or(0, |s| s.len()),
                p.test.as_ref().map_or(0, |s| s.len()),
                recipe.data.max_length,
                if p.dropped > 0 {
                    format!(
                        " ({} pairs dropped: the prompt fills max_length)",
                        p.dropped
                    )
                } else {
                    String::new()
                }
            ),
            p.counts.line(),
        ]
    }

    fn plan(&mut self) -> Option<crate::plan::MemoryPlan> {
        let p = &mut self.p;
        let lens = p
            .train
            .iter()
            .flat_map(|e| {
                [
                    crate::plan::lm_lens(&e.chosen),
                    crate::plan::lm_lens(&e.rejected),
                ]
            })
            .collect();
        let args = &self.run.recipe.training;
        let mut plan = crate::plan::plan_of(&p.checkpoint, &mut p.model, args, lens, true, 2);
        // Full training keeps the frozen reference's weights once more (the trained ones part
        // from them at the first update).
        if matches!(p.objective.reference, Reference::Frozen(_)) {
            plan.weights *= 2;
            plan.total += plan.weights / 2;
        }
        Some(plan)
    }

    fn write_data(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
        for (name, pairs) in &self.p.rows {
            let text: String = pairs
                .iter()
                .map(|r| {
                    serde_json::json!({"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected})
                        .to_string()
                        + "\n"
                })
                .collect();
            whet_text::write_atomic(&dir.join(format!("{name}.jsonl")), text.as_bytes())?;
        }
        Ok(())
    }

    fn total_steps(&self) -> usize {
        self.run.recipe.training.total_steps(self.p.train.len())
    }

    fn train(&mut self, observer: &mut dyn crate::Observer) -> Result<crate::TrainSummary> {
        let run = &self.run;
        self.p
            .run_training(&run.recipe, &run.device, observer, run.resume.as_deref())
    }

    fn evaluate(&mut self, _summary: &crate::TrainSummary) -> Result<Outcome> {
        let p = &self.p;
        let batch = self.run.recipe.training.per_device_eval_batch_size;
        let mut out = Outcome::default();
        for (name, split) in [("eval", &p.validation), ("test", &p.test)] {
            if let Some(split) = split {
                let e =
                    Objective::evaluate(&p.objective, &p.model, split, batch, &self.run.device)?;
                out.results.extend(e.results(name));
                out.lines.push(format!(
                    "{name}: loss {:.4}, reward accuracy {:.4}, mean margin {:.3} ({} pairs)",
                    e.loss,
                    e.metrics["rewards/accuracies"],
                    e.metrics["rewards/margins"],
                    split.len()
                ));
            }
        }
        Ok(out)
    }

    fn save(&self, out: &Path) -> Result<()> {
        self.p.save(&self.run.recipe, out)
    }

    fn counts(&self) -> ParamCounts {
        self.p.counts
    }

    fn report(&self) -> Report {
        Report {
            unit: "pairs",
            curve_metric: "rewards/accuracies",
            adapter: self.p.adapter.is_some(),
            files: "all_results.json, trainer_state.json, recipe.resolved.toml, loss_curve.png",
        }
    }
}
