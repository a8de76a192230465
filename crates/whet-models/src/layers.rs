//! Building blocks shared by the model families: linear, embedding, norms, dropout, attention.
//!
//! Each layer loads from a [`Weights`] view under its checkpoint name and exports itself under
//! the same name ([`VisitParams`]), so load and save cannot drift apart silently (the
//! round-trip test checks both against the file).

use burn::module::{Module, Param};
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Distribution, FloatDType, Int, Tensor, TensorData};

use std::sync::Arc;

use crate::error::Result;
use crate::quant::QuantMatrix;
use crate::weights::{Layout, VisitParams, Visitor, Weights, join};

/// Whether a forward pass trains (dropout active) or evaluates.
///
/// It is an explicit argument of every forward rather than a hidden flag: dropout that silently
/// does nothing is a fine-tuning bug that inference never shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Dropout drops.
    Train,
    /// Deterministic.
    Eval,
}

/// How a linear layer's weight is stored in the Hugging Face checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TorchLinear {
    /// `nn.Linear`: weight `[out, in]`.
    Linear,
    /// GPT-2's `Conv1D`: weight `[in, out]`.
    Conv1D,
}

/// A dense layer `y = x W + b` with `W` held as `[in, out]`, and a slot where a
/// parameter-efficient method attaches an adapter from outside (whet-peft fills it; the model
/// files never mention one).
#[derive(Module, Debug)]
pub struct Linear {
    /// The weight: an f32 parameter, or a frozen quantised matrix (QLoRA).
    pub weight: LinearWeight,
    /// `[d_out]`
    pub bias: Option<Param<Tensor<1>>>,
    /// Checkpoint layout of `weight`; the one place PyTorch's `[out, in]` is translated.
    #[module(skip)]
    pub stored_as: TorchLinear,
    /// An adapter added to the layer's output.
    pub adapter: Option<LowRank>,
    /// IA3 scaling vectors (peft's `ia3_l`), attached from outside like `adapter`.
    pub ia3: Option<Ia3>,
    /// A bottleneck adapter on the layer's output (Houlsby / Pfeiffer), attached from outside.
    pub bottleneck: Option<Bottleneck>,
}

/// A bottleneck adapter (Houlsby et al. 2019, <https://arxiv.org/abs/1902.00751>; Pfeiffer et
/// al. 2021, <https://arxiv.org/abs/2005.00247>) on a sub-layer's output projection:
/// `y + up(act(down(y)))`, with `up` starting at zero so the adapter starts as the identity.
#[derive(Module, Debug)]
pub struct Bottleneck {
    /// `[d, r]`
    pub down: Param<Tensor<2>>,
    /// `[r]`
    pub down_bias: Param<Tensor<1>>,
    /// `[r, d]`
    pub up: Param<Tensor<2>>,
    /// `[d]`
    pub up_bias: Param<Tensor<1>>,
    /// The non-linearity between the projections.
    #[module(skip)]
    pub act: crate::config::Activation,
    /// When false the adapter is skipped.
    pub enabled: bool,
}

impl Bottleneck {
    /// # Shapes
    /// - y `[..., d]`
    /// - output `[..., d]`
    pub fn forward<const D: usize>(&self, y: Tensor<D>) -> Tensor<D> {
        // (..., d) x (d, r) -> (..., r) -> (..., r) x (r, d) -> (..., d)
        let h = crate::precision::linear(y.clone(), self.down.val(), Some(self.down_bias.val()));
        let h = self.act.forward(h);
        y + crate::precision::linear(h, self.up.val(), Some(self.up_bias.val()))
    }
}

/// How a linear layer holds its weight.
#[derive(Module, Debug)]
pub enum LinearWeight {
    /// `[d_in, d_out]` in f32, trainable or frozen.
    Dense(Param<Tensor<2>>),
    /// A frozen base weight kept quantised (NF4 or ggml blocks) and dequantised inside the
    /// matmul; it has no gradient and is never saved with an adapter.
    Quantized(FrozenQuant),
}

/// A shared handle on a frozen [`QuantMatrix`] (`[out, in]`), outside burn's parameter tree.
#[derive(Module, Debug)]
pub struct FrozenQuant {
    #[module(skip)]
    pub matrix: Arc<QuantMatrix>,
}

