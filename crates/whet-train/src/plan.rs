//! A memory plan for a run: the peak resident memory a training step will need, in parts
//! (weights, gradients, optimizer state, activations, the process itself), predicted from the
//! loaded model and the tokenized data before the first step, so `whet train` can refuse a run
//! that cannot fit and `whet plan` can say why.
//!
//! The parts:
//! - weights: every f32 parameter, and quantised layers at their stored size;
//! - the process: what it holds once the model is loaded and the data tokenized, beyond the
//!   weights (measured, VmRSS: binary, threads, tokenizer, data, a memory-mapped GGUF file,
//!   what loading left in the allocator); a constant plus the data where /proc is missing;
//! - gradients: one f32 value per trainable parameter;
//! - optimizer: AdamW's two f32 moments; 8-bit AdamW's two byte codes plus a scale per block of
//!   256 (f32 moments for parameters under 4096 values), and the f32 moments it decodes for the
//!   step, which the allocator keeps (measured: its peak equals AdamW's in a short run); nothing
//!   for SGD;
//! - activations: what the autodiff graph keeps for the backward pass on the largest batch the
//!   data can make (the `batch` longest examples, padded to the longest): per layer and token a
//!   number of hidden-, feed-forward- and key-sized vectors, the attention probabilities, the
//!   inputs of adapters with dropout, and for a language model the logits of the learnt tokens
//!   (three vocabulary-sized rows each) and three copies of the `[vocab, hidden]` head matrix
//!   (transposed for the product and its backward pass).
//!
//! The peak is weights + process + optimizer + the larger of the activations and the
//! gradients + [`OVERLAP`] of the smaller: the backward pass frees activations as it makes
//! gradients, so full fine-tuning peaks below their sum.
//!
//! The per-token counts come from the tensors each family's forward keeps (written out in
//! `activation_vectors`); not all of them are live at once, and [`LIVE_FRACTION`] is fitted to
//! two measured MiniLM LoRA runs (batch 16 and 64), [`OVERLAP`] to two full fine-tunings. BENCHMARKS.md compares the plan with measured
//! peaks on other configurations and on SmolLM2.

use serde::Serialize;
use whet_models::quant::QuantMatrix;
use whet_models::weights::Layout;
use whet_models::{Checkpoint, Family, FamilyConfig, VisitParams, Visitor};

use crate::optim::{MIN_8BIT_SIZE, OptimizerKind};

/// The sizes of a model that activations depend on.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ModelDims {
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_dim: usize,
    pub intermediate: usize,
    pub vocab: usize,
    /// A gated feed-forward (SwiGLU): three feed-forward-sized tensors kept instead of two.
    pub gated: bool,
}

impl ModelDims {
    /// Reads the sizes from a checkpoint's config.
    pub fn of(checkpoint: &Checkpoint) -> Self {
        match &checkpoint.config {
            FamilyConfig::Bert(c) => Self {
                layers: c.num_hidden_layers,
                hidden: c.hidden_size,
                heads: c.num_attention_heads,
                kv_dim: c.hidden_size,
                intermediate: c.intermediate_size,
                vocab: c.vocab_size,
                gated: false,
            },
            FamilyConfig::DistilBert(c) => Self {
                layers: c.n_layers,
                hidden: c.dim,
                heads: c.n_heads,
                kv_dim: c.dim,
                intermediate: c.hidden_dim,
                vocab: c.vocab_size,
                gated: false,
            },
            FamilyConfig::Deberta(c) => Self {
                layers: c.num_hidden_layers,
                hidden: c.hidden_size,
                heads: c.num_attention_heads,
                kv_dim: c.hidden_size,
                intermediate: c.intermediate_size,
                vocab: c.vocab_size,
                gated: false,
            },
            FamilyConfig::ModernBert(c) => Self {
                layers: c.num_hidden_layers,
                hidden: c.hidden_size,
                heads: c.num_attention_heads,
                kv_dim: c.hidden_size,
                intermediate: c.intermediate_size,
                vocab: c.vocab_size,
                gated: true,
            },
            FamilyConfig::Gpt2(c) => Self {
                layers: c.n_layer,
                hidden: c.n_embd,
                heads: c.n_head,
                kv_dim: c.n_embd,
                intermediate: c.n_inner.unwrap_or(4 * c.n_embd),
                vocab: c.vocab_size,
                gated: false,
            },
            FamilyConfig::Llama(c) => Self {
                layers: c.num_hidden_layers,
                hidden: c.hidden_size,
                heads: c.num_attention_heads,
                kv_dim: c.kv_heads() * c.head_dim(),
                intermediate: c.intermediate_size,
                vocab: c.vocab_size,
                gated: true,
            },
        }
    }
}

