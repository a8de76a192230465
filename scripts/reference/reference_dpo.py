"""The reference for whet's DPO runs: trl's DPOTrainer + peft LoRA on PyTorch, CPU, on the pairs
whet wrote to RUN/data/train.jsonl, with the settings of whet's DPO recipes
(recipes/reviews-dpo.toml, recipes/hhh-dpo.toml: beta 0.1, sigmoid loss, reference = the base with the adapter off, LoRA r 8 / alpha 16 on the seven projections,
lr 1e-4, batch 4 pairs, max_length 256, linear schedule, AdamW). Writes one JSON object with
train runtime, pairs/s and peak RSS, to compare with whet's all_results.json.

    .venv-ref/bin/python scripts/reference/reference_dpo.py --data RUN/data --gguf cache/smollm2/X.gguf \\
        --max-steps 10 --threads 2 --out /tmp/ref.json [--bf16]

DPOConfig turns on gradient checkpointing and bf16 autocast by default; whet runs without
recomputation and in f32 unless `training.bf16 = true`, so both are set here to match.
"""
import argparse
import json
import resource
import time
from pathlib import Path

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--max-steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", required=True)
    ap.add_argument("--bf16", action="store_true",
                    help="DPOConfig(bf16=True): autocast to bfloat16 (on the CPU: oneDNN's bf16 kernels)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import DPOConfig, DPOTrainer

    set_seed(args.seed)
    gguf = Path(args.gguf)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers dequantises a GGUF file to f32 on load and then refuses to train it as
    # "quantized": the weights are plain f32 tensors, so drop the marker (as reference_sft.py).
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    rows = [json.loads(l) for l in open(Path(args.data) / "train.jsonl", encoding="utf-8") if l.strip()]
    train = Dataset.from_list(rows)
    cfg = DPOConfig(output_dir="/tmp/reference-dpo", beta=0.1, loss_type=["sigmoid"], max_length=256,
                    per_device_train_batch_size=4, learning_rate=1e-4, max_steps=args.max_steps,
                    lr_scheduler_type="linear", logging_steps=1, save_strategy="no", report_to=[],
                    use_cpu=True, bf16=args.bf16, gradient_checkpointing=False, seed=args.seed, dataloader_num_workers=0)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=train, processing_class=tok, peft_config=lora)
    start = time.time()
    result = trainer.train()
    secs = time.time() - start
    out = {
        "impl": "trl DPOTrainer + peft LoRA, torch " + torch.__version__,
        "max_steps": args.max_steps,
        "bf16": args.bf16,
        "train_loss": result.training_loss,
        "train_runtime": secs,
        "train_samples_per_second": args.max_steps * 4 / secs,
        "train_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "pairs": len(trainer.train_dataset),
    }
    print(json.dumps(out, indent=1))
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
