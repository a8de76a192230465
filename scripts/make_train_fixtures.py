#!/usr/bin/env python3
"""Regenerate whet's training-trajectory fixtures in tests/fixtures/train/ with the reference stack.

    .venv-ref/bin/python scripts/make_train_fixtures.py [--only bert-adamw,bert-lora-adamw]

Needs tests/fixtures/tiny-bert (written by scripts/make_fixtures.py). Each case trains the tiny
BERT classifier for 3 optimizer steps exactly as the Hugging Face Trainer would (AdamW with its
decay/no-decay parameter groups, gradient clipping to norm 1, linear schedule with 1 warm-up step,
gradient accumulation) and records the per-step numbers, the weights after each step (`after.{step}.{name}` for the
steps before the last; the last is `param.*` / `final.*`) and the final weights, so whet's
trainer can be checked step for step on what each step changed:

    bert-adamw        full fine-tuning; all parameters trainable
    bert-lora-adamw   peft LoRA (r 4, alpha 8, query/value) + the trainable classifier copy
    bert-multilabel-adamw
                      full fine-tuning with problem_type="multi_label_classification": multi-hot
                      float labels, BCEWithLogitsLoss (the model's own loss, checked)

Dropout is switched off through the config (hidden/attention/classifier dropout 0) so train mode
is deterministic. Float32 on CPU, one thread, deterministic algorithms, fixed seeds,
PYTHONHASHSEED=0 (the script re-executes itself with it): reruns write identical bytes.
tests/fixtures/README.md describes the files and their keys.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib.metadata import version
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file as save_torch

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
OUT = FIXTURES / "train"
BASE = "tests/fixtures/tiny-bert"  # relative, like make_peft_fixtures.py

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)
torch.set_default_dtype(torch.float32)

# ---- data
DATA_SEED = 3
VOCAB_LO, VOCAB_HI = 3, 99       # token ids drawn from [3, 99)
NUM_LABELS = 3
LENGTHS = [9, 6, 4, 7, 5, 8]     # example lengths
PAD_ID = 0
# ---- schedule: optimizer step -> its micro-batches (example indices), accumulated
STEPS = [[[0, 1], [2]], [[3, 4], [5]], [[0, 1], [2]]]
# ---- optimisation
LR, BETAS, EPS, WEIGHT_DECAY, MAX_GRAD_NORM, WARMUP = 1e-3, (0.9, 0.999), 1e-8, 0.01, 1.0, 1
CONFIG_OVERRIDES = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
LORA = dict(task_type="SEQ_CLS", r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"])
LORA_SEED = 5
CASES = ["bert-adamw", "bert-lora-adamw", "bert-multilabel-adamw"]
MULTI_SEED, MULTI_P = 11, 0.4  # multi-hot labels: torch.manual_seed(11); rand(6, 3) < 0.4


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def describe(tensors: dict[str, torch.Tensor]) -> dict[str, dict]:
    return {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)} for k, v in sorted(tensors.items())}


def make_examples() -> tuple[list[torch.Tensor], torch.Tensor]:
    """torch.manual_seed(3); ids_i = randint(3, 99, (len_i,)) for i = 0..5 in order; then labels = randint(0, 3, (6,))."""
    torch.manual_seed(DATA_SEED)
    ids = [torch.randint(VOCAB_LO, VOCAB_HI, (n,), dtype=torch.int64) for n in LENGTHS]
    labels = torch.randint(0, NUM_LABELS, (len(LENGTHS),), dtype=torch.int64)
    return ids, labels


def collate(ids: list[torch.Tensor], labels: torch.Tensor, idx: list[int]) -> dict[str, torch.Tensor]:
    """Dynamic right padding with PAD_ID to the longest example of the micro-batch."""
    t = max(len(ids[i]) for i in idx)
    input_ids = torch.full((len(idx), t), PAD_ID, dtype=torch.int64)
    mask = torch.zeros((len(idx), t), dtype=torch.int64)
    for r, i in enumerate(idx):
        input_ids[r, :len(ids[i])] = ids[i]
        mask[r, :len(ids[i])] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(input_ids),
            "labels": labels[idx].clone()}


def multi_hot_labels() -> torch.Tensor:
    torch.manual_seed(MULTI_SEED)
    return (torch.rand(len(LENGTHS), NUM_LABELS) < MULTI_P).to(torch.float32)


def micro_batches(multi_label: bool = False) -> list[dict[str, torch.Tensor]]:
    ids, labels = make_examples()
    if multi_label:
        labels = multi_hot_labels()
    return [collate(ids, labels, idx) for step in STEPS for idx in step]


def load_base(**extra):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(
        BASE, dtype=torch.float32, attn_implementation="eager", **CONFIG_OVERRIDES, **extra)


def summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Loss summed over the examples of a micro-batch: cross-entropy for class ids; for multi-hot
    float labels BCE-with-logits averaged over the labels of each example (so that dividing by the
    number of examples gives BCEWithLogitsLoss's mean over all elements)."""
    if labels.dtype.is_floating_point:
        return F.binary_cross_entropy_with_logits(logits, labels, reduction="sum") / labels.shape[1]
    return F.cross_entropy(logits, labels, reduction="sum")