/// The largest batch a run will see.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct BatchShape {
    pub rows: usize,
    /// Padded length.
    pub len: usize,
    /// Positions whose next token is learnt (language models; 0 for classifiers).
    pub learnt: usize,
}

impl BatchShape {
    /// The `rows` longest of `examples` (length, learnt tokens), padded to the longest.
    pub fn largest(rows: usize, mut examples: Vec<(usize, usize)>) -> Self {
        examples.sort_unstable_by(|a, b| b.cmp(a));
        let top = &examples[..rows.min(examples.len())];
        Self {
            rows: top.len().max(1),
            len: top.first().map(|e| e.0).unwrap_or(1).max(1),
            learnt: top.iter().map(|e| e.1).sum(),
        }
    }
}

/// A predicted peak, in bytes, by part.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct MemoryPlan {
    /// Resident memory of the process once the model is loaded and the data tokenized
    /// (measured: VmRSS), 0 where unknown.
    pub loaded: u64,
    /// The largest batch, whose activations the plan sizes.
    pub batch: BatchShape,
    pub weights: u64,
    pub gradients: u64,
    pub optimizer: u64,
    pub activations: u64,
    pub process: u64,
    pub total: u64,
}

/// What a model's parameters weigh in a plan.
#[derive(Debug, Clone, Default)]
pub struct ParamBytes {
    /// Bytes held by the weights (f32 parameters, quantised layers as stored).
    pub weights: u64,
    /// Values of each trainable parameter.
    pub trainable: Vec<usize>,
    /// Summed input width of the adapters with dropout (each keeps its dropped-out input).
    pub dropout_inputs: usize,
}

/// The process's own memory (binary, threads, tokenizer, allocator) where it cannot be read.
pub const PROCESS_BYTES: u64 = 140 << 20;

/// The share of the counted activation tensors live at the peak (fitted, see the module doc):
/// the backward pass frees the forward's tensors as it consumes them.
pub const LIVE_FRACTION: f64 = 0.62;

/// The share of the smaller of activations and gradients live together with the larger,
/// fitted to full fine-tuning of MiniLM (batch 16) and SmolLM2 (batch 4).
pub const OVERLAP: f64 = 0.5;

/// Hidden-sized (`h`), feed-forward-sized (`i`) and key-sized (`kv`) vectors the backward pass
/// keeps per token and layer.
fn activation_vectors(family: Family, gated: bool) -> (f64, f64, f64) {
    match family {
        // norm in and out twice, q, attention context, its projection, residual, MLP output,
        // dropout masks of the post-norm encoders (~4 h of 1-byte masks ~ 1 h).
        Family::Bert | Family::DistilBert => (11.0, 2.0, 2.0),
        // BERT's, with the relative-position products of c2p and p2c (two more score-sized
        // tensors are counted in the attention term).
        Family::Deberta => (13.0, 2.0, 2.0),
        // Pre-norm: norms in and out (4), q and its two rotary halves, k's halves (5),
        // context, Wo, residual (3); Wi's two halves, activation, product (4 intermediate).
        Family::ModernBert => (12.0, 4.0, 3.0),
        Family::Gpt2 => (10.0, 2.0, 2.0),
        // RMSNorm's input, normalised and scaled values twice (6), q and its two rotary
        // halves (3), keys and values repeated to every head (2), context, o_proj, residual,
        // down_proj (4), one more for the residual stream (1); gate, up, activation, product;
        // k, v, and k's two rotary halves.
        Family::Llama if gated => (16.0, 4.0, 5.0),
        Family::Llama => (16.0, 2.0, 5.0),
    }
}

