//! Paged AdamW (`optim = "paged_adamw_32bit"`) on the test device (`WHET_TEST_DEVICE`; CI runs
//! this module on `wgpu:cpu`): the same updates as `adamw_torch` bit for bit, and on a GPU
//! runtime the moments' 8 bytes per value off the device, read from its memory pool.

use crate::common::fixed_tensor;
use burn::module::Param;
use burn::tensor::{Device, Tensor};
use whet_models::weights::Layout;
use whet_models::{VisitParams, Visitor};
use whet_train::optim::{GradStore, OptimConfig, Optimizer, OptimizerKind};

#[derive(Clone)]
struct Toy {
    w: Param<Tensor<2>>,
    b: Param<Tensor<1>>,
}

impl VisitParams for Toy {
    fn visit_params(&mut self, prefix: &str, v: &mut dyn Visitor) {
        v.matrix(&format!("{prefix}w"), &mut self.w, Layout::Same);
        v.vector(&format!("{prefix}bias"), &mut self.b);
    }
}

const ROWS: usize = 256;
const COLS: usize = 512;

/// Three AdamW steps of `kind` on a fixed regression problem; returns the weights and the
/// device memory in use (bytes, when the device reports it) with the model and the optimizer
/// alive after the last step.
fn train(kind: OptimizerKind, device: &Device) -> (Vec<f32>, Option<u64>) {
    let w = fixed_tensor([ROWS, COLS], 1, 0.1, device);
    let x = fixed_tensor([8, ROWS], 2, 1.0, device);
    let y = fixed_tensor([8, COLS], 3, 1.0, device);
    let mut model = Toy {
        w: Param::from_tensor(w.require_grad()),
        b: Param::from_tensor(Tensor::<1>::zeros([COLS], device).require_grad()),
    };
    let config = OptimConfig {
        kind,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    };
    let mut opt = Optimizer::new(config);
    for _ in 0..3 {
        let pred = x.clone().matmul(model.w.val()) + model.b.val().unsqueeze::<2>();
        let loss = (pred - y.clone()).square().mean();
        let grads = loss.backward();
        let mut store = GradStore::default();
        store.accumulate(&mut model, &grads);
        opt.step(&mut model, &store, 1e-2);
    }
    let weights = model
        .w
        .val()
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap();
    drop((x, y));
    let in_use = device.memory_pool_usage().map(|u| u.bytes_in_use);
    drop((model, opt));
    (weights, in_use)
}

#[test]
fn paged_adamw_updates_as_adamw_and_keeps_its_moments_off_the_device() {
    // Other tests' allocations would enter the measurement.
    let _device = crate::common::device_lock();
    let device = whet_models::device::for_tests().autodiff();
    let (plain, plain_bytes) = train(OptimizerKind::Adamw, &device);
    let (paged, paged_bytes) = train(OptimizerKind::PagedAdamw32bit, &device);
    assert_eq!(paged, plain, "paged AdamW changed the updates");
    // The 8-bit variant pages the f32 moments of parameters under 4096 values (the bias) and
    // keeps the weight's 8-bit moments on the host: its updates are adamw_bnb_8bit's.
    let (q8, _) = train(OptimizerKind::Adamw8bit, &device);
    let (paged_q8, _) = train(OptimizerKind::PagedAdamw8bit, &device);
    assert_eq!(paged_q8, q8, "paged 8-bit AdamW changed the updates");
    if whet_models::device::is_flex(&device) {
        // Host memory is the device memory: nothing to page, nothing to measure.
        return;
    }
    let (Some(plain_bytes), Some(paged_bytes)) = (plain_bytes, paged_bytes) else {
        panic!("the device reports no memory usage");
    };
    let moments = 2 * 4 * (ROWS * COLS + COLS) as u64;
    let saved = plain_bytes.saturating_sub(paged_bytes);
    eprintln!(
        "device memory in use after 3 steps: adamw_torch {plain_bytes} B, paged_adamw_32bit \
         {paged_bytes} B ({saved} B less; the moments are {moments} B)"
    );
    assert!(
        saved >= moments * 9 / 10,
        "paging saved {saved} B of device memory; the moments are {moments} B"
    );
}
