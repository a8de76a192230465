//! `whet sweep`: a hyperparameter search over a recipe, with successive halving.
//!
//! - **Trials**: every combination of the `--grid` values; with `--random` ranges, `--trials N`
//!   trials, each the next grid combination (in turn) with fresh draws from the ranges
//!   (uniform, or log-uniform with `:log`; integers when both ends are), from `--seed`.
//! - **Successive halving** (Jamieson and Talwalkar, 2016) with rate `--eta` (3): a full trial
//!   is the recipe's `training.max_steps`; the rungs are `max_steps / eta^k, ..., max_steps`.
//!   Every trial trains to the first rung; after each rung the best `1 / eta` of the trials by
//!   the evaluation metric (`metric_for_best_model`, default the loss; `greater_is_better`)
//!   go on, the rest stop there. A trial goes on from its checkpoint with the schedule of the
//!   full run, so a trial that reaches the end is exactly the run its recipe makes alone.
//! - **Resume**: `OUT/sweep.json` records every trial's settings, evaluations and status after
//!   each rung; the same command again continues where a killed sweep stopped (a trial cut off
//!   mid-rung resumes from its newest checkpoint).
//! - **Output** (in the recipe's `training.output_dir`): `trial-N/` per trial, `sweep.md` (the
//!   table of trials: settings, metric, steps, time, status), `best.toml` (the recipe with the
//!   best trial's settings), `sweep.png` (each trial's metric against the step).
//!
//! Trials run one after another: one trial already uses every core (the matmuls run on the
//! rayon pool), so parallel trials would share the same cores and gain nothing on the CPU.

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use crate::plot::{Series, Style, line_chart};

/// What `whet sweep` was asked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Search {
    pub set: Vec<String>,
    pub grid: Vec<String>,
    pub random: Vec<String>,
    pub trials: Option<usize>,
    pub eta: usize,
    pub seed: u64,
}

/// One trial's record in `sweep.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Trial {
    id: usize,
    /// `KEY=VALUE` overrides.
    settings: Vec<String>,
    /// Rungs finished.
    rungs_done: usize,
    /// `running`, `stopped` (dropped at a rung) or `done`.
    status: String,
    /// `(step, metric)` of every evaluation.
    evals: Vec<(usize, f64)>,
    seconds: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    search: Search,
    metric: String,
    higher_is_better: bool,
    rungs: Vec<usize>,
    trials: Vec<Trial>,
}

/// A `--grid KEY=V1,V2` axis or a `--random KEY=LOW:HIGH[:log]` range.
fn split_key(arg: &str, flag: &str) -> Result<(String, String)> {
    let (k, v) = arg
        .split_once('=')
        .ok_or_else(|| anyhow!("{flag} {arg:?}: expected KEY=..."))?;
    if k.trim().is_empty() || v.trim().is_empty() {
        bail!("{flag} {arg:?}: expected KEY=...");
    }
    Ok((k.trim().to_string(), v.trim().to_string()))
}

/// splitmix64: the sweep's random draws, the same for the same `--seed`.
struct Draws(u64);

