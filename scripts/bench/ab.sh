#!/usr/bin/env bash
# A/B timing of two whet binaries on one training run, alternating A B B A so that drift of a
# shared machine falls on both. Prints train tokens/s (or samples/s) per run, the medians and
# the ratio B / A, and the final train loss of each (they should agree).
# Usage: scripts/bench/ab.sh BIN_A BIN_B ROUNDS RECIPE [--set KEY=VALUE ...]
# Example: scripts/bench/ab.sh /tmp/whet-before target/debug/whet 3 recipes/tweets-lora.toml \
#     --set training.max_steps=40 --set training.eval_strategy='"no"'
set -euo pipefail
cd "$(dirname "$0")/../.."
A=$1; B=$2; ROUNDS=$3; RECIPE=$4; shift 4
OUT=runs/bench-ab
rm -f "$OUT.tsv"
for ((r = 1; r <= ROUNDS; r++)); do
    # Odd rounds run A first, even rounds B first (A B B A ...): a drift of the machine
    # within a round then falls on both sides alike.
    order="A B"; ((r % 2 == 0)) && order="B A"
    for side in $order; do
        bin=$A; [[ $side == B ]] && bin=$B
        rm -rf "$OUT-$side"
        "$bin" train "$RECIPE" "$@" --set training.output_dir=\""$OUT-$side"\" >/dev/null 2>&1
        python3 - "$OUT-$side/all_results.json" "$side" "$r" >>"$OUT.tsv" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
rate = j.get("train_tokens_per_second") or j.get("train_samples_per_second")
print(f"{sys.argv[2]}\t{sys.argv[3]}\t{rate}\t{j.get('train_loss')}\t{j.get('train_peak_rss_mb')}")
PY
        tail -1 "$OUT.tsv"
    done
done
python3 - "$OUT.tsv" "$ROUNDS" <<'PY'
import statistics, sys
rows = [l.split("\t") for l in open(sys.argv[1]).read().splitlines()][-2 * int(sys.argv[2]):]
med = {s: statistics.median(float(r[2]) for r in rows if r[0] == s) for s in "AB"}
print(f"median A {med['A']:.1f}  B {med['B']:.1f}  B/A {med['B'] / med['A']:.3f}")
PY
rm -f "$OUT.tsv"
