//! Seeded fuzzing of the recipe reader: [`Recipe::parse`] with `--set` overrides, over the
//! committed recipes and one with every table, with truncations, bit flips, stray TOML
//! fragments, values of every TOML type at the edges, and random overrides. Every case must
//! end in `Ok` or `Err`: no panic, no hang, and no allocation out of proportion to the text.
//! An accepted recipe is also written back (`to_toml`), given peft's defaults and split.
//!
//! The cases repeat exactly (a hand-written SplitMix64); a failure names the case to rerun.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write as _;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

use whet_train::recipe::Recipe;

// ---------------------------------------------------------------------------------------------
// The harness (each crate's fuzz test carries its own copy): a counting allocator, a watchdog,
// a seeded mutator, and a runner that turns a panic, a hang or an oversized allocation into a
// failure naming the case.

/// Forwards to the system allocator, counting live bytes, their peak and the largest single
/// request while a case runs.
struct Counting;

#[global_allocator]
static ALLOC: Counting = Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static LARGEST: AtomicUsize = AtomicUsize::new(0);
static ARMED: AtomicBool = AtomicBool::new(false);
/// The running case, for the messages of the allocator and the watchdog.
static CURRENT: Mutex<String> = Mutex::new(String::new());
/// Milliseconds since [`epoch`] at which the running case started; 0 when none runs.
static STARTED_MS: AtomicU64 = AtomicU64::new(0);
static LAST_PANIC: Mutex<Option<String>> = Mutex::new(None);
/// The fuzz tests of a binary run one at a time: the counters see every thread.
static SERIAL: Mutex<()> = Mutex::new(());

/// A single request above this while a case runs is refused after naming the case (the
/// process then aborts): granted, it could bring in the OOM killer, which names nothing.
const REFUSE: usize = 1 << 30;
/// A case running longer than this is a hang: the watchdog names it and ends the process.
const HANG: Duration = Duration::from_secs(20);
/// Fixed allowance of the allocation bound (see [`bound`]).
const SLACK: usize = 16 << 20;

/// The most a case may allocate, in one request and in peak live bytes, for an input of `len`
/// bytes: 64 bytes per input byte covers the largest legitimate expansion (a one-byte array
/// element of GGUF becomes a 32-byte `Value`, a JSON scalar a map entry), and 16 MiB covers
/// fixed-size tables and buffers. A length field read as 2^32 or more exceeds it by far.
fn bound(len: usize) -> usize {
    64 * len + SLACK
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !admit(layout.size()) {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size(), layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !admit(layout.size()) {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size(), layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !admit(new_size) {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Relaxed);
            grew(new_size, new_size);
        }
        p
    }
}

fn admit(size: usize) -> bool {
    if size <= REFUSE || !ARMED.load(Relaxed) {
        return true;
    }
    // Neither formatting a number nor locking stderr allocates.
    let mut err = std::io::stderr();
    match CURRENT.try_lock() {
        Ok(case) => {
            let _ = writeln!(err, "fuzz: case {} asks for {size} bytes at once", *case);
        }
        Err(_) => {
            let _ = writeln!(err, "fuzz: a case asks for {size} bytes at once");
        }
    }
    false
}

fn grew(size: usize, by: usize) {
    LARGEST.fetch_max(size, Relaxed);
    let live = LIVE.fetch_add(by, Relaxed).wrapping_add(by);
    PEAK.fetch_max(live, Relaxed);
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64 + 1
}

/// Starts, once, the thread that ends the process when a case hangs.
fn watchdog() {
    static ONCE: Once = Once::new();
    epoch();
    ONCE.call_once(|| {
        std::thread::spawn(|| {
            loop {
                std::thread::sleep(Duration::from_millis(100));
                let started = STARTED_MS.load(Relaxed);
                if started != 0 && now_ms() - started > HANG.as_millis() as u64 {
                    let case = CURRENT.lock().map(|c| c.clone()).unwrap_or_default();
                    eprintln!("fuzz: case {case} has run for over {HANG:?}: a hang");
                    std::process::exit(101);
                }
            }
        });
    });
}