def decay_parameter_names(model: torch.nn.Module) -> list[str]:
    # Trainer.get_decay_parameter_names does not use `self`: call the real thing.
    from transformers import Trainer

    return Trainer.get_decay_parameter_names(None, model)


def train(model: torch.nn.Module, mbs: list[dict[str, torch.Tensor]], snapshot):
    """Trains over STEPS; `snapshot()` (the trained tensors by name) is recorded after every
    optimizer step, so a test can compare what each step changed, not only where it ended."""
    from transformers import get_linear_schedule_with_warmup

    decay = set(decay_parameter_names(model))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay_names = [n for n, _ in named if n in decay]
    no_decay_names = [n for n, _ in named if n not in decay]
    groups = [
        {"params": [p for n, p in named if n in decay], "weight_decay": WEIGHT_DECAY},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS)
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=WARMUP, num_training_steps=len(STEPS))
    params = [p for _, p in named]

    model.train()
    step_loss, grad_norm, lrs, mb_loss, after = [], [], [], [], []
    k = 0
    for step in STEPS:
        n_step = sum(len(idx) for idx in step)
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for idx in step:
            mb = mbs[k]
            k += 1
            assert mb["labels"].shape[0] == len(idx)
            logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"],
                           token_type_ids=mb["token_type_ids"]).logits
            loss = summed_loss(logits, mb["labels"]) / n_step
            loss.backward()
            mb_loss.append(loss.item())
            total += loss.item()
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm=MAX_GRAD_NORM)
        lr_now = opt.param_groups[0]["lr"]
        assert all(g["lr"] == lr_now for g in opt.param_groups)
        before = [p.detach().clone() for p in params] if lr_now == 0.0 else None
        opt.step()
        sched.step()
        if before is not None and not all(torch.equal(a, p) for a, p in zip(before, params)):
            raise SystemExit("a step with lr 0 changed the parameters")
        step_loss.append(total)
        grad_norm.append(norm.item())
        lrs.append(lr_now)
        after.append({k: v.detach().clone() for k, v in snapshot().items()})
    model.eval()
    record = {"step_loss": step_loss, "grad_norm": grad_norm, "lr": lrs, "micro_batch_loss": mb_loss}
    return record, decay_names, no_decay_names, after


def per_step(prefix: str, after: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """`after.{step}.{name}`: the tensors after each optimizer step."""
    return {f"after.{k}.{prefix}{n}": v for k, snap in enumerate(after) for n, v in snap.items()}


@torch.no_grad()
def mean_loss(model, mbs: list[dict[str, torch.Tensor]]) -> float:
    """Mean CE over the 6 examples (micro-batches 0..3), eval mode, for the sanity check."""
    tot, n = 0.0, 0
    for mb in mbs[:4]:
        logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"],
                       token_type_ids=mb["token_type_ids"]).logits
        tot += summed_loss(logits, mb["labels"]).item()
        n += mb["labels"].shape[0]
    return tot / n


def batch_tensors(mbs) -> dict[str, torch.Tensor]:
    out = {}
    for k, mb in enumerate(mbs):
        for key, v in mb.items():
            out[f"mb{k}_{key}"] = v
    return out


