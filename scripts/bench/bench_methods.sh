#!/usr/bin/env bash
# The table a user needs to choose a PEFT method: every method on the README's main job
# (MiniLM, 3-class tweet sentiment, seeded 8000 / 1000 / 1000 split, one epoch), then peak
# memory of LoRA against QLoRA on SmolLM2 (chat SFT, 20 steps). One run after the other,
# THREADS threads each. Prints a Markdown table; runs land in runs/methods-*.
# Usage: scripts/bench/bench_methods.sh [THREADS] [SEED] [RUN...]   (about 40 minutes on 2 cores)
# With RUN names (e.g. tweets-ia3 smollm2-qlora) only those rows run.
set -euo pipefail
cd "$(dirname "$0")/../.."
THREADS=${1:-$(nproc)}
SEED=${2:-42}
scripts/fetch_assets.sh --only minilm,tweets,smollm2,evals >/dev/null
cargo build -p whet 2>/dev/null
W=target/debug/whet
set -f  # the --set values below hold brackets
IA3='--set ia3.target_modules=["key","value","output.dense"] --set ia3.feedforward_modules=["output.dense"]'
ONLY=" ${*:3} "
run() { # name recipe args...
    local name=$1 recipe=$2; shift 2
    [[ "$ONLY" == "  " || "$ONLY" == *" $name "* ]] || return 0
    local out=runs/methods-$name-seed$SEED
    RAYON_NUM_THREADS=$THREADS $W train "$recipe" --set training.output_dir=\"$out\" \
        --set training.save_strategy=\"no\" --set training.seed=$SEED "$@" >"$out.log" 2>&1 \
        || { echo "$name failed: see $out.log" >&2; exit 1; }
    python3 - "$name" "$out" <<'PY'
import json, re, sys
name, out = sys.argv[1], sys.argv[2]
r = json.load(open(f"{out}/all_results.json"))
log = open(f"{out}.log").read()
m = re.search(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+)", log)
acc = r.get("test_accuracy", float("nan")); loss = r.get("eval_loss", float("nan"))
print(f"| {name} | {m.group(1) if m else '?'} | {acc:.4f} | {loss:.4f} | {r['train_runtime']:.0f} s "
      f"| {r['train_tokens_per_second']:.0f} | {r['train_peak_rss_mb']:.0f} MB |")
PY
}
mkdir -p runs
echo "threads: $THREADS; seed: $SEED"
echo "| run | trainable params | test accuracy | eval loss | train time | tokens/s | peak RSS |"
echo "|---|---|---|---|---|---|---|"
run tweets-full recipes/tweets-lora.toml --set method=full --set training.learning_rate=5e-5
run tweets-lora recipes/tweets-lora.toml
run tweets-qlora recipes/tweets-lora.toml --set method=qlora
# IA3 learns scales, not updates: it takes a larger learning rate (peft's IA3 examples: 1e-2 -- 3e-2).
run tweets-ia3 recipes/tweets-lora.toml --set method=ia3 $IA3 --set training.learning_rate=1e-2
run tweets-bottleneck recipes/tweets-lora.toml --set method=bottleneck
# Virtual tokens, like IA3's scales, train at a larger learning rate than LoRA's updates.
run tweets-prefix recipes/tweets-lora.toml --set method=prefix_tuning \
    --set prefix_tuning.num_virtual_tokens=20 --set training.learning_rate=1e-2
run tweets-prompt recipes/tweets-lora.toml --set method=prompt_tuning \
    --set prompt_tuning.num_virtual_tokens=20 --set training.learning_rate=1e-2
run tweets-full-adamw8bit recipes/tweets-lora.toml --set method=full --set training.learning_rate=5e-5 \
    --set training.optim=\"adamw_bnb_8bit\"
STEPS='--set training.max_steps=20 --set training.eval_strategy="no"'
run smollm2-lora recipes/smollm2-dates-lora.toml $STEPS
run smollm2-qlora recipes/smollm2-dates-lora.toml --set method=qlora $STEPS
run smollm2-lora-gguf-q4_1 recipes/smollm2-dates-lora.toml --set quantization.keep_gguf_quantized=true $STEPS
