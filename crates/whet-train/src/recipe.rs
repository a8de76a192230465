//! The recipe of a run (`whet train RECIPE.toml`): model, task, method, data, method options
//! and `TrainingArguments`, with `--set key=value` overrides and `<cache>` expansion.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use whet_data::{Side, Template, TooLong};
use whet_peft::{BottleneckConfig, Ia3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig};

use crate::args::TrainingArguments;

/// What is learnt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Task {
    /// One label per text (or text pair): softmax and cross-entropy.
    #[default]
    SequenceClassification,
    /// Any number of labels per text: one sigmoid per label and binary cross-entropy, as
    /// `problem_type = "multi_label_classification"` in `transformers`. The label column
    /// holds lists of class names or ids.
    MultiLabelClassification,
    /// Next-token prediction (`AutoModelForCausalLM`): plain text, prompt templates or chat
    /// conversations; the loss is taken on the part to learn only.
    CausalLm,
    /// Extractive question answering (`AutoModelForQuestionAnswering`, BERT family): SQuAD-format
    /// data, start and end of the answer span.
    QuestionAnswering,
    /// A reward model (trl's `RewardTrainer`): a one-output classifier trained on preference
    /// pairs (`prompt` / `chosen` / `rejected`, or BIG-bench `task.json`).
    RewardModel,
    /// Direct preference optimisation (trl's `DPOTrainer`): a decoder trained on preference
    /// pairs against a frozen reference, with a `[dpo]` table.
    Dpo,
    /// PPO against a trained reward model (RLHF, trl's `PPOTrainer`): a decoder with a value
    /// head samples responses to prompts, with a `[ppo]` table.
    Ppo,
}

impl Task {
    /// Whether each text carries a set of labels.
    pub fn multi_label(self) -> bool {
        self == Task::MultiLabelClassification
    }
}

/// Which parameters train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Every parameter.
    #[default]
    Full,
    /// Transfer learning: the base is frozen, the new head (and optionally the top layers)
    /// train.
    Head,
    /// LoRA adapters (`[lora]`) plus the head.
    Lora,
    /// QLoRA: LoRA (`[lora]`) over a frozen base quantised to NF4 with double quantisation
    /// (`[quantization]` changes how).
    Qlora,
    /// IA3 scaling vectors (`[ia3]`) plus the head.
    Ia3,
    /// Bottleneck adapters (`[bottleneck]`: Houlsby or Pfeiffer) plus the head.
    Bottleneck,
    /// Prefix tuning (`[prefix_tuning]`): trainable keys and values before every attention
    /// layer, plus the head.
    #[serde(rename = "prefix_tuning", alias = "prefix-tuning")]
    PrefixTuning,
    /// Prompt tuning (`[prompt_tuning]`): a trainable soft prompt before the embeddings, plus
    /// the head.
    #[serde(rename = "prompt_tuning", alias = "prompt-tuning")]
    PromptTuning,
}

impl Method {
    /// Whether the method trains an adapter over a frozen base.
    pub fn is_adapter(self) -> bool {
        matches!(
            self,
            Method::Lora
                | Method::Qlora
                | Method::Ia3
                | Method::Bottleneck
                | Method::PrefixTuning
                | Method::PromptTuning
        )
    }
}

/// `[quantization]`: how the frozen base of an adapter method is stored, named after
/// `transformers.BitsAndBytesConfig`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QuantizationSpec {
    /// Quantise the base's linear layers to 4 bits (NF4, blocks of 64).
    #[serde(default)]
    pub load_in_4bit: bool,
    /// The 4-bit type; only "nf4" is implemented.
    #[serde(default = "d_nf4")]
    pub bnb_4bit_quant_type: String,
    /// Quantise the NF4 block scales again (8-bit, blocks of 256).
    #[serde(default)]
    pub bnb_4bit_use_double_quant: bool,
    /// Keep a GGUF base's quantised linear weights in the file's own blocks (Q4_0, Q4_1,
    /// Q8_0, ...), dequantised one layer at a time, instead of loading them as f32.
    #[serde(default)]
    pub keep_gguf_quantized: bool,
}

fn d_nf4() -> String {
    "nf4".into()
}

/// Sizes of a seeded split of a single data file: counts (>= 1) or fractions (< 1).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitSpec {
    pub train: Option<f64>,
    pub validation: Option<f64>,
    pub test: Option<f64>,
    #[serde(default = "d_seed")]
    pub seed: u64,
}

fn d_seed() -> u64 {
    42
}

/// Train, validation and test parts (validation and test absent when empty).
pub type Parts<T> = (Vec<T>, Option<Vec<T>>, Option<Vec<T>>);

