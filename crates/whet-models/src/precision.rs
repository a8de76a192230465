//! Mixed precision: the matrix products in 16 bits, everything else in f32.
//!
//! burn 0.22 has no autocast, so whet casts at its own layer boundaries, as PyTorch's
//! `torch.autocast` does for the ops on its lower-precision list: a linear layer, a LoRA
//! product, the two attention products and the LM head cast their operands to the compute
//! type, multiply, and cast the product back to f32. The weights stay f32 (the master copy the
//! optimizer updates), and so do softmax, norms, activations and the loss; the gradient flows
//! back through the casts, so parameters get f32 gradients.
//!
//! Unlike autocast, the activations between layers are f32, not 16-bit: numerically at least
//! as good, at the cost of the memory autocast saves on them (the matmul inputs that autodiff
//! keeps for the backward pass are the 16-bit casts). One exception, for that memory: under
//! bf16 on the CPU, a LLaMA-style gated MLP rounds its gate and up projections to bf16, as
//! autocast's matmul outputs are, and keeps them in 16 bits for the backward pass
//! ([`crate::kernels::swiglu_linear`]; they are the largest activations a layer keeps, and the
//! gated product made from them is rounded to bf16 for the down projection anyway); their
//! gradients stay f32. On the CPU, attention in training runs
//! [`crate::kernels::attention`]'s kernel with f32 products under bf16 too (faster there
//! than bf16 products around a kept probabilities tensor), where autocast would compute
//! `scaled_dot_product_attention` in bf16.
//!
//! On the CPU, bf16 products run the [`crate::kernels::bf16_matmul`] kernel (AVX512-BF16): the
//! operands are rounded to bf16 inside it and never stored as bf16 tensors, and the products of
//! the backward pass are bf16 too, as under autocast.
//!
//! The compute type is a per-thread setting, entered with [`scope`] for the length of a
//! training run (autocast is a context in the same way); forwards on other threads, and tests
//! running beside one another, are not affected.
//!
//! f32 products are f32 everywhere by default, as PyTorch's are. On a CUDA device with TF32
//! whet keeps them so itself ([`crate::kernels::f32_matmul`]); [`set_tf32`] (`training.tf32`,
//! transformers' `tf32`) lets them round their operands to TF32 there, as
//! `torch.backends.cuda.matmul.allow_tf32 = True` does: a process-wide switch, as PyTorch's is.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use burn::tensor::{DType, FloatDType, Tensor};

use crate::quant::QuantMatrix;

thread_local! {
    static COMPUTE: Cell<Option<FloatDType>> = const { Cell::new(None) };
}

static TF32: AtomicBool = AtomicBool::new(false);

/// Whether f32 matrix products may round their operands to TF32 on a device that has it.
pub fn tf32() -> bool {
    TF32.load(Ordering::Relaxed)
}

/// Allows (or forbids again) TF32 in f32 matrix products on devices that have it, for the whole
/// process; returns the previous setting.
pub fn set_tf32(allowed: bool) -> bool {
    TF32.swap(allowed, Ordering::Relaxed)
}

/// Sets [`set_tf32`] until dropped, then restores the previous setting.
#[must_use = "the setting holds only while the guard lives"]
pub struct Tf32Guard {
    previous: bool,
}

impl Tf32Guard {
    pub fn set(allowed: bool) -> Self {
        Self {
            previous: set_tf32(allowed),
        }
    }
}

impl Drop for Tf32Guard {
    fn drop(&mut self) {
        set_tf32(self.previous);
    }
}

/// The 16-bit type matrix products compute in on this thread, if any.
pub fn compute() -> Option<FloatDType> {
    COMPUTE.with(Cell::get)
}

/// Sets the compute type of this thread until the guard drops (then the previous one holds).
#[must_use = "the compute type holds only while the guard lives"]
pub fn scope(dtype: Option<FloatDType>) -> Scope {
    Scope {
        previous: COMPUTE.with(|c| c.replace(dtype)),
    }
}

/// Restores the previous compute type when dropped (see [`scope`]).
pub struct Scope {
    previous: Option<FloatDType>,
}

impl Drop for Scope {
    fn drop(&mut self) {
        COMPUTE.with(|c| c.set(self.previous));
    }
}

fn down<const D: usize>(t: Tensor<D>, dtype: FloatDType) -> Tensor<D> {
    t.cast(dtype)
}

fn up<const D: usize>(t: Tensor<D>) -> Tensor<D> {
    if t.dtype() == DType::F32 {
        t
    } else {
        t.cast(FloatDType::F32)
    }
}

