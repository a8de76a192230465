//! Causal language modelling end to end (`task = "causal-lm"`): plain text (one example per
//! text, `block_size` blocks, or packed rows), prompt templates and chat conversations as
//! training examples; next-token loss on the part to learn; perplexity; and output the Python
//! world loads (a `transformers` folder, or a `peft` adapter with `task_type = "CAUSAL_LM"`).

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::Module;
use burn::tensor::{Device, Int, Tensor, TensorData};
use rayon::prelude::*;
use serde_json::Value;
use whet_data::{
    Encoding, IGNORE, Limit, LmExample, Table, chat, chat_completion, group_texts, pack,
    prompt_completion,
};
use whet_models::unpad::Unpadded;
use whet_models::{
    CausalLm, CausalModel, ChatMessage, Checkpoint, DecoderInput, Mode, TextTokenizer,
};
use whet_peft::{ParamCounts, PeftConfig};

use crate::error::{Result, TrainError};
use crate::recipe::{DataSpec, Recipe};
use crate::task::{Outcome, Report, Task, one_line};
use crate::trainer::{BatchCounts, Evaluation, Objective, Sample};

/// Next-token prediction; the loss averages over the learnt tokens of a step.
pub struct LanguageModelling {
    pub pad_id: u32,
    /// The model's soft-prompt positions (0 without prompt tuning): the first token of each row
    /// is then learnt too.
    pub soft_prompt: usize,
    /// Batches run without their padding (`training.padding_free`).
    pub padding_free: bool,
    /// Held-out prompts continued at each evaluation (`eval.generate`).
    pub sampler: Option<Sampler>,
}

/// Greedy continuations of a few held-out prompts, at each evaluation.
pub struct Sampler {
    pub tokenizer: TextTokenizer,
    /// Prompt token ids.
    pub prompts: Vec<Vec<u32>>,
    pub eos: Vec<u32>,
    pub max_new_tokens: usize,
}

impl Sampler {
    /// The prompts of `split`'s first `n` examples: the tokens before the first learnt one (for
    /// plain text, the first quarter, at most 32 tokens); a packed row's first document.
    pub fn prompts(split: &[LmExample], n: usize) -> Vec<Vec<u32>> {
        split
            .iter()
            .take(n)
            .map(|ex| {
                let doc_end = ex
                    .document_ids
                    .iter()
                    .position(|&d| d != ex.document_ids[0])
                    .unwrap_or(ex.ids.len());
                let first_learnt = (1..doc_end).find(|&k| ex.labels[k] != IGNORE).unwrap_or(1);
                let cut = if first_learnt > 1 {
                    first_learnt
                } else {
                    (doc_end / 4).clamp(1, 32)
                };
                ex.ids[..cut].to_vec()
            })
            .collect()
    }

    /// The sampler of a run (`eval.generate` > 0): the first held-out prompts (validation, else
    /// train).
    pub fn of(p: &LmPrepared, recipe: &Recipe) -> Option<Self> {
        let n = recipe.eval.generate;
        (n > 0).then(|| Sampler {
            tokenizer: p.tokenizer.clone(),
            prompts: Sampler::prompts(p.validation.as_deref().unwrap_or(&p.train), n),
            eos: p.checkpoint.eos_token_ids(),
            max_new_tokens: 32,
        })
    }

    /// Each prompt and the model's greedy continuation, as text.
    pub fn run(&self, model: &CausalModel, device: &Device) -> Result<Vec<Sample>> {
        let model = model.valid();
        let device = device.clone().without_autodiff();
        let config = whet_infer::GenerationConfig::greedy(self.max_new_tokens, self.eos.clone());
        let decode = |ids: &[u32]| self.tokenizer.inner.decode(ids, true).unwrap_or_default();
        self.prompts
            .iter()
            .map(|prompt| {
                let out = whet_infer::generate(&model, prompt, &config, &device, |_| true)?;
                Ok(Sample {
                    prompt: decode(prompt),
                    continuation: decode(&out),
                })
            })
            .collect()
    }
}

