//! Token classification end to end (`run_ner.py`'s task: named entities, parts of speech): a
//! list of words and their tags a row, each word's tag learnt on its first token, the
//! cross-entropy over the tagged tokens of an optimizer step (as the Trainer divides by
//! `num_items_in_batch`), seqeval's entity precision / recall / F1 and token accuracy, and a
//! `*ForTokenClassification` folder (or a `peft` adapter of task type `TOKEN_CLS`).

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::Module;
use burn::tensor::{Device, Int, Tensor, TensorData};
use whet_data::{
    Encoding, IGNORE_TAG, Labels, Table, TokenBatch, TokenColumns, TokenEncoded, TokenExample,
    collate_tokens, token_examples, tokenize_words,
};
use whet_metrics::entity_report;
use whet_models::bert::EncoderInput;
use whet_models::unpad::Unpadded;
use whet_models::{Checkpoint, Head, Mode, TextTokenizer, TokenClassifier};
use whet_peft::{ParamCounts, PeftConfig};

use crate::error::{Result, TrainError};
use crate::recipe::Recipe;
use crate::task::{Outcome, Report, Task, one_line};
use crate::trainer::{BatchCounts, Evaluation, Objective};

/// The token head (trained in full with an adapter).
const HEAD_MODULES: &[&str] = &["classifier"];

/// Token classification over `n_tags` tags.
pub struct TokenClassification {
    pub pad_id: u32,
    /// Tag names in id order (for the entity metrics).
    pub tags: Vec<String>,
    /// Batches run without their padding (`training.padding_free`).
    pub padding_free: bool,
}

/// Logits `[B, T, C]` of a padded batch (padding-free when asked).
pub fn logits(
    model: &TokenClassifier,
    b: &TokenBatch,
    mode: Mode,
    padding_free: bool,
    device: &Device,
) -> Tensor<3> {
    let t = |v: &Vec<i64>| {
        Tensor::<2, Int>::from_data(TensorData::new(v.clone(), [b.batch, b.len]), device)
    };
    model.forward(
        EncoderInput {
            input_ids: t(&b.input_ids),
            attention_mask: t(&b.attention_mask),
            token_type_ids: Some(t(&b.token_type_ids)),
            unpadded: padding_free.then(|| Unpadded::from_mask(&b.attention_mask, b.batch, b.len)),
        },
        mode,
    )
}

/// The cross-entropy of the tagged tokens, summed (tokens tagged [`IGNORE_TAG`] left out, as
/// `CrossEntropyLoss(ignore_index=-100)`).
fn summed_tag_loss(logits: Tensor<3>, b: &TokenBatch, device: &Device) -> Tensor<1> {
    let [n, t, c] = logits.dims();
    let logp = burn::tensor::activation::log_softmax(logits.reshape([n * t, c]), 1);
    let tags: Vec<i64> = b.tags.iter().map(|&x| x.max(0)).collect();
    let keep: Vec<f32> = b
        .tags
        .iter()
        .map(|&x| if x == IGNORE_TAG { 0.0 } else { 1.0 })
        .collect();
    let idx = Tensor::<2, Int>::from_data(TensorData::new(tags, [n * t, 1]), device);
    let keep = Tensor::<2>::from_data(TensorData::new(keep, [n * t, 1]), device);
    -(logp.gather(1, idx) * keep).sum()
}

impl Objective for TokenClassification {
    type Model = TokenClassifier;
    type Example = TokenEncoded;
    type Batch = TokenBatch;

    fn collate(&self, items: &[&TokenEncoded]) -> TokenBatch {
        collate_tokens(items, self.pad_id)
    }

    fn length(&self, example: &TokenEncoded) -> usize {
        example.ids.len()
    }

    fn counts(&self, b: &TokenBatch) -> BatchCounts {
        BatchCounts {
            units: b.tagged,
            samples: b.batch,
            tokens: b.tokens,
            positions: b.batch * b.len,
        }
    }

    fn summed_loss(
        &self,
        model: &TokenClassifier,
        b: &TokenBatch,
        device: &Device,
    ) -> Result<Tensor<1>> {
        let x = logits(model, b, Mode::Train, self.padding_free, device);
        Ok(summed_tag_loss(x, b, device))
    }