/// The innermost source line of this workspace on the stack, for a panic inside a dependency
/// (whose own location names no caller).
fn whet_frame() -> String {
    let trace = std::backtrace::Backtrace::force_capture().to_string();
    trace
        .lines()
        .filter_map(|l| l.trim().strip_prefix("at "))
        .find(|at| {
            (at.contains("/crates/") || at.starts_with("./src/")) && !at.contains("tests/fuzz.rs")
        })
        .map(|at| format!(" (from {at})"))
        .unwrap_or_default()
}

/// SplitMix64: the cases must repeat exactly, and a test needs no `rand` crate for that.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }

    /// Random bytes, fewer than `max` of them.
    fn up_to(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max);
        self.bytes(n)
    }

    /// A count or length at an edge a reader must survive, or a small random one.
    fn edge(&mut self) -> u64 {
        const EDGES: [u64; 20] = [
            0,
            1,
            2,
            0x7f,
            0xff,
            0x100,
            0xffff,
            0x1_0000,
            0x7fff_ffff,
            0x8000_0000,
            0xffff_ffff,
            1 << 32,
            1 << 40,
            1 << 53,
            1 << 60,
            i64::MAX as u64,
            1 << 63,
            u64::MAX - 31,
            u64::MAX - 1,
            u64::MAX,
        ];
        if self.below(4) == 0 {
            self.below(64) as u64
        } else {
            EDGES[self.below(EDGES.len())]
        }
    }
}

/// One to three byte-level mutations of `seed`, placed within `region` (clamped to the input):
/// bit flips, edge integers of 1, 2, 4 or 8 bytes, random overwrites, deletions, insertions
/// and duplicated slices.
fn mutate(seed: &[u8], rng: &mut Rng, region: std::ops::Range<usize>) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..1 + rng.below(3) {
        let end = region.end.min(b.len());
        let start = region.start.min(end);
        let at = start + rng.below(end - start + 1);
        match rng.below(6) {
            0 if at < b.len() => b[at] ^= 1 << rng.below(8),
            1 => {
                let width = [1, 2, 4, 8][rng.below(4)];
                let v = rng.edge().to_le_bytes();
                let at = at.min(b.len().saturating_sub(width));
                let n = width.min(b.len() - at);
                b[at..at + n].copy_from_slice(&v[..n]);
            }
            2 => {
                let n = (1 + rng.below(16)).min(b.len() - at);
                let r = rng.bytes(n);
                b[at..at + n].copy_from_slice(&r);
            }
            3 => {
                let n = (1 + rng.below(16)).min(b.len() - at);
                b.drain(at..at + n);
            }
            4 => {
                let r = rng.up_to(16);
                let r = if r.is_empty() { vec![0] } else { r };
                b.splice(at..at, r);
            }
            _ if !b.is_empty() => {
                let from = rng.below(b.len());
                let n = (1 + rng.below(64)).min(b.len() - from);
                let slice = b[from..from + n].to_vec();
                b.splice(at..at, slice);
            }
            _ => {}
        }
    }
    b
}

/// `n` times `WHET_FUZZ_SCALE` (1 when unset): a deeper run, e.g. before a release, is
/// `WHET_FUZZ_SCALE=20 cargo test -p CRATE --test fuzz`.
fn scaled(n: usize) -> usize {
    let scale = std::env::var("WHET_FUZZ_SCALE")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or(1);
    n * scale
}

/// Prefix lengths to cut a seed of `len` bytes at: every one up to `dense`, then `sparse`
/// seeded ones beyond.
fn cuts(len: usize, dense: usize, sparse: usize, rng: &mut Rng) -> Vec<usize> {
    let mut v: Vec<usize> = (0..dense.min(len)).collect();
    if len > dense {
        v.extend((0..sparse).map(|_| dense + rng.below(len - dense)));
    }
    v
}

/// Cases of one kind (a format, an entry point), counted and timed together.
struct Group {
    name: String,
    cases: usize,
    ok: usize,
    time: Duration,
}

/// Runs cases and gathers what went wrong; [`Run::finish`] fails the test naming them.
struct Run {
    parser: &'static str,
    groups: Vec<Group>,
    failures: Vec<String>,
    started: Instant,
    slowest: (Duration, String),
    /// Largest of (largest single allocation, peak growth) over the bound, and its case.
    worst: (f64, String),
    _serial: std::sync::MutexGuard<'static, ()>,
}

