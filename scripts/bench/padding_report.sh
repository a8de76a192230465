#!/usr/bin/env bash
# The padding each task's batches carry on the README's data, and what `padding_free` does
# with it: every recipe of recipes/ that pads batches of examples (PPO's rollouts are padded
# as generated, and no recipe trains question answering) runs STEPS optimizer steps with
# `training.padding_free = false`, then `true`, one after the other in one run, and the
# table gives the padding fraction (`train_padding_fraction` of all_results.json: padded
# positions over all positions of the training batches), tokens/s both ways and peak RSS.
# Usage: scripts/bench/padding_report.sh [STEPS] [THREADS]   (RECIPES="a b": only those)
set -euo pipefail
cd "$(dirname "$0")/../.."
STEPS=${1:-40}
THREADS=${2:-$(nproc)}
scripts/fetch_assets.sh --only minilm,smollm2,tweets,evals,rotten-tomatoes >/dev/null
cargo build -p whet 2>/dev/null
OUT=runs/padding-report
mkdir -p $OUT
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs); threads: $THREADS; steps: $STEPS"
echo
echo "| recipe | task | padding | tokens/s padded | tokens/s padding-free | ratio | peak RSS padded / free (MB) |"
echo "|---|---|---:|---:|---:|---:|---:|"
for recipe in ${RECIPES:-tweets-lora reviews-reward smollm2-dates-lora smollm2-hamlet reviews-dpo}; do
    for pf in false true; do
        RAYON_NUM_THREADS=$THREADS target/debug/whet train recipes/$recipe.toml \
            --set training.output_dir=\"$OUT/$recipe-$pf\" --set training.save_strategy=\"no\" \
            --set training.eval_strategy=\"no\" --set training.max_steps=$STEPS \
            --set training.padding_free=$pf >$OUT/$recipe-$pf.log 2>&1
    done
    python3 - "$recipe" "$OUT/$recipe-false/all_results.json" "$OUT/$recipe-true/all_results.json" \
        "$(grep -m1 '^task' recipes/$recipe.toml | cut -d'"' -f2)" <<'PY'
import json, sys
name, a, b, task = sys.argv[1], json.load(open(sys.argv[2])), json.load(open(sys.argv[3])), sys.argv[4]
tp, tf = a["train_tokens_per_second"], b["train_tokens_per_second"]
assert abs(a["train_padding_fraction"] - b["train_padding_fraction"]) < 1e-12, "same batches both ways"
print(f"| {name} | {task} | {100 * b['train_padding_fraction']:.1f}% | {tp:.0f} | {tf:.0f} | {tf / tp:.2f}x "
      f"| {a.get('train_peak_rss_mb', 0):.0f} / {b.get('train_peak_rss_mb', 0):.0f} |")
PY
done
