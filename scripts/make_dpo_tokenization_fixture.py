#!/usr/bin/env python3
"""Write tests/fixtures/dpo/smollm2-tokenization.json: the rows trl's own DPOTrainer builds from
preference pairs on SmolLM2's real tokenizer:

    .venv-ref/bin/python scripts/make_dpo_tokenization_fixture.py

Two real `trl.DPOTrainer`s (trl 1.16, `max_length` 48, default `truncation_mode` "keep_start"),
one per dataset shape, since trl decides per dataset whether to extract the prompt:
- `explicit`: `prompt`, `chosen`, `rejected` columns;
- `implicit`: `chosen` and `rejected` only, the prompt being their common start
  (`trl.data_utils.extract_prompt`).
Each prepared `train_dataset` (`_prepare_dataset`: prompt extraction, EOS text appended to each
answer, `prompt_ids` / `chosen_ids` / `rejected_ids` split where the tokenized prompt and
prompt + answer diverge, pairs whose prompt fills `max_length` filtered out) is read back, and
each kept example is passed alone through the trainer's own `DataCollatorForPreference`, which
truncates prompt + answer to `max_length` and marks the answer in `completion_mask`.

Per pair: the texts as given, trl's prompt / chosen / rejected after extraction and EOS, its
`prompt_ids` / `chosen_ids` / `rejected_ids`, and the collated rows (`input_ids` and
`completion_mask`, chosen then rejected) — or `dropped: true` when trl filtered the pair out. Also, under `extract_prompt`, what
`trl.data_utils.extract_prompt` returns for a few more string pairs.

The pairs probe BPE boundaries: a prompt ending in a space (which merges into the answer's first
token), answers starting without a space, leading/trailing whitespace and newlines, non-ASCII
text, digits (SmolLM2 splits them one per token), an answer that merges with the prompt's last
token, ChatML special tokens inside the prompt, an answer ending in EOS text already, an empty
answer after a prompt that ends in EOS text, a long pair that `keep_start` truncates, prompts of
47 and 48 tokens (the second fills max_length and is dropped), and implicit prompts whose common
start ends in a space (trl gives that space to the answers), in two spaces, or covers a whole
answer.

The model passed to DPOTrainer is tests/fixtures/tiny-llama (never run: only the dataset
preparation and the collator are used). Needs cache/smollm2 (scripts/fetch_assets.sh --only
smollm2).
"""

import json
import tempfile
from importlib.metadata import version
from pathlib import Path

from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer
from trl.data_utils import extract_prompt

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "cache" / "smollm2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY = ROOT / "tests" / "fixtures" / "tiny-llama"
OUT = ROOT / "tests" / "fixtures" / "dpo" / "smollm2-tokenization.json"
MAX_LENGTH = 48

# SmolLM2 tokenizes each digit alone, so N digits are N tokens.
DIGITS = "3141592653589793238462643383279502884197169399375105820974944592307816406286"
LONG_ANSWER = (" Photosynthesis turns light, water and carbon dioxide into sugar and oxygen; "
               "the light reactions run in the thylakoids, the Calvin cycle in the stroma.")
CHAT_PROMPT = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"

EXPLICIT = [
    # The prompt's trailing space merges into the answer's first token (" yes").
    ("The answer is ", "yes", "no"),
    # Answers without a leading space, and with one.
    ("Q: 2+2=", "4", " four"),
    # Leading newlines ("\n\n" alone is one token, "\n\nok" is three).
    ("Say it:", "\n\nok", "\n  nope"),
    # Trailing whitespace and newlines.
    ("Write a line.\n", "Sure.\n\n", "  \n no \n"),
    # Non-ASCII.
    ("Translate 'coffee' to French: ", "café ☕", "kaffee"),
    ("Résumé in one word:", " naïve", " 日本語です"),
    # Digits.
    ("How many? ", "123456", "12 or 13"),
    # The answer merges with the prompt's last token: "helloworld" is hel|low|orld.
    ("hello", "world", " world"),
    ("ab", "c", "cd"),
    # A prompt that ends in two spaces ("  " is one token; "  yes" is " " + " yes").
    ("Answer:  ", "yes", "no"),
    # ChatML special tokens in the prompt.
    (CHAT_PROMPT, "4", "5, I think."),
    # An answer that already ends with EOS text (trl adds no second one).
    ("Done?", " Done.<|im_end|>", " Not yet."),
    # An empty answer after a prompt ending in EOS text: trl still appends EOS text to it.
    ("<|im_start|>user\nHi<|im_end|>", "", "\nBye"),
    # Long: keep_start cuts prompt + answer at 48 tokens.
    ("Explain photosynthesis in two sentences, for a curious ten-year-old reader:", LONG_ANSWER,
     " Plants eat sunlight."),
    # 47 prompt tokens: one answer token survives truncation.
    (DIGITS[:47], " yes", " no"),
    # 48 prompt tokens: the prompt fills max_length, trl drops the pair.
    (DIGITS[:48], " yes", " no"),
]

