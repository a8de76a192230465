//! The training loop: accumulation equals one big batch, a learnable task is learnt, and the
//! trajectory of AdamW + clipping + schedule + accumulation equals PyTorch's
//! (`tests/fixtures/train/`, made by `scripts/fixtures/make_train_fixtures.py`).

use crate::common;

use std::path::Path;

use burn::tensor::Device;
use common::*;
use whet_data::{Encoded, Target};
use whet_models::{Checkpoint, Classifier, ExportParams};
use whet_train::*;

fn load(dir: &Path, device: &Device) -> Classifier {
    Checkpoint::open(dir)
        .unwrap()
        .load_classifier(device)
        .unwrap()
        .0
}

/// Examples whose label is whether token 7 occurs (learnable).
fn toy(n: usize, seed: u64) -> Vec<Encoded> {
    let mut x = seed;
    let mut next = || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (x >> 33) as u32
    };
    (0..n)
        .map(|_| {
            let len = 3 + (next() % 6) as usize;
            let mut ids: Vec<u32> = (0..len).map(|_| 10 + next() % 80).collect();
            let label = (next() % 2) as usize;
            if label == 1 {
                let at = (next() as usize) % len;
                ids[at] = 7;
            }
            let mut full = vec![1];
            full.extend(ids);
            full.push(2);
            Encoded {
                type_ids: vec![0; full.len()],
                ids: full,
                label: Target::Class(label),
            }
        })
        .collect()
}

fn params(m: &Classifier) -> Vec<(String, Vec<f32>)> {
    m.named_params()
        .iter()
        .map(|p| (p.name.clone(), p.to_checkpoint_values().1))
        .collect()
}

#[test]
fn accumulated_micro_batches_equal_one_big_batch() {
    let dir = tiny_bert_no_dropout();
    let device = Device::flex().autodiff();
    let data = toy(4, 1);
    let run = |batch: usize, accum: usize| {
        let mut model = load(dir.path(), &device);
        let mut args = TrainingArguments::new("unused");
        args.per_device_train_batch_size = batch;
        args.gradient_accumulation_steps = accum;
        args.max_steps = 1;
        args.optim = OptimizerKind::Sgd;
        args.learning_rate = 0.5;
        args.lr_scheduler_type = Schedule::Constant;
        args.max_grad_norm = 0.0;
        let s = train_classifier(
            &mut model,
            &data,
            None,
            3,
            0,
            &args,
            &device,
            &mut Silent,
            None,
        )
        .unwrap();
        (s.train_loss, params(&model))
    };
    let (loss_big, big) = run(4, 1);
    let (loss_acc, acc) = run(2, 2);
    assert!(
        (loss_big - loss_acc).abs() < 1e-5,
        "{loss_big} vs {loss_acc}"
    );
    let start = params(&load(dir.path(), &Device::flex()));
    let mut moved = 0.0f32;
    for (((name, a), (_, b)), (_, s)) in big.iter().zip(&acc).zip(&start) {
        let d = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(d < 1e-5, "{name}: accumulated update differs by {d}");
        moved = moved.max(
            a.iter()
                .zip(s)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f32::max),
        );
    }
    assert!(moved > 1e-3, "the step changed the weights");
}

#[test]
fn a_learnable_task_is_learnt_and_evaluated() {
    let dir = tiny_bert_no_dropout();
    let device = Device::flex().autodiff();
    let train = toy(96, 7);
    let eval = toy(48, 8);
    let mut model = load(dir.path(), &device);
    let (before, _, _) = {
        let (l, r, p) = evaluate(&model, &eval, 3, 16, 0, true, &device).unwrap();
        (r.classes().unwrap().accuracy, l, p)
    };
    let mut args = TrainingArguments::new("unused");
    args.learning_rate = 3e-3;
    args.num_train_epochs = 8.0;
    args.per_device_train_batch_size = 16;
    args.eval_strategy = Strategy::Epoch;
    args.load_best_model_at_end = true;
    args.metric_for_best_model = Some("accuracy".into());
    args.warmup_ratio = 0.1;
    args.weight_decay = 0.01;
    let s = train_classifier(
        &mut model,
        &train,
        Some(&eval),
        3,
        0,
        &args,
        &device,
        &mut Silent,
        None,
    )
    .unwrap();
    assert_eq!(s.steps, 48);
    assert_eq!(s.evals.len(), 8);
    let first = s.history.first().unwrap().loss;
    let last = s.history.last().unwrap().loss;
    assert!(last < first, "loss fell: {first} -> {last}");
    let (_, scores, _) = evaluate(&model, &eval, 3, 16, 0, true, &device).unwrap();
    let report = scores.classes().unwrap();
    let best = s
        .evals
        .iter()
        .map(|e| e.metrics["accuracy"])
        .fold(0.0, f64::max);
    assert_eq!(
        report.accuracy, best,
        "load_best_model_at_end restores the best checkpoint"
    );
    assert!(
        report.accuracy >= 0.85,
        "accuracy {} (before training {before})",
        report.accuracy
    );
}