    fn evaluate(
        &self,
        model: &TokenClassifier,
        data: &[TokenEncoded],
        batch_size: usize,
        device: &Device,
    ) -> Result<Evaluation> {
        let model = &model.valid();
        let device = &device.clone().without_autodiff();
        let (mut loss, mut tagged) = (0.0, 0);
        let (mut truth, mut predicted): (Vec<Vec<&str>>, Vec<Vec<&str>>) = (vec![], vec![]);
        for chunk in data.chunks(batch_size.max(1)) {
            let items: Vec<&TokenEncoded> = chunk.iter().collect();
            let b = collate_tokens(&items, self.pad_id);
            let x = logits(model, &b, Mode::Eval, self.padding_free, device);
            loss += summed_tag_loss(x.clone(), &b, device).into_scalar::<f32>() as f64;
            tagged += b.tagged;
            let best: Vec<i64> = x
                .argmax(2)
                .into_data()
                .convert::<i64>()
                .try_to_vec()
                .unwrap_or_default();
            // run_ner.py scores the tagged tokens only (each word's first token).
            for r in 0..b.batch {
                let (mut t, mut p) = (vec![], vec![]);
                for k in 0..b.len {
                    let tag = b.tags[r * b.len + k];
                    if tag != IGNORE_TAG {
                        t.push(self.tags[tag as usize].as_str());
                        p.push(self.tags[best[r * b.len + k] as usize].as_str());
                    }
                }
                truth.push(t);
                predicted.push(p);
            }
        }
        let r = entity_report(&truth, &predicted);
        Ok(Evaluation {
            loss: loss / tagged.max(1) as f64,
            metrics: BTreeMap::from([
                ("precision".to_string(), r.precision),
                ("recall".to_string(), r.recall),
                ("f1".to_string(), r.f1),
                ("accuracy".to_string(), r.accuracy),
            ]),
            report: None,
        })
    }
}

/// A split: sentences and their tokens.
pub struct TokenSplit {
    pub examples: Vec<TokenExample>,
    pub encoded: Vec<TokenEncoded>,
}

/// Everything a run prepared before training.
pub struct TokenPrepared {
    pub checkpoint: Checkpoint,
    pub tokenizer: TextTokenizer,
    pub labels: Labels,
    pub columns: TokenColumns,
    pub train: TokenSplit,
    pub validation: Option<TokenSplit>,
    pub test: Option<TokenSplit>,
    pub pad_id: u32,
    pub model: TokenClassifier,
    pub counts: ParamCounts,
    pub adapter: Option<PeftConfig>,
    pub fresh: Vec<String>,
}

/// Reads the sentences, fixes the tags, tokenizes, loads the model and applies the method.
pub fn prepare(recipe: &Recipe, device: &Device) -> Result<TokenPrepared> {
    let d = &recipe.data;
    let enc: Encoding = d.encoding.parse().map_err(TrainError::Encoding)?;
    let read = |p: &Path| Table::read(p, enc).map_err(TrainError::from);
    let train_table = read(&d.train)?;
    let columns = TokenColumns::for_table(&train_table, &d.text_column, &d.label_column);
    let labels = match &d.label_names {
        Some(names) => Labels(names.clone()),
        None => Labels::infer(&train_table, &columns.tags)?,
    };
    let all = token_examples(&train_table, &columns, &labels)?;
    let load = |p: &Option<std::path::PathBuf>| -> Result<Option<Vec<TokenExample>>> {
        p.as_deref()
            .map(|p| Ok(token_examples(&read(p)?, &columns, &labels)?))
            .transpose()
    };
    let (validation, test) = (load(&d.validation)?, load(&d.test)?);
    let (train, validation, test) = d.parts(all, validation, test)?;
    if train.is_empty() {
        return Err(TrainError::dataset(&d.train, "the training split is empty"));
    }
    let mut checkpoint = Checkpoint::open(&recipe.model)?;
    checkpoint.quantization = crate::method::quant_policy(recipe, HEAD_MODULES);
    if d.max_length > checkpoint.max_positions() {
        return Err(TrainError::ExceedsPositions {
            key: "data.max_length",
            value: d.max_length,
            positions: checkpoint.max_positions(),
            model: recipe.model.clone(),
        });
    }
    checkpoint.set_labels(&labels.0);
    let tokenizer = checkpoint.tokenizer()?;
    let pad_id = checkpoint
        .pad_token_id()
        .or(tokenizer.pad.as_ref().map(|p| p.id))
        .unwrap_or(0);
    let tok = |examples: Vec<TokenExample>| -> Result<TokenSplit> {
        let encoded = tokenize_words(&tokenizer, &examples, d.max_length)?;
        Ok(TokenSplit { examples, encoded })
    };
    let train = tok(train)?;
    let validation = validation.map(tok).transpose()?;
    let test = test.map(tok).transpose()?;
    let (mut model, fresh) = checkpoint.load_token_classifier(device)?;
    let head = |name: &str| name.starts_with("classifier.");
    // peft's task_type = "TOKEN_CLS" saves the head with the adapter.
    let (counts, adapter) = crate::method::apply(
        &mut model,
        recipe,
        Some(&head),
        HEAD_MODULES,
        &tokenizer,
        device,
    )?;
    Ok(TokenPrepared {
        checkpoint,
        tokenizer,
        labels,
        columns,
        train,
        validation,
        test,
        pad_id,
        model,
        counts,
        adapter,
        fresh,
    })
}