impl Draws {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The trials' settings.
fn trials(search: &Search) -> Result<Vec<Vec<String>>> {
    let mut combos: Vec<Vec<String>> = vec![vec![]];
    for g in &search.grid {
        let (k, values) = split_key(g, "--grid")?;
        let values: Vec<&str> = values.split(',').map(str::trim).collect();
        if values.iter().any(|v| v.is_empty()) {
            bail!("--grid {g:?}: an empty value");
        }
        let mut next = Vec::with_capacity(combos.len() * values.len());
        for c in &combos {
            for v in &values {
                let mut c = c.clone();
                c.push(format!("{k}={v}"));
                next.push(c);
            }
        }
        combos = next;
    }
    if search.random.is_empty() {
        if let Some(n) = search.trials
            && n != combos.len()
        {
            bail!(
                "--trials {n}: the grid has {} combinations (--trials picks how many random \
                 draws to make, with --random)",
                combos.len()
            );
        }
        if combos.len() < 2 {
            bail!("a sweep needs at least two trials: give --grid values or --random ranges");
        }
        return Ok(combos);
    }
    let mut ranges = vec![];
    for r in &search.random {
        let (k, spec) = split_key(r, "--random")?;
        let parts: Vec<&str> = spec.split(':').collect();
        let bad = || anyhow!("--random {r:?}: expected KEY=LOW:HIGH or KEY=LOW:HIGH:log");
        let (lo, hi, log) = match parts[..] {
            [lo, hi] => (lo, hi, false),
            [lo, hi, "log"] => (lo, hi, true),
            _ => return Err(bad()),
        };
        let integer = !log && [lo, hi].iter().all(|v| v.parse::<i64>().is_ok());
        let (lo, hi): (f64, f64) = (
            lo.parse().map_err(|_| bad())?,
            hi.parse().map_err(|_| bad())?,
        );
        if !lo.is_finite() || !hi.is_finite() || lo >= hi || (log && lo <= 0.0) {
            bail!("--random {r:?}: LOW must be below HIGH (and above 0 with :log)");
        }
        ranges.push((k, lo, hi, log, integer));
    }
    let n = search.trials.unwrap_or(8);
    if n < 2 {
        bail!("--trials {n}: a sweep needs at least two trials");
    }
    let mut draws = Draws(search.seed);
    Ok((0..n)
        .map(|i| {
            let mut t = combos[i % combos.len()].clone();
            for (k, lo, hi, log, integer) in &ranges {
                let u = draws.next();
                let v = if *log {
                    (lo.ln() + u * (hi.ln() - lo.ln())).exp()
                } else {
                    lo + u * (hi - lo)
                };
                t.push(if *integer {
                    format!("{k}={}", (v.floor() as i64).min(*hi as i64))
                } else {
                    format!("{k}={v:e}")
                });
            }
            t
        })
        .collect())
}

/// Rungs of successive halving over `total` steps for `n` trials: `r, r * eta, r * eta^2, ...,
/// total` with `r = total / eta^k`, `k = floor(log_eta(n))` (each rung a multiple of the first,
/// where the trials evaluate and save).
fn rungs(total: usize, n: usize, eta: usize) -> Vec<usize> {
    let mut k = 0;
    while eta.pow(k + 1) <= n {
        k += 1;
    }
    let first = (total / eta.pow(k)).max(1);
    let mut r: Vec<usize> = (0..k)
        .map(|i| first * eta.pow(i))
        .filter(|&s| s < total)
        .collect();
    r.push(total);
    r
}

impl State {
    fn better(&self, a: f64, b: f64) -> bool {
        if self.higher_is_better { a > b } else { a < b }
    }

    /// A trial's metric at `step` (its last evaluation there or before).
    fn at(&self, t: &Trial, step: usize) -> Option<f64> {
        t.evals
            .iter()
            .filter(|(s, _)| *s <= step)
            .max_by_key(|(s, _)| *s)
            .map(|(_, v)| *v)
    }

