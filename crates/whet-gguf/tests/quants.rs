//! Dequantisation of every supported block format against `gguf.quants.dequantize` (fixture
//! `tests/fixtures/gguf/`, made by `scripts/fixtures/make_fixtures.py`), and the reader's errors.

use std::path::{Path, PathBuf};

use whet_gguf::{GgmlType, GgufError, GgufFile};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/gguf")
        .join(name)
}

#[test]
fn every_quant_type_dequantises_like_the_reference() {
    let file = GgufFile::open(fixture("quants.gguf")).unwrap();
    let bytes = std::fs::read(fixture("quants.safetensors")).unwrap();
    let expected = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for t in &file.tensors {
        let want = expected
            .tensor(&t.name)
            .unwrap_or_else(|_| panic!("no expected values for {}", t.name));
        let want: Vec<f32> = want
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let got = file.dequantize(t).unwrap();
        assert_eq!(got.len(), want.len(), "{}", t.name);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-6 * w.abs().max(1.0),
                "{} ({}): element {i}: {g} != {w}",
                t.name,
                t.ty
            );
        }
        seen.insert(t.ty.to_string());
    }
    for ty in [
        "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K",
    ] {
        assert!(seen.contains(ty), "fixture lacks a {ty} tensor");
    }
    assert!(file.get("general.architecture").is_some());
}

/// A GGUF v2 file (`v2.gguf`: `quants.gguf` relabelled version 2, the layouts being identical
/// for little-endian files) reads as version 2 with the same metadata, index and values.
#[test]
fn a_version_2_file_reads_like_version_3() {
    let v3 = GgufFile::open(fixture("quants.gguf")).unwrap();
    let v2 = GgufFile::open(fixture("v2.gguf")).unwrap();
    assert_eq!((v2.version, v3.version), (2, 3));
    assert_eq!(v2.metadata, v3.metadata);
    assert_eq!(v2.get_u64("test.answer").unwrap(), 42);
    assert_eq!(
        v2.get_strings("test.strings").unwrap(),
        vec!["alpha", "βeta", "🦀"]
    );
    assert_eq!(v2.tensors.len(), v3.tensors.len());
    for (a, b) in v2.tensors.iter().zip(&v3.tensors) {
        assert_eq!(
            (&a.name, &a.dims, a.ty, a.offset),
            (&b.name, &b.dims, b.ty, b.offset)
        );
        assert_eq!(
            v2.dequantize(a).unwrap(),
            v3.dequantize(b).unwrap(),
            "{}",
            a.name
        );
    }
}

#[test]
fn a_truncated_file_names_what_is_cut() {
    let bytes = std::fs::read(fixture("quants.gguf")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for cut in [10, bytes.len() / 3, bytes.len() - 7] {
        let p = dir.path().join(format!("cut{cut}.gguf"));
        std::fs::write(&p, &bytes[..cut]).unwrap();
        match GgufFile::open(&p) {
            Err(GgufError::Truncated { path, what, .. }) => {
                assert_eq!(path, p);
                assert!(!what.is_empty());
            }
            Err(other) => panic!("cut at {cut}: expected Truncated, got {other}"),
            Ok(_) => panic!("cut at {cut}: a truncated file must not open"),
        }
    }
}

#[test]
fn not_a_gguf_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.gguf");
    std::fs::write(&p, b"PK\x03\x04 definitely a zip").unwrap();
    assert!(matches!(
        GgufFile::open(&p),
        Err(GgufError::BadMagic { .. })
    ));
}

/// A minimal GGUF v3 with one tensor of the given ggml type id and `data` as its bytes.
fn tiny_gguf(ty: u32, n: u64, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes()); // tensors
    b.extend_from_slice(&0u64.to_le_bytes()); // metadata
    let name = b"blk.0.attn_q.weight";
    b.extend_from_slice(&(name.len() as u64).to_le_bytes());
    b.extend_from_slice(name);
    b.extend_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(&n.to_le_bytes());
    b.extend_from_slice(&ty.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    while b.len() % 32 != 0 {
        b.push(0);
    }
    b.extend_from_slice(data);
    b
}

