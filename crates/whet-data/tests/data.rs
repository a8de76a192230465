//! Reading, label mapping, splitting and batching, with the errors bad input gets.

use std::path::{Path, PathBuf};

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
    let ex = examples(&t, &cols(), &labels, LabelKind::Single).unwrap();
    assert_eq!(
        ex.iter().map(|e| e.label.clone()).collect::<Vec<_>>(),
        vec![Target::Class(1), Target::Class(0)]
    );
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
    let e = examples(&t, &cols(), &labels, LabelKind::Single).unwrap_err();
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
    let e = examples(&t, &cols(), &labels, LabelKind::Single).unwrap_err();
    assert!(matches!(&e, DataError::UnknownLabel { line: 2, .. }), "{e}");
    // integer ids beyond the set too
    let p = write(&dir, "w.jsonl", b"{\"text\": \"a\", \"label\": 2}\n");
    let t = Table::read(&p, Encoding::Utf8).unwrap();
    assert!(matches!(
        examples(&t, &cols(), &labels, LabelKind::Single),
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
    // only the first unsized part takes the rest (train = rest, validation 8, no test)
    let d = seeded_split(&items, &[None, Some(Size::Count(8)), None], 3).unwrap();
    assert_eq!((d[0].len(), d[1].len(), d[2].len()), (92, 8, 0));
}

#[test]
fn collate_pads_right_to_the_longest_and_counts_tokens() {
    let a = Encoded {
        ids: vec![5, 6, 7],
        type_ids: vec![0, 0, 0],
        label: Target::Class(1),
    };
    let b = Encoded {
        ids: vec![8],
        type_ids: vec![0],
        label: Target::Class(0),
    };
    let batch = collate(&[&a, &b], 0);
    assert_eq!((batch.batch, batch.len, batch.tokens), (2, 3, 4));
    assert_eq!(batch.input_ids, vec![5, 6, 7, 8, 0, 0]);
    assert_eq!(batch.attention_mask, vec![1, 1, 1, 1, 0, 0]);
    assert_eq!(batch.targets, vec![Target::Class(1), Target::Class(0)]);
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

/// `group_by_length`'s regrouping equals transformers' `get_length_grouped_indices` on the same
/// permutations (`scripts/fixtures/make_length_grouped_fixture.py`): megabatch sizes, the
/// stable longest-first sort and the longest example moved to the front.
#[test]
fn length_grouping_matches_transformers() {
    let text = std::fs::read_to_string(fixtures().join("data/length_grouped.json")).unwrap();
    let fixture: serde_json::Value = serde_json::from_str(&text).unwrap();
    let list = |v: &serde_json::Value| -> Vec<usize> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect()
    };
    let cases = fixture["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 4);
    for case in cases {
        let (lengths, order) = (list(&case["lengths"]), list(&case["order"]));
        let batch = case["batch"].as_u64().unwrap() as usize;
        let got = length_grouped(&order, &lengths, batch);
        assert_eq!(
            got,
            list(&case["grouped"]),
            "{} examples, batch {batch}",
            order.len()
        );
        assert_ne!(got, order, "nothing regrouped");
    }
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// Files pyarrow wrote (`scripts/fixtures/make_data_fixtures.py`): snappy in three row groups, and gzip.
#[test]
fn parquet_from_pyarrow_reads_every_cell() {
    for name in ["reviews.parquet", "reviews-gzip.parquet"] {
        let t = Table::read(&fixtures().join("data").join(name), Encoding::Utf8).unwrap();
        assert_eq!(
            t.columns,
            vec!["text", "label", "label_id", "tags"],
            "{name}"
        );
        assert_eq!(t.rows.len(), 5, "{name}");
        let (line, row) = &t.rows[2];
        assert_eq!(*line, 3);
        assert_eq!(row["text"], "café scenes, great cast");
        assert_eq!(row["label"], "pos");
        assert_eq!(row["label_id"], 1);
        assert_eq!(row["tags"], serde_json::json!(["acting"]));
        assert_eq!(t.rows[4].1["tags"], serde_json::json!([]));

        let labels = Labels::infer(&t, "label").unwrap();
        let ex = examples(&t, &cols(), &labels, LabelKind::Single).unwrap();
        assert_eq!(ex[1].label, Target::Class(0));
        let by_id = Columns {
            label: "label_id".into(),
            ..cols()
        };
        let ids = Labels::infer(&t, "label_id").unwrap();
        assert_eq!(ids.0, vec!["LABEL_0", "LABEL_1"]);
        assert_eq!(
            examples(&t, &by_id, &ids, LabelKind::Single).unwrap()[0].label,
            Target::Class(1)
        );
    }
}

#[test]
fn a_file_that_is_not_parquet_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(&dir, "x.parquet", b"text,label\n");
    let e = Table::read(&p, Encoding::Utf8).unwrap_err();
    assert!(
        e.to_string().contains("x.parquet") && e.to_string().contains("Parquet"),
        "{e}"
    );
}

#[test]
fn multi_label_columns_hold_lists_of_names_or_ids() {
    let t = Table::read(&fixtures().join("data/reviews.parquet"), Encoding::Utf8).unwrap();
    let tags = Columns {
        label: "tags".into(),
        ..cols()
    };
    let labels = Labels::infer(&t, "tags").unwrap();
    assert_eq!(labels.0, vec!["acting", "pace", "story"]);
    let ex = examples(&t, &tags, &labels, LabelKind::Multi).unwrap();
    assert_eq!(ex[0].label, Target::Multi(vec![0, 2]));
    assert_eq!(ex[4].label, Target::Multi(vec![]));
    // lists need the multi-label task, and the multi-label task needs lists
    let e = examples(&t, &tags, &labels, LabelKind::Single).unwrap_err();
    assert!(e.to_string().contains("multi-label-classification"), "{e}");
    let single = Labels::infer(&t, "label").unwrap();
    let e = examples(&t, &cols(), &single, LabelKind::Multi).unwrap_err();
    assert!(
        matches!(&e, DataError::Value { line: 1, .. }) && e.to_string().contains("list"),
        "{e}"
    );
    // ids in JSONL, and an unknown name inside a list is named with its line
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        &dir,
        "m.jsonl",
        b"{\"text\": \"a\", \"label\": [1, 0, 1]}\n{\"text\": \"b\", \"label\": [\"x\"]}\n",
    );
    let t = Table::read(&p, Encoding::Utf8).unwrap();
    let l = Labels(vec!["LABEL_0".into(), "LABEL_1".into()]);
    let e = examples(&t, &cols(), &l, LabelKind::Multi).unwrap_err();
    assert!(matches!(&e, DataError::UnknownLabel { line: 2, .. }), "{e}");
    let p = write(
        &dir,
        "n.jsonl",
        b"{\"text\": \"a\", \"label\": [1, 0, 1]}\n",
    );
    let t = Table::read(&p, Encoding::Utf8).unwrap();
    let ex = examples(&t, &cols(), &l, LabelKind::Multi).unwrap();
    assert_eq!(
        ex[0].label,
        Target::Multi(vec![0, 1]),
        "sorted, deduplicated"
    );
}

/// The tokenization cache returns what tokenizing returns, and any change to the texts or the
/// truncation is a miss.
#[test]
fn tokenization_is_cached_by_content() {
    let cache = std::env::var_os("WHET_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| fixtures().join("../../cache"));
    let tok = whet_text::TextTokenizer::from_folder(&cache.join("minilm"))
        .expect("cache/minilm: run scripts/fetch_assets.sh --only minilm");
    let ex: Vec<Example> = ["a first text", "and a second, longer one with more words"]
        .iter()
        .map(|t| Example {
            text: t.to_string(),
            text_pair: Some("pair".into()),
            label: Target::Class(0),
            origin: "test".into(),
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let plain = tokenize(&tok, &ex, 8, Side::Right).unwrap();
    let (first, hit) = tokenize_cached(&tok, &ex, 8, Side::Right, dir.path()).unwrap();
    assert!(!hit);
    assert_eq!(first, plain);
    assert_eq!(first[1].ids.len(), 8, "truncated to max_length");
    let (second, hit) = tokenize_cached(&tok, &ex, 8, Side::Right, dir.path()).unwrap();
    assert!(hit);
    assert_eq!(second, plain);
    let (_, hit) = tokenize_cached(&tok, &ex, 9, Side::Right, dir.path()).unwrap();
    assert!(!hit, "another max_length");
    let (left, hit) = tokenize_cached(&tok, &ex, 8, Side::Left, dir.path()).unwrap();
    assert!(!hit, "another side");
    assert_ne!(left[1].ids, plain[1].ids);
    let mut changed = ex.clone();
    changed[0].text.push('!');
    let (_, hit) = tokenize_cached(&tok, &changed, 8, Side::Right, dir.path()).unwrap();
    assert!(!hit, "another text");
    // a damaged cache file is ignored
    for f in std::fs::read_dir(dir.path()).unwrap() {
        std::fs::write(f.unwrap().path(), b"WHETTOK1 garbage").unwrap();
    }
    let (again, hit) = tokenize_cached(&tok, &ex, 8, Side::Right, dir.path()).unwrap();
    assert!(!hit);
    assert_eq!(again, plain);
}

#[test]
fn a_stray_integer_label_is_named_not_allocated() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        &dir,
        "ids.jsonl",
        b"{\"text\": \"a\", \"label\": 0}\n{\"text\": \"b\", \"label\": 1}\n\
          {\"text\": \"c\", \"label\": 4000000000}\n{\"text\": \"d\", \"label\": 1}\n",
    );
    let t = Table::read(&p, Encoding::Utf8).unwrap();
    let e = Labels::infer(&t, "label").unwrap_err().to_string();
    assert!(
        e.contains("ids.jsonl:3") && e.contains("4000000000") && e.contains("label_names"),
        "{e}"
    );
    // The same in a multi-label list.
    let p = write(
        &dir,
        "tags.jsonl",
        b"{\"text\": \"a\", \"label\": [0, 1]}\n{\"text\": \"b\", \"label\": [18446744073709551615]}\n",
    );
    let t = Table::read(&p, Encoding::Utf8).unwrap();
    let e = Labels::infer(&t, "label").unwrap_err().to_string();
    assert!(
        e.contains("tags.jsonl:2") && e.contains("18446744073709551615"),
        "{e}"
    );
    // Ids with gaps that still use most of 0..=max are classes, as before.
    let p = write(
        &dir,
        "stars.jsonl",
        b"{\"text\": \"a\", \"label\": 1}\n{\"text\": \"b\", \"label\": 2}\n{\"text\": \"c\", \"label\": 5}\n{\"text\": \"d\", \"label\": 4}\n",
    );
    let t = Table::read(&p, Encoding::Utf8).unwrap();
    assert_eq!(Labels::infer(&t, "label").unwrap().len(), 6);
}

#[test]
fn a_folder_or_a_glob_reads_its_files_as_one_table_and_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("data/more");
    std::fs::create_dir_all(&sub).unwrap();
    std::fs::write(
        dir.path().join("data/train-0.jsonl"),
        b"{\"text\": \"a\", \"label\": \"pos\"}\n\n{\"text\": \"b\", \"label\": \"neg\"}\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("data/train-1.jsonl"),
        b"{\"text\": \"c\", \"label\": \"pos\", \"extra\": 1}\n",
    )
    .unwrap();
    std::fs::write(
        sub.join("train-2.jsonl"),
        b"{\"text\": \"d\", \"label\": 7}\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("data/README.md"), b"# not data\n").unwrap();

    let glob = dir.path().join("data/train-*.jsonl");
    let t = Table::read(&glob, Encoding::Utf8).unwrap();
    let texts: Vec<&str> = t
        .rows
        .iter()
        .map(|r| r.1["text"].as_str().unwrap())
        .collect();
    assert_eq!(
        texts,
        ["a", "b", "c"],
        "`*` stays in one folder, files in name order"
    );
    assert_eq!(t.columns, ["label", "text", "extra"]);
    let labels = Labels::infer(&t, "label").unwrap();
    let ex = examples(&t, &cols(), &labels, LabelKind::Single).unwrap();
    assert!(
        ex[1].origin.ends_with("train-0.jsonl:3"),
        "{}",
        ex[1].origin
    );
    assert!(
        ex[2].origin.ends_with("train-1.jsonl:1"),
        "{}",
        ex[2].origin
    );

    let deep = Table::read(&dir.path().join("data/**/*.jsonl"), Encoding::Utf8).unwrap();
    assert_eq!(deep.rows.len(), 4);
    let folder = Table::read(&dir.path().join("data"), Encoding::Utf8).unwrap();
    assert_eq!(
        folder.rows.len(),
        4,
        "every data file under the folder, README left out"
    );
    // A bad value in the third file is named by that file and its own line.
    let labels = Labels(vec!["neg".into(), "pos".into()]);
    let e = examples(&folder, &cols(), &labels, LabelKind::Single)
        .unwrap_err()
        .to_string();
    assert!(e.contains("train-2.jsonl") && e.contains(":1"), "{e}");

    std::fs::write(dir.path().join("data/train-3.csv"), b"text,label\ne,pos\n").unwrap();
    let e = Table::read(&dir.path().join("data"), Encoding::Utf8)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("several formats") && e.contains("train-3.csv"),
        "{e}"
    );
    let e = Table::read(&dir.path().join("data/valid-*.jsonl"), Encoding::Utf8)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("valid-*.jsonl") && e.contains("no data file matches"),
        "{e}"
    );
    let e = Table::read(std::path::Path::new("hf://models/x/y"), Encoding::Utf8)
        .unwrap_err()
        .to_string();
    assert!(e.contains("hf://datasets/ORG/NAME"), "{e}");
}

