#!/usr/bin/env python3
"""Write the language-modelling data fixtures (tests/fixtures/lm/) with transformers:

    .venv-ref/bin/python scripts/make_lm_fixtures.py

smollm2-chat.json: for two conversations (system + user + assistant, and two exchanges), the
text `AutoTokenizer(SmolLM2 GGUF).apply_chat_template(messages, tokenize=False)` renders, the
token ids of that text (`tokenizer(text, add_special_tokens=False)`), and the rendered prefix
before each assistant message (`apply_chat_template(messages[:k], add_generation_prompt=True)`)
so the assistant spans whet learns are pinned by the reference. Needs cache/smollm2
(scripts/fetch_assets.sh --only smollm2).
"""

import json
from importlib.metadata import version
from pathlib import Path

from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "cache" / "smollm2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
OUT = ROOT / "tests" / "fixtures" / "lm" / "smollm2-chat.json"

CONVERSATIONS = [
    [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "What colour is the sky?"},
        {"role": "assistant", "content": "Blue."},
    ],
    [
        {"role": "user", "content": "Name a prime number."},
        {"role": "assistant", "content": "Seven."},
        {"role": "user", "content": "And an even one? Café ☕ style!"},
        {"role": "assistant", "content": "Two — the only even prime."},
    ],
]


def main() -> None:
    tok = AutoTokenizer.from_pretrained(SRC, gguf_file=GGUF)
    cases = []
    for messages in CONVERSATIONS:
        text = tok.apply_chat_template(messages, tokenize=False)
        prefixes = [tok.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
                    for k, m in enumerate(messages) if m["role"] == "assistant"]
        cases.append({"messages": messages, "text": text, "ids": tok(text, add_special_tokens=False)["input_ids"],
                      "assistant_prefixes": prefixes})
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"versions": {p: version(p) for p in ["transformers", "tokenizers"]},
                               "cases": cases}, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