/// A right-padded batch of language-modelling rows.
#[derive(Debug, Clone)]
pub struct LmBatch {
    pub batch: usize,
    pub len: usize,
    pub input_ids: Vec<i64>,
    pub attention_mask: Vec<i64>,
    pub position_ids: Vec<i64>,
    /// Present when a row packs several documents.
    pub document_ids: Option<Vec<i64>>,
    /// Flat `row * len + t` of every position whose next token is learnt, and that token.
    pub predicting: Vec<i64>,
    pub targets: Vec<i64>,
    /// Per row, the first token's label (IGNORE when it is not learnt): after a soft prompt
    /// the last virtual position predicts it, as peft's prompt tuning learns it.
    pub first_labels: Vec<i64>,
    /// Real (non-pad) tokens.
    pub tokens: usize,
}

impl LmBatch {
    /// The learnt positions and their targets when the model puts `p` soft-prompt positions in
    /// front of each row: every position moves by `p`, and the last virtual position predicts
    /// the first token where that is learnt (peft prefixes the labels with `p` ignored ones).
    pub(crate) fn after_soft_prompt(&self, p: usize) -> (Vec<i64>, Vec<i64>) {
        if p == 0 {
            return (self.predicting.clone(), self.targets.clone());
        }
        let (len, wide) = (self.len as i64, (self.len + p) as i64);
        let mut predicting = Vec::with_capacity(self.predicting.len() + self.batch);
        let mut targets = Vec::with_capacity(predicting.capacity());
        for (row, &first) in self.first_labels.iter().enumerate() {
            if first != IGNORE {
                predicting.push(row as i64 * wide + p as i64 - 1);
                targets.push(first);
            }
        }
        for (&at, &t) in self.predicting.iter().zip(&self.targets) {
            predicting.push((at / len) * wide + at % len + p as i64);
            targets.push(t);
        }
        (predicting, targets)
    }
}

impl LanguageModelling {
    pub(crate) fn input(&self, b: &LmBatch, device: &Device) -> DecoderInput {
        let t = |v: &Vec<i64>| {
            Tensor::<2, Int>::from_data(TensorData::new(v.clone(), [b.batch, b.len]), device)
        };
        DecoderInput {
            input_ids: t(&b.input_ids),
            attention_mask: t(&b.attention_mask),
            position_ids: Some(t(&b.position_ids)),
            document_ids: b.document_ids.as_ref().map(t),
            unpadded: self
                .padding_free
                .then(|| Unpadded::from_mask(&b.attention_mask, b.batch, b.len)),
        }
    }

    /// Summed next-token cross-entropy of a batch. The LM head runs only at the positions
    /// whose next token is learnt: prompts and padding cost no vocabulary projection.
    fn loss(&self, model: &CausalModel, b: &LmBatch, mode: Mode, device: &Device) -> Tensor<1> {
        let hidden = model.forward_hidden(self.input(b, device), None, mode);
        let [rows, t, h] = hidden.dims();
        let (predicting, targets) = b.after_soft_prompt(model.virtual_positions());
        let n = predicting.len();
        if n == 0 {
            // Nothing to learn in this batch: a zero that still belongs to the graph.
            return hidden.sum().mul_scalar(0.0);
        }
        let index = Tensor::<1, Int>::from_data(TensorData::new(predicting, [n]), device);
        // (B, T, H) -> (B*T, H) -> (N, H)
        let picked = hidden.reshape([rows * t, h]).select(0, index);
        let targets: Vec<u32> = targets.iter().map(|&t| t as u32).collect();
        model.lm_cross_entropy_sum(picked, &targets)
    }
}

impl Objective for LanguageModelling {
    type Model = CausalModel;
    type Example = LmExample;
    type Batch = LmBatch;

    fn length(&self, example: &LmExample) -> usize {
        example.ids.len()
    }

    fn collate(&self, items: &[&LmExample]) -> LmBatch {
        let len = items.iter().map(|e| e.ids.len()).max().unwrap_or(1).max(1);
        let batch = items.len();
        let packed = items.iter().any(|e| e.document_ids.iter().any(|&d| d > 0));
        let mut b = LmBatch {
            batch,
            len,
            input_ids: vec![self.pad_id as i64; batch * len],
            attention_mask: vec![0; batch * len],
            position_ids: vec![0; batch * len],
            // Padding gets a document of its own, -1 (it is masked anyway).
            document_ids: packed.then(|| vec![-1; batch * len]),
            predicting: Vec::new(),
            targets: Vec::new(),
            first_labels: vec![IGNORE; batch],
            tokens: 0,
        };
        for (r, e) in items.iter().enumerate() {
            let at = r * len;
            for (k, &id) in e.ids.iter().enumerate() {
                b.input_ids[at + k] = id as i64;
                b.attention_mask[at + k] = 1;
                b.position_ids[at + k] = e.position_ids[k] as i64;
                if let Some(d) = &mut b.document_ids {
                    d[at + k] = e.document_ids[k] as i64;
                }
            }
            if let Some(&first) = e.labels.first() {
                b.first_labels[r] = first;
            }
            // Position k predicts the token at k + 1.
            for k in 0..e.ids.len().saturating_sub(1) {
                if e.labels[k + 1] != IGNORE {
                    b.predicting.push((at + k) as i64);
                    b.targets.push(e.labels[k + 1]);
                }
            }
            b.tokens += e.ids.len();
        }
        b
    }