impl SplitSpec {
    /// Cuts `all` into train, validation and test parts (empty parts are `None`).
    pub fn apply<T: Clone>(&self, all: &[T]) -> Result<Parts<T>, String> {
        let size = |v: Option<f64>| {
            v.map(|x| {
                if x >= 1.0 {
                    whet_data::Size::Count(x as usize)
                } else {
                    whet_data::Size::Fraction(x)
                }
            })
        };
        let parts = whet_data::seeded_split(
            all,
            &[size(self.train), size(self.validation), size(self.test)],
            self.seed,
        )
        .map_err(|e| e.to_string())?;
        let mut it = parts.into_iter();
        let (tr, va, te) = (
            it.next().unwrap_or_default(),
            it.next().unwrap_or_default(),
            it.next().unwrap_or_default(),
        );
        Ok((
            tr,
            (!va.is_empty()).then_some(va),
            (!te.is_empty()).then_some(te),
        ))
    }
}

/// `[data]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    pub train: PathBuf,
    #[serde(default)]
    pub validation: Option<PathBuf>,
    #[serde(default)]
    pub test: Option<PathBuf>,
    #[serde(default = "d_text")]
    pub text_column: String,
    #[serde(default)]
    pub text_pair_column: Option<String>,
    #[serde(default = "d_label")]
    pub label_column: String,
    /// Class names in id order; inferred from the training data when absent.
    #[serde(default)]
    pub label_names: Option<Vec<String>>,
    #[serde(default = "d_max_length")]
    pub max_length: usize,
    #[serde(default)]
    pub truncation_side: Side,
    /// Text encoding of CSV files ("utf-8" or "latin-1").
    #[serde(default = "d_encoding")]
    pub encoding: String,
    /// Split `train` into parts when validation/test files are not given.
    #[serde(default)]
    pub split: Option<SplitSpec>,
    /// Keep token ids in `<cache>/tokenized/` between runs (as `datasets` caches a mapped
    /// dataset); keyed by the tokenizer, the truncation settings and every text.
    #[serde(default = "d_true")]
    pub tokenization_cache: bool,
    /// causal-lm: a prompt / completion template, `"alpaca"` or `{ prompt = "...", completion =
    /// "..." }` with `{field}` placeholders naming columns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<TemplateSpec>,
    /// causal-lm: a column of conversations (lists of `{role, content}`), rendered with the
    /// tokenizer's chat template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages_column: Option<String>,
    /// causal-lm with `messages_column`: a column holding the answer to the conversation's
    /// prompt messages, appended as the assistant turn (`trl`'s conversational
    /// prompt / completion data): a string, a list whose first string is taken, or a list of
    /// messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_column: Option<String>,
    /// causal-lm: learn only the completion, or only the assistant turns (`trl`'s
    /// `completion_only_loss` / `assistant_only_loss`); false learns the whole text.
    #[serde(default = "d_true")]
    pub completion_only_loss: bool,
    /// causal-lm on plain text: concatenate the texts and cut blocks of this many tokens
    /// (`run_clm.py`'s `block_size`) instead of one example per text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size: Option<usize>,
    /// causal-lm: pack several examples into each row of up to `max_length` tokens; attention
    /// stays inside each example and positions restart (`trl`'s `packing`).
    #[serde(default)]
    pub packing: bool,
    /// causal-lm: an example longer than `max_length`: "error", "truncate" or "skip" (skips
    /// are counted and reported).
    #[serde(default)]
    pub too_long: TooLong,
    /// question-answering: the columns of SQuAD-format data.
    #[serde(default = "d_question")]
    pub question_column: String,
    #[serde(default = "d_context")]
    pub context_column: String,
    /// `{"text": [...], "answer_start": [...]}` (character offsets into the context).
    #[serde(default = "d_answers")]
    pub answers_column: String,
    /// question-answering: overlap in tokens of consecutive windows of a long context
    /// (default max_length / 3, as run_qa.py's 128 of 384).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub doc_stride: Option<usize>,
    /// question-answering: longest answer, in tokens, that evaluation predicts.
    #[serde(default = "d_max_answer")]
    pub max_answer_length: usize,
}

impl DataSpec {
    /// The train, validation and test parts: the files as given, or a seeded `split` of the
    /// training file when it is the only one.
    pub fn parts<T: Clone>(
        &self,
        train: Vec<T>,
        validation: Option<Vec<T>>,
        test: Option<Vec<T>>,
    ) -> Result<Parts<T>, String> {
        match &self.split {
            Some(s) if validation.is_none() && test.is_none() => s.apply(&train),
            _ => Ok((train, validation, test)),
        }
    }
}

