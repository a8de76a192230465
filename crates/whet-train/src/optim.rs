//! Optimizers over named parameters: AdamW with PyTorch's exact update (decoupled weight decay,
//! bias-corrected moments, eps outside the square root) and SGD, with weight decay skipped for
//! biases and normalisation weights as `transformers.Trainer` skips them.
//!
//! Written here rather than taken from burn-optim: the `Trainer` semantics need per-parameter
//! weight-decay groups chosen by name, and the state must be saved under parameter names so a
//! checkpoint resumes on a freshly loaded model.

use std::collections::HashMap;

use crate::scaler::LossScaler;
use burn::module::Param;
use burn::tensor::{Device, Gradients, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use whet_models::kernels;
use whet_models::quant::{Blockwise8, Blockwise8State};
use whet_models::weights::{Layout, tensor_values};
use whet_models::{VisitParams, Visitor};

/// `optim` of `TrainingArguments`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    /// `adamw_torch`
    #[default]
    #[serde(alias = "adamw_torch", alias = "adamw_hf", alias = "adamw_torch_fused")]
    Adamw,
    /// AdamW with 8-bit moments, as bitsandbytes' `AdamW8bit` (`optim = "adamw_bnb_8bit"`):
    /// each moment quantised blockwise (blocks of 256, the signed dynamic map for the first,
    /// the unsigned one for the second) between steps, in the memory of the device that trains
    /// (quantised and dequantised there on a GPU); parameters under 4096 values keep f32
    /// moments (bitsandbytes' `min_8bit_size`).
    #[serde(alias = "adamw_bnb_8bit", alias = "adamw8bit")]
    Adamw8bit,
    /// `paged_adamw_32bit`: AdamW whose f32 moments live in host memory between steps and go to
    /// the device for each parameter's update (bitsandbytes pages them through CUDA unified
    /// memory; whet copies them explicitly). The same numbers as `adamw_torch`, with the
    /// moments' 8 bytes per trainable value off the device. On the CPU it is `adamw_torch`.
    #[serde(rename = "paged_adamw_32bit", alias = "paged_adamw")]
    PagedAdamw32bit,
    /// `paged_adamw_8bit`: as `adamw_bnb_8bit` with the 8-bit moments kept in host memory
    /// between steps, and the f32 moments of the small parameters paged as
    /// `paged_adamw_32bit`. The same numbers as `adamw_bnb_8bit`.
    #[serde(rename = "paged_adamw_8bit")]
    PagedAdamw8bit,
    /// Plain SGD (no momentum).
    Sgd,
}

/// Parameters smaller than this keep f32 moments under [`OptimizerKind::Adamw8bit`].
pub const MIN_8BIT_SIZE: usize = 4096;

