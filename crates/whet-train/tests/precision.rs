//! fp16's dynamic loss scaling on the test device (`WHET_TEST_DEVICE`; CI also runs this
//! module on `wgpu:cpu`): a step whose scaled float16 gradients overflow is skipped, leaving
//! the weights and AdamW's step count alone and halving the scale, until the scale fits; that
//! step then updates as the f32 step does, up to float16 rounding.

use crate::common::fixed_tensor;
use burn::module::Param;
use burn::tensor::{FloatDType, Tensor};
use whet_models::weights::Layout;
use whet_models::{VisitParams, Visitor};
use whet_train::optim::{GradStore, OptimConfig, Optimizer, OptimizerKind};
use whet_train::scaler::{INIT_SCALE, LossScaler};
use whet_train::trainer::{Reading, finish_step};

#[derive(Clone)]
struct Toy {
    w: Param<Tensor<2>>,
}

impl VisitParams for Toy {
    fn visit_params(&mut self, prefix: &str, v: &mut dyn Visitor) {
        v.matrix(&format!("{prefix}w"), &mut self.w, Layout::Same);
    }
}

fn values(t: Tensor<2>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

#[test]
fn fp16_skips_overflowing_steps_and_backs_off_the_scale() {
    let device = whet_models::device::for_tests().autodiff();
    // Inputs of ~30: the loss gradient times 65536 is far past float16's 65504.
    let x = fixed_tensor([8, 16], 4, 30.0, &device);
    let w0 = fixed_tensor([16, 8], 5, 1.0, &device);
    let config = OptimConfig {
        kind: OptimizerKind::Adamw,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
    };
    // One step, in the compute type `dtype` (None: f32); returns the gradient norm read.
    let step = |model: &mut Toy, opt: &mut Optimizer, dtype: Option<FloatDType>| -> f64 {
        let _precision = whet_models::precision::scope(dtype);
        let y = whet_models::precision::linear(x.clone(), model.w.val(), None);
        let loss = y.square().mean();
        let g = loss.mul_scalar(opt.loss_scale()).backward();
        let mut grads = GradStore::default();
        grads.accumulate(model, &g);
        match finish_step(opt, model, &mut grads, 1e-2, 0.0, &device) {
            Reading::Host(v) => v,
            Reading::Device(_) => panic!("fp16 left the gradient norm unread"),
        }
    };
    let fresh = || Toy {
        w: Param::from_tensor(w0.clone().require_grad()),
    };

    let mut want = fresh();
    let mut plain = Optimizer::new(config);
    plain.scaler = Some(LossScaler {
        scale: 1.0,
        ..Default::default()
    });
    step(&mut want, &mut plain, None);
    let want = values(want.w.val());

    let mut model = fresh();
    let mut opt = Optimizer::new(config);
    opt.scaler = Some(LossScaler::default());
    let start = values(model.w.val());
    let mut skipped = 0;
    loop {
        let norm = step(&mut model, &mut opt, Some(FloatDType::F16));
        if norm.is_finite() {
            break;
        }
        skipped += 1;
        assert!(skipped < 16, "the scale never came down to fit float16");
        assert_eq!(
            values(model.w.val()),
            start,
            "an overflowing step changed the weights"
        );
        assert_eq!(opt.step, 0, "an overflowing step counted as an AdamW step");
        assert_eq!(opt.loss_scale(), INIT_SCALE / f64::powi(2.0, skipped));
    }
    assert!(
        skipped >= 1,
        "the first step did not overflow: the test proves nothing"
    );
    assert_eq!(opt.skipped_steps(), skipped as usize);
    assert_eq!(opt.step, 1);
    let got = values(model.w.val());
    let d = got
        .iter()
        .zip(&want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        d < 1e-3,
        "the first good fp16 step is {d} from the f32 step"
    );
}
