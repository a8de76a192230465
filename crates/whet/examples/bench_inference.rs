//! Inference throughput of whet, for `scripts/bench/bench_inference.sh` (which runs the reference
//! `transformers` script at the same thread count and prints the ratios).
//!
//! Prints one JSON object: MiniLM forward tokens/s (batch 8 x 128), SmolLM2 forward tokens/s
//! (batch 1 x 128) and SmolLM2 greedy generation tokens/s (64 new tokens).

use std::time::Instant;

use burn::tensor::{Device, Int, Tensor, TensorData};
use whet_models::bert::{BertModel, EncoderInput};
use whet_models::{CausalLm, Checkpoint, DecoderInput, FamilyConfig, Mode};

fn ids(b: usize, t: usize, vocab: usize, device: &Device) -> Tensor<2, Int> {
    // A fixed pseudo-random sequence (LCG) so both sides see similar tokens.
    let mut x: u64 = 12345;
    let v: Vec<i64> = (0..b * t)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (1000 + (x >> 33) as usize % (vocab - 1000)) as i64
        })
        .collect();
    Tensor::from_data(TensorData::new(v, [b, t]), device)
}

fn time<T>(reps: usize, mut f: impl FnMut() -> T) -> f64 {
    f(); // warm-up
    let start = Instant::now();
    for _ in 0..reps {
        f();
    }
    start.elapsed().as_secs_f64() / reps as f64
}

fn main() -> anyhow::Result<()> {
    whet_models::init_threads();
    // On a thread of the pool, as the CLI runs (`whet_models::on_pool`).
    whet_models::on_pool(run)
}

fn run() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (minilm, smollm) = match args.as_slice() {
        [_, a, b] => (a.clone(), b.clone()),
        _ => anyhow::bail!("usage: bench_inference MINILM_DIR SMOLLM2_GGUF"),
    };
    let device = Device::flex();

    let ckpt = Checkpoint::open(&minilm)?;
    let FamilyConfig::Bert(config) = &ckpt.config else {
        anyhow::bail!("MiniLM is not BERT")
    };
    let bert = BertModel::load(&ckpt.weights(&device), config)?;
    let (b, t) = (8, 128);
    let input = EncoderInput {
        input_ids: ids(b, t, config.vocab_size, &device),
        attention_mask: Tensor::ones([b, t], &device),
        token_type_ids: None,
        unpadded: None,
    };
    let secs = time(5, || {
        let out = bert.forward(input.clone(), Mode::Eval).last_hidden_state;
        out.into_data()
    });
    let minilm_tps = (b * t) as f64 / secs;

    let ckpt = Checkpoint::open(&smollm)?;
    let model = ckpt.load_causal_lm(&device)?;
    let t = 128;
    let x = ids(1, t, model.vocab_size(), &device);
    let secs = time(3, || {
        model
            .forward_logits(DecoderInput::unpadded(x.clone()), Mode::Eval)
            .into_data()
    });
    let smol_fwd_tps = t as f64 / secs;

    // As `whet generate` loads it: the GGUF's quantised layers read in place by each step.
    let generator = ckpt.load_causal_lm_for_generation(&device)?;
    let tok = ckpt.tokenizer()?;
    let prompt = tok.encode("The history of the Roman Empire begins with", true)?;
    // no EOS: fixed length on both sides
    let config = whet_infer::GenerationConfig::greedy(64, vec![]);
    let mut n = 0;
    let secs = time(2, || {
        n = whet_infer::generate(&generator, &prompt, &config, &device, |_| true)
            .map(|v| v.len())
            .unwrap_or(0);
    });
    let gen_tps = n as f64 / secs;

    println!(
        "{}",
        serde_json::json!({
            "impl": "whet",
            "minilm_forward_tokens_per_s": minilm_tps,
            "smollm2_forward_tokens_per_s": smol_fwd_tps,
            "smollm2_generate_tokens_per_s": gen_tps,
        })
    );
    Ok(())
}
