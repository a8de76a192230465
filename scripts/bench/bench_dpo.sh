#!/usr/bin/env bash
# Side-by-side DPO benchmark: whet against trl's DPOTrainer (+ peft LoRA) on PyTorch, CPU, on
# the same pairs (whet writes its split to OUT/data), the recipe's settings, same thread count,
# one after the other in one run.
# Usage: scripts/bench/bench_dpo.sh [STEPS] [THREADS] [f32|bf16] [reviews|hhh]
#   reviews (default): recipes/reviews-dpo.toml, film-review pairs every machine can build from
#     a registry package (scripts/data/make_review_pairs.py)
#   hhh: recipes/hhh-dpo.toml, BIG-bench's HHH pairs (bigbench==1.0.0, no longer on PyPI: only
#     where cache/data/hhh survives)
# bf16: `training.bf16 = true` on both sides (whet's AVX512-BF16 / AMX kernels, DPOConfig(bf16=True)).
# Prints train runtime, pairs/s and peak RSS of both and their ratio.
set -euo pipefail
cd "$(dirname "$0")/../.."
STEPS=${1:-10}
THREADS=${2:-$(nproc)}
PRECISION=${3:-f32}
DATA=${4:-reviews}
case $DATA in
    reviews) ASSET=rotten-tomatoes; OUT=runs/bench-dpo ;;
    hhh) ASSET=hhh; OUT=runs/bench-dpo-hhh ;;
    *) echo "bench_dpo: data is reviews or hhh, not '$DATA'" >&2; exit 2 ;;
esac
[[ $PRECISION == f32 || $PRECISION == bf16 ]] || { echo "bench_dpo: precision is f32 or bf16" >&2; exit 2; }
BF16=(); REF_BF16=()
if [[ $PRECISION == bf16 ]]; then OUT=$OUT-bf16; BF16=(--set training.bf16=true); REF_BF16=(--bf16); fi
scripts/fetch_assets.sh --only smollm2,evals,$ASSET >/dev/null
# The dev profile, as every other benchmark (dependencies at opt-level 3, see Cargo.toml).
cargo build -p whet 2>/dev/null
# WHET_PROFILE=FILE (scripts/bench/bench_all.sh PROFILE=1): whet's side runs under `perf record`.
PERF=(); [[ -n ${WHET_PROFILE:-} ]] && PERF=(perf record -q -F 199 -o "$WHET_PROFILE" --)
RAYON_NUM_THREADS=$THREADS "${PERF[@]}" target/debug/whet train recipes/$DATA-dpo.toml \
    --set training.max_steps=$STEPS --set training.eval_strategy=\"no\" \
    --set training.save_strategy=\"no\" --set training.output_dir=\"$OUT\" "${BF16[@]}" >/dev/null
OMP_NUM_THREADS=$THREADS .venv-ref/bin/python scripts/reference/reference_dpo.py --data $OUT/data \
    --gguf ${WHET_CACHE:-cache}/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --max-steps $STEPS \
    --threads $THREADS --out $OUT/reference.json "${REF_BF16[@]}" >/dev/null 2>&1
python3 - "$OUT/all_results.json" "$OUT/reference.json" "$THREADS" <<'PY'
import json, sys
w, r, threads = json.load(open(sys.argv[1])), json.load(open(sys.argv[2])), sys.argv[3]
print(f"threads: {threads}; steps: {r['max_steps']}; bf16: {r['bf16']}; reference: {r['impl']}")
print(f"{'metric':28} {'whet':>10} {'reference':>10} {'whet/ref':>9}")
for k in ["train_loss", "train_runtime", "train_samples_per_second", "train_peak_rss_mb"]:
    print(f"{k:28} {w[k]:10.4g} {r[k]:10.4g} {w[k]/r[k]:8.3f}x")
PY
