//! Reward modelling (`task = "reward-model"`, issue 6): a sequence classifier with one output
//! scores a text, trained on ranked pairs with `trl`'s `RewardTrainer` loss
//! `-log sigmoid(r_chosen - r_rejected)`, averaged over pairs. As in `trl`, a batch of `B`
//! pairs runs as one `[2B, T]` forward pass, chosen rows first.

use std::collections::BTreeMap;

use burn::tensor::activation::log_sigmoid;
use burn::tensor::{Device, Tensor};
use whet_data::{Encoded, Target, collate};
use whet_models::{Classifier, Mode};

use crate::classification::objective::to_input;
use crate::error::{Result, TrainError};
use crate::task::{Outcome, Report, Task};
use crate::trainer::{BatchCounts, Evaluation, Objective};

/// A tokenized preference pair.
#[derive(Debug, Clone)]
pub struct EncodedPair {
    pub chosen: Encoded,
    pub rejected: Encoded,
}

/// The pairwise objective.
pub struct PairwiseReward {
    pub pad_id: u32,
    /// Whether the model takes token type ids (the BERT family).
    pub with_types: bool,
    /// Batches run without their padding (`training.padding_free`).
    pub padding_free: bool,
}

/// Chosen rows then rejected rows, padded to the longest of both.
pub struct PairBatch {
    pub pairs: usize,
    rows: whet_data::Batch,
}

impl PairwiseReward {
    /// Rewards of the chosen and of the rejected rows.
    ///
    /// # Shapes
    /// - outputs `[B]` each
    fn rewards(
        &self,
        model: &Classifier,
        b: &PairBatch,
        mode: Mode,
        device: &Device,
    ) -> Result<(Tensor<1>, Tensor<1>)> {
        let (input, _) = to_input(&b.rows, device, self.with_types, 1, self.padding_free);
        let scores = model.forward(input, mode)?;
        let [rows, width] = scores.dims();
        if width != 1 {
            return Err(TrainError::Unsuitable(format!(
                "a reward model has one output; this head has {width} (num_labels must be 1)"
            )));
        }
        // (2B, 1) -> (2B) -> (B) chosen, (B) rejected
        let r = scores.reshape([rows]);
        let n = b.pairs;
        Ok((r.clone().slice(0..n), r.slice(n..2 * n)))
    }
}

/// `-log sigmoid(chosen - rejected)` summed over pairs.
pub fn pairwise_loss(chosen: Tensor<1>, rejected: Tensor<1>) -> Tensor<1> {
    log_sigmoid(chosen - rejected).neg().sum()
}

impl Objective for PairwiseReward {
    type Model = Classifier;
    type Example = EncodedPair;
    type Batch = PairBatch;

    fn length(&self, pair: &EncodedPair) -> usize {
        pair.chosen.ids.len().max(pair.rejected.ids.len())
    }

    fn collate(&self, items: &[&EncodedPair]) -> PairBatch {
        let rows: Vec<&Encoded> = items
            .iter()
            .map(|p| &p.chosen)
            .chain(items.iter().map(|p| &p.rejected))
            .collect();
        PairBatch {
            pairs: items.len(),
            rows: collate(&rows, self.pad_id),
        }
    }

    fn counts(&self, b: &PairBatch) -> BatchCounts {
        BatchCounts {
            units: b.pairs,
            samples: b.pairs,
            tokens: b.rows.tokens,
            positions: b.rows.batch * b.rows.len,
        }
    }

    fn summed_loss(&self, model: &Classifier, b: &PairBatch, device: &Device) -> Result<Tensor<1>> {
        let (c, r) = self.rewards(model, b, Mode::Train, device)?;
        Ok(pairwise_loss(c, r))
    }

