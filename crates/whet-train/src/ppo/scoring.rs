//! Scoring: the trained reward model that reads prompt + response and gives one number.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use whet_data::{Encoded, Target, collate};
use whet_models::{Checkpoint, Classifier, Mode, TextTokenizer};

use super::maths::values;
use crate::error::{Result, TrainError};

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
        let (model, fresh) = ck.load_classifier(&device).map_err(|e| origin(e.into()))?;
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
            let (input, _) = crate::classification::objective::to_input(
                &b,
                &self.device,
                self.with_types,
                1,
                true,
            );
            let scores = self.model.forward(input, Mode::Eval)?;
            out.extend(values(scores.reshape([chunk.len()])));
        }
        Ok(out)
    }
}