/// Optimizer hyper-parameters.
#[derive(Debug, Clone, Copy)]
pub struct OptimConfig {
    pub kind: OptimizerKind,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl OptimConfig {
    /// The optimizer `args` name (`optim`, `adam_beta1`, `adam_beta2`, `adam_epsilon`,
    /// `weight_decay`).
    pub fn from_args(args: &crate::TrainingArguments) -> Self {
        Self {
            kind: args.optim,
            beta1: args.adam_beta1,
            beta2: args.adam_beta2,
            eps: args.adam_epsilon,
            weight_decay: args.weight_decay,
        }
    }
}

/// Whether `transformers.Trainer` applies weight decay to parameter `name`: not to biases and
/// not to normalisation layers (LayerNorm, RMSNorm, GPT-2's `ln_*`).
pub fn decays(name: &str) -> bool {
    if name.ends_with("bias") {
        return false;
    }
    let module = name.rsplit_once('.').map(|(m, _)| m).unwrap_or(name);
    let last = module
        .rsplit('.')
        .next()
        .unwrap_or(module)
        .to_ascii_lowercase();
    !(last.contains("norm") || last.starts_with("ln_"))
}

/// `t` on `device`, through host data: device-to-device moves between the CPU backend and a
/// GPU runtime go through the host anyway, and this keeps the tensor's values bit for bit.
///
/// The values are copied into memory of our own: the data a GPU runtime reads back can be
/// backed by its staging buffer, which stays counted in the device's memory pool for as long
/// as the CPU tensor adopting it lives (measured on wgpu: paged moments kept that way saved
/// no device memory at all).
fn move_to(t: Tensor<1>, device: &Device) -> Tensor<1> {
    let n = t.dims()[0];
    Tensor::from_data(TensorData::new(tensor_values(t.into_data()), [n]), device)
}

/// First and second moments of one parameter (flattened).
#[derive(Debug, Clone)]
pub struct Moments {
    pub m: Tensor<1>,
    pub v: Tensor<1>,
}

/// Trainable-parameter gradients, flattened and keyed by parameter name; accumulates over
/// micro-batches.
#[derive(Debug, Default, Clone)]
pub struct GradStore {
    pub grads: HashMap<String, Tensor<1>>,
}

impl GradStore {
    /// Adds the gradients of every trainable parameter of `model` found in `grads`.
    pub fn accumulate<M: VisitParams>(&mut self, model: &mut M, grads: &Gradients) {
        struct Acc<'a> {
            store: &'a mut GradStore,
            grads: &'a Gradients,
        }
        impl Acc<'_> {
            fn add<const D: usize>(&mut self, name: String, t: &Tensor<D>) {
                if let Some(g) = t.grad(self.grads) {
                    let n = g.shape().num_elements();
                    let g: Tensor<1> = g.reshape([n]);
                    let e = self.store.grads.remove(&name);
                    self.store.grads.insert(
                        name,
                        match e {
                            Some(prev) => prev + g,
                            None => g,
                        },
                    );
                }
            }
        }
        impl Visitor for Acc<'_> {
            fn vector(&mut self, name: &str, p: &mut Param<Tensor<1>>) {
                self.add(name.to_string(), &p.val());
            }
            fn matrix(&mut self, name: &str, p: &mut Param<Tensor<2>>, _: Layout) {
                self.add(name.to_string(), &p.val());
            }
        }
        model.visit_params("", &mut Acc { store: self, grads });
    }

    /// Multiplies every gradient by `factor` (undoing the fp16 loss scale), in place on the CPU.
    pub fn scale(&mut self, factor: f64) {
        // Each gradient moved out of the map, so that the product can reuse its memory.
        self.grads = std::mem::take(&mut self.grads)
            .into_iter()
            .map(|(name, g)| (name, whet_models::kernels::scale(g, factor)))
            .collect();
    }

    /// The global L2 norm of all gradients.
    pub fn norm(&self) -> f64 {
        self.grads
            .values()
            .map(|g| whet_models::kernels::sum_of_squares(g.clone()))
            .sum::<f64>()
            .sqrt()
    }

    /// [`clip`](Self::clip) without reading anything back: the norm and the clipping
    /// coefficient stay on the device (as torch's `clip_grad_norm_`, which multiplies by
    /// `clamp(max_norm / (norm + 1e-6), max=1)` unconditionally). Returns the norm, `[1]`.
    pub fn clip_on_device(&mut self, max_norm: f64, device: &Device) -> Tensor<1> {
        // Sorted, so the float sum is the same on every run (a HashMap's order is not).
        let mut names: Vec<&String> = self.grads.keys().collect();
        names.sort();
        let squares: Vec<Tensor<1>> = names
            .iter()
            .map(|n| self.grads[*n].clone().square().sum())
            .collect();
        let norm = if squares.is_empty() {
            Tensor::zeros([1], &device.clone().inner())
        } else {
            Tensor::cat(squares, 0).sum().sqrt()
        };
        if max_norm > 0.0 {
            let coef = norm
                .clone()
                .add_scalar(1e-6)
                .recip()
                .mul_scalar(max_norm)
                .clamp_max(1.0);
            for g in self.grads.values_mut() {
                *g = g.clone() * coef.clone();
            }
        }
        norm
    }

    /// The global norm and the coefficient that clips it to at most `max_norm` (as
    /// `clip_grad_norm_`: `max_norm / (norm + 1e-6)`, applied only when below 1; 1 otherwise).
    /// Nothing is scaled here: [`Optimizer::step`] multiplies each gradient by the coefficient
    /// in its update pass, which saves a pass over every gradient.
    pub fn clip_coefficient(&self, max_norm: f64) -> (f64, f64) {
        let norm = self.norm();
        let coef = max_norm / (norm + 1e-6);
        (
            norm,
            if max_norm > 0.0 && coef < 1.0 {
                coef
            } else {
                1.0
            },
        )
    }
}

