#!/usr/bin/env python3
"""Write tests/fixtures/lm/smollm2-sft-masks.json: the token ids and labels trl's own SFTTrainer
builds for chat data on SmolLM2's tokenizer and chat template:

    .venv-ref/bin/python scripts/make_sft_mask_fixture.py

Two kinds of rows, each through a real `trl.SFTTrainer` (trl 1.16) whose prepared
`train_dataset` is read back:
- `prompt_completion`: conversational prompt-completion rows (`prompt` = a list of messages with
  few-shot assistant answers inside, `completion` = the assistant answer), default settings, so
  `completion_only_loss` applies: only what follows the prompt rendered with the generation
  prompt is learnt.
- `messages`: conversational language-modelling rows with `assistant_only_loss=True`: every
  assistant turn is learnt. trl needs `{% generation %}` markers for that and cannot patch
  SmolLM2's stock template (`get_training_chat_template` raises for it), so this script adds
  them around what an assistant message renders after the generation prompt (its content and
  `<|im_end|>\\n`); the rendered text is unchanged, which the script asserts.

The model passed to SFTTrainer is tests/fixtures/tiny-llama (it is never run: only the
dataset preparation is used). Needs cache/smollm2 (scripts/fetch_assets.sh --only smollm2).
"""

import json
import tempfile
from importlib.metadata import version
from pathlib import Path

from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "cache" / "smollm2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY = ROOT / "tests" / "fixtures" / "tiny-llama"
OUT = ROOT / "tests" / "fixtures" / "lm" / "smollm2-sft-masks.json"

# The GGUF's template holds real newlines inside its string literals.
STOCK_TURN = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
MARKED_TURN = (
    "{% if message['role'] == 'assistant' %}{{'<|im_start|>assistant\n'}}{% generation %}"
    "{{ message['content'] + '<|im_end|>' + '\n' }}{% endgeneration %}{% else %}" + STOCK_TURN + "{% endif %}"
)


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


SYSTEM = {"role": "system", "content": "Answer with the sentiment: positive or negative."}

# Few-shot prompts: assistant answers inside the prompt are context, not targets. Answers that
# start without a space, with digits, punctuation or non-ASCII text probe the BPE boundary.
PROMPT_COMPLETION = [
    {"prompt": [SYSTEM, u("I loved it."), a("positive"), u("Dull and slow."), a("negative"),
                u("What a ride!")], "completion": [a("positive")]},
    {"prompt": [u("2+2?"), a("4"), u("3+5?"), a("8"), u("10+7?")], "completion": [a("17")]},
    {"prompt": [u("Translate 'coffee' to French."), a("café"), u("And 'tea'?")],
     "completion": [a("thé ☕ — du thé.")]},
    {"prompt": [u("Say nothing but a dot.")], "completion": [a(".")]},
    {"prompt": [SYSTEM, u("Meh."), a("negative"), u("   spaced   ")], "completion": [a("  negative\n")]},
    {"prompt": [u("List two colours."), a("red, blue"), u("Two more?")], "completion": [a("green,\nyellow")]},
]

MESSAGES = [
    [u("Name a prime."), a("Seven."), u("And an even one?"), a("Two — the only even prime.")],
    [SYSTEM, u("Great film."), a("positive"), u("Awful."), a("negative")],
    [u("Hi"), a("Hello! How can I help?")],
]


def prepared(tokenizer, model, rows, **config):
    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(output_dir=tmp, report_to=[], max_length=None, bf16=False, use_cpu=True, **config)
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer)
        return [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in trainer.train_dataset]


def main() -> None:
    tok = AutoTokenizer.from_pretrained(SRC, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(TINY)
    cases = []
    out = prepared(tok, model, PROMPT_COMPLETION)
    for row, o in zip(PROMPT_COMPLETION, out, strict=True):
        cases.append({"kind": "prompt_completion", **row, **o})

    stock = tok.chat_template
    assert STOCK_TURN in stock, stock
    marked = stock.replace(STOCK_TURN, MARKED_TURN)
    for m in MESSAGES:
        assert tok.apply_chat_template(m, tokenize=False, chat_template=marked) == \
            tok.apply_chat_template(m, tokenize=False)
    tok.chat_template = marked
    out = prepared(tok, model, [{"messages": m} for m in MESSAGES], assistant_only_loss=True)
    for m, o in zip(MESSAGES, out, strict=True):
        cases.append({"kind": "messages", "messages": m, **o})

    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"versions": {p: version(p) for p in ["trl", "transformers", "tokenizers"]},
                               "cases": cases}, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {OUT.relative_to(ROOT)}: {len(cases)} cases")


if __name__ == "__main__":
    main()