#[test]
fn a_diverging_run_stops_with_a_message() {
    let dir = tiny_bert_no_dropout();
    let device = Device::flex().autodiff();
    let mut model = load(dir.path(), &device);
    let mut args = TrainingArguments::new("unused");
    args.learning_rate = 1e30;
    args.optim = OptimizerKind::Sgd;
    args.max_grad_norm = 0.0;
    args.max_steps = 5;
    args.lr_scheduler_type = Schedule::Constant;
    let e = train_classifier(
        &mut model,
        &toy(16, 3),
        None,
        3,
        0,
        &args,
        &device,
        &mut Silent,
        None,
    )
    .unwrap_err();
    assert!(
        matches!(e, whet_train::TrainError::NonFiniteLoss { step: 2.., .. }),
        "{e}"
    );
    assert!(e.to_string().contains("loss became"), "{e}");
}

/// A task that supplies its own step (as PPO does) gets the shared loop's evaluation, best
/// model and early stopping: the model's one value counts the steps taken, and the evaluation
/// loss of each step is scripted.
#[test]
fn a_task_with_its_own_step_gets_best_model_and_early_stopping() {
    use burn::module::Param;
    use burn::tensor::{Tensor, TensorData};
    use whet_models::{VisitParams, Visitor};

    #[derive(Clone)]
    struct Counter {
        steps: Param<Tensor<1>>,
    }
    impl VisitParams for Counter {
        fn visit_params(&mut self, prefix: &str, v: &mut dyn Visitor) {
            v.vector(&format!("{prefix}steps"), &mut self.steps);
        }
    }
    impl Counter {
        fn value(&self) -> usize {
            self.steps.val().into_data().try_to_vec::<f32>().unwrap()[0] as usize
        }
    }
    /// The eval loss after `k` steps is `losses[k]`; the start is scored best of all, and must
    /// not count as the best model.
    struct Scripted {
        losses: Vec<f64>,
        device: Device,
    }
    impl TrainStep for Scripted {
        type Model = Counter;
        type Example = usize;
        fn step(
            &self,
            model: &mut Counter,
            _opt: &mut Optimizer,
            examples: &[&usize],
            at: &StepAt,
        ) -> whet_train::Result<StepResult> {
            let next = (at.step + 1) as f32;
            let t = Tensor::<1>::from_data(TensorData::new(vec![next], [1]), &self.device);
            model.steps = Param::from_tensor(t);
            Ok(StepResult {
                loss: 1.0.into(),
                samples: examples.len(),
                ..Default::default()
            })
        }
        fn evaluate(
            &self,
            model: &Counter,
            _data: &[usize],
            _batch_size: usize,
            _device: &Device,
        ) -> whet_train::Result<Evaluation> {
            Ok(Evaluation {
                loss: self.losses[model.value()],
                metrics: Default::default(),
                report: None,
            })
        }
        fn evaluates_at_start(&self) -> bool {
            true
        }
        fn length(&self, example: &usize) -> usize {
            *example
        }
    }
    let device = Device::flex();
    let task = Scripted {
        losses: vec![0.1, 3.0, 2.0, 2.5, 2.6, 2.7, 2.8, 2.9],
        device: device.clone(),
    };
    let zero = Tensor::<1>::from_data(TensorData::new(vec![0.0f32], [1]), &device);
    let mut model = Counter {
        steps: Param::from_tensor(zero),
    };
    let data: Vec<usize> = (0..7).collect();
    let mut args = TrainingArguments::new("unused");
    args.per_device_train_batch_size = 1;
    args.num_train_epochs = 1.0;
    args.eval_strategy = Strategy::Steps;
    args.eval_steps = Some(1);
    args.save_strategy = Strategy::No;
    args.load_best_model_at_end = true;
    args.early_stopping_patience = Some(2);
    let s = whet_train::trainer::train(
        &task,
        &mut model,
        &data,
        Some(&data),
        &args,
        &device,
        &mut Silent,
        None,
    )
    .unwrap();
    let steps: Vec<usize> = s.evals.iter().map(|e| e.step).collect();
    assert_eq!(
        steps,
        [0, 1, 2, 3, 4],
        "a baseline at 0, then every step until patience ran out"
    );
    assert_eq!(
        s.steps, 4,
        "two evaluations without improvement after step 2 stop the run"
    );
    assert_eq!(
        s.best_step,
        Some(2),
        "the baseline does not compete for the best model"
    );
    assert_eq!(model.value(), 2, "the best model is loaded at the end");
}