/// Weights (f32 parameters and quantised layers), trainable parameters and adapter inputs
/// kept for dropout, of a model.
pub fn param_bytes<M: VisitParams>(model: &mut M) -> ParamBytes {
    struct W(ParamBytes);
    impl W {
        fn add(&mut self, n: usize, trains: bool) {
            self.0.weights += 4 * n as u64;
            if trains {
                self.0.trainable.push(n);
            }
        }
    }
    impl Visitor for W {
        fn vector(&mut self, _: &str, p: &mut burn::module::Param<burn::tensor::Tensor<1>>) {
            self.add(p.shape().num_elements(), p.val().is_require_grad());
        }
        fn matrix(
            &mut self,
            _: &str,
            p: &mut burn::module::Param<burn::tensor::Tensor<2>>,
            _: Layout,
        ) {
            self.add(p.shape().num_elements(), p.val().is_require_grad());
        }
        fn linear(&mut self, _: &str, layer: &mut whet_models::layers::Linear) -> bool {
            // LoRA keeps its dropped-out input for the backward pass; its parameters are
            // counted with every other parameter.
            if layer.adapter.as_ref().is_some_and(|a| a.dropout > 0.0) {
                self.0.dropout_inputs += layer.dims().0;
            }
            false
        }
        fn quantized(&mut self, _: &str, m: &QuantMatrix) {
            self.0.weights += m.storage_bytes() as u64;
        }
    }
    let mut w = W(ParamBytes::default());
    model.visit_params("", &mut w);
    w.0
}

/// Predicts the peak of a training run. `loaded` is the process's resident memory with the
/// model loaded (None: estimated from `data_bytes`); `lm_head` whether the loss runs a
/// vocabulary head.
#[allow(clippy::too_many_arguments)]
pub fn predict(
    family: Family,
    dims: ModelDims,
    params: &ParamBytes,
    optim: OptimizerKind,
    batch: BatchShape,
    lm_head: bool,
    loaded: Option<u64>,
    data_bytes: u64,
) -> MemoryPlan {
    let trainable = &params.trainable;
    let n_trainable: u64 = trainable.iter().map(|&n| n as u64).sum();
    let gradients = 4 * n_trainable;
    let optimizer: u64 = match optim {
        // The plan is of the CPU run, where paged moments are ordinary ones.
        OptimizerKind::Adamw | OptimizerKind::PagedAdamw32bit => 8 * n_trainable,
        OptimizerKind::Adamw8bit | OptimizerKind::PagedAdamw8bit => trainable
            .iter()
            .map(|&n| {
                if n < MIN_8BIT_SIZE {
                    8 * n as u64
                } else {
                    2 * n as u64 + 2 * 4 * n.div_ceil(256) as u64 + 8 * n as u64
                }
            })
            .sum(),
        OptimizerKind::Sgd => 0,
    };
    let tokens = (batch.rows * batch.len) as f64;
    let (ch, ci, ckv) = activation_vectors(family, dims.gated);
    let per_layer = tokens
        * (ch * dims.hidden as f64 + ci * dims.intermediate as f64 + ckv * dims.kv_dim as f64)
        // attention probabilities, and the dropped-out copy training keeps
        + 2.0 * (batch.rows * dims.heads * batch.len * batch.len) as f64;
    let adapters = tokens * params.dropout_inputs as f64;
    let embeddings = 2.0 * tokens * dims.hidden as f64;
    let logits = 3.0 * batch.learnt as f64 * dims.vocab as f64;
    let kept = dims.layers as f64 * per_layer + adapters + embeddings + logits;
    let head = if lm_head {
        3 * 4 * (dims.vocab * dims.hidden) as u64
    } else {
        0
    };
    let activations = (LIVE_FRACTION * 4.0 * kept) as u64 + head;
    let weights = params.weights;
    let process = match loaded {
        Some(rss) => rss.saturating_sub(weights),
        None => PROCESS_BYTES + data_bytes,
    };
    MemoryPlan {
        loaded: loaded.unwrap_or(0),
        batch,
        weights,
        gradients,
        optimizer,
        activations,
        process,
        total: weights
            + process
            + optimizer
            + gradients.max(activations)
            + (OVERLAP * gradients.min(activations) as f64) as u64,
    }
}