    fn counts(&self, b: &LmBatch) -> BatchCounts {
        BatchCounts {
            units: b.targets.len()
                + if self.soft_prompt > 0 {
                    b.first_labels.iter().filter(|&&l| l != IGNORE).count()
                } else {
                    0
                },
            samples: b.batch,
            tokens: b.tokens,
            positions: b.batch * b.len,
        }
    }

    fn summed_loss(&self, model: &CausalModel, b: &LmBatch, device: &Device) -> Result<Tensor<1>> {
        Ok(self.loss(model, b, Mode::Train, device))
    }

    fn evaluate(
        &self,
        model: &CausalModel,
        data: &[LmExample],
        batch_size: usize,
        device: &Device,
    ) -> Result<Evaluation> {
        let (loss, _) = evaluate_lm(
            model,
            data,
            batch_size,
            self.pad_id,
            self.padding_free,
            device,
        );
        Ok(Evaluation {
            loss,
            metrics: BTreeMap::from([("perplexity".to_string(), loss.exp())]),
            report: None,
        })
    }

    fn samples(&self, model: &CausalModel, device: &Device) -> Result<Vec<Sample>> {
        match &self.sampler {
            Some(s) => s.run(model, device),
            None => Ok(vec![]),
        }
    }
}

/// Mean next-token loss over every learnt token of `data` (not a mean of batch means), and
/// the number of those tokens; perplexity is its exponential. `padding_free` runs the batches
/// without their padding.
pub fn evaluate_lm(
    model: &CausalModel,
    data: &[LmExample],
    batch_size: usize,
    pad_id: u32,
    padding_free: bool,
    device: &Device,
) -> (f64, usize) {
    let model = &model.valid();
    let device = &device.clone().without_autodiff();
    let objective = LanguageModelling {
        pad_id,
        soft_prompt: model.virtual_positions(),
        padding_free,
        sampler: None,
    };
    let (mut sum, mut units) = (0.0, 0);
    for chunk in data.chunks(batch_size.max(1)) {
        let items: Vec<&LmExample> = chunk.iter().collect();
        let b = objective.collate(&items);
        units += objective.counts(&b).units;
        sum += objective
            .loss(model, &b, Mode::Eval, device)
            .into_scalar::<f32>() as f64;
    }
    (sum / units.max(1) as f64, units)
}

/// The text of a general-text file for the forgetting report: a `.txt` file as it is; a table's
/// rows as their text fields joined (string values only, in column order), rows apart by a
/// blank line.
pub fn read_general_text(path: &Path) -> Result<String> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default();
    if ext == "txt" {
        return std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e));
    }
    let table = Table::read(path, whet_data::Encoding::Utf8)?;
    Ok(table
        .rows
        .iter()
        .map(|(_, row)| {
            row.values()
                .filter_map(|v| v.as_str())
                .collect::<Vec<_>>()
                .join("\n\n")
        })
        .collect::<Vec<_>>()
        .join("\n\n"))
}

/// Perplexity of `model` on the first `tokens` tokens of `text` (no special tokens added), in
/// blocks of `block` tokens as `run_clm.py` groups text: the exponential of the mean next-token
/// loss over every predicted token.
pub fn general_perplexity(
    model: &CausalModel,
    tokenizer: &TextTokenizer,
    text: &str,
    tokens: usize,
    block: usize,
    pad_id: u32,
    device: &Device,
) -> Result<f64> {
    let ids = encode_prefix(tokenizer, text, tokens)?;
    let block = block.clamp(2, ids.len().max(2));
    let blocks = whet_data::causal_lm::group_texts(&[ids], block);
    if blocks.is_empty() {
        return Err(TrainError::Recipe(format!(
            "eval.general_text has fewer than {block} tokens: too little for a perplexity"
        )));
    }
    let (loss, _) = evaluate_lm(model, &blocks, 8, pad_id, true, device);
    Ok(loss.exp())
}

