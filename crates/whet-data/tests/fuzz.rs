//! Seeded fuzzing of the data readers: JSON lines, CSV / TSV (UTF-8 and Latin-1), Parquet,
//! plain text and BIG-bench `task.json`, through [`Table::read`] and [`read_pairs`], with
//! truncations, bit flips, edge numbers and stray delimiters, quotes and bytes, from the
//! committed Parquet fixtures, the QA fixture and small inline files. Every case must end in
//! `Ok` or `Err`: no panic, no hang, and no allocation out of proportion to the file.
//!
//! The cases repeat exactly (a hand-written SplitMix64); a failure names the case to rerun.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write as _;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

use whet_data::{Encoding, QaColumns, Table, qa_examples, read_pairs};

// ---------------------------------------------------------------------------------------------
// The harness, shared by the four fuzz tests (tests/fuzz_harness.rs): a counting allocator, a
// watchdog, a seeded mutator, and a runner that turns a panic, a hang or an oversized allocation
// into a failure naming the case.
include!("../../../tests/fuzz_harness.rs");

// Text fragments and the text mutator (tests/fuzz_text.rs).
include!("../../../tests/fuzz_text.rs");

// ---------------------------------------------------------------------------------------------
// Tables

/// A scratch folder in memory where the system has one (`/dev/shm`): thousands of small
/// writes should not wait on a disk's journal.
fn scratch() -> tempfile::TempDir {
    tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .unwrap()
}

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(rel)
}

const JSONL: &str = r#"{"text": "great phone, the battery lasts", "label": "pos", "labels": ["a", "b"], "score": 0.5}
{"text": "ça ne marche pas \"du tout\"\n", "label": "neg", "id": 2, "nested": {"k": [1, 2, {"x": null}]}}

{"prompt": "Q: hi\nA:", "chosen": " hello", "rejected": " go away", "big": 18446744073709551615}
"#;

const PAIRS: &str = r#"{"prompt": "Q: hi\nA:", "chosen": " hello", "rejected": " go away"}
{"prompt": "Q: 2+2?\nA:", "chosen": " 4", "rejected": " 5"}
{"prompt": "", "chosen": "Q: sky? A: blue", "rejected": "Q: sky? A: green"}
"#;

const CSV: &str = "\u{feff}text,label,extra\n\"a, quoted \"\"field\"\"\",pos,1\nplain,neg,2\n\"multi\nline\",pos,3\r\nlast,neg,\n";

const TSV: &str = "text\tlabel\n\"tab\tinside\"\tpos\nplain\tneg\n";

const TEXT: &str = "First line of a book.\n\n  \nSecond line, after blanks.\r\nThird.";

const TASK: &str = r#"{"name": "hhh", "examples": [
  {"input": "Can you help?", "target_scores": {"Sure, here is how.": 1, "No.": 0, "Go away.": 0}},
  {"input": "Is it safe?", "target_scores": {"Yes, if careful.": 1.0, "Never mind.": 0.0}}
]}"#;

/// A Latin-1 CSV: é and ü as single bytes, invalid as UTF-8.
fn latin1_csv() -> Vec<u8> {
    b"text,sentiment\ncaf\xe9 cr\xe8me,positive\n\"d\xfcrr, \"\"dry\"\"\",negative\n".to_vec()
}

/// The first `n` lines of the QA fixture (SQuAD-style answers with character offsets).
fn qa_lines(n: usize) -> Vec<u8> {
    let text = std::fs::read_to_string(fixture("qa/facts.jsonl")).unwrap();
    let mut out: String = text.lines().take(n).collect::<Vec<_>>().join("\n");
    out.push('\n');
    out.into_bytes()
}

/// What to read a case's file as.
#[derive(Clone, Copy)]
enum Reader {
    Table(Encoding),
    /// The table as SQuAD-style question answering (character offsets into the context).
    Qa,
    /// Preference pairs ([`read_pairs`]: BIG-bench `task.json` or a table).
    Pairs,
}

fn exercise(path: &Path, reader: Reader) -> bool {
    match reader {
        Reader::Table(encoding) => Table::read(path, encoding)
            .and_then(|t| t.require(&["text"]))
            .is_ok(),
        Reader::Qa => {
            let cols = QaColumns {
                question: "question".into(),
                context: "context".into(),
                answers: "answers".into(),
            };
            Table::read(path, Encoding::Utf8)
                .and_then(|t| qa_examples(&t, &cols))
                .is_ok()
        }
        Reader::Pairs => read_pairs(path, Encoding::Utf8).is_ok(),
    }
}