fn d_question() -> String {
    "question".into()
}
fn d_context() -> String {
    "context".into()
}
fn d_answers() -> String {
    "answers".into()
}
fn d_max_answer() -> usize {
    30
}

/// `data.template`: a built-in template by name, or a custom one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TemplateSpec {
    /// `"alpaca"`.
    Named(String),
    Custom(Template),
}

impl TemplateSpec {
    pub fn resolve(&self) -> Result<Template, String> {
        match self {
            TemplateSpec::Custom(t) => Ok(t.clone()),
            TemplateSpec::Named(n) if n == "alpaca" => Ok(Template::alpaca()),
            TemplateSpec::Named(n) => Err(format!(
                "data.template = {n:?}: the built-in templates are \"alpaca\"; or give {{ prompt = \"...\", completion = \"...\" }}"
            )),
        }
    }
}

fn d_true() -> bool {
    true
}

fn d_text() -> String {
    "text".into()
}
fn d_label() -> String {
    "label".into()
}
fn d_max_length() -> usize {
    128
}
fn d_encoding() -> String {
    "utf-8".into()
}

/// `[head]`: options of `method = "head"`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadSpec {
    /// Also train the top N transformer layers.
    #[serde(default)]
    pub unfreeze_top_layers: usize,
}

/// A whole run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// Model folder or .gguf file.
    pub model: PathBuf,
    #[serde(default)]
    pub task: Task,
    #[serde(default)]
    pub method: Method,
    pub data: DataSpec,
    #[serde(default)]
    pub lora: Option<LoraConfig>,
    #[serde(default)]
    pub ia3: Option<Ia3Config>,
    #[serde(default)]
    pub bottleneck: Option<BottleneckConfig>,
    #[serde(default)]
    pub prefix_tuning: Option<PrefixTuningConfig>,
    #[serde(default)]
    pub prompt_tuning: Option<PromptTuningConfig>,
    #[serde(default)]
    pub quantization: Option<QuantizationSpec>,
    #[serde(default)]
    pub head: HeadSpec,
    /// `task = "dpo"`'s settings.
    #[serde(default)]
    pub dpo: Option<crate::dpo::DpoConfig>,
    /// `task = "ppo"`'s settings.
    #[serde(default)]
    pub ppo: Option<crate::ppo::PpoConfig>,
    pub training: TrainingArguments,
}

/// The asset cache: `WHET_CACHE`, else `cache/` under the current folder.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("WHET_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("cache"))
}

fn expand(p: &Path) -> PathBuf {
    let s = p.to_string_lossy();
    match s.strip_prefix("<cache>") {
        Some(rest) => cache_dir().join(rest.trim_start_matches('/')),
        None => p.to_path_buf(),
    }
}

/// Sets `a.b.c = value` in a TOML table; the value is parsed as TOML, else taken as a string.
fn set(root: &mut toml::Table, key: &str, raw: &str) -> Result<(), String> {
    let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts
        .pop()
        .filter(|l| !l.is_empty())
        .ok_or_else(|| format!("--set {key}: empty key"))?;
    let mut table = root;
    for part in parts {
        let entry = table
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry
            .as_table_mut()
            .ok_or_else(|| format!("--set {key}: {part} is not a table"))?;
    }
    table.insert(last.to_string(), value);
    Ok(())
}