/// Planted duplicates are counted exactly: exact ones hidden behind NFKC forms (a ligature,
/// full-width letters, a non-breaking space) and extra whitespace, near ones one word apart,
/// among unrelated sentences that must count as nothing.
#[test]
fn the_leakage_check_counts_planted_duplicates_exactly() {
    use whet_data::leakage::{Text, check};
    let words = [
        "river", "stone", "quiet", "lamp", "orange", "window", "seven", "garden", "cloud",
        "letter", "bright", "table", "winter", "music", "paper", "silver", "forest", "candle",
        "harbor", "mirror", "pocket", "thunder", "velvet", "meadow", "copper", "lantern", "pebble",
        "saddle", "tunnel", "violet",
    ];
    let mut seed = 12345u64;
    let mut sentence = || {
        (0..14)
            .map(|_| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                words[(seed >> 33) as usize % words.len()]
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    let fresh: Vec<String> = (0..80).map(|_| sentence()).collect();
    let text = |split: &str, i: usize, t: &str| Text {
        origin: format!("{split}:{i}"),
        text: t.to_string(),
    };
    // One word changed: most 5-grams survive.
    let near = |t: &str| t.replacen(' ', " and ", 1);
    // Equal after NFKC and whitespace: "ﬁ" is "fi", full-width "ｆｉｎｅ" is "fine".
    let disguise = |t: &str| format!("  {}\u{00a0} ", t.replace(' ', "   "));
    let mut train: Vec<Text> = (0..50).map(|i| text("train", i, &fresh[i])).collect();
    train.push(text("train", 50, &disguise(&fresh[3])));
    train.push(text("train", 51, &fresh[4]));
    train.push(text("train", 52, &near(&fresh[5])));
    train.push(text("train", 53, "a ﬁne ｆｉｎｅ day"));
    train.push(text("train", 54, "a fine fine day"));
    let mut validation: Vec<Text> = (50..70).map(|i| text("validation", i, &fresh[i])).collect();
    for (k, i) in [10, 11, 12, 13].iter().enumerate() {
        validation.push(text("validation", 100 + k, &disguise(&fresh[*i])));
    }
    for (k, i) in [20, 21, 22].iter().enumerate() {
        validation.push(text("validation", 200 + k, &near(&fresh[*i])));
    }
    let mut test: Vec<Text> = (70..80).map(|i| text("test", i, &fresh[i])).collect();
    test.push(text("test", 100, &fresh[55]));
    test.push(text("test", 101, &near(&fresh[30])));
    let report = check(&[("train", train), ("validation", validation), ("test", test)]);
    let counts: Vec<(String, String, usize, usize)> = report
        .findings
        .iter()
        .map(|f| (f.split.clone(), f.of.clone(), f.exact, f.near))
        .collect();
    assert_eq!(
        counts,
        [
            ("train".into(), "train".into(), 3, 1),
            ("validation".into(), "train".into(), 4, 3),
            ("test".into(), "train".into(), 0, 1),
            ("test".into(), "validation".into(), 1, 0),
        ]
    );
    assert!(report.leaks());
    let v = &report.findings[1];
    assert!(
        v.examples
            .iter()
            .any(|(row, of, sim)| row == "validation:100" && of == "train:10" && *sim == 1.0)
    );
    assert!(v.examples.iter().all(|(_, _, sim)| *sim >= 0.8));
    let lines = report.lines().join("\n");
    assert!(
        lines.contains("validation rows found in train: 4 exact, 3 near"),
        "{lines}"
    );

    // Unrelated splits: nothing.
    let clean = check(&[
        (
            "train",
            (0..40).map(|i| text("train", i, &fresh[i])).collect(),
        ),
        (
            "validation",
            (40..80).map(|i| text("validation", i, &fresh[i])).collect(),
        ),
    ]);
    assert!(!clean.leaks());
    assert!(
        clean.findings.iter().all(|f| f.exact + f.near == 0),
        "{:?}",
        clean.findings
    );
}

/// A `.json` file may be one JSON array of rows, as `datasets`' `json` loader reads it
/// (`alpaca_data.json`): rows keep the line their object starts on; a compact array numbers
/// them; a non-object element and a file that is one object holding its rows are named.
#[test]
fn a_json_array_of_rows_reads_as_json_lines_do() {
    let dir = tempfile::tempdir().unwrap();
    let pretty = write(
        &dir,
        "pretty.json",
        "\u{feff}[\n  {\n    \"text\": \"a, [b] {c}\",\n    \"label\": \"pos\"\n  },\n  {\"text\": \"d \\\" e\", \"label\": \"neg\", \"extra\": 1}\n]\n"
            .as_bytes(),
    );
    let t = Table::read(&pretty, Encoding::Utf8).unwrap();
    assert_eq!(t.columns, vec!["label", "text", "extra"]);
    let lines: Vec<usize> = t.rows.iter().map(|r| r.0).collect();
    assert_eq!(lines, vec![2, 6], "the line each object starts on");
    assert_eq!(t.rows[1].1["text"], "d \" e");
    let labels = Labels::infer(&t, "label").unwrap();
    let ex = examples(&t, &cols(), &labels, LabelKind::Single).unwrap();
    assert_eq!(ex[0].origin, format!("{}:2", pretty.display()));

    let compact = write(
        &dir,
        "compact.json",
        b"[{\"text\": \"a\", \"label\": 0}, {\"text\": \"b\", \"label\": 1}]",
    );
    let t = Table::read(&compact, Encoding::Utf8).unwrap();
    assert_eq!(t.rows.iter().map(|r| r.0).collect::<Vec<_>>(), vec![1, 2]);

    let bad = write(&dir, "bad.json", b"[\n{\"text\": \"a\"},\n\"b\"\n]");
    let e = Table::read(&bad, Encoding::Utf8).unwrap_err();
    assert!(
        matches!(&e, DataError::Json { line: 3, .. }) && e.to_string().contains("element 2"),
        "{e}"
    );
    let broken = write(
        &dir,
        "broken.json",
        b"[\n{\"text\": \"a\"},\n{\"text\": }\n]",
    );
    let e = Table::read(&broken, Encoding::Utf8).unwrap_err();
    assert!(matches!(&e, DataError::Json { line: 3, .. }), "{e}");

    // Rows under "data" (run_qa.py's field="data"), each at the line it starts on.
    let nested = write(
        &dir,
        "squad.json",
        b"{\n  \"version\": \"1.1\",\n  \"notes\": [\"a\", \"b\"],\n  \"data\": [\n    {\"title\": \"x\"},\n\n    {\"title\": \"y [z]\"}\n  ]\n}\n",
    );
    let t = Table::read(&nested, Encoding::Utf8).unwrap();
    assert_eq!(t.columns, vec!["title"]);
    assert_eq!(t.rows.iter().map(|r| r.0).collect::<Vec<_>>(), vec![5, 7]);
    let other = write(
        &dir,
        "other.json",
        b"{\n  \"version\": \"1.1\",\n  \"rows\": [{\"title\": \"x\"}]\n}\n",
    );
    let e = Table::read(&other, Encoding::Utf8).unwrap_err().to_string();
    assert!(
        e.contains("other.json") && e.contains("fields: rows, version"),
        "{e}"
    );
    // One object on one line is a JSON Lines file of one row, as datasets reads it.
    let one = write(&dir, "one.json", b"{\"text\": \"a\", \"label\": 0}\n");
    assert_eq!(Table::read(&one, Encoding::Utf8).unwrap().rows.len(), 1);
}

/// Real-valued labels are what run_glue.py takes as regression: numbers with a fraction in
/// JSON, or text that parses as one in CSV; integers alone stay class ids; each row's target is
/// its number, and a label that is not one is named with its line.
#[test]
fn real_valued_labels_are_regression_targets() {
    let dir = tempfile::tempdir().unwrap();
    let csv = write(
        &dir,
        "stsb.csv",
        b"sentence1,sentence2,label\na,b,3.8\nc,d,0\ne,f, 2.5e0\n",
    );
    let t = Table::read(&csv, Encoding::Utf8).unwrap();
    assert!(real_valued(&t, "label"));
    let pair = Columns {
        text: "sentence1".into(),
        text_pair: Some("sentence2".into()),
        label: "label".into(),
    };
    let ex = examples(&t, &pair, &Labels(vec!["LABEL_0".into()]), LabelKind::Real).unwrap();
    let targets: Vec<Target> = ex.iter().map(|e| e.label.clone()).collect();
    assert_eq!(
        targets,
        vec![Target::Value(3.8), Target::Value(0.0), Target::Value(2.5)]
    );
    assert_eq!(ex[0].text_pair.as_deref(), Some("b"));

    let ints = write(&dir, "ints.csv", b"text,label\na,0\nb,1\n");
    assert!(!real_valued(
        &Table::read(&ints, Encoding::Utf8).unwrap(),
        "label"
    ));
    let names = write(&dir, "names.csv", b"text,label\na,0.5\nb,pos\n");
    assert!(!real_valued(
        &Table::read(&names, Encoding::Utf8).unwrap(),
        "label"
    ));
    let json = write(
        &dir,
        "j.jsonl",
        b"{\"text\": \"a\", \"label\": 1}\n{\"text\": \"b\", \"label\": 4.0}\n",
    );
    let t = Table::read(&json, Encoding::Utf8).unwrap();
    assert!(real_valued(&t, "label"), "4.0 is a float in JSON");
    let json_ints = write(&dir, "k.jsonl", b"{\"text\": \"a\", \"label\": 1}\n");
    assert!(!real_valued(
        &Table::read(&json_ints, Encoding::Utf8).unwrap(),
        "label"
    ));

    // A missing cell does not make the column text (pandas reads it as NaN in a float column):
    // the column is real-valued and the empty label is an error naming its line.
    let text = write(&dir, "text.csv", b"text,label\na,0.5\nb,\nc,x1\n");
    assert!(
        !real_valued(&Table::read(&text, Encoding::Utf8).unwrap(), "label"),
        "x1 is text"
    );
    let one = Labels(vec!["LABEL_0".into()]);
    let missing = write(&dir, "missing.csv", b"text,label\na,0.5\nb,\n");
    let t = Table::read(&missing, Encoding::Utf8).unwrap();
    assert!(real_valued(&t, "label"));
    let e = examples(&t, &cols(), &one, LabelKind::Real).unwrap_err();
    assert!(
        matches!(&e, DataError::Value { line: 3, .. }) && e.to_string().contains("label is empty"),
        "{e}"
    );
    let inf = write(
        &dir,
        "inf.jsonl",
        b"{\"text\": \"a\", \"label\": \"inf\"}\n",
    );
    let t = Table::read(&inf, Encoding::Utf8).unwrap();
    let e = examples(&t, &cols(), &one, LabelKind::Real).unwrap_err();
    assert!(e.to_string().contains("finite number"), "{e}");
}

/// A Parquet file `datasets` wrote keeps its ClassLabel names in the schema metadata: the
/// labels are those names in their order (ids index them), for a single label and a list of
/// them; a float64 column of integral values is real-valued, as its type says.
#[test]
fn class_label_names_come_from_the_datasets_parquet_metadata() {
    let t = Table::read(
        &fixtures().join("data/reviews-classlabel.parquet"),
        Encoding::Utf8,
    )
    .unwrap();
    assert_eq!(t.class_names["label"], vec!["neg", "pos"]);
    let labels = Labels::infer(&t, "label").unwrap();
    assert_eq!(labels.0, vec!["neg", "pos"]);
    let ex = examples(&t, &cols(), &labels, LabelKind::Single).unwrap();
    assert_eq!(
        ex.iter().map(|e| e.label.clone()).collect::<Vec<_>>(),
        vec![
            Target::Class(1),
            Target::Class(0),
            Target::Class(1),
            Target::Class(0),
            Target::Class(0)
        ]
    );
    let tags = Labels::infer(&t, "tags").unwrap();
    assert_eq!(tags.0, vec!["acting", "pace", "story"]);
    let by_tags = Columns {
        label: "tags".into(),
        ..cols()
    };
    let ex = examples(&t, &by_tags, &tags, LabelKind::Multi).unwrap();
    assert_eq!(ex[0].label, Target::Multi(vec![0, 2]));
    assert!(real_valued(&t, "score"), "float64 is real-valued");
    assert!(!real_valued(&t, "label"));
    // pyarrow's own files carry no such names.
    let plain = Table::read(&fixtures().join("data/reviews.parquet"), Encoding::Utf8).unwrap();
    assert!(plain.class_names.is_empty());
}

/// Boolean labels are the classes "false" (0) and "true" (1), as datasets sorts them.
#[test]
fn boolean_labels_are_two_classes() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        &dir,
        "b.jsonl",
        b"{\"text\": \"a\", \"label\": true}\n{\"text\": \"b\", \"label\": false}\n",
    );
    let t = Table::read(&p, Encoding::Utf8).unwrap();
    let labels = Labels::infer(&t, "label").unwrap();
    assert_eq!(labels.0, vec!["false", "true"]);
    let ex = examples(&t, &cols(), &labels, LabelKind::Single).unwrap();
    assert_eq!(ex[0].label, Target::Class(1));
    assert_eq!(ex[1].label, Target::Class(0));
}

