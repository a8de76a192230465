//! The recipe of a run (`whet train RECIPE.toml`): model, task, method, data, method options
//! and `TrainingArguments`, with `--set key=value` overrides and `<cache>` expansion.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use whet_data::{Side, Template, TooLong};
use whet_peft::{BottleneckConfig, Ia3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig};

use crate::args::TrainingArguments;
use crate::error::{Result, TrainError};

/// What is learnt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum TaskKind {
    /// One label per text (or text pair): softmax and cross-entropy.
    #[default]
    SequenceClassification,
    /// Any number of labels per text: one sigmoid per label and binary cross-entropy, as
    /// `problem_type = "multi_label_classification"` in `transformers`. The label column
    /// holds lists of class names or ids.
    MultiLabelClassification,
    /// One real number per text (or text pair): a one-output head and the mean squared error,
    /// as `problem_type = "regression"` in `transformers` (STS-B's similarity scores).
    /// `sequence-classification` becomes this when its labels are real numbers, as
    /// `run_glue.py` decides from a float label column.
    Regression,
    /// A tag per word (named entities, parts of speech), as `run_ner.py` trains
    /// `AutoModelForTokenClassification`: a list of words and a list of tags a row (`tokens` /
    /// `ner_tags`), seqeval's entity metrics. BERT (WordPiece) models.
    TokenClassification,
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
    pub fn apply<T: Clone>(&self, all: &[T]) -> Result<Parts<T>> {
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
        )?;
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
    /// Which end a too-long text loses: "right" keeps the start, "left" the end. Absent, each
    /// task uses its reference's default (see [`DataSpec::side`]); question answering and
    /// `block_size` blocks cut nothing, so a value there is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncation_side: Option<Side>,
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
    /// The leakage check before training (exact and near duplicates between the splits and
    /// within train): "warn" (default: report them), "error" (refuse to train when a held-out
    /// split repeats training rows), "off".
    #[serde(default)]
    pub leakage: whet_data::leakage::Mode,
    /// causal-lm: a prompt / completion template, `"alpaca"` or `{ prompt = "...", completion =
    /// "..." }` with `{field}` placeholders naming columns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<TemplateSpec>,
    /// causal-lm: a column of conversations (lists of `{role, content}`), rendered with the
    /// tokenizer's chat template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages_column: Option<String>,
    /// The chat template to render conversations with, in place of the tokenizer's (trl's
    /// `chat_template_path`): a `.jinja` / `.j2` file, or a model folder whose tokenizer holds
    /// one (its template only: unlike trl's `clone_chat_template`, no tokens are added). For
    /// tokenizers without a template (many GGUF files) and to change the format; it is saved
    /// with the model (`chat_template.jinja`). Causal LM, reward models, DPO and PPO.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template_path: Option<PathBuf>,
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
    /// The template `chat_template_path` names: the file's text, or the template of the
    /// tokenizer in the folder it names; `None` without the key.
    pub fn chat_template(&self) -> Result<Option<String>> {
        let Some(path) = &self.chat_template_path else {
            return Ok(None);
        };
        let bad = |message: String| TrainError::option("data.chat_template_path", message);
        if path.is_dir() {
            let tok = whet_models::TextTokenizer::from_folder(path)?;
            return tok.chat_template.map(Some).ok_or_else(|| {
                bad(format!(
                    "= {:?}: the tokenizer in that folder has no chat template",
                    path.display().to_string()
                ))
            });
        }
        let jinja = path.extension().is_some_and(|e| e == "jinja" || e == "j2");
        if !jinja {
            return Err(bad(format!(
                "= {:?}: a template file ends in .jinja or .j2 (as trl reads it), or name a \
                 model folder whose tokenizer has a chat template",
                path.display().to_string()
            )));
        }
        let text = std::fs::read_to_string(path).map_err(|e| {
            bad(format!(
                "= {:?}: {e} (a Jinja file, or a model folder whose tokenizer has a chat template)",
                path.display().to_string()
            ))
        })?;
        Ok(Some(text))
    }

    /// The truncation side: the recipe's, else `default` (the task reference's).
    pub fn side(&self, default: Side) -> Side {
        self.truncation_side.unwrap_or(default)
    }

    /// The train, validation and test parts: the files as given, or a seeded `split` of the
    /// training file when it is the only one.
    pub fn parts<T: Clone>(
        &self,
        train: Vec<T>,
        validation: Option<Vec<T>>,
        test: Option<Vec<T>>,
    ) -> Result<Parts<T>> {
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
    pub fn resolve(&self) -> Result<Template> {
        match self {
            TemplateSpec::Custom(t) => Ok(t.clone()),
            TemplateSpec::Named(n) if n == "alpaca" => Ok(Template::alpaca()),
            TemplateSpec::Named(n) => Err(TrainError::UnknownTemplate { name: n.clone() }),
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
    /// Model folder or .gguf file, or a Hub repo id (`ORG/NAME`): a local path always wins.
    pub model: PathBuf,
    /// The Hub revision (branch, tag or commit) of a repo-id model: `from_pretrained`'s
    /// `revision` (default main).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// The GGUF file inside the model's Hub repo or local folder: `from_pretrained`'s
    /// `gguf_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gguf_file: Option<String>,
    /// What `model` said before [`Recipe::fetch`] made it a local path.
    #[serde(skip)]
    pub model_spec: Option<PathBuf>,
    #[serde(default)]
    pub task: TaskKind,
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
    pub dpo: Option<DpoConfig>,
    /// `task = "ppo"`'s settings.
    #[serde(default)]
    pub ppo: Option<PpoConfig>,
    /// What whet measures beyond the held-out splits.
    #[serde(default)]
    pub eval: EvalSpec,
    pub training: TrainingArguments,
}

/// `[eval]`: what whet measures beyond the held-out splits: the forgetting report of decoder
/// fine-tuning and samples at each evaluation.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSpec {
    /// Held-out general text whose perplexity is measured before and after training (a `.txt`
    /// file, or a table whose text fields are read). Default: the asset cache's OpenWebText
    /// sample, `<cache>/data/evals/schelling_point/owt_5.jsonl`, when it was fetched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub general_text: Option<PathBuf>,
    /// Tokens of it to read, in blocks of `data.max_length` (0: no forgetting report).
    #[serde(default = "d_general_tokens")]
    pub general_tokens: usize,
    /// causal-lm: greedy continuations (32 tokens) of this many held-out prompts at every
    /// evaluation, kept in `trainer_state.json` and tabled in `samples.md` (0: none).
    #[serde(default)]
    pub generate: usize,
}

impl Default for EvalSpec {
    fn default() -> Self {
        Self {
            general_text: None,
            general_tokens: d_general_tokens(),
            generate: 0,
        }
    }
}

fn d_general_tokens() -> usize {
    4096
}

impl EvalSpec {
    /// The general text file: the one given, else the default when the asset cache has it.
    pub fn general_text_path(&self) -> Option<PathBuf> {
        if self.general_tokens == 0 {
            return None;
        }
        self.general_text.clone().or_else(|| {
            let p = cache_dir().join("data/evals/schelling_point/owt_5.jsonl");
            p.is_file().then_some(p)
        })
    }
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
fn set(root: &mut toml::Table, key: &str, raw: &str) -> Result<()> {
    let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts
        .pop()
        .filter(|l| !l.is_empty())
        .ok_or_else(|| TrainError::Override {
            key: key.to_string(),
            message: "empty key".into(),
        })?;
    let mut table = root;
    for part in parts {
        let entry = table
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry.as_table_mut().ok_or_else(|| TrainError::Override {
            key: key.to_string(),
            message: format!("{part} is not a table"),
        })?;
    }
    table.insert(last.to_string(), value);
    Ok(())
}

/// An adapter configuration with every default its serde impl declares (peft's), as an
/// empty table gives it.
fn peft_defaults<T: serde::de::DeserializeOwned>() -> Result<T> {
    Ok(toml::Value::Table(toml::Table::new()).try_into()?)
}

/// Refuses a key that no table of the recipe knows, naming the table and the closest valid
/// key (see [`crate::keys`]).
fn check_keys(root: &toml::Table) -> Result<()> {
    use crate::keys::{check_table, fields_of};
    check_table(root, "", fields_of::<Recipe>())?;
    let tables: [(&str, &[&str]); 13] = [
        ("data", fields_of::<DataSpec>()),
        ("lora", fields_of::<LoraConfig>()),
        ("ia3", fields_of::<Ia3Config>()),
        ("bottleneck", fields_of::<BottleneckConfig>()),
        ("prefix_tuning", fields_of::<PrefixTuningConfig>()),
        ("prompt_tuning", fields_of::<PromptTuningConfig>()),
        ("quantization", fields_of::<QuantizationSpec>()),
        ("head", fields_of::<HeadSpec>()),
        ("dpo", fields_of::<DpoConfig>()),
        ("ppo", fields_of::<PpoConfig>()),
        ("eval", fields_of::<EvalSpec>()),
        ("training", fields_of::<TrainingArguments>()),
        ("data.split", fields_of::<SplitSpec>()),
    ];
    for (name, valid) in tables {
        let mut at = Some(root);
        for part in name.split('.') {
            at = at.and_then(|t| t.get(part)).and_then(|v| v.as_table());
        }
        if let Some(t) = at {
            check_table(t, name, valid)?;
        }
    }
    if let Some(t) = root
        .get("data")
        .and_then(|d| d.get("template"))
        .and_then(|v| v.as_table())
    {
        check_table(t, "data.template", fields_of::<Template>())?;
    }
    Ok(())
}

/// `method = "qlora"` is LoRA over a 4-bit base: `[quantization]` may say how, but not that
/// the base stays unquantised or keeps a GGUF file's blocks (that is `method = "lora"` with
/// `keep_gguf_quantized`). An absent `load_in_4bit` is set, so the table's other keys (double
/// quantisation) apply to the 4-bit base they describe.
fn qlora_means_4bit(root: &mut toml::Table) -> Result<()> {
    if root.get("method").and_then(|m| m.as_str()) != Some("qlora") {
        return Ok(());
    }
    let Some(q) = root.get_mut("quantization").and_then(|v| v.as_table_mut()) else {
        return Ok(());
    };
    if q.get("keep_gguf_quantized").and_then(|v| v.as_bool()) == Some(true) {
        return Err(TrainError::Recipe(
            "method = \"qlora\" quantises the base to NF4, but quantization.keep_gguf_quantized \
             = true keeps the GGUF file's own blocks: use method = \"lora\" for that"
                .into(),
        ));
    }
    match q.get("load_in_4bit").and_then(|v| v.as_bool()) {
        Some(false) => Err(TrainError::Recipe(
            "method = \"qlora\" means a 4-bit base, but quantization.load_in_4bit = false: \
             use method = \"lora\" for an unquantised base"
                .into(),
        )),
        _ => {
            q.insert("load_in_4bit".into(), toml::Value::Boolean(true));
            Ok(())
        }
    }
}

/// Recipe text as a table, with `key=value` overrides applied.
fn overridden(text: &str, overrides: &[String]) -> Result<toml::Table> {
    let mut table: toml::Table = toml::from_str(text)?;
    for o in overrides {
        let (k, v) = o
            .split_once('=')
            .ok_or_else(|| TrainError::OverrideSyntax { arg: o.clone() })?;
        set(&mut table, k.trim(), v.trim())?;
    }
    Ok(table)
}

impl Recipe {
    /// `training.padding_free` as set, or the task's default: on for every task but question
    /// answering (see [`crate::TrainingArguments::padding_free`]).
    pub fn padding_free(&self) -> bool {
        self.training
            .padding_free_or(self.task != TaskKind::QuestionAnswering)
    }

    /// Reads a recipe file and applies `key=value` overrides.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| TrainError::RecipeRead {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, overrides).map_err(|e| TrainError::InRecipe {
            path: path.to_path_buf(),
            source: Box::new(e),
        })
    }

    /// Reads a recipe as [`Recipe::load`] does, then fills in peft's defaults for the model's
    /// architecture ([`Recipe::resolve_peft_defaults`]); the second value says what was chosen.
    pub fn load_for_model(path: &Path, overrides: &[String]) -> Result<(Self, Option<String>)> {
        let mut recipe = Self::load(path, overrides)?;
        recipe.fetch()?;
        let note = match recipe.method {
            Method::Lora | Method::Qlora | Method::Ia3 => {
                let checkpoint = whet_models::Checkpoint::open(&recipe.model)?;
                recipe.resolve_peft_defaults(checkpoint.model_type())?
            }
            _ => None,
        };
        Ok((recipe, note))
    }

    /// Recipe text with `key=value` overrides written into it (only the keys it has and the
    /// ones overridden, unlike [`Recipe::to_toml`]'s every resolved key).
    pub fn with_overrides(text: &str, overrides: &[String]) -> Result<String> {
        let table = overridden(text, overrides)?;
        check_keys(&table)?;
        toml::to_string(&table).map_err(|e| TrainError::Recipe(e.to_string()))
    }

    /// Parses recipe text and applies `key=value` overrides.
    pub fn parse(text: &str, overrides: &[String]) -> Result<Self> {
        let mut table = overridden(text, overrides)?;
        check_keys(&table)?;
        qlora_means_4bit(&mut table)?;
        let mut recipe: Recipe = toml::Value::Table(table).try_into()?;
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
        if let Some(p) = recipe.data.chat_template_path.as_mut() {
            *p = expand(p);
        }
        if let Some(p) = recipe.eval.general_text.as_mut() {
            *p = expand(p);
        }
        if let Some(p) = recipe.ppo.as_mut() {
            p.reward_model = expand(&p.reward_model);
        }
        match recipe.method {
            Method::PrefixTuning if recipe.prefix_tuning.is_none() => {
                return Err(TrainError::Recipe(
                    "method = \"prefix_tuning\" needs a [prefix_tuning] table (at least \
                     num_virtual_tokens)"
                        .into(),
                ));
            }
            Method::PromptTuning if recipe.prompt_tuning.is_none() => {
                return Err(TrainError::Recipe(
                    "method = \"prompt_tuning\" needs a [prompt_tuning] table (at least \
                     num_virtual_tokens)"
                        .into(),
                ));
            }
            Method::PrefixTuning | Method::PromptTuning if recipe.data.packing => {
                return Err(TrainError::Recipe(
                    "data.packing = true cannot combine with prefix or prompt tuning: the \
                     virtual tokens would sit in front of only the first packed example"
                        .into(),
                ));
            }
            _ => {}
        }
        if let Some(q) = &recipe.quantization {
            if !q.load_in_4bit && !q.keep_gguf_quantized {
                return Err(TrainError::Recipe(
                    "[quantization] quantises nothing: set load_in_4bit = true (NF4) or \
                     keep_gguf_quantized = true (a GGUF file's own blocks), or remove the table"
                        .into(),
                ));
            }
            if !recipe.method.is_adapter() {
                return Err(TrainError::Recipe(
                    "[quantization] freezes the base: use it with method = \"lora\", \"qlora\" \
                     or \"ia3\", not full or head training"
                        .into(),
                ));
            }
            if q.bnb_4bit_quant_type != "nf4" {
                return Err(TrainError::option(
                    "quantization.bnb_4bit_quant_type",
                    format!("= {:?}: only \"nf4\" is implemented", q.bnb_4bit_quant_type),
                ));
            }
            if q.load_in_4bit && q.keep_gguf_quantized {
                return Err(TrainError::Recipe(
                    "quantization: load_in_4bit and keep_gguf_quantized exclude each other (NF4 \
                     of the f32 weights, or the GGUF file's own blocks)"
                        .into(),
                ));
            }
        }
        // [eval]'s measures exist for some tasks only: set elsewhere, they are refused.
        let decoder_lm = matches!(recipe.task, TaskKind::CausalLm | TaskKind::Dpo);
        if !decoder_lm
            && (recipe.eval.general_text.is_some()
                || recipe.eval.general_tokens != d_general_tokens())
        {
            return Err(TrainError::option(
                "eval.general_text / eval.general_tokens",
                "the forgetting report measures a language model: task = \"causal-lm\" or \
                 \"dpo\"",
            ));
        }
        let chats = matches!(
            recipe.task,
            TaskKind::CausalLm | TaskKind::RewardModel | TaskKind::Dpo | TaskKind::Ppo
        );
        if recipe.data.chat_template_path.is_some() && !chats {
            return Err(TrainError::option(
                "data.chat_template_path",
                "a chat template renders conversations of task = \"causal-lm\", \
                 \"reward-model\", \"dpo\" or \"ppo\"",
            ));
        }
        if recipe.task == TaskKind::Regression && recipe.data.label_names.is_some() {
            return Err(TrainError::option(
                "data.label_names",
                "names classes, and task = \"regression\" predicts one number a text; leave it \
                 out, or train task = \"sequence-classification\" over those classes",
            ));
        }
        if recipe.eval.generate > 0 && recipe.task != TaskKind::CausalLm {
            return Err(TrainError::option(
                "eval.generate",
                "samples during training continue held-out prompts of task = \"causal-lm\"",
            ));
        }
        if let Some(side) = recipe.data.truncation_side {
            let meaningless = if recipe.task == TaskKind::QuestionAnswering {
                Some(
                    "question answering cuts a long context into doc_stride windows, not at one end",
                )
            } else if recipe.task == TaskKind::CausalLm && recipe.data.block_size.is_some() {
                Some("data.block_size cuts the text stream into blocks; no example is truncated")
            } else if recipe.task == TaskKind::CausalLm && recipe.data.too_long != TooLong::Truncate
            {
                Some(
                    "causal-lm truncates only with data.too_long = \"truncate\" (now a too-long \
                     example is an error or skipped)",
                )
            } else {
                None
            };
            if let Some(why) = meaningless {
                return Err(TrainError::option(
                    "data.truncation_side",
                    format!(
                        "= \"{}\" means nothing here: {why}",
                        match side {
                            Side::Right => "right",
                            Side::Left => "left",
                        }
                    ),
                ));
            }
        }
        recipe.training.validate()?;
        Ok(recipe)
    }

    /// Fills in what peft's `LoraConfig()` / `IA3Config()` choose when a recipe leaves it
    /// out: the whole `[lora]` / `[ia3]` table (r 8, alpha 8, dropout 0), and target modules
    /// (and IA3's feed-forward modules) from peft's table for the model's `model_type`.
    /// Returns a line saying what was chosen, to print; None when nothing was missing.
    pub fn resolve_peft_defaults(&mut self, model_type: &str) -> Result<Option<String>> {
        use whet_peft::defaults::{ia3_modules, lora_target_modules};
        let owned = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let unknown = |table: &'static str, what: &'static str| TrainError::NoPeftDefault {
            table,
            what,
            model_type: model_type.to_string(),
        };
        match self.method {
            Method::Lora | Method::Qlora => {
                let absent = self.lora.is_none();
                let lora = match &mut self.lora {
                    Some(l) => l,
                    None => self.lora.insert(peft_defaults::<LoraConfig>()?),
                };
                if !lora.target_modules.is_empty() {
                    return Ok(None);
                }
                let targets = lora_target_modules(model_type)
                    .ok_or_else(|| unknown("lora", "target_modules"))?;
                lora.target_modules = owned(targets);
                Ok(Some(format!(
                    "{}: target_modules = {:?} (peft's default for {model_type}){}",
                    if absent {
                        "no [lora] table, so peft's LoraConfig()"
                    } else {
                        "[lora]"
                    },
                    lora.target_modules,
                    if absent {
                        ", r = 8, lora_alpha = 8, lora_dropout = 0"
                    } else {
                        ""
                    },
                )))
            }
            Method::Ia3 => {
                let absent = self.ia3.is_none();
                let ia3 = match &mut self.ia3 {
                    Some(i) => i,
                    None => self.ia3.insert(peft_defaults::<Ia3Config>()?),
                };
                if !ia3.target_modules.is_empty() && ia3.feedforward_modules.is_some() {
                    return Ok(None);
                }
                let (targets, feedforward) =
                    ia3_modules(model_type).ok_or_else(|| unknown("ia3", "target_modules"))?;
                if ia3.target_modules.is_empty() {
                    ia3.target_modules = owned(targets);
                }
                if ia3.feedforward_modules.is_none() {
                    // peft takes its feed-forward list whole and then requires a subset of the
                    // targets; keeping the part that is a target spares that error.
                    let chosen = &ia3.target_modules;
                    ia3.feedforward_modules = Some(
                        owned(feedforward)
                            .into_iter()
                            .filter(|f| chosen.contains(f))
                            .collect(),
                    );
                }
                Ok(Some(format!(
                    "{}: target_modules = {:?}, feedforward_modules = {:?} (peft's defaults for \
                     {model_type})",
                    if absent {
                        "no [ia3] table, so peft's IA3Config()"
                    } else {
                        "[ia3]"
                    },
                    ia3.target_modules,
                    ia3.feedforward_modules.as_deref().unwrap_or_default(),
                )))
            }
            _ => Ok(None),
        }
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
        match &self.model_spec {
            Some(spec) => {
                let mut given = self.clone();
                given.model = spec.clone();
                toml::to_string_pretty(&given).unwrap_or_default()
            }
            None => toml::to_string_pretty(self).unwrap_or_default(),
        }
    }

    /// Makes the model (and PPO's reward model) local paths: a Hub repo id is downloaded into
    /// the Hugging Face cache at `revision` (its `gguf_file` alone for a GGUF repo), or found
    /// there offline; a folder with `gguf_file` becomes that file. [`Recipe::to_toml`] still
    /// writes what the recipe said.
    pub fn fetch(&mut self) -> Result<()> {
        if self.model_spec.is_some() {
            return Ok(());
        }
        // A missing path that is no repo id is left to the loader, whose error names it.
        let hub_id = |p: &Path| !p.exists() && whet_hub::check_id(&p.to_string_lossy()).is_ok();
        if self.revision.is_some() || self.gguf_file.is_some() || hub_id(&self.model) {
            let local = whet_hub::model_path(
                &self.model,
                self.revision.as_deref(),
                self.gguf_file.as_deref(),
            )
            .map_err(whet_models::ModelError::from)?;
            self.model_spec = Some(std::mem::replace(&mut self.model, local));
        }
        if let Some(p) = self.ppo.as_mut()
            && hub_id(&p.reward_model)
        {
            p.reward_model = whet_hub::model_path(&p.reward_model, None, None).map_err(|e| {
                TrainError::Recipe(format!(
                    "ppo.reward_model {}: {e}",
                    p.reward_model.display()
                ))
            })?;
        }
        Ok(())
    }

    /// How an adapter names its base (`base_model_name_or_path`): the Hub repo id the recipe
    /// gave, else the model's absolute path.
    pub fn base_model_name(&self) -> String {
        match &self.model_spec {
            Some(spec) if !spec.exists() => spec.to_string_lossy().into_owned(),
            _ => self
                .model
                .canonicalize()
                .unwrap_or_else(|_| self.model.clone())
                .to_string_lossy()
                .into_owned(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The preference-tuning tables.

/// Which DPO loss (`loss_type` of `DPOConfig`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DpoLossType {
    /// The DPO paper's loss.
    #[default]
    Sigmoid,
    /// Identity preference optimisation (Azar et al. 2023), length-normalised as trl does.
    Ipo,
}

/// The `[dpo]` table of a recipe (`DPOConfig`'s names and defaults).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpoConfig {
    /// How far the policy may move from the reference (the KL weight).
    #[serde(default = "default_beta")]
    pub beta: f64,
    #[serde(default)]
    pub loss_type: DpoLossType,
    /// Computes the reference's log-probabilities once, before training, instead of one extra
    /// forward pass per step (trl's `precompute_ref_log_probs`). The reference is frozen and
    /// runs in evaluation mode, so both give the same numbers.
    #[serde(default)]
    pub precompute_ref_log_probs: bool,
}

fn default_beta() -> f64 {
    0.1
}

impl Default for DpoConfig {
    fn default() -> Self {
        Self {
            beta: default_beta(),
            loss_type: DpoLossType::default(),
            precompute_ref_log_probs: false,
        }
    }
}

/// The `[ppo]` table of a recipe (the names and defaults of trl's `PPOConfig`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PpoConfig {
    /// A reward model folder: a one-output `*ForSequenceClassification` (`task =
    /// "reward-model"` writes one).
    pub reward_model: PathBuf,
    /// Passes over each batch of rollouts.
    #[serde(default = "d_ppo_epochs")]
    pub num_ppo_epochs: usize,
    /// Optimizer steps per pass (the rollout batch is cut into this many minibatches).
    #[serde(default = "d_one")]
    pub num_mini_batches: usize,
    /// Weight of the per-token KL penalty to the reference.
    #[serde(default = "d_kl_coef")]
    pub kl_coef: f64,
    /// Clip range of the policy ratio.
    #[serde(default = "d_clip")]
    pub cliprange: f64,
    /// Weight of the value loss.
    #[serde(default = "d_vf_coef")]
    pub vf_coef: f64,
    /// Clip range of the value update.
    #[serde(default = "d_clip")]
    pub cliprange_value: f64,
    #[serde(default = "d_gamma")]
    pub gamma: f64,
    /// GAE's lambda.
    #[serde(default = "d_lam")]
    pub lam: f64,
    /// Whiten the rewards (before GAE) too.
    #[serde(default)]
    pub whiten_rewards: bool,
    /// Sampling temperature; log-probabilities are of the tempered distribution, as in trl.
    #[serde(default = "d_temperature")]
    pub temperature: f64,
    /// New tokens per response at most (a response ends at EOS).
    #[serde(default = "d_response_length")]
    pub response_length: usize,
    /// Subtracted from the score of a response that did not reach EOS.
    #[serde(default)]
    pub missing_eos_penalty: Option<f64>,
    /// The prompt column of a table (a table of preference pairs gives its prompts).
    #[serde(default = "d_prompt_column")]
    pub prompt_column: String,
    /// Tokens of prompt + response the reward model reads (the start of a longer text is cut).
    #[serde(default = "d_reward_max_length")]
    pub reward_max_length: usize,
    /// Responses sampled per held-out prompt at each evaluation (their scores are averaged).
    #[serde(default = "d_one")]
    pub eval_samples: usize,
}