/// The first `tokens` ids of `text` (no special tokens added), tokenizing as little of it as
/// that needs: a prefix ending after a line break, doubled until it yields more than `tokens`
/// ids with a margin, so that no kept id sits where the rest of the text could tokenize
/// differently. Why: the tokenizers crate keeps two offsets (16 bytes) per byte of the text and
/// copies of it per split, and the forgetting report's general text (7.6 MB by default) was
/// tokenized whole to read 4096 tokens: about 800 MB for a moment, the peak of a SmolLM2 LoRA
/// run (BENCHMARKS.md, session 21).
pub fn encode_prefix(tokenizer: &TextTokenizer, text: &str, tokens: usize) -> Result<Vec<u32>> {
    /// Ids beyond `tokens` that the prefix must yield: a few tokens' worth of bytes at the cut
    /// (a line break the text continues with more whitespace) tokenize differently alone.
    const MARGIN: usize = 16;
    let mut bytes = tokens.saturating_mul(8).max(1 << 12);
    loop {
        if bytes >= text.len() {
            let mut ids = tokenizer.encode(text, false)?;
            ids.truncate(tokens);
            return Ok(ids);
        }
        let mut end = bytes;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let end = text[..end].rfind('\n').map_or(end, |i| i + 1);
        let mut ids = tokenizer.encode(&text[..end], false)?;
        if ids.len() > tokens + MARGIN {
            ids.truncate(tokens);
            return Ok(ids);
        }
        bytes = bytes.saturating_mul(2);
    }
}

/// Everything a causal-LM run prepared before training.
pub struct LmPrepared {
    pub checkpoint: Checkpoint,
    pub tokenizer: TextTokenizer,
    pub train: Vec<LmExample>,
    pub validation: Option<Vec<LmExample>>,
    pub test: Option<Vec<LmExample>>,
    /// Examples left out: too long (with `too_long = "skip"`) or with nothing to learn.
    pub skipped: usize,
    pub pad_id: u32,
    pub model: CausalModel,
    pub counts: ParamCounts,
    /// The adapter method's configuration (None for full training).
    pub adapter: Option<PeftConfig>,
    /// How the data became examples, for the run's header.
    pub data_kind: String,
    /// The rows of each split (`train`, `validation`, `test`), as read: written to
    /// `OUT/data/` so another tool can repeat the run on the same split.
    pub rows: Vec<(&'static str, Vec<BTreeMap<String, Value>>)>,
}

/// A table's rows with their `path:line` origin.
fn rows(table: &Table) -> Vec<(String, BTreeMap<String, Value>)> {
    table
        .rows
        .iter()
        .map(|(line, row)| (table.origin(*line), row.clone()))
        .collect()
}

/// A row's conversation: a list of `{role, content}` objects.
fn messages(row: &BTreeMap<String, Value>, column: &str, origin: &str) -> Result<Vec<ChatMessage>> {
    let value = row.get(column).ok_or_else(|| {
        TrainError::row(
            origin,
            format!("no field {column:?} (data.messages_column)"),
        )
    })?;
    whet_data::causal_lm::chat_messages(value)
        .map_err(|m| TrainError::row(origin, format!("field {column:?}: {m}")))
}

/// The assistant turn(s) of a row's `completion_column`.
fn completion(
    row: &BTreeMap<String, Value>,
    column: &str,
    origin: &str,
) -> Result<Vec<ChatMessage>> {
    let assistant = |s: &str| ChatMessage {
        role: "assistant".into(),
        content: s.to_string(),
    };
    match row.get(column) {
        Some(Value::String(s)) => Ok(vec![assistant(s)]),
        Some(Value::Array(items)) => match items.first() {
            Some(Value::String(s)) => Ok(vec![assistant(s)]),
            Some(Value::Object(_)) => messages(row, column, origin),
            _ => Err(TrainError::row(
                origin,
                format!("field {column:?} holds no answer"),
            )),
        },
        Some(other) => Err(TrainError::row(
            origin,
            format!("field {column:?} is not text ({other})"),
        )),
        None => Err(TrainError::row(
            origin,
            format!("no field {column:?} (data.completion_column)"),
        )),
    }
}

/// A row's text from `data.text_column`.
fn text<'a>(row: &'a BTreeMap<String, Value>, column: &str, origin: &str) -> Result<&'a str> {
    match row.get(column) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(TrainError::row(
            origin,
            format!("field {column:?} is not text ({other})"),
        )),
        None => Err(TrainError::row(
            origin,
            format!("no field {column:?} (data.text_column)"),
        )),
    }
}

