#!/usr/bin/env python3
"""Write tests/fixtures/ppo/steps.safetensors: PPO's arithmetic as trl's PPOTrainer does it, on
fixed per-token log-probs, values and scores of right-padded responses.

    .venv-ref/bin/python scripts/make_ppo_fixture.py

trl removed PPOTrainer in 1.x, so this script fetches trl 0.19.1 (the last release with it;
`pip download`, no install) and runs its `masked_mean` / `masked_whiten` from `trl/core.py`
and, line for line, the formulas of `PPOTrainer.train`: k1 KL penalty, GAE, advantage
whitening, clipped policy and value losses and their clip fractions. One departure, which whet
makes on purpose: the score is added on each response's last token (trl adds it one position
later, on the first padding slot, and keeps that slot's value).

Writes (B = 3 responses, T = 5 positions, lengths 5, 3, 4):
- logprobs, ref_logprobs, values, new_logprobs, new_values [B, T]; scores [B]; lengths [B];
- advantages, returns [B, T] (0 on padding);
- pg_loss, vf_loss, pg_clipfrac, vf_clipfrac (trl's masked means);
- grad_new_logprobs, grad_new_values: the gradient of pg_loss + 0.1 vf_loss.
"""
import importlib.util
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "ppo"
KL_COEF, GAMMA, LAM, CLIP, CLIP_V = 0.05, 1.0, 0.95, 0.2, 0.2


def trl_core():
    tmp = Path(tempfile.mkdtemp())
    subprocess.run([sys.executable, "-m", "pip", "download", "trl==0.19.1", "--no-deps", "-q", "-d", str(tmp)],
                   check=True)
    wheel = next(tmp.glob("trl-0.19.1-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        z.extract("trl/core.py", tmp)
    spec = importlib.util.spec_from_file_location("trl019_core", tmp / "trl" / "core.py")
    core = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(core)
    return core


core = trl_core()
masked_mean, masked_whiten = core.masked_mean, core.masked_whiten
torch.manual_seed(3)
B, T = 3, 5
lengths = torch.tensor([5, 3, 4])
idx = torch.arange(T).repeat(B, 1)
padding_mask = idx >= lengths.unsqueeze(1)  # True on padding
INVALID = 1.0
logprobs = (-torch.rand(B, T) * 3).masked_fill(padding_mask, INVALID)
ref_logprobs = (logprobs - 0.3 * torch.randn(B, T)).masked_fill(padding_mask, INVALID)
values = (torch.randn(B, T)).masked_fill(padding_mask, 0)
scores = torch.randn(B) * 2

# 4. rewards (k1), the score on the last real token
logr = ref_logprobs - logprobs
kl = -logr
non_score_reward = -KL_COEF * kl
rewards = non_score_reward.clone()
rewards[torch.arange(B), lengths - 1] += scores
# 6. advantages and returns (trl's loop)
lastgaelam = 0
advantages_reversed = []
for t in reversed(range(T)):
    nextvalues = values[:, t + 1] if t < T - 1 else 0.0
    delta = rewards[:, t] + GAMMA * nextvalues - values[:, t]
    lastgaelam = delta + GAMMA * LAM * lastgaelam
    advantages_reversed.append(lastgaelam)
advantages = torch.stack(advantages_reversed[::-1], axis=1)
returns = advantages + values
advantages = masked_whiten(advantages, ~padding_mask)
advantages = torch.masked_fill(advantages, padding_mask, 0)

# the losses of a policy that moved
new_logprobs = (logprobs + 0.4 * torch.randn(B, T)).masked_fill(padding_mask, INVALID).requires_grad_(True)
new_values = (values + 0.5 * torch.randn(B, T)).masked_fill(padding_mask, 0).requires_grad_(True)
vpredclipped = torch.clamp(new_values, values - CLIP_V, values + CLIP_V)
vf_losses1 = torch.square(new_values - returns)
vf_losses2 = torch.square(vpredclipped - returns)
vf_loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), ~padding_mask)
vf_clipfrac = masked_mean((vf_losses2 > vf_losses1).float(), ~padding_mask)
ratio = torch.exp(new_logprobs - logprobs)
pg_losses = -advantages * ratio
pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - CLIP, 1.0 + CLIP)
pg_loss = masked_mean(torch.max(pg_losses, pg_losses2), ~padding_mask)
pg_clipfrac = masked_mean((pg_losses2 > pg_losses).float(), ~padding_mask)
loss = pg_loss + 0.1 * vf_loss  # vf_coef 0.1
loss.backward()
print({"pg_loss": pg_loss.item(), "vf_loss": vf_loss.item(), "pg_clipfrac": pg_clipfrac.item(),
       "vf_clipfrac": vf_clipfrac.item()})

tensors = {
    "logprobs": logprobs, "ref_logprobs": ref_logprobs, "values": values, "scores": scores,
    "lengths": lengths, "advantages": advantages, "returns": returns.masked_fill(padding_mask, 0),
    "new_logprobs": new_logprobs.detach(), "new_values": new_values.detach(),
    "grad_new_logprobs": new_logprobs.grad, "grad_new_values": new_values.grad,
    "pg_loss": pg_loss.detach().reshape(1), "vf_loss": vf_loss.detach().reshape(1),
    "pg_clipfrac": pg_clipfrac.reshape(1), "vf_clipfrac": vf_clipfrac.reshape(1),
}
OUT.mkdir(parents=True, exist_ok=True)
save_file({k: v.contiguous() for k, v in tensors.items()}, OUT / "steps.safetensors")
(OUT / "steps.safetensors").chmod(0o644)
