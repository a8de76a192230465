"""The reference for whet's causal-LM runs: the same split and settings trained with trl's
SFTTrainer + peft (LoRA) or plain full fine-tuning on PyTorch, CPU. Prints and writes one JSON
object with the eval loss (mean over every learnt token, as whet computes it), train runtime,
tokens/s and peak RSS, to compare with whet's all_results.json.

Usage:
  .venv-ref/bin/python scripts/reference/reference_sft.py --data RUN/data --gguf cache/smollm2/X.gguf \\
      --kind chat --out /tmp/ref.json [--method lora|full] [--max-steps 100] [--threads 2]
RUN/data holds the rows of train/validation(.jsonl) as `whet train` writes them.
--kind chat: rows {"input": [messages], "ideal": answer} as conversational prompt/completion
  data (trl learns the completion only), as recipes/smollm2-dates-lora.toml.
--kind blocks: rows {"text": ...} concatenated and cut into --block-size blocks (run_clm.py's
  group_texts), every token learnt, as recipes/smollm2-hamlet.toml.
Settings mirror the recipes: LoRA r 8, alpha 16, dropout 0.05 on q/k/v/o/gate/up/down, lr 2e-4
(LoRA) or 2e-5 (full), batch 4, max_length 256, AdamW, linear schedule, seed 42."""
import argparse
import json
import math
import resource
import time
from pathlib import Path

import torch


def load_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--kind", choices=["chat", "blocks"], default="chat")
    ap.add_argument("--method", choices=["lora", "full"], default="lora")
    ap.add_argument("--max-steps", type=int, default=100)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--bf16", action="store_true",
                    help="SFTConfig(bf16=True): autocast to bfloat16 (on the CPU: oneDNN's bf16 kernels)")
    ap.add_argument("--chat-template", default=None,
                    help="a .jinja chat template: SFTConfig(chat_template_path=...), for tokenizers without one")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    set_seed(args.seed)
    gguf = Path(args.gguf)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers dequantises a GGUF to plain f32 weights but keeps it flagged as quantised,
    # which Trainer refuses to train; the weights are ordinary tensors, so drop the flag.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    train_rows = load_jsonl(f"{args.data}/train.jsonl")
    val_rows = load_jsonl(f"{args.data}/validation.jsonl")

    def answer(v):
        return v if isinstance(v, str) else v[0]

    if args.kind == "chat":
        def to_ds(rows):
            return Dataset.from_list([{"prompt": r["input"],
                                       "completion": [{"role": "assistant", "content": answer(r["ideal"])}]}
                                      for r in rows])
        dtrain, dval = to_ds(train_rows), to_ds(val_rows)
    else:
        def blocks(rows):
            ids = [t for r in rows for t in tok(r["text"])["input_ids"]]
            n = len(ids) // args.block_size * args.block_size
            return Dataset.from_list([{"input_ids": ids[i:i + args.block_size]}
                                      for i in range(0, n, args.block_size)])
        dtrain, dval = blocks(train_rows), blocks(val_rows)

    peft_config = None
    lr = args.lr or (2e-4 if args.method == "lora" else 2e-5)
    if args.method == "lora":
        from peft import LoraConfig
        peft_config = LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.05,
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                 "up_proj", "down_proj"])
    cfg = SFTConfig(output_dir="/tmp/whet-ref-sft", learning_rate=lr, per_device_train_batch_size=4,
                    max_steps=args.max_steps, max_length=256, logging_steps=10, save_strategy="no",
                    eval_strategy="no", seed=args.seed, report_to=[], use_cpu=True,
                    dataloader_num_workers=0, packing=False, completion_only_loss=(args.kind == "chat"),
                    dataset_num_proc=None,
                    # SFTConfig turns on gradient checkpointing and bf16 autocast by default; whet
                    # runs without recomputation and in f32 unless `training.bf16 = true`, so
                    # compare like with like.
                    gradient_checkpointing=False, bf16=args.bf16,
                    chat_template_path=args.chat_template)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=dtrain, eval_dataset=dval,
                         processing_class=tok, peft_config=peft_config)
    if args.method == "lora":
        trainer.model.print_trainable_parameters()
    tokens = 0

    collate = trainer.data_collator

    def counting(features):
        nonlocal tokens
        batch = collate(features)
        tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        return batch
    trainer.data_collator = counting
    start = time.perf_counter()
    out = trainer.train()
    runtime = time.perf_counter() - start

    # Eval loss as whet computes it: summed next-token loss over every learnt token / count.
    model = trainer.model
    model.eval()
    dval_t = trainer.eval_dataset  # tokenized by SFTTrainer as it tokenizes the training set
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(dval_t), 16):
            feats = [dval_t[j] for j in range(i, min(i + 16, len(dval_t)))]
            b = collate(feats)
            logits = model(input_ids=b["input_ids"], attention_mask=b.get("attention_mask")).logits
            labels = b["labels"][:, 1:]
            logp = torch.log_softmax(logits[:, :-1].float(), -1)
            mask = labels != -100
            picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            total += float(-(picked * mask).sum())
            count += int(mask.sum())
    eval_loss = total / count
    result = {
        "impl": f"trl {__import__('trl').__version__} + transformers {__import__('transformers').__version__} + "
                f"peft {__import__('peft').__version__} / torch {torch.__version__}",
        "method": args.method, "kind": args.kind, "threads": args.threads, "max_steps": args.max_steps,
        "bf16": args.bf16,
        "eval_loss": eval_loss, "eval_perplexity": math.exp(eval_loss), "eval_tokens": count,
        "train_loss": out.training_loss, "train_runtime": runtime,
        "train_tokens_per_second": tokens / runtime,
        "train_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print(json.dumps(result, indent=1))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
