//! Sequence classification as a training objective: padded batches of encoded texts, the
//! cross-entropy (single-label), binary cross-entropy (multi-label) or squared-error
//! (regression) loss, and evaluation with the classification or regression report.

use std::collections::BTreeMap;

use burn::module::Module;
use burn::tensor::{Device, Tensor};
use whet_data::{Batch, Encoded, LabelKind, Target, collate};
use whet_metrics::{
    ClassificationReport, RegressionReport, classification_report, multilabel_report,
    regression_report,
};
use whet_models::{Classifier, Mode};
// The model input of a padded batch is built as inference builds it; re-exported here for the
// reward model and PPO's scorer, which import it from this module.
pub use whet_infer::classification::{BatchLabels, to_input};

use crate::error::Result;
use crate::optim::Optimizer;
use crate::trainer::{BatchCounts, Evaluation, Objective, read_all, step_objective};

/// Sequence classification over `n_labels` labels.
pub struct Classification {
    pub n_labels: usize,
    pub pad_id: u32,
    /// Whether the model takes token type ids (the BERT family).
    pub with_types: bool,
    /// Batches run without their padding (`training.padding_free`).
    pub padding_free: bool,
}

impl Classification {
    pub fn new(model: &Classifier, n_labels: usize, pad_id: u32, padding_free: bool) -> Self {
        Self {
            n_labels,
            pad_id,
            with_types: matches!(model, Classifier::Bert(_)),
            padding_free,
        }
    }
}

impl Objective for Classification {
    type Model = Classifier;
    type Example = Encoded;
    type Batch = Batch;

    fn collate(&self, items: &[&Encoded]) -> Batch {
        collate(items, self.pad_id)
    }

    fn length(&self, example: &Encoded) -> usize {
        example.ids.len()
    }

    fn counts(&self, b: &Batch) -> BatchCounts {
        BatchCounts {
            units: b.batch,
            samples: b.batch,
            tokens: b.tokens,
            positions: b.batch * b.len,
        }
    }

    fn summed_loss(&self, model: &Classifier, b: &Batch, device: &Device) -> Result<Tensor<1>> {
        let (input, labels) =
            to_input(b, device, self.with_types, self.n_labels, self.padding_free);
        let logits = model.forward(input, Mode::Train)?;
        Ok(summed_loss(logits, labels))
    }

    fn evaluate(
        &self,
        model: &Classifier,
        data: &[Encoded],
        batch_size: usize,
        device: &Device,
    ) -> Result<Evaluation> {
        let (loss, scores, _) = evaluate(
            model,
            data,
            self.n_labels,
            batch_size,
            self.pad_id,
            self.padding_free,
            device,
        )?;
        Ok(Evaluation {
            loss,
            metrics: metrics(&scores),
            report: match scores {
                Scores::Classes(r) => Some(r),
                Scores::Regression(_) => None,
            },
        })
    }
}

/// What an evaluation scored: the classification report, or a regression head's error and
/// correlations.
#[derive(Debug, Clone)]
pub enum Scores {
    Classes(ClassificationReport),
    Regression(RegressionReport),
}

impl Scores {
    /// The classification report (None for a regression).
    pub fn classes(&self) -> Option<&ClassificationReport> {
        match self {
            Scores::Classes(r) => Some(r),
            Scores::Regression(_) => None,
        }
    }
}

/// The headline numbers of a report, named as `evaluate`'s metrics are (F1, precision and
/// recall macro-averaged); for regression `mse`, `pearson` and `spearmanr`, as `run_glue.py`
/// names them.
pub fn metrics(scores: &Scores) -> BTreeMap<String, f64> {
    match scores {
        Scores::Classes(r) => BTreeMap::from([
            ("accuracy".to_string(), r.accuracy),
            ("f1".to_string(), r.macro_avg.f1),
            ("precision".to_string(), r.macro_avg.precision),
            ("recall".to_string(), r.macro_avg.recall),
            ("matthews_correlation".to_string(), r.matthews_correlation),
        ]),
        Scores::Regression(r) => BTreeMap::from([
            ("mse".to_string(), r.mse),
            ("pearson".to_string(), r.pearson),
            ("spearmanr".to_string(), r.spearmanr),
        ]),
    }
}

