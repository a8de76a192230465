#!/usr/bin/env python3
"""Check that a causal-LM or question-answering folder written by `whet train` (a peft adapter
or a full transformers folder) loads in transformers / peft to the logits whet computed.

    cargo run -p whet --example export_logits OUT /tmp/expected.safetensors
    .venv-ref/bin/python scripts/check_outputs.py OUT /tmp/expected.safetensors [--atol 1e-4]

The kind comes from the expected file: `logits` [1, T, V] (AutoModelForCausalLM) or
`start_logits` / `end_logits` (AutoModelForQuestionAnswering). An adapter's base is its
`base_model_name_or_path`, a folder or a .gguf file (loaded with gguf_file=). Prints the max
abs difference; exits 1 when it exceeds atol.
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
    kind = "question answering" if qa else "causal LM"
    print(f"{out} ({kind}, {'peft adapter' if adapter.is_file() else 'transformers folder'}): "
          f"max abs logit difference {worst:.2e} (atol {args.atol})")
    return 0 if worst <= args.atol else 1


if __name__ == "__main__":
    sys.exit(main())
