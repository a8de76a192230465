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
//! - **Parallel trials**: as many at once as the memory plan of a trial says fit in the memory
//!   available, at most one per core (`--jobs` sets it; 1 runs them one after another); each
//!   is a `whet train` process with its share of the cores (`RAYON_NUM_THREADS`) and its output
//!   in `trial-N/train.log`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use crate::plot::{Series, Style, line_chart};

/// What `whet sweep` was asked (its trials and their order; `sweep.json` keeps it to resume).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
pub struct Search {
    /// Override a recipe value for every trial (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Values to try for a key, e.g. --grid training.learning_rate=1e-4,3e-4,1e-3
    /// (repeatable: every combination is a trial).
    #[arg(long, value_name = "KEY=V1,V2,...")]
    pub grid: Vec<String>,
    /// A range to draw a key from, e.g. --random training.learning_rate=1e-5:1e-3:log
    /// (uniform; :log for log-uniform; integers when both ends are; repeatable).
    #[arg(long, value_name = "KEY=LOW:HIGH[:log]")]
    pub random: Vec<String>,
    /// How many trials to draw with --random (default 8), each with the next --grid
    /// combination in turn.
    #[arg(long)]
    pub trials: Option<usize>,
    /// The halving rate: after each rung the best 1/eta of the trials go on.
    #[arg(long, default_value_t = 3)]
    pub eta: usize,
    /// Seed of the --random draws.
    #[arg(long, default_value_t = 42)]
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
        .unwrap_or(whet_train::trainer::higher_is_better(&name));
    (name, higher)
}

/// The metric's value in an evaluation log entry.
fn eval_value(entry: &serde_json::Value, metric: &str) -> Option<(usize, f64)> {
    let step = entry.get("step")?.as_u64()? as usize;
    let v = entry.get(format!("eval_{metric}"))?.as_f64()?;
    Some((step, v))
}