/// Turns rows into examples as the data options say; returns them and the number skipped.
fn build(
    d: &DataSpec,
    tokenizer: &TextTokenizer,
    rows: &[(String, BTreeMap<String, Value>)],
) -> Result<(Vec<LmExample>, usize)> {
    let learn_all = !d.completion_only_loss;
    // trl's SFTTrainer keeps the start (`truncation_mode = "keep_start"`).
    let limit = Limit {
        max_length: d.max_length,
        too_long: d.too_long,
        side: d.side(whet_data::Side::Right),
    };
    let template = d.template.as_ref().map(|t| t.resolve()).transpose()?;
    if let Some(block) = d.block_size {
        // run_clm.py: tokenize every text, concatenate, cut into blocks.
        let docs: Vec<Vec<u32>> = rows
            .par_iter()
            .map(|(origin, row)| {
                let t = text(row, &d.text_column, origin)?;
                tokenizer
                    .encode(t, true)
                    .map_err(|e| TrainError::encode(origin, e))
            })
            .collect::<Result<_>>()?;
        return Ok((group_texts(&docs, block), 0));
    }
    let made: Vec<Option<LmExample>> = rows
        .par_iter()
        .map(|(origin, row)| -> Result<Option<LmExample>> {
            let ex = if let Some(col) = &d.messages_column {
                let msgs = messages(row, col, origin)?;
                match &d.completion_column {
                    // trl's prompt-completion data: only the completion is learnt, not the
                    // assistant turns (few-shot answers) inside the prompt.
                    Some(c) => {
                        let answer = completion(row, c, origin)?;
                        chat_completion(tokenizer, &msgs, &answer, learn_all, limit, origin)
                    }
                    None => chat(tokenizer, &msgs, learn_all, limit, origin),
                }
            } else if let Some(t) = &template {
                let (prompt, completion) = t.render(row, origin)?;
                prompt_completion(tokenizer, &prompt, &completion, learn_all, limit, origin)
            } else {
                // A whole text is learnt, then EOS so the model learns where texts end.
                let t = text(row, &d.text_column, origin)?;
                prompt_completion(tokenizer, "", t, true, limit, origin)
            };
            Ok(ex?)
        })
        .collect::<Result<_>>()?;
    let mut skipped = 0;
    let mut out = Vec::with_capacity(made.len());
    for ex in made {
        match ex {
            // The first token is never predicted: an example needs a learnt token after it.
            Some(e) if e.labels.iter().skip(1).any(|&l| l != IGNORE) => out.push(e),
            _ => skipped += 1,
        }
    }
    if d.packing {
        out = pack(&out, limit.max_length);
    }
    Ok((out, skipped))
}

/// Opens the recipe's model as a decoder (with the recipe's quantization policy), its
/// tokenizer, and the id to pad with (pad, else EOS); `task` names the task in the error.
pub fn open_decoder(recipe: &Recipe, task: &str) -> Result<(Checkpoint, TextTokenizer, u32)> {
    let mut checkpoint = Checkpoint::open(&recipe.model)?;
    checkpoint.quantization = crate::method::quant_policy(recipe, &[]);
    if !checkpoint.family().is_decoder() {
        return Err(TrainError::NeedsDecoder {
            task: task.to_string(),
            model: recipe.model.clone(),
            family: checkpoint.family().to_string(),
        });
    }
    let mut tokenizer = checkpoint.tokenizer()?;
    if let Some(template) = recipe.data.chat_template()? {
        tokenizer.chat_template = Some(template);
    }
    let pad_id = checkpoint
        .pad_token_id()
        .or(tokenizer.pad.as_ref().map(|p| p.id))
        .or(tokenizer.eos.as_ref().map(|p| p.id))
        .ok_or_else(|| {
            TrainError::Unsuitable(format!(
                "{}: no pad or EOS token to pad with",
                recipe.model.display()
            ))
        })?;
    Ok((checkpoint, tokenizer, pad_id))
}

