//! f32 matrix products at the shapes of one SmolLM2-135M training step on 4 × 256 tokens, as
//! training calls them: each linear layer's forward (`x · W`), input gradient (`dY · Wᵀ`, `W`
//! a transposed view) and weight gradient (`xᵀ · dY`, `x` a transposed view) through
//! `kernels::f32_matmul`, and the tied LM head's loss, forward and backward, through
//! `kernels::linear_cross_entropy_sum`. One JSON line per product:
//! `{"name", "m", "k", "n", "a_t", "b_t", "per_step", "flops", "gflops"}` (`per_step`: how many
//! times a step runs it). Run by `scripts/bench/bench_f32_products.sh`, which
//! times PyTorch on the same products beside it.
use burn::tensor::{Device, Distribution, Tensor};

/// SmolLM2-135M: 30 layers, hidden 576, MLP 1536, 3 key-value heads of 64 (k and v 192
/// wide), vocabulary 49152 (tied); a step of 4 × 256 tokens.
const LAYERS: usize = 30;
const TOKENS: usize = 1024;
const HIDDEN: usize = 576;
const VOCAB: usize = 49152;

/// `(name, m, k, n, a transposed, b transposed, per step)`: the forward, input-gradient and
/// weight-gradient products of each projection (each its own product, as whet and
/// transformers run them; q and o, k and v, gate and up have the same shapes).
fn products() -> Vec<(String, usize, usize, usize, bool, bool, usize)> {
    let projections = [
        ("q/o", HIDDEN, HIDDEN, 2),
        ("k/v", HIDDEN, 192, 2),
        ("gate/up", HIDDEN, 1536, 2),
        ("down", 1536, HIDDEN, 1),
    ];
    let mut out = Vec::new();
    for (name, d_in, d_out, per_layer) in projections {
        let passes = [
            ("fwd", TOKENS, d_in, d_out, false, false),
            ("dx", TOKENS, d_out, d_in, false, true),
            ("dw", d_in, TOKENS, d_out, true, false),
        ];
        for (pass, m, k, n, a_t, b_t) in passes {
            out.push((
                format!("{name} {pass}"),
                m,
                k,
                n,
                a_t,
                b_t,
                per_layer * LAYERS,
            ));
        }
    }
    out
}

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
    let random =
        |shape: [usize; 2]| Tensor::<2>::random(shape, Distribution::Normal(0.0, 1.0), &device);
    let time = |f: &dyn Fn(), reps: usize| {
        f();
        let t = std::time::Instant::now();
        for _ in 0..reps {
            f();
        }
        t.elapsed().as_secs_f64() / reps as f64
    };
    for (name, m, k, n, a_t, b_t, per_step) in products() {
        let a = if a_t {
            random([k, m]).transpose()
        } else {
            random([m, k])
        };
        let b = if b_t {
            random([n, k]).transpose()
        } else {
            random([k, n])
        };
        let dt = time(
            &|| {
                let y = whet_models::kernels::f32_matmul(a.clone(), b.clone());
                // Forces the product (burn's CPU backend runs eagerly; this keeps it honest).
                let _ = y.slice([0..1, 0..1]).into_data();
            },
            reps,
        );
        let flops = 2.0 * (m * k * n) as f64;
        println!(
            "{{\"name\": \"{name}\", \"m\": {m}, \"k\": {k}, \"n\": {n}, \"a_t\": {a_t}, \"b_t\": {b_t}, \
             \"per_step\": {per_step}, \"flops\": {flops}, \"gflops\": {:.1}}}",
            flops / dt / 1e9
        );
    }
    // The LM head's loss: logits, their gradient into the hidden rows and into the weight.
    let device = device.autodiff();
    let h = Tensor::<2>::random([TOKENS, HIDDEN], Distribution::Normal(0.0, 1.0), &device)
        .require_grad();
    let w = Tensor::<2>::random([VOCAB, HIDDEN], Distribution::Normal(0.0, 0.05), &device)
        .require_grad();
    let targets: Vec<u32> = (0..TOKENS).map(|i| ((i * 7919) % VOCAB) as u32).collect();
    let dt = time(
        &|| {
            let loss =
                whet_models::kernels::linear_cross_entropy_sum(h.clone(), w.clone(), &targets);
            let grads = loss.backward();
            let _ = w.grad(&grads).map(|g| g.slice([0..1, 0..1]).into_data());
        },
        reps.div_ceil(4),
    );
    let flops = 6.0 * (TOKENS * HIDDEN * VOCAB) as f64;
    println!(
        "{{\"name\": \"lm head loss\", \"m\": {TOKENS}, \"k\": {HIDDEN}, \"n\": {VOCAB}, \"a_t\": false, \
         \"b_t\": true, \"per_step\": 1, \"flops\": {flops}, \"gflops\": {:.1}}}",
        flops / dt / 1e9
    );
}
