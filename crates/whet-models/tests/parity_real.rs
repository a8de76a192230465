//! Parity on the real pretrained models of the asset cache (fetched by
//! `scripts/fetch_assets.sh`): MiniLM from its Hugging Face folder, SmolLM2 from its GGUF file,
//! and tokenization of MiniLM, GPT-2 and SmolLM2.

use crate::common;

use burn::tensor::Device;
use common::*;
use whet_infer_free::greedy;
use whet_models::bert::{BertModel, EncoderInput};
use whet_models::tokenizer::{TextTokenizer, gpt2_from_files};
use whet_models::{CausalLm, Checkpoint, DecoderInput, FamilyConfig, Mode};

/// A minimal greedy loop with the KV cache, kept here so this crate's tests need no
/// dependency on whet-infer (which has its own tests of sampling).
mod whet_infer_free {
    use burn::tensor::{Device, Tensor, TensorData};
    use whet_models::{CausalLm, DecoderInput, Mode};

    pub fn greedy<M: CausalLm>(model: &M, prompt: &[i64], n: usize, device: &Device) -> Vec<i64> {
        let mut cache = model.new_cache();
        let mut next = prompt.to_vec();
        let mut out = vec![];
        for _ in 0..n {
            let t = next.len();
            let input = DecoderInput {
                input_ids: Tensor::from_data(TensorData::new(next.clone(), [1, t]), device),
                attention_mask: Tensor::ones([1, cache.len() + t], device),
                position_ids: None,
                document_ids: None,
                unpadded: None,
            };
            let h = model.forward_hidden(input, Some(&mut cache), Mode::Eval);
            let [_, _, d] = h.dims();
            let logits: Vec<f32> = model
                .lm_logits(h.slice([0..1, t - 1..t, 0..d]))
                .into_data()
                .convert::<f32>()
                .try_to_vec::<f32>()
                .unwrap();
            let mut best = 0;
            for (i, v) in logits.iter().enumerate() {
                if *v > logits[best] {
                    best = i;
                }
            }
            out.push(best as i64);
            next = vec![best as i64];
        }
        out
    }
}

#[test]
fn minilm_hidden_states_match_transformers() {
    let dir = asset("minilm");
    let fx = Fixture::open(&fixtures().join("minilm/minilm.safetensors"));
    let ckpt = Checkpoint::open(&dir).unwrap();
    let FamilyConfig::Bert(config) = &ckpt.config else {
        panic!("MiniLM should be a BERT");
    };
    let device = Device::flex();
    let model = BertModel::load(&ckpt.weights(&device), config).unwrap();
    let out = model.forward(
        EncoderInput {
            input_ids: fx.ids2("input_ids", &device),
            attention_mask: fx.ids2("attention_mask", &device),
            token_type_ids: Some(fx.ids2("token_type_ids", &device)),
            unpadded: None,
        },
        Mode::Eval,
    );
    assert_close(
        "last_hidden_state",
        &values(out.last_hidden_state),
        &fx.f32("last_hidden_state"),
        1e-4,
    );
    assert_close(
        "pooler_output",
        &values(out.pooler_output.unwrap()),
        &fx.f32("pooler_output"),
        1e-4,
    );
}