/// Applies the recipe's method to a decoder: full training, or an adapter (`head` has no
/// meaning without a classification head). Returns the parameter counts and the adapter's
/// configuration.
pub fn apply_decoder_method(
    model: &mut CausalModel,
    recipe: &Recipe,
    tokenizer: &TextTokenizer,
    device: &Device,
) -> Result<(ParamCounts, Option<PeftConfig>)> {
    crate::method::apply(model, recipe, None, &[], tokenizer, device)
}

/// Reads and tokenizes the data, loads the decoder and applies the method.
pub fn prepare(recipe: &Recipe, device: &Device) -> Result<LmPrepared> {
    let d = &recipe.data;
    let enc: Encoding = d.encoding.parse().map_err(TrainError::Encoding)?;
    let read = |p: &Path| Table::read(p, enc).map_err(TrainError::from);
    let (checkpoint, tokenizer, pad_id) = open_decoder(recipe, "causal-lm")?;
    let limit = d.block_size.unwrap_or(d.max_length);
    if limit > checkpoint.max_positions() {
        return Err(TrainError::ExceedsPositions {
            key: if d.block_size.is_some() {
                "data.block_size"
            } else {
                "data.max_length"
            },
            value: limit,
            positions: checkpoint.max_positions(),
            model: recipe.model.clone(),
        });
    }
    if d.completion_column.is_some() && d.messages_column.is_none() {
        return Err(TrainError::Recipe(
            "data.completion_column goes with data.messages_column".into(),
        ));
    }
    if d.messages_column.is_some() && d.template.is_some() {
        return Err(TrainError::Recipe(
            "data.messages_column and data.template exclude each other".into(),
        ));
    }
    if d.block_size.is_some() && (d.messages_column.is_some() || d.template.is_some() || d.packing)
    {
        return Err(TrainError::Recipe(
            "data.block_size is for plain text; it excludes messages_column, template and packing"
                .into(),
        ));
    }
    let train_rows = rows(&read(&d.train)?);
    let file_rows = |p: &Option<std::path::PathBuf>| -> Result<Option<Vec<_>>> {
        p.as_ref().map(|p| read(p).map(|t| rows(&t))).transpose()
    };
    let (validation, test) = (file_rows(&d.validation)?, file_rows(&d.test)?);
    let (train_rows, validation, test) = d.parts(train_rows, validation, test)?;
    let plain =
        |r: &[(String, BTreeMap<String, Value>)]| r.iter().map(|(_, row)| row.clone()).collect();
    let mut split_rows = vec![("train", plain(&train_rows))];
    for (name, part) in [("validation", &validation), ("test", &test)] {
        if let Some(part) = part {
            split_rows.push((name, plain(part)));
        }
    }
    let (train, mut skipped) = build(d, &tokenizer, &train_rows)?;
    if train.is_empty() {
        return Err(TrainError::dataset(
            &d.train,
            format!(
                "no training example is left (skipped {skipped}: too long, or nothing to learn)"
            ),
        ));
    }
    let mut split = |r: Option<Vec<_>>| -> Result<Option<Vec<LmExample>>> {
        match r {
            None => Ok(None),
            Some(r) => {
                let (ex, s) = build(d, &tokenizer, &r)?;
                skipped += s;
                Ok(Some(ex))
            }
        }
    };
    let validation = split(validation)?;
    let test = split(test)?;
    let data_kind = if let Some(b) = d.block_size {
        format!("plain text in blocks of {b} tokens")
    } else if let Some(c) = &d.messages_column {
        format!("chat conversations from {c:?} (tokenizer's chat template)")
    } else if let Some(t) = &d.template {
        match t {
            crate::recipe::TemplateSpec::Named(n) => format!("template {n:?}"),
            crate::recipe::TemplateSpec::Custom(_) => "prompt / completion template".into(),
        }
    } else {
        format!("plain text from {:?}, one example per text", d.text_column)
    } + if d.packing { ", packed" } else { "" };

    let mut model = checkpoint.load_causal_lm(device)?;
    let (counts, adapter) = apply_decoder_method(&mut model, recipe, &tokenizer, device)?;
    Ok(LmPrepared {
        checkpoint,
        tokenizer,
        train,
        validation,
        test,
        skipped,
        pad_id,
        model,
        counts,
        adapter,
        data_kind,
        rows: split_rows,
    })
}

/// Saves the result into `out`: a `peft` adapter (`CAUSAL_LM`) for LoRA, a `transformers`
/// folder otherwise; both with the tokenizer.
pub fn save(p: &LmPrepared, recipe: &Recipe, out: &Path) -> Result<()> {
    save_decoder(
        &p.checkpoint,
        &p.tokenizer,
        &p.model,
        p.adapter.as_ref(),
        recipe,
        out,
    )
}

