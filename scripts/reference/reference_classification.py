"""The reference for whet's classification runs: the same data split, model and settings
trained with transformers.Trainer (+ peft for LoRA) on PyTorch, CPU. Prints and writes one JSON
object with test metrics, train runtime, samples/s, non-pad tokens/s and peak RSS, to compare
with whet's all_results.json (quality and speed side by side).

Usage:
  .venv-ref/bin/python scripts/reference/reference_classification.py --data RUN/data --model cache/minilm \
      --method lora --out /tmp/ref-lora.json [--threads 2]
RUN/data holds train/validation/test.jsonl as `whet train` writes them (the exact split).
Settings mirror recipes/tweets-lora.toml: lr 1e-3 (LoRA) or 5e-5 (full), batch 16, 1 epoch,
max_length 128, LoRA r 8, alpha 16, dropout 0.1 on query and value, seed 42 (--seed).
--regression: the labels are numbers; num_labels=1, problem_type="regression" (MSE), and the
test metrics are MSE and scipy's Pearson and Spearman correlations (run_glue.py's STS-B ones)."""
import argparse
import json
import resource
import time

import numpy as np
import torch



def load_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--method", choices=["lora", "full"], default="lora")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=42, help="training seed (head init, dropout, order)")
    ap.add_argument("--bf16", action="store_true",
                    help="TrainingArguments(bf16=True): autocast to bfloat16 (on the CPU: oneDNN's bf16 kernels)")
    ap.add_argument("--regression", action="store_true",
                    help="real-valued labels: one output, problem_type regression, MSE / Pearson / Spearman")
    ap.add_argument("--no-dropout", action="store_true",
                    help="hidden, attention and LoRA dropout 0 (to compare with whet on a model whose config has them at 0)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding,
                              Trainer, TrainingArguments, set_seed)
    set_seed(args.seed)
    train, val, test = (load_jsonl(f"{args.data}/{s}.jsonl") for s in ("train", "validation", "test"))
    labels = ["LABEL_0"] if args.regression else sorted({r["label"] for r in train})
    l2i = {l: i for i, l in enumerate(labels)}
    tok = AutoTokenizer.from_pretrained(args.model)
    tok.model_max_length = 128
    if hasattr(tok, "_tokenizer"):
        tok._tokenizer.no_padding()
        tok._tokenizer.no_truncation()

    class DS(torch.utils.data.Dataset):
        def __init__(self, rows):
            self.enc = [tok(r["text"], truncation=True, max_length=128) for r in rows]
            self.y = [float(r["label"]) if args.regression else l2i[r["label"]] for r in rows]

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            d = dict(self.enc[i])
            d["labels"] = self.y[i]
            return d

    dtrain, dval, dtest = DS(train), DS(val), DS(test)
    off = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0) if args.no_dropout else {}
    if args.regression:
        off["problem_type"] = "regression"
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=l2i, **off)
    lr = 5e-5
    if args.method == "lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.0 if args.no_dropout else 0.1,
                                                 target_modules=["query", "value"]))
        model.print_trainable_parameters()
        lr = 1e-3

    targs = TrainingArguments(output_dir="/tmp/whet-ref-out", learning_rate=lr, per_device_train_batch_size=16,
                              per_device_eval_batch_size=64, num_train_epochs=args.epochs, eval_strategy="epoch",
                              save_strategy="no", logging_steps=50, seed=args.seed, report_to=[], use_cpu=True,
                              dataloader_num_workers=0, bf16=args.bf16)
    trainer = Trainer(model=model, args=targs, train_dataset=dtrain, eval_dataset=dval,
                      data_collator=DataCollatorWithPadding(tok), compute_metrics=None if args.regression else lambda p: {
                          "accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())})
    start = time.perf_counter()
    out = trainer.train()
    runtime = time.perf_counter() - start
    pred = trainer.predict(dtest)
    tokens = sum(len(e["input_ids"]) for e in dtrain.enc) * args.epochs
    common = {
        "impl": f"transformers {__import__('transformers').__version__} + peft {__import__('peft').__version__} / torch {torch.__version__}",
        "method": args.method, "threads": args.threads, "bf16": args.bf16,
        "train_runtime": runtime, "train_samples_per_second": len(dtrain) * args.epochs / runtime,
        "train_tokens_per_second": tokens / runtime, "train_loss": out.training_loss,
        "train_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if args.regression:
        from scipy.stats import pearsonr, spearmanr
        yhat, y = pred.predictions.reshape(-1), pred.label_ids.reshape(-1)
        result = {**common, "test_loss": float(pred.metrics["test_loss"]),
                  "test_mse": float(((yhat - y) ** 2).mean()),
                  "test_pearson": float(pearsonr(y, yhat)[0]), "test_spearmanr": float(spearmanr(y, yhat)[0])}
        print(json.dumps(result, indent=1))
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        return
    yhat, y = pred.predictions.argmax(-1), pred.label_ids
    acc = float((yhat == y).mean())
    # macro F1 and MCC without scikit-learn
    k = len(labels)
    cm = np.zeros((k, k))
    for t, p in zip(y, yhat):
        cm[t, p] += 1
    prec = np.divide(np.diag(cm), cm.sum(0), out=np.zeros(k), where=cm.sum(0) > 0)
    rec = np.divide(np.diag(cm), cm.sum(1), out=np.zeros(k), where=cm.sum(1) > 0)
    f1 = np.divide(2 * prec * rec, prec + rec, out=np.zeros(k), where=(prec + rec) > 0)
    s, c, t, p = cm.sum(), np.trace(cm), cm.sum(1), cm.sum(0)
    mcc = (c * s - t @ p) / np.sqrt((s * s - p @ p) * (s * s - t @ t))
    tokens = sum(len(e["input_ids"]) for e in dtrain.enc) * args.epochs
    result = {
        "impl": f"transformers {__import__('transformers').__version__} + peft {__import__('peft').__version__} / torch {torch.__version__}",
        "method": args.method, "threads": args.threads, "bf16": args.bf16,
        "test_accuracy": acc, "test_f1": float(f1.mean()), "test_matthews_correlation": float(mcc),
        "train_runtime": runtime, "train_samples_per_second": len(dtrain) * args.epochs / runtime,
        "train_tokens_per_second": tokens / runtime, "train_loss": out.training_loss,
        "train_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print(json.dumps(result, indent=1))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
