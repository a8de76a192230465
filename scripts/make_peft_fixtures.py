#!/usr/bin/env python3
"""Regenerate whet's PEFT/LoRA parity fixtures in tests/fixtures/peft/ with the reference stack.

    .venv-ref/bin/python scripts/make_peft_fixtures.py [--only bert-lora,llama-lora-rslora,distilbert-lora]

Needs the tiny random models already in tests/fixtures/ (written by scripts/make_fixtures.py).
For each case: load the tiny base with AutoModelForSequenceClassification (eager attention),
wrap it with peft.get_peft_model, then (torch.manual_seed(1)) set every lora_B to 0.1*N(0,1) and
add 0.05*N(0,1) to the modules_to_save copy of the head, so both the adapter and the saved head
change the outputs. Writes, per case:

    adapter_config.json, adapter_model.safetensors   as PeftModel.save_pretrained writes them
    expected.safetensors   input_ids, attention_mask[, token_type_ids] (the base fixture's batch),
                           logits (adapter on), base_logits (disable_adapter()), merged_logits
                           (merge_and_unload() of a deep copy)
    expected.json          trainable-parameter counts and printed line, saved keys with shapes,
                           targeted module names, base fixture dir

Float32 on CPU, one thread, deterministic algorithms, fixed seeds, PYTHONHASHSEED=0 (the script
re-executes itself with it): reruns write identical bytes.
scripts/check_peft_adapter.py checks an adapter directory against such an expected.safetensors.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import sys
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import load_file as load_torch
from safetensors.torch import save_file as save_torch

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
OUT = FIXTURES / "peft"

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)
torch.set_default_dtype(torch.float32)

CASES = {
    "bert-lora": ("tiny-bert", dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"])),
    "llama-lora-rslora": ("tiny-llama-cls", dict(r=4, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True)),
    "distilbert-lora": ("tiny-distilbert", dict(r=2, lora_alpha=4, target_modules=["q_lin", "v_lin"])),
    # IA3: output scaling of keys / values, input scaling of the feed-forward output layer.
    "bert-ia3": ("tiny-bert", dict(peft_type="IA3", target_modules=["key", "value", "output.dense"],
                                   feedforward_modules=["output.dense"])),
    "llama-ia3": ("tiny-llama-cls", dict(peft_type="IA3", target_modules=["k_proj", "v_proj", "down_proj"],
                                         feedforward_modules=["down_proj"])),
}
BATCH_KEYS = ("input_ids", "attention_mask", "token_type_ids")

# Prompt learning (prefix tuning, prompt tuning): (base fixture, task type, config). The prompt
# encoder keeps peft's N(0, 1) / default init; the head's modules_to_save copy is moved as above.
PROMPT_CASES = {
    "bert-prefix": ("tiny-bert", "SEQ_CLS", dict(peft_type="PREFIX_TUNING", num_virtual_tokens=3)),
    "bert-prompt": ("tiny-bert", "SEQ_CLS", dict(peft_type="PROMPT_TUNING", num_virtual_tokens=4)),
    "distilbert-prompt": ("tiny-distilbert", "SEQ_CLS",
                          dict(peft_type="PROMPT_TUNING", num_virtual_tokens=2, token_dim=32,
                               num_attention_heads=4, num_layers=2)),
    "gpt2-prefix-proj": ("tiny-gpt2-cls", "SEQ_CLS",
                         dict(peft_type="PREFIX_TUNING", num_virtual_tokens=3, prefix_projection=True,
                              encoder_hidden_size=16)),
    "llama-prefix-proj": ("tiny-llama-cls", "SEQ_CLS",
                          dict(peft_type="PREFIX_TUNING", num_virtual_tokens=2, prefix_projection=True,
                               encoder_hidden_size=12)),
    "llama-prompt": ("tiny-llama-cls", "SEQ_CLS", dict(peft_type="PROMPT_TUNING", num_virtual_tokens=3)),
    # Causal LM: logits and the loss with labels, on the right-padded batch.
    "llama-prefix-lm": ("tiny-llama", "CAUSAL_LM", dict(peft_type="PREFIX_TUNING", num_virtual_tokens=3)),
    "gpt2-prompt-lm": ("tiny-gpt2", "CAUSAL_LM", dict(peft_type="PROMPT_TUNING", num_virtual_tokens=2)),
}


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def load_base(base: str):
    from transformers import AutoModelForSequenceClassification

    # A relative path, so adapter_config.json's base_model_name_or_path does not depend on the checkout.
    return AutoModelForSequenceClassification.from_pretrained(
        f"tests/fixtures/{base}", dtype=torch.float32, attn_implementation="eager").eval()


def make_case(case: str) -> None:
    from peft import IA3Config, LoraConfig, get_peft_model

    base_name, lora_kw = CASES[case]
    lora_kw = dict(lora_kw)
    kind = lora_kw.pop("peft_type", "LORA")
    config_class = IA3Config if kind == "IA3" else LoraConfig
    fx = load_torch(FIXTURES / base_name / "fixture.safetensors")
    batch = {k: fx[k] for k in BATCH_KEYS if k in fx}

    torch.manual_seed(0)
    model = get_peft_model(load_base(base_name), config_class(task_type="SEQ_CLS", **lora_kw))

    torch.manual_seed(1)
    perturbed_head = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(0.1 * torch.randn(p.shape))
            elif ".ia3_l." in name:  # starts at ones: move every scale
                p.add_(0.2 * torch.randn(p.shape))
            elif ".modules_to_save.default." in name:
                p.add_(0.05 * torch.randn(p.shape))
                perturbed_head.append(name)
    if not perturbed_head:
        raise SystemExit(f"{case}: no modules_to_save parameters found")
    model.eval()

    d = OUT / case
    d.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(d)
    (d / "README.md").unlink(missing_ok=True)

    with torch.no_grad():
        logits = model(**batch).logits
        with model.disable_adapter():
            base_logits = model(**batch).logits
        merged = copy.deepcopy(model).merge_and_unload().eval()
        merged_logits = merged(**batch).logits
    d_merge = (merged_logits - logits).abs().max().item()
    d_base = (base_logits - fx["logits"]).abs().max().item()
    d_adapt = (logits - base_logits).abs().max().item()
    if d_merge > 1e-5 or d_base > 1e-5 or d_adapt < 1e-2:
        raise SystemExit(f"{case}: merged-vs-adapter {d_merge:g}, disabled-vs-fixture {d_base:g}, "
                         f"adapter effect {d_adapt:g}")

    trainable, total = model.get_nb_trainable_parameters()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        model.print_trainable_parameters()
    printed = buf.getvalue().strip()

    tensors = {**batch, "logits": logits, "base_logits": base_logits, "merged_logits": merged_logits}
    save_torch({k: v.detach().contiguous() for k, v in tensors.items()}, d / "expected.safetensors")

    saved = load_torch(d / "adapter_model.safetensors")
    lora_modules = [n for n, m in model.named_modules() if hasattr(m, "lora_A") or hasattr(m, "ia3_l")]
    write_json(d / "expected.json", {
        "base_fixture": base_name,
        "lora_config": {"task_type": "SEQ_CLS", **lora_kw},
        **({"peft_type": kind} if kind != "LORA" else {}),
        "trainable_parameters": {"trainable": trainable, "all": total},
        "print_trainable_parameters": printed,
        "modules_to_save": sorted(model.peft_config["default"].modules_to_save or []),
        "perturbed_head_parameters": perturbed_head,
        "lora_target_modules": lora_modules,
        "adapter_keys": {k: list(v.shape) for k, v in sorted(saved.items())},
        "expected_tensors": {k: list(v.shape) for k, v in tensors.items()},
        "checks": {"max_abs_merged_minus_logits": d_merge, "max_abs_base_logits_minus_fixture_logits": d_base,
                   "max_abs_logits_minus_base_logits": d_adapt},
    })
    print(f"{case}: {printed}; {len(saved)} adapter tensors; merged diff {d_merge:.2g}, "
          f"adapter effect {d_adapt:.3g}", flush=True)


def make_prompt_case(case: str) -> None:
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    base_name, task, kw = PROMPT_CASES[case]
    kw = dict(kw)
    kind = kw.pop("peft_type")
    config_class = PrefixTuningConfig if kind == "PREFIX_TUNING" else PromptTuningConfig
    fx = load_torch(FIXTURES / base_name / "fixture.safetensors")
    if task == "CAUSAL_LM":
        batch = {"input_ids": fx["input_ids_right"], "attention_mask": fx["attention_mask_right"]}
        auto = AutoModelForCausalLM
    else:
        batch = {k: fx[k] for k in BATCH_KEYS if k in fx}
        auto = AutoModelForSequenceClassification
    base = auto.from_pretrained(f"tests/fixtures/{base_name}", dtype=torch.float32,
                                attn_implementation="eager").eval()
    torch.manual_seed(0)
    model = get_peft_model(base, config_class(task_type=task, **kw))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".modules_to_save.default." in name:
                p.add_(0.05 * torch.randn(p.shape))
    model.eval()

    d = OUT / case
    d.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(d)
    (d / "README.md").unlink(missing_ok=True)
    with torch.no_grad():
        extra = {}
        # peft 0.21's disable_adapter() fails for prompt learning on SEQ_CLS models, so the
        # base logits are the base fixture's own (the same model with its original head).
        if task == "CAUSAL_LM":
            out = model(**batch, labels=fx["labels"])
            extra["loss"] = out.loss.reshape(1)
            base_logits = fx["logits_right"]
        else:
            out = model(**batch)
            base_logits = fx["logits"]
        logits = out.logits
    # transformers' decoder classifiers pool the last position when given inputs_embeds (a
    # soft prompt), padding or not; only rows without padding are comparable there.
    full_rows = [i for i, m in enumerate(batch["attention_mask"]) if bool(m.all())]
    comparable = list(range(len(batch["input_ids"])))
    if task == "SEQ_CLS" and kind == "PROMPT_TUNING" and base_name in ("tiny-llama-cls", "tiny-gpt2-cls"):
        comparable = full_rows
    trainable, total = model.get_nb_trainable_parameters()
    tensors = {**batch, "logits": logits, "base_logits": base_logits, **extra}
    if task == "CAUSAL_LM":
        tensors["labels"] = fx["labels"]
    save_torch({k: v.detach().contiguous() for k, v in tensors.items()}, d / "expected.safetensors")
    saved = load_torch(d / "adapter_model.safetensors")
    write_json(d / "expected.json", {
        "base_fixture": base_name,
        "task_type": task,
        "peft_type": kind,
        "config": kw,
        "trainable_parameters": {"trainable": trainable, "all": total},
        "comparable_rows": comparable,
        "adapter_keys": {k: list(v.shape) for k, v in sorted(saved.items())},
        "expected_tensors": {k: list(v.shape) for k, v in tensors.items()},
    })
    print(f"{case}: trainable {trainable} of {total}; saved {sorted(saved)}", flush=True)


def main() -> None:
    # peft stores target_modules from a Python set: pin the string hash seed so the order that
    # lands in adapter_config.json (and so its bytes) is the same on every run.
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"})
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    known = {**CASES, **PROMPT_CASES}
    ap.add_argument("--only", default=",".join(known), help=f"comma-separated subset of {','.join(known)}")
    args = ap.parse_args()
    cases = [c for c in args.only.split(",") if c]
    unknown = [c for c in cases if c not in known]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; known: {list(known)}")
    missing = sorted({known[c][0] for c in cases if not (FIXTURES / known[c][0] / "model.safetensors").is_file()})
    if missing:
        sys.exit(f"make_peft_fixtures: missing base fixtures {missing}; run scripts/make_fixtures.py --only tiny")
    os.chdir(ROOT)
    for c in cases:
        make_case(c) if c in CASES else make_prompt_case(c)
    for p in OUT.rglob("*"):  # safetensors writes 0600; keep the tree readable like any checkout
        if p.is_file():
            p.chmod(0o644)
    print("versions: " + ", ".join(f"{p} {version(p)}" for p in ["torch", "transformers", "peft", "safetensors"]))
    for p in sorted(OUT.rglob("*")):
        if p.is_file():
            print(f"  {p.relative_to(ROOT)}  {p.stat().st_size} B")


if __name__ == "__main__":
    main()
