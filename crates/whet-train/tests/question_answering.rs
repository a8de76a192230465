//! The question-answering objective against `transformers`' `BertForQuestionAnswering` loss
//! (`tests/fixtures/tiny-bert-qa`, from `scripts/fixtures/make_fixtures.py`), span selection, and the
//! answers of `pipeline("question-answering")` (`tests/fixtures/qa-pipeline`, from
//! `scripts/fixtures/make_qa_pipeline_fixture.py`; needs cache/minilm).

use crate::common;

use burn::tensor::Device;
use common::fixtures;
use safetensors::SafeTensors;
use whet_data::QaFeature;
use whet_models::Checkpoint;
use whet_train::Objective;
use whet_train::question_answering::{QuestionAnswering, best_span};

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
        padding_free: false,
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
    // `padding_free = true` leaves the padding out of the softmax: the padded batch's loss is
    // then that of each window run alone (a batch of one has no padding), which the padded
    // batch's is not.
    let free = QuestionAnswering {
        pad_id: 0,
        eval_examples: vec![],
        max_answer_length: 30,
        padding_free: true,
    };
    let batched = free.evaluate(&model, &features, 3, &device).unwrap().loss;
    let alone = objective
        .evaluate(&model, &features, 1, &device)
        .unwrap()
        .loss;
    assert!(
        (batched - alone).abs() <= 1e-5 * alone.abs(),
        "padding-free batch {batched} vs windows alone {alone}"
    );
    assert!(
        (batched - got).abs() > 1e-4 * got.abs(),
        "the padding counts in transformers' loss ({got} vs {batched})"
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

/// The asset cache (`WHET_CACHE`, else the repository's `cache/`); `scripts/fetch_assets.sh
/// --only minilm` fills it.
fn cache() -> std::path::PathBuf {
    std::env::var_os("WHET_CACHE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| fixtures().join("../../cache"))
}

/// cache/minilm with the span head of `tests/fixtures/qa-pipeline/head.safetensors`: a
/// temporary model folder (MiniLM's config and tokenizer files) whose
/// `model.safetensors.index.json` names both weight files where they lie.
fn minilm_with_span_head() -> tempfile::TempDir {
    let minilm = cache().join("minilm");
    assert!(
        minilm.join("model.safetensors").is_file(),
        "{} is missing: run scripts/fetch_assets.sh --only minilm",
        minilm.display()
    );
    let dir = tempfile::tempdir().unwrap();
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.txt",
    ] {
        std::fs::copy(minilm.join(f), dir.path().join(f)).unwrap();
    }
    let encoder = minilm.join("model.safetensors").canonicalize().unwrap();
    let head = fixtures()
        .join("qa-pipeline/head.safetensors")
        .canonicalize()
        .unwrap();
    let index = serde_json::json!({"weight_map": {
        "embeddings.word_embeddings.weight": encoder,
        "qa_outputs.weight": head,
        "qa_outputs.bias": head,
    }});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    dir
}

#[test]
fn answers_equal_the_question_answering_pipeline() {
    use whet_data::{QaExample, qa_features};
    use whet_infer::question_answering::answer;

    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("qa-pipeline/expected.json")).unwrap(),
    )
    .unwrap();
    let folder = minilm_with_span_head();
    let device = Device::flex();
    let checkpoint = Checkpoint::open(folder.path()).unwrap();
    let (model, fresh) = checkpoint.load_question_answering(&device).unwrap();
    assert!(fresh.is_empty(), "the span head was not read: {fresh:?}");
    let tokenizer = checkpoint.tokenizer().unwrap();
    let cases = expected["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 5);
    let mut several_windows = 0;
    for case in cases {
        let text = |k: &str| case[k].as_str().unwrap().to_string();
        let num = |k: &str| case[k].as_u64().unwrap() as usize;
        let (question, context) = (text("question"), text("context"));
        assert!(!case["handle_impossible_answer"].as_bool().unwrap());
        // The pipeline's `doc_stride` is the tokenizer's `stride` (overlap), as whet's.
        let windows = qa_features(
            &tokenizer,
            &[QaExample {
                question: question.clone(),
                context: context.clone(),
                answers: vec![],
                origin: "case".into(),
            }],
            num("max_seq_len"),
            num("doc_stride"),
        )
        .unwrap()
        .len();
        assert_eq!(windows, num("windows"), "{question}: windows");
        several_windows += usize::from(windows > 1);
        let got = answer(
            &model,
            &tokenizer,
            &question,
            &context,
            num("max_seq_len"),
            num("doc_stride"),
            num("max_answer_len"),
            num("top_k"),
            &device,
        )
        .unwrap();
        let want = case["answers"].as_array().unwrap();
        let shown: Vec<_> = got
            .iter()
            .map(|a| (a.score, a.start, a.end, a.answer.as_str()))
            .collect();
        assert_eq!(got.len(), want.len(), "{question}: {shown:?} vs {want:?}");
        for (g, w) in got.iter().zip(want) {
            assert_eq!(
                (g.start, g.end, g.answer.as_str()),
                (
                    w["start"].as_u64().unwrap() as usize,
                    w["end"].as_u64().unwrap() as usize,
                    w["answer"].as_str().unwrap()
                ),
                "{question}: {shown:?} vs {want:?}"
            );
            let score = w["score"].as_f64().unwrap();
            // float32 logits of two implementations: at most 6e-6 apart, relative (keeping the
            // best of equal answers instead of adding their scores was 5% off).
            assert!(
                (g.score - score).abs() <= 5e-5 * score,
                "{question}: score {} vs {score}",
                g.score
            );
        }
    }
    assert_eq!(several_windows, 2, "two cases need doc_stride windows");
}
