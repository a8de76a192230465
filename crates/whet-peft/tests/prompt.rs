//! Prefix tuning and prompt tuning against adapters that `peft` saved
//! (`tests/fixtures/peft/*-prefix*`, `*-prompt*`, made by `scripts/fixtures/make_peft_fixtures.py`):
//! logits (classifiers and causal LMs, with a key/value prefix, a projected prefix, and a soft
//! prompt), the causal-LM loss, parameter counts, and whet's own save/load round trip.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use whet_models::decoder::causal_lm_loss;
use whet_models::unpad::Unpadded;
use whet_models::{
    CausalLm, Checkpoint, Classifier, ClassifierInput, DecoderInput, ExportParams, Mode,
};
use whet_peft::*;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

struct Expected {
    bytes: Vec<u8>,
}

impl Expected {
    fn open(case: &Path) -> Self {
        Self {
            bytes: std::fs::read(case.join("expected.safetensors")).unwrap(),
        }
    }

    fn tensor<T: Copy>(
        &self,
        name: &str,
        width: usize,
        f: fn(&[u8]) -> T,
    ) -> Option<(Vec<T>, Vec<usize>)> {
        let st = safetensors::SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st.tensor(name).ok()?;
        Some((
            t.data().chunks_exact(width).map(f).collect(),
            t.shape().to_vec(),
        ))
    }

    fn ints(&self, name: &str) -> Option<(Vec<i64>, Vec<usize>)> {
        self.tensor(name, 8, |b| i64::from_le_bytes(b.try_into().unwrap()))
    }

    fn floats(&self, name: &str) -> (Vec<f32>, Vec<usize>) {
        self.tensor(name, 4, |b| f32::from_le_bytes(b.try_into().unwrap()))
            .unwrap_or_else(|| panic!("no {name}"))
    }

    fn int_tensor(&self, name: &str, device: &Device) -> Option<Tensor<2, Int>> {
        let (v, s) = self.ints(name)?;
        Some(Tensor::from_data(TensorData::new(v, [s[0], s[1]]), device))
    }
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn meta(case: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(case.join("expected.json")).unwrap()).unwrap()
}

