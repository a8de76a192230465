//! Question-answering data: SQuAD-format rows, answer offsets checked, windows over long
//! contexts with the answer's tokens labelled (`tests/fixtures/qa/facts.jsonl`, from
//! `scripts/fixtures/make_qa_fixtures.py`).

use std::path::PathBuf;

use whet_data::*;
use whet_text::TextTokenizer;

pub(crate) fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub(crate) fn minilm() -> TextTokenizer {
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

/// SQuAD's own JSON (v2.0: an unanswerable question among them) reads as the flat rows the
/// `squad` dataset gives: one example a question, the paragraph's context, every gold answer,
/// none for an unanswerable one, each named by its article's line.
#[test]
fn squad_json_files_flatten_into_examples() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dev-v2.0.json");
    let squad = serde_json::json!({
        "version": "v2.0",
        "data": [
            {"title": "Ines", "paragraphs": [
                {"context": "Ines was born in Quito in 1977.", "qas": [
                    {"id": "a1", "question": "Where was Ines born?", "answers": [
                        {"text": "Quito", "answer_start": 17},
                        {"text": "in Quito", "answer_start": 14}]},
                    {"id": "a2", "question": "Where does Ines live?", "answers": [],
                     "plausible_answers": [{"text": "Quito", "answer_start": 17}],
                     "is_impossible": true}]},
                {"context": "She works as a chemist.", "qas": [
                    {"id": "a3", "question": "What is her job?", "answers": [
                        {"text": "a chemist", "answer_start": 13}]}]}]},
            {"title": "Rio", "paragraphs": [
                {"context": "Rio is a river.", "qas": [
                    {"id": "b1", "question": "What is Rio?", "answers": [
                        {"text": "a river", "answer_start": 7}]}]}]}
        ]
    });
    std::fs::write(&path, serde_json::to_string_pretty(&squad).unwrap()).unwrap();
    let t = Table::read(&path, Encoding::Utf8).unwrap();
    let ex = qa_examples(&t, &QaColumns::default()).unwrap();
    assert_eq!(ex.len(), 4);
    assert_eq!(ex[0].question, "Where was Ines born?");
    assert_eq!(ex[0].answers.len(), 2);
    assert_eq!(ex[0].answers[1].text, "in Quito");
    assert!(ex[1].answers.is_empty(), "unanswerable");
    assert_eq!(ex[2].context, "She works as a chemist.");
    assert_eq!(ex[3].answers[0].start, 7);
    // Each example names the line its article starts on.
    let text = std::fs::read_to_string(&path).unwrap();
    let rio = text.lines().position(|l| l.contains("\"Rio\"")).unwrap();
    let line: usize = ex[3].origin.rsplit(':').next().unwrap().parse().unwrap();
    assert!(
        line < rio + 1 && line > 1,
        "{} (Rio's title on line {})",
        ex[3].origin,
        rio + 1
    );
    // An answer that is not where it says is named with its article's line.
    let mut wrong = squad.clone();
    wrong["data"][1]["paragraphs"][0]["qas"][0]["answers"][0]["answer_start"] = 3.into();
    std::fs::write(&path, serde_json::to_string_pretty(&wrong).unwrap()).unwrap();
    let t = Table::read(&path, Encoding::Utf8).unwrap();
    let e = qa_examples(&t, &QaColumns::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("dev-v2.0.json") && e.contains("a river"), "{e}");
}
