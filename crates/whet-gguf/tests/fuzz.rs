//! Seeded fuzzing of the GGUF reader: truncations, bit flips, edge-value length fields and
//! random headers, from the committed fixture and a writer-made file with every value type.
//! Every case must end in `Ok` or `Err`: no panic, no hang, and no allocation out of
//! proportion to the file (a length field of 2^60 must never become a `Vec::with_capacity`).
//!
//! The cases repeat exactly (a hand-written SplitMix64); a failure names the case to rerun.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write as _;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

use whet_gguf::writer::{GgufWriter, encode};
use whet_gguf::{GgmlType, GgufFile, Value};

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

// ---------------------------------------------------------------------------------------------
// GGUF

/// A scratch folder in memory where the system has one (`/dev/shm`): thousands of small
/// writes should not wait on a disk's journal.
fn scratch() -> tempfile::TempDir {
    tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .unwrap()
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/gguf")
        .join(name)
}

/// A small file with metadata of every value type (nested arrays included) and tensors of a
/// dequantisable, an unknown (Q2_K) and a rank-0 kind.
fn writer_seed() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String("llama".into()));
    w.set("general.alignment", Value::U32(32));
    w.set("u8", Value::U8(7));
    w.set("i8", Value::I8(-7));
    w.set("u16", Value::U16(700));
    w.set("i16", Value::I16(-700));
    w.set("i32", Value::I32(-70000));
    w.set("f32", Value::F32(0.5));
    w.set("bool", Value::Bool(true));
    w.set("u64", Value::U64(1 << 40));
    w.set("i64", Value::I64(-(1 << 40)));
    w.set("f64", Value::F64(1e-6));
    w.set(
        "tokens",
        Value::Array(
            ["a", "b", "ab", "ü"]
                .map(|s| Value::String(s.into()))
                .to_vec(),
        ),
    );
    w.set(
        "nested",
        Value::Array(vec![
            Value::Array(vec![Value::U8(1), Value::U8(2)]),
            Value::Array(vec![Value::U8(3)]),
        ]),
    );
    let values: Vec<f32> = (0..64).map(|i| i as f32 / 8.0 - 4.0).collect();
    w.add_tensor(
        "a.f32",
        &[2, 4],
        GgmlType::F32,
        encode(GgmlType::F32, &values[..8]).unwrap(),
    );
    w.add_tensor(
        "b.q8",
        &[2, 32],
        GgmlType::Q8_0,
        encode(GgmlType::Q8_0, &values).unwrap(),
    );
    w.add_tensor("c.other", &[84], GgmlType::Other(10), vec![0; 84]);
    w.add_tensor(
        "e.scalar",
        &[],
        GgmlType::F32,
        2.5f32.to_le_bytes().to_vec(),
    );
    w.add_tensor(
        "d.f16",
        &[4],
        GgmlType::F16,
        encode(GgmlType::F16, &values[..4]).unwrap(),
    );
    w.to_bytes()
}

/// The byte where the header ends and tensor data begins (the lowest tensor offset).
fn header_len(path: &Path) -> usize {
    let f = GgufFile::open(path).unwrap();
    f.tensors
        .iter()
        .map(|t| t.offset as usize)
        .min()
        .unwrap_or(0)
}

/// A header of random counts and random metadata entries: value types in and out of range,
/// lengths at the edges.
fn random_header(rng: &mut Rng) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    let version = [2u32, 3, 3, 3, rng.next() as u32][rng.below(5)];
    b.extend(version.to_le_bytes());
    b.extend(rng.edge().to_le_bytes()); // tensors
    b.extend(rng.edge().to_le_bytes()); // metadata entries
    for _ in 0..rng.below(6) {
        let key = rng.up_to(8);
        b.extend((key.len() as u64).to_le_bytes());
        b.extend(key);
        let ty = rng.below(15) as u32;
        b.extend(ty.to_le_bytes());
        match ty {
            8 => b.extend(rng.edge().to_le_bytes()),
            9 => {
                b.extend((rng.below(14) as u32).to_le_bytes());
                b.extend(rng.edge().to_le_bytes());
            }
            _ => {}
        }
        let tail = rng.up_to(24);
        b.extend(tail);
    }
    for _ in 0..rng.below(3) {
        b.extend(2u64.to_le_bytes());
        b.extend(b"t0");
        let rank = [0u32, 1, 2, 4, 9, u32::MAX][rng.below(6)];
        b.extend(rank.to_le_bytes());
        for _ in 0..rank.min(4) {
            b.extend(rng.edge().to_le_bytes());
        }
        b.extend(([0u32, 1, 2, 8, 12, 14, 30, 10][rng.below(8)]).to_le_bytes());
        b.extend(rng.edge().to_le_bytes());
    }
    let tail = rng.up_to(128);
    b.extend(tail);
    b
}

