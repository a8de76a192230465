//! Greedy generation on the test device (`WHET_TEST_DEVICE`, e.g. `wgpu:cpu`) picks the same
//! tokens as on the CPU, alone and batched, for both decoder families (`tests/fixtures/tiny-*`).
//! On the default device (the CPU) this compares the CPU with itself and checks only that the
//! two paths run.

use std::path::PathBuf;

use burn::tensor::Device;
use whet_infer::{GenerationConfig, generate, generate_batch};
use whet_models::Checkpoint;

#[test]
fn greedy_generation_on_the_test_device_equals_the_cpu() {
    let prompts: Vec<Vec<u32>> = vec![vec![5, 17, 42, 8, 9, 33], vec![61], vec![11, 12, 13]];
    let config = GenerationConfig::greedy(16, vec![]);
    for dir in ["tiny-gpt2", "tiny-llama"] {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures")
            .join(dir);
        let ckpt = Checkpoint::open(&root).unwrap();
        let run = |device: &Device| {
            let model = ckpt.load_causal_lm(device).unwrap();
            let alone: Vec<Vec<u32>> = prompts
                .iter()
                .map(|p| generate(&model, p, &config, device, |_| true).unwrap())
                .collect();
            let batched = generate_batch(&model, &prompts, &config, 0, device).unwrap();
            (alone, batched)
        };
        let (cpu_alone, cpu_batched) = run(&Device::flex());
        let (alone, batched) = run(&whet_models::device::for_tests());
        assert!(
            cpu_alone.iter().all(|t| t.len() == 16),
            "{dir}: {cpu_alone:?}"
        );
        assert_eq!(alone, cpu_alone, "{dir}: one prompt at a time");
        assert_eq!(batched, cpu_batched, "{dir}: batched");
    }
}
