"""A long LoRA trajectory on the real job (MiniLM, tweet sentiment, LoRA r 8 on query/value,
lr 1e-3, batch 16, AdamW, clipping 1.0, linear schedule) with every dropout switched off, so
that whet and peft can be compared step by step from the same start: the same initial adapter
and classifier, the same batches in the same order. A diagnostic for the LoRA quality gap of
issue 3, not a committed fixture (it is a few MB and depends on the cached model).

Usage:
  .venv-ref/bin/python scripts/reference/lora_long_trajectory.py --model cache/minilm \
      --csv cache/data/tweets.csv --steps 150 --out /tmp/lora-traj
  WHET_LORA_TRAJECTORY=/tmp/lora-traj cargo test -p whet-train --test main \
      -- --ignored long_lora_trajectory --nocapture
OUT gets model/ (MiniLM with the reference's fresh classifier, dropout 0 in config.json) and
trajectory.safetensors (init.* adapter, mb{k}_* batches, step_loss, grad_norm, lr)."""
import argparse
import csv
import json
import random
from pathlib import Path

import torch
from safetensors.torch import save_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--csv", required=True)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(2)
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(args.csv, encoding="latin-1", newline="") as f:
        rows = list(csv.DictReader(f))
    # The file is grouped by label: a fixed shuffle so that batches are mixed.
    random.Random(0).shuffle(rows)
    labels = sorted({r["sentiment"] for r in rows})
    l2i = {l: i for i, l in enumerate(labels)}
    tok = AutoTokenizer.from_pretrained(args.model)
    tok._tokenizer.no_padding()
    tok._tokenizer.no_truncation()

    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model, num_labels=len(labels), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        attn_implementation="eager")
    model.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=["query", "value"]))
    init = {f"init.{k}": v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sched = get_linear_schedule_with_warmup(opt, 0, args.steps)
    tensors = {}
    step_loss, grad_norm, lrs = [], [], []
    model.train()
    for step in range(args.steps):
        chunk = rows[step * args.batch:(step + 1) * args.batch]
        enc = tok([r["text"] for r in chunk], truncation=True, max_length=128, padding=True,
                  return_tensors="pt")
        y = torch.tensor([l2i[r["sentiment"]] for r in chunk])
        tensors[f"mb{step}_input_ids"] = enc["input_ids"]
        tensors[f"mb{step}_attention_mask"] = enc["attention_mask"]
        tensors[f"mb{step}_labels"] = y
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                       token_type_ids=enc["token_type_ids"]).logits
        loss = torch.nn.functional.cross_entropy(logits, y)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        step_loss.append(loss.item())
        grad_norm.append(norm.item())
        if step % 10 == 0:
            print(f"step {step}: loss {loss.item():.4f} grad norm {norm.item():.4f}", flush=True)
    final = {f"final.{k}": v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    tensors.update(init)
    tensors.update(final)
    tensors["step_loss"] = torch.tensor(step_loss)
    tensors["grad_norm"] = torch.tensor(grad_norm)
    tensors["lr"] = torch.tensor(lrs)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "trajectory.safetensors"))
    (out / "trajectory.json").write_text(json.dumps({"steps": args.steps, "labels": labels}))


if __name__ == "__main__":
    main()
