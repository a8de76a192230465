//! Matrix-product throughput on the CPU, f32 (burn's gemm) against bf16 (whet's AVX512-BF16
//! kernel), at the shapes of a MiniLM and a SmolLM2 training step. One JSON line per shape and
//! type: `{"shape": "MxKxN", "batch": B, "dtype": "f32"|"bf16", "gflops": G}`.
//! Run by `scripts/bench/bench_bf16_matmul.sh`, which runs PyTorch's side beside it.
use burn::tensor::{Device, Distribution, Tensor};

/// `(batch, m, k, n)`: linear layers of 16 × 128 tokens (MiniLM 384 / 1536 wide), SmolLM2's
/// q / MLP / head with 4 × 256 tokens, and one attention product per head.
pub const SHAPES: [(usize, usize, usize, usize); 7] = [
    (1, 2048, 384, 384),
    (1, 2048, 384, 1536),
    (1, 2048, 1536, 384),
    (1, 1024, 576, 1536),
    (1, 1024, 1536, 576),
    (1, 1024, 576, 8192),
    (48, 256, 64, 256),
];

fn main() {
    whet_models::init_threads();
    // On a thread of the pool, as the CLI runs (`whet_models::on_pool`).
    whet_models::on_pool(run)
}

fn run() {
    let device = Device::flex();
    let reps: usize = std::env::args()
        .nth(1)
        .and_then(|r| r.parse().ok())
        .unwrap_or(10);
    for (batch, m, k, n) in SHAPES {
        let a = Tensor::<3>::random([batch, m, k], Distribution::Normal(0.0, 1.0), &device);
        let b = Tensor::<3>::random([batch, k, n], Distribution::Normal(0.0, 1.0), &device);
        for dtype in ["f32", "bf16"] {
            let run = || {
                let y = if dtype == "f32" {
                    a.clone().matmul(b.clone())
                } else {
                    whet_models::kernels::bf16_matmul(a.clone(), b.clone())
                };
                // Forces the product (burn's CPU backend runs eagerly; this keeps it honest).
                let _ = y.slice([0..1, 0..1, 0..1]).into_data();
            };
            run();
            let t = std::time::Instant::now();
            for _ in 0..reps {
                run();
            }
            let dt = t.elapsed().as_secs_f64() / reps as f64;
            let flops = 2.0 * (batch * m * k * n) as f64;
            println!(
                "{{\"shape\": \"{m}x{k}x{n}\", \"batch\": {batch}, \"dtype\": \"{dtype}\", \"gflops\": {:.1}}}",
                flops / dt / 1e9
            );
        }
    }
}
