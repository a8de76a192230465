#!/usr/bin/env python3
"""Write tests/fixtures/ppo/steps.safetensors: PPO's arithmetic as trl's PPOTrainer does it, on
fixed per-token log-probs, values and scores of right-padded responses.

    .venv-ref/bin/python scripts/make_ppo_fixture.py

trl removed PPOTrainer in 1.x, so this script fetches trl 0.19.1 (the last release with it;
`pip download`, no install), unpacks it into a temporary folder and imports it from there
(it imports under the pinned transformers 5). Nothing is re-typed:
- functions are called: `masked_mean` / `masked_whiten` (`trl/core.py`), `truncate_response` /
  `first_true_indices` (`trl/trainer/utils.py`), `PPOConfig` (its defaults are the
  hyperparameters);
- the formulas inside `PPOTrainer.train`, which no function exposes, are run from the source
  itself: `trl_lines(FIRST, LAST, ...)` executes lines FIRST..LAST of the wheel's
  `trl/trainer/ppo_trainer.py` (dedented) on the tensors given, after checking the first line's
  text. Response lengths (464), k1 KL-penalised rewards (500-516), GAE and returns (524-533),
  advantage whitening (534-535), reward whitening (519-521), the clipped value and policy
  losses (566-584) and the logged pg_clipfrac (589-591), approxkl (594) and ratio (605).

Two departures, which whet makes on purpose, and how the script applies them to trl's lines:
- the score goes on each response's last token (trl adds it one position later, on the first
  padding slot, and keeps that slot's value). Lines 500-533 run on each response alone,
  unpadded: there the slot after the response does not exist and trl itself puts the score on
  the last token (`actual_end` = `sequence_lengths`). Whitening (534-535) runs on the padded
  batch, across responses, as in trl.
- the value loss and the whitened rewards cover the response tokens only (trl's
  `padding_mask_p1` also admits the padding slot after the response): those lines run with
  `padding_mask_p1` bound to `padding_mask`.

Writes (B = 3 responses, T = 5 positions):
- responses [B, T] (generated ids; EOS 2 ends two of them, junk after it) and lengths [B]
  (5, 3, 4: trl's `sequence_lengths` + 1, EOS included);
- logprobs, ref_logprobs, values, new_logprobs, new_values [B, T]; scores [B];
- rewards, whitened_rewards, advantages, returns [B, T] (0 on padding);
- pg_loss, vf_loss, pg_clipfrac, vf_clipfrac, approxkl, ratio_mean (trl's logged values; the last
  two are means over all B * T positions, padding included, where the log-ratio is 0);
- grad_new_logprobs, grad_new_values: the gradient of trl's `loss` (pg_loss + vf_coef vf_loss);
- metadata `ppo_config`: the JSON of PPOConfig's defaults whet's `[ppo]` table mirrors.
"""
import copy
import json
import subprocess
import sys
import tempfile
import textwrap
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "ppo"
PAD, EOS = 0, 2