    fn save(&self, path: &Path) -> Result<()> {
        whet_models::fsutil::write_atomic(path, serde_json::to_string_pretty(self)?.as_bytes())?;
        Ok(())
    }
}

/// The metric a trial is ranked by, and whether higher is better, as the trainer decides them.
fn metric_of(training: &whet_train::TrainingArguments) -> (String, bool) {
    let name = training
        .metric_for_best_model
        .clone()
        .unwrap_or_else(|| "loss".into());
    let name = name.strip_prefix("eval_").unwrap_or(&name).to_string();
    let higher = training
        .greater_is_better
        .unwrap_or(name != "loss" && name != "perplexity");
    (name, higher)
}

/// The metric's value in an evaluation log entry.
fn eval_value(entry: &serde_json::Value, metric: &str) -> Option<(usize, f64)> {
    let step = entry.get("step")?.as_u64()? as usize;
    let v = entry.get(format!("eval_{metric}"))?.as_f64()?;
    Some((step, v))
}

pub fn run(recipe_path: &Path, search: Search) -> Result<()> {
    if search.eta < 2 {
        bail!("--eta {}: the halving rate must be at least 2", search.eta);
    }
    let text = std::fs::read_to_string(recipe_path)
        .with_context(|| format!("cannot read {}", recipe_path.display()))?;
    let recipe = whet_train::Recipe::parse(&text, &search.set)
        .map_err(|e| anyhow!("{}: {e}", recipe_path.display()))?;
    let total = recipe.training.max_steps;
    if total <= 0 {
        bail!(
            "whet sweep needs training.max_steps (the steps of a full trial), e.g. --set \
             training.max_steps=300"
        );
    }
    let total = total as usize;
    let out = recipe.training.output_dir.clone();
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let state_path = out.join("sweep.json");
    let mut state = match std::fs::read_to_string(&state_path) {
        Ok(saved) => {
            let state: State = serde_json::from_str(&saved)
                .with_context(|| format!("{}: malformed", state_path.display()))?;
            if state.search != search {
                bail!(
                    "{} holds a sweep with other settings; give another training.output_dir or \
                     remove it",
                    state_path.display()
                );
            }
            println!("resuming the sweep in {}", out.display());
            state
        }
        Err(_) => {
            let settings = trials(&search)?;
            let (metric, higher_is_better) = metric_of(&recipe.training);
            State {
                rungs: rungs(total, settings.len(), search.eta),
                trials: settings
                    .into_iter()
                    .enumerate()
                    .map(|(id, settings)| Trial {
                        id,
                        settings,
                        rungs_done: 0,
                        status: "running".into(),
                        evals: vec![],
                        seconds: 0.0,
                    })
                    .collect(),
                search: search.clone(),
                metric,
                higher_is_better,
            }
        }
    };
    state.save(&state_path)?;
    println!(
        "sweep: {} trials, rungs at steps {:?} (eta {}), ranked by eval {} ({} is better)",
        state.trials.len(),
        state.rungs,
        search.eta,
        state.metric,
        if state.higher_is_better {
            "higher"
        } else {
            "lower"
        }
    );
    let first = state.rungs[0];
    for rung in 0..state.rungs.len() {
        let target = state.rungs[rung];
        for i in 0..state.trials.len() {
            let t = &state.trials[i];
            if t.status != "running" || t.rungs_done > rung {
                continue;
            }
            let dir = out.join(format!("trial-{}", t.id));
            println!(
                "\n== trial {} to step {target}: {}",
                t.id,
                t.settings.join(" ")
            );
            let mut set = search.set.clone();
            set.extend(t.settings.iter().cloned());
            set.extend([
                format!("training.output_dir=\"{}\"", dir.display()),
                format!("training.max_steps={total}"),
                "training.eval_strategy=\"steps\"".into(),
                format!("training.eval_steps={first}"),
                "training.save_strategy=\"steps\"".into(),
                format!("training.save_steps={first}"),
            ]);
            let resume = whet_train::checkpoint::latest(&dir).map(|_| "latest");
            let last = rung + 1 == state.rungs.len();
            let done = crate::train::run(recipe_path, &set, resume, (!last).then_some(target))?;
            let evals: Vec<(usize, f64)> = done
                .log
                .iter()
                .filter_map(|e| eval_value(e, &state.metric))
                .collect();
            if evals.is_empty() {
                bail!(
                    "trial {} logged no eval_{}: a sweep ranks trials by evaluations, so the \
                     recipe needs validation data (data.validation or data.split) and a metric \
                     the task reports",
                    t.id,
                    state.metric
                );
            }
            let t = &mut state.trials[i];
            for e in evals {
                if !t.evals.iter().any(|(s, _)| *s == e.0) {
                    t.evals.push(e);
                }
            }
            t.evals.sort_by_key(|(s, _)| *s);
            t.seconds += done.seconds;
            t.rungs_done = rung + 1;
            // The last rung, or a run that ended before its rung (early stopping).
            if last || !done.paused {
                t.status = "done".into();
            }
            state.save(&state_path)?;
        }
        if rung + 1 < state.rungs.len() {
            let mut alive: Vec<(usize, f64)> = state
                .trials
                .iter()
                .enumerate()
                .filter(|(_, t)| t.status == "running")
                .map(|(i, t)| (i, state.at(t, target).unwrap_or(f64::NAN)))
                .collect();
            let keep = (alive.len() / search.eta).max(1);
            alive.sort_by(|a, b| {
                if a.1.is_nan() {
                    std::cmp::Ordering::Greater
                } else if b.1.is_nan() || state.better(a.1, b.1) {
                    std::cmp::Ordering::Less
                } else if state.better(b.1, a.1) {
                    std::cmp::Ordering::Greater
                } else {
                    std::cmp::Ordering::Equal
                }
            });
            for &(i, _) in &alive[keep..] {
                state.trials[i].status = "stopped".into();
            }
            state.save(&state_path)?;
            println!(
                "\nrung {} (step {target}): {} of {} trials go on",
                rung + 1,
                keep,
                alive.len()
            );
        }
    }
    report(&state, &out, &text, &search, total)
}

/// The table, the best recipe and the chart.
fn report(state: &State, out: &Path, text: &str, search: &Search, total: usize) -> Result<()> {
    let best = state
        .trials
        .iter()
        .filter(|t| t.status == "done")
        .filter_map(|t| state.at(t, total).map(|v| (t, v)))
        .reduce(|a, b| if state.better(b.1, a.1) { b } else { a })
        .ok_or_else(|| anyhow!("no trial finished"))?;
    let mut table = format!(
        "| trial | settings | eval {} | steps | seconds | status |\n|---|---|---|---|---|---|\n",
        state.metric
    );
    for t in &state.trials {
        let (step, value) = t.evals.last().copied().unwrap_or((0, f64::NAN));
        table.push_str(&format!(
            "| {}{} | {} | {value:.4} | {step} | {:.1} | {} |\n",
            t.id,
            if t.id == best.0.id { " (best)" } else { "" },
            t.settings.join(" "),
            t.seconds,
            t.status
        ));
    }
    println!("\n{table}");
    whet_models::fsutil::write_atomic(&out.join("sweep.md"), table.as_bytes())?;

    let mut set = search.set.clone();
    set.extend(best.0.settings.iter().cloned());
    set.push(format!(
        "training.output_dir=\"{}\"",
        out.join("best").display()
    ));
    let best_toml = format!(
        "# The best trial ({}) of `whet sweep` in {}: eval {} {:.4}\n{}",
        best.0.id,
        out.display(),
        state.metric,
        best.1,
        whet_train::Recipe::with_overrides(text, &set)?
    );
    whet_models::fsutil::write_atomic(&out.join("best.toml"), best_toml.as_bytes())?;

    let palette = [
        [31, 119, 180],
        [255, 127, 14],
        [44, 160, 44],
        [214, 39, 40],
        [148, 103, 189],
        [140, 86, 75],
        [227, 119, 194],
        [127, 127, 127],
    ];
    let series: Vec<Series> = state
        .trials
        .iter()
        .map(|t| Series {
            name: format!("trial {}", t.id),
            points: t.evals.iter().map(|&(s, v)| (s as f64, v)).collect(),
            color: palette[t.id % palette.len()],
            style: Style::Marked,
        })
        .collect();
    line_chart(
        &out.join("sweep.png"),
        "optimizer step",
        &format!("eval {}", state.metric),
        &series,
    )?;
    println!(
        "best: trial {} ({}), eval {} {:.4}\nwrote {} (trials), {}, {}",
        best.0.id,
        best.0.settings.join(" "),
        state.metric,
        best.1,
        out.join("sweep.md").display(),
        out.join("best.toml").display(),
        out.join("sweep.png").display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn search(grid: &[&str], random: &[&str], trials: Option<usize>) -> Search {
        Search {
            set: vec![],
            grid: grid.iter().map(|s| s.to_string()).collect(),
            random: random.iter().map(|s| s.to_string()).collect(),
            trials,
            eta: 3,
            seed: 42,
        }
    }

    #[test]
    fn grids_and_random_ranges_make_the_trials() {
        let t = trials(&search(&["a=1,2", "b=x,y,z"], &[], None)).unwrap();
        assert_eq!(t.len(), 6);
        assert_eq!(t[0], ["a=1", "b=x"]);
        assert_eq!(t[5], ["a=2", "b=z"]);
        let t = trials(&search(&["a=1,2"], &["lr=1e-5:1e-3:log", "n=2:8"], Some(5))).unwrap();
        assert_eq!(t.len(), 5);
        for (i, trial) in t.iter().enumerate() {
            assert_eq!(trial[0], if i % 2 == 0 { "a=1" } else { "a=2" });
            let lr: f64 = trial[1].strip_prefix("lr=").unwrap().parse().unwrap();
            assert!((1e-5..=1e-3).contains(&lr), "{lr}");
            let n: i64 = trial[2].strip_prefix("n=").unwrap().parse().unwrap();
            assert!((2..=8).contains(&n), "{n}");
        }
        assert_eq!(
            t,
            trials(&search(&["a=1,2"], &["lr=1e-5:1e-3:log", "n=2:8"], Some(5))).unwrap()
        );
        for bad in [
            search(&["a"], &[], None),
            search(&["a=1"], &[], None),
            search(&["a=1,2"], &[], Some(3)),
            search(&[], &["lr=1:0"], Some(4)),
            search(&[], &["lr=0:1:log"], Some(4)),
            search(&[], &["lr=0:1:cubic"], Some(4)),
        ] {
            assert!(trials(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn rungs_follow_successive_halving() {
        assert_eq!(rungs(9, 3, 3), [3, 9]);
        assert_eq!(rungs(9, 9, 3), [1, 3, 9]);
        assert_eq!(rungs(100, 27, 3), [3, 9, 27, 100]);
        assert_eq!(rungs(2, 27, 3), [1, 2]);
        assert_eq!(rungs(10, 2, 3), [10]);
        assert_eq!(rungs(20, 4, 2), [5, 10, 20]);
    }
}