/// The objective of a prepared run.
pub fn objective(p: &TokenPrepared, recipe: &Recipe) -> TokenClassification {
    TokenClassification {
        pad_id: p.pad_id,
        tags: p.labels.0.clone(),
        padding_free: recipe.padding_free(),
    }
}

/// A token-classification run.
pub struct TokenClassificationTask {
    p: TokenPrepared,
    run: crate::task::Run,
}

impl TokenClassificationTask {
    /// Prepares the run's data and model.
    pub fn open(run: crate::task::Run) -> Result<Self> {
        Ok(Self {
            p: prepare(&run.recipe, &run.device)?,
            run,
        })
    }
}

impl Task for TokenClassificationTask {
    fn split_texts(&self) -> Vec<(&'static str, Vec<whet_data::leakage::Text>)> {
        let p = &self.p;
        crate::task::splits(&p.train, p.validation.as_ref(), p.test.as_ref())
            .map(|(name, split)| {
                let texts = split.examples.iter().map(|e| whet_data::leakage::Text {
                    origin: e.origin.clone(),
                    text: e.words.join(" "),
                });
                (name, texts.collect())
            })
            .collect()
    }

    fn describe(&self) -> Vec<String> {
        let (p, recipe) = (&self.p, &self.run.recipe);
        let n = |s: Option<&TokenSplit>| s.map_or(0, |s| s.examples.len());
        let mut lines = vec![
            format!(
                "model {} ({}), method {:?}, token classification, {} tags: {}",
                recipe.model.display(),
                p.checkpoint.family(),
                recipe.method,
                p.labels.len(),
                p.labels.0.join(", ")
            ),
            format!(
                "data: {} train / {} validation / {} test sentences (columns {} / {}), \
                 max_length {}",
                n(Some(&p.train)),
                n(p.validation.as_ref()),
                n(p.test.as_ref()),
                p.columns.tokens,
                p.columns.tags,
                recipe.data.max_length
            ),
        ];
        lines.extend(crate::task::closing_lines(&p.fresh, &p.counts));
        lines
    }

    fn plan(&mut self) -> Option<crate::plan::MemoryPlan> {
        let p = &mut self.p;
        let lens = p.train.encoded.iter().map(|e| (e.ids.len(), 0)).collect();
        Some(crate::plan::plan_of(
            &p.checkpoint,
            &mut p.model,
            &self.run.recipe.training,
            lens,
            false,
            1,
        ))
    }

    /// The exact splits as JSONL (`tokens`, `ner_tags` as names).
    fn write_data(&self, dir: &Path) -> Result<()> {
        let p = &self.p;
        let splits = crate::task::splits(&p.train, p.validation.as_ref(), p.test.as_ref());
        crate::task::write_splits(dir, splits, |split: &TokenSplit| {
            let row = |e: &TokenExample| {
                let tags: Vec<&str> = e.tags.iter().map(|&t| p.labels.0[t].as_str()).collect();
                serde_json::json!({"tokens": e.words, "ner_tags": tags})
            };
            split.examples.iter().map(row).collect()
        })
    }

