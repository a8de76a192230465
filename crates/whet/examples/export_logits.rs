//! Writes the logits a trained classifier folder (LoRA adapter or full model, as `whet train`
//! saves it) gives on a few texts, with the token batch, for the reference scripts
//! `scripts/check_peft_adapter.py` and `scripts/check_hf_classifier.py` to compare against
//! `peft` / `transformers` loading the same folder.
//!
//! Usage: export_logits MODEL_DIR OUT.safetensors

use burn::tensor::Device;
use whet_data::{Example, collate, tokenize};
use whet_models::weights::write_safetensors;
use whet_train::classify::load_trained;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, model, out] = args.as_slice() else {
        anyhow::bail!("usage: export_logits MODEL_DIR OUT.safetensors");
    };
    let device = Device::flex();
    let t = load_trained(model.as_ref(), &device).map_err(|e| anyhow::anyhow!(e))?;
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
    let (input, _) = whet_train::seqcls::to_input(&b, &device, with_types, 0);
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
