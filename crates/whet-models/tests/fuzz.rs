//! Seeded fuzzing of what a model folder or file holds: the safetensors header,
//! `config.json`, `tokenizer.json` with `tokenizer_config.json` and `special_tokens_map.json`,
//! and a GGUF checkpoint's metadata, through [`Checkpoint::open`], the loaders and
//! [`TextTokenizer::from_folder`]. The seeds are the committed tiny checkpoints and
//! tokenizers built here; the cases are truncations, bit flips, edge numbers and values,
//! stray JSON fragments and random headers. Every case must end in `Ok` or `Err`: no panic,
//! no hang, and no allocation out of proportion to the files (a size in a config must never
//! become a `Vec::with_capacity` the checkpoint does not back).
//!
//! The cases repeat exactly (a hand-written SplitMix64); a failure names the case to rerun.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::io::Write as _;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

use burn::tensor::Device;
use serde_json::{Value as Json, json};
use whet_gguf::writer::GgufWriter;
use whet_gguf::{GgmlType, GgufFile, Value};
use whet_models::tokenizer::byte_level_bpe;
use whet_models::{ChatMessage, Checkpoint, FamilyConfig, TextTokenizer};

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
// JSON-aware mutation

/// Values at the edges of what a config field can hold.
fn edge_json(rng: &mut Rng) -> Json {
    match rng.below(16) {
        0 => json!(0),
        1 => json!(-1),
        2 => json!(rng.edge()),
        3 => json!(rng.edge()),
        4 => json!(1e308),
        5 => json!(-1e308),
        6 => json!(0.5),
        7 => json!(1e-300),
        8 => Json::Null,
        9 => json!(true),
        10 => json!(""),
        11 => json!("x"),
        12 => json!([]),
        13 => json!({}),
        14 => json!([1, [2, {"a": null}]]),
        _ => json!(rng.below(100_000) as u64),
    }
}

/// Every value's path in `v` (object keys and array indices).
fn paths(v: &Json, at: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    out.push(at.clone());
    let children: Vec<(String, &Json)> = match v {
        Json::Object(m) => m.iter().map(|(k, v)| (k.clone(), v)).collect(),
        Json::Array(a) => a
            .iter()
            .enumerate()
            .map(|(i, v)| (i.to_string(), v))
            .collect(),
        _ => return,
    };
    for (k, child) in children {
        at.push(k);
        paths(child, at, out);
        at.pop();
    }
}

fn at_path<'a>(v: &'a mut Json, path: &[String]) -> &'a mut Json {
    path.iter().fold(v, |v, k| match v {
        Json::Object(m) => m.get_mut(k).expect("a path from `paths`"),
        Json::Array(a) => &mut a[k.parse::<usize>().expect("an index")],
        _ => unreachable!("`paths` descends into containers only"),
    })
}

/// Keys a config may hold that the seeds lack (so a mutation can add them): the label count,
/// head and window sizes, rope settings.
const OPTIONAL_KEYS: &[&str] = &[
    "num_labels",
    "id2label",
    "problem_type",
    "head_dim",
    "num_key_value_heads",
    "sliding_window",
    "use_sliding_window",
    "rope_theta",
    "rope_scaling",
    "n_inner",
    "classifier_dropout",
    "pad_token_id",
];

/// One to three edits of a JSON document: a value replaced by an edge value, an object key
/// removed, or a key added (one a config may hold, or an unknown one).
fn mutate_json(seed: &Json, rng: &mut Rng) -> Vec<u8> {
    let mut v = seed.clone();
    for _ in 0..1 + rng.below(3) {
        let mut all = vec![];
        paths(&v, &mut vec![], &mut all);
        let path = all[rng.below(all.len())].clone();
        match rng.below(5) {
            0 if !path.is_empty() => {
                let (last, parent) = path.split_last().expect("not empty");
                if let Json::Object(m) = at_path(&mut v, parent) {
                    m.remove(last);
                }
            }
            1 => {
                if let Json::Object(m) = at_path(&mut v, &path) {
                    let key = match OPTIONAL_KEYS.get(rng.below(2 * OPTIONAL_KEYS.len())) {
                        Some(k) => k.to_string(),
                        None => format!("unknown_{}", rng.below(10)),
                    };
                    m.insert(key, edge_json(rng));
                }
            }
            _ => *at_path(&mut v, &path) = edge_json(rng),
        }
    }
    serde_json::to_vec_pretty(&v).expect("JSON serialises")
}