/// Integer labels in a CSV file are class ids, as pandas reads them: label 10 is id 10 (not
/// the text "10" sorted between "1" and "2"), and the model's labels are LABEL_i.
#[test]
fn integer_labels_in_csv_are_class_ids() {
    let dir = tempfile::tempdir().unwrap();
    let mut rows = String::from("text,label\n");
    for i in 0..12 {
        rows += &format!("t{i},{i}\n");
    }
    let p = write(&dir, "ints.csv", rows.as_bytes());
    let t = Table::read(&p, Encoding::Utf8).unwrap();
    let labels = Labels::infer(&t, "label").unwrap();
    assert_eq!(labels.len(), 12);
    assert_eq!(labels.0[10], "LABEL_10");
    let ex = examples(&t, &cols(), &labels, LabelKind::Single).unwrap();
    for (i, e) in ex.iter().enumerate() {
        assert_eq!(e.label, Target::Class(i), "{}", e.origin);
    }
    // Text that is not all numbers stays names, sorted.
    let p = write(&dir, "mixed.csv", b"text,label\na,2\nb,10\nc,x\n");
    let labels = Labels::infer(&Table::read(&p, Encoding::Utf8).unwrap(), "label").unwrap();
    assert_eq!(labels.0, vec!["10", "2", "x"]);
}

