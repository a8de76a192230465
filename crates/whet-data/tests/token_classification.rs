//! Token-classification data: words and tags, tokenized and aligned as run_ner.py does.

use whet_data::*;

use crate::question_answering::{minilm, root};

/// Sentences given as words tokenize as run_ner.py's `tokenize_and_align_labels` does with
/// MiniLM's tokenizer (`tests/fixtures/token/alignment.json`, from
/// `scripts/fixtures/make_token_fixture.py`): the same ids, each word's tag on its first token,
/// -100 on its other tokens, the special tokens and past the truncation.
#[test]
fn words_tokenize_and_align_their_tags_as_run_ner_does() {
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/token/alignment.json")).unwrap(),
    )
    .unwrap();
    let max_length = fixture["max_length"].as_u64().unwrap() as usize;
    let cases = fixture["cases"].as_array().unwrap();
    let examples: Vec<TokenExample> = cases
        .iter()
        .map(|c| TokenExample {
            words: serde_json::from_value(c["words"].clone()).unwrap(),
            tags: serde_json::from_value(c["tags"].clone()).unwrap(),
            origin: "fixture".into(),
        })
        .collect();
    let encoded = tokenize_words(&minilm(), &examples, max_length).unwrap();
    for (c, e) in cases.iter().zip(&encoded) {
        let ids: Vec<u32> = serde_json::from_value(c["input_ids"].clone()).unwrap();
        let labels: Vec<i64> = serde_json::from_value(c["labels"].clone()).unwrap();
        assert_eq!(e.ids, ids, "{}", c["words"]);
        assert_eq!(e.tags, labels, "{}", c["words"]);
    }
    // Tags from a table: names, checked against the words.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ner.jsonl");
    std::fs::write(
        &p,
        "{\"tokens\": [\"EU\", \"rejects\"], \"ner_tags\": [\"B-ORG\", \"O\"]}\n\
         {\"tokens\": [\"Peter\"], \"ner_tags\": [\"B-PER\", \"O\"]}\n",
    )
    .unwrap();
    let t = Table::read(&p, Encoding::Utf8).unwrap();
    let cols = TokenColumns::for_table(&t, "text", "label");
    assert_eq!(
        (cols.tokens.as_str(), cols.tags.as_str()),
        ("tokens", "ner_tags")
    );
    let labels = Labels::infer(&t, &cols.tags).unwrap();
    assert_eq!(labels.0, vec!["B-ORG", "B-PER", "O"]);
    let e = token_examples(&t, &cols, &labels).unwrap_err().to_string();
    assert!(
        e.contains("ner.jsonl:2") && e.contains("2 tags for 1 words"),
        "{e}"
    );
}