    /// Mean loss, pairwise accuracy (chosen scored above rejected), and the mean chosen and
    /// rejected rewards and margin, as trl logs them.
    fn evaluate(
        &self,
        model: &Classifier,
        data: &[EncodedPair],
        batch_size: usize,
        device: &Device,
    ) -> Result<Evaluation> {
        use burn::module::Module;
        let model = &model.valid();
        let device = &device.clone().without_autodiff();
        let (mut loss, mut right, mut chosen, mut rejected) = (0.0, 0usize, 0.0, 0.0);
        for chunk in data.chunks(batch_size.max(1)) {
            let items: Vec<&EncodedPair> = chunk.iter().collect();
            let b = self.collate(&items);
            let (c, r) = self.rewards(model, &b, Mode::Eval, device)?;
            loss += pairwise_loss(c.clone(), r.clone()).into_scalar::<f32>() as f64;
            let values = |t: Tensor<1>| -> Vec<f32> {
                t.into_data()
                    .convert::<f32>()
                    .try_to_vec::<f32>()
                    .unwrap_or_default()
            };
            let (c, r) = (values(c), values(r));
            right += c.iter().zip(&r).filter(|(a, b)| a > b).count();
            chosen += c.iter().map(|&x| x as f64).sum::<f64>();
            rejected += r.iter().map(|&x| x as f64).sum::<f64>();
        }
        let n = data.len().max(1) as f64;
        Ok(Evaluation {
            loss: loss / n,
            metrics: BTreeMap::from([
                ("accuracy".to_string(), right as f64 / n),
                ("rewards/chosen".to_string(), chosen / n),
                ("rewards/rejected".to_string(), rejected / n),
                ("rewards/margins".to_string(), (chosen - rejected) / n),
            ]),
            report: None,
        })
    }
}

/// A pair tokenized by `encode` (one text to ids and type ids), for [`PairwiseReward`].
pub fn encode_pair(chosen: (Vec<u32>, Vec<u32>), rejected: (Vec<u32>, Vec<u32>)) -> EncodedPair {
    let side = |(ids, type_ids): (Vec<u32>, Vec<u32>)| Encoded {
        ids,
        type_ids,
        label: Target::Class(0),
    };
    EncodedPair {
        chosen: side(chosen),
        rejected: side(rejected),
    }
}

/// The chosen and rejected token ids of a pair, as trl 1.16's `RewardTrainer` makes them: the
/// prompt followed by each answer; plain text with the EOS text appended (when the tokenizer
/// has one and the text does not end with it) and the tokenizer's special tokens; a
/// conversation (rendered by `render_chats`) as the chat template's tokens alone.
pub fn pair_ids(
    tokenizer: &whet_models::TextTokenizer,
    pair: &whet_data::PreferencePair,
) -> Result<(Vec<u32>, Vec<u32>)> {
    let (chosen, rejected) = pair.texts();
    let ids = |text: String| {
        let (text, special) = match &tokenizer.eos {
            _ if pair.is_chat() => (text, false),
            Some(e) if !text.ends_with(&e.text) => (format!("{text}{}", e.text), true),
            _ => (text, true),
        };
        tokenizer
            .encode(&text, special)
            .map_err(|e| TrainError::encode(&pair.origin, e))
    };
    Ok((ids(chosen)?, ids(rejected)?))
}

