//! The question-answering objective against `transformers`' `BertForQuestionAnswering` loss
//! (`tests/fixtures/tiny-bert-qa`, from `scripts/make_fixtures.py`), and span selection.

mod common;

use burn::tensor::Device;
use common::fixtures;
use safetensors::SafeTensors;
use whet_data::QaFeature;
use whet_models::Checkpoint;
use whet_train::Objective;
use whet_train::qa::{QuestionAnswering, best_span};

fn i64s(st: &SafeTensors, k: &str) -> Vec<i64> {
    st.tensor(k)
        .unwrap_or_else(|_| panic!("no {k}"))
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

#[test]
fn span_loss_matches_transformers() {
    let root = fixtures().join("tiny-bert-qa");
    let bytes = std::fs::read(root.join("fixture.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (ids, types, mask) = (
        i64s(&st, "input_ids"),
        i64s(&st, "token_type_ids"),
        i64s(&st, "attention_mask"),
    );
    let (starts, ends) = (i64s(&st, "start_positions"), i64s(&st, "end_positions"));
    let t = st.tensor("input_ids").unwrap().shape()[1];
    let features: Vec<QaFeature> = (0..starts.len())
        .map(|r| {
            let n = mask[r * t..(r + 1) * t].iter().filter(|&&m| m == 1).count();
            QaFeature {
                ids: ids[r * t..r * t + n].iter().map(|&i| i as u32).collect(),
                type_ids: types[r * t..r * t + n].iter().map(|&i| i as u32).collect(),
                start: starts[r] as usize,
                end: ends[r] as usize,
                example: r,
                context_offsets: vec![None; n],
            }
        })
        .collect();
    let want = f32::from_le_bytes(st.tensor("loss").unwrap().data()[..4].try_into().unwrap());
    let device = Device::flex();
    let (model, fresh) = Checkpoint::open(&root)
        .unwrap()
        .load_question_answering(&device)
        .unwrap();
    assert!(
        fresh.is_empty(),
        "the fixture holds the span head: {fresh:?}"
    );
    let objective = QuestionAnswering {
        pad_id: 0,
        eval_examples: vec![],
        max_answer_length: 30,
    };
    // One batch padded to the longest row, as the fixture's: like `transformers`, the softmax
    // runs over padded positions too, so the loss depends on the padding.
    let got = objective
        .evaluate(&model, &features, 3, &device)
        .unwrap()
        .loss;
    assert!(
        ((got as f32) - want).abs() <= 1e-5 * want.abs(),
        "{got} vs {want}"
    );
}

#[test]
fn the_best_span_is_inside_the_context_ordered_and_short_enough() {
    // Tokens 0-2 are question / special (no offsets), 3-7 context words of 4 characters each.
    let f = QaFeature {
        ids: vec![0; 8],
        type_ids: vec![0; 8],
        start: 0,
        end: 0,
        example: 0,
        context_offsets: (0..8)
            .map(|i| (i >= 3).then(|| ((i - 3) * 5, (i - 3) * 5 + 4)))
            .collect(),
    };
    // The question token 1 has the highest start logit: not allowed. Among context tokens the
    // best start is 6, but the best end (4) lies before it; 6..=7 wins over 3..=4.
    let start = [0.0, 9.0, 0.0, 1.0, 0.0, 0.0, 5.0, 0.0];
    let end = [0.0, 9.0, 0.0, 0.0, 6.0, 0.0, 0.0, 4.0];
    assert_eq!(best_span(&[(&f, &start, &end)], 30), Some((15, 24)));
    // Limited to one token, the best single-token span is 6..=6 (5 + 0) vs 4..=4 (0 + 6):
    // 4..=4 wins.
    assert_eq!(best_span(&[(&f, &start, &end)], 1), Some((5, 9)));
}
