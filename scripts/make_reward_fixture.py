#!/usr/bin/env python3
"""Write tests/fixtures/tiny-bert-reward/: the tiny BERT with a one-output head (seeded init,
saved by transformers) and trl's reward-model loss on three fixed pairs.

    .venv-ref/bin/python scripts/make_reward_fixture.py

The loss is trl 1.16's RewardTrainer.compute_loss: chosen and rejected rows in one batch
(chosen first), `rewards_chosen, rewards_rejected = logits.squeeze(-1).chunk(2)`,
`-logsigmoid(rewards_chosen - rewards_rejected).mean()`; the script checks it against
trl's own compute_loss. Writes pairs.safetensors with input_ids / attention_mask ([6, T],
chosen rows 0-2), loss, and the gradients of classifier.weight and of the first layer's query.
"""
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForSequenceClassification

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "tiny-bert-reward"

torch.manual_seed(0)
torch.set_num_threads(1)
model = AutoModelForSequenceClassification.from_pretrained(
    ROOT / "tests/fixtures/tiny-bert", num_labels=1, ignore_mismatched_sizes=True,
    attn_implementation="eager")
model.config.hidden_dropout_prob = 0.0
model.config.attention_probs_dropout_prob = 0.0
OUT.mkdir(parents=True, exist_ok=True)
model.save_pretrained(OUT)
model = AutoModelForSequenceClassification.from_pretrained(OUT, attn_implementation="eager").train()

chosen = [[2, 15, 27, 33, 3], [2, 40, 41, 3], [2, 7, 8, 9, 10, 11, 3]]
rejected = [[2, 15, 28, 3], [2, 50, 51, 52, 53, 3], [2, 7, 8, 3]]
rows = chosen + rejected
t = max(map(len, rows))
ids = torch.tensor([r + [0] * (t - len(r)) for r in rows])
mask = torch.tensor([[1] * len(r) + [0] * (t - len(r)) for r in rows])

from trl import RewardConfig, RewardTrainer  # noqa: E402

out = model(input_ids=ids, attention_mask=mask)
rc, rr = torch.chunk(out.logits.squeeze(-1), chunks=2)
loss = -torch.nn.functional.logsigmoid(rc - rr).mean()
# The same number through trl's own compute_loss, on a trainer stub holding just the state
# compute_loss reads (building a real RewardTrainer needs a dataset and a tokenizer).
trainer = RewardTrainer.__new__(RewardTrainer)
trainer.args = RewardConfig(output_dir="/tmp/unused", report_to=[], center_rewards_coefficient=None,
                            bf16=False, use_cpu=True)
trainer._metrics = {m: __import__("collections").defaultdict(list) for m in ("train", "eval")}
trainer._total_train_tokens = 0
trainer._tp_size = 1
trainer.model_accepts_loss_kwargs = False
trainer.model = model
import types  # noqa: E402
trainer.accelerator = types.SimpleNamespace(gather_for_metrics=lambda x: x, gather=lambda x: x)
trl_loss = RewardTrainer.compute_loss(trainer, model, {"input_ids": ids, "attention_mask": mask})
assert abs(trl_loss.item() - loss.item()) < 1e-7, (trl_loss.item(), loss.item())
print("trl compute_loss agrees:", trl_loss.item())
loss.backward()
save_file({
    "input_ids": ids, "attention_mask": mask, "loss": loss.detach().reshape(1),
    "rewards": out.logits.detach().squeeze(-1),
    "grad.classifier.weight": model.classifier.weight.grad.contiguous(),
    "grad.query.weight": model.bert.encoder.layer[0].attention.self.query.weight.grad.contiguous(),
}, OUT / "pairs.safetensors")
for p in OUT.iterdir():
    p.chmod(0o644)
print("loss", loss.item(), "written", sorted(p.name for p in OUT.iterdir()))
