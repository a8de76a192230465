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
// The harness, shared by the four fuzz tests (tests/fuzz_harness.rs): a counting allocator, a
// watchdog, a seeded mutator, and a runner that turns a panic, a hang or an oversized allocation
// into a failure naming the case.
include!("../../../tests/fuzz_harness.rs");

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
    if !alone("gguf_reader_survives_malformed_files") {
        return;
    }
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