#[test]
fn smollm2_gguf_logits_and_greedy_generation_match_transformers() {
    let path = asset("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let fx = Fixture::open(&fixtures().join("smollm2/smollm2.safetensors"));
    let ckpt = Checkpoint::open(&path).unwrap();
    let device = Device::flex();
    let model = ckpt.load_causal_lm(&device).unwrap();
    assert_eq!(
        check_prompts(&model, &fx, &device),
        3,
        "three prompts expected"
    );
}

/// Compares, for every prompt `k` of a GGUF fixture, the logits (every vocabulary entry at the
/// last position, the fixture's subset at every position) within 1e-3 and the greedy tokens
/// with the cache; returns how many prompts there were.
fn check_prompts<M: CausalLm>(model: &M, fx: &Fixture, device: &Device) -> usize {
    let subset = fx.i64("vocab_subset");
    let vocab = model.vocab_size();
    let mut k = 0;
    while fx.has(&format!("input_ids_{k}")) {
        let key = format!("input_ids_{k}");
        let ids = fx.i64(&key);
        let t = ids.len();
        let logits =
            values(model.forward_logits(DecoderInput::unpadded(fx.ids2(&key, device)), Mode::Eval));
        assert_close(
            &format!("prompt {k}: last logits"),
            &logits[(t - 1) * vocab..],
            &fx.f32(&format!("last_logits_{k}")),
            1e-3,
        );
        let got_subset: Vec<f32> = logits
            .chunks(vocab)
            .flat_map(|row| subset.iter().map(|&i| row[i as usize]).collect::<Vec<_>>())
            .collect();
        assert_close(
            &format!("prompt {k}: logits at every position"),
            &got_subset,
            &fx.f32(&format!("subset_logits_{k}")),
            1e-3,
        );
        let want = fx.i64(&format!("greedy_{k}"));
        // SmolLM2's fixture stops at EOS and records how many tokens it made.
        let n = match fx.has(&format!("greedy_len_{k}")) {
            true => fx.i64(&format!("greedy_len_{k}"))[0] as usize,
            false => want.len(),
        };
        let got = greedy(model, &ids, n, device);
        assert_eq!(got, want[..n], "prompt {k}: greedy tokens");
        k += 1;
    }
    k
}

#[derive(serde::Deserialize)]
struct TokenCases {
    corpus: Vec<String>,
    minilm: Vec<Vec<u32>>,
    gpt2: Vec<Vec<u32>>,
    smollm2: Vec<Vec<u32>>,
}

fn check_tokenizer(name: &str, tok: &TextTokenizer, corpus: &[String], want: &[Vec<u32>]) {
    assert_eq!(corpus.len(), want.len());
    for (text, ids) in corpus.iter().zip(want) {
        let got = tok.encode(text, true).unwrap();
        assert_eq!(&got, ids, "{name}: ids of {text:?}");
    }
}

#[test]
fn tokenization_matches_hugging_face() {
    let text = std::fs::read_to_string(fixtures().join("tokenization.json")).unwrap();
    let cases: TokenCases = serde_json::from_str(&text).unwrap();
    let minilm = TextTokenizer::from_folder(&asset("minilm")).unwrap();
    check_tokenizer("minilm", &minilm, &cases.corpus, &cases.minilm);

    let gpt2 = TextTokenizer {
        inner: gpt2_from_files(
            &asset("gpt2-tokenizer/vocab.json"),
            &asset("gpt2-tokenizer/merges.txt"),
        )
        .unwrap(),
        bos: None,
        eos: None,
        pad: None,
        chat_template: None,
        source: "gpt2".into(),
    };
    check_tokenizer("gpt2", &gpt2, &cases.corpus, &cases.gpt2);

    let smol = Checkpoint::open(asset("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
        .unwrap()
        .tokenizer()
        .unwrap();
    check_tokenizer("smollm2", &smol, &cases.corpus, &cases.smollm2);
}

#[test]
fn smollm2_chat_template_renders_as_transformers() {
    let prompts: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("smollm2/prompts.json")).unwrap(),
    )
    .unwrap();
    let want = prompts["chat_rendered"]
        .as_str()
        .expect("prompts.json has chat_rendered");
    let tok = Checkpoint::open(asset("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
        .unwrap()
        .tokenizer()
        .unwrap();
    let got = tok
        .apply_chat_template(
            &[whet_models::ChatMessage {
                role: "user".into(),
                content: "What is the capital of France?".into(),
            }],
            true,
        )
        .unwrap();
    assert_eq!(got, want);
}

/// Gemma-3-270M, real weights from its Q4_K_M GGUF (`scripts/fetch_assets.sh --only gemma3`):
/// logits of three prompts within 1e-3 of transformers reading the same file (every vocabulary
/// entry at the last position, 256 of them at every position), 24 greedy tokens with the cache
/// token for token (a plain prompt, Gemma's chat turn format, and unicode with runs of spaces),
/// and the tokenizer whet builds from the file's SentencePiece vocabulary encoding and decoding
/// a corpus as transformers' does (`tests/fixtures/gemma3/`, `make_gemma3_fixture.py`).
#[test]
fn gemma3_gguf_logits_greedy_generation_and_tokenizer_match_transformers() {
    let path = asset("gemma3/gemma-3-270m-q4_k_m.gguf");
    let root = fixtures().join("gemma3");
    let ckpt = Checkpoint::open(&path).unwrap();
    assert_eq!(ckpt.model_type(), "gemma3_text");
    let tok = ckpt.tokenizer().unwrap();

    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("tokenization.json")).unwrap())
            .unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_u64().unwrap() as u32)
            .collect()
    };
    for row in cases["rows"].as_array().unwrap() {
        let text = row["text"].as_str().unwrap();
        assert_eq!(
            tok.encode(text, true).unwrap(),
            ids(&row["ids"]),
            "{text:?}"
        );
        let plain = ids(&row["ids_no_special"]);
        assert_eq!(tok.encode(text, false).unwrap(), plain, "{text:?}");
        assert_eq!(
            tok.decode(&plain, false).unwrap(),
            row["decoded"].as_str().unwrap(),
            "decoding {text:?}"
        );
    }

    let fx = Fixture::open(&root.join("gemma3.safetensors"));
    let device = Device::flex();
    let model = ckpt.load_causal_lm(&device).unwrap();
    assert_eq!(
        check_prompts(&model, &fx, &device),
        3,
        "three prompts expected"
    );
}
