//! Seeded fuzzing of what a model folder or file holds: the safetensors header,
//! `config.json`, `tokenizer.json` with `tokenizer_config.json` and `special_tokens_map.json`,
//! and a GGUF checkpoint's metadata, through [`Checkpoint::open`], the loaders and
//! [`TextTokenizer::from_folder`]. The seeds are the committed tiny checkpoints and
//! tokenizers built here; the cases are truncations, bit flips, edge numbers and values,
//! stray JSON fragments and random headers. Every case must end in `Ok` or `Err`: no panic,
//! no hang, and no allocation out of proportion to the files (a size in a config must never
//! become a `Vec::with_capacity` the checkpoint does not back).
//!
//! The cases repeat exactly (a hand-written SplitMix64); a failure names the case to rerun.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::io::Write as _;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

use burn::tensor::Device;
use serde_json::{Value as Json, json};
use whet_gguf::writer::GgufWriter;
use whet_gguf::{GgmlType, GgufFile, Value};
use whet_models::tokenizer::byte_level_bpe;
use whet_models::{ChatMessage, Checkpoint, FamilyConfig, TextTokenizer};

// ---------------------------------------------------------------------------------------------
// The harness, shared by the four fuzz tests (tests/fuzz_harness.rs): a counting allocator, a
// watchdog, a seeded mutator, and a runner that turns a panic, a hang or an oversized allocation
// into a failure naming the case.
include!("../../../tests/fuzz_harness.rs");

// Text fragments and the text mutator (tests/fuzz_text.rs).
include!("../../../tests/fuzz_text.rs");

// ---------------------------------------------------------------------------------------------
// JSON-aware mutation

/// Values at the edges of what a config field can hold.
fn edge_json(rng: &mut Rng) -> Json {
    match rng.below(16) {
        0 => json!(0),
        1 => json!(-1),
        2 => json!(rng.edge()),
        3 => json!(rng.edge()),
        4 => json!(1e308),
        5 => json!(-1e308),
        6 => json!(0.5),
        7 => json!(1e-300),
        8 => Json::Null,
        9 => json!(true),
        10 => json!(""),
        11 => json!("x"),
        12 => json!([]),
        13 => json!({}),
        14 => json!([1, [2, {"a": null}]]),
        _ => json!(rng.below(100_000) as u64),
    }
}

/// Every value's path in `v` (object keys and array indices).
fn paths(v: &Json, at: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    out.push(at.clone());
    let children: Vec<(String, &Json)> = match v {
        Json::Object(m) => m.iter().map(|(k, v)| (k.clone(), v)).collect(),
        Json::Array(a) => a
            .iter()
            .enumerate()
            .map(|(i, v)| (i.to_string(), v))
            .collect(),
        _ => return,
    };
    for (k, child) in children {
        at.push(k);
        paths(child, at, out);
        at.pop();
    }
}

fn at_path<'a>(v: &'a mut Json, path: &[String]) -> &'a mut Json {
    path.iter().fold(v, |v, k| match v {
        Json::Object(m) => m.get_mut(k).expect("a path from `paths`"),
        Json::Array(a) => &mut a[k.parse::<usize>().expect("an index")],
        _ => unreachable!("`paths` descends into containers only"),
    })
}

/// Keys a config may hold that the seeds lack (so a mutation can add them): the label count,
/// head and window sizes, rope settings.
const OPTIONAL_KEYS: &[&str] = &[
    "num_labels",
    "id2label",
    "problem_type",
    "head_dim",
    "num_key_value_heads",
    "sliding_window",
    "use_sliding_window",
    "rope_theta",
    "rope_scaling",
    "n_inner",
    "classifier_dropout",
    "pad_token_id",
];

/// One to three edits of a JSON document: a value replaced by an edge value, an object key
/// removed, or a key added (one a config may hold, or an unknown one).
fn mutate_json(seed: &Json, rng: &mut Rng) -> Vec<u8> {
    let mut v = seed.clone();
    for _ in 0..1 + rng.below(3) {
        let mut all = vec![];
        paths(&v, &mut vec![], &mut all);
        let path = all[rng.below(all.len())].clone();
        match rng.below(5) {
            0 if !path.is_empty() => {
                let (last, parent) = path.split_last().expect("not empty");
                if let Json::Object(m) = at_path(&mut v, parent) {
                    m.remove(last);
                }
            }
            1 => {
                if let Json::Object(m) = at_path(&mut v, &path) {
                    let key = match OPTIONAL_KEYS.get(rng.below(2 * OPTIONAL_KEYS.len())) {
                        Some(k) => k.to_string(),
                        None => format!("unknown_{}", rng.below(10)),
                    };
                    m.insert(key, edge_json(rng));
                }
            }
            _ => *at_path(&mut v, &path) = edge_json(rng),
        }
    }
    serde_json::to_vec_pretty(&v).expect("JSON serialises")
}