#[test]
fn an_unsupported_quant_type_is_a_typed_error_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("q2k.gguf");
    // ggml type 10 is Q2_K (84 bytes per 256 values).
    std::fs::write(&p, tiny_gguf(10, 256, &[0u8; 84])).unwrap();
    let file = GgufFile::open(&p).unwrap();
    let t = &file.tensors[0];
    assert_eq!(t.ty, GgmlType::Other(10));
    match file.dequantize(t) {
        Err(e @ GgufError::UnsupportedType { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("blk.0.attn_q.weight"), "{msg}");
            assert!(msg.contains("type id 10"), "{msg}");
        }
        other => panic!(
            "expected UnsupportedType, got {other:?}",
            other = other.map(|v| v.len())
        ),
    }
}

#[test]
fn a_hand_written_f32_tensor_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f32.gguf");
    let data: Vec<u8> = [1.5f32, -2.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    std::fs::write(&p, tiny_gguf(0, 2, &data)).unwrap();
    let file = GgufFile::open(&p).unwrap();
    assert_eq!(file.dequantize(&file.tensors[0]).unwrap(), vec![1.5, -2.0]);
    assert_eq!(file.tensors[0].shape(), vec![2]);
}

/// The writer's files read back: metadata of every type, and F32 / F16 / Q8_0 / Q4_0 tensors
/// whose dequantised values are within each format's rounding of the input.
#[test]
fn written_files_read_back_with_their_metadata_and_tensors() {
    use whet_gguf::writer::{GgufWriter, encode};
    use whet_gguf::{GgmlType, GgufFile, Value};
    let values: Vec<f32> = (0..64 * 3)
        .map(|i| ((i * 37 % 97) as f32 - 48.0) / 16.0)
        .collect();
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String("llama".into()));
    w.set("llama.block_count", Value::U32(2));
    w.set("llama.rope.freq_base", Value::F32(10000.0));
    w.set("tokenizer.ggml.add_bos_token", Value::Bool(true));
    w.set(
        "tokenizer.ggml.tokens",
        Value::Array(vec![Value::String("a".into()), Value::String("ü b".into())]),
    );
    w.set(
        "tokenizer.ggml.token_type",
        Value::Array(vec![Value::I32(1), Value::I32(3)]),
    );
    for (name, ty) in [
        ("f32", GgmlType::F32),
        ("f16", GgmlType::F16),
        ("q8", GgmlType::Q8_0),
        ("q4", GgmlType::Q4_0),
    ] {
        w.add_tensor(name, &[3, 64], ty, encode(ty, &values).unwrap());
    }
    assert!(
        encode(GgmlType::Q8_0, &values[..40]).is_none(),
        "partial blocks are refused"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.gguf");
    w.write(&path).unwrap();
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(f.get_u64("llama.block_count").unwrap(), 2);
    assert_eq!(f.get_f64("llama.rope.freq_base").unwrap(), 10000.0);
    assert_eq!(
        f.get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.as_bool()),
        Some(true)
    );
    assert_eq!(
        f.get_strings("tokenizer.ggml.tokens").unwrap(),
        vec!["a", "ü b"]
    );
    let amax = values.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (name, tol) in [
        ("f32", 0.0),
        ("f16", 2e-3),
        ("q8", amax / 127.0),
        ("q4", amax / 8.0),
    ] {
        let t = f.tensor(name).unwrap();
        assert_eq!(t.shape(), vec![3, 64], "{name}");
        let back = f.dequantize(t).unwrap();
        let d = back
            .iter()
            .zip(&values)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(d <= tol, "{name}: off by {d} (tolerance {tol})");
        if name == "q4" {
            assert!(d > 0.0, "Q4_0 rounds");
        }
    }
}