/// One optimizer step of a classifier over already padded micro-batches (see
/// [`step_objective`]); a non-finite loss names the optimizer's next step.
pub fn optimizer_step(
    model: &mut Classifier,
    opt: &mut Optimizer,
    batches: &[Batch],
    n_labels: usize,
    lr: f64,
    max_grad_norm: f64,
    device: &Device,
) -> Result<(f64, f64)> {
    let objective = Classification::new(model, n_labels, 0, true);
    let step = opt.step + 1;
    let (loss, norm) = step_objective(
        &objective,
        model,
        opt,
        batches,
        lr,
        max_grad_norm,
        step,
        device,
    )?;
    let v = read_all(vec![loss, norm]);
    if !v[0].is_finite() {
        return Err(crate::error::TrainError::NonFiniteLoss {
            loss: "loss",
            step,
            value: v[0],
        });
    }
    Ok((v[0], v[1]))
}

/// The loss of a batch summed over its rows (callers divide by the sample count):
/// cross-entropy for class ids; for multi-hot targets the binary cross-entropy with logits
/// averaged over labels, so that the mean over samples equals `BCEWithLogitsLoss`'s mean over
/// all elements, as `transformers` computes it for `multi_label_classification`; for
/// regression targets the squared error of the one output, so that the mean is `MSELoss` of
/// `logits.squeeze()` (`problem_type = "regression"`).
pub fn summed_loss(logits: Tensor<2>, labels: BatchLabels) -> Tensor<1> {
    let [n, c] = logits.dims();
    match labels {
        BatchLabels::Value(y) => {
            let d = logits.reshape([n * c]) - y;
            (d.clone() * d).sum()
        }
        BatchLabels::Class(ids) => {
            let logp = burn::tensor::activation::log_softmax(logits, 1);
            -logp.gather(1, ids.reshape([n, 1])).sum()
        }
        BatchLabels::MultiHot(y) => {
            // max(x, 0) - x*y + log(1 + exp(-|x|)): stable for logits of any size.
            let x = logits;
            let bce = x.clone().clamp_min(0.0) - x.clone() * y + x.abs().neg().exp().log1p();
            bce.sum().div_scalar(c as f64)
        }
    }
}

/// Predicted targets of a batch of logits: the arg-max class, every label whose sigmoid
/// exceeds 0.5 (logit > 0) for multi-label, the output itself for regression.
fn predictions(logits: Tensor<2>, kind: LabelKind) -> Vec<Target> {
    let [n, c] = logits.dims();
    if kind == LabelKind::Real {
        let v: Vec<f32> = logits
            .into_data()
            .convert::<f32>()
            .try_to_vec()
            .unwrap_or_default();
        v.into_iter().map(Target::Value).collect()
    } else if kind == LabelKind::Multi {
        let v: Vec<f32> = logits
            .into_data()
            .convert::<f32>()
            .try_to_vec()
            .unwrap_or_default();
        (0..n)
            .map(|i| Target::Multi((0..c).filter(|&k| v[i * c + k] > 0.0).collect()))
            .collect()
    } else {
        let arg: Vec<i64> = logits
            .argmax(1)
            .into_data()
            .convert::<i64>()
            .try_to_vec()
            .unwrap_or_default();
        arg.iter().map(|&p| Target::Class(p as usize)).collect()
    }
}

/// What the targets of a split are.
fn kind_of(targets: &[Target]) -> LabelKind {
    match targets.first() {
        Some(Target::Value(_)) => LabelKind::Real,
        _ if targets.iter().any(|t| matches!(t, Target::Multi(_))) => LabelKind::Multi,
        _ => LabelKind::Single,
    }
}