/// Everything a reward-model run prepared before training.
pub struct RewardPrepared {
    pub checkpoint: whet_models::Checkpoint,
    pub tokenizer: whet_models::TextTokenizer,
    pub train: Vec<EncodedPair>,
    pub validation: Option<Vec<EncodedPair>>,
    pub test: Option<Vec<EncodedPair>>,
    pub pad_id: u32,
    pub model: Classifier,
    pub counts: whet_peft::ParamCounts,
    pub adapter: Option<whet_peft::PeftConfig>,
    /// Head tensors that were initialised (not in the checkpoint).
    pub fresh: Vec<String>,
    /// Pairs whose texts were cut to `max_length`.
    pub truncated: usize,
    /// Each split's pairs as text, for the leakage check.
    pub texts: Vec<(&'static str, Vec<whet_data::leakage::Text>)>,
}

/// Pairs as one text each (the prompt, then both answers), for the leakage check.
pub fn pair_texts(pairs: &[whet_data::PreferencePair]) -> Vec<whet_data::leakage::Text> {
    pairs
        .iter()
        .map(|p| whet_data::leakage::Text {
            origin: p.origin.clone(),
            text: format!("{}{}\n{}", p.prompt, p.chosen, p.rejected),
        })
        .collect()
}

/// The one label of a reward model's head.
const REWARD_LABEL: &str = "reward";

/// Reads the pairs, tokenizes them ([`pair_ids`], cut to `max_length` from the truncation
/// side), loads a one-output classifier and applies the method.
pub fn prepare(recipe: &crate::Recipe, device: &Device) -> Result<RewardPrepared> {
    let d = &recipe.data;
    let enc: whet_data::Encoding = d.encoding.parse().map_err(TrainError::Encoding)?;
    let read = |p: &std::path::Path| whet_data::read_pairs(p, enc).map_err(TrainError::from);
    let all = read(&d.train)?;
    let validation = d.validation.as_deref().map(read).transpose()?;
    let test = d.test.as_deref().map(read).transpose()?;
    let (train, validation, test) = d.parts(all, validation, test)?;
    if train.is_empty() {
        return Err(TrainError::dataset(&d.train, "the training split is empty"));
    }
    let (mut checkpoint, tokenizer, pad_id) = crate::classification::open_checkpoint(recipe)?;
    // Conversational pairs become texts through the chat template, as trl renders them.
    let render = |p: Vec<whet_data::PreferencePair>| {
        whet_data::preference::render_chats(p, &tokenizer).map_err(TrainError::from)
    };
    let (train, validation, test) = (
        render(train)?,
        validation.map(render).transpose()?,
        test.map(render).transpose()?,
    );
    checkpoint.set_labels(&[REWARD_LABEL.to_string()]);
    let mut texts = vec![("train", pair_texts(&train))];
    for (name, split) in [("validation", &validation), ("test", &test)] {
        if let Some(s) = split {
            texts.push((name, pair_texts(s)));
        }
    }
    let mut truncated = 0;
    let mut encode = |pairs: Vec<whet_data::PreferencePair>| -> Result<Vec<EncodedPair>> {
        let mut side = |mut ids: Vec<u32>| -> (Vec<u32>, Vec<u32>) {
            if ids.len() > d.max_length {
                truncated += 1;
                ids = match d.side(whet_data::Side::Right) {
                    whet_data::Side::Right => ids[..d.max_length].to_vec(),
                    whet_data::Side::Left => ids[ids.len() - d.max_length..].to_vec(),
                };
            }
            let n = ids.len();
            (ids, vec![0; n])
        };
        pairs
            .iter()
            .map(|p| {
                let (c, r) = pair_ids(&tokenizer, p)?;
                Ok(encode_pair(side(c), side(r)))
            })
            .collect()
    };
    let train = encode(train)?;
    let validation = validation.map(&mut encode).transpose()?;
    let test = test.map(&mut encode).transpose()?;
    let (mut model, fresh) = checkpoint.load_classifier(device)?;
    let (counts, adapter) =
        crate::classification::apply_method(&mut model, recipe, &tokenizer, device)?;
    Ok(RewardPrepared {
        checkpoint,
        tokenizer,
        train,
        validation,
        test,
        pad_id,
        model,
        counts,
        adapter,
        fresh,
        truncated,
        texts,
    })
}

impl RewardPrepared {
    /// The objective for this model (`padding_free` as `training.padding_free`).
    pub fn objective(&self, padding_free: bool) -> PairwiseReward {
        PairwiseReward {
            pad_id: self.pad_id,
            with_types: matches!(self.model, Classifier::Bert(_)),
            padding_free,
        }
    }

