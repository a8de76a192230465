//! Matmul throughput of burn-flex on this machine (GFLOPS), to compare with PyTorch's.
use burn::tensor::{Device, Distribution, Tensor};
fn main() {
    whet_models::init_threads();
    // On a thread of the pool, as the CLI runs (`whet_models::on_pool`).
    whet_models::on_pool(run)
}

fn run() {
    let device = Device::flex();
    for n in [384usize, 1024, 2048] {
        let a = Tensor::<2>::random([n, n], Distribution::Normal(0.0, 1.0), &device);
        let b = Tensor::<2>::random([n, n], Distribution::Normal(0.0, 1.0), &device);
        let _ = a.clone().matmul(b.clone()).into_data();
        let reps = 10;
        let t = std::time::Instant::now();
        for _ in 0..reps {
            let _ = a.clone().matmul(b.clone()).into_data();
        }
        let dt = t.elapsed().as_secs_f64() / reps as f64;
        println!("n {n}: {:.1} GFLOPS", 2.0 * (n as f64).powi(3) / dt / 1e9);
    }
}