/// `group_by_length = true` hands the steps transformers' length-grouped order of the epoch's
/// permutation (megabatches sorted longest first, the longest example first), which pads less
/// than the plain shuffled order the run takes without it.
#[test]
fn group_by_length_hands_steps_examples_of_similar_lengths() {
    use std::cell::RefCell;
    use whet_models::{VisitParams, Visitor};

    #[derive(Clone)]
    struct Nothing;
    impl VisitParams for Nothing {
        fn visit_params(&mut self, _prefix: &str, _v: &mut dyn Visitor) {}
    }
    /// Records the examples (their lengths) of every step.
    struct Recorder(RefCell<Vec<usize>>);
    impl TrainStep for Recorder {
        type Model = Nothing;
        type Example = usize;
        fn step(
            &self,
            _model: &mut Nothing,
            _opt: &mut Optimizer,
            examples: &[&usize],
            _at: &StepAt,
        ) -> whet_train::Result<StepResult> {
            self.0.borrow_mut().extend(examples.iter().map(|&&e| e));
            Ok(StepResult {
                loss: 1.0.into(),
                samples: examples.len(),
                ..Default::default()
            })
        }
        fn evaluate(
            &self,
            _model: &Nothing,
            _data: &[usize],
            _batch_size: usize,
            _device: &Device,
        ) -> whet_train::Result<Evaluation> {
            unreachable!("no evaluation in this run")
        }
        fn length(&self, example: &usize) -> usize {
            *example
        }
    }
    // Lengths 1..=40 in a scrambled order: example i is its own length.
    let data: Vec<usize> = (0..160).map(|i| (i * 37) % 40 + 1).collect();
    let run = |grouped: bool| -> Vec<usize> {
        let task = Recorder(RefCell::new(Vec::new()));
        let mut args = TrainingArguments::new("unused");
        args.per_device_train_batch_size = 4;
        args.gradient_accumulation_steps = 2;
        args.num_train_epochs = 1.0;
        args.eval_strategy = Strategy::No;
        args.save_strategy = Strategy::No;
        args.group_by_length = grouped;
        let device = Device::flex();
        whet_train::trainer::train(
            &task,
            &mut Nothing,
            &data,
            None,
            &args,
            &device,
            &mut Silent,
            None,
        )
        .unwrap();
        task.0.into_inner()
    };
    let (plain, grouped) = (run(false), run(true));
    let order = whet_data::epoch_order(data.len(), 42, 0);
    let lengths_of = |o: &[usize]| o.iter().map(|&i| data[i]).collect::<Vec<_>>();
    assert_eq!(plain, lengths_of(&order));
    // Steps of 4 × 2 examples: megabatches of min(160 / 32, 50) = 5 steps.
    let want = lengths_of(&whet_data::length_grouped(&order, &data, 8));
    assert_eq!(grouped, want);
    assert_eq!(grouped[0], 40, "the longest example comes first");
    let padded = |lens: &[usize]| -> usize {
        lens.chunks(4)
            .map(|b| b.len() * b.iter().max().unwrap())
            .sum()
    };
    let real: usize = data.iter().sum();
    let (p, g) = (padded(&plain), padded(&grouped));
    assert!(
        (g - real) * 4 < p - real,
        "grouping should remove most padding: {p} -> {g} slots for {real} tokens"
    );
}

/// `padding_free` is on by default and trains what padded batches train: without dropout, a
/// run over batches of mixed lengths ends with the padded run's weights up to float rounding,
/// and its evaluation gives the same loss; `false` runs the padded rows.
#[test]
fn padding_free_training_ends_where_padded_training_does() {
    assert_eq!(TrainingArguments::new("unused").padding_free, None);
    assert!(TrainingArguments::new("unused").padding_free_or(true));
    let dir = tiny_bert_no_dropout();
    let device = Device::flex().autodiff();
    let train = toy(32, 11);
    let eval = toy(16, 12);
    let lengths: std::collections::BTreeSet<usize> = train.iter().map(|e| e.ids.len()).collect();
    assert!(lengths.len() > 3, "batches of mixed lengths carry padding");
    let run = |padding_free: bool| {
        let mut model = load(dir.path(), &device);
        let mut args = TrainingArguments::new("unused");
        args.learning_rate = 1e-3;
        args.num_train_epochs = 1.0;
        args.per_device_train_batch_size = 8;
        args.eval_strategy = Strategy::No;
        args.save_strategy = Strategy::No;
        args.padding_free = Some(padding_free);
        let s = train_classifier(
            &mut model,
            &train,
            Some(&eval),
            3,
            0,
            &args,
            &device,
            &mut Silent,
            None,
        )
        .unwrap();
        let (loss, _, _) = evaluate(&model, &eval, 3, 16, 0, padding_free, &device).unwrap();
        (params(&model), s.history.last().unwrap().loss, loss)
    };
    let (padded, padded_loss, padded_eval) = run(false);
    let (free, free_loss, free_eval) = run(true);
    let (start, _, _) = {
        let m = load(dir.path(), &device);
        (params(&m), (), ())
    };
    let mut moved = 0.0f32;
    for (((name, a), (_, b)), (_, s)) in padded.iter().zip(&free).zip(&start) {
        let scale = a.iter().map(|x| x.abs()).fold(1e-6, f32::max);
        let d = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(
            d / scale < 1e-4,
            "{name}: padded vs padding-free {}",
            d / scale
        );
        moved = a
            .iter()
            .zip(s)
            .map(|(x, y)| (x - y).abs())
            .fold(moved, f32::max);
    }
    assert!(moved > 1e-4, "training moved the weights ({moved})");
    assert!((padded_loss - free_loss).abs() < 1e-4 * padded_loss.abs().max(1.0));
    assert!(
        (padded_eval - free_eval).abs() < 1e-5,
        "{padded_eval} vs {free_eval}"
    );
}