// ---------------------------------------------------------------------------------------------
// Cases

/// A scratch folder in memory where the system has one (`/dev/shm`): thousands of small
/// writes should not wait on a disk's journal.
fn scratch() -> tempfile::TempDir {
    tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .unwrap()
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// Writes `files` into `dir` (replacing what was there) and returns their total size.
fn write_folder(dir: &Path, files: &[(&str, &[u8])]) -> usize {
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    files.iter().map(|(_, b)| b.len()).sum()
}

/// Opens a checkpoint (folder or GGUF file), reads every tensor, loads every head that fits its
/// family and its tokenizer when it has one; true when all of it succeeded.
fn exercise_checkpoint(path: &Path) -> bool {
    let Ok(ckpt) = Checkpoint::open(path) else {
        return false;
    };
    let mut ok = true;
    for name in ckpt.source.names() {
        let _ = ckpt.source.shape(&name);
        ok &= ckpt.source.read_f32(&name).is_ok();
    }
    let device = Device::flex();
    let _ = (
        ckpt.eos_token_ids(),
        ckpt.pad_token_id(),
        ckpt.head().labels(),
    );
    if ckpt.family().is_decoder() {
        ok &= ckpt.load_causal_lm(&device).is_ok();
    }
    ok &= ckpt.load_classifier(&device).is_ok();
    if ckpt.gguf().is_some() {
        ok &= ckpt.tokenizer().is_ok_and(|t| exercise_tokenizer(&t));
    }
    ok
}

/// Encodes, decodes and renders the chat template; true when all of it succeeded.
fn exercise_tokenizer(t: &TextTokenizer) -> bool {
    let text = "Hello world, ça va? <|endoftext|> 12345";
    let Ok(ids) = t.encode(text, true) else {
        return false;
    };
    let pair = t.encode_pair("question?", "context.");
    let decoded = t.decode(&ids, true);
    let chat = t.chat_template.as_ref().map(|_| {
        t.apply_chat_template(
            &[ChatMessage {
                role: "user".into(),
                content: "hi".into(),
            }],
            true,
        )
    });
    let _ = t.vocab_size();
    pair.is_ok() && decoded.is_ok() && chat.is_none_or(|c| c.is_ok())
}

fn exercise_tokenizer_folder(dir: &Path) -> bool {
    TextTokenizer::from_folder(dir).is_ok_and(|t| exercise_tokenizer(&t))
}

// ---------------------------------------------------------------------------------------------
// Seeds

/// A byte-level BPE tokenizer (GPT-2 / LLaMA style): the 256 byte symbols, a few merges, a
/// BOS template and special tokens; with its `tokenizer_config.json` (chat template).
fn bpe_seed() -> (TextTokenizer, Vec<u8>, Json) {
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    let mut symbols: Vec<String> = ByteLevel::alphabet()
        .into_iter()
        .map(String::from)
        .collect();
    symbols.sort();
    let merges: Vec<(String, String)> = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n")]
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .to_vec();
    let mut vocab: HashMap<String, u32> = HashMap::new();
    for s in symbols
        .iter()
        .cloned()
        .chain(merges.iter().map(|(a, b)| format!("{a}{b}")))
        .chain(["<|endoftext|>", "<|im_start|>", "<|im_end|>"].map(String::from))
    {
        let id = vocab.len() as u32;
        vocab.entry(s).or_insert(id);
    }
    let specials: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .map(String::from)
        .to_vec();
    let bos = whet_models::tokenizer::Special {
        text: "<|im_start|>".into(),
        id: vocab["<|im_start|>"],
    };
    let eos = whet_models::tokenizer::Special {
        text: "<|endoftext|>".into(),
        id: vocab["<|endoftext|>"],
    };
    let inner = byte_level_bpe(vocab, merges, &specials, false, Some(&bos), "seed").unwrap();
    let json = inner.to_string(false).unwrap().into_bytes();
    let template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n\
                    {% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    let config = json!({
        "bos_token": "<|im_start|>",
        "eos_token": {"content": "<|endoftext|>", "special": true},
        "pad_token": "<|endoftext|>",
        "chat_template": template,
    });
    let tok = TextTokenizer {
        inner,
        bos: Some(bos),
        eos: Some(eos),
        pad: None,
        chat_template: Some(template.into()),
        source: "seed".into(),
    };
    (tok, json, config)
}

/// A BERT WordPiece tokenizer: normaliser, pre-tokenizer, `[CLS] $A [SEP] $B [SEP]`.
fn wordpiece_seed() -> Vec<u8> {
    use tokenizers::models::wordpiece::WordPiece;
    use tokenizers::normalizers::BertNormalizer;
    use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
    use tokenizers::processors::template::TemplateProcessing;
    let words = [
        "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", ",", "?", "ca", "##va",
        "question", "context", ".", "1", "##2", "##3", "<", ">", "|", "end", "##of", "##text",
    ];
    let vocab: ahash::AHashMap<String, u32> = words
        .iter()
        .enumerate()
        .map(|(i, w)| (w.to_string(), i as u32))
        .collect();
    let model = WordPiece::builder()
        .vocab(vocab)
        .unk_token("[UNK]".into())
        .build()
        .unwrap();
    let mut tok = tokenizers::Tokenizer::new(model);
    tok.with_normalizer(Some(BertNormalizer::new(true, true, None, true)));
    tok.with_pre_tokenizer(Some(BertPreTokenizer));
    tok.with_post_processor(Some(
        TemplateProcessing::builder()
            .try_single("[CLS]:0 $A:0 [SEP]:0")
            .unwrap()
            .try_pair("[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1")
            .unwrap()
            .special_tokens(vec![("[CLS]", 2), ("[SEP]", 3)])
            .build()
            .unwrap(),
    ));
    tok.with_decoder(Some(tokenizers::decoders::wordpiece::WordPiece::default()));
    tok.to_string(false).unwrap().into_bytes()
}

/// A LLaMA GGUF checkpoint: tiny-llama's weights (Q8_0 where rows are whole blocks, F16
/// elsewhere) with the BPE seed's tokenizer in its metadata.
fn gguf_seed(dir: &Path) -> PathBuf {
    let ckpt = Checkpoint::open(fixtures().join("tiny-llama")).unwrap();
    let FamilyConfig::Llama(config) = &ckpt.config else {
        panic!("tiny-llama is a llama");
    };
    let (tok, _, _) = bpe_seed();
    let out = dir.join("seed.gguf");
    whet_models::gguf::export(ckpt.source.as_ref(), config, &tok, GgmlType::Q8_0, &out).unwrap();
    out
}

/// The GGUF file `seed` rewritten with one to three metadata values replaced by edge values
/// of every type (or removed), tensors unchanged.
fn mutate_gguf_metadata(seed: &GgufFile, rng: &mut Rng) -> Vec<u8> {
    let mut meta: Vec<(String, Value)> = seed
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for _ in 0..1 + rng.below(3) {
        let i = rng.below(meta.len());
        let e = rng.edge();
        let edge = match rng.below(12) {
            0 => Value::U32(e as u32),
            1 => Value::U64(e),
            2 => Value::I32(e as i32),
            3 => Value::I64(e as i64),
            4 => Value::F32([0.0, -1.0, f32::NAN, f32::INFINITY, 1e30][rng.below(5)]),
            5 => Value::F64(f64::from_bits(e)),
            6 => Value::Bool(e & 1 == 1),
            7 => Value::String(["", "llama", "gpt2", "x y", "{% if %}"][rng.below(5)].into()),
            8 => Value::Array(vec![]),
            9 => Value::Array(vec![Value::U8(0); rng.below(4)]),
            10 => {
                meta.remove(i);
                continue;
            }
            _ => match &meta[i].1 {
                // A list shortened or lengthened, its elements kept.
                Value::Array(a) => {
                    let n = rng.below(a.len() + 2);
                    Value::Array(a.iter().cycle().take(n).cloned().collect())
                }
                _ => Value::U32(rng.below(1 << 12) as u32),
            },
        };
        meta[i].1 = edge;
    }
    let mut w = GgufWriter::new();
    for (k, v) in meta {
        w.set(&k, v);
    }
    for t in &seed.tensors {
        w.add_tensor(&t.name, &t.shape(), t.ty, seed.raw(t).unwrap().to_vec());
    }
    w.to_bytes()
}

/// A safetensors file: an 8-byte header length, the JSON header, the data.
fn safetensors_parts(bytes: &[u8]) -> (Json, Vec<u8>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (
        serde_json::from_slice(&bytes[8..8 + n]).unwrap(),
        bytes[8 + n..].to_vec(),
    )
}

fn safetensors_join(header: &[u8], data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend(header);
    out.extend(data);
    out
}

/// A header of random tensors: dtypes known and not, shapes and offsets at the edges.
fn random_safetensors(rng: &mut Rng) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for i in 0..rng.below(4) {
        let dtype = [
            "F32", "F16", "BF16", "F64", "I8", "U8", "F8_E4M3", "F4", "Q",
        ][rng.below(9)];
        let shape: Vec<u64> = (0..rng.below(4)).map(|_| rng.edge() % 64).collect();
        let len = if rng.below(3) == 0 {
            rng.edge()
        } else {
            shape.iter().product::<u64>() * 4
        };
        let end = offset.wrapping_add(len);
        header.insert(
            format!("model.t{i}"),
            json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    if rng.below(2) == 0 {
        header.insert("__metadata__".into(), json!({"format": "pt"}));
    }
    let header = serde_json::to_vec(&header).unwrap();
    let data = rng.up_to(256);
    let mut out = safetensors_join(&header, &data);
    if rng.below(4) == 0 {
        out[..8].copy_from_slice(&rng.edge().to_le_bytes());
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Tests

/// `config.json` edits that broke the loader, as (name, seed folder, key, value).
fn config_regressions() -> Vec<(&'static str, &'static str, &'static str, Json)> {
    vec![
        // The rotary table was sized from head_dim before any tensor confirmed it: 2^31 f32.
        ("head_dim 2^32", "tiny-llama", "head_dim", json!(1u64 << 32)),
        // `head_dim()` divided by the head count even when head_dim was given.
        (
            "no attention heads",
            "tiny-llama",
            "num_attention_heads",
            json!(0),
        ),
        // A new score head (and the LABEL_i names) was sized from num_labels alone.
        (
            "num_labels 2^40",
            "tiny-llama",
            "num_labels",
            json!(1u64 << 40),
        ),
        (
            "num_labels 2^40 beside id2label",
            "tiny-bert",
            "num_labels",
            json!(1u64 << 40),
        ),
    ]
}

/// GGUF metadata edits that broke the loader, as (name, key, value).
fn gguf_regressions() -> Vec<(&'static str, &'static str, Value)> {
    vec![
        // The rotary table was sized from the key length before any tensor confirmed it.
        (
            "key length 2^32",
            "llama.attention.key_length",
            Value::U64(1 << 32),
        ),
        // `llama_config` divided the embedding length by the head count.
        (
            "no attention heads",
            "llama.attention.head_count",
            Value::U32(0),
        ),
    ]
}

/// The GGUF file `seed` with metadata `key` set to `value`.
fn gguf_with(seed: &GgufFile, key: &str, value: Value) -> Vec<u8> {
    let mut w = GgufWriter::new();
    for (k, v) in &seed.metadata {
        w.set(k, v.clone());
    }
    w.set(key, value);
    for t in &seed.tensors {
        w.add_tensor(&t.name, &t.shape(), t.ty, seed.raw(t).unwrap().to_vec());
    }
    w.to_bytes()
}

/// Tokenizer files that broke the loader or the first encode, as (name, seed, file, bytes).
fn tokenizer_regressions(wordpiece: &[u8]) -> Vec<(&'static str, &'static str, Vec<u8>)> {
    // Cut inside the decoder: tokenizers `expect`ed the decoder to deserialise.
    let text = std::str::from_utf8(wordpiece).unwrap();
    let decoder = text.find("\"decoder\"").unwrap();
    let cut = wordpiece[..decoder + 20].to_vec();
    // A template placing [SEP] that its special tokens lack: the first encode indexed a map.
    let mut json: Json = serde_json::from_slice(wordpiece).unwrap();
    json["post_processor"]["special_tokens"]
        .as_object_mut()
        .unwrap()
        .remove("[SEP]");
    vec![
        (
            "tokenizer.json cut inside its decoder",
            "tokenizer.json",
            cut,
        ),
        (
            "template token without a definition",
            "tokenizer.json",
            serde_json::to_vec(&json).unwrap(),
        ),
    ]
}

#[test]
fn safetensors_headers_and_configs_survive_mutation() {
    if !alone("safetensors_headers_and_configs_survive_mutation") {
        return;
    }
    let mut run = Run::new("folder");
    let mut rng = Rng(0x7361_6665);
    let tmp = scratch();
    let dir = tmp.path();

    let llama = fixtures().join("tiny-llama");
    let config = std::fs::read(llama.join("config.json")).unwrap();
    let weights = std::fs::read(llama.join("model.safetensors")).unwrap();
    let (header, data) = safetensors_parts(&weights);
    let header_text = serde_json::to_vec(&header).unwrap();
    let header_end = 8 + header_text.len();

    run.group("safetensors");
    write_folder(dir, &[("config.json", &config)]);
    let go_weights = |run: &mut Run, label: &str, bytes: &[u8]| {
        let len = write_folder(dir, &[("model.safetensors", bytes)]) + config.len();
        run.case(label, len, || exercise_checkpoint(dir));
    };
    go_weights(&mut run, "seed", &safetensors_join(&header_text, &data));
    for cut in cuts(weights.len(), header_end + 16, scaled(100), &mut rng) {
        go_weights(&mut run, &format!("cut at {cut}"), &weights[..cut]);
    }
    for i in 0..scaled(400) {
        let bytes = safetensors_join(&mutate_json(&header, &mut rng), &data);
        go_weights(&mut run, &format!("header value #{i}"), &bytes);
    }
    for i in 0..scaled(300) {
        let bytes = safetensors_join(&mutate_text(&header_text, &mut rng), &data);
        go_weights(&mut run, &format!("header text #{i}"), &bytes);
    }
    for i in 0..scaled(300) {
        let bytes = mutate(&weights, &mut rng, 0..header_end);
        go_weights(&mut run, &format!("header bytes #{i}"), &bytes);
    }
    for i in 0..scaled(300) {
        let bytes = random_safetensors(&mut rng);
        go_weights(&mut run, &format!("random header #{i}"), &bytes);
    }

    for family in ["tiny-llama", "tiny-bert", "tiny-distilbert", "tiny-gpt2"] {
        run.group(format!("{family} config.json"));
        let src = fixtures().join(family);
        let weights = std::fs::read(src.join("model.safetensors")).unwrap();
        let text = std::fs::read(src.join("config.json")).unwrap();
        let seed: Json = serde_json::from_slice(&text).unwrap();
        write_folder(dir, &[("model.safetensors", &weights)]);
        let go = |run: &mut Run, label: &str, config: &[u8]| {
            let len = write_folder(dir, &[("config.json", config)]) + weights.len();
            run.case(label, len, || exercise_checkpoint(dir));
        };
        for (name, seed_name, key, value) in config_regressions() {
            if seed_name == family {
                let mut json = seed.clone();
                json[key] = value;
                let bytes = serde_json::to_vec(&json).unwrap();
                go(&mut run, &format!("regression {name}"), &bytes);
            }
        }
        go(&mut run, &format!("{family} seed"), &text);
        for cut in cuts(text.len(), 0, scaled(60), &mut rng) {
            go(
                &mut run,
                &format!("{family} config cut at {cut}"),
                &text[..cut],
            );
        }
        for i in 0..scaled(800) {
            let bytes = mutate_json(&seed, &mut rng);
            go(&mut run, &format!("{family} config value #{i}"), &bytes);
        }
        for i in 0..scaled(300) {
            let bytes = mutate_text(&text, &mut rng);
            go(&mut run, &format!("{family} config text #{i}"), &bytes);
        }
    }
    run.finish();
}

/// A tokenizer folder's files: (name, bytes).
type Files = Vec<(&'static str, Vec<u8>)>;

#[test]
fn tokenizer_files_survive_mutation() {
    if !alone("tokenizer_files_survive_mutation") {
        return;
    }
    let mut run = Run::new("tokenizer");
    let mut rng = Rng(0x746f_6b65);
    let tmp = scratch();
    let dir = tmp.path();
    let (_, bpe, bpe_config) = bpe_seed();
    let bpe_config = serde_json::to_vec(&bpe_config).unwrap();
    let special_map =
        serde_json::to_vec(&json!({"unk_token": "[UNK]", "pad_token": "[PAD]"})).unwrap();
    let wordpiece = wordpiece_seed();
    run.group("regressions");
    for (name, file, bytes) in tokenizer_regressions(&wordpiece) {
        let len = write_folder(dir, &[(file, &bytes)]);
        run.case(&format!("regression {name}"), len, || {
            exercise_tokenizer_folder(dir)
        });
    }
    let mut seeds: Vec<(&str, Files)> = vec![
        (
            "bpe",
            vec![
                ("tokenizer.json", bpe.clone()),
                ("tokenizer_config.json", bpe_config.clone()),
            ],
        ),
        (
            "wordpiece",
            vec![
                ("tokenizer.json", wordpiece),
                ("special_tokens_map.json", special_map),
            ],
        ),
    ];
    // MiniLM's real tokenizer, when the asset cache has it (not committed: 466 KB).
    let minilm = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../cache/minilm/tokenizer.json");
    if let Ok(bytes) = std::fs::read(&minilm) {
        seeds.push(("minilm", vec![("tokenizer.json", bytes)]));
    }
    for (seed_name, files) in &seeds {
        run.group(*seed_name);
        for f in [
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
        ] {
            let _ = std::fs::remove_file(dir.join(f));
        }
        let base: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (*n, b.as_slice())).collect();
        let total: usize = write_folder(dir, &base);
        assert!(
            exercise_tokenizer_folder(dir),
            "the seed {seed_name} must load"
        );
        let (count, cut_count) = if *seed_name == "minilm" {
            (scaled(10), scaled(10))
        } else {
            (scaled(400), scaled(80))
        };
        for (file, bytes) in files {
            let seed: Json = serde_json::from_slice(bytes).unwrap();
            let go = |run: &mut Run, label: &str, b: &[u8]| {
                let len = write_folder(dir, &[(file, b)]) - bytes.len() + total;
                run.case(label, len, || exercise_tokenizer_folder(dir));
            };
            for cut in cuts(bytes.len(), 0, cut_count, &mut rng) {
                go(
                    &mut run,
                    &format!("{seed_name} {file} cut at {cut}"),
                    &bytes[..cut],
                );
            }
            for i in 0..count {
                let b = mutate_json(&seed, &mut rng);
                go(&mut run, &format!("{seed_name} {file} value #{i}"), &b);
            }
            for i in 0..count {
                let b = mutate_text(bytes, &mut rng);
                go(&mut run, &format!("{seed_name} {file} text #{i}"), &b);
            }
            write_folder(dir, &[(file, bytes)]);
        }
    }
    run.finish();
}

#[test]
fn gguf_checkpoints_survive_mutation() {
    if !alone("gguf_checkpoints_survive_mutation") {
        return;
    }
    let mut run = Run::new("gguf checkpoint");
    let mut rng = Rng(0x0067_6775_666d);
    let tmp = scratch();
    let seed_path = gguf_seed(tmp.path());
    let seed_bytes = std::fs::read(&seed_path).unwrap();
    let seed = GgufFile::open(&seed_path).unwrap();
    let header = seed
        .tensors
        .iter()
        .map(|t| t.offset as usize)
        .min()
        .unwrap();
    assert!(exercise_checkpoint(&seed_path), "the GGUF seed must load");
    let path = tmp.path().join("case.gguf");
    let go = |run: &mut Run, label: &str, bytes: &[u8]| {
        std::fs::write(&path, bytes).unwrap();
        run.case(label, bytes.len(), || exercise_checkpoint(&path));
    };
    run.group("regressions");
    for (name, key, value) in gguf_regressions() {
        go(
            &mut run,
            &format!("regression {name}"),
            &gguf_with(&seed, key, value),
        );
    }
    run.group("metadata values");
    for i in 0..scaled(2000) {
        let bytes = mutate_gguf_metadata(&seed, &mut rng);
        go(&mut run, &format!("metadata #{i}"), &bytes);
    }
    run.group("header bytes");
    for i in 0..scaled(400) {
        let bytes = mutate(&seed_bytes, &mut rng, 0..header);
        go(&mut run, &format!("header bytes #{i}"), &bytes);
    }
    for cut in cuts(seed_bytes.len(), 0, scaled(100), &mut rng) {
        go(&mut run, &format!("cut at {cut}"), &seed_bytes[..cut]);
    }
    run.finish();
}