/// IA3 (Liu et al. 2022, <https://arxiv.org/abs/2205.05638>) as `peft`'s `IA3Layer`: a learned
/// vector scaling the layer's output (`y = base(x) ⊙ l`, keys and values) or, for feed-forward
/// modules, its input (`y = base(x ⊙ l)`).
#[derive(Module, Debug)]
pub struct Ia3 {
    /// peft's `ia3_l` in peft's shape: `[d_out, 1]` for output scaling, `[1, d_in]` for input
    /// scaling.
    pub scale: Param<Tensor<2>>,
    /// Whether the input (feed-forward) rather than the output is scaled.
    pub on_input: bool,
    /// When false the vector is skipped (peft's `disable_adapter`).
    pub enabled: bool,
}

impl Ia3 {
    /// The scaling vector, flat: `[d_out]` or `[d_in]`.
    pub fn vector(&self) -> Tensor<1> {
        let n = self.scale.shape().num_elements();
        self.scale.val().reshape([n])
    }
}

/// A low-rank update computed on the activations, as `peft`'s LoRA layer does:
/// `y += dropout(x) · A · B · scaling`, never materialising the `[in, out]` product.
#[derive(Module, Debug)]
pub struct LowRank {
    /// `[d_in, r]` (peft's `lora_A.weight` transposed)
    pub a: Param<Tensor<2>>,
    /// `[r, d_out]` (peft's `lora_B.weight` transposed)
    pub b: Param<Tensor<2>>,
    /// `lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA.
    pub scaling: f64,
    /// Dropout on the adapter's input in training.
    pub dropout: f64,
    /// When false the adapter is skipped (peft's `disable_adapter`).
    pub enabled: bool,
}

impl LowRank {
    /// # Shapes
    /// - x `[..., d_in]`
    /// - output `[..., d_out]`
    pub fn forward<const D: usize>(&self, x: Tensor<D>, mode: Mode) -> Tensor<D> {
        let x = dropout(x, self.dropout, mode);
        // (..., in) x (in, r) -> (..., r) x (r, out) -> (..., out). peft scales the output;
        // scaling the r-wide middle is the same product (exactly so for a power of two, such
        // as the usual alpha = 2r) over r / out of the values, forward and backward.
        let h = crate::precision::linear(x, self.a.val(), None).mul_scalar(self.scaling);
        crate::precision::linear(h, self.b.val(), None)
    }

    /// The dense update `A · B · scaling` `[d_in, d_out]`, for merging.
    pub fn delta(&self) -> Tensor<2> {
        self.a.val().matmul(self.b.val()).mul_scalar(self.scaling)
    }
}

impl Linear {
    /// Loads `weight` (and `bias` when `bias` is true) from `vb`.
    pub fn load(
        vb: &Weights,
        d_in: usize,
        d_out: usize,
        bias: bool,
        stored_as: TorchLinear,
    ) -> Result<Self> {
        let weight = match vb.quantized_linear("weight", d_in, d_out, stored_as)? {
            Some(q) => LinearWeight::Quantized(FrozenQuant {
                matrix: Arc::new(q),
            }),
            None => LinearWeight::Dense(Param::from_tensor(match stored_as {
                TorchLinear::Linear => vb.tensor_transposed("weight", [d_out, d_in])?,
                TorchLinear::Conv1D => vb.tensor("weight", [d_in, d_out])?,
            })),
        };
        let bias = if bias {
            Some(vb.param("bias", [d_out])?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            stored_as,
            adapter: None,
            ia3: None,
            bottleneck: None,
        })
    }

    /// A frozen layer over a quantised matrix (`[out, in]`), without bias or adapters.
    pub fn frozen(matrix: QuantMatrix) -> Self {
        Self {
            weight: LinearWeight::Quantized(FrozenQuant {
                matrix: Arc::new(matrix),
            }),
            bias: None,
            stored_as: TorchLinear::Linear,
            adapter: None,
            ia3: None,
            bottleneck: None,
        }
    }

    /// A freshly initialised layer (new heads): weights ~ N(0, std), bias zero, as
    /// `transformers`' `_init_weights` does with `initializer_range`.
    pub fn init(
        d_in: usize,
        d_out: usize,
        bias: bool,
        std: f64,
        stored_as: TorchLinear,
        device: &burn::tensor::Device,
    ) -> Self {
        Self {
            weight: LinearWeight::Dense(Param::from_tensor(crate::device::random(
                [d_in, d_out],
                Distribution::Normal(0.0, std),
                device,
            ))),
            bias: bias.then(|| Param::from_tensor(Tensor::zeros([d_out], device))),
            stored_as,
            adapter: None,
            ia3: None,
            bottleneck: None,
        }
    }