def fetch_trl_019() -> Path:
    tmp = Path(tempfile.mkdtemp())
    subprocess.run([sys.executable, "-m", "pip", "download", "trl==0.19.1", "--no-deps", "-q", "-d", str(tmp)],
                   check=True)
    wheel = next(tmp.glob("trl-0.19.1-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp / "src", [n for n in z.namelist() if n.startswith("trl/")])
    return tmp / "src"


SRC = fetch_trl_019()
sys.path.insert(0, str(SRC))  # shadows the trl 1.x of the reference environment
import trl  # noqa: E402
from trl import PPOConfig  # noqa: E402
from trl.core import masked_mean, masked_whiten  # noqa: E402
from trl.trainer.ppo_trainer import INVALID_LOGPROB  # noqa: E402
from trl.trainer.utils import first_true_indices, truncate_response  # noqa: E402

assert trl.__version__ == "0.19.1" and Path(trl.__file__).is_relative_to(SRC), trl.__file__
PPO_TRAINER = (SRC / "trl" / "trainer" / "ppo_trainer.py").read_text().splitlines(keepends=True)


def trl_lines(first, last, starts, **names):
    """Runs lines first..last of trl 0.19.1's trl/trainer/ppo_trainer.py with `names` bound and
    returns the namespace after them. `starts`: the text the first line must begin with."""
    text = textwrap.dedent("".join(PPO_TRAINER[first - 1:last]))
    assert text.startswith(starts), f"ppo_trainer.py:{first} is {text.splitlines()[0]!r}"
    ns = {"torch": torch, "masked_mean": masked_mean, "masked_whiten": masked_whiten,
          "first_true_indices": first_true_indices, "truncate_response": truncate_response,
          "INVALID_LOGPROB": INVALID_LOGPROB, **names}
    exec(compile(text, f"ppo_trainer.py:{first}-{last}", "exec"), ns)
    return ns


args = PPOConfig(output_dir=tempfile.mkdtemp(), report_to=[], use_cpu=True, bf16=False)
assert args.kl_estimator == "k1" and not args.whiten_rewards
B, T = 3, 5

# Response Processing 1-2: cut after the first EOS, length = last real index.
responses = torch.tensor([[17, 45, 23, 61, 8], [33, 12, EOS, 54, 70], [9, 81, 27, EOS, EOS]])
ns = trl_lines(456, 464, "postprocessed_response = response", response=responses, query=torch.zeros(B, 0, dtype=int),
               self=SimpleNamespace(stop_token_id=EOS), processing_class=SimpleNamespace(pad_token_id=PAD))
sequence_lengths = ns["sequence_length"]
lengths = sequence_lengths + 1
assert lengths.tolist() == [5, 3, 4], lengths
idx = torch.arange(T).repeat(B, 1)
padding_mask = idx >= lengths.unsqueeze(1)  # True on padding: trl's padding_mask (501)

torch.manual_seed(3)
logprobs = (-torch.rand(B, T) * 3).masked_fill(padding_mask, INVALID_LOGPROB)
ref_logprobs = (logprobs - 0.3 * torch.randn(B, T)).masked_fill(padding_mask, INVALID_LOGPROB)
values = (torch.randn(B, T)).masked_fill(padding_mask, 0)
scores = torch.randn(B) * 2

# 4. rewards and 6. advantages and returns, each response alone (the score on its last token).
rewards, advantages, returns = (torch.zeros(B, T) for _ in range(3))
for r, n in enumerate(lengths.tolist()):
    row = trl_lines(500, 533, "response_idxs = torch.arange", args=args, responses=responses[r:r + 1, :n],
                    sequence_lengths=sequence_lengths[r:r + 1], logprobs=logprobs[r:r + 1, :n],
                    ref_logprobs=ref_logprobs[r:r + 1, :n], values=values[r:r + 1, :n], scores=scores[r:r + 1])
    assert row["actual_end"].item() == n - 1
    rewards[r, :n], advantages[r, :n], returns[r, :n] = row["rewards"][0], row["advantages"][0], row["returns"][0]
# Whitening across the batch's response tokens.
advantages = trl_lines(534, 535, "advantages = masked_whiten", advantages=advantages,
                       padding_mask=padding_mask)["advantages"]
# 5. whiten_rewards = True, over the response tokens.
whitening = copy.copy(args)
whitening.whiten_rewards = True
whitened_rewards = trl_lines(519, 521, "if args.whiten_rewards", args=whitening, rewards=rewards.clone(),
                             padding_mask_p1=padding_mask)["rewards"]

# The losses of a policy that moved, on one micro-batch holding every response.
new_logprobs = (logprobs + 0.4 * torch.randn(B, T)).masked_fill(padding_mask, INVALID_LOGPROB).requires_grad_(True)
new_values = (values + 0.5 * torch.randn(B, T)).masked_fill(padding_mask, 0).requires_grad_(True)
batch = dict(args=args, micro_batch_inds=np.arange(B), padding_mask=padding_mask, padding_mask_p1=padding_mask,
             vpred=new_values, mb_values=values, mb_return=returns, new_logprobs=new_logprobs,
             mb_logprobs=logprobs, mb_advantage=advantages)
ns = trl_lines(566, 584, "vpredclipped = torch.clamp", **batch)
ns["loss"].backward()
with torch.no_grad():
    ns = trl_lines(589, 591, "pg_clipfrac = masked_mean", **ns)
    ns = trl_lines(594, 594, "approxkl = 0.5", **ns)
    stats = {}
    ns = trl_lines(605, 605, "ratio_stats[", ratio_stats=stats, ppo_epoch_idx=0, minibatch_idx=0,
                   gradient_accumulation_idx=0, **ns)
    ratio_mean = stats[0, 0, 0]
out = {k: ns[k].detach().reshape(1) for k in ["pg_loss", "vf_loss", "pg_clipfrac", "vf_clipfrac", "approxkl"]}
print({k: v.item() for k, v in out.items()}, {"ratio_mean": ratio_mean.item()})

tensors = {
    "responses": responses, "lengths": lengths, "logprobs": logprobs, "ref_logprobs": ref_logprobs,
    "values": values, "scores": scores, "rewards": rewards, "whitened_rewards": whitened_rewards,
    "advantages": advantages, "returns": returns,
    "new_logprobs": new_logprobs.detach(), "new_values": new_values.detach(),
    "grad_new_logprobs": new_logprobs.grad, "grad_new_values": new_values.grad,
    "ratio_mean": ratio_mean.reshape(1), **out,
}
config = {k: getattr(args, k) for k in ["num_ppo_epochs", "num_mini_batches", "kl_coef", "cliprange", "vf_coef",
                                        "cliprange_value", "gamma", "lam", "whiten_rewards", "temperature",
                                        "response_length", "missing_eos_penalty"]}
OUT.mkdir(parents=True, exist_ok=True)
save_file({k: v.contiguous() for k, v in tensors.items()}, OUT / "steps.safetensors",
          metadata={"ppo_config": json.dumps(config, sort_keys=True)})  # one key: a stable header
(OUT / "steps.safetensors").chmod(0o644)
print(f"wrote {OUT / 'steps.safetensors'}")
