//! Reading, label mapping, splitting and batching, with the errors bad input gets.

use std::path::PathBuf;

use whet_data::*;

fn write(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn cols() -> Columns {
    Columns {
        text: "text".into(),
        text_pair: None,
        label: "label".into(),
    }
}

#[test]
fn jsonl_with_string_labels_maps_to_sorted_ids() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        &dir,
        "a.jsonl",
        b"{\"text\": \"good\", \"label\": \"pos\"}\n\n{\"text\": \"bad\", \"label\": \"neg\"}\n",
    );
    let t = Table::read(&p, Encoding::Utf8).unwrap();
    let labels = Labels::infer(&t, "label").unwrap();
    assert_eq!(labels.0, vec!["neg", "pos"]);
    let ex = examples(&t, &cols(), &labels).unwrap();
    assert_eq!(ex.iter().map(|e| e.label).collect::<Vec<_>>(), vec![1, 0]);
    assert!(ex[1].origin.ends_with("a.jsonl:3"), "{}", ex[1].origin);
}

#[test]
fn a_malformed_jsonl_line_is_named_by_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        &dir,
        "bad.jsonl",
        b"{\"text\": \"a\", \"label\": 0}\n{\"text\": \"b\", \"label\": \n",
    );
    let e = Table::read(&p, Encoding::Utf8).unwrap_err();
    assert!(matches!(&e, DataError::Json { line: 2, .. }), "{e}");
    assert!(e.to_string().contains("bad.jsonl:2"), "{e}");
}

#[test]
fn a_missing_column_lists_the_available_ones() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(&dir, "a.csv", b"sentence,label\nhi,0\n");
    let t = Table::read(&p, Encoding::Utf8).unwrap();
    let labels = Labels(vec!["a".into(), "b".into()]);
    let e = examples(&t, &cols(), &labels).unwrap_err();
    assert!(
        matches!(&e, DataError::MissingColumn { column, available, .. } if column == "text" && available == "sentence, label"),
        "{e}"
    );
}

#[test]
fn a_label_outside_the_set_is_named_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        &dir,
        "v.jsonl",
        b"{\"text\": \"a\", \"label\": \"pos\"}\n{\"text\": \"b\", \"label\": \"meh\"}\n",
    );
    let t = Table::read(&p, Encoding::Utf8).unwrap();
    let labels = Labels(vec!["neg".into(), "pos".into()]);
    let e = examples(&t, &cols(), &labels).unwrap_err();
    assert!(matches!(&e, DataError::UnknownLabel { line: 2, .. }), "{e}");
    // integer ids beyond the set too
    let p = write(&dir, "w.jsonl", b"{\"text\": \"a\", \"label\": 2}\n");
    let t = Table::read(&p, Encoding::Utf8).unwrap();
    assert!(matches!(
        examples(&t, &cols(), &labels),
        Err(DataError::UnknownLabel { line: 1, .. })
    ));
}

#[test]
fn an_empty_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(&dir, "e.jsonl", b"\n\n");
    assert!(matches!(
        Table::read(&p, Encoding::Utf8),
        Err(DataError::Empty { .. })
    ));
}

#[test]
fn latin1_csv_decodes_and_utf8_refuses_it_with_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(&dir, "l.csv", b"text,label\ncaf\xe9,0\n");
    let e = Table::read(&p, Encoding::Utf8).unwrap_err();
    assert!(matches!(&e, DataError::Decode { line: 2, .. }), "{e}");
    assert!(e.to_string().contains("latin-1"), "{e}");
    let t = Table::read(&p, "latin-1".parse().unwrap()).unwrap();
    assert_eq!(t.rows[0].1["text"], "café");
}

#[test]
fn seeded_split_is_reproducible_disjoint_and_sized() {
    let items: Vec<usize> = (0..100).collect();
    let a = seeded_split(
        &items,
        &[Some(Size::Count(80)), Some(Size::Fraction(0.1)), None],
        42,
    )
    .unwrap();
    let b = seeded_split(
        &items,
        &[Some(Size::Count(80)), Some(Size::Fraction(0.1)), None],
        42,
    )
    .unwrap();
    assert_eq!(a, b);
    assert_eq!((a[0].len(), a[1].len(), a[2].len()), (80, 10, 10));
    let mut all: Vec<usize> = a.concat();
    all.sort();
    assert_eq!(all, items);
    let c = seeded_split(&items, &[Some(Size::Count(80)), None], 7).unwrap();
    assert_ne!(a[0], c[0], "another seed, another split");
    assert!(seeded_split(&items, &[Some(Size::Count(101))], 1).is_err());
}

#[test]
fn collate_pads_right_to_the_longest_and_counts_tokens() {
    let a = Encoded {
        ids: vec![5, 6, 7],
        type_ids: vec![0, 0, 0],
        label: 1,
    };
    let b = Encoded {
        ids: vec![8],
        type_ids: vec![0],
        label: 0,
    };
    let batch = collate(&[&a, &b], 0);
    assert_eq!((batch.batch, batch.len, batch.tokens), (2, 3, 4));
    assert_eq!(batch.input_ids, vec![5, 6, 7, 8, 0, 0]);
    assert_eq!(batch.attention_mask, vec![1, 1, 1, 1, 0, 0]);
    assert_eq!(batch.labels, vec![1, 0]);
}

#[test]
fn epoch_order_is_a_seeded_permutation_that_changes_per_epoch() {
    let e0 = epoch_order(50, 42, 0);
    assert_eq!(e0, epoch_order(50, 42, 0));
    assert_ne!(e0, epoch_order(50, 42, 1));
    let mut s = e0.clone();
    s.sort();
    assert_eq!(s, (0..50).collect::<Vec<_>>());
}
