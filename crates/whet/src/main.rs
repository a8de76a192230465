//! The `whet` command line: glue between the library crates, nothing more.

mod init;
mod merge;
mod plan;
mod plot;
mod predict;
mod report;
mod sweep;
mod train;

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use std::sync::OnceLock;
use whet_infer::{GenerationConfig, Sampling};
use whet_models::device::{DeviceSpec, Opened};
use whet_models::{ChatMessage, Checkpoint, Format};

/// Fine-tune pretrained transformer language models, in Rust.
#[derive(Parser, Debug)]
#[command(name = "whet", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Where to compute: cpu (the default), cuda or cuda:N, wgpu (a hardware adapter, else the
    /// software one), wgpu:cpu (the software adapter, e.g. Mesa's lavapipe) or auto (CUDA, then
    /// a hardware wgpu adapter, then the CPU). WHET_DEVICE sets it too. cuda and wgpu need a
    /// whet built with `--features cuda` / `--features wgpu`. Checkpoints and outputs are the
    /// same files on every device.
    #[arg(long, global = true, value_name = "DEVICE")]
    device: Option<String>,
}

/// The recipe keys, shown by `whet train --help`.
const RECIPE_HELP: &str = "\
RECIPE KEYS (TOML; any key can be overridden with --set KEY=VALUE; `<cache>` in a path is the
asset cache, WHET_CACHE or ./cache; a key no table knows is an error naming the table and the
closest valid key, never ignored):
  model          a Hugging Face folder, a .gguf file, or a Hub repo id (ORG/NAME) downloaded
                 into the Hugging Face cache as huggingface_hub does (HF_HUB_CACHE / HF_HOME,
                 HF_TOKEN, HF_ENDPOINT; HF_HUB_OFFLINE=1: the cache only); a local path wins
  revision       a repo id's branch, tag or commit (default main); adapters record it
  gguf_file      the GGUF file inside the model's repo or folder
  task           sequence-classification (default) | multi-label-classification | regression
                 (one number a text, MSE loss, problem_type \"regression\"; sequence-classification
                 becomes it when the labels are real numbers, as run_glue.py decides) |
                 token-classification (BERT: a tag a word, as run_ner.py; text_column / label_column
                 default to tokens / ner_tags; seqeval's entity precision, recall, F1 and token
                 accuracy) | causal-lm |
                 question-answering (BERT family) | reward-model (a one-output classifier on
                 preference pairs: columns prompt / chosen / rejected, or chosen / rejected with
                 the prompt inside, or a BIG-bench task.json; trl's pairwise loss; held-out
                 pairwise accuracy) | dpo (a decoder on the same pairs, trl's DPOTrainer:
                 frozen reference = the base with the adapter off, or a frozen copy for full) |
                 ppo (RLHF: a decoder with a value head samples responses to prompts, scored by
                 a trained reward model, with a KL penalty to the reference; trl's PPOTrainer)
  method         full (default) | head | lora | qlora | ia3 | bottleneck | prefix_tuning |
                 prompt_tuning (head: classification and QA)
  [data]
    train, validation, test   .jsonl, .json (JSON Lines or one array of rows), .csv, .tsv,
                   .parquet or .txt (one text per line) files,
                   folders or globs of them (data/train-*.parquet), or the same on the Hub as
                   hf://datasets/ORG/NAME[@REVISION]/PATH (validation/test optional)
    split          {train, validation, test, seed}: a seeded split of `train` when no other
                   file is given; counts (>= 1) or fractions (< 1); seed 42
    text_column    default \"text\"; text_pair_column optional
    label_column   default \"label\": class names or ids; lists of them for multi-label;
                   numbers for regression
    label_names    class names in id order (default: inferred, sorted)
    max_length     default 128
    truncation_side      right (keeps the start) | left (keeps the end); default each task's
                   reference: right, but left for ppo prompts; refused where nothing is cut at
                   one end: question-answering, block_size, causal-lm without too_long = truncate
    encoding       CSV text encoding: utf-8 (default) | latin-1
    tokenization_cache   keep token ids in <cache>/tokenized/ (default true)
    chat_template_path   a .jinja chat template (or a model folder whose tokenizer has one)
                   used in place of the tokenizer's, for files without one (trl's name);
                   saved with the model as chat_template.jinja (causal-lm, reward-model, dpo,
                   ppo)
    leakage        the check before training for rows of validation / test that are in train
                   (exactly, after NFKC and whitespace; or nearly: Jaccard >= 0.8 of character
                   5-grams, by MinHash) and for train's own repeats, written to leakage.json:
                   warn (default) | error (refuse to train on a leak) | off
    causal-lm only (default: one example per text_column value, EOS appended, all learnt):
    template       \"alpaca\" or {prompt = \"...{field}...\", completion = \"...{field}\"}: prompt and
                   completion from each row's fields; EOS is appended to the completion
    messages_column      a column of conversations [{role, content}, ...] rendered with the
                   tokenizer's chat template (apply_chat_template)
    completion_column    with messages_column: the answer (text, or a list of them: the first,
                   or a list of messages), appended as the assistant turn; the messages are
                   then the prompt (trl's conversational prompt-completion data)
    completion_only_loss with completion_column: learn only the completion, not assistant turns
                   inside the prompt (few-shot answers) (trl's completion_only_loss); with
                   messages_column alone: learn every assistant turn (trl's assistant_only_loss);
                   false learns the whole text (default true)
    block_size     concatenate the texts and cut blocks of N tokens (run_clm.py's group_texts)
    packing        pack examples into rows of max_length tokens; attention stays inside each
                   example and positions restart (default false)
    too_long       an example over max_length: error (default) | truncate | skip (counted)
    question-answering only (SQuAD format):
    question_column, context_column, answers_column   default question, context, answers
                   ({\"text\": [...], \"answer_start\": [...]}, character offsets)
    doc_stride     token overlap of the windows of a long context (default max_length / 3)
    max_answer_length    longest predicted answer in tokens (default 30)
  [dpo]            task = dpo: beta (0.1), loss_type (sigmoid | ipo), precompute_ref_log_probs
                   (false: the reference runs each step; true: once, before training). data:
                   max_length cuts prompt + answer (truncation_side right keeps the start)
  [ppo]            task = ppo, as trl's PPOConfig: reward_model (a folder written by task =
                   reward-model; required), num_ppo_epochs (4), num_mini_batches (1), kl_coef
                   (0.05), cliprange (0.2), vf_coef (0.1), cliprange_value (0.2), gamma (1.0), lam
                   (0.95), whiten_rewards (false), temperature (0.7), response_length (53),
                   missing_eos_penalty (none), prompt_column (\"prompt\"; a table of preference
                   pairs or a BIG-bench folder gives its prompts), reward_max_length (512),
                   eval_samples (1: responses per held-out prompt at each evaluation). A
                   step is one rollout batch of per_device_train_batch_size x
                   gradient_accumulation_steps prompts; data.max_length cuts prompts (from the
                   left unless truncation_side = right)
  [head]           unfreeze_top_layers = N (method = head; default 0)
  [lora]           as peft.LoraConfig: r (8), lora_alpha (8), lora_dropout (0), target_modules
                   (default peft's for the model_type: bert query, value; gpt2 c_attn; llama,
                   mistral, qwen2 q_proj, v_proj; none for distilbert), bias (none | all |
                   lora_only), modules_to_save, use_rslora (false); method = lora or qlora; the
                   table may be left out (LoraConfig()); what was chosen is printed
  [ia3]            as peft.IA3Config (method = ia3; the table may be left out): target_modules
                   and feedforward_modules (the targets whose input is scaled, a subset) default
                   to peft's for the model_type (bert key, value, output.dense / output.dense;
                   llama k_proj, v_proj, down_proj / down_proj; ...), modules_to_save
  [bottleneck]     method = bottleneck: adapter_type (houlsby: after attention and feed-forward |
                   pfeiffer: after feed-forward), reduction_factor (16), non_linearity (relu |
                   silu | gelu | gelu_new), modules_to_save; whet's own format (peft has none;
                   see the README); not mergeable (non-linear)
  [prefix_tuning]  as peft.PrefixTuningConfig: num_virtual_tokens, prefix_projection (false: train
                   the keys and values directly; true: peft's Linear-tanh-Linear MLP makes them),
                   encoder_hidden_size (the MLP's width; default the key width), modules_to_save.
                   Not for DistilBERT (transformers' DistilBERT takes no past keys and values)
  [prompt_tuning]  as peft.PromptTuningConfig: num_virtual_tokens, prompt_tuning_init (RANDOM |
                   TEXT | SAMPLE_VOCAB), prompt_tuning_init_text (with TEXT), modules_to_save.
                   Virtual tokens go before the input (a decoder classifier pools the last real
                   token; a QA model drops their positions); neither method packs or merges
  [quantization]   how an adapter method stores the frozen base (names of BitsAndBytesConfig):
    load_in_4bit   NF4 in blocks of 64 (default false; method = qlora always means true:
                   without this table NF4 with double quantisation, and load_in_4bit = false or
                   keep_gguf_quantized = true with qlora are errors). A table that quantises
                   nothing is an error
    bnb_4bit_quant_type        nf4 (the only type)
    bnb_4bit_use_double_quant  quantise the block scales to 8 bits, blocks of 256 (false)
    keep_gguf_quantized        a GGUF base keeps its own Q4_0 / Q4_1 / Q8_0 / ... blocks (false)
                   Heads and modules_to_save stay f32; quantised layers are dequantised one at
                   a time inside the matmul, forward and backward.
  [eval]           what whet measures beyond the held-out splits:
    general_text   the forgetting report of decoder fine-tuning (causal-lm, dpo): perplexity
                   on this general text before and after training, in all_results.json
                   (general_perplexity_before / _after / _change) and the summary; a .txt file
                   or a table of text (default: the asset cache's OpenWebText sample,
                   <cache>/data/evals/schelling_point/owt_5.jsonl, when fetched)
    general_tokens tokens of it to read, in blocks of max_length (default 4096; 0: off)
    generate       causal-lm: greedy continuations (32 tokens) of this many held-out prompts at
                   every evaluation, in trainer_state.json and samples.md (a table of each
                   prompt before, during and after training); default 0
  [training]       as transformers.TrainingArguments (defaults in brackets):
    output_dir, learning_rate (5e-5), per_device_train_batch_size (8),
    per_device_eval_batch_size (8), num_train_epochs (3), max_steps (-1: off),
    gradient_accumulation_steps (1), weight_decay (0; never on biases and norms),
    adam_beta1 (0.9), adam_beta2 (0.999), adam_epsilon (1e-8), max_grad_norm (1.0; 0 off),
    optim (adamw_torch | adamw_bnb_8bit: moments in 8 bits, as bitsandbytes' AdamW8bit |
    paged_adamw_32bit / paged_adamw_8bit: on a GPU, moments kept in host memory and moved to
    the device per parameter at the step | sgd),
    lr_scheduler_type (linear | cosine | constant | constant_with_warmup), warmup_steps (0),
    warmup_ratio (0), eval_strategy (no | steps | epoch), eval_steps, save_strategy (steps), save_steps (500), save_total_limit,
    load_best_model_at_end (false), metric_for_best_model (loss | accuracy | f1 | precision |
    recall | matthews_correlation; regression: loss | mse | pearson | spearmanr;
    token-classification: loss | precision | recall | f1 | accuracy; causal-lm:
    loss | perplexity; question-answering: loss | exact_match | f1), greater_is_better, early_stopping_patience,
    logging_steps (500): a log every N steps (one JSON line on stderr when stderr is not a
    terminal, as Trainer prints it; the progress bar otherwise), seed (42),
    report_to (none): jsonl (OUT/logs.jsonl), tensorboard (event files in OUT/runs), all,
    or a list of them; other integrations are refused,
    bf16 / fp16 (false): mixed precision, matrix products in bfloat16 / float16 with the
    weights, optimizer moments, softmax, norms and the loss in f32; fp16 adds dynamic loss
    scaling (a step whose gradients overflow is skipped); wgpu has no bf16; the CPU runs
    bf16 products only with AVX512-BF16 (elsewhere it says so and computes in f32), on
    AMX tiles where the CPU has them (WHET_AMX=off keeps the AVX512-BF16 kernel),
    tf32 (false): on a CUDA device with TF32 (Ampere and newer), f32 matrix products round
    their operands to TF32 on the tensor cores, as transformers' tf32 = true: faster, less
    precise; f32 products stay f32 otherwise; refused on other devices,
    group_by_length (false): batches of similar lengths, as transformers' LengthGroupedSampler
    (megabatches of up to 50 steps sorted longest first): less padding, other batches,
    padding_free (true; question-answering: false): projections and feed-forward layers
    skip the batch's padding (attention alone runs on padded rows), in training and
    evaluation; equal to padded batches up to float rounding, only dropout's random masks
    differ; question answering then leaves padding out of the span softmax";

/// A model and a data file to infer a recipe from (`whet init`, `whet train` without a recipe).
#[derive(clap::Args, Debug)]
struct InferArgs {
    /// A Hugging Face model folder, a .gguf file, or a Hub repo id (ORG/NAME), downloaded into
    /// the Hugging Face cache (HF_HUB_CACHE, HF_HOME; HF_TOKEN, HF_ENDPOINT, HF_HUB_OFFLINE=1
    /// as huggingface_hub reads them). A local path wins over an id.
    #[arg(long)]
    model: Option<PathBuf>,
    /// The Hub revision (branch, tag or commit) of a repo-id --model (default main).
    #[arg(long, requires = "model")]
    revision: Option<String>,
    /// The GGUF file inside --model's Hub repo or folder.
    #[arg(long, requires = "model")]
    gguf_file: Option<String>,
    /// The training rows: a .jsonl, .json, .csv, .tsv, .parquet or .txt file, a folder or glob of
    /// such files, or hf://datasets/ORG/NAME[@REVISION]/PATH on the Hub.
    #[arg(long)]
    data: Option<PathBuf>,
    /// The task, instead of the one the columns suggest (see `whet train --help`).
    #[arg(long)]
    task: Option<String>,
    /// The method (default lora).
    #[arg(long)]
    method: Option<String>,
}

impl InferArgs {
    fn infer(&self) -> anyhow::Result<Option<init::Inferred>> {
        match (&self.model, &self.data) {
            (Some(m), Some(d)) => Ok(Some(init::infer(
                &init::ModelSpec {
                    model: m,
                    revision: self.revision.as_deref(),
                    gguf_file: self.gguf_file.as_deref(),
                },
                d,
                self.task.as_deref(),
                self.method.as_deref(),
            )?)),
            (None, None) if self.task.is_none() && self.method.is_none() => Ok(None),
            _ => Err(anyhow::anyhow!(
                "a recipe is inferred from --model and --data together (--task and --method \
                 refine it)"
            )),
        }
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print a model's architecture, size, tensor dtypes and tokenizer.
    Info {
        /// A Hugging Face model folder (config.json, model.safetensors, tokenizer.json) or a
        /// .gguf file.
        path: PathBuf,
    },
    /// Continue a prompt with a decoder model (GPT-2 or LLaMA family), streaming the new text
    /// to stdout. Greedy unless --temperature is given.
    Generate(GenerateArgs),
    /// Fine-tune a model as a recipe (TOML) says: the model, the task (sequence or multi-label
    /// classification, causal LM / SFT, question answering, reward model, DPO, PPO), the
    /// method (full, head, lora, qlora, ia3, bottleneck, prefix_tuning, prompt_tuning), the
    /// data and training arguments with the names transformers.TrainingArguments, peft's
    /// configs and trl's use. Writes checkpoints, the trained model (a transformers folder, or
    /// a peft adapter), all_results.json, trainer_state.json, the resolved recipe and a loss
    /// curve PNG into training.output_dir. `--help` lists every recipe key.
    #[command(after_long_help = RECIPE_HELP)]
    Train {
        /// The recipe file. Without one, --model and --data make the recipe (as `whet init`),
        /// which the run writes into its output folder for the next run.
        #[arg(required_unless_present_all = ["model", "data"])]
        recipe: Option<PathBuf>,
        #[command(flatten)]
        infer: InferArgs,
        /// Override a recipe value, e.g. --set training.learning_rate=1e-4 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Continue from a checkpoint: the newest checkpoint-N in output_dir (plain --resume) or
        /// the given checkpoint folder. The run ends with the weights an uninterrupted run has.
        #[arg(long, value_name = "CHECKPOINT", num_args = 0..=1, default_missing_value = "latest")]
        resume: Option<String>,
        /// Train even when the memory plan (see `whet plan`) predicts a peak above the memory
        /// this machine has available.
        #[arg(long)]
        no_memory_check: bool,
        /// Pause after this step's evaluation and checkpoint (how `whet sweep` runs a trial to
        /// a rung); --resume continues it.
        #[arg(long, hide = true)]
        stop_at: Option<usize>,
    },
    /// Write a recipe for a model and a data file without training: the task inferred from the
    /// data's columns and the model's family (text + label: sequence classification, with a
    /// pair such as sentence1 + sentence2 or premise + hypothesis; lists of labels:
    /// multi-label; real-numbered labels: regression; chosen + rejected: DPO for a decoder, a
    /// reward model for an encoder; messages or prompt + completion: SFT; instruction + output
    /// with a decoder: the Alpaca template; question + context + answers: QA; tokens + ner_tags:
    /// token classification; text alone with a decoder: causal LM), method LoRA, a seeded tenth of the rows for
    /// validation, transformers' defaults otherwise. `whet train --model M --data F` trains
    /// with the same recipe.
    Init {
        #[command(flatten)]
        infer: InferArgs,
        /// Where to write the recipe (an existing file is not overwritten).
        #[arg(long, short, default_value = "recipe.toml")]
        output: PathBuf,
    },
    /// Search hyperparameters of a recipe with successive halving: every trial trains to the
    /// first rung (training.max_steps / eta^k steps), the best 1/eta by the evaluation metric
    /// (training.metric_for_best_model, default the loss) go on to the next, and so on to
    /// max_steps; a trial that goes on resumes from its checkpoint with the full run's
    /// schedule. Writes trial-N/, sweep.md (settings, metric, steps, time, status),
    /// best.toml and sweep.png (metric against step) into training.output_dir; the same
    /// command again resumes a killed sweep (sweep.json).
    Sweep {
        /// The recipe file (needs training.max_steps and validation data).
        recipe: PathBuf,
        #[command(flatten)]
        search: sweep::Search,
        /// Trials to run at once, each a process of its own with a share of the cores
        /// (default: as many as the memory plan says fit, at most one per core; 1: one after
        /// another).
        #[arg(long)]
        jobs: Option<usize>,
    },
    /// Predict the peak memory of a recipe's training run before running it: weights,
    /// gradients, optimizer state, activations of the largest batch the data makes, and the
    /// process itself; says whether it fits the memory available and what to change if not.
    /// `whet train` checks the same plan before its first step.
    Plan {
        /// The recipe file.
        recipe: PathBuf,
        /// Override a recipe value, as for `whet train` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Print the plan as JSON (bytes per part).
        #[arg(long)]
        json: bool,
    },
    /// Evaluate a trained classifier (a folder written by `whet train`, LoRA or full) on a
    /// labelled data file; prints and returns accuracy, F1, MCC and the confusion matrix (for a
    /// regression model: MSE, Pearson and Spearman correlations). A question-answering model is
    /// evaluated on SQuAD-format data (question, context, answers): loss, exact match and F1, as
    /// its training run's evaluation computes them.
    Eval {
        /// The trained model folder.
        #[arg(long)]
        model: PathBuf,
        /// Labelled data (.jsonl, .json, .csv, .tsv, .parquet; a folder or glob of them).
        #[arg(long)]
        data: PathBuf,
        /// Column with the text (default: the one the model was trained on, else "text").
        #[arg(long)]
        text_column: Option<String>,
        /// Column with the second text of a pair (default: the one the model was trained on,
        /// if any).
        #[arg(long)]
        text_pair_column: Option<String>,
        /// Column with the label: a class name or id, or a number for a regression model
        /// (default: the one the model was trained on, else "label").
        #[arg(long)]
        label_column: Option<String>,
        /// Text encoding of a CSV file (utf-8 or latin-1).
        #[arg(long, default_value = "utf-8")]
        encoding: String,
        /// Examples per forward pass.
        #[arg(long, default_value_t = 32)]
        batch_size: usize,
    },
    /// Classify texts with a trained classifier; prints one JSON line per text:
    /// {"label": ..., "score": ...} (a list of the top K with --top-k); a regression model's
    /// score is its predicted number, under "LABEL_0", as pipeline("text-classification").
    Predict {
        /// The trained model folder.
        #[arg(long)]
        model: PathBuf,
        /// text-classification (default) or question-answering (with --question and
        /// --context; prints {"score", "start", "end", "answer"} as
        /// pipeline("question-answering")).
        #[arg(long, default_value = "text-classification")]
        task: String,
        /// question-answering: the question.
        #[arg(long)]
        question: Option<String>,
        /// question-answering: the text that holds the answer.
        #[arg(long)]
        context: Option<String>,
        /// A text to classify (repeatable).
        #[arg(long)]
        text: Vec<String>,
        /// The second text of a pair, for a model trained on pairs (repeatable: one for each
        /// --text, in order; the pipeline's {"text", "text_pair"}).
        #[arg(long)]
        text_pair: Vec<String>,
        /// A file with one text per line (.txt, or no extension), or a data file (.jsonl, .json,
        /// .csv, .tsv, .parquet): one prediction per row, of the text (and pair) columns the
        /// model was trained on ("text" for a model that does not say).
        #[arg(long)]
        file: Option<PathBuf>,
        /// Print the K most likely labels per text (or the K best answers) instead of the best
        /// one.
        #[arg(long)]
        top_k: Option<usize>,
    },
    /// Fold a LoRA or IA3 adapter into its base model and write a Hugging Face folder that
    /// `transformers` loads (peft's merge_and_unload + save_pretrained): config.json,
    /// model.safetensors (f32), the tokenizer, and labels.json for a classifier. A quantised
    /// base (a GGUF file's Q4_1 / Q8_0 blocks, an adapter trained over NF4) is dequantised to
    /// f32 first, and the command says so: nothing is merged into 4 bits.
    Merge {
        /// The base model folder or .gguf file (default: the base the adapter names).
        #[arg(long)]
        model: Option<PathBuf>,
        /// The adapter folder (adapter_config.json + adapter_model.safetensors).
        #[arg(long)]
        adapter: PathBuf,
        /// The folder to write (created if needed).
        out_dir: PathBuf,
    },
    /// Write a LLaMA-family model (a Hugging Face folder, e.g. one `whet merge` wrote, or a
    /// .gguf file) as a GGUF file llama.cpp and `gguf` read: architecture metadata, the
    /// tokenizer and its chat template, norms in F32, matrices as --type (F16 where a row is not
    /// whole 32-value blocks).
    Export {
        /// The model folder or .gguf file (an adapter: merge it first with `whet merge`).
        model: PathBuf,
        /// The file to write.
        out: PathBuf,
        /// Output format; gguf is the only one.
        #[arg(long, default_value = "gguf")]
        format: String,
        /// Tensor type of the matrices: f32, f16, q8_0 or q4_0.
        #[arg(long = "type", default_value = "f16")]
        ty: String,
    },
    /// Convert a GGUF file into a Hugging Face folder that `transformers` loads (config.json,
    /// model.safetensors in f32, tokenizer.json, tokenizer_config.json with the chat template).
    Convert {
        /// The .gguf file.
        gguf: PathBuf,
        /// The folder to write (created if needed).
        out_dir: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
struct GenerateArgs {
    /// Model folder or .gguf file; or a LoRA adapter folder (peft's or whet's), whose base
    /// model is read from its adapter_config.json. A .gguf's Q4_0, Q4_1 and Q8_0 layers stay
    /// in their blocks on a CPU with AVX-512 (the same weights as dequantised, read at 4.5 to
    /// 8.5 bits a weight instead of 32).
    #[arg(long)]
    model: PathBuf,
    /// A LoRA adapter folder (adapter_config.json + adapter_model.safetensors, as peft saves
    /// it) to apply to --model.
    #[arg(long, value_name = "DIR")]
    adapter: Option<PathBuf>,
    /// The text to continue (with --chat: the user message). Repeatable: several prompts are
    /// generated in batches (left-padded) and printed as JSON lines
    /// {"prompt", "generated_text"}; one prompt streams its text.
    #[arg(long)]
    prompt: Vec<String>,
    /// A file of prompts, one per line, generated in batches like repeated --prompt.
    #[arg(long, value_name = "FILE")]
    prompts_file: Option<PathBuf>,
    /// Prompts per forward pass when several are given.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Most tokens to generate; generation also stops at the model's end-of-sequence token.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Sample with this temperature instead of greedy decoding (> 0; 1.0 keeps the model's
    /// distribution).
    #[arg(long)]
    temperature: Option<f32>,
    /// When sampling, keep only the K most likely tokens (transformers' default: 50; 0 turns
    /// the filter off).
    #[arg(long, default_value_t = 50)]
    top_k: usize,
    /// When sampling, keep the smallest set of tokens whose probability reaches P (1.0: off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Wrap the prompt as a user message in the model's chat template, with the generation
    /// prompt appended.
    #[arg(long)]
    chat: bool,
    /// With --chat: a system message placed first.
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Penalise tokens already in the text, as transformers' repetition_penalty: positive
    /// logits are divided by it, negative ones multiplied (1.0: off; 1.1-1.3 is typical).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Stop as soon as the generated text contains this string (repeatable); the output ends
    /// with it, as transformers' stop_strings.
    #[arg(long = "stop", value_name = "STRING")]
    stop: Vec<String>,
    /// Few-shot prompting: examples placed before the prompt. Plain prompts: a text file
    /// prepended as it is. With --chat: a JSONL file of {"user": ..., "assistant": ...} lines,
    /// each becoming an earlier exchange of the conversation.
    #[arg(long, value_name = "FILE")]
    few_shot: Option<PathBuf>,
}

/// Reads a --few-shot file: the text of a plain prompt, or for --chat the earlier exchanges.
fn few_shot(path: &std::path::Path, chat: bool) -> Result<(String, Vec<ChatMessage>)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read --few-shot file {}", path.display()))?;
    if !chat {
        let mut t = text;
        if !t.is_empty() && !t.ends_with('\n') {
            t.push('\n');
        }
        return Ok((t, vec![]));
    }
    let mut messages = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let where_ = || format!("{}:{}", path.display(), i + 1);
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{}: malformed JSON", where_()))?;
        for role in ["user", "assistant"] {
            let content = v[role].as_str().ok_or_else(|| {
                anyhow::anyhow!("{}: each line needs a \"{role}\" text", where_())
            })?;
            messages.push(ChatMessage {
                role: role.into(),
                content: content.into(),
            });
        }
    }
    Ok((String::new(), messages))
}

fn main() {
    whet_models::init_threads();
    let cli = Cli::parse();
    if let Err(e) = whet_models::on_pool(|| run(cli)) {
        eprintln!("error: {}", report(&e));
        std::process::exit(1);
    }
}

/// An error and its causes joined by `: `, as anyhow's `{:#}` prints them, leaving out a cause
/// whose text already ends the line: the typed errors of the library crates (`TrainError`,
/// `DataError`, ...) print their source in their own message and also return it as `source()`.
fn report(e: &anyhow::Error) -> String {
    let mut line = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
    }
    line
}

fn run(cli: Cli) -> Result<()> {
    // Parsed now, so a misspelt device fails before any work; opened on first use, so the
    // commands that compute nothing (info, plan, convert) never start a GPU runtime.
    let spec = match cli.device.as_deref() {
        Some(s) => s.parse()?,
        None => DeviceSpec::from_env()?,
    };
    DEVICE_SPEC
        .set(spec)
        .map_err(|_| anyhow::anyhow!("the device was set twice"))?;
    if let Some(arg) = &cli.device {
        // `whet sweep` hands it to the trials it runs as processes of their own.
        let _ = DEVICE_ARG.set(arg.clone());
    }
    match cli.command {
        Command::Info { path } => info(path),
        Command::Generate(args) => generate(args),
        Command::Convert { gguf, out_dir } => convert(gguf, out_dir),
        Command::Export {
            model,
            out,
            format,
            ty,
        } => export(&model, &out, &format, &ty),
        Command::Merge {
            model,
            adapter,
            out_dir,
        } => merge::merge(model.as_deref(), &adapter, &out_dir),
        Command::Train {
            recipe,
            infer,
            set,
            resume,
            no_memory_check,
            stop_at,
        } => {
            plan::SKIP_CHECK.store(no_memory_check, std::sync::atomic::Ordering::Relaxed);
            let recipe = match (recipe, infer.infer()?) {
                (Some(_), Some(_)) => {
                    anyhow::bail!("give a recipe or --model and --data, not both")
                }
                (Some(r), None) => r,
                (None, Some(inferred)) => {
                    for l in &inferred.lines {
                        println!("inferred: {l}");
                    }
                    // The inferred keys and the --set values, written where the run's
                    // outputs go and read from there like any recipe (the run adds the
                    // resolved one, every key, beside it).
                    let text = format!(
                        "{}\n{}",
                        inferred.header,
                        whet_train::Recipe::with_overrides(&inferred.toml, &set)?
                    );
                    let out = whet_train::Recipe::parse(&text, &[])?.training.output_dir;
                    std::fs::create_dir_all(&out)
                        .with_context(|| format!("cannot create {}", out.display()))?;
                    let path = out.join("recipe.toml");
                    whet_models::fsutil::write_atomic(&path, text.as_bytes())?;
                    println!(
                        "recipe: {} (the next run: whet train {})",
                        path.display(),
                        path.display()
                    );
                    path
                }
                (None, None) => anyhow::bail!("give a recipe, or --model and --data"),
            };
            train::run(&recipe, &set, resume.as_deref(), stop_at).map(|_| ())
        }
        Command::Init { infer, output } => {
            let inferred = infer
                .infer()?
                .ok_or_else(|| anyhow::anyhow!("whet init needs --model and --data"))?;
            if output.exists() {
                anyhow::bail!(
                    "{} exists; name another file with --output",
                    output.display()
                );
            }
            whet_models::fsutil::write_atomic(&output, inferred.toml.as_bytes())?;
            for l in &inferred.lines {
                println!("inferred: {l}");
            }
            println!(
                "wrote {} (train with: whet train {})",
                output.display(),
                output.display()
            );
            Ok(())
        }
        Command::Plan { recipe, set, json } => plan::run(&recipe, &set, json),
        Command::Sweep {
            recipe,
            search,
            jobs,
        } => sweep::run(&recipe, search, jobs),
        Command::Eval {
            model,
            data,
            text_column,
            text_pair_column,
            label_column,
            encoding,
            batch_size,
        } => predict::eval(
            &model,
            &data,
            predict::EvalColumns {
                text: text_column,
                text_pair: text_pair_column,
                label: label_column,
            },
            &encoding,
            batch_size,
        ),
        Command::Predict {
            model,
            task,
            question,
            context,
            text,
            text_pair,
            file,
            top_k,
        } => match task.as_str() {
            _ if top_k == Some(0) => {
                anyhow::bail!(
                    "--top-k 0: give the number of labels (or answers) to print, 1 or more"
                )
            }
            "text-classification" => {
                if question.is_some() || context.is_some() {
                    anyhow::bail!(
                        "--question and --context are for --task question-answering; \
                         text-classification reads --text (and --text-pair) or --file"
                    );
                }
                predict::predict(&model, text, text_pair, file, top_k)
            }
            "question-answering" => {
                if !text.is_empty() || !text_pair.is_empty() || file.is_some() {
                    anyhow::bail!(
                        "--text, --text-pair and --file are for --task text-classification; \
                         question-answering reads --question and --context"
                    );
                }
                let (Some(q), Some(c)) = (question, context) else {
                    anyhow::bail!("--task question-answering needs --question and --context");
                };
                predict::answer(&model, &q, &c, top_k)
            }
            other => {
                anyhow::bail!("--task {other:?}: use text-classification or question-answering")
            }
        },
    }
}

static DEVICE_SPEC: OnceLock<DeviceSpec> = OnceLock::new();
static DEVICE_ARG: OnceLock<String> = OnceLock::new();

/// The `--device` value given, if one was.
pub(crate) fn device_arg() -> Option<&'static str> {
    DEVICE_ARG.get().map(String::as_str)
}

/// Whether the run computes on the CPU (`--device` / `WHET_DEVICE` unset or `cpu`).
pub(crate) fn on_cpu() -> bool {
    matches!(DEVICE_SPEC.get(), None | Some(DeviceSpec::Cpu))
}
static DEVICE: OnceLock<Opened> = OnceLock::new();

/// The device of `--device` / `WHET_DEVICE`, opened on the first call.
pub(crate) fn device() -> Result<Opened> {
    if let Some(d) = DEVICE.get() {
        return Ok(d.clone());
    }
    let spec = DEVICE_SPEC.get().copied().unwrap_or(DeviceSpec::Cpu);
    let opened = whet_models::device::open(spec)?;
    Ok(DEVICE.get_or_init(|| opened).clone())
}

fn info(path: PathBuf) -> Result<()> {
    let ckpt = Checkpoint::open(&path)?;
    let source = ckpt.source.clone();
    let mut dtypes = std::collections::BTreeMap::<String, (usize, usize)>::new();
    for name in source.names() {
        let n: usize = source.shape(&name).unwrap_or_default().iter().product();
        let e = dtypes
            .entry(source.dtype(&name).unwrap_or_default())
            .or_default();
        e.0 += 1;
        e.1 += n;
    }
    println!("path:         {}", path.display());
    println!(
        "format:       {}",
        match ckpt.format {
            Format::Folder => "Hugging Face folder",
            Format::Gguf => "GGUF",
        }
    );
    println!("architecture: {} ({})", ckpt.family(), ckpt.model_type());
    match &ckpt.config {
        whet_models::FamilyConfig::Bert(c) => println!(
            "{}",
            encoder_line(
                c.num_hidden_layers,
                c.hidden_size,
                c.num_attention_heads,
                c.intermediate_size,
                c.vocab_size,
                c.max_position_embeddings,
            )
        ),
        whet_models::FamilyConfig::DistilBert(c) => println!(
            "{}",
            encoder_line(
                c.n_layers,
                c.dim,
                c.n_heads,
                c.hidden_dim,
                c.vocab_size,
                c.max_position_embeddings,
            )
        ),
        whet_models::FamilyConfig::Deberta(c) => println!(
            "{}, relative attention {} ({:?}, {} buckets)",
            encoder_line(
                c.num_hidden_layers,
                c.hidden_size,
                c.num_attention_heads,
                c.intermediate_size,
                c.vocab_size,
                c.max_position_embeddings,
            ),
            c.relative_attention,
            c.pos_att_type(),
            c.position_buckets
        ),
        whet_models::FamilyConfig::ModernBert(c) => println!(
            "{}, local window {}",
            encoder_line(
                c.num_hidden_layers,
                c.hidden_size,
                c.num_attention_heads,
                c.intermediate_size,
                c.vocab_size,
                c.max_position_embeddings,
            ),
            c.local_attention
        ),
        whet_models::FamilyConfig::Gpt2(c) => println!(
            "config:       {} layers, hidden {}, {} heads, vocab {}, max positions {}",
            c.n_layer, c.n_embd, c.n_head, c.vocab_size, c.n_positions
        ),
        whet_models::FamilyConfig::Llama(c) => println!(
            "config:       {} layers, hidden {}, {} heads ({} key/value), head dim {}, ffn {}, vocab {}, \
             rope theta {}, rms eps {}, context {}, tied embeddings {}",
            c.num_hidden_layers,
            c.hidden_size,
            c.num_attention_heads,
            c.kv_heads(),
            c.head_dim(),
            c.intermediate_size,
            c.vocab_size,
            c.theta(whet_models::llama::LayerKind::Full),
            c.rms_norm_eps,
            c.max_position_embeddings,
            c.tie_word_embeddings
        ),
    }
    println!(
        "parameters:   {} ({:.1}M)",
        ckpt.parameter_count(),
        ckpt.parameter_count() as f64 / 1e6
    );
    println!("dtypes:");
    for (dtype, (tensors, values)) in &dtypes {
        println!("  {dtype:<6} {tensors:>4} tensors, {values:>12} values");
    }
    match ckpt.tokenizer() {
        Ok(tok) => {
            println!(
                "tokenizer:    {} tokens, bos {:?}, eos {:?}, pad {:?}, chat template: {}",
                tok.vocab_size(),
                tok.bos.as_ref().map(|s| &s.text),
                tok.eos.as_ref().map(|s| &s.text),
                tok.pad.as_ref().map(|s| &s.text),
                if tok.chat_template.is_some() {
                    "yes"
                } else {
                    "no"
                }
            );
        }
        Err(e) => println!("tokenizer:    none ({e})"),
    }
    Ok(())
}

fn generate(args: GenerateArgs) -> Result<()> {
    let sampling = match args.temperature {
        None => Sampling::Greedy,
        Some(t) if t <= 0.0 => {
            bail!("--temperature must be > 0 (leave it out for greedy decoding)")
        }
        Some(t) => Sampling::Sample {
            temperature: t,
            top_k: (args.top_k > 0).then_some(args.top_k),
            top_p: args.top_p,
            seed: args.seed,
        },
    };
    if !(0.0..=1.0).contains(&args.top_p) || args.top_p == 0.0 {
        bail!("--top-p must be in (0, 1], got {}", args.top_p);
    }
    let (base, adapter) = match &args.adapter {
        Some(a) => (args.model.clone(), Some(a.clone())),
        None if args.model.join("adapter_config.json").is_file() => {
            let base = whet_models::adapter_base(&args.model)?.ok_or_else(|| {
                anyhow::anyhow!(
                    "{}/adapter_config.json names no base model; give it with --model BASE --adapter {}",
                    args.model.display(),
                    args.model.display()
                )
            })?;
            (base, Some(args.model.clone()))
        }
        None => (args.model.clone(), None),
    };
    let ckpt = Checkpoint::open(&base)?;
    let tokenizer = ckpt
        .tokenizer()
        .with_context(|| format!("generation needs the tokenizer of {}", base.display()))?;
    let device = device()?.device;
    let mut model = ckpt.load_causal_lm_for_generation(&device)?;
    if let Some(dir) = &adapter {
        whet_peft::load_adapter(&mut model, dir, &device)
            .with_context(|| format!("cannot apply the adapter {}", dir.display()))?;
    }
    let (shots, exchanges) = match &args.few_shot {
        Some(p) => few_shot(p, args.chat)?,
        None => (String::new(), vec![]),
    };
    let render = |user: &str| -> Result<Vec<u32>> {
        let (text, add_special) = if args.chat {
            let mut messages = Vec::new();
            if let Some(system) = &args.system {
                messages.push(ChatMessage {
                    role: "system".into(),
                    content: system.clone(),
                });
            }
            messages.extend(exchanges.iter().cloned());
            messages.push(ChatMessage {
                role: "user".into(),
                content: user.to_string(),
            });
            // The template already holds any BOS, as transformers' apply_chat_template
            // assumes.
            (tokenizer.apply_chat_template(&messages, true)?, false)
        } else {
            (format!("{shots}{user}"), true)
        };
        Ok(tokenizer.encode(&text, add_special)?)
    };
    let mut prompts = args.prompt.clone();
    if let Some(f) = &args.prompts_file {
        let content =
            std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?;
        prompts.extend(
            content
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(String::from),
        );
    }
    if prompts.is_empty() {
        bail!("nothing to generate from: give --prompt or --prompts-file");
    }
    let mut eos = ckpt.eos_token_ids();
    if let Some(e) = &tokenizer.eos {
        eos.push(e.id);
    }
    if args.chat {
        // Chat models end a turn with their end-of-turn token.
        for t in ["<|im_end|>", "<|eot_id|>", "<end_of_turn>"] {
            if let Some(id) = tokenizer.inner.token_to_id(t) {
                eos.push(id);
            }
        }
    }
    let config = GenerationConfig {
        max_new_tokens: args.max_new_tokens,
        sampling,
        eos_token_ids: eos.clone(),
        repetition_penalty: args.repetition_penalty,
    };
    if prompts.len() > 1 {
        return generate_many(
            &model, &tokenizer, &prompts, &render, &config, &args, &device,
        );
    }
    let prompt = render(&prompts[0])?;
    if !args.chat {
        print!("{}", prompts[0]);
    }
    let mut stream = tokenizer.inner.decode_stream(true);
    let mut stdout = std::io::stdout();
    let start = std::time::Instant::now();
    // Text generated so far, to find stop strings that span tokens (or begin in the prompt).
    let mut generated = String::new();
    let context = tokenizer.inner.decode(&prompt, false).unwrap_or_default();
    let tokens = whet_infer::generate(&model, &prompt, &config, &device, |t| {
        if eos.contains(&t) {
            return true;
        }
        let Ok(Some(piece)) = stream.step(t) else {
            return true;
        };
        let printed = generated.len();
        generated.push_str(&piece);
        let stop_at = whet_infer::stop_end(&context, &generated, &args.stop);
        let end = stop_at.unwrap_or(generated.len()).max(printed);
        print!("{}", &generated[printed..end]);
        let _ = stdout.flush();
        stop_at.is_none()
    })?;
    println!();
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "[{} prompt tokens, {} new tokens in {:.2}s, {:.1} tokens/s]",
        prompt.len(),
        tokens.len(),
        secs,
        tokens.len() as f64 / secs
    );
    Ok(())
}

/// Several prompts in batches of `--batch-size`: one JSON line per prompt, cut at the first
/// stop string.
fn generate_many(
    model: &whet_models::CausalModel,
    tokenizer: &whet_models::TextTokenizer,
    prompts: &[String],
    render: &dyn Fn(&str) -> Result<Vec<u32>>,
    config: &GenerationConfig,
    args: &GenerateArgs,
    device: &burn::tensor::Device,
) -> Result<()> {
    let pad = tokenizer
        .pad
        .as_ref()
        .or(tokenizer.eos.as_ref())
        .map_or(0, |t| t.id);
    let start = std::time::Instant::now();
    let mut new_tokens = 0;
    for chunk in prompts.chunks(args.batch_size.max(1)) {
        let ids: Vec<Vec<u32>> = chunk.iter().map(|p| render(p)).collect::<Result<_>>()?;
        let outs = whet_infer::generate_batch(model, &ids, config, pad, device)?;
        for ((p, out), prompt_ids) in chunk.iter().zip(outs).zip(&ids) {
            new_tokens += out.len();
            let context = tokenizer
                .inner
                .decode(prompt_ids, false)
                .unwrap_or_default();
            let mut text = tokenizer
                .inner
                .decode(&out, true)
                .map_err(|e| anyhow::anyhow!("cannot decode: {e}"))?;
            if let Some(end) = whet_infer::stop_end(&context, &text, &args.stop) {
                text.truncate(end);
            }
            println!(
                "{}",
                serde_json::json!({"prompt": p, "generated_text": text})
            );
        }
    }
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "[{} prompts in batches of {}, {new_tokens} new tokens in {secs:.2}s, {:.1} tokens/s]",
        prompts.len(),
        args.batch_size.max(1),
        new_tokens as f64 / secs
    );
    Ok(())
}

/// `whet info`'s config line of an encoder.
fn encoder_line(
    layers: usize,
    hidden: usize,
    heads: usize,
    intermediate: usize,
    vocab: usize,
    positions: usize,
) -> String {
    format!(
        "config:       {layers} layers, hidden {hidden}, {heads} heads, intermediate \
         {intermediate}, vocab {vocab}, max positions {positions}"
    )
}

fn export(model: &std::path::Path, out: &std::path::Path, format: &str, ty: &str) -> Result<()> {
    use whet_gguf::GgmlType;
    if format != "gguf" {
        bail!("--format {format:?}: gguf is the only export format");
    }
    let ty = match ty.to_ascii_lowercase().as_str() {
        "f32" => GgmlType::F32,
        "f16" => GgmlType::F16,
        "q8_0" => GgmlType::Q8_0,
        "q4_0" => GgmlType::Q4_0,
        other => bail!("--type {other:?}: use f32, f16, q8_0 or q4_0"),
    };
    if model.join("adapter_config.json").is_file() {
        bail!(
            "{} is an adapter: fold it into its base first (whet merge --adapter {} MERGED), then export MERGED",
            model.display(),
            model.display()
        );
    }
    let ckpt = Checkpoint::open(model)?;
    let whet_models::FamilyConfig::Llama(config) = &ckpt.config else {
        bail!(
            "{} is a {} model; GGUF export covers the rotary decoders (llama, mistral, qwen2, \
             qwen3, phi3, gemma, gemma2, gemma3_text)",
            model.display(),
            ckpt.model_type()
        );
    };
    let tok = ckpt
        .tokenizer()
        .with_context(|| format!("the GGUF file needs the tokenizer of {}", model.display()))?;
    let s = whet_models::gguf::export(ckpt.source.as_ref(), config, &tok, ty, out)?;
    let types: Vec<String> = s.types.iter().map(|(t, n)| format!("{n} {t}")).collect();
    println!(
        "wrote {} ({} tensors: {}; {:.1} MB)",
        out.display(),
        s.tensors,
        types.join(", "),
        s.bytes as f64 / 1e6
    );
    if !s.fallbacks.is_empty() {
        println!(
            "rows not whole 32-value blocks, written as F16: {}",
            s.fallbacks.join(", ")
        );
    }
    Ok(())
}

fn convert(gguf: PathBuf, out_dir: PathBuf) -> Result<()> {
    let summary = whet_models::gguf::convert_to_folder(&gguf, &out_dir)?;
    println!(
        "wrote {} ({} tensors, {:.1}M parameters, f32)",
        out_dir.display(),
        summary.tensors,
        summary.parameters as f64 / 1e6
    );
    if !summary.skipped.is_empty() {
        println!(
            "skipped GGUF tensors with no Hugging Face counterpart: {}",
            summary.skipped.join(", ")
        );
    }
    Ok(())
}