impl Run {
    fn new(parser: &'static str) -> Self {
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        watchdog();
        // Loads the symbols once, outside any case: they stay cached (tens of MiB).
        whet_frame();
        // A case's panic is recorded, not printed; any other panic (a failing assert of the
        // test itself) prints as usual.
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !ARMED.load(Relaxed) {
                default(info);
            } else if let Ok(mut last) = LAST_PANIC.lock() {
                // Symbolising the trace allocates tens of MiB: not the case's doing.
                let (largest, peak) = (LARGEST.load(Relaxed), PEAK.load(Relaxed));
                *last = Some(format!("{info}{}", whet_frame()));
                LARGEST.store(largest, Relaxed);
                PEAK.store(peak, Relaxed);
            }
        }));
        Self {
            parser,
            groups: vec![],
            failures: vec![],
            started: Instant::now(),
            slowest: (Duration::ZERO, String::new()),
            worst: (0.0, String::new()),
            _serial: serial,
        }
    }

    /// Counts the cases that follow under `name` (cases before any group count under the
    /// parser's name).
    fn group(&mut self, name: impl Into<String>) {
        self.groups.push(Group {
            name: name.into(),
            cases: 0,
            ok: 0,
            time: Duration::ZERO,
        });
    }

    /// Runs one case on an input of `len` bytes; `f` returns whether the parser said `Ok`.
    fn case(&mut self, label: &str, len: usize, f: impl FnOnce() -> bool) {
        if self.groups.is_empty() {
            self.group(self.parser);
        }
        if let Ok(mut c) = CURRENT.lock() {
            c.clear();
            c.push_str(self.parser);
            c.push(' ');
            c.push_str(label);
        }
        if let Ok(mut p) = LAST_PANIC.lock() {
            *p = None;
        }
        let base = LIVE.load(Relaxed);
        PEAK.store(base, Relaxed);
        LARGEST.store(0, Relaxed);
        let t = Instant::now();
        STARTED_MS.store(now_ms(), Relaxed);
        ARMED.store(true, Relaxed);
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(f));
        ARMED.store(false, Relaxed);
        STARTED_MS.store(0, Relaxed);
        let took = t.elapsed();
        let largest = LARGEST.load(Relaxed);
        let growth = PEAK.load(Relaxed).saturating_sub(base);
        let group = self.groups.last_mut().expect("a group was opened above");
        group.cases += 1;
        group.time += took;
        match outcome {
            Ok(ok) => group.ok += ok as usize,
            Err(_) => {
                let msg = LAST_PANIC.lock().ok().and_then(|mut p| p.take());
                self.failures.push(format!(
                    "{label}: panicked: {}",
                    msg.unwrap_or_else(|| "(no message)".into())
                ));
            }
        }
        let limit = bound(len);
        if largest > limit || growth > limit {
            self.failures.push(format!(
                "{label}: allocated {largest} bytes at once and {growth} at peak for a \
                 {len}-byte input (bound {limit})"
            ));
        }
        let ratio = largest.max(growth) as f64 / limit as f64;
        if ratio > self.worst.0 {
            self.worst = (ratio, label.to_string());
        }
        if took > self.slowest.0 {
            self.slowest = (took, label.to_string());
        }
    }

    /// Prints a summary per group and fails naming every failed case.
    fn finish(self) {
        let _ = std::panic::take_hook();
        let cases: usize = self.groups.iter().map(|g| g.cases).sum();
        for g in &self.groups {
            eprintln!(
                "fuzz {} {}: {} cases ({} Ok, {} Err) in {:.2?}",
                self.parser,
                g.name,
                g.cases,
                g.ok,
                g.cases - g.ok,
                g.time
            );
        }
        eprintln!(
            "fuzz {}: {cases} cases in {:.2?}; slowest {:.2?} ({}); closest to the allocation \
             bound: {:.1}% ({})",
            self.parser,
            self.started.elapsed(),
            self.slowest.0,
            self.slowest.1,
            100.0 * self.worst.0,
            self.worst.1,
        );
        assert!(
            self.failures.is_empty(),
            "{} of {cases} {} cases failed:\n{}",
            self.failures.len(),
            self.parser,
            self.failures
                .iter()
                .take(40)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

/// A test that cannot fail is worse than none: the harness must catch what it is for.
#[test]
fn the_harness_catches_a_panic_and_an_oversized_allocation() {
    let mut run = Run::new("harness");
    run.case("fine", 100, || {
        Vec::<u8>::with_capacity(1000).capacity() > 0
    });
    run.case("panics", 100, || panic!("on purpose"));
    run.case("allocates", 100, || {
        Vec::<u8>::with_capacity(SLACK + 64 * 100 + 1).capacity() > 0
    });
    assert_eq!(run.failures.len(), 2, "{:?}", run.failures);
    assert!(
        run.failures[0].starts_with("panics: panicked: ") && run.failures[0].contains("on purpose")
    );
    assert!(run.failures[1].starts_with("allocates: allocated "));
    run.failures.clear();
    run.finish();
}

/// Fragments that matter to text formats: delimiters, quotes, escapes, line ends, a BOM,
/// numbers at the edges, and bytes that are not UTF-8.
const TOKENS: &[&[u8]] = &[
    b"\"",
    b"'",
    b"\\",
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"=",
    b".",
    b"#",
    b"\n",
    b"\r\n",
    b"\r",
    b"\t",
    b" ",
    b"\0",
    "\u{feff}".as_bytes(),
    "é".as_bytes(),
    b"\xff",
    b"\xc3",
    b"\xed\xa0\x80",
    b"null",
    b"true",
    b"[[",
    b"{}",
    b"[]",
    b"\"\"",
    b"-1",
    b"-0",
    b"0",
    b"1e999",
    b"-1e999",
    b"NaN",
    b"inf",
    b"4294967296",
    b"9007199254740993",
    b"18446744073709551615",
    b"18446744073709551616",
    b"340282366920938463463374607431768211456",
    b"\\u0000",
    b"\\ud800",
    b"\\uDFFF\\uD800",
];

/// One to three mutations of text: the byte-level ones of [`mutate`], or a [`TOKENS`]
/// fragment inserted, overwriting, or replacing a run of digits.
fn mutate_text(seed: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..1 + rng.below(3) {
        let at = rng.below(b.len() + 1);
        let token = TOKENS[rng.below(TOKENS.len())];
        match rng.below(4) {
            0 => b = mutate(&b, rng, 0..b.len()),
            1 => {
                b.splice(at..at, token.iter().copied());
            }
            2 => {
                let end = (at + token.len()).min(b.len());
                b.splice(at..end, token.iter().copied());
            }
            _ => {
                // The next run of digits from `at`, replaced by a number at an edge.
                let Some(start) = b[at..].iter().position(u8::is_ascii_digit).map(|p| at + p)
                else {
                    continue;
                };
                let len = b[start..].iter().take_while(|c| c.is_ascii_digit()).count();
                let edge = rng.edge().to_string();
                b.splice(start..start + len, edge.bytes());
            }
        }
    }
    b
}

// ---------------------------------------------------------------------------------------------
// Recipes

/// A recipe with every table, so each one's fields meet the mutations.
const FULL: &str = r#"
model = "<cache>/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
task = "causal-lm"
method = "lora"

[data]
train = "<cache>/data/train.jsonl"
validation = "data/validation.jsonl"
text_column = "text"
label_names = ["neg", "pos"]
max_length = 256
truncation_side = "left"
encoding = "latin-1"
split = { train = 0.8, validation = 0.1, test = 0.1, seed = 7 }
tokenization_cache = false
template = { prompt = "Q: {question}\n### A:", completion = " {answer}" }
completion_only_loss = true
too_long = "truncate"
doc_stride = 64
max_answer_length = 30

[lora]
r = 8
lora_alpha = 16.0
lora_dropout = 0.05
target_modules = ["q_proj", "v_proj"]
bias = "none"
modules_to_save = ["score"]
use_rslora = true

[quantization]
keep_gguf_quantized = true

[head]
unfreeze_top_layers = 1

[dpo]
beta = 0.1
loss_type = "sigmoid"

[ppo]
reward_model = "<cache>/reward"

[training]
output_dir = "runs/full"
learning_rate = 2e-4
per_device_train_batch_size = 4
per_device_eval_batch_size = 8
num_train_epochs = 1.5
max_steps = -1
gradient_accumulation_steps = 2
weight_decay = 0.01
max_grad_norm = 1.0
lr_scheduler_type = "cosine"
warmup_ratio = 0.1
eval_strategy = "steps"
eval_steps = 10
save_strategy = "steps"
save_steps = 20
save_total_limit = 2
load_best_model_at_end = true
metric_for_best_model = "eval_loss"
greater_is_better = false
early_stopping_patience = 3
logging_steps = 5
seed = 42
"#;

/// TOML values at the edges of what a field can hold, of every TOML type.
fn edge_toml(rng: &mut Rng) -> toml::Value {
    use toml::Value;
    match rng.below(16) {
        0 => Value::Integer(0),
        1 => Value::Integer(-1),
        2 => Value::Integer(i64::MAX),
        3 => Value::Integer(i64::MIN),
        4 => Value::Integer(rng.edge() as i64),
        5 => Value::Float(f64::NAN),
        6 => Value::Float(f64::INFINITY),
        7 => Value::Float(-0.0),
        8 => Value::Float(1e308),
        9 => Value::Float(0.5),
        10 => Value::String(String::new()),
        11 => Value::String(["steps", "no", "x", "<cache>", "../.."][rng.below(5)].into()),
        12 => Value::Boolean(rng.below(2) == 1),
        13 => Value::Array(vec![Value::Integer(1), Value::String("a".into())]),
        14 => Value::Table(toml::Table::new()),
        _ => "1979-05-27T07:32:00Z".parse().map(Value::Datetime).unwrap(),
    }
}

/// Every value's path in `t` (table keys and array indices).
fn toml_paths(v: &toml::Value, at: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    out.push(at.clone());
    let children: Vec<(String, &toml::Value)> = match v {
        toml::Value::Table(t) => t.iter().map(|(k, v)| (k.clone(), v)).collect(),
        toml::Value::Array(a) => a
            .iter()
            .enumerate()
            .map(|(i, v)| (i.to_string(), v))
            .collect(),
        _ => return,
    };
    for (k, child) in children {
        at.push(k);
        toml_paths(child, at, out);
        at.pop();
    }
}

fn toml_at<'a>(v: &'a mut toml::Value, path: &[String]) -> &'a mut toml::Value {
    path.iter().fold(v, |v, k| match v {
        toml::Value::Table(t) => t.get_mut(k).expect("a path from `toml_paths`"),
        toml::Value::Array(a) => &mut a[k.parse::<usize>().expect("an index")],
        _ => unreachable!("`toml_paths` descends into containers only"),
    })
}

