#!/usr/bin/env bash
# The f32 matrix products of one SmolLM2-135M training step (blocks of 256 tokens, batch 4:
# the `sft-full` row of bench_all.sh), whet against PyTorch on this CPU in alternating rounds
# (whet, torch, whet, torch): per product the best GFLOPS of each side, and the step's products
# summed as each side runs them. That sum bounds a step from below: at those speeds and with
# nothing else in the step (no attention, norms, optimizer), a side trains at most
# 1024 / (its products' time) tokens/s. REF_TPS=R (the reference's tokens/s in a bench_all
# run) also prints what 1.5x that asks of whet's step against that bound.
# Usage: scripts/bench/bench_f32_products.sh [THREADS] [ROUNDS] [REPS]
#   REPS (default 10): timed calls of each product; the LM head's loss runs REPS / 4 (rounded
#   up), so fewer than 8 leaves it one or two calls, too few to time it well.
# Needs .venv-ref (scripts/reference/setup_reference_env.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
THREADS=${1:-$(nproc)}
ROUNDS=${2:-2}
REPS=${3:-10}
cargo build -q -p whet --example f32_products_bench
out=$(mktemp -d)
for r in $(seq "$ROUNDS"); do
    RAYON_NUM_THREADS=$THREADS target/debug/examples/f32_products_bench "$REPS" > "$out/whet.$r"
    .venv-ref/bin/python scripts/bench/bench_f32_products.py "$THREADS" "$REPS" "$out/whet.$r" > "$out/torch.$r"
done
grep -m1 'model name' /proc/cpuinfo | sed 's/.*: /cpu: /'
python3 - "$out" "$ROUNDS" "$THREADS" "${REF_TPS:-}" <<'PY'
import glob, json, sys
out, rounds, threads, ref_tps = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
best, rows = {}, {}
for side in ["whet", "torch"]:
    for f in sorted(glob.glob(f"{out}/{side}.*")):
        for line in open(f):
            p = json.loads(line)
            rows.setdefault(p["name"], p)
            best[(side, p["name"])] = max(best.get((side, p["name"]), 0), p["gflops"])
print(f"threads {threads}, best of {rounds} rounds (GFLOPS)")
print(f"{'product':>13} {'m x k x n':>17} {'per step':>8} {'whet':>7} {'torch':>7} {'whet/torch':>10}")
step = {"whet": 0.0, "torch": 0.0}
for name, p in rows.items():
    w, t = best[("whet", name)], best[("torch", name)]
    for side, g in [("whet", w), ("torch", t)]:
        step[side] += p["per_step"] * p["flops"] / (g * 1e9)
    shape = f"{p['m']}x{p['k']}x{p['n']}"
    print(f"{name:>13} {shape:>17} {p['per_step']:>8} {w:7.1f} {t:7.1f} {w / t:9.2f}x")
flops = sum(p["per_step"] * p["flops"] for p in rows.values())
print(f"a step's products: {flops / 1e9:.0f} GFLOP; whet {step['whet']:.3f} s "
      f"({flops / step['whet'] / 1e9:.0f} GFLOPS), torch {step['torch']:.3f} s "
      f"({flops / step['torch'] / 1e9:.0f} GFLOPS): whet/torch {step['torch'] / step['whet']:.3f}x")
bound = {s: 1024 / step[s] for s in step}
print(f"tokens/s with the products alone: whet {bound['whet']:.0f}, torch {bound['torch']:.0f}")
if ref_tps:
    r = float(ref_tps)
    print(f"reference {r:.1f} tokens/s: {r / bound['torch']:.0%} of its own bound; 1.5x is "
          f"{1.5 * r:.0f} tokens/s, {1.5 * r / bound['whet']:.0%} of whet's bound")
PY
rm -rf "$out"
