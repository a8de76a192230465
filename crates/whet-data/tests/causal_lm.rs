//! Language-modelling data: templates, chat rendering and assistant masks against
//! `transformers` (`tests/fixtures/lm/`, from `scripts/fixtures/make_lm_fixtures.py`), blocks and packing.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::{Value, json};
use whet_data::*;
use whet_text::{ChatMessage, TextTokenizer};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn smollm2() -> TextTokenizer {
    let cache = std::env::var_os("WHET_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("cache"));
    TextTokenizer::open(&cache.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
        .expect("cache/smollm2: run scripts/fetch_assets.sh --only smollm2")
}

fn row(v: Value) -> BTreeMap<String, Value> {
    v.as_object().unwrap().clone().into_iter().collect()
}

#[test]
fn templates_fill_fields_and_name_a_missing_one() {
    let t = Template {
        prompt: "Q: {question} {{literal}}\nA: ".into(),
        completion: "{answer}".into(),
    };
    let (p, c) = t
        .render(&row(json!({"question": "2+2?", "answer": 4})), "f.jsonl:3")
        .unwrap();
    assert_eq!((p.as_str(), c.as_str()), ("Q: 2+2? {literal}\nA: ", "4"));
    let e = t
        .render(&row(json!({"question": "2+2?"})), "f.jsonl:3")
        .unwrap_err();
    assert!(
        e.to_string().contains("f.jsonl:3") && e.to_string().contains("{answer}"),
        "{e}"
    );
    // Alpaca picks its input section per row
    let a = Template::alpaca();
    let (with, _) = a
        .render(
            &row(json!({"instruction": "Add", "input": "2 and 3", "output": "5"})),
            "x",
        )
        .unwrap();
    assert!(
        with.contains("### Input:\n2 and 3\n\n### Response:\n"),
        "{with}"
    );
    assert!(with.contains("paired with an input"), "{with}");
    let (without, out) = a
        .render(
            &row(json!({"instruction": "Say hi", "input": "", "output": "hi"})),
            "x",
        )
        .unwrap();
    assert!(!without.contains("### Input") && without.ends_with("### Response:\n"));
    assert_eq!(out, "hi");
}

#[test]
fn prompt_completion_learns_only_the_completion_and_eos() {
    let tok = smollm2();
    let ex = prompt_completion(
        &tok,
        "Q: 2+2?\nA: ",
        "4",
        false,
        Limit::new(64, TooLong::Error),
        "t:1",
    )
    .unwrap()
    .unwrap();
    let p = tok.encode("Q: 2+2?\nA: ", true).unwrap();
    let c = tok.encode("4", false).unwrap();
    let eos = tok.eos.as_ref().unwrap().id;
    assert_eq!(ex.ids, [p.clone(), c.clone(), vec![eos]].concat());
    assert!(ex.labels[..p.len()].iter().all(|&l| l == IGNORE));
    assert_eq!(ex.labels[p.len()..], [c[0] as i64, eos as i64]);
    assert_eq!(ex.target_tokens(), c.len() + 1);
    let all = prompt_completion(
        &tok,
        "Q: 2+2?\nA: ",
        "4",
        true,
        Limit::new(64, TooLong::Error),
        "t:1",
    )
    .unwrap()
    .unwrap();
    assert_eq!(all.target_tokens(), all.ids.len());
    // too long: an error naming the example, a skip, or a cut
    let e = prompt_completion(
        &tok,
        "Q: 2+2?\nA: ",
        "4",
        false,
        Limit::new(3, TooLong::Error),
        "t:9",
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("t:9") && e.to_string().contains("max_length = 3"),
        "{e}"
    );
    assert!(
        prompt_completion(
            &tok,
            "Q: 2+2?\nA: ",
            "4",
            false,
            Limit::new(3, TooLong::Skip),
            "t:9"
        )
        .unwrap()
        .is_none()
    );
    let cut = prompt_completion(
        &tok,
        "Q: 2+2?\nA: ",
        "4",
        false,
        Limit::new(3, TooLong::Truncate),
        "t:9",
    )
    .unwrap()
    .unwrap();
    assert_eq!(cut.ids.len(), 3);
    // truncation_side = "left" keeps the end: the completion and EOS survive.
    let whole = prompt_completion(
        &tok,
        "Q: 2+2?\nA: ",
        "4",
        false,
        Limit::new(64, TooLong::Error),
        "t:9",
    )
    .unwrap()
    .unwrap();
    let left = Limit {
        side: Side::Left,
        ..Limit::new(3, TooLong::Truncate)
    };
    let end = prompt_completion(&tok, "Q: 2+2?\nA: ", "4", false, left, "t:9")
        .unwrap()
        .unwrap();
    assert_eq!(end.ids, whole.ids[whole.ids.len() - 3..]);
    assert_eq!(end.labels, whole.labels[whole.labels.len() - 3..]);
    assert_eq!(end.position_ids, vec![0, 1, 2]);
    assert_ne!(end.ids, cut.ids);
}

/// The rendered conversation and its tokens equal `apply_chat_template`'s; exactly the
/// assistant turns (text + `<|im_end|>` + newline) are learnt.
#[test]
fn chat_matches_apply_chat_template_and_masks_all_but_assistant_turns() {
    let tok = smollm2();
    let fixture: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/lm/smollm2-chat.json")).unwrap(),
    )
    .unwrap();
    for case in fixture["cases"].as_array().unwrap() {
        let messages: Vec<ChatMessage> = serde_json::from_value(case["messages"].clone()).unwrap();
        let text = case["text"].as_str().unwrap();
        assert_eq!(tok.apply_chat_template(&messages, false).unwrap(), text);
        let ex = chat(
            &tok,
            &messages,
            false,
            Limit::new(512, TooLong::Error),
            "c:1",
        )
        .unwrap()
        .unwrap();
        let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(ex.ids, want);
        // Decode the learnt tokens: exactly the assistant replies with their end of turn.
        let learnt: Vec<u32> = ex
            .labels
            .iter()
            .filter(|&&l| l != IGNORE)
            .map(|&l| l as u32)
            .collect();
        let expected: String = messages
            .iter()
            .filter(|m| m.role == "assistant")
            .map(|m| format!("{}<|im_end|>\n", m.content))
            .collect();
        assert_eq!(tok.decode(&learnt, false).unwrap(), expected);
        let prefixes = case["assistant_prefixes"].as_array().unwrap();
        assert_eq!(
            prefixes.len(),
            messages.iter().filter(|m| m.role == "assistant").count()
        );
        for p in prefixes {
            assert!(text.starts_with(p.as_str().unwrap()));
        }
    }
    let no_reply = vec![ChatMessage {
        role: "user".into(),
        content: "hi".into(),
    }];
    let e = chat(
        &tok,
        &no_reply,
        false,
        Limit::new(512, TooLong::Error),
        "c:7",
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("c:7") && e.to_string().contains("no assistant turn"),
        "{e}"
    );
}

#[test]
fn blocks_drop_the_remainder_and_packing_restarts_positions() {
    let docs = vec![vec![1, 2, 3], vec![4, 5, 6, 7], vec![8]];
    let blocks = group_texts(&docs, 3);
    assert_eq!(blocks.len(), 2);
    assert_eq!(blocks[1].ids, vec![4, 5, 6]);
    assert_eq!(blocks[1].labels, vec![4, 5, 6]);

    let ex = |ids: Vec<u32>| LmExample {
        labels: ids.iter().map(|&t| t as i64).collect(),
        position_ids: (0..ids.len() as u32).collect(),
        document_ids: vec![0; ids.len()],
        origin: format!("{ids:?}"),
        ids,
    };
    let rows = pack(
        &[ex(vec![1, 2]), ex(vec![3, 4, 5]), ex(vec![6, 7, 8, 9])],
        5,
    );
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].ids, vec![1, 2, 3, 4, 5]);
    assert_eq!(rows[0].position_ids, vec![0, 1, 0, 1, 2]);
    assert_eq!(rows[0].document_ids, vec![0, 0, 1, 1, 1]);
    assert_eq!(
        rows[0].labels,
        vec![1, 2, IGNORE, 4, 5],
        "no learning across documents"
    );
    assert_eq!(rows[1].ids, vec![6, 7, 8, 9]);
}