/// One to three edits of a TOML document: a value replaced by an edge value, a key removed,
/// or an unknown key added.
fn mutate_toml(seed: &toml::Value, rng: &mut Rng) -> String {
    let mut v = seed.clone();
    for _ in 0..1 + rng.below(3) {
        let mut all = vec![];
        toml_paths(&v, &mut vec![], &mut all);
        let path = all[rng.below(all.len())].clone();
        match rng.below(5) {
            0 if !path.is_empty() => {
                let (last, parent) = path.split_last().expect("not empty");
                if let toml::Value::Table(t) = toml_at(&mut v, parent) {
                    t.remove(last);
                }
            }
            1 => {
                if let toml::Value::Table(t) = toml_at(&mut v, &path) {
                    t.insert(format!("unknown_{}", rng.below(10)), edge_toml(rng));
                }
            }
            _ if path.is_empty() => {}
            _ => *toml_at(&mut v, &path) = edge_toml(rng),
        }
    }
    // A value TOML cannot write (a datetime as a table key's parent, ...) leaves the seed.
    toml::to_string(&v).unwrap_or_default()
}

/// A `--set key=value` override: known keys and broken ones, values of every kind.
fn random_override(rng: &mut Rng) -> String {
    const KEYS: &[&str] = &[
        "model",
        "task",
        "method",
        "data.max_length",
        "data.split.train",
        "data.split.validation",
        "data.split.seed",
        "data.template",
        "lora.r",
        "lora.target_modules",
        "quantization.load_in_4bit",
        "training.learning_rate",
        "training.eval_strategy",
        "training.per_device_train_batch_size",
        "training.num_train_epochs",
        "training.warmup_ratio",
        "training",
        "a..b",
        ".",
        "",
        "data.",
        "data.split.train.x",
        "training.output_dir.x",
    ];
    const VALUES: &[&str] = &[
        "0",
        "-1",
        "1e308",
        "nan",
        "-inf",
        "9223372036854775808",
        "\"qlora\"",
        "qlora",
        "[1, \"a\"]",
        "{ x = 1 }",
        "",
        "=",
        "\"",
        "[[[",
        "true",
        "0.5",
        "1979-05-27",
    ];
    let key = KEYS[rng.below(KEYS.len())];
    let value = VALUES[rng.below(VALUES.len())];
    match rng.below(8) {
        0 => format!("{key}{value}"),
        _ => format!("{key}={value}"),
    }
}