pub fn run(recipe_path: &Path, search: Search, jobs: Option<usize>) -> Result<()> {
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
    let jobs = match jobs {
        Some(0) => bail!("--jobs 0: at least one trial runs at a time"),
        Some(j) => j,
        None => fitting_jobs(recipe_path, &search, &state.trials[0].settings)?,
    };
    for rung in 0..state.rungs.len() {
        let target = state.rungs[rung];
        let last = rung + 1 == state.rungs.len();
        let todo: Vec<usize> = (0..state.trials.len())
            .filter(|&i| state.trials[i].status == "running" && state.trials[i].rungs_done <= rung)
            .collect();
        let runs: Vec<RunArgs> = todo
            .iter()
            .map(|&i| {
                let t = &state.trials[i];
                let dir = out.join(format!("trial-{}", t.id));
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
                println!(
                    "\n== trial {} to step {target}: {}",
                    t.id,
                    t.settings.join(" ")
                );
                RunArgs {
                    index: i,
                    resume: whet_train::checkpoint::latest(&dir).is_some(),
                    dir,
                    set,
                    stop_at: (!last).then_some(target),
                }
            })
            .collect();
        let results = if jobs > 1 && runs.len() > 1 {
            parallel(recipe_path, &runs, jobs)
        } else {
            runs.iter()
                .map(|r| {
                    let resume = r.resume.then_some("latest");
                    crate::train::run(recipe_path, &r.set, resume, r.stop_at)
                })
                .collect()
        };
        for (r, result) in runs.iter().zip(results) {
            let seconds = result.with_context(|| {
                format!(
                    "trial {} failed (its output: {})",
                    state.trials[r.index].id,
                    r.dir.display()
                )
            })?;
            let logged: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(r.dir.join("trainer_state.json"))
                    .with_context(|| format!("{}: no trainer_state.json", r.dir.display()))?,
            )?;
            let evals: Vec<(usize, f64)> = logged["log_history"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| eval_value(e, &state.metric))
                .collect();
            let t = &mut state.trials[r.index];
            if evals.is_empty() {
                bail!(
                    "trial {} logged no eval_{}: a sweep ranks trials by evaluations, so the \
                     recipe needs validation data (data.validation or data.split) and a metric \
                     the task reports",
                    t.id,
                    state.metric
                );
            }
            for e in evals {
                if !t.evals.iter().any(|(s, _)| *s == e.0) {
                    t.evals.push(e);
                }
            }
            t.evals.sort_by_key(|(s, _)| *s);
            t.seconds += seconds;
            t.rungs_done = rung + 1;
            // The last rung, or a run that ended before its rung (early stopping).
            if last || logged["paused"] != true {
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

/// One trial's run to a rung.
struct RunArgs {
    index: usize,
    dir: PathBuf,
    set: Vec<String>,
    resume: bool,
    stop_at: Option<usize>,
}

/// How many trials fit at once: the memory plan of the first trial against the memory
/// available, at most one per core (1 when the plan does not cover the task, or off the CPU).
fn fitting_jobs(recipe_path: &Path, search: &Search, settings: &[String]) -> Result<usize> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // The plan measures host memory; an accelerator's trials share its memory and compute.
    if cores < 2 || !crate::on_cpu() {
        return Ok(1);
    }
    let mut set = search.set.clone();
    set.extend(settings.iter().cloned());
    let (recipe, _) = whet_train::Recipe::load_for_model(recipe_path, &set)?;
    let mut task = whet_train::open(whet_train::task::Run {
        recipe,
        device: burn::tensor::Device::flex().autodiff(),
        resume: None,
    })?;
    let (Some(plan), Some(available)) = (task.plan(), whet_train::plan::available_bytes()) else {
        return Ok(1);
    };
    let fit = (available / plan.total.max(1)) as usize;
    let jobs = fit.min(cores).max(1);
    println!(
        "memory plan: {:.0} MB a trial of {:.0} MB available, {cores} cores: {jobs} trial(s) at a \
         time",
        plan.total as f64 / (1u64 << 20) as f64,
        available as f64 / (1u64 << 20) as f64
    );
    Ok(jobs)
}

/// Runs trials `jobs` at a time, each a `whet train` process with its share of the cores and
/// its output in `trial-N/train.log`; the seconds each took.
fn parallel(recipe_path: &Path, runs: &[RunArgs], jobs: usize) -> Vec<Result<f64>> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (cores / jobs).max(1);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: std::sync::Mutex<Vec<Option<Result<f64>>>> =
        std::sync::Mutex::new(runs.iter().map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            scope.spawn(|| {
                loop {
                    let k = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let Some(r) = runs.get(k) else { break };
                    let result = run_process(recipe_path, r, threads);
                    if let Ok(mut all) = results.lock() {
                        all[k] = Some(result);
                    }
                }
            });
        }
    });
    results
        .into_inner()
        .unwrap_or_default()
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(anyhow!("the trial did not run"))))
        .collect()
}

fn run_process(recipe_path: &Path, r: &RunArgs, threads: usize) -> Result<f64> {
    let start = std::time::Instant::now();
    std::fs::create_dir_all(&r.dir)?;
    let log_path = r.dir.join("train.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let mut c = std::process::Command::new(std::env::current_exe()?);
    if let Some(device) = crate::device_arg() {
        c.arg("--device").arg(device);
    }
    c.arg("train").arg(recipe_path);
    for s in &r.set {
        c.arg("--set").arg(s);
    }
    if r.resume {
        c.arg("--resume");
    }
    if let Some(s) = r.stop_at {
        c.arg("--stop-at").arg(s.to_string());
    }
    let status = c
        .env("RAYON_NUM_THREADS", threads.to_string())
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()?;
    if !status.success() {
        bail!("it exited with {status}; see {}", log_path.display());
    }
    Ok(start.elapsed().as_secs_f64())
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
