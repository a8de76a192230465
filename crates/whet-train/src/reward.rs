//! Reward modelling (`task = "reward-model"`, issue 6): a sequence classifier with one output
//! scores a text, trained on ranked pairs with `trl`'s `RewardTrainer` loss
//! `-log sigmoid(r_chosen - r_rejected)`, averaged over pairs. As in `trl`, a batch of `B`
//! pairs runs as one `[2B, T]` forward pass, chosen rows first.

use std::collections::BTreeMap;

use burn::tensor::activation::log_sigmoid;
use burn::tensor::{Device, Tensor};
use whet_data::{Encoded, Target, collate};
use whet_models::{Classifier, Mode};

use crate::seqcls::to_input;
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
    ) -> Result<(Tensor<1>, Tensor<1>), String> {
        let (input, _) = to_input(&b.rows, device, self.with_types, 1);
        let scores = model.forward(input, mode).map_err(|e| e.to_string())?;
        let [rows, width] = scores.dims();
        if width != 1 {
            return Err(format!(
                "a reward model has one output; this head has {width} (num_labels must be 1)"
            ));
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
        }
    }

    fn summed_loss(
        &self,
        model: &Classifier,
        b: &PairBatch,
        device: &Device,
    ) -> Result<Tensor<1>, String> {
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
    ) -> Result<Evaluation, String> {
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
