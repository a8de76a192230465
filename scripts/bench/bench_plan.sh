#!/usr/bin/env bash
# Memory plan against measured peak: for each configuration, `whet plan --json` predicts and a
# short `whet train` run measures (train_peak_rss_mb, VmHWM), side by side with the ratio.
#   scripts/bench/bench_plan.sh [STEPS]      (release build; cache/ filled by scripts/fetch_assets.sh)
#   WHET_BIN=target/debug/whet scripts/bench/bench_plan.sh 4   (a binary already built)
set -euo pipefail
cd "$(dirname "$0")/../.."
STEPS=${1:-30}
W=${WHET_BIN:-target/release/whet}
[[ -n ${WHET_BIN:-} ]] || cargo build --release -p whet --quiet
OUT=$(mktemp -d)
run() { # name recipe overrides...
  local name=$1 recipe=$2; shift 2
  local sets=(--set "training.max_steps=$STEPS" --set training.eval_strategy=no
              --set training.save_strategy=no --set "training.output_dir=$OUT/$name" "$@")
  $W plan "$recipe" "${sets[@]}" --json > "$OUT/$name.plan.json"
  $W train "$recipe" "${sets[@]}" > "$OUT/$name.log" 2>&1
  python3 - "$name" "$OUT/$name.plan.json" "$OUT/$name/all_results.json" <<'PY'
import json, sys
name, plan, res = sys.argv[1:]
p = json.load(open(plan)); r = json.load(open(res))
mb = lambda b: b / 2**20
pred, meas = mb(p["total"]), r["train_peak_rss_mb"]
parts = ", ".join(f"{k} {mb(p[k]):.0f}" for k in ["weights", "process", "optimizer", "gradients", "activations"])
print(f"| {name} | {pred:.0f} MB | {meas:.0f} MB | {pred / meas:.2f} | {parts} |", flush=True)
PY
}
echo "| configuration | predicted | measured | ratio | predicted parts (MB) |"
echo "|---|---|---|---|---|"
# Tweets are fixed at 24 tokens (every tweet is longer and truncated), so every batch of the
# short run is the largest batch the plan sizes; the date conversations differ by a few tokens.
T=(--set data.max_length=24)
run tweets-lora recipes/tweets-lora.toml "${T[@]}"
run tweets-lora-bs64 recipes/tweets-lora.toml "${T[@]}" --set training.per_device_train_batch_size=64
run tweets-full recipes/tweets-lora.toml "${T[@]}" --set method=full --set training.learning_rate=5e-5
run tweets-full-bs64 recipes/tweets-lora.toml "${T[@]}" --set method=full --set training.per_device_train_batch_size=64
run tweets-full-8bit recipes/tweets-lora.toml "${T[@]}" --set method=full --set training.optim=adamw_bnb_8bit
for b in 1 4 8; do
  run smollm2-lora-bs$b recipes/smollm2-dates-lora.toml --set training.per_device_train_batch_size=$b
done
run smollm2-full recipes/smollm2-dates-lora.toml --set method=full --set training.learning_rate=1e-5
run smollm2-qlora recipes/smollm2-dates-lora.toml --set method=qlora
# Plain-text blocks of 256 tokens, full fine-tuning, f32 and bf16: the SFT rows of bench_all.sh.
run smollm2-hamlet-full recipes/smollm2-hamlet.toml --set method=full --set training.learning_rate=1e-5
run smollm2-hamlet-full-bf16 recipes/smollm2-hamlet.toml --set method=full --set training.learning_rate=1e-5 --set training.bf16=true
