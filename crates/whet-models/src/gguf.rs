//! Rotary decoders from GGUF files (LLaMA, Mistral, Qwen2, Gemma 3): config from metadata,
//! tensors renamed to Hugging Face names (q/k un-permuted for LLaMA and Mistral, Gemma's norm
//! weights shifted back by one), tokenizer and chat template from metadata, and conversion to a
//! Hugging Face folder. Mirrors `transformers.integrations.ggml` / `modeling_gguf_pytorch_utils`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use whet_gguf::GgufFile;

use crate::TextTokenizer;
use crate::error::{ModelError, Result};
use crate::llama::LlamaConfig;
use crate::weights::TensorSource;

// The tokenizer half of GGUF lives in whet-text (no tensor library needed to tokenize).
use whet_text::gguf::tokenizer_metadata;
pub use whet_text::gguf::{tokenizer, tokenizer_config};

/// GGUF architectures read as the rotary decoder family.
const LLAMA_ARCHS: &[&str] = &[
    "llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3",
];

/// The `model_type` of a GGUF architecture (transformers reads a gemma3 file as the text model).
fn model_type_of(arch: &str) -> String {
    match arch {
        "gemma3" => "gemma3_text".into(),
        a => a.into(),
    }
}

/// The GGUF architecture of a `model_type`.
fn arch_of(model_type: &str) -> Option<&'static str> {
    LLAMA_ARCHS
        .iter()
        .copied()
        .find(|a| model_type_of(a) == model_type)
}

/// Whether the architecture stores RMSNorm weights as llama.cpp scales them (Gemma's `1 + w`,
/// so transformers' `Gemma2TensorProcessor` subtracts one).
fn shifted_norms(arch: &str) -> bool {
    matches!(arch, "gemma" | "gemma2" | "gemma3")
}

/// The block tensors of architecture `arch`: (ggml module, Hugging Face module under
/// `model.layers.N.`), as llama.cpp's `convert_hf_to_gguf.py` names them. Gemma 2/3's
/// `ffn_norm` is the norm before the MLP of a sandwich, LLaMA's the norm after attention;
/// Phi-3 stores q/k/v as one `attn_qkv` and gate/up as one `ffn_up`.
fn block_names(arch: &str) -> Vec<(&'static str, &'static str)> {
    let mut names = vec![
        ("attn_norm", "input_layernorm"),
        ("attn_output", "self_attn.o_proj"),
        ("ffn_down", "mlp.down_proj"),
        ("attn_q_norm", "self_attn.q_norm"),
        ("attn_k_norm", "self_attn.k_norm"),
    ];
    if arch == "phi3" {
        names.extend([
            ("attn_qkv", "self_attn.qkv_proj"),
            ("ffn_up", "mlp.gate_up_proj"),
        ]);
    } else {
        names.extend([
            ("attn_q", "self_attn.q_proj"),
            ("attn_k", "self_attn.k_proj"),
            ("attn_v", "self_attn.v_proj"),
            ("ffn_gate", "mlp.gate_proj"),
            ("ffn_up", "mlp.up_proj"),
        ]);
    }
    if matches!(arch, "gemma2" | "gemma3") {
        names.extend([
            ("post_attention_norm", "post_attention_layernorm"),
            ("ffn_norm", "pre_feedforward_layernorm"),
            ("post_ffw_norm", "post_feedforward_layernorm"),
        ]);
    } else {
        names.push(("ffn_norm", "post_attention_layernorm"));
    }
    names
}

