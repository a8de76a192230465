"""Makes the models and data of scripts/gpu_check.sh where no network is: transformers models
built from configs at real shapes with random weights, saved as Hugging Face folders
(config.json, model.safetensors, tokenizer.json, tokenizer_config.json), and synthetic data in
the formats whet reads.

  python3 scripts/gpu/make_assets.py --out DIR [--sizes real|tiny] [--only minilm,smollm2,llama-1b]

Models (DIR/models/NAME), real sizes:
  minilm    BERT at all-MiniLM-L6-v2's shapes: 6 layers, hidden 384, 12 heads, ffn 1536, vocab 30522
  smollm2   LLaMA at SmolLM2-135M's shapes: 30 layers, hidden 576, 9 heads (3 key/value), ffn 1536,
            vocab 49152, tied embeddings, rope theta 100000
  llama-1b  LLaMA at Llama-3.2-1B's shapes: 16 layers, hidden 2048, 32 heads (8 key/value), ffn 8192,
            vocab 128256, tied embeddings, llama3 rope scaling (1.24B parameters)
`--sizes tiny` keeps the architectures (tied embeddings, llama3 rope scaling) at a few thousand
parameters for the CPU dry run.

The tokenizer is made offline: a word-level `tokenizers` tokenizer whose vocabulary is exactly
the model's (`w<id>` words after the special tokens), so every id a random model can emit
decodes. Its end-of-sequence row of the (tied) embedding is zeroed: with random weights its
logit is then 0 while the largest of the others is positive, so greedy generation never stops
early and both stacks generate the same number of tokens.

Data (DIR/data): `lm.txt` (one text per line, every line `--line-words` words; causal LM in
blocks) and `cls.jsonl` ({"text", "label"}, three labels, every text longer than the classifier's
max_length, so every row is cut to the same length on both stacks).
"""
import argparse
import json
import random
import time
from pathlib import Path

SIZES = {
    "real": {
        "minilm": dict(kind="bert", vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                       num_attention_heads=12, intermediate_size=1536, max_position_embeddings=512),
        "smollm2": dict(kind="llama", vocab_size=49152, hidden_size=576, num_hidden_layers=30,
                        num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
                        max_position_embeddings=8192, rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
        "llama-1b": dict(kind="llama", vocab_size=128256, hidden_size=2048, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, intermediate_size=8192,
                         max_position_embeddings=131072,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192}),
    },
    "tiny": {
        "minilm": dict(kind="bert", vocab_size=1000, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=64, max_position_embeddings=512),
        "smollm2": dict(kind="llama", vocab_size=1000, hidden_size=48, num_hidden_layers=2,
                        num_attention_heads=3, num_key_value_heads=1, intermediate_size=96,
                        max_position_embeddings=2048, rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
        "llama-1b": dict(kind="llama", vocab_size=1200, hidden_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                         max_position_embeddings=4096,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 256}),
    },
}

BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
LLAMA_SPECIALS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2: bos 1, eos 2 (pad = eos)


def word(i):
    return f"w{i}"


def make_tokenizer(kind, vocab_size, out):
    """A word-level tokenizer.json over exactly `vocab_size` ids, plus tokenizer_config.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    specials = BERT_SPECIALS if kind == "bert" else LLAMA_SPECIALS
    vocab = {t: i for i, t in enumerate(specials)}
    for i in range(len(specials), vocab_size):
        vocab[word(i)] = i
    unk = "[UNK]" if kind == "bert" else "<unk>"
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(specials)
    if kind == "bert":
        # What BERT's tokenizer does: [CLS] text [SEP] (pairs: [CLS] a [SEP] b [SEP]).
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 512,
                  "pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]",
                  "sep_token": "[SEP]", "mask_token": "[MASK]"}
    else:
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 20,
                  "bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>",
                  "add_bos_token": False}
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return len(specials)


def make_model(name, spec, out, device):
    import torch
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    spec = dict(spec)
    kind = spec.pop("kind")
    out.mkdir(parents=True, exist_ok=True)
    first_word = make_tokenizer(kind, spec["vocab_size"], out)
    torch.manual_seed(0)
    if kind == "bert":
        config = BertConfig(**spec, type_vocab_size=2, hidden_act="gelu", layer_norm_eps=1e-12,
                            pad_token_id=0)
        cls = BertModel
    else:
        config = LlamaConfig(**spec, rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=True,
                             bos_token_id=1, eos_token_id=2, pad_token_id=2, attention_bias=False,
                             mlp_bias=False)
        cls = LlamaForCausalLM
    with torch.device(device):
        model = cls(config)
    if kind == "llama":
        with torch.no_grad():
            model.get_input_embeddings().weight[config.eos_token_id].zero_()
    model = model.to("cpu")
    model.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    del model
    return {"name": name, "kind": kind, "params": n, "vocab_size": spec["vocab_size"],
            "first_word_id": first_word, "path": str(out)}


def words(rng, lo, hi, n):
    return " ".join(word(rng.randrange(lo, hi)) for _ in range(n))


def make_data(out, vocab, first_word, lm_lines, line_words, cls_rows, cls_words):
    """Synthetic text over ids every model's vocabulary holds (`vocab` = the smallest)."""
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    with open(out / "lm.txt", "w") as f:
        for _ in range(lm_lines):
            f.write(words(rng, first_word, vocab, line_words) + "\n")
    labels = ["negative", "neutral", "positive"]
    with open(out / "cls.jsonl", "w") as f:
        for i in range(cls_rows):
            f.write(json.dumps({"text": words(rng, first_word, vocab, cls_words),
                                "label": labels[i % 3]}) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--sizes", choices=list(SIZES), default="real")
    ap.add_argument("--only", default="minilm,smollm2,llama-1b")
    ap.add_argument("--lm-lines", type=int, default=2000)
    ap.add_argument("--line-words", type=int, default=200)
    ap.add_argument("--cls-rows", type=int, default=2000)
    ap.add_argument("--cls-words", type=int, default=160)
    args = ap.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    made = []
    for name in args.only.split(","):
        t = time.perf_counter()
        m = make_model(name, SIZES[args.sizes][name], out / "models" / name, device)
        m["seconds"] = round(time.perf_counter() - t, 1)
        print(f"made {name}: {m['params'] / 1e6:.1f}M parameters in {m['seconds']}s", flush=True)
        made.append(m)
    # Words every vocabulary holds: after the longest special list, below the smallest vocab.
    first = max(len(BERT_SPECIALS), len(LLAMA_SPECIALS))
    vocab = min(s["vocab_size"] for s in SIZES[args.sizes].values())
    make_data(out / "data", vocab, first, args.lm_lines, args.line_words, args.cls_rows, args.cls_words)
    (out / "assets.json").write_text(json.dumps({"sizes": args.sizes, "models": made}, indent=1))
    print(f"wrote {out}/assets.json", flush=True)


if __name__ == "__main__":
    main()