/// Writes a trained decoder: a `peft` `CAUSAL_LM` adapter, or a `transformers` folder; both
/// with the tokenizer.
pub fn save_decoder(
    checkpoint: &Checkpoint,
    tokenizer: &TextTokenizer,
    model: &CausalModel,
    adapter: Option<&PeftConfig>,
    recipe: &Recipe,
    out: &Path,
) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| TrainError::io(out, e))?;
    match adapter {
        Some(cfg) => {
            crate::output::save_adapter(model, cfg, recipe, "CAUSAL_LM", out)?;
        }
        None => {
            checkpoint.write_causal_lm_config(out)?;
            crate::output::save_weights(model, out)?;
        }
    }
    checkpoint.write_tokenizer_files(tokenizer, out)?;
    Ok(())
}

/// Trains a causal LM (see [`crate::trainer::train`]).
pub fn run_training(
    p: &mut LmPrepared,
    recipe: &Recipe,
    device: &Device,
    observer: &mut dyn crate::Observer,
    resume: Option<&Path>,
) -> Result<crate::TrainSummary> {
    let sampler = Sampler::of(p, recipe);
    let objective = LanguageModelling {
        pad_id: p.pad_id,
        soft_prompt: p.model.virtual_positions(),
        padding_free: recipe.padding_free(),
        sampler,
    };
    crate::trainer::train(
        &objective,
        &mut p.model,
        &p.train,
        p.validation.as_deref(),
        &recipe.training,
        device,
        observer,
        resume,
    )
}

/// A causal-LM run.
pub struct CausalLmTask {
    p: LmPrepared,
    run: crate::task::Run,
}

impl CausalLmTask {
    /// Prepares the run's data and model.
    pub fn open(run: crate::task::Run) -> Result<Self> {
        Ok(Self {
            p: prepare(&run.recipe, &run.device)?,
            run,
        })
    }
}

impl Task for CausalLmTask {
    fn samples(&mut self) -> Result<Vec<Sample>> {
        match Sampler::of(&self.p, &self.run.recipe) {
            Some(s) => s.run(&self.p.model, &self.run.device),
            None => Ok(vec![]),
        }
    }

    fn general_perplexity(&mut self, text: &str, tokens: usize) -> Result<Option<f64>> {
        let p = &self.p;
        let d = &self.run.recipe.data;
        general_perplexity(
            &p.model,
            &p.tokenizer,
            text,
            tokens,
            d.block_size.unwrap_or(d.max_length),
            p.pad_id,
            &self.run.device,
        )
        .map(Some)
    }

    /// A row's text: its fields' values in column order (conversations as their JSON).
    /// A row's text: its fields' values in column order (conversations as their JSON); with
    /// `block_size`, each block's text, since the blocks are what trains and is held out
    /// (lines of plain text repeat by nature: a play's speaker names).
    fn split_texts(&self) -> Vec<(&'static str, Vec<whet_data::leakage::Text>)> {
        let p = &self.p;
        if self.run.recipe.data.block_size.is_some() {
            return crate::task::splits(&p.train, p.validation.as_ref(), p.test.as_ref())
                .map(|(name, blocks)| {
                    let texts = blocks.iter().map(|b| whet_data::leakage::Text {
                        origin: format!("{name} {}", b.origin),
                        text: p.tokenizer.inner.decode(&b.ids, false).unwrap_or_default(),
                    });
                    (name, texts.collect())
                })
                .collect();
        }
        p.rows
            .iter()
            .map(|(name, rows)| {
                let texts = rows
                    .iter()
                    .enumerate()
                    .map(|(i, row)| whet_data::leakage::Text {
                        origin: format!("{name} row {}", i + 1),
                        text: row
                            .values()
                            .map(|v| match v {
                                Value::String(s) => s.clone(),
                                other => other.to_string(),
                            })
                            .collect::<Vec<_>>()
                            .join("\n"),
                    })
                    .collect();
                (*name, texts)
            })
            .collect()
    }

