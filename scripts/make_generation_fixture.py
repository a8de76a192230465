#!/usr/bin/env python3
"""Write tests/fixtures/generation/: transformers' greedy generations with SmolLM2 for whet's
`generate --repetition-penalty`, `--stop` and `--few-shot` to reproduce.

    .venv-ref/bin/python scripts/make_generation_fixture.py     # needs cache/smollm2, ~5 min

Model and tokenizer as in scripts/make_fixtures.py: `from_pretrained("cache/smollm2",
gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=float32)`, eager attention, eval; one thread.
Every case is `model.generate(do_sample=False, max_new_tokens=N, repetition_penalty=...,
stop_strings=[...], tokenizer=tok)` (EOS: the generation config's, id 2 `<|im_end|>`).

How whet's CLI builds each prompt, and the transformers equivalent used here:
- plain prompt: `tok(text)` (SmolLM2's GGUF adds no BOS);
- `--few-shot few_shot.txt` (plain): the file's text, a newline added when it does not end
  with one, then the prompt: `tok(shots + prompt)`;
- `--chat --few-shot few_shot.jsonl`: each line {"user", "assistant"} becomes an earlier
  exchange, then the prompt as the last user message:
  `tok.apply_chat_template(messages, add_generation_prompt=True)`;
- `--stop S`: transformers' `stop_strings` stops after the token that completes S and keeps
  that token, which may run past S (" Felix" completes "Fel"); whet stops after the same
  token, and its printed text ends with S. `text` is the decoded new tokens
  (`skip_special_tokens=True`).

`smollm2.txt` (read by crates/whet-infer/tests/generation.rs; no JSON so that the test needs no
JSON crate): blocks of `key value` lines, each block opened by `case NAME`. Strings are escaped
(`\\\\`, `\\n`, `\\t`, `\\r`); lists are space-separated. Keys: `max_new_tokens`,
`repetition_penalty`, `stop` (one line per stop string), `prompt` (the --prompt text), `few_shot`
(the file, or `-`), `chat` (0/1), `message ROLE CONTENT` (chat cases: the conversation
whet's CLI builds, in order), `prompt_ids`, `new_ids`, `text`, `stopped_by` (`eos`, `stop`
or `length`), `min_gap` (smallest gap between the two best processed logits over the steps:
how far greedy is from a tie).
"""
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "cache" / "smollm2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
OUT = ROOT / "tests" / "fixtures" / "generation"

STORY = "The quick brown fox jumps over the lazy dog. Once upon a time, in a small village,"
CODE = "def fibonacci(n):\n"
SHOTS_TXT = ("Q: What is the capital of Italy?\nA: Rome\n\n"
             "Q: What is the capital of Japan?\nA: Tokyo\n\n")
SHOTS_JSONL = [{"user": "Translate to French: cat", "assistant": "chat"},
               {"user": "Translate to French: dog", "assistant": "chien"}]

# name, prompt, chat, few-shot file, max_new_tokens, repetition_penalty, stop strings
CASES = [
    ("penalty_story", STORY, False, None, 24, 1.3, []),
    ("penalty_chat", "Write a short poem about the sea.", True, None, 24, 1.3, []),
    ("penalty_code", CODE, False, None, 24, 1.3, []),
    ("stop_period", STORY, False, None, 40, 1.0, ["."]),
    # " Felix" completes "Fel": transformers keeps the whole token.
    ("stop_inside_token", STORY, False, None, 40, 1.0, ["Fel"]),
    ("stop_first_of_two", CODE, False, None, 40, 1.0, ["else", "return"]),
    # The prompt ends in "\n": a stop string may begin in it and end in the generated text.
    ("stop_begins_in_prompt", CODE, False, None, 40, 1.0, ["\n\n"]),
    ("few_shot_plain", "Q: What is the capital of France?\nA:", False, "few_shot.txt", 16, 1.0,
     ["\n"]),
    ("few_shot_chat", "Translate to French: house", True, "few_shot.jsonl", 24, 1.0, []),
    ("few_shot_chat_penalty", "Translate to French: house", True, "few_shot.jsonl", 24, 1.3, []),
]


def esc(s: str) -> str:
    return s.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def cli_prompt(tok, prompt, chat, few_shot):
    """The prompt ids whet's CLI (`generate` in crates/whet/src/main.rs) builds, and the chat
    messages, through transformers."""
    if chat:
        messages = []
        if few_shot:
            for line in (OUT / few_shot).read_text().splitlines():
                if line.strip():
                    ex = json.loads(line)
                    messages += [{"role": "user", "content": ex["user"]},
                                 {"role": "assistant", "content": ex["assistant"]}]
        messages.append({"role": "user", "content": prompt})
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
        return list(ids["input_ids"]), messages
    shots = (OUT / few_shot).read_text() if few_shot else ""
    if shots and not shots.endswith("\n"):
        shots += "\n"
    return tok(shots + prompt, add_special_tokens=True)["input_ids"], []


def main():
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "few_shot.txt").write_text(SHOTS_TXT)
    (OUT / "few_shot.jsonl").write_text("".join(json.dumps(x) + "\n" for x in SHOTS_JSONL))
    tok = AutoTokenizer.from_pretrained(SRC, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(SRC, gguf_file=GGUF, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    eos = model.generation_config.eos_token_id
    lines = ["# transformers %s, torch %s: written by scripts/make_generation_fixture.py, do not edit"
             % (__import__("transformers").__version__, torch.__version__),
             f"# eos {eos}"]
    for name, prompt, chat, few_shot, n, penalty, stop in CASES:
        ids, messages = cli_prompt(tok, prompt, chat, few_shot)
        x = torch.tensor([ids])
        kw = {"stop_strings": stop, "tokenizer": tok} if stop else {}
        with torch.no_grad():
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                                 max_new_tokens=n, repetition_penalty=penalty, pad_token_id=eos,
                                 output_scores=True, return_dict_in_generate=True, **kw)
        new = out.sequences[0, len(ids):].tolist()
        top2 = [s[0].topk(2).values for s in out.scores]
        min_gap = min((t[0] - t[1]).item() for t in top2)
        text = tok.decode(new, skip_special_tokens=True)
        if new[-1] == eos:
            stopped_by = "eos"
        elif len(new) < n:
            stopped_by = "stop"
        else:
            stopped_by = "length"
        if stop:
            # The stop string is completed by the last token, not earlier.
            # (in the prompt's text followed by the new text, ending in the new text)
            before = tok.decode(ids, skip_special_tokens=False)
            assert stopped_by != "stop" or any(s in before + text for s in stop), (name, text)
            assert not any(s in (before + tok.decode(new[:-1], skip_special_tokens=True))[len(before) - len(s) + 1:]
                           for s in stop), name
        assert min_gap > 5e-3, (name, min_gap)
        lines += [f"case {name}", f"max_new_tokens {n}", f"repetition_penalty {penalty}"]
        lines += [f"stop {esc(s)}" for s in stop]
        lines += [f"prompt {esc(prompt)}", f"few_shot {few_shot or '-'}", f"chat {int(chat)}"]
        lines += [f"message {m['role']} {esc(m['content'])}" for m in messages]
        lines += [f"prompt_ids {' '.join(map(str, ids))}", f"new_ids {' '.join(map(str, new))}",
                  f"text {esc(text)}", f"stopped_by {stopped_by}", f"min_gap {min_gap:.4f}"]
        print(f"{name}: {len(ids)} prompt tokens, {len(new)} new ({stopped_by}), "
              f"min gap {min_gap:.4f}: {text!r}")
    (OUT / "smollm2.txt").write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
