"""The reference half of scripts/gpu_check.sh's training comparison: the same jobs whet runs,
trained with transformers' Trainer (+ peft for LoRA) in one process, one after another, each
with the model loaded afresh and the device's cache emptied between them.

  python3 scripts/gpu/reference_train.py JOBS.json RESULTS.jsonl [--deadline UNIX_SECONDS]

JOBS.json is a list of jobs as scripts/gpu/check.py writes them: {id, model, task (causal-lm |
sequence-classification), method (lora | full), dtype (f32 | tf32 | bf16), steps, batch, seq, lr,
lora: {r, lora_alpha, lora_dropout, target_modules}, data, steady_from}. Each job appends one
JSON line to RESULTS.jsonl. A job that would start after --deadline is recorded as skipped.

Same work as whet: causal LM on blocks of `seq` tokens of data/lm.txt (every token learnt);
classification of data/cls.jsonl rows cut to `seq` tokens (every row is longer, so no padding).
Tokens per step = batch x seq on both sides. AdamW (Trainer's default optim, recorded),
linear schedule without warm-up, max_grad_norm 1.0, no weight decay, seed 42, no gradient
checkpointing. bf16 = Trainer's `bf16=True` (autocast, f32 master weights); tf32 = `tf32=True`
(f32 products with TF32 operands on the tensor cores); f32 = PyTorch's default (no TF32).

Measured: train tokens/s over the whole loop (first step included) and steady (steps after
`steady_from`, timed at each step's end after a device synchronisation); peak device memory as
torch.cuda.max_memory_allocated / max_memory_reserved and as the driver sees it (gpumem.py, the
CUDA context included, as for whet)."""
import argparse
import gc
import json
import os
import resource
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpumem  # noqa: E402


