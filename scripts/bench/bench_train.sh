#!/usr/bin/env bash
# Side-by-side training benchmark and quality check on the README's main job: whet vs
# transformers + peft (PyTorch, CPU), same split (whet writes it), same settings, same thread
# count, one after the other in one run.
# Usage: scripts/bench/bench_train.sh [lora|full] [THREADS] [SEED] [f32|bf16]
# bf16: `training.bf16 = true` on both sides (whet's AVX512-BF16 kernel, PyTorch's autocast);
# whet says so and runs f32 on a CPU without AVX512-BF16.
# SEED (default 42) is the training seed of both sides (head initialisation, dropout, data
# order); the data split stays the recipe's (seed 42), so runs with several seeds compare
# quality on the same test set. Needs scripts/reference/setup_reference_env.sh once. LoRA: about 15
# minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
METHOD=${1:-lora}
THREADS=${2:-$(nproc)}
SEED=${3:-42}
PRECISION=${4:-f32}
OUT=runs/bench-$METHOD-seed$SEED
BF16=(); REF_BF16=()
if [[ $PRECISION == bf16 ]]; then OUT=$OUT-bf16; BF16=(--set training.bf16=true); REF_BF16=(--bf16); fi
scripts/fetch_assets.sh --only minilm,tweets >/dev/null
cargo build -p whet 2>/dev/null
LR=1e-3; [[ $METHOD == full ]] && LR=5e-5
# WHET_PROFILE=FILE (scripts/bench/bench_all.sh PROFILE=1): whet's side runs under `perf record`.
PERF=(); [[ -n ${WHET_PROFILE:-} ]] && PERF=(perf record -q -F 199 -o "$WHET_PROFILE" --)
RAYON_NUM_THREADS=$THREADS "${PERF[@]}" target/debug/whet train recipes/tweets-lora.toml --set method=$METHOD \
    --set training.learning_rate=$LR --set training.output_dir=\"$OUT\" --set training.save_strategy=\"no\" --set training.seed=$SEED "${BF16[@]}" >/dev/null
OMP_NUM_THREADS=$THREADS .venv-ref/bin/python scripts/reference/reference_classification.py --data $OUT/data \
    --model ${WHET_CACHE:-cache}/minilm --method $METHOD --threads $THREADS --seed $SEED "${REF_BF16[@]}" --out $OUT/reference.json >/dev/null 2>&1
python3 - "$OUT/all_results.json" "$OUT/reference.json" "$THREADS" "$SEED" <<'PY'
import json, sys
w, r, threads = json.load(open(sys.argv[1])), json.load(open(sys.argv[2])), sys.argv[3]
print(f"threads: {threads}; seed: {sys.argv[4]}; bf16: {r.get('bf16', False)}; reference: {r['impl']}")
print(f"{'metric':28} {'whet':>10} {'reference':>10} {'whet/ref':>9}")
for k in ["test_accuracy", "test_f1", "test_matthews_correlation", "train_runtime", "train_samples_per_second", "train_tokens_per_second", "train_peak_rss_mb"]:
    print(f"{k:28} {w[k]:10.4g} {r[k]:10.4g} {w[k]/r[k]:8.2f}x")
PY