/// gzip-compressed data files read as their format (`datasets` decompresses them too), alone
/// or mixed with plain files of the same format in a folder; other archives are named.
#[test]
fn gzip_compressed_data_files_read_as_their_format() {
    use std::io::Write;
    let gz = |text: &str| {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(text.as_bytes()).unwrap();
        e.finish().unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("data")).unwrap();
    // Two gzip members, as `cat a.gz b.gz` makes: both are read.
    let mut two = gz("{\"text\": \"a\", \"label\": \"pos\"}\n");
    two.extend(gz("{\"text\": \"b\", \"label\": \"neg\"}\n"));
    let p = dir.path().join("data/train.jsonl.gz");
    std::fs::write(&p, two).unwrap();
    assert!(whet_data::table::is_data_file("train.jsonl.gz"));
    assert!(whet_data::table::is_data_file("x.CSV.GZ"));
    let t = Table::read(&p, Encoding::Utf8).unwrap();
    assert_eq!(t.rows.len(), 2);
    assert_eq!(t.rows[1].1["text"], "b");
    std::fs::write(
        dir.path().join("data/more.jsonl"),
        "{\"text\": \"c\", \"label\": \"pos\"}\n",
    )
    .unwrap();
    let folder = Table::read(&dir.path().join("data"), Encoding::Utf8).unwrap();
    assert_eq!(folder.rows.len(), 3);
    let csv = dir.path().join("t.csv.gz");
    std::fs::write(&csv, gz("text,label\nx,1\n")).unwrap();
    assert_eq!(
        Table::read(&csv, Encoding::Utf8).unwrap().columns,
        vec!["text", "label"]
    );
    let broken = dir.path().join("broken.jsonl.gz");
    std::fs::write(&broken, b"not gzip").unwrap();
    let e = Table::read(&broken, Encoding::Utf8)
        .unwrap_err()
        .to_string();
    assert!(e.contains("broken.jsonl.gz") && e.contains("gzip"), "{e}");
    let bz = dir.path().join("t.csv.bz2");
    std::fs::write(&bz, b"BZh").unwrap();
    let e = Table::read(&bz, Encoding::Utf8).unwrap_err().to_string();
    assert!(e.contains("t.csv.bz2") && e.contains(".bz2 archive"), "{e}");
}