/// Memory this machine can still give the run: `MemAvailable` of `/proc/meminfo`, plus what the
/// process holds already (the loaded model is part of the plan), or `WHET_MEMORY_LIMIT_MB` when
/// that is set and smaller (a budget for a shared machine). None where neither is known.
pub fn available_bytes() -> Option<u64> {
    let limit = std::env::var("WHET_MEMORY_LIMIT_MB")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|mb| mb << 20);
    match (machine_bytes(), limit) {
        (Some(m), Some(l)) => Some(m.min(l)),
        (m, l) => m.or(l),
    }
}

/// This process's resident memory now (VmRSS).
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

fn machine_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb = |key: &str| -> Option<u64> {
        let line = info.lines().find(|l| l.starts_with(key))?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let rss: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    Some((kb("MemAvailable:")? + rss) * 1024)
}

impl MemoryPlan {
    /// A table of the parts, in MB, with the batch the activations are sized for.
    pub fn table(&self) -> String {
        let mb = |b: u64| b as f64 / (1u64 << 20) as f64;
        let b = self.batch;
        let learnt = if b.learnt > 0 {
            format!(", {} learnt tokens", b.learnt)
        } else {
            String::new()
        };
        format!(
            "  weights      {:>9.1} MB\n  process      {:>9.1} MB   (loaded, beyond the weights)\n  \
             optimizer    {:>9.1} MB\n  gradients    {:>9.1} MB\n  activations  {:>9.1} MB   \
             (largest batch: {} x {} tokens{learnt})\n  peak         {:>9.1} MB",
            mb(self.weights),
            mb(self.process),
            mb(self.optimizer),
            mb(self.gradients),
            mb(self.activations),
            b.rows,
            b.len,
            mb(self.total)
        )
    }