    /// # Shapes
    /// - input `[..., d_in]`
    /// - output `[..., d_out]`
    pub fn forward<const D: usize>(&self, x: Tensor<D>, mode: Mode) -> Tensor<D> {
        let ia3 = self.ia3.as_ref().filter(|l| l.enabled);
        // IA3 on a feed-forward module scales the input of the base layer only (peft's
        // `IA3Layer.forward`: `base_layer(x * ia3_l)`); LoRA keeps the unscaled input.
        let base_in = match ia3 {
            Some(l) if l.on_input => x.clone() * l.vector().unsqueeze(),
            _ => x.clone(),
        };
        let bias = self.bias.as_ref().map(|b| b.val());
        let y = match &self.weight {
            LinearWeight::Dense(w) => crate::precision::linear(base_in, w.val(), bias),
            LinearWeight::Quantized(q) => {
                let y = crate::precision::quant_matmul(base_in, &q.matrix);
                match bias {
                    Some(b) => y + b.unsqueeze(),
                    None => y,
                }
            }
        };
        let y = match ia3 {
            Some(l) if !l.on_input => y * l.vector().unsqueeze(),
            _ => y,
        };
        let y = match &self.adapter {
            Some(a) if a.enabled => y + a.forward(x, mode),
            _ => y,
        };
        match &self.bottleneck {
            Some(b) if b.enabled => b.forward(y),
            _ => y,
        }
    }

    /// The weight, bias and product type of a layer that a fused CPU op may run in place of
    /// [`Self::forward`] on `rows` rows like `x`: a dense weight with no adapter, f32 or bf16
    /// compute, on the CPU's kernels, and more rows than a generation step (which keeps its
    /// matrix-vector path).
    fn fusable<const D: usize>(
        &self,
        x: &Tensor<D>,
        rows: usize,
    ) -> Option<(Tensor<2>, Option<Tensor<1>>, bool)> {
        let bf16 = match crate::precision::compute() {
            None => false,
            Some(FloatDType::BF16) => true,
            Some(_) => return None,
        };
        let plain = self.adapter.is_none() && self.ia3.is_none() && self.bottleneck.is_none();
        match &self.weight {
            LinearWeight::Dense(w)
                if plain
                    && rows > crate::kernels::SKINNY_ROWS
                    && crate::kernels::on_cpu_kernels(x) =>
            {
                Some((w.val(), self.bias.as_ref().map(|b| b.val()), bf16))
            }
            _ => None,
        }
    }

    /// `self.forward(silu(gate) · up)`, the down projection of LLaMA's gated MLP. A layer that
    /// [`Self::fusable`] allows keeps no gated product for the backward pass
    /// ([`crate::kernels::swiglu_linear`]).
    ///
    /// # Shapes
    /// - gate, up `[..., d_in]`
    /// - output `[..., d_out]`
    pub fn forward_swiglu<const D: usize>(
        &self,
        gate: Tensor<D>,
        up: Tensor<D>,
        mode: Mode,
    ) -> Tensor<D> {
        let mut dims = gate.dims();
        let rows: usize = dims[..D - 1].iter().product();
        match self.fusable(&gate, rows) {
            Some((weight, bias, bf16)) if gate.dims() == up.dims() => {
                let d_in = dims[D - 1];
                dims[D - 1] = weight.dims()[1];
                let flat = |t: Tensor<D>| t.reshape([rows, d_in]);
                let y = crate::kernels::swiglu_linear(flat(gate), flat(up), weight, bf16);
                with_bias(y, bias).reshape(dims)
            }
            _ => self.forward(crate::kernels::swiglu(gate, up), mode),
        }
    }

    /// `(d_in, d_out)`.
    pub fn dims(&self) -> (usize, usize) {
        match &self.weight {
            LinearWeight::Dense(w) => {
                let [i, o] = w.shape().dims();
                (i, o)
            }
            LinearWeight::Quantized(q) => {
                let (o, i) = q.matrix.dims();
                (i, o)
            }
        }
    }

