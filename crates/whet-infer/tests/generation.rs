//! Greedy generation with a repetition penalty, stop strings and few-shot prompts, set up as
//! `whet generate --repetition-penalty / --stop / --few-shot` sets it up
//! (`crates/whet/src/main.rs`), gives the token ids of transformers' `generate` on SmolLM2
//! (`tests/fixtures/generation`, from `scripts/fixtures/make_generation_fixture.py`; needs
//! cache/smollm2).

use std::path::{Path, PathBuf};

use whet_infer::{GenerationConfig, generate, generate_batch, stop_end};
use whet_models::{ChatMessage, Checkpoint, TextTokenizer};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/generation")
}

/// SmolLM2 from the asset cache (`WHET_CACHE`, else the repository's `cache/`).
fn smollm2() -> PathBuf {
    let cache = std::env::var_os("WHET_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../cache"));
    let p = cache.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch_assets.sh --only smollm2",
        p.display()
    );
    p
}

/// One case of `smollm2.txt`.
#[derive(Debug, Default)]
struct Case {
    name: String,
    max_new_tokens: usize,
    repetition_penalty: f32,
    stop: Vec<String>,
    prompt: String,
    few_shot: Option<String>,
    chat: bool,
    messages: Vec<ChatMessage>,
    prompt_ids: Vec<u32>,
    new_ids: Vec<u32>,
    /// transformers' `decode(new_ids, skip_special_tokens=True)`.
    text: String,
    stopped_by: String,
}

/// Undoes the fixture's escapes (`\\`, `\n`, `\t`, `\r`).
fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        out.push(match chars.next() {
            Some('n') => '\n',
            Some('t') => '\t',
            Some('r') => '\r',
            Some('\\') => '\\',
            other => panic!("bad escape \\{other:?} in {s:?}"),
        });
    }
    out
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(fixtures().join("smollm2.txt")).unwrap();
    let ids = |v: &str| -> Vec<u32> { v.split(' ').map(|t| t.parse().unwrap()).collect() };
    let mut cases: Vec<Case> = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (key, value) = line.split_once(' ').unwrap_or((line, ""));
        if key == "case" {
            cases.push(Case {
                name: value.into(),
                ..Case::default()
            });
            continue;
        }
        let c = cases.last_mut().expect("a case line first");
        match key {
            "max_new_tokens" => c.max_new_tokens = value.parse().unwrap(),
            "repetition_penalty" => c.repetition_penalty = value.parse().unwrap(),
            "stop" => c.stop.push(unescape(value)),
            "prompt" => c.prompt = unescape(value),
            "few_shot" => c.few_shot = (value != "-").then(|| value.to_string()),
            "chat" => c.chat = value == "1",
            "message" => {
                let (role, content) = value.split_once(' ').unwrap();
                c.messages.push(ChatMessage {
                    role: role.into(),
                    content: unescape(content),
                });
            }
            "prompt_ids" => c.prompt_ids = ids(value),
            "new_ids" => c.new_ids = ids(value),
            "text" => c.text = unescape(value),
            "stopped_by" => c.stopped_by = value.into(),
            "min_gap" => {}
            other => panic!("unknown key {other}"),
        }
    }
    cases
}

/// The prompt ids as the CLI builds them: a plain prompt after the few-shot file's text (a
/// newline added when missing); a chat prompt through the chat template, the few-shot file's
/// exchanges first (the fixture lists the messages the CLI makes of `few_shot.jsonl`).
fn cli_prompt(case: &Case, tok: &TextTokenizer) -> Vec<u32> {
    if case.chat {
        assert_eq!(case.messages.last().unwrap().content, case.prompt);
        assert_eq!(
            case.messages.len(),
            if case.few_shot.is_some() { 5 } else { 1 },
            "{}: the few-shot file holds two exchanges",
            case.name
        );
        let text = tok.apply_chat_template(&case.messages, true).unwrap();
        return tok.encode(&text, false).unwrap();
    }
    let mut shots = case
        .few_shot
        .as_ref()
        .map(|f| std::fs::read_to_string(fixtures().join(f)).unwrap())
        .unwrap_or_default();
    if !shots.is_empty() && !shots.ends_with('\n') {
        shots.push('\n');
    }
    tok.encode(&format!("{shots}{}", case.prompt), true)
        .unwrap()
}