fn d_ppo_epochs() -> usize {
    4
}
fn d_one() -> usize {
    1
}
fn d_kl_coef() -> f64 {
    0.05
}
fn d_clip() -> f64 {
    0.2
}
fn d_vf_coef() -> f64 {
    0.1
}
fn d_gamma() -> f64 {
    1.0
}
fn d_lam() -> f64 {
    0.95
}
fn d_temperature() -> f64 {
    0.7
}
fn d_response_length() -> usize {
    53
}
fn d_prompt_column() -> String {
    "prompt".into()
}
fn d_reward_max_length() -> usize {
    512
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
    fn every_table_refuses_an_unknown_key_naming_the_closest() {
        let cases: [(&str, &str, &str); 14] = [
            ("", "modle = \"x\"", "model"),
            ("data", "max_lenght = 64", "max_length"),
            ("data.split", "", "test"),
            ("lora", "lora_alfa = 32", "lora_alpha"),
            ("ia3", "target_module = [\"key\"]", "target_modules"),
            ("bottleneck", "reduction_factr = 8", "reduction_factor"),
            (
                "prefix_tuning",
                "num_virtual_token = 4",
                "num_virtual_tokens",
            ),
            (
                "prompt_tuning",
                "num_virtual_token = 4",
                "num_virtual_tokens",
            ),
            ("quantization", "load_in_4bits = true", "load_in_4bit"),
            ("head", "unfreeze_top_layer = 1", "unfreeze_top_layers"),
            ("dpo", "betta = 0.2", "beta"),
            ("ppo", "kl_coeff = 0.1", "kl_coef"),
            ("training", "learning_rat = 1", "learning_rate"),
            ("data.template", "", "prompt"),
        ];
        for (table, line, closest) in cases {
            let text = match table {
                "" => format!("{line}\n{BASE}"),
                "data.split" => BASE.replace("[data]\n", "[data]\nsplit = { tset = 0.2 }\n"),
                "data.template" => BASE.replace(
                    "[data]\n",
                    "[data]\ntemplate = { promt = \"Q\", completion = \"A\" }\n",
                ),
                "data" | "lora" | "training" => {
                    BASE.replace(&format!("[{table}]\n"), &format!("[{table}]\n{line}\n"))
                }
                _ => format!("{BASE}\n[{table}]\n{line}\n"),
            };
            let e = Recipe::parse(&text, &[]).unwrap_err().to_string();
            let place = if table.is_empty() {
                "top level".to_string()
            } else {
                format!("[{table}]")
            };
            assert!(
                e.contains(&place) && e.contains(&format!("closest valid key is {closest:?}")),
                "{table}: {e}"
            );
        }
        // Through --set too: the typo of the issue.
        let e = Recipe::parse(BASE, &["lora.lora_alfa=32".into()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"lora_alfa\" in [lora]") && e.contains("\"lora_alpha\""),
            "{e}"
        );
    }

    #[test]
    fn qlora_always_means_a_4bit_base() {
        let qlora = |extra: &str| {
            Recipe::parse(
                &format!(
                    "{}\n{extra}",
                    BASE.replace("method = \"lora\"", "method = \"qlora\"")
                ),
                &[],
            )
        };
        use whet_models::quant::QuantSpec;
        // No table, or a table that only says how: NF4.
        assert_eq!(
            qlora("").unwrap().quant_spec(),
            Some(QuantSpec::Nf4 { double_quant: true })
        );
        let r = qlora("[quantization]\nbnb_4bit_use_double_quant = false").unwrap();
        assert_eq!(
            r.quant_spec(),
            Some(QuantSpec::Nf4 {
                double_quant: false
            })
        );
        let r = qlora("[quantization]\nbnb_4bit_use_double_quant = true").unwrap();
        assert_eq!(r.quant_spec(), Some(QuantSpec::Nf4 { double_quant: true }));
        // A table that contradicts it.
        let e = qlora("[quantization]\nload_in_4bit = false")
            .unwrap_err()
            .to_string();
        assert!(e.contains("load_in_4bit = false"), "{e}");
        let e = qlora("[quantization]\nkeep_gguf_quantized = true")
            .unwrap_err()
            .to_string();
        assert!(e.contains("keep_gguf_quantized"), "{e}");
        // A [quantization] table that quantises nothing is refused for lora too.
        let e = Recipe::parse(
            &format!("{BASE}\n[quantization]\nbnb_4bit_use_double_quant = true"),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("quantises nothing"), "{e}");
    }

    #[test]
    fn peft_defaults_fill_a_missing_lora_or_ia3_table() {
        let no_table = BASE.replace(
            "[lora]\nr = 8\nlora_alpha = 16\ntarget_modules = [\"query\", \"value\"]\n",
            "",
        );
        let mut r = Recipe::parse(&no_table, &[]).unwrap();
        assert!(r.lora.is_none());
        let said = r.resolve_peft_defaults("llama").unwrap().unwrap();
        let l = r.lora.as_ref().unwrap();
        assert_eq!((l.r, l.lora_alpha, l.lora_dropout), (8, 8.0, 0.0));
        assert_eq!(l.target_modules, ["q_proj", "v_proj"]);
        assert!(
            said.contains("q_proj") && said.contains("LoraConfig()"),
            "{said}"
        );
        // A table without target_modules keeps its own values and gets peft's targets.
        let mut r = Recipe::parse(&no_table, &["lora.r=4".into()]).unwrap();
        r.resolve_peft_defaults("gpt2").unwrap();
        let l = r.lora.as_ref().unwrap();
        assert_eq!(
            (l.r, l.target_modules.clone()),
            (4, vec!["c_attn".to_string()])
        );
        // Named targets are left alone.
        let mut r = Recipe::parse(BASE, &[]).unwrap();
        assert!(r.resolve_peft_defaults("bert").unwrap().is_none());
        // peft has no default for DistilBERT: an error that says what to write.
        let mut r = Recipe::parse(&no_table, &[]).unwrap();
        let e = r
            .resolve_peft_defaults("distilbert")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("distilbert") && e.contains("target_modules"),
            "{e}"
        );
        // IA3: targets and feed-forward modules per architecture.
        let mut r = Recipe::parse(
            &no_table.replace("method = \"lora\"", "method = \"ia3\""),
            &[],
        )
        .unwrap();
        r.resolve_peft_defaults("qwen2").unwrap();
        let i = r.ia3.as_ref().unwrap();
        assert_eq!(i.target_modules, ["q_proj", "v_proj", "down_proj"]);
        assert_eq!(
            i.feedforward_modules.as_deref(),
            Some(&["down_proj".to_string()][..])
        );
        // Named targets without feed-forward modules: peft's list, kept to the targets.
        let mut r = Recipe::parse(
            &no_table.replace("method = \"lora\"", "method = \"ia3\""),
            &["ia3.target_modules=[\"key\", \"value\"]".into()],
        )
        .unwrap();
        r.resolve_peft_defaults("bert").unwrap();
        assert_eq!(
            r.ia3.as_ref().unwrap().feedforward_modules.as_deref(),
            Some(&[][..])
        );
    }

    #[test]
    fn truncation_side_is_refused_where_it_cuts_nothing() {
        let r = Recipe::parse(BASE, &[]).unwrap();
        assert_eq!(r.data.side(Side::Left), Side::Left);
        let r = Recipe::parse(BASE, &["data.truncation_side=\"left\"".into()]).unwrap();
        assert_eq!(r.data.side(Side::Right), Side::Left);
        let e = Recipe::parse(
            BASE,
            &[
                "task=\"question-answering\"".into(),
                "data.truncation_side=\"left\"".into(),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("doc_stride"), "{e}");
        let e = Recipe::parse(
            BASE,
            &[
                "task=\"causal-lm\"".into(),
                "data.block_size=64".into(),
                "data.truncation_side=\"right\"".into(),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("block_size"), "{e}");
        let lm = |too_long: &str| {
            Recipe::parse(
                BASE,
                &[
                    "task=\"causal-lm\"".into(),
                    format!("data.too_long=\"{too_long}\""),
                    "data.truncation_side=\"left\"".into(),
                ],
            )
        };
        assert!(lm("error").unwrap_err().to_string().contains("too_long"));
        assert_eq!(lm("truncate").unwrap().data.side(Side::Right), Side::Left);
    }

    /// `[eval]` keys a task does not use are refused, not ignored.
    #[test]
    fn eval_measures_are_refused_where_the_task_has_none() {
        let with = |task: &str, key: &str| {
            Recipe::parse(BASE, &[format!("task=\"{task}\""), key.to_string()])
        };
        for (task, key, ok) in [
            (
                "sequence-classification",
                "eval.general_text=\"g.txt\"",
                false,
            ),
            ("reward-model", "eval.general_tokens=128", false),
            ("sequence-classification", "eval.generate=2", false),
            ("dpo", "eval.generate=2", false),
            ("causal-lm", "eval.generate=2", true),
            ("causal-lm", "eval.general_text=\"g.txt\"", true),
            ("dpo", "eval.general_tokens=128", true),
        ] {
            let r = with(task, key);
            assert_eq!(r.is_ok(), ok, "{task} {key}: {r:?}");
            if let Err(e) = r {
                assert!(e.to_string().contains("eval."), "{e}");
            }
        }
    }
}
