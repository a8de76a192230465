//! Question-answering data: SQuAD-format rows, answer offsets checked, windows over long
//! contexts with the answer's tokens labelled (`tests/fixtures/qa/facts.jsonl`, from
//! `scripts/fixtures/make_qa_fixtures.py`).

use std::path::PathBuf;

use whet_data::*;
use whet_text::TextTokenizer;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn minilm() -> TextTokenizer {
    let cache = std::env::var_os("WHET_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("cache"));
    TextTokenizer::from_folder(&cache.join("minilm"))
        .expect("cache/minilm: run scripts/fetch_assets.sh --only minilm")
}

fn facts() -> Vec<QaExample> {
    let t = Table::read(
        &root().join("tests/fixtures/qa/facts.jsonl"),
        Encoding::Utf8,
    )
    .unwrap();
    qa_examples(&t, &QaColumns::default()).unwrap()
}

#[test]
fn windows_label_the_answer_tokens() {
    let tok = minilm();
    let examples = facts();
    let features = qa_features(&tok, &examples, 48, 16).unwrap();
    let mut labelled = 0;
    for f in &features {
        assert!(f.ids.len() <= 48);
        assert_eq!(f.ids.len(), f.type_ids.len());
        let ex = &examples[f.example];
        if f.start == 0 {
            assert_eq!(f.end, 0);
            continue;
        }
        labelled += 1;
        assert!(f.start <= f.end);
        // The labelled tokens cover exactly the answer's characters (the tokenizer is uncased).
        let (a, _) = f.context_offsets[f.start].unwrap();
        let (_, z) = f.context_offsets[f.end].unwrap();
        let span: String = ex.context.chars().skip(a).take(z - a).collect();
        assert_eq!(span, ex.answers[0].text, "{}", ex.origin);
    }
    // Every example has its answer in at least one window.
    for k in 0..examples.len() {
        assert!(
            features.iter().any(|f| f.example == k && f.start > 0),
            "example {k} lost its answer"
        );
    }
    assert!(labelled >= examples.len());
}

#[test]
fn long_contexts_become_overlapping_windows() {
    let tok = minilm();
    let examples = facts();
    let long = 9; // every tenth context is padded with filler
    let features = qa_features(&tok, &examples[long..=long], 48, 16).unwrap();
    assert!(features.len() >= 3, "{} windows", features.len());
    // Consecutive windows share doc_stride context tokens.
    let context_ids = |f: &QaFeature| -> Vec<(usize, usize)> {
        f.context_offsets.iter().flatten().copied().collect()
    };
    for w in features.windows(2) {
        let (a, b) = (context_ids(&w[0]), context_ids(&w[1]));
        assert_eq!(&a[a.len() - 16..], &b[..16], "overlap of 16 tokens");
    }
    // Windows that do not hold the answer point at [CLS].
    assert!(features.iter().any(|f| f.start == 0 && f.end == 0));
}

#[test]
fn a_misplaced_answer_is_named_by_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.jsonl");
    std::fs::write(
        &p,
        "{\"question\": \"q?\", \"context\": \"one two three\", \"answers\": {\"text\": [\"two\"], \"answer_start\": [4]}}\n\
         {\"question\": \"q?\", \"context\": \"one two three\", \"answers\": {\"text\": [\"two\"], \"answer_start\": [5]}}\n",
    )
    .unwrap();
    let t = Table::read(&p, Encoding::Utf8).unwrap();
    let e = qa_examples(&t, &QaColumns::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("bad.jsonl:2") && e.contains("answer_start 5"),
        "{e}"
    );
    let t = Table::read(
        &root().join("tests/fixtures/qa/facts.jsonl"),
        Encoding::Utf8,
    )
    .unwrap();
    let e = qa_examples(
        &t,
        &QaColumns {
            answers: "answer".into(),
            ..Default::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("\"answer\"") && e.contains("answers"), "{e}");
}