/// A chat template that fails (an unknown filter, or the template's own `raise_exception`)
/// and a tokenizer without one are errors naming the example.
#[test]
fn chat_templates_that_fail_are_named() {
    let mut tok = smollm2();
    let messages = vec![
        ChatMessage {
            role: "user".into(),
            content: "hi".into(),
        },
        ChatMessage {
            role: "assistant".into(),
            content: "hello".into(),
        },
    ];
    for (template, needle) in [
        (
            "{% for m in messages %}{{ m.content | nosuchfilter }}{% endfor %}",
            "nosuchfilter",
        ),
        (
            "{{ raise_exception('roles must alternate') }}",
            "roles must alternate",
        ),
    ] {
        tok.chat_template = Some(template.into());
        let e = chat(
            &tok,
            &messages,
            false,
            Limit::new(512, TooLong::Error),
            "chats.jsonl:4",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("chats.jsonl:4") && e.contains(needle), "{e}");
    }
    tok.chat_template = None;
    let e = chat(
        &tok,
        &messages,
        false,
        Limit::new(512, TooLong::Error),
        "chats.jsonl:4",
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("chats.jsonl:4") && e.contains("chat template"),
        "{e}"
    );
}

/// The ids and labels equal those trl's own `SFTTrainer` prepares on SmolLM2
/// (scripts/fixtures/make_sft_mask_fixture.py): with a conversational prompt and completion only the
/// completion is learnt, whatever assistant turns (few-shot answers) the prompt holds; with
/// messages alone every assistant turn (`assistant_only_loss`).
#[test]
fn chat_masks_equal_trls_sft_trainer() {
    let tok = smollm2();
    let fixture: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/lm/smollm2-sft-masks.json")).unwrap(),
    )
    .unwrap();
    let msgs = |v: &Value| -> Vec<ChatMessage> { serde_json::from_value(v.clone()).unwrap() };
    let limit = Limit::new(1024, TooLong::Error);
    let mut kinds = (0, 0);
    for (i, case) in fixture["cases"].as_array().unwrap().iter().enumerate() {
        let ex = match case["kind"].as_str().unwrap() {
            "prompt_completion" => {
                kinds.0 += 1;
                let prompt = msgs(&case["prompt"]);
                assert!(prompt.iter().any(|m| m.role == "assistant") || i >= 3);
                chat_completion(&tok, &prompt, &msgs(&case["completion"]), false, limit, "c")
            }
            _ => {
                kinds.1 += 1;
                chat(&tok, &msgs(&case["messages"]), false, limit, "c")
            }
        }
        .unwrap()
        .unwrap();
        let ids: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
        let labels: Vec<i64> = serde_json::from_value(case["labels"].clone()).unwrap();
        assert_eq!(ex.ids, ids, "case {i}");
        assert_eq!(ex.labels, labels, "case {i}");
    }
    assert_eq!(kinds, (6, 3));
}