    /// The f32 weight `[d_in, d_out]`: the parameter, or the quantised matrix dequantised (a
    /// constant without gradient).
    pub fn dense_weight(&self, device: &burn::tensor::Device) -> Tensor<2> {
        match &self.weight {
            LinearWeight::Dense(w) => w.val(),
            LinearWeight::Quantized(q) => {
                let (o, i) = q.matrix.dims();
                Tensor::<2>::from_data(
                    burn::tensor::TensorData::new(q.matrix.dequantize(), [o, i]),
                    device,
                )
                .transpose()
            }
        }
    }

    /// Whether the weight is held quantised.
    pub fn is_quantized(&self) -> bool {
        matches!(self.weight, LinearWeight::Quantized(_))
    }
}

/// `y + bias` over the last dimension, or `y`.
fn with_bias(y: Tensor<2>, bias: Option<Tensor<1>>) -> Tensor<2> {
    match bias {
        Some(b) => y + b.unsqueeze(),
        None => y,
    }
}

/// `layers[i].forward(norm.forward(x))` for each layer: a pre-norm layer's projections of its
/// normalised input. When [`Linear::fusable`] allows every one, each projection normalises x
/// inside one fused op that keeps x (shared by all) and not the normalised input
/// ([`crate::kernels::rms_norm_linear`]).
///
/// # Shapes
/// - x `[..., d]`
/// - outputs `[..., d_out]` of each layer
pub fn normed_projections<const D: usize>(
    norm: &RmsNorm,
    x: Tensor<D>,
    layers: &[&Linear],
    mode: Mode,
) -> Vec<Tensor<D>> {
    let dims = x.dims();
    let rows: usize = dims[..D - 1].iter().product();
    let fused: Option<Vec<_>> = layers.iter().map(|l| l.fusable(&x, rows)).collect();
    let Some(fused) = fused else {
        let h = norm.forward(x);
        return layers.iter().map(|l| l.forward(h.clone(), mode)).collect();
    };
    let flat = x.reshape([rows, dims[D - 1]]);
    let norm_weight = norm.scale();
    fused
        .into_iter()
        .map(|(weight, bias, bf16)| {
            let mut out = dims;
            out[D - 1] = weight.dims()[1];
            let y = crate::kernels::rms_norm_linear(
                flat.clone(),
                norm_weight.clone(),
                weight,
                norm.eps,
                bf16,
            );
            with_bias(y, bias).reshape(out)
        })
        .collect()
}

impl VisitParams for Linear {
    fn visit_params(&mut self, prefix: &str, v: &mut dyn Visitor) {
        if v.linear(prefix, self) {
            return;
        }
        let layout = match self.stored_as {
            TorchLinear::Linear => Layout::Transposed,
            TorchLinear::Conv1D => Layout::Same,
        };
        match &mut self.weight {
            LinearWeight::Dense(w) => v.matrix(&join(prefix, "weight"), w, layout),
            LinearWeight::Quantized(q) => v.quantized(&join(prefix, "weight"), &q.matrix),
        }
        if let Some(b) = &mut self.bias {
            v.vector(&join(prefix, "bias"), b);
        }
        // The adapters' parameters, under the names and layouts of peft's adapter file.
        if let Some(a) = &mut self.adapter {
            v.matrix(&join(prefix, "lora_A.weight"), &mut a.a, Layout::Transposed);
            v.matrix(&join(prefix, "lora_B.weight"), &mut a.b, Layout::Transposed);
        }
        if let Some(l) = &mut self.ia3 {
            v.matrix(&join(prefix, "ia3_l"), &mut l.scale, Layout::Same);
        }
        if let Some(b) = &mut self.bottleneck {
            v.matrix(
                &join(prefix, "adapter_down.weight"),
                &mut b.down,
                Layout::Transposed,
            );
            v.vector(&join(prefix, "adapter_down.bias"), &mut b.down_bias);
            v.matrix(
                &join(prefix, "adapter_up.weight"),
                &mut b.up,
                Layout::Transposed,
            );
            v.vector(&join(prefix, "adapter_up.bias"), &mut b.up_bias);
        }
    }
}

/// The names, under a linear layer, of the parameters its adapters add (see
/// [`Linear::visit_params`]): peft's `lora_A` / `lora_B` / `ia3_l` and whet's bottleneck
/// `adapter_down` / `adapter_up`.
pub const ADAPTER_PARAMS: [&str; 7] = [
    "lora_A.weight",
    "lora_B.weight",
    "ia3_l",
    "adapter_down.weight",
    "adapter_down.bias",
    "adapter_up.weight",
    "adapter_up.bias",
];