impl Recipe {
    /// Reads a recipe file and applies `key=value` overrides.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read recipe {}: {e}", path.display()))?;
        Self::parse(&text, overrides).map_err(|e| format!("recipe {}: {e}", path.display()))
    }

    /// Parses recipe text and applies `key=value` overrides.
    pub fn parse(text: &str, overrides: &[String]) -> Result<Self, String> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
        for o in overrides {
            let (k, v) = o
                .split_once('=')
                .ok_or_else(|| format!("--set {o:?}: expected key=value"))?;
            set(&mut table, k.trim(), v.trim())?;
        }
        let mut recipe: Recipe = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| e.to_string())?;
        recipe.model = expand(&recipe.model);
        for p in [
            Some(&mut recipe.data.train),
            recipe.data.validation.as_mut(),
            recipe.data.test.as_mut(),
        ]
        .into_iter()
        .flatten()
        {
            *p = expand(p);
        }
        recipe.training.output_dir = expand(&recipe.training.output_dir);
        if let Some(p) = recipe.ppo.as_mut() {
            p.reward_model = expand(&p.reward_model);
        }
        match recipe.method {
            Method::Lora | Method::Qlora if recipe.lora.is_none() => {
                return Err(format!(
                    "method = \"{}\" needs a [lora] table (at least target_modules)",
                    if recipe.method == Method::Lora {
                        "lora"
                    } else {
                        "qlora"
                    }
                ));
            }
            Method::PrefixTuning if recipe.prefix_tuning.is_none() => {
                return Err(
                    "method = \"prefix_tuning\" needs a [prefix_tuning] table (at least \
                     num_virtual_tokens)"
                        .into(),
                );
            }
            Method::PromptTuning if recipe.prompt_tuning.is_none() => {
                return Err(
                    "method = \"prompt_tuning\" needs a [prompt_tuning] table (at least \
                     num_virtual_tokens)"
                        .into(),
                );
            }
            Method::PrefixTuning | Method::PromptTuning if recipe.data.packing => {
                return Err(
                    "data.packing = true cannot combine with prefix or prompt tuning: the \
                     virtual tokens would sit in front of only the first packed example"
                        .into(),
                );
            }
            Method::Ia3 if recipe.ia3.is_none() => {
                return Err(
                    "method = \"ia3\" needs an [ia3] table (at least target_modules, and \
                     feedforward_modules for the feed-forward layers)"
                        .into(),
                );
            }
            _ => {}
        }
        if let Some(q) = &recipe.quantization {
            if !recipe.method.is_adapter() {
                return Err(
                    "[quantization] freezes the base: use it with method = \"lora\", \"qlora\" \
                     or \"ia3\", not full or head training"
                        .into(),
                );
            }
            if q.bnb_4bit_quant_type != "nf4" {
                return Err(format!(
                    "quantization.bnb_4bit_quant_type = {:?}: only \"nf4\" is implemented",
                    q.bnb_4bit_quant_type
                ));
            }
            if q.load_in_4bit && q.keep_gguf_quantized {
                return Err(
                    "quantization: load_in_4bit and keep_gguf_quantized exclude each other (NF4 \
                     of the f32 weights, or the GGUF file's own blocks)"
                        .into(),
                );
            }
        }
        recipe.training.validate()?;
        Ok(recipe)
    }

    /// How the frozen base is stored: `[quantization]`, or NF4 with double quantisation for
    /// `method = "qlora"` without one; None loads it in f32.
    pub fn quant_spec(&self) -> Option<whet_models::quant::QuantSpec> {
        use whet_models::quant::QuantSpec;
        match (&self.quantization, self.method) {
            (Some(q), _) if q.keep_gguf_quantized => Some(QuantSpec::Gguf),
            (Some(q), _) if q.load_in_4bit => Some(QuantSpec::Nf4 {
                double_quant: q.bnb_4bit_use_double_quant,
            }),
            (None, Method::Qlora) => Some(QuantSpec::Nf4 { double_quant: true }),
            _ => None,
        }
    }

    /// The resolved recipe as TOML (written into the output folder).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
model = "<cache>/minilm"
method = "lora"
[data]
train = "t.jsonl"
[lora]
r = 8
lora_alpha = 16
target_modules = ["query", "value"]
[training]
output_dir = "runs/x"
learning_rate = 1e-3
"#;

    #[test]
    fn parses_with_defaults_and_overrides() {
        let r = Recipe::parse(
            BASE,
            &[
                "training.num_train_epochs=1".into(),
                "lora.r=4".into(),
                "data.text_column=sentence".into(),
            ],
        )
        .unwrap();
        assert_eq!(r.method, Method::Lora);
        assert_eq!(r.training.num_train_epochs, 1.0);
        assert_eq!(r.training.per_device_train_batch_size, 8);
        assert_eq!(r.lora.as_ref().unwrap().r, 4);
        assert_eq!(r.data.text_column, "sentence");
        assert_eq!(r.data.max_length, 128);
        assert!(r.model.ends_with("minilm") && !r.model.to_string_lossy().contains('<'));
        let back = Recipe::parse(&r.to_toml(), &[]).unwrap();
        assert_eq!(back.lora, r.lora);
    }

    #[test]
    fn unknown_keys_and_missing_lora_are_errors() {
        let e = Recipe::parse(&BASE.replace("learning_rate", "learning_rat"), &[]).unwrap_err();
        assert!(e.contains("learning_rat"), "{e}");
        let e = Recipe::parse(
            &BASE.replace(
                "[lora]\nr = 8\nlora_alpha = 16\ntarget_modules = [\"query\", \"value\"]\n",
                "",
            ),
            &[],
        )
        .unwrap_err();
        assert!(e.contains("[lora]"), "{e}");
    }
}