// ---------------------------------------------------------------------------------------------
// Cases

/// A scratch folder in memory where the system has one (`/dev/shm`): thousands of small
/// writes should not wait on a disk's journal.
fn scratch() -> tempfile::TempDir {
    tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .unwrap()
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// Writes `files` into `dir` (replacing what was there) and returns their total size.
fn write_folder(dir: &Path, files: &[(&str, &[u8])]) -> usize {
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    files.iter().map(|(_, b)| b.len()).sum()
}

/// Opens a checkpoint (folder or GGUF file), reads every tensor, loads every head that fits its
/// family and its tokenizer when it has one; true when all of it succeeded.
fn exercise_checkpoint(path: &Path) -> bool {
    let Ok(ckpt) = Checkpoint::open(path) else {
        return false;
    };
    let mut ok = true;
    for name in ckpt.source.names() {
        let _ = ckpt.source.shape(&name);
        ok &= ckpt.source.read_f32(&name).is_ok();
    }
    let device = Device::flex();
    let _ = (
        ckpt.eos_token_ids(),
        ckpt.pad_token_id(),
        ckpt.head().labels(),
    );
    if ckpt.family().is_decoder() {
        ok &= ckpt.load_causal_lm(&device).is_ok();
    }
    ok &= ckpt.load_classifier(&device).is_ok();
    if ckpt.gguf().is_some() {
        ok &= ckpt.tokenizer().is_ok_and(|t| exercise_tokenizer(&t));
    }
    ok
}

/// Encodes, decodes and renders the chat template; true when all of it succeeded.
fn exercise_tokenizer(t: &TextTokenizer) -> bool {
    let text = "Hello world, ça va? <|endoftext|> 12345";
    let Ok(ids) = t.encode(text, true) else {
        return false;
    };
    let pair = t.encode_pair("question?", "context.");
    let decoded = t.decode(&ids, true);
    let chat = t.chat_template.as_ref().map(|_| {
        t.apply_chat_template(
            &[ChatMessage {
                role: "user".into(),
                content: "hi".into(),
            }],
            true,
        )
    });
    let _ = t.vocab_size();
    pair.is_ok() && decoded.is_ok() && chat.is_none_or(|c| c.is_ok())
}

fn exercise_tokenizer_folder(dir: &Path) -> bool {
    TextTokenizer::from_folder(dir).is_ok_and(|t| exercise_tokenizer(&t))
}

// ---------------------------------------------------------------------------------------------
// Seeds

/// A byte-level BPE tokenizer (GPT-2 / LLaMA style): the 256 byte symbols, a few merges, a
/// BOS template and special tokens; with its `tokenizer_config.json` (chat template).
fn bpe_seed() -> (TextTokenizer, Vec<u8>, Json) {
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    let mut symbols: Vec<String> = ByteLevel::alphabet()
        .into_iter()
        .map(String::from)
        .collect();
    symbols.sort();
    let merges: Vec<(String, String)> = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n")]
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .to_vec();
    let mut vocab: HashMap<String, u32> = HashMap::new();
    for s in symbols
        .iter()
        .cloned()
        .chain(merges.iter().map(|(a, b)| format!("{a}{b}")))
        .chain(["<|endoftext|>", "<|im_start|>", "<|im_end|>"].map(String::from))
    {
        let id = vocab.len() as u32;
        vocab.entry(s).or_insert(id);
    }
    let specials: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .map(String::from)
        .to_vec();
    let bos = whet_models::tokenizer::Special {
        text: "<|im_start|>".into(),
        id: vocab["<|im_start|>"],
    };
    let eos = whet_models::tokenizer::Special {
        text: "<|endoftext|>".into(),
        id: vocab["<|endoftext|>"],
    };
    let inner = byte_level_bpe(vocab, merges, &specials, false, Some(&bos), "seed").unwrap();
    let json = inner.to_string(false).unwrap().into_bytes();
    let template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n\
                    {% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    let config = json!({
        "bos_token": "<|im_start|>",
        "eos_token": {"content": "<|endoftext|>", "special": true},
        "pad_token": "<|endoftext|>",
        "chat_template": template,
    });
    let tok = TextTokenizer {
        inner,
        bos: Some(bos),
        eos: Some(eos),
        pad: None,
        chat_template: Some(template.into()),
        source: "seed".into(),
    };
    (tok, json, config)
}

/// A BERT WordPiece tokenizer: normaliser, pre-tokenizer, `[CLS] $A [SEP] $B [SEP]`.
fn wordpiece_seed() -> Vec<u8> {
    use tokenizers::models::wordpiece::WordPiece;
    use tokenizers::normalizers::BertNormalizer;
    use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
    use tokenizers::processors::template::TemplateProcessing;
    let words = [
        "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", ",", "?", "ca", "##va",
        "question", "context", ".", "1", "##2", "##3", "<", ">", "|", "end", "##of", "##text",
    ];
    let vocab: ahash::AHashMap<String, u32> = words
        .iter()
        .enumerate()
        .map(|(i, w)| (w.to_string(), i as u32))
        .collect();
    let model = WordPiece::builder()
        .vocab(vocab)
        .unk_token("[UNK]".into())
        .build()
        .unwrap();
    let mut tok = tokenizers::Tokenizer::new(model);
    tok.with_normalizer(Some(BertNormalizer::new(true, true, None, true)));
    tok.with_pre_tokenizer(Some(BertPreTokenizer));
    tok.with_post_processor(Some(
        TemplateProcessing::builder()
            .try_single("[CLS]:0 $A:0 [SEP]:0")
            .unwrap()
            .try_pair("[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1")
            .unwrap()
            .special_tokens(vec![("[CLS]", 2), ("[SEP]", 3)])
            .build()
            .unwrap(),
    ));
    tok.with_decoder(Some(tokenizers::decoders::wordpiece::WordPiece::default()));
    tok.to_string(false).unwrap().into_bytes()
}

/// A LLaMA GGUF checkpoint: tiny-llama's weights (Q8_0 where rows are whole blocks, F16
/// elsewhere) with the BPE seed's tokenizer in its metadata.
fn gguf_seed(dir: &Path) -> PathBuf {
    let ckpt = Checkpoint::open(fixtures().join("tiny-llama")).unwrap();
    let FamilyConfig::Llama(config) = &ckpt.config else {
        panic!("tiny-llama is a llama");
    };
    let (tok, _, _) = bpe_seed();
    let out = dir.join("seed.gguf");
    whet_models::gguf::export(ckpt.source.as_ref(), config, &tok, GgmlType::Q8_0, &out).unwrap();
    out
}

/// The GGUF file `seed` rewritten with one to three metadata values replaced by edge values
/// of every type (or removed), tensors unchanged.
fn mutate_gguf_metadata(seed: &GgufFile, rng: &mut Rng) -> Vec<u8> {
    let mut meta: Vec<(String, Value)> = seed
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for _ in 0..1 + rng.below(3) {
        let i = rng.below(meta.len());
        let e = rng.edge();
        let edge = match rng.below(12) {
            0 => Value::U32(e as u32),
            1 => Value::U64(e),
            2 => Value::I32(e as i32),
            3 => Value::I64(e as i64),
            4 => Value::F32([0.0, -1.0, f32::NAN, f32::INFINITY, 1e30][rng.below(5)]),
            5 => Value::F64(f64::from_bits(e)),
            6 => Value::Bool(e & 1 == 1),
            7 => Value::String(["", "llama", "gpt2", "x y", "{% if %}"][rng.below(5)].into()),
            8 => Value::Array(vec![]),
            9 => Value::Array(vec![Value::U8(0); rng.below(4)]),
            10 => {
                meta.remove(i);
                continue;
            }
            _ => match &meta[i].1 {
                // A list shortened or lengthened, its elements kept.
                Value::Array(a) => {
                    let n = rng.below(a.len() + 2);
                    Value::Array(a.iter().cycle().take(n).cloned().collect())
                }
                _ => Value::U32(rng.below(1 << 12) as u32),
            },
        };
        meta[i].1 = edge;
    }
    let mut w = GgufWriter::new();
    for (k, v) in meta {
        w.set(&k, v);
    }
    for t in &seed.tensors {
        w.add_tensor(&t.name, &t.shape(), t.ty, seed.raw(t).unwrap().to_vec());
    }
    w.to_bytes()
}

/// A safetensors file: an 8-byte header length, the JSON header, the data.
fn safetensors_parts(bytes: &[u8]) -> (Json, Vec<u8>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (
        serde_json::from_slice(&bytes[8..8 + n]).unwrap(),
        bytes[8 + n..].to_vec(),
    )
}

fn safetensors_join(header: &[u8], data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend(header);
    out.extend(data);
    out
}

/// A header of random tensors: dtypes known and not, shapes and offsets at the edges.
fn random_safetensors(rng: &mut Rng) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for i in 0..rng.below(4) {
        let dtype = [
            "F32", "F16", "BF16", "F64", "I8", "U8", "F8_E4M3", "F4", "Q",
        ][rng.below(9)];
        let shape: Vec<u64> = (0..rng.below(4)).map(|_| rng.edge() % 64).collect();
        let len = if rng.below(3) == 0 {
            rng.edge()
        } else {
            shape.iter().product::<u64>() * 4
        };
        let end = offset.wrapping_add(len);
        header.insert(
            format!("model.t{i}"),
            json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    if rng.below(2) == 0 {
        header.insert("__metadata__".into(), json!({"format": "pt"}));
    }
    let header = serde_json::to_vec(&header).unwrap();
    let data = rng.up_to(256);
    let mut out = safetensors_join(&header, &data);
    if rng.below(4) == 0 {
        out[..8].copy_from_slice(&rng.edge().to_le_bytes());
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Tests

/// `config.json` edits that broke the loader, as (name, seed folder, key, value).
fn config_regressions() -> Vec<(&'static str, &'static str, &'static str, Json)> {
    vec![
        // The rotary table was sized from head_dim before any tensor confirmed it: 2^31 f32.
        ("head_dim 2^32", "tiny-llama", "head_dim", json!(1u64 << 32)),
        // `head_dim()` divided by the head count even when head_dim was given.
        (
            "no attention heads",
            "tiny-llama",
            "num_attention_heads",
            json!(0),
        ),
        // A new score head (and the LABEL_i names) was sized from num_labels alone.
        (
            "num_labels 2^40",
            "tiny-llama",
            "num_labels",
            json!(1u64 << 40),
        ),
        (
            "num_labels 2^40 beside id2label",
            "tiny-bert",
            "num_labels",
            json!(1u64 << 40),
        ),
    ]
}

/// GGUF metadata edits that broke the loader, as (name, key, value).
fn gguf_regressions() -> Vec<(&'static str, &'static str, Value)> {
    vec![
        // The rotary table was sized from the key length before any tensor confirmed it.
        (
            "key length 2^32",
            "llama.attention.key_length",
            Value::U64(1 << 32),
        ),
        // `llama_config` divided the embedding length by the head count.
        (
            "no attention heads",
            "llama.attention.head_count",
            Value::U32(0),
        ),
    ]
}

/// The GGUF file `seed` with metadata `key` set to `value`.
fn gguf_with(seed: &GgufFile, key: &str, value: Value) -> Vec<u8> {
    let mut w = GgufWriter::new();
    for (k, v) in &seed.metadata {
        w.set(k, v.clone());
    }
    w.set(key, value);
    for t in &seed.tensors {
        w.add_tensor(&t.name, &t.shape(), t.ty, seed.raw(t).unwrap().to_vec());
    }
    w.to_bytes()
}

/// Tokenizer files that broke the loader or the first encode, as (name, seed, file, bytes).
fn tokenizer_regressions(wordpiece: &[u8]) -> Vec<(&'static str, &'static str, Vec<u8>)> {
    // Cut inside the decoder: tokenizers `expect`ed the decoder to deserialise.
    let text = std::str::from_utf8(wordpiece).unwrap();
    let decoder = text.find("\"decoder\"").unwrap();
    let cut = wordpiece[..decoder + 20].to_vec();
    // A template placing [SEP] that its special tokens lack: the first encode indexed a map.
    let mut json: Json = serde_json::from_slice(wordpiece).unwrap();
    json["post_processor"]["special_tokens"]
        .as_object_mut()
        .unwrap()
        .remove("[SEP]");
    vec![
        (
            "tokenizer.json cut inside its decoder",
            "tokenizer.json",
            cut,
        ),
        (
            "template token without a definition",
            "tokenizer.json",
            serde_json::to_vec(&json).unwrap(),
        ),
    ]
}

#[test]
fn safetensors_headers_and_configs_survive_mutation() {
    let mut run = Run::new("folder");
    let mut rng = Rng(0x7361_6665);
    let tmp = scratch();
    let dir = tmp.path();

    let llama = fixtures().join("tiny-llama");
    let config = std::fs::read(llama.join("config.json")).unwrap();
    let weights = std::fs::read(llama.join("model.safetensors")).unwrap();
    let (header, data) = safetensors_parts(&weights);
    let header_text = serde_json::to_vec(&header).unwrap();
    let header_end = 8 + header_text.len();

    run.group("safetensors");
    write_folder(dir, &[("config.json", &config)]);
    let go_weights = |run: &mut Run, label: &str, bytes: &[u8]| {
        let len = write_folder(dir, &[("model.safetensors", bytes)]) + config.len();
        run.case(label, len, || exercise_checkpoint(dir));
    };
    go_weights(&mut run, "seed", &safetensors_join(&header_text, &data));
    for cut in cuts(weights.len(), header_end + 16, scaled(100), &mut rng) {
        go_weights(&mut run, &format!("cut at {cut}"), &weights[..cut]);
    }
    for i in 0..scaled(400) {
        let bytes = safetensors_join(&mutate_json(&header, &mut rng), &data);
        go_weights(&mut run, &format!("header value #{i}"), &bytes);
    }
    for i in 0..scaled(300) {
        let bytes = safetensors_join(&mutate_text(&header_text, &mut rng), &data);
        go_weights(&mut run, &format!("header text #{i}"), &bytes);
    }
    for i in 0..scaled(300) {
        let bytes = mutate(&weights, &mut rng, 0..header_end);
        go_weights(&mut run, &format!("header bytes #{i}"), &bytes);
    }
    for i in 0..scaled(300) {
        let bytes = random_safetensors(&mut rng);
        go_weights(&mut run, &format!("random header #{i}"), &bytes);
    }

    for family in ["tiny-llama", "tiny-bert", "tiny-distilbert", "tiny-gpt2"] {
        run.group(format!("{family} config.json"));
        let src = fixtures().join(family);
        let weights = std::fs::read(src.join("model.safetensors")).unwrap();
        let text = std::fs::read(src.join("config.json")).unwrap();
        let seed: Json = serde_json::from_slice(&text).unwrap();
        write_folder(dir, &[("model.safetensors", &weights)]);
        let go = |run: &mut Run, label: &str, config: &[u8]| {
            let len = write_folder(dir, &[("config.json", config)]) + weights.len();
            run.case(label, len, || exercise_checkpoint(dir));
        };
        for (name, seed_name, key, value) in config_regressions() {
            if seed_name == family {
                let mut json = seed.clone();
                json[key] = value;
                let bytes = serde_json::to_vec(&json).unwrap();
                go(&mut run, &format!("regression {name}"), &bytes);
            }
        }
        go(&mut run, &format!("{family} seed"), &text);
        for cut in cuts(text.len(), 0, scaled(60), &mut rng) {
            go(
                &mut run,
                &format!("{family} config cut at {cut}"),
                &text[..cut],
            );
        }
        for i in 0..scaled(800) {
            let bytes = mutate_json(&seed, &mut rng);
            go(&mut run, &format!("{family} config value #{i}"), &bytes);
        }
        for i in 0..scaled(300) {
            let bytes = mutate_text(&text, &mut rng);
            go(&mut run, &format!("{family} config text #{i}"), &bytes);
        }
    }
    run.finish();
}

/// A tokenizer folder's files: (name, bytes).
type Files = Vec<(&'static str, Vec<u8>)>;

#[test]
fn tokenizer_files_survive_mutation() {
    let mut run = Run::new("tokenizer");
    let mut rng = Rng(0x746f_6b65);
    let tmp = scratch();
    let dir = tmp.path();
    let (_, bpe, bpe_config) = bpe_seed();
    let bpe_config = serde_json::to_vec(&bpe_config).unwrap();
    let special_map =
        serde_json::to_vec(&json!({"unk_token": "[UNK]", "pad_token": "[PAD]"})).unwrap();
    let wordpiece = wordpiece_seed();
    run.group("regressions");
    for (name, file, bytes) in tokenizer_regressions(&wordpiece) {
        let len = write_folder(dir, &[(file, &bytes)]);
        run.case(&format!("regression {name}"), len, || {
            exercise_tokenizer_folder(dir)
        });
    }
    let mut seeds: Vec<(&str, Files)> = vec![
        (
            "bpe",
            vec![
                ("tokenizer.json", bpe.clone()),
                ("tokenizer_config.json", bpe_config.clone()),
            ],
        ),
        (
            "wordpiece",
            vec![
                ("tokenizer.json", wordpiece),
                ("special_tokens_map.json", special_map),
            ],
        ),
    ];
    // MiniLM's real tokenizer, when the asset cache has it (not committed: 466 KB).
    let minilm = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../cache/minilm/tokenizer.json");
    if let Ok(bytes) = std::fs::read(&minilm) {
        seeds.push(("minilm", vec![("tokenizer.json", bytes)]));
    }
    for (seed_name, files) in &seeds {
        run.group(*seed_name);
        for f in [
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
        ] {
            let _ = std::fs::remove_file(dir.join(f));
        }
        let base: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (*n, b.as_slice())).collect();
        let total: usize = write_folder(dir, &base);
        assert!(
            exercise_tokenizer_folder(dir),
            "the seed {seed_name} must load"
        );
        let (count, cut_count) = if *seed_name == "minilm" {
            (scaled(10), scaled(10))
        } else {
            (scaled(400), scaled(80))
        };
        for (file, bytes) in files {
            let seed: Json = serde_json::from_slice(bytes).unwrap();
            let go = |run: &mut Run, label: &str, b: &[u8]| {
                let len = write_folder(dir, &[(file, b)]) - bytes.len() + total;
                run.case(label, len, || exercise_tokenizer_folder(dir));
            };
            for cut in cuts(bytes.len(), 0, cut_count, &mut rng) {
                go(
                    &mut run,
                    &format!("{seed_name} {file} cut at {cut}"),
                    &bytes[..cut],
                );
            }
            for i in 0..count {
                let b = mutate_json(&seed, &mut rng);
                go(&mut run, &format!("{seed_name} {file} value #{i}"), &b);
            }
            for i in 0..count {
                let b = mutate_text(bytes, &mut rng);
                go(&mut run, &format!("{seed_name} {file} text #{i}"), &b);
            }
            write_folder(dir, &[(file, bytes)]);
        }
    }
    run.finish();
}

#[test]
fn gguf_checkpoints_survive_mutation() {
    let mut run = Run::new("gguf checkpoint");
    let mut rng = Rng(0x0067_6775_666d);
    let tmp = scratch();
    let seed_path = gguf_seed(tmp.path());
    let seed_bytes = std::fs::read(&seed_path).unwrap();
    let seed = GgufFile::open(&seed_path).unwrap();
    let header = seed
        .tensors
        .iter()
        .map(|t| t.offset as usize)
        .min()
        .unwrap();
    assert!(exercise_checkpoint(&seed_path), "the GGUF seed must load");
    let path = tmp.path().join("case.gguf");
    let go = |run: &mut Run, label: &str, bytes: &[u8]| {
        std::fs::write(&path, bytes).unwrap();
        run.case(label, bytes.len(), || exercise_checkpoint(&path));
    };
    run.group("regressions");
    for (name, key, value) in gguf_regressions() {
        go(
            &mut run,
            &format!("regression {name}"),
            &gguf_with(&seed, key, value),
        );
    }
    run.group("metadata values");
    for i in 0..scaled(2000) {
        let bytes = mutate_gguf_metadata(&seed, &mut rng);
        go(&mut run, &format!("metadata #{i}"), &bytes);
    }
    run.group("header bytes");
    for i in 0..scaled(400) {
        let bytes = mutate(&seed_bytes, &mut rng, 0..header);
        go(&mut run, &format!("header bytes #{i}"), &bytes);
    }
    for cut in cuts(seed_bytes.len(), 0, scaled(100), &mut rng) {
        go(&mut run, &format!("cut at {cut}"), &seed_bytes[..cut]);
    }
    run.finish();
}