/// Whether the parameter `name` belongs to an adapter attached to a linear layer.
pub fn is_adapter_param(name: &str) -> bool {
    ADAPTER_PARAMS.iter().any(|p| {
        name.strip_suffix(p)
            .is_some_and(|m| m.is_empty() || m.ends_with('.'))
    })
}

/// A lookup table `[vocab, dim]`.
#[derive(Module, Debug)]
pub struct Embedding {
    /// `[num_embeddings, dim]`
    pub weight: Param<Tensor<2>>,
    /// As `nn.Embedding(padding_idx=...)`: this row receives no gradient.
    pub padding_idx: Option<usize>,
}

impl Embedding {
    /// Loads `weight` of shape `[n, dim]`.
    pub fn load(vb: &Weights, n: usize, dim: usize) -> Result<Self> {
        Ok(Self {
            weight: vb.param("weight", [n, dim])?,
            padding_idx: None,
        })
    }

    /// Sets the row that gets no gradient (ignored when out of range, as a pad id beyond the
    /// vocabulary cannot be looked up anyway).
    pub fn with_padding_idx(mut self, pad: Option<u32>) -> Self {
        let n = self.weight.dims()[0];
        self.padding_idx = pad.map(|p| p as usize).filter(|&p| p < n);
        self
    }

    /// # Shapes
    /// - ids `[B, T]`
    /// - output `[B, T, dim]`
    pub fn forward(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        let weight = self.weight.val();
        let track = weight.is_require_grad();
        let out = crate::kernels::embedding(weight, ids.clone());
        match self.padding_idx {
            // The padding row only feeds the positions holding the pad id, so detaching those
            // outputs zeroes exactly its gradient, at the cost of a [B, T, dim] select.
            Some(pad) if track => {
                let [b, t, d] = out.dims();
                let at_pad = ids
                    .equal_elem(pad as i64)
                    .reshape([b, t, 1])
                    .expand([b, t, d]);
                out.clone().mask_where(at_pad, out.detach())
            }
            _ => out,
        }
    }
}

impl VisitParams for Embedding {
    fn visit_params(&mut self, prefix: &str, v: &mut dyn Visitor) {
        v.matrix(&join(prefix, "weight"), &mut self.weight, Layout::Same);
    }
}

/// Layer normalisation with weight and bias (`nn.LayerNorm`).
#[derive(Module, Debug)]
pub struct LayerNorm {
    /// `[dim]`
    pub weight: Param<Tensor<1>>,
    /// `[dim]`; `None` for bias-free norms (ModernBERT's `norm_bias = false`).
    pub bias: Option<Param<Tensor<1>>>,
    /// Added to the variance.
    pub eps: f64,
}

impl LayerNorm {
    /// Loads `weight` and `bias` of shape `[dim]`.
    pub fn load(vb: &Weights, dim: usize, eps: f64) -> Result<Self> {
        Self::load_with_bias(vb, dim, eps, true)
    }

    /// Loads `weight`, and `bias` when the norm has one.
    pub fn load_with_bias(vb: &Weights, dim: usize, eps: f64, bias: bool) -> Result<Self> {
        Ok(Self {
            weight: vb.param("weight", [dim])?,
            bias: bias.then(|| vb.param("bias", [dim])).transpose()?,
            eps,
        })
    }

    /// A new norm as `nn.LayerNorm` initialises one: weight 1, bias 0.
    pub fn init(dim: usize, eps: f64, bias: bool, device: &burn::tensor::Device) -> Self {
        Self {
            weight: Param::from_tensor(Tensor::ones([dim], device)),
            bias: bias.then(|| Param::from_tensor(Tensor::zeros([dim], device))),
            eps,
        }
    }

    /// Normalises over the last axis.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let weight = self.weight.val();
        let bias = match &self.bias {
            Some(b) => b.val(),
            None => weight.zeros_like(),
        };
        crate::kernels::layer_norm(x, weight, bias, self.eps)
    }
}

impl VisitParams for LayerNorm {
    fn visit_params(&mut self, prefix: &str, v: &mut dyn Visitor) {
        v.vector(&join(prefix, "weight"), &mut self.weight);
        if let Some(b) = &mut self.bias {
            v.vector(&join(prefix, "bias"), b);
        }
    }
}