/// Scores predicted targets against the truth (single-label, multi-label or regression by the
/// truth's kind).
pub fn report(truth: &[Target], preds: &[Target], n_labels: usize) -> Scores {
    match kind_of(truth) {
        LabelKind::Real => {
            let values = |v: &[Target]| {
                v.iter()
                    .map(|t| match t {
                        Target::Value(x) => *x as f64,
                        _ => f64::NAN,
                    })
                    .collect::<Vec<_>>()
            };
            Scores::Regression(regression_report(&values(truth), &values(preds)))
        }
        LabelKind::Multi => {
            let ids = |v: &[Target]| v.iter().map(|t| t.ids().to_vec()).collect::<Vec<_>>();
            Scores::Classes(multilabel_report(&ids(truth), &ids(preds), n_labels))
        }
        LabelKind::Single => {
            let ids = |v: &[Target]| v.iter().map(|t| t.ids()[0]).collect::<Vec<_>>();
            Scores::Classes(classification_report(&ids(truth), &ids(preds), n_labels))
        }
    }
}

/// Loss, the metrics report and each example's scores (class probabilities by softmax; a
/// sigmoid per label for multi-label; the predicted value for regression) over a dataset, in
/// evaluation mode (padding-free when asked).
pub fn evaluate(
    model: &Classifier,
    data: &[Encoded],
    n_labels: usize,
    batch_size: usize,
    pad_id: u32,
    padding_free: bool,
    device: &Device,
) -> whet_models::Result<(f64, Scores, Vec<Vec<f32>>)> {
    // Evaluate on the plain backend: no autodiff graph is recorded for forward passes that are
    // never differentiated.
    let model = &model.valid();
    let device = &device.clone().without_autodiff();
    let with_types = matches!(model, Classifier::Bert(_));
    let truth: Vec<Target> = data.iter().map(|e| e.label.clone()).collect();
    let kind = kind_of(&truth);
    let mut loss = 0.0;
    let mut preds = Vec::with_capacity(data.len());
    let mut probs = Vec::with_capacity(data.len());
    for chunk in data.chunks(batch_size.max(1)) {
        let items: Vec<&Encoded> = chunk.iter().collect();
        let b = collate(&items, pad_id);
        let (input, labels) = to_input(&b, device, with_types, n_labels, padding_free);
        let logits = model.forward(input, Mode::Eval)?;
        loss += summed_loss(logits.clone(), labels).into_scalar::<f32>() as f64;
        preds.extend(predictions(logits.clone(), kind));
        let [n, c] = logits.dims();
        let p: Vec<f32> = match kind {
            LabelKind::Single => burn::tensor::activation::softmax(logits, 1),
            LabelKind::Multi => burn::tensor::activation::sigmoid(logits),
            LabelKind::Real => logits,
        }
        .into_data()
        .convert::<f32>()
        .try_to_vec()
        .unwrap_or_default();
        probs.extend(p.chunks(c.max(1)).take(n).map(<[f32]>::to_vec));
    }
    let report = report(&truth, &preds, n_labels);
    Ok((loss / data.len().max(1) as f64, report, probs))
}

/// Trains a classifier (see [`crate::trainer::train`]).
#[allow(clippy::too_many_arguments)]
pub fn train_classifier(
    model: &mut Classifier,
    train: &[Encoded],
    eval: Option<&[Encoded]>,
    n_labels: usize,
    pad_id: u32,
    args: &crate::TrainingArguments,
    device: &Device,
    observer: &mut dyn crate::Observer,
    resume: Option<&std::path::Path>,
) -> Result<crate::TrainSummary> {
    let objective = Classification::new(model, n_labels, pad_id, args.padding_free_or(true));
    crate::trainer::train(
        &objective, model, train, eval, args, device, observer, resume,
    )
}
