//! Writes the logits a trained folder (LoRA adapter or full model, as `whet train` saves it)
//! gives on fixed inputs, with the token batch, for the reference scripts to compare against
//! `peft` / `transformers` loading the same folder: classifiers for
//! `scripts/check/check_peft_adapter.py` and `scripts/check/check_hf_classifier.py`; causal LMs
//! (`logits [1, T, V]`) and question answering (`start_logits`, `end_logits`) for
//! `scripts/check/check_outputs.py`.
//!
//! Usage: export_logits MODEL_DIR OUT.safetensors

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use whet_data::{Example, collate, tokenize};
use whet_infer::classification::{load, to_input};
use whet_models::weights::write_safetensors;
use whet_models::{CausalLm, Checkpoint, DecoderInput, TextTokenizer};

fn main() -> anyhow::Result<()> {
    whet_models::init_threads();
    let args: Vec<String> = std::env::args().collect();
    let [_, model, out] = args.as_slice() else {
        anyhow::bail!("usage: export_logits MODEL_DIR OUT.safetensors");
    };
    let device = Device::flex();
    match kind(model.as_ref())?.as_str() {
        "CAUSAL_LM" => return causal(model.as_ref(), out, &device),
        "QUESTION_ANS" => return question_answering(model.as_ref(), out, &device),
        _ => {}
    }
    let t = load(model.as_ref(), &device)?;
    let texts = [
        "I love this, best day ever!",
        "The train was late again. Terrible service.",
        "It is a car.",
        "Meh",
    ];
    let ex: Vec<Example> = texts
        .iter()
        .map(|s| Example {
            text: s.to_string(),
            text_pair: None,
            label: whet_data::Target::Class(0),
            origin: String::new(),
        })
        .collect();
    let enc = tokenize(&t.tokenizer, &ex, t.max_length, Default::default())?;
    let b = collate(&enc.iter().collect::<Vec<_>>(), t.pad_id);
    let with_types = matches!(t.model, whet_models::Classifier::Bert(_));
    let (input, _) = to_input(&b, &device, with_types, 0, true);
    let logits = t.model.forward(input, whet_models::Mode::Eval)?;
    let dims = logits.dims().to_vec();
    let values: Vec<f32> = logits
        .into_data()
        .convert::<f32>()
        .try_to_vec()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let f = |v: &Vec<i64>| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
    let shape = vec![b.batch, b.len];
    // Token ids as f32 here (exact below 2^24); the checking scripts cast them back to int64.
    let mut tensors = vec![
        ("input_ids".to_string(), shape.clone(), f(&b.input_ids)),
        (
            "attention_mask".to_string(),
            shape.clone(),
            f(&b.attention_mask),
        ),
        ("logits".to_string(), dims, values),
    ];
    if with_types {
        tensors.push(("token_type_ids".to_string(), shape, f(&b.token_type_ids)));
    }
    write_safetensors(out.as_ref(), &tensors, None)?;
    println!("wrote {out}");
    Ok(())
}

fn read_json(p: &Path) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::from_str(&std::fs::read_to_string(p)?)?)
}

/// peft's task type of an adapter folder, or the one a model folder's architecture implies.
fn kind(dir: &Path) -> anyhow::Result<String> {
    if dir.join("adapter_config.json").is_file() {
        let cfg = read_json(&dir.join("adapter_config.json"))?;
        return Ok(cfg["task_type"].as_str().unwrap_or("SEQ_CLS").to_string());
    }
    let cfg = read_json(&dir.join("config.json"))?;
    let arch = cfg["architectures"][0]
        .as_str()
        .unwrap_or_default()
        .to_string();
    Ok(
        if arch.ends_with("ForCausalLM") || arch.ends_with("LMHeadModel") {
            "CAUSAL_LM".into()
        } else if arch.ends_with("ForQuestionAnswering") {
            "QUESTION_ANS".into()
        } else {
            "SEQ_CLS".into()
        },
    )
}

/// The base checkpoint of a folder: the adapter's base model, or the folder itself.
fn base(dir: &Path) -> anyhow::Result<(Checkpoint, bool)> {
    let adapter = dir.join("adapter_config.json").is_file();
    let path = if adapter {
        PathBuf::from(
            read_json(&dir.join("adapter_config.json"))?["base_model_name_or_path"]
                .as_str()
                .ok_or_else(|| anyhow::anyhow!("the adapter names no base model"))?,
        )
    } else {
        dir.to_path_buf()
    };
    Ok((Checkpoint::open(path)?, adapter))
}

fn ids_f32(ids: &[u32]) -> Vec<f32> {
    ids.iter().map(|&x| x as f32).collect()
}

fn causal(dir: &Path, out: &str, device: &Device) -> anyhow::Result<()> {
    let (ckpt, adapter) = base(dir)?;
    let mut model = ckpt.load_causal_lm(device)?;
    if adapter {
        whet_peft::load_adapter(&mut model, dir, device)?;
    }
    let tok = TextTokenizer::from_folder(dir).or_else(|_| ckpt.tokenizer())?;
    let ids = tok.encode(
        "Convert 2001-09-04 to a sentence: Tuesday, September 4, 2001.",
        true,
    )?;
    let t = ids.len();
    let input = Tensor::<2, Int>::from_data(
        TensorData::new(ids.iter().map(|&i| i as i64).collect(), [1, t]),
        device,
    );
    let logits = model.forward_logits(DecoderInput::unpadded(input), whet_models::Mode::Eval);
    let dims = logits.dims().to_vec();
    let values: Vec<f32> = logits
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    write_safetensors(
        out.as_ref(),
        &[
            ("input_ids".to_string(), vec![1, t], ids_f32(&ids)),
            ("attention_mask".to_string(), vec![1, t], vec![1.0; t]),
            ("logits".to_string(), dims, values),
        ],
        None,
    )?;
    println!("wrote {out}");
    Ok(())
}

fn question_answering(dir: &Path, out: &str, device: &Device) -> anyhow::Result<()> {
    let (ckpt, adapter) = base(dir)?;
    let (mut model, _) = ckpt.load_question_answering(device)?;
    if adapter {
        whet_peft::load_adapter(&mut model, dir, device)?;
    }
    let tok = TextTokenizer::from_folder(dir).or_else(|_| ckpt.tokenizer())?;
    let (ids, types) = tok.encode_pair(
        "Where was Ines born?",
        "Ines was born in Quito in 1977. Ines works as a chemist.",
    )?;
    let t = ids.len();
    let tensor = |v: &[u32]| {
        Tensor::<2, Int>::from_data(
            TensorData::new(v.iter().map(|&i| i as i64).collect(), [1, t]),
            device,
        )
    };
    let span = model.forward(
        whet_models::bert::EncoderInput {
            input_ids: tensor(&ids),
            attention_mask: tensor(&vec![1; t]),
            token_type_ids: Some(tensor(&types)),
            unpadded: None,
        },
        whet_models::Mode::Eval,
    );
    let v = |x: Tensor<2>| -> anyhow::Result<Vec<f32>> {
        x.into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .map_err(|e| anyhow::anyhow!("{e:?}"))
    };
    write_safetensors(
        out.as_ref(),
        &[
            ("input_ids".to_string(), vec![1, t], ids_f32(&ids)),
            ("attention_mask".to_string(), vec![1, t], vec![1.0; t]),
            ("token_type_ids".to_string(), vec![1, t], ids_f32(&types)),
            ("start_logits".to_string(), vec![1, t], v(span.start)?),
            ("end_logits".to_string(), vec![1, t], v(span.end)?),
        ],
        None,
    )?;
    println!("wrote {out}");
    Ok(())
}