/// Root-mean-square normalisation (`LlamaRMSNorm`): `x / sqrt(mean(x²) + eps) * weight`;
/// Gemma's (`GemmaRMSNorm`) scales by `1 + weight` instead, its weights stored as offsets.
#[derive(Module, Debug)]
pub struct RmsNorm {
    /// `[dim]`
    pub weight: Param<Tensor<1>>,
    /// Added to the mean square.
    pub eps: f64,
    /// Added to the stored weight before scaling: 0, or 1 for Gemma.
    pub offset: f64,
}

impl RmsNorm {
    /// Loads `weight` of shape `[dim]`.
    pub fn load(vb: &Weights, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.param("weight", [dim])?,
            eps,
            offset: 0.0,
        })
    }

    /// The norm scaling by `offset + weight` (Gemma: 1).
    pub fn with_offset(mut self, offset: f64) -> Self {
        self.offset = offset;
        self
    }

    /// Normalises over the last axis.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        crate::kernels::rms_norm(x, self.scale(), self.eps)
    }

    /// What the normalised values are multiplied by: the weight, plus the offset.
    pub fn scale(&self) -> Tensor<1> {
        match self.offset {
            0.0 => self.weight.val(),
            o => self.weight.val().add_scalar(o),
        }
    }
}

impl VisitParams for RmsNorm {
    fn visit_params(&mut self, prefix: &str, v: &mut dyn Visitor) {
        v.vector(&join(prefix, "weight"), &mut self.weight);
    }
}

/// Inverted dropout: in training, zeroes each value with probability `p` and scales the rest by
/// `1 / (1 - p)`; the identity in evaluation.
pub fn dropout<const D: usize>(x: Tensor<D>, p: f64, mode: Mode) -> Tensor<D> {
    if mode == Mode::Eval || p <= 0.0 {
        return x;
    }
    crate::kernels::dropout(x, p)
}

/// The additive value that masks an attention score (`torch.finfo(float32).min`, as
/// `transformers` uses: finite, so a fully masked row gives a uniform softmax, not NaN).
pub const MASK_VALUE: f32 = f32::MIN;

/// Masks, in an attention bias, every query `i` / key `j` pair for which `far(i, j)` holds
/// (a sliding window's band): the same for every row and head.
///
/// # Shapes
/// - bias `[B, 1, Tq, Tk]`, output the same
pub fn mask_pairs(bias: Tensor<4>, far: impl Fn(usize, usize) -> bool) -> Tensor<4> {
    let [b, one, tq, tk] = bias.dims();
    let masked: Vec<bool> = (0..tq)
        .flat_map(|i| (0..tk).map(move |j| (i, j)))
        .map(|(i, j)| far(i, j))
        .collect();
    let masked =
        Tensor::<4, Bool>::from_data(TensorData::new(masked, [1, 1, tq, tk]), &bias.device());
    bias.mask_fill(masked.expand([b, one, tq, tk]), MASK_VALUE)
}

/// Additive attention bias from a key mask and optional causality.
///
/// `keep[b][j]` is whether key `j` of row `b` may be attended. With `causal`, query `i` (at
/// absolute position `offset + i`) sees keys `0..=offset + i` only.
///
/// # Shapes
/// - keep `[B, Tk]` (bool)
/// - output `[B, 1, Tq, Tk]`
pub fn attention_bias(keep: Tensor<2, Bool>, tq: usize, causal: bool) -> Tensor<4> {
    let [b, tk] = keep.dims();
    let device = keep.device();
    let offset = tk - tq;
    // masked[b, 0, i, j] = !keep[b, j] || (causal && j > offset + i)
    let pad: Tensor<4, Bool> = keep
        .bool_not()
        .reshape([b, 1, 1, tk])
        .expand([b, 1, tq, tk]);
    let masked = if causal {
        let future: Tensor<2, Bool> = Tensor::<2>::ones([tq, tk], &device)
            .triu(offset as i64 + 1)
            .bool();
        pad.bool_or(future.reshape([1, 1, tq, tk]).expand([b, 1, tq, tk]))
    } else {
        pad
    };
    Tensor::<4>::zeros([b, 1, tq, tk], &device).mask_fill(masked, MASK_VALUE)
}