    /// Trains (from a checkpoint folder when `resume` names one).
    pub fn run_training(
        &mut self,
        recipe: &crate::Recipe,
        device: &Device,
        observer: &mut dyn crate::Observer,
        resume: Option<&std::path::Path>,
    ) -> Result<crate::TrainSummary> {
        let objective = self.objective(recipe.padding_free());
        crate::trainer::train(
            &objective,
            &mut self.model,
            &self.train,
            self.validation.as_deref(),
            &recipe.training,
            device,
            observer,
            resume,
        )
    }

    /// Saves a `transformers` folder (one-output `*ForSequenceClassification`) or a peft
    /// `SEQ_CLS` adapter, with the tokenizer and `labels.json`.
    pub fn save(&self, recipe: &crate::Recipe, out: &std::path::Path) -> Result<()> {
        crate::classification::Saved {
            checkpoint: &self.checkpoint,
            tokenizer: &self.tokenizer,
            model: &self.model,
            adapter: self.adapter.as_ref(),
            labels: &[REWARD_LABEL.to_string()],
            problem_type: whet_models::config::ProblemType::Regression,
            columns: None,
        }
        .write(recipe, out)
    }
}

/// A reward-model run.
pub struct RewardTask {
    p: RewardPrepared,
    run: crate::task::Run,
}

impl RewardTask {
    /// Prepares the run's data and model.
    pub fn open(run: crate::task::Run) -> Result<Self> {
        Ok(Self {
            p: prepare(&run.recipe, &run.device)?,
            run,
        })
    }
}

impl Task for RewardTask {
    fn split_texts(&self) -> Vec<(&'static str, Vec<whet_data::leakage::Text>)> {
        self.p.texts.clone()
    }

    fn describe(&self) -> Vec<String> {
        let (p, recipe) = (&self.p, &self.run.recipe);
        let mut lines = vec![
            format!(
                "model {} ({}), method {:?}, reward model (one output, pairwise loss)",
                recipe.model.display(),
                p.checkpoint.family(),
                recipe.method
            ),
            format!(
                "data: {} train / {} validation / {} test pairs, max_length {}{}",
                p.train.len(),
                p.validation.as_ref().map_or(0, |s| s.len()),
                p.test.as_ref().map_or(0, |s| s.len()),
                recipe.data.max_length,
                if p.truncated > 0 {
                    format!(" ({} texts truncated)", p.truncated)
                } else {
                    String::new()
                }
            ),
        ];
        lines.extend(crate::task::closing_lines(&p.fresh, &p.counts));
        lines
    }

    fn plan(&mut self) -> Option<crate::plan::MemoryPlan> {
        let p = &mut self.p;
        let lens = p
            .train
            .iter()
            .flat_map(|e| [(e.chosen.ids.len(), 0), (e.rejected.ids.len(), 0)])
            .collect();
        let args = &self.run.recipe.training;
        Some(crate::plan::plan_of(
            &p.checkpoint,
            &mut p.model,
            args,
            lens,
            false,
            2,
        ))
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
        let objective = p.objective(self.run.recipe.padding_free());
        let batch = self.run.recipe.training.per_device_eval_batch_size;
        let mut out = Outcome::default();
        for (name, split) in [("eval", &p.validation), ("test", &p.test)] {
            if let Some(split) = split {
                let e = Objective::evaluate(&objective, &p.model, split, batch, &self.run.device)?;
                out.results.extend(e.results(name));
                out.lines.push(format!(
                    "{name}: loss {:.4}, pairwise accuracy {:.4}, mean margin {:.3} ({} pairs)",
                    e.loss,
                    e.metrics["accuracy"],
                    e.metrics["rewards/margins"],
                    split.len()
                ));
            }
        }
        Ok(out)
    }

    fn save(&self, out: &std::path::Path) -> Result<()> {
        self.p.save(&self.run.recipe, out)
    }

    fn counts(&self) -> whet_peft::ParamCounts {
        self.p.counts
    }

    fn report(&self) -> Report {
        Report {
            unit: "pairs",
            curve_metric: "accuracy",
            adapter: self.p.adapter.is_some(),
            files: "labels.json, all_results.json, trainer_state.json, recipe.resolved.toml, loss_curve.png",
        }
    }
}
