// Included by crates/*/tests/fuzz.rs with `include!`, so each crate's test binary
// (tests/main.rs, whose module `fuzz` that file is) gets its own global allocator and
// counters; each fuzz test runs its cases in a process of its own ([`alone`]). The including
// file supplies the `use` lines (std::alloc, atomics, Mutex, ...).

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
/// `WHET_FUZZ_SCALE=20 cargo test -p CRATE --test main fuzz::`.
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

/// Whether this test may run its cases in this process. A fuzz test needs a process to itself:
/// the counters see every thread, the panic hook is global and a hang ends the process, while
/// the crate's test binary (tests/main.rs) runs its other tests alongside. So unless it is
/// already alone, the test reruns itself (`--exact`) in a child process of the same binary,
/// fails as the child fails, and gets `false`: the caller returns.
fn alone(test: &str) -> bool {
    // `main::fuzz` in the crate's test binary: the test's name is the path without the crate.
    let name = match module_path!().split_once("::") {
        Some((_, module)) => format!("{module}::{test}"),
        None => test.to_string(),
    };
    if std::env::var("WHET_FUZZ_ALONE").is_ok_and(|v| v == name) {
        return true;
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    let out = std::process::Command::new(exe)
        .args([name.as_str(), "--exact", "--test-threads=1", "--nocapture"])
        .env("WHET_FUZZ_ALONE", &name)
        .output()
        .expect("the test binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success() && stdout.contains(" 1 passed"),
        "{name} in a process of its own ({}):\n{stdout}",
        out.status
    );
    false
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
    if !alone("the_harness_catches_a_panic_and_an_oversized_allocation") {
        return;
    }
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
