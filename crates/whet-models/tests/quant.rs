//! Quantised base weights: NF4 with double quantisation against bitsandbytes
//! (`tests/fixtures/quant/nf4.safetensors`, from `scripts/fixtures/make_quant_fixtures.py`), the
//! quantised matmul against the f32 one in value and gradient, and a GGUF base kept in its own
//! blocks against the same file loaded as f32.

use crate::common;

use std::sync::Arc;

use burn::tensor::{Device, Distribution, Tensor, TensorData};
use common::*;
use safetensors::SafeTensors;
use whet_models::quant::{QuantMatrix, QuantSpec, dynamic_map};
use whet_models::{CausalLm, Checkpoint, DecoderInput, Mode, QuantPolicy, VisitParams, Visitor};

fn read(st: &SafeTensors, name: &str) -> (Vec<usize>, Vec<u8>) {
    let t = st
        .tensor(name)
        .unwrap_or_else(|_| panic!("fixture has no {name}"));
    (t.shape().to_vec(), t.data().to_vec())
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

#[test]
fn nf4_with_double_quantisation_matches_bitsandbytes() {
    let bytes = std::fs::read(fixtures().join("quant/nf4.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let map = f32s(&read(&st, "dynamic_map").1);
    assert!(
        max_abs_diff(&map, &dynamic_map()) < 1e-7,
        "dynamic map differs from create_dynamic_map(signed=True)"
    );
    for case in ["a", "b", "c"] {
        let (shape, w) = read(&st, &format!("{case}.weight"));
        let w = f32s(&w);
        let (rows, cols) = (shape[0], shape[1]);

        let plain = QuantMatrix::nf4(&w, rows, cols, false);
        let packed = read(&st, &format!("{case}.packed")).1;
        assert_eq!(
            plain.nf4_packed().unwrap(),
            &packed[..],
            "{case}: NF4 codes"
        );
        let absmax = f32s(&read(&st, &format!("{case}.absmax")).1);
        assert_eq!(plain.block_scales(), absmax, "{case}: block absmax");
        let want = f32s(&read(&st, &format!("{case}.dequant_plain")).1);
        assert!(
            max_abs_diff(&plain.dequantize(), &want) < 1e-6,
            "{case}: dequantised"
        );

        let dq = QuantMatrix::nf4(&w, rows, cols, true);
        assert_eq!(
            dq.nf4_packed().unwrap(),
            &packed[..],
            "{case}: NF4 codes (double quant)"
        );
        let (codes, outer, offset) = dq.double_quant_state().unwrap();
        // bitsandbytes takes the mean in f32, whet in f64 (the offset may differ in the last
        // bit), and its CPU search for the 8-bit level is not exactly nearest: a few scales
        // near the midpoint of two levels get the neighbour. Every other code agrees exactly.
        let want_codes = &read(&st, &format!("{case}.dq_absmax")).1;
        let ties: Vec<usize> = (0..codes.len())
            .filter(|&i| codes[i] != want_codes[i])
            .collect();
        assert!(
            ties.len() <= codes.len().div_ceil(100)
                && ties.iter().all(|&i| codes[i].abs_diff(want_codes[i]) == 1),
            "{case}: 8-bit scale codes differ at {ties:?}"
        );
        let want_outer = f32s(&read(&st, &format!("{case}.dq_outer")).1);
        assert!(
            max_abs_diff(outer, &want_outer) <= 1e-6 * want_outer[0].abs(),
            "{case}: outer absmax"
        );
        let want_offset = f32s(&read(&st, &format!("{case}.dq_offset")).1)[0];
        assert!(
            (offset - want_offset).abs() <= 1e-7 * want_offset.abs().max(1.0),
            "{case}: offset"
        );
        let want = f32s(&read(&st, &format!("{case}.dequant")).1);
        let got = dq.dequantize();
        for (b, (g, w)) in got.chunks(64).zip(want.chunks(64)).enumerate() {
            let tol = if ties.contains(&b) {
                0.02 * absmax[b]
            } else {
                1e-6
            };
            assert!(
                max_abs_diff(g, w) <= tol,
                "{case}: dequantised block {b} (double quant)"
            );
        }
        // Storage: half a byte per weight plus one byte per 64 and 4 per 256 * 64.
        assert!(dq.storage_bytes() < plain.storage_bytes());
        assert!(
            dq.storage_bytes()
                <= w.len() / 2 + w.len().div_ceil(64) + 4 * w.len().div_ceil(64 * 256) + 4
        );
    }
}

#[test]
fn quantised_matmul_equals_the_f32_matmul_in_value_and_gradient() {
    let device = Device::flex().autodiff();
    let (rows, cols) = (40, 96);
    let w: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.1)
        .collect();
    let q = Arc::new(QuantMatrix::nf4(&w, rows, cols, true));
    let wd = Tensor::<2>::from_data(TensorData::new(q.dequantize(), [rows, cols]), &device);
    let x =
        Tensor::<3>::random([2, 5, cols], Distribution::Normal(0.0, 1.0), &device).require_grad();
    let y1 = whet_models::kernels::quant_matmul(x.clone(), &q);
    let y2 = x.clone().matmul(wd.transpose().unsqueeze());
    let d = (y1.clone() - y2.clone()).abs().max().into_scalar::<f32>();
    assert!(d < 1e-5, "forward differs by {d}");
    let g1 = (y1.clone() * y1).sum().backward();
    let gx1 = x.grad(&g1).unwrap();
    let g2 = (y2.clone() * y2).sum().backward();
    let gx2 = x.grad(&g2).unwrap();
    let d = (gx1 - gx2).abs().max().into_scalar::<f32>();
    assert!(d < 1e-4, "input gradient differs by {d}");
}

/// Counts the linear weights held quantised, by storage kind.
fn quantised_kinds<M: VisitParams>(model: &mut M) -> std::collections::BTreeMap<String, usize> {
    struct Kinds(std::collections::BTreeMap<String, usize>);
    impl Visitor for Kinds {
        fn quantized(&mut self, _: &str, m: &QuantMatrix) {
            *self.0.entry(m.kind()).or_default() += 1;
        }
    }
    let mut k = Kinds(Default::default());
    model.visit_params("", &mut k);
    k.0
}

/// LoRA over a GGUF base without dequantising the model: the Q4_1 linear weights stay in their
/// blocks and the logits equal those of the same file loaded as f32.
#[test]
fn a_gguf_base_kept_in_its_blocks_gives_the_f32_logits() {
    let path = asset("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let device = Device::flex();
    let dense = Checkpoint::open(&path)
        .unwrap()
        .load_causal_lm(&device)
        .unwrap();
    let mut ckpt = Checkpoint::open(&path).unwrap();
    ckpt.quantization = Some(QuantPolicy {
        spec: QuantSpec::Gguf,
        skip: vec!["lm_head".into()],
    });
    let mut kept = ckpt.load_causal_lm(&device).unwrap();
    let kinds = quantised_kinds(&mut kept);
    assert_eq!(kinds.get("Q4_1"), Some(&210), "{kinds:?}");
    let ids: Vec<i64> = vec![1, 504, 3458, 314, 260, 1345, 28, 2];
    let input = || {
        DecoderInput::unpadded(Tensor::from_data(
            TensorData::new(ids.clone(), [1, 8]),
            &device,
        ))
    };
    let a = dense
        .forward_logits(input(), Mode::Eval)
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap();
    let b = kept
        .forward_logits(input(), Mode::Eval)
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap();
    let d = max_abs_diff(&a, &b);
    assert!(d < 1e-3, "logits differ by {d}");
}

/// QLoRA's base: SmolLM2 with every linear layer in NF4 (with and without double
/// quantisation) gives the logits transformers computes for the same NF4 weights.
#[test]
fn nf4_smollm2_gives_the_logits_of_the_reference_nf4_model() {
    let path = asset("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let fx = Fixture::open(&fixtures().join("quant/smollm2_nf4.safetensors"));
    let device = Device::flex();
    let ids = fx.i64("input_ids");
    let subset = fx.i64("vocab_subset");
    let t = ids.len();
    for (key, double_quant) in [("logits_nf4", false), ("logits_nf4_dq", true)] {
        let mut ckpt = Checkpoint::open(&path).unwrap();
        ckpt.quantization = Some(QuantPolicy {
            spec: QuantSpec::Nf4 { double_quant },
            skip: vec!["lm_head".into()],
        });
        let mut nf4 = ckpt.load_causal_lm(&device).unwrap();
        let kind = if double_quant { "nf4+dq" } else { "nf4" };
        assert_eq!(quantised_kinds(&mut nf4).get(kind), Some(&210));
        let input = DecoderInput::unpadded(Tensor::from_data(
            TensorData::new(ids.clone(), [1, t]),
            &device,
        ));
        let logits = values(nf4.forward_logits(input, Mode::Eval));
        let vocab = logits.len() / t;
        let got: Vec<f32> = logits
            .chunks(vocab)
            .flat_map(|row| subset.iter().map(|&i| row[i as usize]).collect::<Vec<_>>())
            .collect();
        // 30 layers of f32 rounding on logits spread over ±30. With double quantisation about
        // 0.2% of the block scales get the neighbouring 8-bit code: bitsandbytes' CPU search is
        // not exactly nearest (it maps a centred scale of -8.83e-5 to the level -6.63e-5 rather
        // than -8.87e-5), whet takes the nearest. Those blocks move by about 1%, the logits
        // by a few hundredths, a hundredth of what NF4 itself moves them.
        let want = fx.f32(key);
        let (tol, mean_tol) = if double_quant {
            (0.15, 0.03)
        } else {
            (1e-2, 2e-3)
        };
        assert_close(key, &got, &want, tol);
        let mean = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .sum::<f32>()
            / got.len() as f32;
        assert!(mean < mean_tol, "{key}: mean abs diff {mean}");
        if double_quant {
            assert_close(
                "last position",
                &logits[(t - 1) * vocab..],
                &fx.f32("last_nf4_dq"),
                tol,
            );
        }
        // The check has teeth: NF4 moves SmolLM2's logits far beyond the tolerance.
        let moved = max_abs_diff(&got, &fx.f32("logits_f32"));
        assert!(
            moved > 1.0,
            "NF4 logits should differ from f32 ones, by {moved}"
        );
    }
}
