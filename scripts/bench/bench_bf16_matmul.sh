#!/usr/bin/env bash
# Matrix-product throughput, f32 and bf16, whet against PyTorch on this CPU, in alternating
# rounds (whet, torch, whet, torch), at the shapes of a MiniLM and a SmolLM2 training step.
# Prints the CPU, then per shape the best GFLOPS of each side and the ratios.
# Usage: scripts/bench/bench_bf16_matmul.sh [THREADS] [ROUNDS] [REPS]
# Needs .venv-ref (scripts/reference/setup_reference_env.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
THREADS=${1:-$(nproc)}
ROUNDS=${2:-2}
REPS=${3:-10}
cargo build -q -p whet --example bf16_matmul_bench
out=$(mktemp -d)
for r in $(seq "$ROUNDS"); do
    RAYON_NUM_THREADS=$THREADS target/debug/examples/bf16_matmul_bench "$REPS" > "$out/whet.$r"
    .venv-ref/bin/python scripts/bench/bench_bf16_matmul.py "$THREADS" "$REPS" > "$out/torch.$r"
done
grep -m1 'model name' /proc/cpuinfo | sed 's/.*: /cpu: /'
echo "bf16 instructions: $(grep -o -w -E 'avx512_bf16|amx_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ')"
python3 - "$out" "$ROUNDS" "$THREADS" <<'PY'
import glob, json, sys
out, rounds, threads = sys.argv[1], int(sys.argv[2]), sys.argv[3]
best = {}
for side in ["whet", "torch"]:
    for f in glob.glob(f"{out}/{side}.*"):
        for line in open(f):
            r = json.loads(line)
            key = (side, r["batch"], r["shape"], r["dtype"])
            best[key] = max(best.get(key, 0), r["gflops"])
print(f"threads {threads}, best of {rounds} rounds (GFLOPS)")
print(f"{'batch x shape':>18} {'whet f32':>9} {'whet bf16':>9} {'torch f32':>9} {'torch bf16':>10} {'whet bf16/f32':>13} {'bf16 whet/torch':>15}")
shapes = sorted({(k[1], k[2]) for k in best}, key=lambda s: list(best).index(("whet", s[0], s[1], "f32")))
for b, s in shapes:
    g = lambda side, d: best[(side, b, s, d)]
    print(f"{b:>4} x {s:>11} {g('whet','f32'):9.1f} {g('whet','bf16'):9.1f} {g('torch','f32'):9.1f} {g('torch','bf16'):10.1f} "
          f"{g('whet','bf16')/g('whet','f32'):12.2f}x {g('whet','bf16')/g('torch','bf16'):14.2f}x")
PY
rm -rf "$out"