/// Parses, and for an accepted recipe writes it back, fills in peft's defaults for two model
/// types, reads the quantisation and template, and applies the split to 50 items.
fn exercise(text: &str, overrides: &[String]) -> bool {
    let Ok(recipe) = Recipe::parse(text, overrides) else {
        return false;
    };
    let _ = recipe.to_toml();
    let _ = recipe.quant_spec();
    if let Some(t) = &recipe.data.template {
        let _ = t.resolve();
    }
    let items: Vec<u32> = (0..50).collect();
    let _ = recipe.data.parts(items, None, None);
    for model_type in ["llama", "distilbert"] {
        let _ = recipe.clone().resolve_peft_defaults(model_type);
    }
    true
}

/// Inputs that broke the reader, kept as they were found.
fn regressions() -> Vec<(&'static str, String, Vec<String>)> {
    let split = "split = { train = 0.8, validation = 0.1, test = 0.1, seed = 7 }";
    assert!(FULL.contains(split));
    vec![
        // Two counts near usize::MAX overflowed the sum of the parts (whet-data's
        // `seeded_split`).
        (
            "split counts summing past usize::MAX",
            FULL.replace(split, "split = { train = 1e300, validation = 1e300 }"),
            vec![],
        ),
        (
            "--set split counts summing past usize::MAX",
            FULL.into(),
            vec![
                "data.split.train=1e300".into(),
                "data.split.test=1e300".into(),
            ],
        ),
    ]
}

