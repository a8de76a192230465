#!/usr/bin/env python3
"""Write tests/fixtures/dpo/losses.safetensors: trl's DPO loss, its gradient and its logged
rewards on fixed log-probs, for the sigmoid and IPO losses.

    .venv-ref/bin/python scripts/make_dpo_fixture.py

trl 1.16 computes the DPO loss inside DPOTrainer._compute_loss, with no standalone function.
So this script runs that method on a trainer stub: a fake model returns fixed per-token
log-probs, with precomputed reference log-probs, beta 0.1, the reverse-KL (standard DPO)
divergence, and no weighting. Rows are [chosen x3, rejected x3].

Writes:
- per_token_logps [6, T-1] (zero outside the completion);
- completion_mask [6, T];
- ref_logps [6];
- and, per loss type: <type>.loss, <type>.grad (d loss / d per_token_logps),
  <type>.rewards_chosen / rewards_rejected / margins / accuracies (trl's logged means).
"""
import collections
import types
from pathlib import Path

import torch
from safetensors.torch import save_file
from trl import DPOConfig, DPOTrainer

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "dpo"
BETA = 0.1
torch.manual_seed(2)
B, T = 3, 6
completion = torch.ones(2 * B, T, dtype=torch.long)
completion[:, :2] = 0  # two prompt tokens
completion[1, -1] = 0  # shorter completions (padding)
completion[4, -2:] = 0
per_token = (-torch.rand(2 * B, T - 1) * 2) * completion[:, 1:]
ref = -torch.rand(2 * B) * 8


class Outputs:
    pass


def fake_model(leaf):
    def run(**_):
        o = Outputs()
        o.log_probs = leaf
        for k in ("entropy", "mean_logits", "log_sum_sq_probs"):
            setattr(o, k, torch.zeros(2 * B, T - 1))
        o.is_top1 = torch.zeros(2 * B, T - 1, dtype=torch.bool)
        return o
    run.training = True
    return run


tensors = {"per_token_logps": per_token, "completion_mask": completion, "ref_logps": ref}
for loss_type in ["sigmoid", "ipo"]:
    leaf = per_token.clone().requires_grad_(True)
    model = fake_model(leaf)
    tr = DPOTrainer.__new__(DPOTrainer)
    tr.args = DPOConfig(output_dir="/tmp/unused", report_to=[], use_cpu=True, bf16=False)
    tr.model = model
    tr.accelerator = types.SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x)
    tr._metrics = {m: collections.defaultdict(list) for m in ("train", "eval")}
    tr._total_train_tokens, tr._tp_size = 0, 1
    tr.aux_loss_enabled, tr.precompute_ref_logps, tr.use_weighting = False, True, False
    tr.ld_alpha, tr.f_divergence_type = None, "reverse_kl"
    tr.loss_types, tr.loss_weights, tr.beta, tr.label_smoothing = [loss_type], [1.0], BETA, 0.0
    inputs = {"input_ids": torch.zeros(2 * B, T, dtype=torch.long),
              "attention_mask": torch.ones(2 * B, T, dtype=torch.long), "completion_mask": completion,
              "ref_chosen_logps": ref[:B], "ref_rejected_logps": ref[B:]}
    loss = tr._compute_loss(model, inputs, False)
    loss.backward()
    m = tr._metrics["train"]
    tensors[f"{loss_type}.loss"] = loss.detach().reshape(1)
    tensors[f"{loss_type}.grad"] = leaf.grad.contiguous()
    for k in ("chosen", "rejected", "margins", "accuracies"):
        tensors[f"{loss_type}.rewards_{k}"] = torch.tensor([m[f"rewards/{k}"][0]])
    print(loss_type, loss.item(), {k: m[f"rewards/{k}"][0] for k in ("chosen", "rejected", "margins", "accuracies")})
OUT.mkdir(parents=True, exist_ok=True)
save_file({k: v.contiguous() for k, v in tensors.items()}, OUT / "losses.safetensors")
(OUT / "losses.safetensors").chmod(0o644)