    /// A few held-out sentences with their true and predicted tags, word by word.
    fn sample(&mut self, before: bool) -> Result<Vec<String>> {
        let p = &self.p;
        let split = p
            .validation
            .as_ref()
            .or(p.test.as_ref())
            .unwrap_or(&p.train);
        let objective = objective(p, &self.run.recipe);
        let model = p.model.valid();
        let device = self.run.device.clone().without_autodiff();
        let mut lines = vec![
            if before {
                "before training (random head):"
            } else {
                "after training:"
            }
            .to_string(),
        ];
        for (e, enc) in split.examples.iter().zip(&split.encoded).take(3) {
            let b = collate_tokens(&[enc], p.pad_id);
            let best: Vec<i64> = logits(&model, &b, Mode::Eval, objective.padding_free, &device)
                .argmax(2)
                .into_data()
                .convert::<i64>()
                .try_to_vec()
                .unwrap_or_default();
            let predicted: Vec<&str> = (0..b.len)
                .filter(|&k| b.tags[k] != IGNORE_TAG)
                .map(|k| p.labels.0[best[k] as usize].as_str())
                .collect();
            let words: Vec<String> = e
                .words
                .iter()
                .zip(&e.tags)
                .zip(predicted.iter().chain(std::iter::repeat(&"-")))
                .map(|((w, &t), pr)| format!("{w}/{}/{pr}", p.labels.0[t]))
                .collect();
            lines.push(format!("  {}", one_line(&words.join(" "), 110)));
        }
        lines.push("  (word/true/predicted)".into());
        Ok(lines)
    }

    fn total_steps(&self) -> usize {
        self.run
            .recipe
            .training
            .total_steps(self.p.train.encoded.len())
    }

    fn labels(&self) -> Vec<String> {
        self.p.labels.0.clone()
    }

    fn train(&mut self, observer: &mut dyn crate::Observer) -> Result<crate::TrainSummary> {
        let run = &self.run;
        let objective = objective(&self.p, &run.recipe);
        let eval = self.p.validation.as_ref().map(|s| s.encoded.as_slice());
        crate::trainer::train(
            &objective,
            &mut self.p.model,
            &self.p.train.encoded,
            eval,
            &run.recipe.training,
            &run.device,
            observer,
            run.resume.as_deref(),
        )
    }

    fn evaluate(&mut self, _summary: &crate::TrainSummary) -> Result<Outcome> {
        let p = &self.p;
        let objective = objective(p, &self.run.recipe);
        let batch = self.run.recipe.training.per_device_eval_batch_size;
        let mut out = Outcome::default();
        for (name, split) in [("eval", &p.validation), ("test", &p.test)] {
            if let Some(split) = split {
                let e = objective.evaluate(&p.model, &split.encoded, batch, &self.run.device)?;
                out.results.extend(e.results(name));
                out.lines.push(format!(
                    "{name}: loss {:.4}, entity precision {:.4}, recall {:.4}, F1 {:.4}, \
                     token accuracy {:.4} ({} sentences)",
                    e.loss,
                    e.metrics["precision"],
                    e.metrics["recall"],
                    e.metrics["f1"],
                    e.metrics["accuracy"],
                    split.examples.len()
                ));
            }
        }
        Ok(out)
    }

    /// A `peft` adapter (`TOKEN_CLS`) or a `*ForTokenClassification` folder, with the
    /// tokenizer and `labels.json` (the tags, max_length, the columns).
    fn save(&self, out: &Path) -> Result<()> {
        let (p, recipe) = (&self.p, &self.run.recipe);
        std::fs::create_dir_all(out).map_err(|e| TrainError::io(out, e))?;
        match &p.adapter {
            Some(cfg) => crate::output::save_adapter(&p.model, cfg, recipe, "TOKEN_CLS", out)?,
            None => {
                p.checkpoint
                    .write_labelled_config(&p.labels.0, Head::TokenClassification, out)?;
                crate::output::save_weights(&p.model, out)?;
            }
        }
        p.checkpoint.write_tokenizer_files(&p.tokenizer, out)?;
        let info = serde_json::json!({
            "task": "token-classification",
            "labels": p.labels.0,
            "max_length": recipe.data.max_length,
            "text_column": p.columns.tokens,
            "label_column": p.columns.tags,
            "base_model": recipe.model,
        });
        whet_models::fsutil::write_atomic(&out.join("labels.json"), info.to_string().as_bytes())?;
        Ok(())
    }

    fn counts(&self) -> ParamCounts {
        self.p.counts
    }

    fn report(&self) -> Report {
        Report {
            unit: "sentences",
            curve_metric: "f1",
            adapter: self.p.adapter.is_some(),
            files: "labels.json, all_results.json, trainer_state.json, recipe.resolved.toml, loss_curve.png: train loss faint with its smoothed curve in blue, eval loss red and eval entity F1 green, squares at the evaluations",
        }
    }
}