/// Both moments of one parameter quantised to 8 bits (`Adamw8bit`, `PagedAdamw8bit`).
#[derive(Debug, Clone)]
pub struct Moments8 {
    pub m: Blockwise8State,
    pub v: Blockwise8State,
}

impl Moments8 {
    /// New moments quantised where `kind` keeps them: in host memory for `paged_adamw_8bit`,
    /// else on the device they were computed on (host memory on the CPU backend).
    fn quantize(m: Tensor<1>, v: Tensor<1>, kind: OptimizerKind) -> Self {
        if kind == OptimizerKind::PagedAdamw8bit {
            Self {
                m: Blockwise8State::quantize_on_host(m, true),
                v: Blockwise8State::quantize_on_host(v, false),
            }
        } else {
            Self {
                m: Blockwise8State::quantize(m, true),
                v: Blockwise8State::quantize(v, false),
            }
        }
    }

    /// Host moments (a checkpoint's) placed where `kind` keeps them on `device`.
    pub fn from_host(m: Blockwise8, v: Blockwise8, kind: OptimizerKind, device: &Device) -> Self {
        if kind == OptimizerKind::PagedAdamw8bit {
            Self {
                m: Blockwise8State::Host(m),
                v: Blockwise8State::Host(v),
            }
        } else {
            Self {
                m: Blockwise8State::from_host(m, device),
                v: Blockwise8State::from_host(v, device),
            }
        }
    }

    /// Host copies of both moments (read back from a GPU).
    pub fn to_host(&self) -> (Blockwise8, Blockwise8) {
        (self.m.to_host(), self.v.to_host())
    }

    /// Bytes held, in host or device memory.
    pub fn storage_bytes(&self) -> usize {
        self.m.storage_bytes() + self.v.storage_bytes()
    }
}

/// Optimizer state: step count and per-parameter moments, keyed by name.
#[derive(Debug, Clone)]
pub struct Optimizer {
    pub config: OptimConfig,
    pub step: usize,
    pub moments: HashMap<String, Moments>,
    /// 8-bit moments (`Adamw8bit`, parameters of at least [`MIN_8BIT_SIZE`] values).
    pub moments8: HashMap<String, Moments8>,
    /// Dynamic loss scaling (`fp16 = true`).
    pub scaler: Option<LossScaler>,
}

impl Optimizer {
    /// A fresh optimizer.
    pub fn new(config: OptimConfig) -> Self {
        Self {
            config,
            step: 0,
            moments: HashMap::new(),
            moments8: HashMap::new(),
            scaler: None,
        }
    }

    /// What the loss is multiplied by before the backward pass: the loss scale with fp16,
    /// else 1.
    pub fn loss_scale(&self) -> f64 {
        self.scaler.map_or(1.0, |s| s.scale)
    }

    /// Optimizer steps skipped for overflowing fp16 gradients: the schedule does not count
    /// them.
    pub fn skipped_steps(&self) -> usize {
        self.scaler.map_or(0, |s| s.skipped)
    }

    /// Bytes the optimizer state holds (f32 moments at 4 bytes a value, 8-bit ones at one
    /// byte plus a scale per 256).
    pub fn state_bytes(&self) -> usize {
        let f32s: usize = self
            .moments
            .values()
            .map(|m| 4 * (m.m.dims()[0] + m.v.dims()[0]))
            .sum();
        let q8: usize = self.moments8.values().map(Moments8::storage_bytes).sum();
        f32s + q8
    }

