#!/usr/bin/env python3
"""Check that peft loads an adapter directory and reproduces expected logits.

    .venv-ref/bin/python scripts/check/check_peft_adapter.py BASE_DIR ADAPTER_DIR EXPECTED_SAFETENSORS [--atol 1e-4]

BASE_DIR is loaded with AutoModelForSequenceClassification (float32, eager attention, eval),
ADAPTER_DIR with peft.PeftModel.from_pretrained. EXPECTED_SAFETENSORS must hold input_ids and
attention_mask (i64 [B,T]), optionally token_type_ids, and logits (f32 [B,num_labels]).
Prints the max abs difference; exits 0 when it is <= atol, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys

import torch
from safetensors.torch import load_file


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base_dir")
    ap.add_argument("adapter_dir")
    ap.add_argument("expected")
    ap.add_argument("--atol", type=float, default=1e-4)
    args = ap.parse_args()

    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    torch.set_num_threads(1)
    exp = load_file(args.expected)
    missing = [k for k in ("input_ids", "attention_mask", "logits") if k not in exp]
    if missing:
        print(f"check_peft_adapter: {args.expected} lacks {missing}", file=sys.stderr)
        return 2
    batch = {k: exp[k].long() for k in ("input_ids", "attention_mask", "token_type_ids") if k in exp}

    base = AutoModelForSequenceClassification.from_pretrained(
        args.base_dir, dtype=torch.float32, attn_implementation="eager", num_labels=exp["logits"].shape[1])
    if base.config.pad_token_id is None and base.config.eos_token_id is not None:
        # A decoder without a pad token pads with EOS, as whet does (and the GPT-2 tutorial).
        base.config.pad_token_id = base.config.eos_token_id
    model = PeftModel.from_pretrained(base, args.adapter_dir).eval()
    with torch.no_grad():
        got = model(**batch).logits.float()
    want = exp["logits"].float()
    if got.shape != want.shape:
        print(f"FAIL: logits shape {list(got.shape)} != expected {list(want.shape)}")
        return 1
    diff = (got - want).abs().max().item()
    ok = diff <= args.atol
    print(f"{'OK' if ok else 'FAIL'}: max abs diff {diff:.3g} (atol {args.atol:g}) "
          f"over logits {list(got.shape)}")
    if not ok:
        print(f"got:\n{got}\nexpected:\n{want}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