/// Inputs that broke a reader, kept as they were found.
fn regressions() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let edit = |seed: &str, at: usize, old: &str, new: &str| {
        let mut b = std::fs::read(fixture(seed)).unwrap();
        let (old, new) = (hex(old), hex(new));
        assert_eq!(
            &b[at..at + old.len()],
            old,
            "{seed} changed: rebuild this case"
        );
        b.splice(at..at + old.len(), new);
        b
    };
    let gzip = "data/reviews-gzip.parquet";
    let plain = "data/reviews.parquet";
    vec![
        // One byte of the footer's thrift made a column chunk's offset negative, and the
        // parquet crate's row reader asserts on that (`ColumnChunkMetaData::byte_range`).
        (
            "parquet column at a negative offset",
            "case.parquet",
            edit(gzip, 853, "d8", "ff"),
        ),
        // The rest panicked inside the parquet crate's page decoding.
        (
            "parquet bit reader past its buffer",
            "case.parquet",
            edit(plain, 747, "04", "14"),
        ),
        (
            "parquet dictionary page missing",
            "case.parquet",
            edit(plain, 2011, "26", "a6"),
        ),
        (
            "parquet definition level beyond the schema",
            "case.parquet",
            edit(plain, 1212, "3502", "3d00"),
        ),
        (
            "parquet required value missing",
            "case.parquet",
            edit(gzip, 694, "02", "00"),
        ),
    ]
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn table_readers_survive_malformed_files() {
    if !alone("table_readers_survive_malformed_files") {
        return;
    }
    let mut run = Run::new("tables");
    let dir = scratch();
    let mut rng = Rng(0x7461_626c_6573);
    let go = |run: &mut Run, label: &str, name: &str, reader: Reader, bytes: &[u8]| {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        run.case(label, bytes.len(), || exercise(&path, reader));
    };
    run.group("regressions");
    for (label, name, bytes) in regressions() {
        go(
            &mut run,
            &format!("regression {label}"),
            name,
            Reader::Table(Encoding::Utf8),
            &bytes,
        );
    }
    let utf8 = Reader::Table(Encoding::Utf8);
    let latin1 = Reader::Table(Encoding::Latin1);
    let text_seeds: Vec<(&str, &str, Reader, Vec<u8>)> = vec![
        ("jsonl", "case.jsonl", utf8, JSONL.into()),
        ("qa jsonl", "case.jsonl", Reader::Qa, qa_lines(6)),
        ("pairs jsonl", "case.jsonl", Reader::Pairs, PAIRS.into()),
        ("csv", "case.csv", utf8, CSV.into()),
        ("csv as latin-1", "case.csv", latin1, CSV.into()),
        ("latin-1 csv", "case.csv", latin1, latin1_csv()),
        ("latin-1 csv as utf-8", "case.csv", utf8, latin1_csv()),
        ("tsv", "case.tsv", utf8, TSV.into()),
        ("txt", "case.txt", utf8, TEXT.into()),
        ("txt as latin-1", "case.txt", latin1, TEXT.into()),
        ("task.json", "case.json", Reader::Pairs, TASK.into()),
    ];
    for (seed_name, file, reader, seed) in &text_seeds {
        run.group(*seed_name);
        for cut in cuts(seed.len(), seed.len(), scaled(0), &mut rng) {
            go(
                &mut run,
                &format!("{seed_name} cut at {cut}"),
                file,
                *reader,
                &seed[..cut],
            );
        }
        for i in 0..scaled(1000) {
            let bytes = mutate_text(seed, &mut rng);
            go(
                &mut run,
                &format!("{seed_name} mutation #{i}"),
                file,
                *reader,
                &bytes,
            );
        }
    }
    for seed_name in ["data/reviews.parquet", "data/reviews-gzip.parquet"] {
        run.group(seed_name);
        let seed = std::fs::read(fixture(seed_name)).unwrap();
        assert!(
            exercise(&fixture(seed_name), utf8),
            "the seed {seed_name} must read"
        );
        // The footer (metadata, its length, the magic) is where a reader starts.
        let footer = seed.len().saturating_sub(1024)..seed.len();
        for cut in cuts(seed.len(), 0, scaled(600), &mut rng) {
            go(
                &mut run,
                &format!("{seed_name} cut at {cut}"),
                "case.parquet",
                utf8,
                &seed[..cut],
            );
        }
        for i in 0..scaled(1500) {
            let bytes = mutate(&seed, &mut rng, footer.clone());
            go(
                &mut run,
                &format!("{seed_name} footer mutation #{i}"),
                "case.parquet",
                utf8,
                &bytes,
            );
        }
        for i in 0..scaled(1000) {
            let bytes = mutate(&seed, &mut rng, 0..seed.len());
            go(
                &mut run,
                &format!("{seed_name} mutation #{i}"),
                "case.parquet",
                utf8,
                &bytes,
            );
        }
    }
    run.finish();
}
