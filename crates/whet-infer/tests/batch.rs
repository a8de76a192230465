//! Batched generation with left padding gives each row what generating it alone gives
//! (greedy), for both decoder families (`tests/fixtures/tiny-*`).

use std::path::PathBuf;

use whet_infer::{GenerationConfig, generate, generate_batch};
use whet_models::Checkpoint;

#[test]
fn batched_greedy_rows_equal_single_generation() {
    let prompts: Vec<Vec<u32>> = vec![
        vec![5, 17, 42, 8, 9, 33],
        vec![61],
        vec![11, 12, 13],
        vec![90, 3, 3, 70, 21],
    ];
    for dir in ["tiny-gpt2", "tiny-llama"] {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures")
            .join(dir);
        let device = whet_models::device::for_tests();
        let model = Checkpoint::open(&root)
            .unwrap()
            .load_causal_lm(&device)
            .unwrap();
        // An EOS that some rows reach, so rows finish at different steps.
        let config = GenerationConfig::greedy(12, vec![2, 7]);
        let batched = generate_batch(&model, &prompts, &config, 0, &device).unwrap();
        let mut lengths = Vec::new();
        for (p, got) in prompts.iter().zip(&batched) {
            let alone = generate(&model, p, &config, &device, |_| true).unwrap();
            assert_eq!(got, &alone, "{dir}: prompt {p:?}");
            lengths.push(got.len());
        }
        assert!(
            lengths.iter().all(|n| (1..=12).contains(n)),
            "{dir}: {lengths:?}"
        );
    }
}