/// Conversational preference pairs (prompt, chosen and rejected as lists of messages) render
/// to the texts trl's own `maybe_apply_chat_template` gives on SmolLM2
/// (scripts/fixtures/make_chat_preference_fixture.py): an explicit prompt with the generation
/// prompt and each answer after it, with a system turn and a few-shot exchange inside the
/// prompt, and implicit prompts rendered whole (taken out by turns, as trl's trainers do). A prompt ending with an assistant turn is
/// refused, naming the row.
#[test]
fn chat_preferences_render_as_trls() {
    let tok = smollm2();
    let fixture: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/lm/smollm2-chat-preferences.json"))
            .unwrap(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (i, case) in fixture["cases"].as_array().unwrap().iter().enumerate() {
        let path = dir.path().join(format!("p{i}.jsonl"));
        std::fs::write(&path, format!("{}\n", case["row"])).unwrap();
        let pairs = read_pairs(&path, Encoding::Utf8).unwrap();
        assert!(pairs[0].messages.is_some(), "case {i} read as text");
        let got = preference::render_chats(pairs, &tok).unwrap();
        let s = |k: &str| case[k].as_str().unwrap();
        if s("prompt").is_empty() {
            // An implicit prompt: trl's trainers take it out by turns before tokenizing
            // (checked to the token in whet-train's `dpo::chat_pairs_...`); the texts still
            // make the whole conversations maybe_apply_chat_template renders.
            let (c, r) = got[0].texts();
            assert_eq!(
                (c.as_str(), r.as_str()),
                (s("chosen"), s("rejected")),
                "case {i}"
            );
            assert!(
                got[0].prompt.ends_with("<|im_start|>assistant\n"),
                "case {i}"
            );
        } else {
            assert_eq!(got[0].prompt, s("prompt"), "case {i} prompt");
            assert_eq!(got[0].chosen, s("chosen"), "case {i} chosen");
            assert_eq!(got[0].rejected, s("rejected"), "case {i} rejected");
        }
        assert!(
            got[0].is_chat(),
            "the encoders tokenize it as a conversation"
        );
    }
    let path = dir.path().join("bad.jsonl");
    let row = json!({"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                     "chosen": [{"role": "assistant", "content": "c"}],
                     "rejected": [{"role": "assistant", "content": "d"}]});
    std::fs::write(&path, format!("{row}\n")).unwrap();
    let e = preference::render_chats(read_pairs(&path, Encoding::Utf8).unwrap(), &tok)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("bad.jsonl:1") && e.contains("assistant turn"),
        "{e}"
    );
    let row = json!({"prompt": "text", "chosen": [{"role": "assistant", "content": "c"}],
                     "rejected": [{"role": "assistant"}]});
    std::fs::write(&path, format!("{row}\n")).unwrap();
    let e = read_pairs(&path, Encoding::Utf8).unwrap_err().to_string();
    assert!(e.contains("bad.jsonl") && e.contains("prompt"), "{e}");
}