def setup_json(mbs) -> dict:
    return {
        "base": BASE,
        "load": "AutoModelForSequenceClassification.from_pretrained(base, dtype=float32, attn_implementation='eager', "
                + ", ".join(f"{k}={v}" for k, v in CONFIG_OVERRIDES.items()) + "); model.train() during training",
        "data": {
            "how": f"torch.manual_seed({DATA_SEED}); ids_i = torch.randint({VOCAB_LO}, {VOCAB_HI}, (len_i,)) for i in "
                   f"0..{len(LENGTHS) - 1} in order; then labels = torch.randint(0, {NUM_LABELS}, ({len(LENGTHS)},))",
            "lengths": LENGTHS,
            "pad_id": PAD_ID,
            "padding": "right, dynamic: to the longest example of each micro-batch; token_type_ids all 0",
            "micro_batches": [{"k": k, "examples": idx, "shape": list(mbs[k]["input_ids"].shape)}
                              for k, idx in enumerate(i for s in STEPS for i in s)],
        },
        "schedule": {
            "optimizer_steps": len(STEPS),
            "steps": [{"step": s, "micro_batches": [sum(len(x) for x in STEPS[:s]) + j for j in range(len(st))],
                       "examples": [i for idx in st for i in idx]} for s, st in enumerate(STEPS)],
            "gradient_accumulation": "2 micro-batches (sizes 2 and 1) per optimizer step",
            "loss": "per micro-batch: sum over its examples of cross_entropy(logits, label) / (examples in the whole "
                    "optimizer step = 3); backward per micro-batch; accumulated grad = grad of the step's mean loss",
        },
        "optimizer": {
            "class": "torch.optim.AdamW",
            "lr": LR, "betas": list(BETAS), "eps": EPS, "amsgrad": False,
            "weight_decay": {"decay_group": WEIGHT_DECAY, "no_decay_group": 0.0},
            "update": "p *= 1 - lr*wd; m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g^2; "
                      "p -= (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)   (t = 1-based step count)",
            "decay_rule": "transformers.Trainer.get_decay_parameter_names: get_parameter_names(model, [nn.LayerNorm], "
                          "[r'bias', r'layernorm', r'rmsnorm', r'(?:^|\\.)norm(?:$|\\.)', r'_norm(?:$|\\.)']) - a "
                          "parameter decays unless it lives directly in an nn.LayerNorm module or its lowercased full "
                          "name matches one of the patterns; only requires_grad parameters enter the optimizer",
        },
        "clip": f"torch.nn.utils.clip_grad_norm_(trainable params, max_norm={MAX_GRAD_NORM}) before each optimizer "
                "step: total = L2 norm over all grads, grads *= min(1, max_norm / (total + 1e-6)); grad_norm records "
                "total (pre-clip)",
        "lr_schedule": f"transformers.get_linear_schedule_with_warmup(opt, num_warmup_steps={WARMUP}, "
                       f"num_training_steps={len(STEPS)}), sched.step() after each opt.step(); lr of step k = "
                       f"{LR} * (k/{WARMUP} if k < {WARMUP} else max(0, ({len(STEPS)}-k)/({len(STEPS)}-{WARMUP}))) "
                       "-> step 0 uses lr 0 (only the Adam moments move)",
    }


def make_bert_adamw(multi_label: bool = False) -> dict:
    name = "bert-multilabel-adamw" if multi_label else "bert-adamw"
    mbs = micro_batches(multi_label)
    if multi_label:
        model = load_base(problem_type="multi_label_classification")
        # The model's own loss for this problem type is the mean BCE-with-logits that
        # summed_loss / n reproduces: check on the whole first step.
        mb = mbs[0]
        with torch.no_grad():
            out = model(**mb)
            mine = summed_loss(out.logits, mb["labels"]) / mb["labels"].shape[0]
        if not torch.allclose(out.loss, mine, rtol=1e-6, atol=1e-7):
            raise SystemExit(f"{name}: model loss {out.loss} != BCE mean {mine}")
    else:
        model = load_base()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss_before = mean_loss(model, mbs)
    rec, decay, no_decay, after = train(model, mbs, lambda: dict(model.named_parameters()))
    loss_after = mean_loss(model, mbs)
    final = {n: p.detach().clone() for n, p in model.named_parameters()}
    changed = [n for n in final if not torch.equal(final[n], init[n])]
    unchanged = [n for n in final if n not in changed]

    tensors = {
        "step_loss": torch.tensor(rec["step_loss"], dtype=torch.float32),
        "grad_norm": torch.tensor(rec["grad_norm"], dtype=torch.float32),
        "lr": torch.tensor(rec["lr"], dtype=torch.float32),
        **batch_tensors(mbs),
        **{f"param.{n}": v for n, v in final.items()},
        **per_step("", after[:-1]),
    }
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_torch(tensors, OUT / f"{name}.safetensors")
    write_json(OUT / f"{name}.json", {
        "case": f"{name}: full fine-tuning, every parameter trainable"
                + ("; problem_type multi_label_classification, labels multi-hot float "
                   f"(torch.manual_seed({MULTI_SEED}); rand(6, 3) < {MULTI_P}), loss BCEWithLogitsLoss mean"
                   if multi_label else ""),
        **setup_json(mbs),
        "decay_parameters": decay,
        "no_decay_parameters": no_decay,
        "per_step": rec,
        "check": {"mean_loss_6_examples_eval_before": loss_before, "mean_loss_6_examples_eval_after": loss_after,
                  "parameters_unchanged_after_training": unchanged},
        "tensors": describe(tensors),
    })
    return {"rec": rec, "before": loss_before, "after": loss_after, "n_decay": len(decay),
            "n_no_decay": len(no_decay), "unchanged": unchanged}