/// Scaled dot-product attention with an additive bias and attention-probability dropout, with
/// grouped key / value heads (`KV` heads each serving `H / KV` query heads; `KV = H` for
/// multi-head attention).
///
/// On the CPU [`crate::kernels::attention`] runs in training and evaluation alike: without
/// keeping the probabilities for the backward pass, reading grouped key / value heads in place
/// and skipping the keys a causal mask hides from a whole block of rows. burn's `attention`
/// (its CPU backend's naive kernel, with k and v repeated to every head and the bias expanded)
/// took 5.5% of a 100-step MiniLM run's profile in its final evaluation. On a GPU evaluation
/// calls burn's fused `attention`, and training the one-pass softmax and dropout of
/// [`crate::kernels::attention_probs`], as burn's autodiff would decompose them into eight
/// tracked ops. On a device with TF32, unless TF32 is allowed, evaluation takes the training path
/// too, whose products stay f32 ([`crate::kernels::f32_matmul`]).
///
/// # Shapes
/// - q `[B, H, Tq, hd]`, k and v `[B, KV, Tk, hd]`
/// - bias `[B, 1, Tq, Tk]`
/// - output `[B, H, Tq, hd]`
pub fn scaled_dot_product(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    bias: Tensor<4>,
    dropout_p: f64,
    mode: Mode,
) -> Tensor<4> {
    let [b, h, tq, hd] = q.dims();
    let [_, kv, tk, _] = k.dims();
    // burn's fused attention computes in its inputs' type; under mixed precision the two
    // products go to 16 bits and the softmax stays f32, as in training. On a device with TF32
    // it is left out unless TF32 is allowed: its products could round f32 to TF32.
    if mode == Mode::Eval
        && crate::precision::compute().is_none()
        && !crate::kernels::on_cpu_kernels(&q)
        && !crate::kernels::avoids_tf32(&q)
    {
        let (k, v) = (repeat_kv(k, h / kv), repeat_kv(v, h / kv));
        let bias = bias.expand([b, h, tq, tk]);
        return attention(q, k, v, None, Some(bias), AttentionModuleOptions::default());
    }
    let dropout_p = if mode == Mode::Eval { 0.0 } else { dropout_p };
    let scale = 1.0 / (hd as f32).sqrt();
    crate::kernels::attention(q, k, v, bias, scale, dropout_p)
}

/// Repeats each key / value head `n_rep` times, as transformers' `repeat_kv` (grouped-query
/// attention).
///
/// # Shapes
/// - x `[B, KV, T, hd]`
/// - output `[B, KV * n_rep, T, hd]`
pub fn repeat_kv(x: Tensor<4>, n_rep: usize) -> Tensor<4> {
    if n_rep == 1 {
        return x;
    }
    let [b, kv, t, d] = x.dims();
    // (B, KV, T, hd) -> (B, KV, 1, T, hd) -> (B, KV, rep, T, hd) -> (B, KV*rep, T, hd)
    x.reshape([b, kv, 1, t, d])
        .expand([b, kv, n_rep, t, d])
        .reshape([b, kv * n_rep, t, d])
}

/// Splits `[B, T, H*hd]` into heads `[B, H, T, hd]`.
pub fn split_heads(x: Tensor<3>, heads: usize) -> Tensor<4> {
    let [b, t, d] = x.dims();
    // (B, T, H*hd) -> (B, T, H, hd) -> (B, H, T, hd)
    x.reshape([b, t, heads, d / heads]).swap_dims(1, 2)
}

/// Merges heads `[B, H, T, hd]` back into `[B, T, H*hd]`.
pub fn merge_heads(x: Tensor<4>) -> Tensor<3> {
    let [b, h, t, hd] = x.dims();
    // (B, H, T, hd) -> (B, T, H, hd) -> (B, T, H*hd)
    x.swap_dims(1, 2).reshape([b, t, h * hd])
}

/// Cross-entropy averaged over targets that are not `ignore_index` (as PyTorch's
/// `F.cross_entropy(..., ignore_index=-100)`).
///
/// # Shapes
/// - logits `[N, C]`
/// - targets `[N]`
/// - output `[1]`
pub fn cross_entropy(logits: Tensor<2>, targets: Tensor<1, Int>, ignore_index: i64) -> Tensor<1> {
    let [n, _] = logits.dims();
    let valid = targets.clone().not_equal_elem(ignore_index);
    let safe = targets.mask_fill(valid.clone().bool_not(), 0);
    let logp = burn::tensor::activation::log_softmax(logits, 1);
    // (N, C) gather (N, 1) -> (N, 1) -> (N)
    let picked = logp.gather(1, safe.reshape([n, 1])).reshape([n]);
    let w = valid.float();
    let count = w.clone().sum().clamp_min(1.0);
    -(picked * w).sum() / count
}