fn prompt_cases() -> Vec<PathBuf> {
    let mut cases: Vec<PathBuf> = std::fs::read_dir(fixtures().join("peft"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|c| meta(c).get("comparable_rows").is_some())
        .collect();
    cases.sort();
    assert!(
        cases.len() >= 6,
        "prompt-learning fixtures missing: {cases:?}"
    );
    cases
}

/// The fixture's batch without its padding when `padding_free`: the virtual tokens must then
/// join the real tokens in the model's padding-free layout.
fn unpadded(ex: &Expected, padding_free: bool) -> Option<Unpadded> {
    let (mask, s) = ex.ints("attention_mask").unwrap();
    padding_free.then(|| Unpadded::from_mask(&mask, s[0], s[1]))
}

fn classifier_logits(
    model: &Classifier,
    ex: &Expected,
    padding_free: bool,
    device: &Device,
) -> Vec<f32> {
    let input = ClassifierInput {
        input_ids: ex.int_tensor("input_ids", device).unwrap(),
        attention_mask: ex.int_tensor("attention_mask", device).unwrap(),
        token_type_ids: ex.int_tensor("token_type_ids", device),
        unpadded: unpadded(ex, padding_free),
    };
    values(model.forward(input, Mode::Eval).unwrap())
}

fn lm_input(ex: &Expected, padding_free: bool, device: &Device) -> DecoderInput {
    DecoderInput {
        input_ids: ex.int_tensor("input_ids", device).unwrap(),
        attention_mask: ex.int_tensor("attention_mask", device).unwrap(),
        position_ids: None,
        document_ids: None,
        unpadded: unpadded(ex, padding_free),
    }
}

/// Rows `rows` of a row-major `[B, C]` matrix.
fn rows(v: &[f32], width: usize, rows: &[usize]) -> Vec<f32> {
    rows.iter()
        .flat_map(|&r| v[r * width..(r + 1) * width].to_vec())
        .collect()
}

/// peft → whet: every prompt-learning adapter peft saved loads onto its base and gives peft's
/// logits (and, for causal LMs, peft's loss), padded and padding-free; whet counts parameters as
/// peft does.
#[test]
fn adapters_saved_by_peft_give_peft_logits_loss_and_counts() {
    let device = Device::flex();
    for (case, padding_free) in prompt_cases()
        .into_iter()
        .flat_map(|c| [(c.clone(), false), (c, true)])
    {
        let m = meta(&case);
        let base = Checkpoint::open(fixtures().join(m["base_fixture"].as_str().unwrap())).unwrap();
        let ex = Expected::open(&case);
        let (want, shape) = ex.floats("logits");
        let comparable: Vec<usize> = m["comparable_rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_u64().unwrap() as usize)
            .collect();
        let width = want.len() / shape[0];
        let (config, counts) = if m["task_type"] == "CAUSAL_LM" {
            let mut lm = base.load_causal_lm(&device).unwrap();
            let config = load_adapter(&mut lm, &case, &device).unwrap();
            let logits = lm.forward_logits(lm_input(&ex, padding_free, &device), Mode::Eval);
            assert_eq!(logits.dims().to_vec(), shape, "{}", case.display());
            let got = values(logits.clone());
            // Padding-free, the padding positions hold no logits worth comparing (zeros went
            // into the head there): the virtual and real positions are compared.
            let real = |v: &[f32]| -> Vec<f32> {
                let (mask, ms) = ex.ints("attention_mask").unwrap();
                let (p, vocab) = (shape[1] - ms[1], shape[2]);
                v.chunks(vocab)
                    .enumerate()
                    .filter(|(i, _)| {
                        let (r, j) = (comparable[i / shape[1]], i % shape[1]);
                        !padding_free || j < p || mask[r * ms[1] + j - p] == 1
                    })
                    .flat_map(|(_, x)| x.to_vec())
                    .collect()
            };
            let d = max_diff(
                &real(&rows(&got, width, &comparable)),
                &real(&rows(&want, width, &comparable)),
            );
            assert!(
                d <= 1e-4,
                "{} (padding-free {padding_free}): logits differ by {d}",
                case.display()
            );
            // peft prefixes the labels with -100 for a soft prompt's positions.
            let (labels, ls) = ex.ints("labels").unwrap();
            let p = lm.virtual_positions();
            let mut widened = Vec::new();
            for row in labels.chunks(ls[1]) {
                widened.extend(std::iter::repeat_n(-100, p));
                widened.extend_from_slice(row);
            }
            let labels = Tensor::from_data(TensorData::new(widened, [ls[0], ls[1] + p]), &device);
            let loss = values(causal_lm_loss(logits, labels))[0];
            let want_loss = ex.floats("loss").0[0];
            assert!(
                (loss - want_loss).abs() < 1e-5,
                "{}: loss {loss} vs {want_loss}",
                case.display()
            );
            let mut fresh = base.load_causal_lm(&device).unwrap();
            (
                config.clone(),
                config.apply(&mut fresh, &device).unwrap().counts,
            )
        } else {
            let (mut model, _) = base.load_classifier(&device).unwrap();
            let config = load_adapter(&mut model, &case, &device).unwrap();
            let got = classifier_logits(&model, &ex, padding_free, &device);
            let d = max_diff(
                &rows(&got, width, &comparable),
                &rows(&want, width, &comparable),
            );
            assert!(
                d <= 1e-4,
                "{} (padding-free {padding_free}): logits differ by {d}",
                case.display()
            );
            // The adapter changes the output: the comparison is not of the base with itself.
            let base_logits = ex.floats("base_logits").0;
            let moved = max_diff(
                &rows(&got, width, &comparable),
                &rows(&base_logits, width, &comparable),
            );
            assert!(
                moved > 1e-3,
                "{}: adapter moved logits by only {moved}",
                case.display()
            );
            let (mut fresh, _) = base.load_classifier(&device).unwrap();
            (
                config.clone(),
                config.apply(&mut fresh, &device).unwrap().counts,
            )
        };
        assert!(config.is_prompt_learning());
        assert_eq!(
            (counts.trainable as u64, counts.all as u64),
            (
                m["trainable_parameters"]["trainable"].as_u64().unwrap(),
                m["trainable_parameters"]["all"].as_u64().unwrap()
            ),
            "{}: trainable / all",
            case.display()
        );
    }
}

/// Padded rows of a decoder classifier with a soft prompt pool at their last real token (peft
/// pools the last position, padding or not, so the fixture compares unpadded rows only): each
/// row alone gives the same logits as in the padded batch.
#[test]
fn a_soft_prompt_classifier_pools_the_last_real_token_of_padded_rows() {
    let device = Device::flex();
    let case = fixtures().join("peft/llama-prompt");
    let base = Checkpoint::open(fixtures().join("tiny-llama-cls")).unwrap();
    let (mut model, _) = base.load_classifier(&device).unwrap();
    load_adapter(&mut model, &case, &device).unwrap();
    let ex = Expected::open(&case);
    let batch = classifier_logits(&model, &ex, false, &device);
    let free = classifier_logits(&model, &ex, true, &device);
    let d = max_diff(&free, &batch);
    assert!(d < 1e-5, "padding-free vs padded {d}");
    let (ids, s) = ex.ints("input_ids").unwrap();
    let (mask, _) = ex.ints("attention_mask").unwrap();
    for r in 0..s[0] {
        let n = mask[r * s[1]..(r + 1) * s[1]]
            .iter()
            .filter(|&&m| m == 1)
            .count();
        let row = |v: &[i64]| {
            Tensor::<2, Int>::from_data(
                TensorData::new(v[r * s[1]..r * s[1] + n].to_vec(), [1, n]),
                &device,
            )
        };
        let alone = values(
            model
                .forward(
                    ClassifierInput {
                        input_ids: row(&ids),
                        attention_mask: row(&mask),
                        token_type_ids: None,
                        unpadded: None,
                    },
                    Mode::Eval,
                )
                .unwrap(),
        );
        let d = max_diff(&alone, &batch[r * 3..(r + 1) * 3]);
        assert!(d < 1e-5, "row {r}: alone vs batched {d}");
    }
}

/// whet → whet: a trained-looking prefix (with projection) and soft prompt save in peft's
/// layout and load back to the same logits; disabled, the model is the base.
#[test]
fn save_then_load_round_trips_and_disabled_is_the_base() {
    let device = Device::flex().autodiff();
    let dir = fixtures().join("tiny-bert");
    let ex = Expected {
        bytes: std::fs::read(dir.join("fixture.safetensors")).unwrap(),
    };
    let configs = [
        PromptConfig::Prefix(PrefixTuningConfig {
            num_virtual_tokens: 3,
            prefix_projection: true,
            encoder_hidden_size: Some(8),
            modules_to_save: vec!["classifier".into()],
        }),
        PromptConfig::Prompt(PromptTuningConfig {
            num_virtual_tokens: 2,
            prompt_tuning_init: PromptInit::SampleVocab,
            prompt_tuning_init_text: None,
            init_token_ids: vec![],
            modules_to_save: vec!["classifier".into()],
        }),
    ];
    for config in configs {
        let (mut model, _) = Checkpoint::open(&dir)
            .unwrap()
            .load_classifier(&device)
            .unwrap();
        let base_logits = classifier_logits(&model, &ex, true, &device);
        let report = apply_prompt(&mut model, &config, &device).unwrap();
        assert!(report.counts.trainable > 0);
        // Only the encoder and the head train.
        for p in model.named_params() {
            let trains = match &p.tensor {
                whet_models::weights::AnyTensor::R1(t) => t.is_require_grad(),
                whet_models::weights::AnyTensor::R2(t) => t.is_require_grad(),
            };
            let expected = p.name.contains("prompt_encoder.") || p.name.starts_with("classifier.");
            assert_eq!(trains, expected, "{}", p.name);
        }
        let with = classifier_logits(&model, &ex, true, &device);
        assert!(
            max_diff(&with, &base_logits) > 1e-3,
            "virtual tokens change the output"
        );
        set_adapters_enabled(&mut model, false);
        assert_eq!(
            max_diff(&classifier_logits(&model, &ex, true, &device), &base_logits),
            0.0
        );
        set_adapters_enabled(&mut model, true);

        let out = tempfile::tempdir().unwrap();
        let peft = PeftConfig::Prompt(config.clone());
        peft.save(&model, "tiny-bert", "SEQ_CLS", out.path())
            .unwrap();
        let (mut loaded, _) = Checkpoint::open(&dir)
            .unwrap()
            .load_classifier(&device)
            .unwrap();
        let back = load_adapter(&mut loaded, out.path(), &device).unwrap();
        assert_eq!(back.peft_type(), peft.peft_type());
        let d = max_diff(&classifier_logits(&loaded, &ex, true, &device), &with);
        assert!(
            d < 1e-5,
            "{}: reloaded logits differ by {d}",
            peft.peft_type()
        );
    }
}

/// Bad configurations are refused with a reason: no virtual tokens, TEXT init without text,
/// and prefix tuning on DistilBERT (which takes no past keys and values).
#[test]
fn bad_prompt_configs_are_refused() {
    let device = Device::flex();
    let (mut bert, _) = Checkpoint::open(fixtures().join("tiny-bert"))
        .unwrap()
        .load_classifier(&device)
        .unwrap();
    let prefix = |n| {
        PromptConfig::Prefix(PrefixTuningConfig {
            num_virtual_tokens: n,
            prefix_projection: false,
            encoder_hidden_size: None,
            modules_to_save: vec![],
        })
    };
    let e = apply_prompt(&mut bert, &prefix(0), &device)
        .unwrap_err()
        .to_string();
    assert!(e.contains("num_virtual_tokens"), "{e}");
    let text = PromptConfig::Prompt(PromptTuningConfig {
        num_virtual_tokens: 2,
        prompt_tuning_init: PromptInit::Text,
        prompt_tuning_init_text: None,
        init_token_ids: vec![],
        modules_to_save: vec![],
    });
    let e = apply_prompt(&mut bert, &text, &device)
        .unwrap_err()
        .to_string();
    assert!(e.contains("prompt_tuning_init_text"), "{e}");
    let (mut distil, _) = Checkpoint::open(fixtures().join("tiny-distilbert"))
        .unwrap()
        .load_classifier(&device)
        .unwrap();
    let e = apply_prompt(&mut distil, &prefix(2), &device)
        .unwrap_err()
        .to_string();
    assert!(e.contains("DistilBERT"), "{e}");
}
