#!/usr/bin/env bash
# Side-by-side inference benchmark: whet vs transformers (PyTorch, CPU) at the same thread
# count, in one run. Usage: scripts/bench/bench_inference.sh [THREADS]   (default: all cores)
# Needs the reference environment (scripts/reference/setup_reference_env.sh) and the assets.
set -euo pipefail
cd "$(dirname "$0")/../.."
THREADS=${1:-$(nproc)}
CACHE=${WHET_CACHE:-cache}
scripts/fetch_assets.sh --only minilm,smollm2 >/dev/null
# Dev profile: every dependency (burn, gemm) is built at opt-level 3 (see Cargo.toml), whet's
# own crates at opt-level 1; a release build of whet changes little here and costs 20 minutes.
cargo build -p whet --example bench_inference 2>/dev/null
# WHET_PROFILE=FILE (scripts/bench/bench_all.sh PROFILE=1): whet's side runs under `perf record`.
PERF=(); [[ -n ${WHET_PROFILE:-} ]] && PERF=(perf record -q -F 199 -o "$WHET_PROFILE" --)
W=$(RAYON_NUM_THREADS=$THREADS "${PERF[@]}" target/debug/examples/bench_inference "$CACHE/minilm" "$CACHE/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
R=$(OMP_NUM_THREADS=$THREADS .venv-ref/bin/python scripts/bench/bench_reference_inference.py "$CACHE/minilm" "$CACHE/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$THREADS" 2>/dev/null | tail -1)
mkdir -p runs/bench-inference
echo "$W" >runs/bench-inference/whet.json
echo "$R" >runs/bench-inference/reference.json
python3 - "$W" "$R" "$THREADS" <<'PY'
import json, sys
w, r, threads = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
print(f"threads: {threads}; reference: {r['impl']}")
print(f"{'metric':34} {'whet':>10} {'reference':>10} {'whet/ref':>9}")
for k in ["minilm_forward_tokens_per_s", "smollm2_forward_tokens_per_s", "smollm2_generate_tokens_per_s"]:
    print(f"{k:34} {w[k]:10.1f} {r[k]:10.1f} {w[k]/r[k]:8.2f}x")
PY
