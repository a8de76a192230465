//! `whet train` for `task = "ppo"`: RLHF against a trained reward model. Held-out test prompts
//! are scored before and after training (with one seed, so both sample alike);
//! `reward_curve.png` and `kl_curve.png` show the mean score and the KL to the reference per
//! iteration.

use std::path::Path;

use serde_json::json;
use whet_peft::ParamCounts;

use super::{PolicyEval, PpoPrepared, prepare};
use crate::error::Result;
use crate::task::{Chart, Outcome, Report, Run, Series, Style, Task, one_line};
use crate::trainer::{Observer, TrainSummary};

/// A PPO run.
pub struct PpoTask {
    p: PpoPrepared,
    run: Run,
    /// The test prompts' evaluation before training (None when resuming or without a test
    /// split) and after it.
    before: Option<PolicyEval>,
    after: Option<PolicyEval>,
}

impl PpoTask {
    /// Prepares the run's prompts, policy, reference and reward model.
    pub fn open(run: Run) -> Result<Self> {
        Ok(Self {
            p: prepare(&run.recipe, &run.device)?,
            run,
            before: None,
            after: None,
        })
    }

    /// Scores the policy on the test prompts with the seed of the before/after comparison.
    fn evaluate_test(&self) -> Result<Option<PolicyEval>> {
        let Some(test) = &self.p.test else {
            return Ok(None);
        };
        let args = &self.run.recipe.training;
        let seed = args.seed.wrapping_add(0x7e57);
        self.p
            .evaluate(
                test,
                seed,
                args.per_device_eval_batch_size,
                &self.run.device,
            )
            .map(Some)
    }

    /// The test evaluation after training, taken once.
    fn after(&mut self) -> Result<Option<&PolicyEval>> {
        if self.after.is_none() {
            self.after = self.evaluate_test()?;
        }
        Ok(self.after.as_ref())
    }
}

impl Task for PpoTask {
    fn split_texts(&self) -> Vec<(&'static str, Vec<whet_data::leakage::Text>)> {
        let p = &self.p;
        crate::task::splits(&p.train, p.validation.as_ref(), p.test.as_ref())
            .map(|(name, prompts)| {
                let texts =
                    prompts
                        .iter()
                        .enumerate()
                        .map(|(i, prompt)| whet_data::leakage::Text {
                            origin: format!("{name} prompt {}", i + 1),
                            text: prompt.text.clone(),
                        });
                (name, texts.collect())
            })
            .collect()
    }

    fn describe(&self) -> Vec<String> {
        let (p, recipe) = (&self.p, &self.run.recipe);
        let cfg = &p.objective.config;
        vec![
            format!(
                "model {} ({}), method {:?}, PPO against the reward model {} (kl_coef {}, {} PPO \
                 epochs x {} minibatches, responses of up to {} tokens at temperature {}; \
                 reference: {})",
                recipe.model.display(),
                p.checkpoint.family(),
                recipe.method,
                cfg.reward_model.display(),
                cfg.kl_coef,
                cfg.num_ppo_epochs,
                cfg.num_mini_batches,
                cfg.response_length,
                cfg.temperature,
                if p.objective.frozen.is_some() {
                    "a frozen copy of the starting model"
                } else {
                    "the base with the adapter off"
                }
            ),
            format!(
                "prompts: {} train / {} validation / {} test, cut to their last {} tokens{}",
                p.train.len(),
                p.validation.as_ref().map_or(0, |s| s.len()),
                p.test.as_ref().map_or(0, |s| s.len()),
                recipe.data.max_length,
                if p.truncated > 0 {
                    format!(" ({} were longer)", p.truncated)
                } else {
                    String::new()
                }
            ),
            format!("{} (with the value head)", p.counts.line()),
        ]
    }

    /// `whet plan` does not cover PPO (generation and the reward model).
    fn plan(&mut self) -> Option<crate::plan::MemoryPlan> {
        None
    }