#[test]
fn recipes_survive_mutation() {
    let mut run = Run::new("recipe");
    let mut rng = Rng(0x7265_6369_7065);
    let go = |run: &mut Run, label: &str, text: &str, overrides: &[String]| {
        let len = text.len() + overrides.iter().map(String::len).sum::<usize>();
        run.case(label, len, || exercise(text, overrides));
    };
    run.group("regressions");
    for (name, text, overrides) in regressions() {
        go(&mut run, &format!("regression {name}"), &text, &overrides);
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../recipes");
    let mut seeds: Vec<(String, String)> = vec![("full".into(), FULL.into())];
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    for p in files {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        seeds.push((name, std::fs::read_to_string(&p).unwrap()));
    }
    for (name, text) in &seeds {
        run.group(name.clone());
        if let Err(e) = Recipe::parse(text, &[]) {
            panic!("the seed {name} must parse: {e}");
        }
        let seed: toml::Value = toml::from_str(text).unwrap();
        let bytes = text.as_bytes();
        for cut in cuts(bytes.len(), 0, scaled(150), &mut rng) {
            let cut_text = String::from_utf8_lossy(&bytes[..cut]);
            go(&mut run, &format!("{name} cut at {cut}"), &cut_text, &[]);
        }
        for i in 0..scaled(400) {
            let text = mutate_toml(&seed, &mut rng);
            go(&mut run, &format!("{name} value #{i}"), &text, &[]);
        }
        for i in 0..scaled(400) {
            let text = String::from_utf8_lossy(&mutate_text(bytes, &mut rng)).into_owned();
            go(&mut run, &format!("{name} text #{i}"), &text, &[]);
        }
        for i in 0..scaled(200) {
            let overrides: Vec<String> = (0..1 + rng.below(3))
                .map(|_| random_override(&mut rng))
                .collect();
            go(
                &mut run,
                &format!("{name} overrides #{i}"),
                text,
                &overrides,
            );
        }
    }
    run.group("deep nesting");
    for depth in [10, 100, 1_000, 10_000] {
        for (open, close) in [("[", "]"), ("{ a = ", " }")] {
            let text = format!("model = {}1{}", open.repeat(depth), close.repeat(depth));
            go(
                &mut run,
                &format!("{open:?} nested {depth} deep"),
                &text,
                &[],
            );
        }
        let dotted = format!("{} = 1", vec!["a"; depth].join("."));
        go(&mut run, &format!("dotted key {depth} deep"), &dotted, &[]);
        let set = vec![format!("{}=1", vec!["a"; depth].join("."))];
        go(&mut run, &format!("--set key {depth} deep"), FULL, &set);
    }
    run.finish();
}