/// A folder of split files, as `datasets` names splits (`data/train-00000-of-00002.parquet`,
/// `test/...`): each split's files get a path that matches exactly them, and reading the folder
/// as one table is refused, naming the splits and those paths.
#[test]
fn a_folder_of_split_files_is_its_splits_not_one_table() {
    use whet_data::table::{split_of, split_sources};
    assert_eq!(split_of("data/train-00000-of-00002.parquet"), Some("train"));
    assert_eq!(split_of("dev.jsonl"), Some("validation"));
    assert_eq!(split_of("test/part_0.csv"), Some("test"));
    assert_eq!(
        split_of("contest.jsonl"),
        None,
        "a keyword inside a word is none"
    );
    assert_eq!(split_of("trainset.jsonl"), None);
    let dir = tempfile::tempdir().unwrap();
    let row = b"{\"text\": \"a\", \"label\": \"x\"}\n";
    for f in [
        "data/train-00000-of-00002.jsonl",
        "data/train-00001-of-00002.jsonl",
        "data/validation-00000-of-00001.jsonl",
        "data/test-00000-of-00001.jsonl",
    ] {
        let p = dir.path().join(f);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, row).unwrap();
    }
    let root = dir.path().display().to_string();
    let sources = split_sources(dir.path()).unwrap().unwrap();
    assert_eq!(sources["train"], format!("{root}/data/train*.jsonl"));
    assert_eq!(
        sources["test"],
        format!("{root}/data/test-00000-of-00001.jsonl")
    );
    let train = Table::read(Path::new(&sources["train"]), Encoding::Utf8).unwrap();
    assert_eq!(train.rows.len(), 2);
    let e = Table::read(dir.path(), Encoding::Utf8)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("several splits")
            && e.contains("train: data/train-00000-of-00002.jsonl and 1 more")
            && e.contains(&format!("train = \"{root}/data/train*.jsonl\"")),
        "{e}"
    );
    // Splits as folders.
    let dir = tempfile::tempdir().unwrap();
    for f in [
        "train/a.jsonl",
        "train/b.jsonl",
        "test/c.jsonl",
        "README.md",
    ] {
        let p = dir.path().join(f);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, row).unwrap();
    }
    let sources = split_sources(dir.path()).unwrap().unwrap();
    assert_eq!(
        sources["train"],
        format!("{}/train/*.jsonl", dir.path().display())
    );
    // A folder whose names say no split, or one split, reads as one table.
    let dir = tempfile::tempdir().unwrap();
    for f in ["a.jsonl", "b.jsonl"] {
        std::fs::write(dir.path().join(f), row).unwrap();
    }
    assert!(split_sources(dir.path()).unwrap().is_none());
    assert_eq!(
        Table::read(dir.path(), Encoding::Utf8).unwrap().rows.len(),
        2
    );
}