    fn describe(&self) -> Vec<String> {
        let (p, recipe) = (&self.p, &self.run.recipe);
        vec![
            format!(
                "model {} ({}), method {:?}, causal language modelling",
                recipe.model.display(),
                p.checkpoint.family(),
                recipe.method
            ),
            format!(
                "data: {}; {} train / {} validation / {} test examples, max_length {}{}",
                p.data_kind,
                p.train.len(),
                p.validation.as_ref().map_or(0, |s| s.len()),
                p.test.as_ref().map_or(0, |s| s.len()),
                recipe.data.max_length,
                if p.skipped > 0 {
                    format!(
                        "; skipped {} (too long with too_long = \"skip\", or nothing to learn)",
                        p.skipped
                    )
                } else {
                    String::new()
                }
            ),
            p.counts.line(),
        ]
    }

    fn plan(&mut self) -> Option<crate::plan::MemoryPlan> {
        let p = &mut self.p;
        let lens = p.train.iter().map(crate::plan::lm_lens).collect();
        let args = &self.run.recipe.training;
        Some(crate::plan::plan_of(
            &p.checkpoint,
            &mut p.model,
            args,
            lens,
            true,
            1,
        ))
    }

    fn write_data(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
        for (name, rows) in &self.p.rows {
            let text: String = rows
                .iter()
                .map(|r| serde_json::json!(r).to_string() + "\n")
                .collect();
            whet_text::write_atomic(&dir.join(format!("{name}.jsonl")), text.as_bytes())?;
        }
        Ok(())
    }

    /// Up to three held-out prompts (the tokens before the first learnt one; for plain text
    /// the first quarter) and their greedy continuations.
    fn sample(&mut self, before: bool) -> Result<Vec<String>> {
        let p = &self.p;
        let split: &[LmExample] = p.validation.as_deref().unwrap_or(&p.train);
        let model = p.model.valid();
        let device = self.run.device.clone().without_autodiff();
        let config = whet_infer::GenerationConfig::greedy(32, p.checkpoint.eos_token_ids());
        let mut lines = vec![
            if before {
                "before training (greedy):"
            } else {
                "after training (greedy):"
            }
            .to_string(),
        ];
        for prompt in &Sampler::prompts(split, 3) {
            let out = whet_infer::generate(&model, prompt, &config, &device, |_| true)?;
            let decode = |ids: &[u32]| p.tokenizer.inner.decode(ids, true).unwrap_or_default();
            let one: Vec<char> = one_line(&decode(prompt), usize::MAX).chars().collect();
            let tail: String = one[one.len().saturating_sub(50)..].iter().collect();
            lines.push(format!("  …{tail:<50} → {}", one_line(&decode(&out), 90)));
        }
        Ok(lines)
    }

    fn total_steps(&self) -> usize {
        self.run.recipe.training.total_steps(self.p.train.len())
    }

    fn train(&mut self, observer: &mut dyn crate::Observer) -> Result<crate::TrainSummary> {
        let run = &self.run;
        run_training(
            &mut self.p,
            &run.recipe,
            &run.device,
            observer,
            run.resume.as_deref(),
        )
    }

    fn evaluate(&mut self, _summary: &crate::TrainSummary) -> Result<Outcome> {
        let p = &self.p;
        let batch = self.run.recipe.training.per_device_eval_batch_size;
        let mut out = Outcome::default();
        for (name, split) in [("eval", &p.validation), ("test", &p.test)] {
            if let Some(data) = split {
                let (loss, tokens) = evaluate_lm(
                    &p.model,
                    data,
                    batch,
                    p.pad_id,
                    self.run.recipe.padding_free(),
                    &self.run.device,
                );
                out.results
                    .insert(format!("{name}_loss"), serde_json::json!(loss));
                out.results
                    .insert(format!("{name}_perplexity"), serde_json::json!(loss.exp()));
                out.results
                    .insert(format!("{name}_tokens"), serde_json::json!(tokens));
                out.lines.push(format!(
                    "{name}: loss {loss:.4}, perplexity {:.3} over {tokens} learnt tokens",
                    loss.exp()
                ));
            }
        }
        Ok(out)
    }

    fn save(&self, out: &Path) -> Result<()> {
        save(&self.p, &self.run.recipe, out)
    }

    fn counts(&self) -> ParamCounts {
        self.p.counts
    }

    fn report(&self) -> Report {
        Report {
            unit: "samples",
            curve_metric: "",
            adapter: self.p.adapter.is_some(),
            files: "all_results.json, trainer_state.json, recipe.resolved.toml, loss_curve.png: train loss faint with its smoothed curve in blue, eval loss red, squares at the evaluations",
        }
    }
}
