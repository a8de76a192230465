//! Paged AdamW (`optim = "paged_adamw_32bit"`) and 8-bit AdamW (`adamw_bnb_8bit`,
//! `paged_adamw_8bit`) on the test device (`WHET_TEST_DEVICE`; CI runs this module on
//! `wgpu:cpu`): paging changes no update bit, and on a GPU runtime the device memory the
//! moments take, read from its memory pool: none when paged, a byte per value and a scale per
//! 256 with 8-bit moments kept on the device.

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
        opt.step(&mut model, &store, 1e-2, 1.0);
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
    // adamw_bnb_8bit keeps the weight's 8-bit moments in device memory, quantised there;
    // paged_adamw_8bit keeps them in host memory, quantised there, and pages the f32 moments
    // of the parameters under 4096 values (the bias). The same codes on both sides, so the
    // same updates.
    let (q8, q8_bytes) = train(OptimizerKind::Adamw8bit, &device);
    let (paged_q8, paged_q8_bytes) = train(OptimizerKind::PagedAdamw8bit, &device);
    assert_eq!(paged_q8, q8, "paged 8-bit AdamW changed the updates");
    assert_ne!(q8, plain, "8-bit moments changed nothing");
    if whet_models::device::is_flex(&device) {
        // Host memory is the device memory: nothing to page, nothing to measure.
        return;
    }
    let (Some(plain_bytes), Some(paged_bytes), Some(q8_bytes), Some(paged_q8_bytes)) =
        (plain_bytes, paged_bytes, q8_bytes, paged_q8_bytes)
    else {
        panic!("the device reports no memory usage");
    };
    let (weight, bias) = ((ROWS * COLS) as u64, COLS as u64);
    let moments = 2 * 4 * (weight + bias);
    // Each 8-bit moment: a byte per value and an f32 maximum per block of 256.
    let state8 = 2 * (weight + 4 * weight.div_ceil(256));
    let saved = plain_bytes.saturating_sub(paged_bytes);
    let saved8 = plain_bytes.saturating_sub(q8_bytes);
    let paged8 = q8_bytes.saturating_sub(paged_q8_bytes);
    eprintln!(
        "device memory in use after 3 steps: adamw_torch {plain_bytes} B, paged_adamw_32bit \
         {paged_bytes} B ({saved} B less; the moments are {moments} B), adamw_bnb_8bit \
         {q8_bytes} B ({saved8} B less than adamw_torch; the weight's f32 moments less its \
         8-bit ones are {} B), paged_adamw_8bit {paged_q8_bytes} B ({paged8} B less than \
         adamw_bnb_8bit; the 8-bit moments and the bias's f32 ones are {} B)",
        8 * weight - state8,
        state8 + 8 * bias,
    );
    assert!(
        saved >= moments * 9 / 10,
        "paging saved {saved} B of device memory; the moments are {moments} B"
    );
    assert!(
        saved8 >= (8 * weight - state8) * 4 / 5,
        "8-bit moments saved {saved8} B of device memory; f32 moments less 8-bit ones are {} B",
        8 * weight - state8
    );
    assert!(
        paged8 >= (state8 + 8 * bias) * 4 / 5,
        "paging the 8-bit moments saved {paged8} B of device memory; they and the bias's f32 \
         moments are {} B",
        state8 + 8 * bias
    );
}