    /// Before training (unless resuming), scores the test prompts and keeps that, printing
    /// nothing; after it, the first two test prompts' responses before and after.
    fn sample(&mut self, before: bool) -> Result<Vec<String>> {
        if before {
            if self.run.resume.is_none() {
                self.before = self.evaluate_test()?;
            }
            return Ok(vec![]);
        }
        if self.before.is_none() {
            return Ok(vec![]);
        }
        let after = self.after()?.cloned();
        let (Some(b), Some(a), Some(test)) = (&self.before, after, &self.p.test) else {
            return Ok(vec![]);
        };
        let mut lines = vec![];
        for ((i, was, s0), (_, now, s1)) in b.examples.iter().zip(&a.examples) {
            let prompt: Vec<char> = one_line(&test[*i].text, usize::MAX).chars().collect();
            let tail: String = prompt[prompt.len().saturating_sub(120)..].iter().collect();
            lines.push(format!("test prompt {i} (its end): {tail:?}"));
            lines.push(format!("  before (score {s0:.3}): {was:?}"));
            lines.push(format!("  after  (score {s1:.3}): {now:?}"));
        }
        Ok(lines)
    }

    fn total_steps(&self) -> usize {
        self.run.recipe.training.total_steps(self.p.train.len())
    }

    fn train(&mut self, observer: &mut dyn Observer) -> Result<TrainSummary> {
        let run = &self.run;
        self.p
            .run_training(&run.recipe, &run.device, observer, run.resume.as_deref())
    }

    /// `test_*` after training, `test_*_before` when scored before, and `eval_*` of the last
    /// evaluation during training.
    fn evaluate(&mut self, summary: &TrainSummary) -> Result<Outcome> {
        let mut out = Outcome::default();
        let after = self.after()?.cloned();
        if let (Some(after), Some(test)) = (after, &self.p.test) {
            for (k, v) in after.metrics() {
                out.results.insert(format!("test_{k}"), json!(v));
            }
            if let Some(b) = &self.before {
                for (k, v) in b.metrics() {
                    out.results.insert(format!("test_{k}_before"), json!(v));
                }
                out.lines.push(format!(
                    "test prompts: mean score {:.4} -> {:.4}, KL to the reference {:.3} -> \
                     {:.3}, length {:.1} -> {:.1} tokens ({} prompts)",
                    b.score,
                    after.score,
                    b.kl,
                    after.kl,
                    b.length,
                    after.length,
                    test.len()
                ));
            } else {
                out.lines.push(format!(
                    "test prompts: mean score {:.4}, KL {:.3} ({} prompts)",
                    after.score,
                    after.kl,
                    test.len()
                ));
            }
        }
        if let Some(e) = summary.evals.last() {
            for (k, v) in &e.metrics {
                out.results.insert(format!("eval_{k}"), json!(v));
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
            unit: "responses",
            curve_metric: "score",
            adapter: self.p.adapter.is_some(),
            files: "value_head.safetensors, all_results.json, trainer_state.json, \
                    recipe.resolved.toml, loss_curve.png, reward_curve.png, kl_curve.png",
        }
    }

    /// The mean score and the KL to the reference, per iteration and at each evaluation.
    fn charts(&self, summary: &TrainSummary) -> Vec<Chart> {
        let per_step = |k: &str| -> Vec<(f64, f64)> {
            summary
                .history
                .iter()
                .filter_map(|s| Some((s.step as f64, *s.metrics.get(k)?)))
                .collect()
        };
        let eval = |k: &str| -> Vec<(f64, f64)> {
            summary
                .evals
                .iter()
                .filter_map(|e| Some((e.step as f64, *e.metrics.get(k)?)))
                .collect()
        };
        vec![
            Chart {
                file: "reward_curve.png",
                x_label: "PPO iteration",
                y_label: "mean reward-model score",
                series: vec![
                    Series {
                        name: "train mean score".into(),
                        points: per_step("objective/scores"),
                        color: [31, 119, 180],
                        style: Style::Line,
                    },
                    Series {
                        name: "eval mean score".into(),
                        points: eval("score"),
                        color: [44, 160, 44],
                        style: Style::Marked,
                    },
                ],
            },
            Chart {
                file: "kl_curve.png",
                x_label: "PPO iteration",
                y_label: "KL to the reference",
                series: vec![
                    Series {
                        name: "train KL".into(),
                        points: per_step("objective/kl"),
                        color: [255, 127, 14],
                        style: Style::Line,
                    },
                    Series {
                        name: "eval KL".into(),
                        points: eval("kl"),
                        color: [214, 39, 40],
                        style: Style::Marked,
                    },
                ],
            },
        ]
    }
}