def blocks(data, tokenizer_file, seq, n_blocks):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(tokenizer_file)
    ids = []
    with open(data) as f:
        for line in f:
            ids.extend(tok.encode(line.strip(), add_special_tokens=False).ids)
            if len(ids) >= seq * n_blocks:
                break
    return [ids[i * seq:(i + 1) * seq] for i in range(len(ids) // seq)][:n_blocks]


def cls_rows(data, tokenizer_file, seq, n_rows):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(tokenizer_file)
    rows = []
    with open(data) as f:
        for line in f:
            r = json.loads(line)
            rows.append((tok.encode(r["text"]).ids, r["label"]))
            if len(rows) >= n_rows:
                break
    names = sorted({l for _, l in rows})
    out = []
    for ids, label in rows:
        ids = ids[:seq - 1] + [ids[-1]] if len(ids) > seq else ids  # keep [SEP] last, as BERT's truncation
        out.append((ids, names.index(label)))
    return out, len(names)


def run_job(job, device, watcher, baseline):
    import torch
    from torch.utils.data import Dataset
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, Trainer,
                              TrainerCallback, TrainingArguments, default_data_collator, set_seed)

    set_seed(42)
    # tf32: TrainingArguments(tf32=True) sets PyTorch's process-wide switch and nothing turns it
    # off again, so each job sets it: on for tf32 jobs, PyTorch's default (off) for the rest.
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = job["dtype"] == "tf32"
    tokens_per_step = job["batch"] * job["seq"]
    n = job["steps"] * job["batch"]
    tok_file = os.path.join(job["model"], "tokenizer.json")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    watcher.start(baseline)
    t_load = time.perf_counter()
    if job["task"] == "causal-lm":
        rows = blocks(job["data"], tok_file, job["seq"], n)
        items = [{"input_ids": torch.tensor(r), "labels": torch.tensor(r)} for r in rows]
        model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
        task_type = "CAUSAL_LM"
    else:
        rows, num_labels = cls_rows(job["data"], tok_file, job["seq"], n)
        items = [{"input_ids": torch.tensor(ids), "attention_mask": torch.ones(len(ids), dtype=torch.long),
                  "labels": torch.tensor(label)} for ids, label in rows]
        model = AutoModelForSequenceClassification.from_pretrained(job["model"], num_labels=num_labels,
                                                                   dtype=torch.float32)
        task_type = "SEQ_CLS"
    if len(items) < n:
        raise RuntimeError(f"data gives {len(items)} rows, the job needs {n}")
    if job["method"] == "lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(task_type=task_type, **job["lora"]))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    load_s = time.perf_counter() - t_load

    class Rows(Dataset):
        def __len__(self):
            return len(items)

        def __getitem__(self, i):
            return items[i]

    stamps = []

    class Clock(TrainerCallback):
        def _now(self):
            if device == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter()

        def on_train_begin(self, args, state, control, **kw):
            stamps.append(self._now())

        def on_step_end(self, args, state, control, **kw):
            stamps.append(self._now())

    args = TrainingArguments(
        output_dir=os.path.join(job["workdir"], "trainer"), per_device_train_batch_size=job["batch"],
        max_steps=job["steps"], learning_rate=job["lr"], lr_scheduler_type="linear", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, logging_strategy="no", save_strategy="no",
        eval_strategy="no", report_to=[], dataloader_num_workers=0, seed=42, disable_tqdm=True,
        bf16=job["dtype"] == "bf16", tf32=True if job["dtype"] == "tf32" else None,
        use_cpu=device == "cpu", gradient_checkpointing=False)
    trainer = Trainer(model=model, args=args, train_dataset=Rows(), data_collator=default_data_collator,
                      callbacks=[Clock()])
    out = trainer.train()
    steps = len(stamps) - 1
    total_s = stamps[-1] - stamps[0]
    w = min(job["steady_from"], steps - 1)
    steady_s = stamps[-1] - stamps[w] if steps > w else None
    res = {
        "status": "ok", "steps_run": steps, "load_s": round(load_s, 2),
        "train_runtime": round(total_s, 3), "first_step_s": round(stamps[1] - stamps[0], 3),
        "tokens_per_s": tokens_per_step * steps / total_s,
        "steady_tokens_per_s": tokens_per_step * (steps - w) / steady_s if steady_s else None,
        "train_loss": out.training_loss, "trainable_params": trainable,
        "optim": str(args.optim), "device_peak_mib": watcher.stop() if device == "cuda" else None,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
    }
    if device == "cuda":
        res["torch_peak_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        res["torch_peak_reserved_mib"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
        res["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    else:
        res["process_max_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    del trainer, model, items
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("jobs")
    ap.add_argument("results")
    ap.add_argument("--deadline", type=float, default=None)
    args = ap.parse_args()
    import peft
    import torch
    import transformers

    watcher = gpumem.Watcher()
    # Before this process makes its CUDA context: every job's peak then includes the context,
    # as whet's does.
    baseline = watcher.used_mib()
    # WHET_REF_DEVICE=cpu: the check's CPU rows (threads from OMP_NUM_THREADS).
    device = os.environ.get("WHET_REF_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    impl = f"transformers {transformers.__version__} + peft {peft.__version__} / torch {torch.__version__}"
    for job in json.load(open(args.jobs)):
        rec = {"stack": "reference", "impl": impl, "device": device, **{k: job[k] for k in
               ("id", "name", "task", "method", "dtype", "steps", "batch", "seq")}}
        if args.deadline and time.time() + job.get("min_seconds", 0) > args.deadline:
            rec.update(status="skipped", error="time budget")
        else:
            t = time.perf_counter()
            try:
                rec.update(run_job(job, device, watcher, baseline))
            except Exception as e:  # one job's failure is a row of the table, not the end of the run
                traceback.print_exc()
                watcher.stop()
                rec.update(status="error", error=f"{type(e).__name__}: {e}"[:300])
            rec["wall_s"] = round(time.perf_counter() - t, 1)
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        print(json.dumps(rec), flush=True)
        with open(args.results, "a") as f:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
