"""Checks that a folder written by `whet convert MODEL.gguf OUT` loads in `transformers` and
computes what `transformers` computes from the GGUF file itself.

Usage: .venv-ref/bin/python scripts/check/check_convert.py MODEL.gguf OUT_DIR
Exits non-zero on any mismatch (logits beyond 1e-4, different tokens or chat rendering)."""
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    gguf, out = sys.argv[1], sys.argv[2]
    d, f = os.path.dirname(gguf), os.path.basename(gguf)
    ref = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32).eval()
    ref_tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    conv = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    conv_tok = AutoTokenizer.from_pretrained(out)

    texts = ["The capital of France is", "Unicode: café, 東京, 🤖 and   spaces."]
    for text in texts:
        a, b = ref_tok(text).input_ids, conv_tok(text).input_ids
        assert a == b, f"token ids differ for {text!r}: {a} vs {b}"
        with torch.inference_mode():
            la = ref(torch.tensor([a])).logits
            lb = conv(torch.tensor([b])).logits
        diff = (la - lb).abs().max().item()
        print(f"{text!r}: {len(a)} tokens, max |logit diff| = {diff:.2e}")
        assert diff <= 1e-4, diff
    msgs = [{"role": "user", "content": "Hi!"}]
    ra = ref_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    rb = conv_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert ra == rb, (ra, rb)
    print("chat template renders identically")
    print("OK: transformers loads the converted folder to the same logits")


if __name__ == "__main__":
    main()
