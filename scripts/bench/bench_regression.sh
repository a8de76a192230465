#!/usr/bin/env bash
# Regression side by side on real data: MiniLM + LoRA predicting the tweets' annotator
# confidence (recipes/tweets-confidence-lora.toml: 4000 training rows, 1 epoch), whet against
# transformers + peft with problem_type "regression", the same split (whet writes it), the same
# settings and thread count, one after the other. Prints test MSE, Pearson and Spearman and the
# speed of both. Usage: scripts/bench/bench_regression.sh [THREADS] [SEED]. Needs
# scripts/reference/setup_reference_env.sh once; about 10 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
THREADS=${1:-$(nproc)}
SEED=${2:-42}
OUT=runs/bench-regression-seed$SEED
scripts/fetch_assets.sh --only minilm,tweets >/dev/null
cargo build -p whet 2>/dev/null
# The corpus's rows with a confidence (5,460 have an empty cell), as `ds.filter(...)` would keep.
python3 - "${WHET_CACHE:-cache}/data" <<'PY'
import csv, sys
src, dst = f"{sys.argv[1]}/tweets.csv", f"{sys.argv[1]}/tweets-confidence.csv"
with open(src, encoding="latin-1", newline="") as f, open(dst, "w", encoding="latin-1", newline="") as g:
    r = csv.reader(f)
    w = csv.writer(g)
    w.writerow(next(r))
    w.writerows(row for row in r if row[1].strip())
PY
RAYON_NUM_THREADS=$THREADS target/debug/whet train recipes/tweets-confidence-lora.toml \
    --set training.output_dir=\"$OUT\" --set training.save_strategy=\"no\" --set training.seed=$SEED >/dev/null
OMP_NUM_THREADS=$THREADS .venv-ref/bin/python scripts/reference/reference_classification.py --data $OUT/data \
    --model ${WHET_CACHE:-cache}/minilm --method lora --regression --threads $THREADS --seed $SEED \
    --out $OUT/reference.json >/dev/null 2>&1
python3 - "$OUT/all_results.json" "$OUT/reference.json" "$THREADS" "$SEED" <<'PY'
import json, sys
w, r, threads = json.load(open(sys.argv[1])), json.load(open(sys.argv[2])), sys.argv[3]
print(f"threads: {threads}; seed: {sys.argv[4]}; reference: {r['impl']}")
print(f"{'metric':28} {'whet':>10} {'reference':>10} {'whet/ref':>9}")
for k in ["test_loss", "test_mse", "test_pearson", "test_spearmanr", "train_runtime", "train_samples_per_second", "train_tokens_per_second", "train_peak_rss_mb"]:
    print(f"{k:28} {w[k]:10.4g} {r[k]:10.4g} {w[k]/r[k]:8.2f}x")
PY
