//! Shared fixtures for the trainer tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The repository's `tests/fixtures`.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// tiny-bert with every dropout off (deterministic training, as the reference runs), in a
/// temporary folder.
pub fn tiny_bert_no_dropout() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("tiny-bert");
    std::fs::copy(
        src.join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    config["hidden_dropout_prob"] = 0.0.into();
    config["attention_probs_dropout_prob"] = 0.0.into();
    config["classifier_dropout"] = 0.0.into();
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    dir
}

/// Held by tests that measure the device's memory: its pool is shared by every test thread
/// of the binary.
pub fn device_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A fixed tensor of values spread as N(0, `std`) would be, the same for a `seed` on every
/// run and in any order of tests (burn's generator is shared by all test threads, and the
/// trainers running beside a test reseed it).
pub fn fixed_tensor<const D: usize>(
    shape: [usize; D],
    seed: u64,
    std: f32,
    device: &burn::tensor::Device,
) -> burn::tensor::Tensor<D> {
    // SplitMix64, then Box-Muller.
    let mut state = seed;
    let mut next = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n)
        .map(|_| {
            let (u, v) = (next().max(1e-12), next());
            (std as f64 * (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
        })
        .collect();
    burn::tensor::Tensor::from_data(burn::tensor::TensorData::new(values, shape), device)
}