/// The tensors outside the blocks: (ggml name, Hugging Face name).
const FIXED_NAMES: [(&str, &str); 3] = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// Maps a ggml tensor name of architecture `arch` to its Hugging Face name.
pub fn hf_name_for(arch: &str, ggml: &str) -> Option<String> {
    if let Some((_, hf)) = FIXED_NAMES.iter().find(|(g, _)| *g == ggml) {
        return Some(hf.to_string());
    }
    let rest = ggml.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    let (_, hf) = block_names(arch).into_iter().find(|(g, _)| *g == module)?;
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// Maps a Hugging Face tensor name of architecture `arch` to its ggml name.
pub fn ggml_name_for(arch: &str, hf: &str) -> Option<String> {
    if let Some((g, _)) = FIXED_NAMES.iter().find(|(_, h)| *h == hf) {
        return Some(g.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    let (g, _) = block_names(arch).into_iter().find(|(_, h)| *h == module)?;
    Some(format!("blk.{layer}.{g}.{kind}"))
}

/// The tensors of a GGUF LLaMA checkpoint under Hugging Face names, dequantised to f32.
pub struct GgufSource {
    file: Arc<GgufFile>,
    /// HF name -> ggml name
    names: HashMap<String, String>,
    /// Heads of q and k, for undoing llama.cpp's rotary permutation (None: no permutation).
    permute: Option<(usize, usize)>,
    /// `general.architecture`.
    arch: String,
}

impl GgufSource {
    /// Indexes `file` for the LLaMA family.
    pub fn new(file: Arc<GgufFile>, config: &LlamaConfig) -> Self {
        let arch = file
            .get_str("general.architecture")
            .unwrap_or("llama")
            .to_string();
        let names = file
            .tensors
            .iter()
            .filter_map(|t| Some((hf_name_for(&arch, &t.name)?, t.name.clone())))
            .collect();
        // llama.cpp permutes q/k rows of "llama" and "mistral" checkpoints for its interleaved
        // rotary layout; transformers undoes it (`reverse_permute_weights`), and so does whet.
        let permute = matches!(arch.as_str(), "llama" | "mistral")
            .then_some((config.num_attention_heads, config.kv_heads()));
        Self {
            file,
            names,
            permute,
            arch,
        }
    }

    /// The ggml tensors that have no Hugging Face name (ignored by the loader).
    pub fn unmapped(&self) -> Vec<String> {
        self.file
            .tensors
            .iter()
            .filter(|t| hf_name_for(&self.arch, &t.name).is_none())
            .map(|t| t.name.clone())
            .collect()
    }
}

/// Undoes llama.cpp's permutation of q/k projection rows: within each head, rows stored as
/// (hd/2, 2) interleaved pairs go back to (2, hd/2) halves.
///
/// `numpy: w.reshape(n_head, hd // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)`
fn unpermute<T: Copy + Default>(values: &[T], rows: usize, cols: usize, n_head: usize) -> Vec<T> {
    let hd = rows / n_head;
    let half = hd / 2;
    let mut out = vec![T::default(); values.len()];
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                let src = h * hd + i * 2 + j;
                let dst = h * hd + j * half + i;
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&values[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

impl TensorSource for GgufSource {
    fn source_name(&self) -> String {
        self.file.path().display().to_string()
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let t = self.file.tensor(self.names.get(name)?)?;
        Some(t.shape())
    }

    fn dtype(&self, name: &str) -> Option<String> {
        let t = self.file.tensor(self.names.get(name)?)?;
        Some(t.ty.to_string())
    }

    fn names(&self) -> Vec<String> {
        let mut n: Vec<_> = self.names.keys().cloned().collect();
        n.sort();
        n
    }

    fn read_quantized(&self, name: &str) -> Option<Result<(whet_gguf::GgmlType, Vec<u8>)>> {
        let t = self.file.tensor(self.names.get(name)?)?;
        let (per, bytes) = t.ty.block()?;
        let shape = t.shape();
        if per == 1 || shape.len() != 2 || !shape[1].is_multiple_of(per) {
            return None;
        }
        let raw = match self.file.raw(t) {
            Ok(r) => r,
            Err(e) => return Some(Err(e.into())),
        };
        let heads = match self.permute {
            Some((q, _)) if name.ends_with("self_attn.q_proj.weight") => Some(q),
            Some((_, k)) if name.ends_with("self_attn.k_proj.weight") => Some(k),
            _ => None,
        };
        // Rows are whole blocks, so the q/k row permutation moves bytes of whole rows.
        let row_bytes = shape[1] / per * bytes;
        Some(Ok((
            t.ty,
            match heads {
                Some(n_head) => unpermute(raw, shape[0], row_bytes, n_head),
                None => raw.to_vec(),
            },
        )))
    }

    fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let t = self
            .names
            .get(name)
            .and_then(|g| self.file.tensor(g))
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_string(),
                source_name: self.source_name(),
            })?;
        let values = self.file.dequantize(t)?;
        let shape = t.shape();
        let heads = match self.permute {
            Some((q, _)) if name.ends_with("self_attn.q_proj.weight") => Some(q),
            Some((_, k)) if name.ends_with("self_attn.k_proj.weight") => Some(k),
            _ => None,
        };
        Ok(match heads {
            Some(n_head) if shape.len() == 2 => unpermute(&values, shape[0], shape[1], n_head),
            _ if shifted_norms(&self.arch) && name.ends_with("norm.weight") => {
                values.into_iter().map(|v| v - 1.0).collect()
            }
            _ => values,
        })
    }
}

/// The GGUF architecture `config` is written as, or why the format cannot hold it: a GGUF file
/// carries what llama.cpp reads for the architecture, and whet refuses a config whose
/// computation would change on the way (a rope scaling, a layer pattern or a query scale other
/// than the one llama.cpp derives for the architecture).
pub fn expressible(config: &LlamaConfig) -> Result<&'static str> {
    use crate::llama::LayerKind;
    let mt = config.model_type.as_str();
    let arch = arch_of(mt).ok_or_else(|| {
        ModelError::Input(format!(
            "GGUF export covers model_type {}, not {mt:?}",
            LLAMA_ARCHS
                .iter()
                .map(|a| model_type_of(a))
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })?;
    let refuse = |what: String| {
        Err(ModelError::Input(format!(
            "GGUF export: {what}: a {arch} GGUF file cannot carry it (llama.cpp derives it)"
        )))
    };
    let rope_type = config
        .rope_parameters
        .as_ref()
        .and_then(|p| {
            p.get("rope_type")
                .or_else(|| p.get("full_attention")?.get("rope_type"))
        })
        .or_else(|| {
            config
                .rope_scaling
                .as_ref()
                .and_then(|p| p.get("rope_type").or(p.get("type")))
        })
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    if rope_type != "default" {
        return refuse(format!("rope scaling {rope_type:?}"));
    }
    let n = config.num_hidden_layers;
    let pattern: Option<Box<dyn Fn(usize) -> bool>> = match arch {
        "gemma2" => Some(Box::new(|i| !(i + 1).is_multiple_of(2))),
        "gemma3" => Some(Box::new(|i| !(i + 1).is_multiple_of(6))),
        _ => None,
    };
    match pattern {
        Some(sliding) => {
            if (0..n).any(|i| (config.layer_kind(i) == LayerKind::Sliding) != sliding(i)) {
                return refuse("layer types other than llama.cpp's pattern".into());
            }
            if config.query_pre_attn_scalar() != Some(256.0) {
                return refuse(format!(
                    "query_pre_attn_scalar = {:?}",
                    config.query_pre_attn_scalar()
                ));
            }
        }
        None if matches!(arch, "qwen2" | "qwen3") && config.sliding_window().is_some() => {
            return refuse("use_sliding_window = true".into());
        }
        None => {}
    }
    if arch == "gemma3"
        && (config.theta(LayerKind::Sliding) != 10_000.0
            || config.attn_logit_softcapping().is_some()
            || config.final_logit_softcapping().is_some())
    {
        return refuse("a local rope base other than 10000, or soft-capping".into());
    }
    if arch == "gemma2"
        && (config.attn_logit_softcapping().is_none() || config.final_logit_softcapping().is_none())
    {
        return refuse("Gemma 2 without soft-capping".into());
    }
    Ok(arch)
}

/// The LLaMA config a GGUF file's metadata describes, as `transformers` derives it.
pub fn llama_config(file: &GgufFile) -> Result<LlamaConfig> {
    let arch = file.get_str("general.architecture")?.to_string();
    if !LLAMA_ARCHS.contains(&arch.as_str()) {
        return Err(ModelError::UnknownArchitecture {
            name: arch,
            path: file.path().to_path_buf(),
            supported: "GGUF architectures llama, mistral, qwen2, qwen3, phi3, gemma, gemma2, \
                        gemma3",
        });
    }
    let key = |k: &str| format!("{arch}.{k}");
    let u = |k: &str| file.get_u64(&key(k)).map(|v| v as usize);
    let heads = u("attention.head_count")?;
    let hidden = u("embedding_length")?;
    let vocab = match u("vocab_size") {
        Ok(v) => v,
        Err(_) => file.get_strings("tokenizer.ggml.tokens")?.len(),
    };
    let head_dim = u("attention.key_length")
        .ok()
        .filter(|&d| Some(d) != hidden.checked_div(heads));
    // Rope scaling in GGUF is either metadata (`rope.scaling.*`) or, for llama3's, a
    // `rope_freqs` tensor; whet reads neither, so a file using them is refused rather than run
    // with plain rope.
    let scaling = file
        .get(&key("rope.scaling.type"))
        .and_then(|v| v.as_str())
        .filter(|t| *t != "none");
    if let Some(t) = scaling {
        return Err(ModelError::Config {
            path: file.path().to_path_buf(),
            message: format!(
                "{} = {t:?}: rope scaling from GGUF metadata is not implemented (convert the \
                 Hugging Face folder instead, whose rope_scaling whet reads)",
                key("rope.scaling.type")
            ),
        });
    }
    if file.tensor("rope_freqs.weight").is_some() {
        return Err(ModelError::Config {
            path: file.path().to_path_buf(),
            message: "the rope_freqs.weight tensor (llama3 rope scaling) is not implemented \
                      for GGUF files: use the Hugging Face folder, whose rope_scaling whet reads"
                .into(),
        });
    }
    let token = |k: &str| {
        file.get(&format!("tokenizer.ggml.{k}"))
            .and_then(|v| v.as_u64())
            .map(|v| v as u32)
    };
    let rotated = u("rope.dimension_count").ok();
    let head = head_dim.unwrap_or(hidden / heads.max(1));
    if let Some(d) = rotated.filter(|&d| d != head) {
        return Err(ModelError::Config {
            path: file.path().to_path_buf(),
            message: format!(
                "{} = {d} of {head}: rotating part of each head is not implemented",
                key("rope.dimension_count")
            ),
        });
    }
    // Gemma 2 files carry their soft caps (transformers' defaults where absent).
    let cap = |k: &str| {
        file.get(&key(k))
            .and_then(|v| v.as_f64())
            .map(serde_json::Value::from)
    };
    let variant = crate::llama::VariantFields {
        final_logit_softcapping: cap("final_logit_softcapping"),
        attn_logit_softcapping: cap("attn_logit_softcapping"),
        ..Default::default()
    };
    let config = LlamaConfig {
        model_type: model_type_of(&arch),
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: u("feed_forward_length")?,
        num_hidden_layers: u("block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: Some(u("attention.head_count_kv").unwrap_or(heads)),
        head_dim,
        rms_norm_eps: file.get_f64(&key("attention.layer_norm_rms_epsilon"))?,
        rope_theta: Some(file.get_f64(&key("rope.freq_base")).unwrap_or(10000.0)),
        rope_parameters: None,
        rope_scaling: None,
        max_position_embeddings: u("context_length").unwrap_or(2048),
        tie_word_embeddings: file.tensor("output.weight").is_none(),
        attention_bias: false,
        mlp_bias: false,
        attention_dropout: 0.0,
        hidden_act: crate::config::Activation::Silu,
        initializer_range: 0.02,
        pad_token_id: token("padding_token_id"),
        bos_token_id: token("bos_token_id"),
        eos_token_id: token("eos_token_id").map(|v| v.into()),
        sliding_window: u("attention.sliding_window").ok(),
        use_sliding_window: u("attention.sliding_window").ok().map(|_| true),
        variant,
        head: Default::default(),
    };
    config.validate().map_err(|message| ModelError::Config {
        path: file.path().to_path_buf(),
        message,
    })?;
    Ok(config)
}

/// Opens a GGUF file and checks it is a LLaMA-family checkpoint.
pub fn open(path: &Path) -> Result<(Arc<GgufFile>, LlamaConfig)> {
    let file = Arc::new(GgufFile::open(path)?);
    let config = llama_config(&file)?;
    Ok((file, config))
}

/// Writes a GGUF LLaMA checkpoint as a Hugging Face folder that `transformers` loads:
/// `config.json`, `model.safetensors` (f32, dequantised, q/k un-permuted),
/// `tokenizer.json` and `tokenizer_config.json` (with the chat template).
pub fn convert_to_folder(path: &Path, out: &Path) -> Result<ConvertSummary> {
    let (file, config) = open(path)?;
    let source = GgufSource::new(file.clone(), &config);
    let tokenizer = tokenizer(&file)?;
    std::fs::create_dir_all(out).map_err(|e| ModelError::io(out, e))?;

    let mut tensors = Vec::new();
    for name in source.names() {
        let shape = source.shape(&name).unwrap_or_default();
        tensors.push((name.clone(), shape, source.read_f32(&name)?));
    }
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    crate::weights::write_safetensors(&out.join("model.safetensors"), &tensors, Some(meta))?;

    let class = crate::architecture(&config.model_type, crate::Head::CausalLm);
    let mut json = serde_json::to_value(&config).map_err(|e| ModelError::Input(e.to_string()))?;
    if let serde_json::Value::Object(map) = &mut json {
        map.retain(|_, v| !v.is_null());
        map.insert("architectures".into(), serde_json::json!([class]));
        map.insert("torch_dtype".into(), "float32".into());
    }
    write_json(&out.join("config.json"), &json)?;

    let tok_path = out.join("tokenizer.json");
    let tok_json = tokenizer
        .inner
        .to_string(true)
        .map_err(|e| ModelError::Tokenizer {
            source_name: tokenizer.source.clone(),
            message: e.to_string(),
        })?;
    crate::fsutil::write_atomic(&tok_path, tok_json.as_bytes())?;
    let tok_config = tokenizer_config(&file, &tokenizer, config.max_position_embeddings);
    write_json(&out.join("tokenizer_config.json"), &tok_config)?;
    Ok(ConvertSummary {
        tensors: tensors.len(),
        parameters: tensors
            .iter()
            .map(|(_, s, _)| s.iter().product::<usize>())
            .sum(),
        skipped: source.unmapped(),
    })
}

/// What [`convert_to_folder`] wrote.
#[derive(Debug, Clone)]
pub struct ConvertSummary {
    /// Tensors written.
    pub tensors: usize,
    /// Values written.
    pub parameters: usize,
    /// GGUF tensors without a Hugging Face counterpart (e.g. precomputed rope tables).
    pub skipped: Vec<String>,
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| ModelError::Input(e.to_string()))?;
    crate::fsutil::write_atomic(path, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_onto_hugging_face_per_architecture() {
        let hf = |arch, g| hf_name_for(arch, g);
        assert_eq!(
            hf("llama", "blk.3.attn_q.weight").as_deref(),
            Some("model.layers.3.self_attn.q_proj.weight")
        );
        assert_eq!(
            hf("llama", "blk.0.ffn_norm.weight").as_deref(),
            Some("model.layers.0.post_attention_layernorm.weight")
        );
        // Gemma 2/3's ffn_norm is the norm before the MLP; post_attention_norm follows attention.
        assert_eq!(
            hf("gemma3", "blk.0.ffn_norm.weight").as_deref(),
            Some("model.layers.0.pre_feedforward_layernorm.weight")
        );
        assert_eq!(
            hf("gemma2", "blk.1.post_attention_norm.weight").as_deref(),
            Some("model.layers.1.post_attention_layernorm.weight")
        );
        // Phi-3's fused projections.
        assert_eq!(
            hf("phi3", "blk.0.ffn_up.weight").as_deref(),
            Some("model.layers.0.mlp.gate_up_proj.weight")
        );
        assert_eq!(hf("phi3", "blk.0.attn_q.weight"), None);
        assert_eq!(
            hf("llama", "token_embd.weight").as_deref(),
            Some("model.embed_tokens.weight")
        );
        assert_eq!(hf("llama", "rope_freqs.weight"), None);
        // Every name of every architecture goes back to itself.
        for arch in LLAMA_ARCHS {
            for (g, _) in block_names(arch) {
                let ggml = format!("blk.7.{g}.weight");
                let name = hf_name_for(arch, &ggml).unwrap_or_default();
                assert_eq!(ggml_name_for(arch, &name), Some(ggml), "{arch}");
            }
        }
    }

    #[test]
    fn unpermute_regroups_interleaved_pairs() {
        // one head, hd = 4, one column: stored rows (r0, r1, r2, r3) are pairs (0,1), (2,3) of
        // interleaved halves; HF order is (r0, r2, r1, r3).
        let out = unpermute(&[0.0, 1.0, 2.0, 3.0], 4, 1, 1);
        assert_eq!(out, vec![0.0, 2.0, 1.0, 3.0]);
    }
}

// ---------------------------------------------------------------------------------------------
// Export

/// llama.cpp's permutation of q/k rows for its interleaved rotary layout (`convert_hf_to_gguf`'s
/// `LlamaModel.permute`), the inverse of [`unpermute`].
fn permute(values: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    let hd = rows / n_head;
    let half = hd / 2;
    let mut out = vec![0f32; values.len()];
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                let dst = h * hd + i * 2 + j;
                let src = h * hd + j * half + i;
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&values[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// What [`export`] wrote.
#[derive(Debug, Clone)]
pub struct ExportSummary {
    /// Tensors written.
    pub tensors: usize,
    /// Tensors by stored type.
    pub types: std::collections::BTreeMap<String, usize>,
    /// 2-D tensors whose rows are not whole 32-value blocks, written as F16 instead (as
    /// llama.cpp's quantiser falls back).
    pub fallbacks: Vec<String>,
    /// Bytes of the file.
    pub bytes: usize,
}

/// Writes a LLaMA-family checkpoint (a folder, or a GGUF file re-encoded) as a GGUF v3 file:
/// architecture metadata as llama.cpp's converter writes it, the tokenizer and chat template,
/// norms in F32 and matrices as `ty` (F16, Q8_0 or Q4_0; F16 where rows are not whole blocks),
/// q/k rows permuted for llama.cpp's rotary layout.
pub fn export(
    source: &dyn TensorSource,
    config: &LlamaConfig,
    tok: &TextTokenizer,
    ty: whet_gguf::GgmlType,
    out: &Path,
) -> Result<ExportSummary> {
    use whet_gguf::writer::{GgufWriter, encode};
    use whet_gguf::{GgmlType, Value};
    if !matches!(
        ty,
        GgmlType::F16 | GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::F32
    ) {
        return Err(ModelError::Input(format!(
            "GGUF export writes f32, f16, q8_0 or q4_0, not {ty}"
        )));
    }
    let arch = expressible(config)?.to_string();
    let mut w = GgufWriter::new();
    let k = |s: &str| format!("{arch}.{s}");
    let u = |v: usize| Value::U32(v as u32);
    w.set("general.architecture", Value::String(arch.clone()));
    w.set(
        "general.name",
        Value::String(
            out.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
        ),
    );
    w.set(
        "general.alignment",
        Value::U32(whet_gguf::writer::ALIGNMENT as u32),
    );
    // llama_ftype: ALL_F32 0, MOSTLY_F16 1, MOSTLY_Q4_0 2, MOSTLY_Q8_0 7.
    let ftype = match ty {
        GgmlType::F32 => 0,
        GgmlType::F16 => 1,
        GgmlType::Q4_0 => 2,
        _ => 7,
    };
    w.set("general.file_type", Value::U32(ftype));
    w.set(&k("vocab_size"), u(config.vocab_size));
    w.set(&k("context_length"), u(config.max_position_embeddings));
    w.set(&k("embedding_length"), u(config.hidden_size));
    w.set(&k("block_count"), u(config.num_hidden_layers));
    w.set(&k("feed_forward_length"), u(config.intermediate_size));
    w.set(&k("attention.head_count"), u(config.num_attention_heads));
    w.set(&k("attention.head_count_kv"), u(config.kv_heads()));
    w.set(&k("attention.key_length"), u(config.head_dim()));
    w.set(&k("attention.value_length"), u(config.head_dim()));
    w.set(&k("rope.dimension_count"), u(config.head_dim()));
    w.set(
        &k("rope.freq_base"),
        Value::F32(config.theta(crate::llama::LayerKind::Full) as f32),
    );
    w.set(
        &k("attention.layer_norm_rms_epsilon"),
        Value::F32(config.rms_norm_eps as f32),
    );
    if let Some(window) = config.sliding_window() {
        w.set(&k("attention.sliding_window"), u(window));
    }
    for (key, cap) in [
        ("attn_logit_softcapping", config.attn_logit_softcapping()),
        ("final_logit_softcapping", config.final_logit_softcapping()),
    ] {
        if let Some(c) = cap {
            w.set(&k(key), Value::F32(c as f32));
        }
    }
    for (key, value) in tokenizer_metadata(tok)? {
        w.set(&key, value);
    }
    let permute_heads = matches!(arch.as_str(), "llama" | "mistral");
    let mut summary = ExportSummary {
        tensors: 0,
        types: Default::default(),
        fallbacks: vec![],
        bytes: 0,
    };
    for name in source.names() {
        if config.tie_word_embeddings && name == "lm_head.weight" {
            continue;
        }
        let Some(g) = ggml_name_for(&arch, &name) else {
            continue;
        };
        let shape = source.shape(&name).unwrap_or_default();
        let mut values = source.read_f32(&name)?;
        if shifted_norms(&arch) && name.ends_with("norm.weight") {
            // llama.cpp stores Gemma's `1 + w`.
            values.iter_mut().for_each(|v| *v += 1.0);
        }
        if permute_heads && shape.len() == 2 {
            if name.ends_with("self_attn.q_proj.weight") {
                values = permute(&values, shape[0], shape[1], config.num_attention_heads);
            } else if name.ends_with("self_attn.k_proj.weight") {
                values = permute(&values, shape[0], shape[1], config.kv_heads());
            }
        }
        let want = if shape.len() == 2 { ty } else { GgmlType::F32 };
        let (stored, data) = match encode(want, &values) {
            Some(d)
                if shape.len() != 2
                    || shape[1].is_multiple_of(32)
                    || want == GgmlType::F16
                    || want == GgmlType::F32 =>
            {
                (want, d)
            }
            _ => {
                summary.fallbacks.push(name.clone());
                let d = encode(GgmlType::F16, &values).unwrap_or_default();
                (GgmlType::F16, d)
            }
        };
        *summary.types.entry(stored.to_string()).or_default() += 1;
        summary.tensors += 1;
        w.add_tensor(&g, &shape, stored, data);
    }
    let bytes = w.to_bytes();
    summary.bytes = bytes.len();
    crate::fsutil::write_atomic(out, &bytes)?;
    Ok(summary)
}
