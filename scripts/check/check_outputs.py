#!/usr/bin/env python3
"""Check that a causal-LM or question-answering folder written by `whet train` (a peft adapter
or a full transformers folder) loads in transformers / peft to the logits whet computed.

    cargo run -p whet --example export_logits OUT /tmp/expected.safetensors
    .venv-ref/bin/python scripts/check/check_outputs.py OUT /tmp/expected.safetensors [--atol 1e-4] [--rtol 1e-5]

The kind comes from the expected file: `logits` [1, T, V] (AutoModelForCausalLM) or
`start_logits` / `end_logits` (AutoModelForQuestionAnswering). An adapter's base is its
`base_model_name_or_path`, a folder or a .gguf file (loaded with gguf_file=). Prints the max
abs difference; exits 1 when it exceeds atol + rtol * (largest |logit| expected).

Why a tolerance relative to the logits' scale: two f32 forward passes that sum in different
orders differ by a few units in the last place of what they add up, and that grows with the
depth of the model and the size of the logits. SmolLM2-135M with no adapter at all (`whet
convert` of the GGUF, then this script on the folder) differs from transformers by 1.76e-4 at
logits up to 42.2 (4.2e-6 of the scale; 2026-12-02), so an adapter over it cannot be held to a
flat 1e-4 while MiniLM's classifiers (logits near 1) sit at 1e-7. rtol 1e-5 is about twice
that base-model noise; a wrong adapter moves logits by whole units.
"""
import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file


def load_base(auto, path: Path):
    if path.suffix == ".gguf":
        return auto.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                    attn_implementation="eager")
    return auto.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("expected")
    ap.add_argument("--atol", type=float, default=1e-4)
    ap.add_argument("--rtol", type=float, default=1e-5, help="times the largest |expected logit|")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoModelForQuestionAnswering

    exp = load_file(args.expected)
    qa = "start_logits" in exp
    auto = AutoModelForQuestionAnswering if qa else AutoModelForCausalLM
    out = Path(args.model_dir)
    adapter = out / "adapter_config.json"
    if adapter.is_file():
        from peft import PeftModel
        base = load_base(auto, Path(json.loads(adapter.read_text())["base_model_name_or_path"]))
        model = PeftModel.from_pretrained(base, out)
    else:
        model = load_base(auto, out)
    model.eval()
    if qa and adapter.is_file():
        # peft 0.21's PeftModelForQuestionAnswering.forward drops token_type_ids (and
        # position_ids) before calling the model, so BERT sees every token as segment A.
        # Call the LoRA-injected model itself, which takes them.
        model = model.get_base_model()
    batch = {k: exp[k].long() for k in ("input_ids", "attention_mask", "token_type_ids") if k in exp}
    with torch.inference_mode():
        res = model(**batch)
    pairs = [("start_logits", res.start_logits), ("end_logits", res.end_logits)] if qa else [("logits", res.logits)]
    worst = max(float((got - exp[k]).abs().max()) for k, got in pairs)
    scale = max(float(exp[k].abs().max()) for k, _ in pairs)
    tol = args.atol + args.rtol * scale
    kind = "question answering" if qa else "causal LM"
    print(f"{out} ({kind}, {'peft adapter' if adapter.is_file() else 'transformers folder'}): "
          f"max abs logit difference {worst:.2e} = {worst / scale:.1e} of the largest logit {scale:.1f} "
          f"(tolerance {tol:.2e} = {args.atol} + {args.rtol} x {scale:.1f})")
    return 0 if worst <= tol else 1


if __name__ == "__main__":
    sys.exit(main())
