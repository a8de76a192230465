"""Checks that a full / head fine-tuned folder written by `whet train` loads in `transformers`
(`AutoModelForSequenceClassification.from_pretrained`) to the logits whet computed.

Usage: .venv-ref/bin/python scripts/check/check_hf_classifier.py MODEL_DIR EXPECTED.safetensors [--atol 1e-4]
EXPECTED holds input_ids, attention_mask (token_type_ids) and logits, as written by
`cargo run -p whet --example export_logits MODEL_DIR EXPECTED.safetensors`. Exits 1 on mismatch."""
import argparse
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("expected")
    ap.add_argument("--atol", type=float, default=1e-4)
    args = ap.parse_args()
    exp = load_file(args.expected)
    model = AutoModelForSequenceClassification.from_pretrained(args.model_dir, attn_implementation="eager").eval()
    batch = {k: exp[k].long() for k in ("input_ids", "attention_mask", "token_type_ids") if k in exp}
    with torch.inference_mode():
        logits = model(**batch).logits
    diff = (logits - exp["logits"]).abs().max().item()
    print(f"{args.model_dir}: labels {model.config.id2label}, max |logit diff| = {diff:.2e}")
    if diff > args.atol:
        print("MISMATCH", file=sys.stderr)
        return 1
    print("OK: transformers loads the whet folder to the same logits")
    return 0


if __name__ == "__main__":
    sys.exit(main())