    /// What to change when the plan does not fit, largest part first.
    pub fn advice(&self) -> String {
        let mut parts = [
            (
                self.activations,
                "activations: lower per_device_train_batch_size (and raise gradient_accumulation_steps to keep the effective batch) or data.max_length",
            ),
            (
                self.optimizer + self.gradients,
                "gradients and optimizer state: train an adapter (method = \"lora\" / \"qlora\" / \"ia3\") or use optim = \"adamw_bnb_8bit\"",
            ),
            (
                self.weights,
                "weights: quantise the frozen base (method = \"qlora\", or [quantization] keep_gguf_quantized for a GGUF base)",
            ),
        ];
        parts.sort_by_key(|p| std::cmp::Reverse(p.0));
        parts
            .iter()
            .map(|(_, s)| format!("  - {s}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Bytes the tokenized data holds: ids, labels, positions and the read rows, ~24 per token.
fn data_bytes(tokens: usize) -> u64 {
    24 * tokens as u64
}

/// The plan of a run over `lens` (each training example's length and learnt tokens);
/// `lm_head`: the model predicts every token's next token (causal LM, DPO), so the logits of
/// the learnt tokens count too. `rows_per_example`: 2 for pairs, which run as chosen and
/// rejected rows in one batch.
pub fn plan_of<M: VisitParams>(
    checkpoint: &Checkpoint,
    model: &mut M,
    args: &crate::TrainingArguments,
    lens: Vec<(usize, usize)>,
    lm_head: bool,
    rows_per_example: usize,
) -> MemoryPlan {
    let tokens = lens.iter().map(|e| e.0).sum();
    let rows = args.per_device_train_batch_size * rows_per_example;
    let batch = BatchShape::largest(rows, lens);
    predict(
        checkpoint.family(),
        ModelDims::of(checkpoint),
        &param_bytes(model),
        args.optim,
        batch,
        lm_head,
        resident_bytes(),
        data_bytes(tokens),
    )
}

/// A language-modelling row's tokens and learnt (predicted) tokens.
pub fn lm_lens(e: &whet_data::LmExample) -> (usize, usize) {
    let learnt = e
        .labels
        .iter()
        .skip(1)
        .filter(|&&l| l != whet_data::IGNORE)
        .count();
    (e.ids.len(), learnt)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dims() -> ModelDims {
        ModelDims {
            layers: 2,
            hidden: 32,
            heads: 4,
            kv_dim: 32,
            intermediate: 37,
            vocab: 99,
            gated: false,
        }
    }

    fn shape(rows: usize, len: usize, learnt: usize) -> BatchShape {
        BatchShape { rows, len, learnt }
    }

    /// Gradients and optimizer state follow the trainable parameters as the optimizer holds
    /// them; 8-bit AdamW keeps f32 moments for small parameters.
    #[test]
    fn gradients_and_optimizer_follow_the_trainable_parameters() {
        let params = ParamBytes {
            weights: 4_000_000,
            trainable: vec![10_000, 100],
            dropout_inputs: 0,
        };
        let p = predict(
            Family::Bert,
            dims(),
            &params,
            OptimizerKind::Adamw,
            shape(8, 16, 0),
            false,
            None,
            0,
        );
        assert_eq!(p.weights, 4_000_000);
        assert_eq!(p.gradients, 4 * 10_100);
        assert_eq!(p.optimizer, 8 * 10_100);
        let q = predict(
            Family::Bert,
            dims(),
            &params,
            OptimizerKind::Adamw8bit,
            shape(8, 16, 0),
            false,
            None,
            0,
        );
        assert_eq!(
            q.optimizer,
            2 * 10_000 + 8 * 10_000u64.div_ceil(256) + 8 * 10_000 + 8 * 100
        );
        let s = predict(
            Family::Bert,
            dims(),
            &params,
            OptimizerKind::Sgd,
            shape(8, 16, 0),
            false,
            None,
            0,
        );
        assert_eq!(s.optimizer, 0);
        // Gradients and activations peak partly together.
        let (big, small) = (
            p.gradients.max(p.activations),
            p.gradients.min(p.activations),
        );
        assert_eq!(
            p.total,
            p.weights + p.process + p.optimizer + big + (OVERLAP * small as f64) as u64
        );
        let rss = predict(
            Family::Bert,
            dims(),
            &params,
            OptimizerKind::Sgd,
            shape(8, 16, 0),
            false,
            Some(9_000_000),
            0,
        );
        assert_eq!(
            rss.process, 5_000_000,
            "the loaded process beyond its weights"
        );
    }

    /// Activations grow linearly with rows, faster than linearly with length (attention), and
    /// a language model pays for the logits of its learnt tokens.
    #[test]
    fn activations_scale_with_the_batch() {
        let a = |rows, len, learnt| {
            let params = ParamBytes::default();
            let o = OptimizerKind::Adamw;
            predict(
                Family::Llama,
                dims(),
                &params,
                o,
                shape(rows, len, learnt),
                false,
                None,
                0,
            )
            .activations
        };
        assert!(a(8, 16, 0).abs_diff(2 * a(4, 16, 0)) <= 1);
        assert!(a(4, 32, 0) > 2 * a(4, 16, 0));
        let logits = (LIVE_FRACTION * 4.0 * 3.0 * 10.0 * 99.0) as u64;
        assert!((a(4, 16, 10) - a(4, 16, 0)).abs_diff(logits) <= 1);
        // A language model's head: three [vocab, hidden] copies.
        let lm = predict(
            Family::Llama,
            dims(),
            &ParamBytes::default(),
            OptimizerKind::Adamw,
            shape(4, 16, 0),
            true,
            None,
            0,
        );
        assert_eq!(lm.activations - a(4, 16, 0), 3 * 4 * 99 * 32);
    }

    /// The largest batch is the longest examples, padded to the longest.
    #[test]
    fn the_largest_batch_is_the_longest_examples() {
        let b = BatchShape::largest(2, vec![(5, 1), (9, 4), (7, 2), (3, 0)]);
        assert_eq!((b.rows, b.len, b.learnt), (2, 9, 6));
        let one = BatchShape::largest(8, vec![(4, 3)]);
        assert_eq!((one.rows, one.len, one.learnt), (1, 4, 3));
    }
}