/// Inputs that broke the reader (each panicked or overflowed the stack before the fix), kept
/// as they were found, and one edge.
fn regressions() -> Vec<(&'static str, Vec<u8>)> {
    let head = |tensors: u64, kv: u64| {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(tensors.to_le_bytes());
        b.extend(kv.to_le_bytes());
        b
    };
    // A chain of arrays of arrays, each announcing as many elements as the file has bytes:
    // every level reserved room for that many 32-byte values (quadratic in the file size), and
    // the recursion went as deep as the file allowed.
    let mut nested = head(0, 1);
    nested.extend(1u64.to_le_bytes());
    nested.push(b'k');
    nested.extend(9u32.to_le_bytes());
    let levels = 20_000u64;
    for _ in 0..levels {
        nested.extend(9u32.to_le_bytes());
        nested.extend((levels * 12).to_le_bytes());
    }
    // One tensor of the given dims, type and offset: an offset near 2^64 overflowed when the
    // data start was added, dims whose product or byte size passes 2^64 overflowed `numel`.
    let tensor = |dims: &[u64], ty: u32, offset: u64| {
        let mut b = head(1, 0);
        b.extend(1u64.to_le_bytes());
        b.push(b't');
        b.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            b.extend(d.to_le_bytes());
        }
        b.extend(ty.to_le_bytes());
        b.extend(offset.to_le_bytes());
        b.resize(b.len().next_multiple_of(32) + 64, 0);
        b
    };
    // Not a failure, an edge: a tensor count equal to the file's length reserved 64 bytes per
    // byte of file (now the room the rest of the file can hold).
    let mut many = head(0, 0);
    many.resize(4096, 0);
    let n = many.len() as u64;
    many[8..16].copy_from_slice(&n.to_le_bytes());
    vec![
        // The error for a count beyond the file computed its end as `pos + count`.
        ("tensor count near 2^64", head(u64::MAX, 0)),
        ("nested arrays", nested),
        ("offset near 2^64", tensor(&[4], 0, u64::MAX - 7)),
        (
            "dims whose product overflows",
            tensor(&[1 << 32, 1 << 32, 2], 0, 0),
        ),
        ("dims whose byte size overflows", tensor(&[1 << 62], 0, 0)),
        (
            "unknown type with overflowing dims",
            tensor(&[1 << 40, 1 << 40], 10, 0),
        ),
        ("tensor count = file length", many),
    ]
}

/// Opens, reads every metadata value as each kind and dequantises every tensor.
fn exercise(path: &Path) -> bool {
    let Ok(f) = GgufFile::open(path) else {
        return false;
    };
    for key in f.metadata.keys() {
        let _ = (
            f.get_strings(key),
            f.get_f64(key),
            f.get_u64(key),
            f.get_str(key),
        );
    }
    for t in &f.tensors {
        let _ = (t.numel(), t.shape(), f.raw(t).map(|r| r.len()));
        let _ = f.dequantize(t);
    }
    true
}

#[test]
fn gguf_reader_survives_malformed_files() {
    let mut run = Run::new("gguf");
    let dir = scratch();
    let path = dir.path().join("case.gguf");
    let mut rng = Rng(0x6767_7566);
    let go = |run: &mut Run, label: &str, bytes: &[u8]| {
        std::fs::write(&path, bytes).unwrap();
        run.case(label, bytes.len(), || exercise(&path));
    };

    run.group("regressions");
    for (name, bytes) in regressions() {
        go(&mut run, &format!("regression {name}"), &bytes);
    }

    let writer_path = dir.path().join("writer.gguf");
    std::fs::write(&writer_path, writer_seed()).unwrap();
    let seeds = [
        ("quants.gguf", fixture("quants.gguf")),
        ("writer", writer_path),
    ];
    for (name, seed_path) in &seeds {
        run.group(*name);
        let seed = std::fs::read(seed_path).unwrap();
        let header = header_len(seed_path);
        assert!(exercise(seed_path), "the seed {name} must read");
        for cut in cuts(seed.len(), header + 64, scaled(300), &mut rng) {
            go(&mut run, &format!("{name} cut at {cut}"), &seed[..cut]);
        }
        for i in 0..scaled(2500) {
            let bytes = mutate(&seed, &mut rng, 0..header);
            go(&mut run, &format!("{name} header mutation #{i}"), &bytes);
        }
        for i in 0..scaled(500) {
            let bytes = mutate(&seed, &mut rng, 0..seed.len());
            go(&mut run, &format!("{name} mutation #{i}"), &bytes);
        }
    }
    run.group("random headers");
    for i in 0..scaled(2500) {
        let bytes = random_header(&mut rng);
        go(&mut run, &format!("random header #{i}"), &bytes);
    }
    run.finish();
}