    /// Applies one update with learning rate `lr` to every parameter that has a gradient, each
    /// gradient multiplied by `grad_scale` first (gradient clipping's coefficient; 1: none).
    pub fn step<M: VisitParams>(
        &mut self,
        model: &mut M,
        grads: &GradStore,
        lr: f64,
        grad_scale: f64,
    ) {
        self.step += 1;
        struct Update<'a> {
            opt: &'a mut Optimizer,
            grads: &'a GradStore,
            lr: f64,
            grad_scale: f64,
        }
        impl Update<'_> {
            fn update<const D: usize>(&mut self, name: &str, p: &mut Param<Tensor<D>>) {
                let Some(g) = self.grads.grads.get(name) else {
                    return;
                };
                // The value is taken out of the parameter, so that the update holds its only
                // reference and the fused AdamW writes it in place: a clone left in the
                // parameter made the update copy every weight each step (copy on write), and
                // one over 32 MB (an embedding) into freshly mapped pages.
                let device = p.val().device();
                let placeholder = Param::initialized(p.id, Tensor::empty([0; D], &device));
                let value = std::mem::replace(p, placeholder).into_value().inner();
                let shape = value.shape();
                let n = shape.num_elements();
                let flat: Tensor<1> = value.reshape([n]);
                let new = self
                    .opt
                    .apply(name, flat, g.clone(), self.lr, self.grad_scale);
                let new: Tensor<D> = new.reshape(shape);
                *p = Param::initialized(p.id, Tensor::from_inner(new).require_grad());
            }
        }
        impl Visitor for Update<'_> {
            fn vector(&mut self, name: &str, p: &mut Param<Tensor<1>>) {
                self.update(name, p);
            }
            fn matrix(&mut self, name: &str, p: &mut Param<Tensor<2>>, _: Layout) {
                self.update(name, p);
            }
        }
        model.visit_params(
            "",
            &mut Update {
                opt: self,
                grads,
                lr,
                grad_scale,
            },
        );
    }

    /// The update of one flattened parameter, its gradient `g · grad_scale`: the AdamW kinds
    /// multiply in their update pass, SGD first.
    fn apply(
        &mut self,
        name: &str,
        p: Tensor<1>,
        g: Tensor<1>,
        lr: f64,
        grad_scale: f64,
    ) -> Tensor<1> {
        let c = self.config;
        let wd = if decays(name) { c.weight_decay } else { 0.0 };
        match c.kind {
            OptimizerKind::Sgd => {
                let g = if grad_scale != 1.0 {
                    kernels::scale(g, grad_scale)
                } else {
                    g
                };
                let g = if wd > 0.0 {
                    g + p.clone().mul_scalar(wd)
                } else {
                    g
                };
                p - g.mul_scalar(lr)
            }
            OptimizerKind::Adamw8bit | OptimizerKind::PagedAdamw8bit
                if g.dims()[0] >= MIN_8BIT_SIZE && kernels::on_cpu_kernels(&p) =>
            {
                // On the CPU both kinds keep their moments in host memory, and one pass per
                // block dequantises, updates and quantises them.
                let n = g.dims()[0];
                let (mut m, mut v) = match self.moments8.remove(name) {
                    Some(Moments8 {
                        m: Blockwise8State::Host(m),
                        v: Blockwise8State::Host(v),
                    }) => (m, v),
                    Some(other) => other.to_host(),
                    None => (Blockwise8::zeros(n, true), Blockwise8::zeros(n, false)),
                };
                let p = kernels::adamw_8bit_on_host(
                    p,
                    g,
                    &mut m,
                    &mut v,
                    self.adamw_step(lr, wd, grad_scale),
                );
                let (m, v) = (Blockwise8State::Host(m), Blockwise8State::Host(v));
                self.moments8.insert(name.to_string(), Moments8 { m, v });
                p
            }
            OptimizerKind::Adamw8bit | OptimizerKind::PagedAdamw8bit
                if g.dims()[0] >= MIN_8BIT_SIZE =>
            {
                let device = g.device();
                // The update uses the new moments in f32; only what is kept between steps is
                // 8-bit (as bitsandbytes' blockwise kernel). On a GPU both conversions run
                // there, so the step reads nothing back.
                let st = match self.moments8.remove(name) {
                    Some(q) => Moments {
                        m: q.m.dequantize(&device),
                        v: q.v.dequantize(&device),
                    },
                    None => Moments {
                        m: g.zeros_like(),
                        v: g.zeros_like(),
                    },
                };
                let (p, st) = self.adam(p, g, st, lr, wd, grad_scale);
                let q = Moments8::quantize(st.m, st.v, c.kind);
                self.moments8.insert(name.to_string(), q);
                p
            }
            OptimizerKind::Adamw
            | OptimizerKind::Adamw8bit
            | OptimizerKind::PagedAdamw32bit
            | OptimizerKind::PagedAdamw8bit => {
                let device = g.device();
                let paged = matches!(
                    c.kind,
                    OptimizerKind::PagedAdamw32bit | OptimizerKind::PagedAdamw8bit
                ) && !whet_models::device::is_flex(&device);
                let st = match self.moments.remove(name) {
                    Some(st) if paged => Moments {
                        m: move_to(st.m, &device),
                        v: move_to(st.v, &device),
                    },
                    Some(st) => st,
                    None => Moments {
                        m: g.zeros_like(),
                        v: g.zeros_like(),
                    },
                };
                let (p, mut st) = self.adam(p, g, st, lr, wd, grad_scale);
                if paged {
                    let host = Device::flex();
                    st = Moments {
                        m: move_to(st.m, &host),
                        v: move_to(st.v, &host),
                    };
                }
                self.moments.insert(name.to_string(), st);
                p
            }
        }
    }

    /// The constants of this step's AdamW update at `lr` with weight decay `wd`.
    fn adamw_step(&self, lr: f64, wd: f64, grad_scale: f64) -> kernels::AdamwStep {
        let c = self.config;
        kernels::AdamwStep {
            lr,
            beta1: c.beta1,
            beta2: c.beta2,
            eps: c.eps,
            weight_decay: wd,
            step: self.step as i32,
            grad_scale,
        }
    }

    /// PyTorch's AdamW step on one flattened parameter ([`kernels::adamw`]: one fused pass on
    /// the CPU). Returns the parameter and the new moments.
    fn adam(
        &self,
        p: Tensor<1>,
        g: Tensor<1>,
        st: Moments,
        lr: f64,
        wd: f64,
        grad_scale: f64,
    ) -> (Tensor<1>, Moments) {
        let (p, m, v) = kernels::adamw(p, g, st.m, st.v, self.adamw_step(lr, wd, grad_scale));
        (p, Moments { m, v })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, Distribution};
    use whet_models::weights::{SafetensorsSource, TensorSource};

    /// Three steps of bitsandbytes' AdamW8bit on CPU (`tests/fixtures/quant/adamw8bit.safetensors`,
    /// from `scripts/fixtures/make_quant_fixtures.py`): an 8-bit parameter (5000 values: every state code
    /// and block maximum) and an f32 one (100 values, under `min_8bit_size`: AdamW exactly).
    #[test]
    fn adamw_8bit_follows_bitsandbytes() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/quant/adamw8bit.safetensors");
        let fx = SafetensorsSource::open(&path).unwrap();
        let read = |k: &str| fx.read_f32(k).unwrap();
        let map = whet_models::quant::dynamic_map_unsigned();
        for (a, b) in read("dynamic_map_unsigned").iter().zip(map) {
            assert!((a - b).abs() <= 1e-6 * b.abs(), "unsigned map: {a} vs {b}");
        }
        let device = Device::flex();
        let t = |v: Vec<f32>| {
            let n = v.len();
            Tensor::<1>::from_data(TensorData::new(v, [n]), &device)
        };
        let mut opt = Optimizer::new(OptimConfig {
            kind: OptimizerKind::Adamw8bit,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        });
        let mut a = t(read("a.init"));
        let mut b = t(read("b.init"));
        for step in 1..=3 {
            opt.step += 1;
            a = opt.apply("a.weight", a, t(read(&format!("a.grad{step}"))), 1e-2, 1.0);
            b = opt.apply("b.weight", b, t(read(&format!("b.grad{step}"))), 1e-2, 1.0);
            for (name, got) in [("a", &a), ("b", &b)] {
                let want = read(&format!("{name}.step{step}"));
                let got = tensor_values(got.clone().into_data());
                let d = got
                    .iter()
                    .zip(&want)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
                // "b" keeps f32 moments: plain AdamW, equal to float rounding. "a" keeps 8-bit
                // moments, requantised with bitsandbytes' nearest-code rule each step (the
                // fixture's note says why not its native CPU search): the same codes, so the
                // same steps to float rounding.
                assert!(d < 2e-6, "{name} after step {step}: max difference {d}");
            }
        }
        assert!(opt.moments.contains_key("b.weight") && !opt.moments.contains_key("a.weight"));
        let (qm, qv) = opt.moments8["a.weight"].to_host();
        assert_eq!(qm.absmax.len(), 20);
        for (mine, key) in [(&qm.absmax, "a.absmax1"), (&qv.absmax, "a.absmax2")] {
            for (x, y) in mine.iter().zip(read(key)) {
                assert!((x - y).abs() <= 1e-6 * y.abs(), "{key}: {x} vs {y}");
            }
        }
        for (mine, key) in [(&qm, "a.state1"), (&qv, "a.state2")] {
            let want = read(&format!("{key}_as_f32"));
            let same = mine
                .codes
                .iter()
                .zip(&want)
                .filter(|(c, w)| **c as f32 == **w)
                .count();
            assert_eq!(
                same,
                want.len(),
                "{key}: {same} of {} codes agree",
                want.len()
            );
        }
        // A quarter of the f32 state's bytes, plus the block scales.
        assert_eq!(
            opt.moments8["a.weight"].storage_bytes(),
            2 * (5000 + 4 * 20)
        );
    }

    /// Clipping inside the update pass gives the bits of clipping first (scaling every gradient,
    /// then updating with coefficient 1), for each optimizer kind, three steps, one of them
    /// clipped harder than the others; and the coefficient is applied at all (a clipped update
    /// differs from an unclipped one).
    #[test]
    fn clipping_in_the_update_equals_clipping_first() {
        let device = Device::flex();
        let n = 3 * MIN_8BIT_SIZE + 13;
        let bits = |t: &Tensor<1>| -> Vec<u32> {
            let v: Vec<f32> = t.to_data().try_to_vec().unwrap();
            v.iter().map(|x| x.to_bits()).collect()
        };
        for kind in [
            OptimizerKind::Sgd,
            OptimizerKind::Adamw,
            OptimizerKind::Adamw8bit,
        ] {
            let config = OptimConfig {
                kind,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.01,
            };
            let (mut inside, mut first, mut unclipped) = (
                Optimizer::new(config),
                Optimizer::new(config),
                Optimizer::new(config),
            );
            let p0 = Tensor::<1>::random([n], Distribution::Normal(0.0, 0.05), &device);
            let (mut a, mut b, mut c) = (p0.clone(), p0.clone(), p0);
            for (step, coef) in [0.5, 0.013, 1.0].into_iter().enumerate() {
                let g = Tensor::<1>::random([n], Distribution::Normal(0.0, 1e-2), &device);
                for o in [&mut inside, &mut first, &mut unclipped] {
                    o.step += 1;
                }
                a = inside.apply("w.weight", a, g.clone(), 1e-2, coef);
                let scaled = whet_models::kernels::scale(g.clone(), coef);
                b = first.apply("w.weight", b, scaled, 1e-2, 1.0);
                c = unclipped.apply("w.weight", c, g, 1e-2, 1.0);
                assert!(
                    bits(&a) == bits(&b),
                    "{kind:?}: differs at step {}",
                    step + 1
                );
            }
            assert!(
                bits(&a) != bits(&c),
                "{kind:?}: the coefficient was not applied"
            );
        }
    }

    #[test]
    fn no_decay_for_biases_and_norms() {
        assert!(decays("bert.encoder.layer.0.attention.self.query.weight"));
        assert!(!decays("bert.encoder.layer.0.attention.self.query.bias"));
        assert!(!decays("bert.embeddings.LayerNorm.weight"));
        assert!(!decays("transformer.h.0.ln_1.weight"));
        assert!(!decays("model.layers.0.input_layernorm.weight"));
        assert!(!decays("model.norm.weight"));
        assert!(decays("classifier.weight"));
        assert!(decays("bert.encoder.layer.0.attention.self.query.lora_A"));
    }
}