IMPLICIT = [
    # The common start ends in a space: trl's extract_prompt gives it to the answers.
    ("The sky is blue.", "The sky is green."),
    ("Capital of France? Paris", "Capital of France? London"),
    # The common start ends in two spaces: the last one goes to the answers.
    ("x  yes", "x  no"),
    # One answer is a prefix of the other: extract_prompt's loop ends without a mismatch and
    # leaves the last common character to the answers.
    ("abc", "abcdef"),
]

# Strings only, through `extract_prompt` itself (no tokenizer): its edge cases.
EXTRACT = [
    ("The sky is blue.", "The sky is green."),
    ("x  yes", "x  no"),
    ("abc", "abcdef"),
    ("abcdef", "abc"),
    ("café au lait", "café noir"),
    ("日本 語", "日本 人"),
    ("a\tb", "a\tc"),
    (" a", " b"),
    ("Yes.", "No."),
    # Different from the first character, `chosen` ending in a space: trl's index becomes -1
    # and all of `chosen` but its last character becomes the prompt (whet keeps it empty).
    ("Yes ", "No"),
]


def prepared(tokenizer, model, rows):
    """trl's rows for `rows`: (kept examples by index, collated chosen/rejected rows)."""
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(output_dir=tmp, report_to=[], max_length=MAX_LENGTH, bf16=False, use_cpu=True)
        assert args.truncation_mode == "keep_start", args.truncation_mode
        data = Dataset.from_list([{**r, "index": i} for i, r in enumerate(rows)])
        trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
        out = {}
        for ex in trainer.train_dataset:
            batch = trainer.data_collator([ex])
            n = batch["attention_mask"].sum(dim=1).tolist()
            ids, mask = batch["input_ids"].tolist(), batch["completion_mask"].tolist()
            out[ex["index"]] = {
                "trl_prompt": ex["prompt"], "trl_chosen": ex["chosen"], "trl_rejected": ex["rejected"],
                "prompt_ids": ex["prompt_ids"], "chosen_ids": ex["chosen_ids"],
                "rejected_ids": ex["rejected_ids"],
                "chosen_row": {"input_ids": ids[0][: n[0]], "completion_mask": mask[0][: n[0]]},
                "rejected_row": {"input_ids": ids[1][: n[1]], "completion_mask": mask[1][: n[1]]},
            }
        return out


def main() -> None:
    tok = AutoTokenizer.from_pretrained(SRC, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(TINY)
    pairs = []
    for kind, rows in [
        ("explicit", [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in EXPLICIT]),
        ("implicit", [{"chosen": c, "rejected": r} for c, r in IMPLICIT]),
    ]:
        out = prepared(tok, model, rows)
        for i, row in enumerate(rows):
            texts = {"prompt": row.get("prompt", ""), "chosen": row["chosen"], "rejected": row["rejected"]}
            if i in out:
                pairs.append({"kind": kind, **texts, "dropped": False, **out[i]})
            else:
                pairs.append({"kind": kind, **texts, "dropped": True})

    extract = [{"chosen": c, "rejected": r, "trl": extract_prompt({"chosen": c, "rejected": r})}
               for c, r in EXTRACT]

    dropped = [p for p in pairs if p["dropped"]]
    truncated = [p for p in pairs if not p["dropped"] and len(p["prompt_ids"]) + len(p["chosen_ids"]) > MAX_LENGTH]
    assert len(dropped) == 1 and truncated, (len(dropped), len(truncated))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({
        "versions": {p: version(p) for p in ["trl", "transformers", "tokenizers"]},
        "max_length": MAX_LENGTH, "truncation_mode": "keep_start", "eos_token": tok.eos_token,
        "pairs": pairs, "extract_prompt": extract,
    }, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {OUT.relative_to(ROOT)}: {len(pairs)} pairs, {len(dropped)} dropped, {len(truncated)} truncated")


if __name__ == "__main__":
    main()