#[test]
fn greedy_with_penalty_stop_strings_and_few_shot_equals_transformers() {
    let ckpt = Checkpoint::open(smollm2()).unwrap();
    let tok = ckpt.tokenizer().unwrap();
    let device = whet_models::device::for_tests();
    let mut eos = ckpt.eos_token_ids();
    eos.extend(tok.eos.as_ref().map(|e| e.id));
    assert!(eos.contains(&2), "<|im_end|> ends SmolLM2's turns: {eos:?}");
    let cases = cases();
    assert_eq!(cases.len(), 10);
    let mut trimmed = 0;
    // f32 weights, and (as `whet generate` loads the GGUF on a CPU with AVX-512) the layers
    // read from their Q4_1 / Q8_0 blocks by each step: the same tokens as transformers.
    let models = [
        ckpt.load_causal_lm(&device).unwrap(),
        ckpt.load_causal_lm_for_generation(&device).unwrap(),
    ];
    for (model, case) in models
        .iter()
        .flat_map(|m| cases.iter().map(move |c| (m, c)))
    {
        let prompt = cli_prompt(case, &tok);
        assert_eq!(prompt, case.prompt_ids, "{}: prompt ids", case.name);
        let config = GenerationConfig {
            repetition_penalty: case.repetition_penalty,
            ..GenerationConfig::greedy(case.max_new_tokens, eos.clone())
        };
        // The CLI's stop: decode as the tokens come, stop at the token after which a stop
        // string ends in the generated text (it may begin in the prompt), print up to the end
        // of that string.
        let context = tok.inner.decode(&prompt, false).unwrap();
        let mut stream = tok.inner.decode_stream(true);
        let mut generated = String::new();
        let mut printed = None;
        let new = generate(model, &prompt, &config, &device, |t| {
            if eos.contains(&t) {
                return true;
            }
            let Ok(Some(piece)) = stream.step(t) else {
                return true;
            };
            generated.push_str(&piece);
            printed = stop_end(&context, &generated, &case.stop);
            printed.is_none()
        })
        .unwrap();
        assert_eq!(new, case.new_ids, "{}: new tokens", case.name);
        let stopped = if new.last().is_some_and(|t| eos.contains(t)) {
            "eos"
        } else if new.len() < case.max_new_tokens {
            "stop"
        } else {
            "length"
        };
        assert_eq!(stopped, case.stopped_by, "{}", case.name);
        assert_eq!(tok.decode(&new, true).unwrap(), case.text, "{}", case.name);
        // transformers' output ends with the whole token that completed the stop string;
        // whet prints up to the stop string's end.
        let printed = &generated[..printed.unwrap_or(generated.len())];
        let want =
            &case.text[..stop_end(&context, &case.text, &case.stop).unwrap_or(case.text.len())];
        assert_eq!(printed, want, "{}: printed text", case.name);
        trimmed += usize::from(printed != case.text);
    }
    // " Felix" completes "Fel": printed "... named Fel", transformers' text "... named Felix"
    // (once a model).
    assert_eq!(trimmed, 2);
}

/// Several prompts (`--prompt` repeated) go through `generate_batch`, left-padded; the CLI cuts
/// each text at its stop string afterwards, so the ids only need to start with the fixture's.
#[test]
fn batched_prompts_with_penalty_equal_transformers() {
    let ckpt = Checkpoint::open(smollm2()).unwrap();
    let tok = ckpt.tokenizer().unwrap();
    let device = whet_models::device::for_tests();
    let model = ckpt.load_causal_lm(&device).unwrap();
    let mut eos = ckpt.eos_token_ids();
    eos.extend(tok.eos.as_ref().map(|e| e.id));
    let pad = tok.pad.as_ref().or(tok.eos.as_ref()).map_or(0, |t| t.id);
    let batch: Vec<Case> = cases()
        .into_iter()
        .filter(|c| c.repetition_penalty != 1.0)
        .collect();
    assert_eq!(batch.len(), 4);
    assert!(batch.iter().all(|c| c.max_new_tokens == 24));
    let prompts: Vec<Vec<u32>> = batch.iter().map(|c| c.prompt_ids.clone()).collect();
    let config = GenerationConfig {
        repetition_penalty: 1.3,
        ..GenerationConfig::greedy(24, eos)
    };
    let outs = generate_batch(&model, &prompts, &config, pad, &device).unwrap();
    for (case, got) in batch.iter().zip(outs) {
        assert_eq!(got, case.new_ids, "{}", case.name);
    }
}