/// `x · W + b`, as `burn::tensor::module::linear`, in the compute type when one is set.
///
/// # Shapes
/// - x `[..., d_in]`, weight `[d_in, d_out]`, bias `[d_out]`
/// - output `[..., d_out]`
pub fn linear<const D: usize>(
    x: Tensor<D>,
    weight: Tensor<2>,
    bias: Option<Tensor<1>>,
) -> Tensor<D> {
    let rows: usize = x.dims()[..D - 1].iter().product();
    match compute() {
        None if rows <= crate::kernels::SKINNY_ROWS || !crate::device::is_flex(&x.device()) => {
            let mut dims = x.dims();
            let [d_in, d_out] = weight.dims();
            // One token's step of generation: a matrix-vector product over every core; on a
            // GPU, an f32 product without TF32 (`skinny_matmul` falls back to
            // `kernels::f32_matmul` there).
            let y = crate::kernels::skinny_matmul(x.reshape([rows, d_in]), weight);
            let y = match bias {
                Some(b) => y + b.unsqueeze::<2>(),
                None => y,
            };
            dims[D - 1] = d_out;
            y.reshape(dims)
        }
        compute @ (None | Some(FloatDType::BF16)) if crate::device::is_flex(&x.device()) => {
            let dims = x.dims();
            let [d_in, d_out] = weight.dims();
            let n: usize = dims[..D - 1].iter().product();
            // [N, d_in] · [d_in, d_out]: f32 in and out; under bf16, bf16 operands inside the
            // kernel. On the CPU both are whet's products (`kernels::f32_matmul` fills a new
            // buffer without zeroing it first).
            let x = x.reshape([n, d_in]);
            let y = if compute.is_some() {
                crate::kernels::bf16_matmul(x, weight)
            } else {
                crate::kernels::f32_matmul(x, weight)
            };
            let y = match bias {
                Some(b) => y + b.unsqueeze::<2>(),
                None => y,
            };
            let mut out = dims;
            out[D - 1] = d_out;
            y.reshape(out)
        }
        // Not reached: the first arm takes f32 off the CPU.
        None => burn::tensor::module::linear(x, weight, bias),
        Some(dt) => up(burn::tensor::module::linear(
            down(x, dt),
            down(weight, dt),
            bias.map(|b| down(b, dt)),
        )),
    }
}

/// `a · b` over the last two dimensions, in the compute type when one is set.
pub fn matmul<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> Tensor<D> {
    match compute() {
        None => crate::kernels::f32_matmul(a, b),
        Some(FloatDType::BF16) if crate::device::is_flex(&a.device()) => {
            crate::kernels::bf16_matmul(a, b)
        }
        Some(dt) => up(down(a, dt).matmul(down(b, dt))),
    }
}

/// `x · Wᵀ` with a frozen quantised weight `W` `[out, in]` (see
/// [`crate::kernels::quant_matmul`]). On a GPU runtime the kernel dequantises into the type
/// of `x`, so the product runs in the compute type; the CPU's kernel computes in f32 whatever
/// it is given, so there `x` is not cast.
///
/// # Shapes
/// - x `[..., in]`
/// - output `[..., out]`
pub fn quant_matmul<const D: usize>(x: Tensor<D>, w: &Arc<QuantMatrix>) -> Tensor<D> {
    match compute() {
        Some(dt) if !crate::device::is_flex(&x.device()) => {
            up(crate::kernels::quant_matmul(down(x, dt), w))
        }
        _ => crate::kernels::quant_matmul(x, w),
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, Distribution};

    use super::*;

    fn max_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
        (a - b).abs().max().into_scalar()
    }

    /// In a bf16 scope a linear layer rounds like bf16 (close to f32, not equal to it), its
    /// output and the gradients of its f32 parameters are f32; outside it, f32 exactly.
    #[test]
    fn a_scope_computes_products_in_16_bits_with_f32_at_the_edges() {
        let _rng = crate::test_rng();
        let device = Device::flex().autodiff();
        let x = Tensor::<3>::random([2, 5, 64], Distribution::Normal(0.0, 1.0), &device);
        let w =
            Tensor::<2>::random([64, 32], Distribution::Normal(0.0, 0.2), &device).require_grad();
        let b = Tensor::<1>::random([32], Distribution::Normal(0.0, 1.0), &device).require_grad();
        let want = burn::tensor::module::linear(x.clone(), w.clone(), Some(b.clone()));
        assert_eq!(compute(), None);
        let exact = linear(x.clone(), w.clone(), Some(b.clone()));
        assert_eq!(max_diff(exact, want.clone()), 0.0);
        for (dt, tol) in [(FloatDType::BF16, 0.15), (FloatDType::F16, 0.02)] {
            let got = {
                let _bf16 = scope(Some(dt));
                assert_eq!(compute(), Some(dt));
                linear(x.clone(), w.clone(), Some(b.clone()))
            };
            assert_eq!(compute(), None, "the scope did not end with its guard");
            assert_eq!(got.dtype(), DType::F32);
            let d = max_diff(got.clone(), want.clone());
            // bf16 keeps 8 significant bits, f16 11: |y| ~ 3 here.
            assert!(d > 0.0 && d < tol, "{dt:?}: {d}");
            let grads = got.sum().backward();
            let gw = w.grad(&grads).expect("no weight gradient");
            assert_eq!(gw.dtype(), DType::F32);
            let want_gw = x
                .clone()
                .inner()
                .sum_dim(1)
                .sum_dim(0)
                .reshape([64, 1])
                .expand([64, 32]);
            let d = max_diff(gw, want_gw);
            assert!(d < 0.2, "{dt:?} weight gradient off by {d}");
        }
    }

    #[test]
    fn scopes_nest() {
        let _outer = scope(Some(FloatDType::F16));
        {
            let _inner = scope(None);
            assert_eq!(compute(), None);
        }
        assert_eq!(compute(), Some(FloatDType::F16));
    }
}