def make_bert_lora_adamw() -> dict:
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict

    mbs = micro_batches()
    base = load_base()
    torch.manual_seed(LORA_SEED)
    model = get_peft_model(base, LoraConfig(**LORA))
    init_sd = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    loss_before = mean_loss(model, mbs)
    rec, decay, no_decay, after = train(model, mbs, lambda: get_peft_model_state_dict(model))
    loss_after = mean_loss(model, mbs)
    final_sd = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    frozen_moved = [n for n, p in model.named_parameters() if not p.requires_grad and not torch.equal(p, frozen_before[n])]
    if frozen_moved:
        raise SystemExit(f"bert-lora-adamw: frozen parameters changed: {frozen_moved}")
    if set(init_sd) != set(final_sd):
        raise SystemExit("bert-lora-adamw: adapter state dict keys changed during training")
    if not any(".lora_A." in k for k in init_sd) or not any("classifier" in k for k in init_sd):
        raise SystemExit(f"bert-lora-adamw: unexpected adapter keys {sorted(init_sd)}")
    unchanged = [k for k in final_sd if torch.equal(final_sd[k], init_sd[k])]
    trainable, total = model.get_nb_trainable_parameters()

    tensors = {
        "step_loss": torch.tensor(rec["step_loss"], dtype=torch.float32),
        "grad_norm": torch.tensor(rec["grad_norm"], dtype=torch.float32),
        "lr": torch.tensor(rec["lr"], dtype=torch.float32),
        **batch_tensors(mbs),
        **{f"init.{k}": v for k, v in init_sd.items()},
        **{f"final.{k}": v for k, v in final_sd.items()},
        **per_step("", after[:-1]),
    }
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_torch(tensors, OUT / "bert-lora-adamw.safetensors")
    write_json(OUT / "bert-lora-adamw.json", {
        "case": "bert-lora-adamw: peft LoRA on query/value + trainable copy of the classifier (modules_to_save)",
        **setup_json(mbs),
        "lora": {"config": LORA, "seed": f"torch.manual_seed({LORA_SEED}) right before get_peft_model "
                 "(lora_A kaiming-uniform random, lora_B zeros; classifier copy = the base classifier)",
                 "scaling": LORA["lora_alpha"] / LORA["r"],
                 "trainable_parameters": {"trainable": trainable, "all": total}},
        "state_dict_keys": "init.* / final.*: keys of peft.utils.get_peft_model_state_dict (no adapter name; head as "
                           "base_model.model.classifier.weight/bias)",
        "trainable_named_parameters": [n for n, p in model.named_parameters() if p.requires_grad],
        "decay_parameters": decay,
        "no_decay_parameters": no_decay,
        "per_step": rec,
        "check": {"mean_loss_6_examples_eval_before": loss_before, "mean_loss_6_examples_eval_after": loss_after,
                  "adapter_keys_unchanged_after_training": unchanged},
        "tensors": describe(tensors),
    })
    return {"rec": rec, "before": loss_before, "after": loss_after, "n_decay": len(decay),
            "n_no_decay": len(no_decay), "unchanged": unchanged, "decay": decay, "no_decay": no_decay}


def main() -> None:
    if os.environ.get("PYTHONHASHSEED") != "0":  # peft keeps target_modules in a set
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"})
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    args = ap.parse_args()
    cases = [c for c in args.only.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; known: {CASES}")
    if not (FIXTURES / "tiny-bert" / "model.safetensors").is_file():
        sys.exit("make_train_fixtures: missing tests/fixtures/tiny-bert; run scripts/make_fixtures.py --only tiny")
    os.chdir(ROOT)
    OUT.mkdir(parents=True, exist_ok=True)
    for c in cases:
        r = {"bert-adamw": make_bert_adamw, "bert-lora-adamw": make_bert_lora_adamw,
             "bert-multilabel-adamw": lambda: make_bert_adamw(multi_label=True)}[c]()
        rec = r["rec"]
        print(f"{c}: step_loss {rec['step_loss']} grad_norm {rec['grad_norm']} lr {rec['lr']}; "
              f"eval mean loss {r['before']:.6f} -> {r['after']:.6f}; {r['n_decay']} decay / "
              f"{r['n_no_decay']} no-decay params; unchanged {r['unchanged']}", flush=True)
        if rec["lr"][0] != 0.0 or r["after"] >= r["before"] or len(set(rec["step_loss"])) < 2:
            raise SystemExit(f"{c}: sanity check failed")
    for p in OUT.rglob("*"):  # safetensors writes 0600
        if p.is_file():
            p.chmod(0o644)
    print("versions: " + ", ".join(f"{p} {version(p)}" for p in ["torch", "transformers", "peft", "safetensors"]))
    for p in sorted(OUT.rglob("*")):
        if p.is_file():
            print(f"  {p.relative_to(ROOT)}  {p.stat().st_size} B")


if __name__ == "__main__":
    main()
