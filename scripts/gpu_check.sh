#!/usr/bin/env bash
# The GPU check, one command for a lent GPU machine (no network; only the working tree and
# `carry` paths travel, 64 MiB in all; PyTorch, transformers, peft and accelerate installed).
#
# Here, first:  scripts/gpu/prepare.sh     # builds whet and the parity test binaries with
#                                          # --features cuda into gpu-bundle/ (git-ignored)
# There:        bash scripts/gpu_check.sh  # device tool: carry ["gpu-bundle"], timeout_s 540
# Here, to try the whole flow on the CPU at tiny sizes before spending GPU time:
#               scripts/gpu_check.sh --cpu-dry-run
#
# In under 8 minutes (GPU_CHECK_BUDGET seconds, default 420, every stage limited from it, and
# the whole stopped 45 s after it):
#  1. makes the models there with transformers from configs, random weights at real shapes
#     (MiniLM-L6, SmolLM2-135M, a Llama-3.2-1B-shaped model), their word-level tokenizers and
#     synthetic data (scripts/gpu/make_assets.py), while
#  2. the tiny-model parity tests run on the device (WHET_TEST_DEVICE=cuda);
#  3. training, LoRA and full, f32 and bf16, whet against transformers' Trainer (+ peft) with the
#     same tokens per step, steps and sequence length: train tokens/s and peak device memory;
#  4. greedy generation: `whet generate` against `transformers.generate` (tokens/s, and how many
#     greedy tokens agree);
#  5. a summary table (markdown) on stdout and in $OUT/summary.md, with results.json, check.log
#     and logs.tar.gz beside it ($OUT is the device tool's output folder; here runs/gpu-check/).
# A rerun of part of it: GPU_CHECK_SKIP=parity,generate and/or GPU_CHECK_ONLY_TRAIN=llama-1b;
# GPU_CHECK_DTYPES=f32,tf32,bf16 picks the training precisions (default f32,bf16).
# What whet must offer: `--device cuda` (or WHET_DEVICE=cuda), WHET_TEST_DEVICE in the parity
# tests, and `--set training.bf16=true` for bf16 (WHET_BF16_SET overrides the key).
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=gpu
case ${1:-} in
    --cpu-dry-run) MODE=cpu-dry-run ;;
    "") ;;
    *) echo "usage: scripts/gpu_check.sh [--cpu-dry-run]" >&2; exit 2 ;;
esac
BUDGET=${GPU_CHECK_BUDGET:-420}
OUTDIR=${OUT:-runs/gpu-check}
BUNDLE=gpu-bundle
if [[ $MODE == gpu ]]; then
    WORK=${GPU_CHECK_WORK:-/tmp/whet-gpu-check}
    PY=${GPU_CHECK_PYTHON:-python3}
else
    WORK=${GPU_CHECK_WORK:-runs/gpu-check-work}
    PY=${GPU_CHECK_PYTHON:-.venv-ref/bin/python}
    [[ $OUTDIR == runs/gpu-check ]] && OUTDIR=runs/gpu-check-dry-run
    # One thread a side: PyTorch's spinning OpenMP threads ran tiny steps 40x slower on a
    # 2-core machine busy with other work (the dry run checks the flow, not the speed).
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-1}
fi
rm -rf "$WORK"
mkdir -p "$WORK/bin" "$OUTDIR"
rm -f "$OUTDIR"/{summary.md,results.json,logs.tar.gz,check.log}
WORK=$(cd "$WORK" && pwd)
OUTDIR=$(cd "$OUTDIR" && pwd)
exec > >(tee "$OUTDIR/check.log") 2>&1
echo "gpu_check: mode $MODE, budget ${BUDGET}s, work $WORK, out $OUTDIR"
command -v "$PY" >/dev/null || { echo "gpu_check: no python at $PY"; exit 1; }
[[ $PY == */* ]] && PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")

# The bundle: xz-compressed, stripped binaries and manifest.json (scripts/gpu/prepare.sh).
unxz_to() {  # FILE.xz DEST: xz where it is installed, else Python's lzma
    if command -v xz >/dev/null; then xz -dc "$1" >"$2"; else
        "$PY" -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],"wb"))' "$1" "$2"; fi
    chmod +x "$2"
}
TESTS=""
if [[ -f $BUNDLE/manifest.json ]]; then
    "$PY" - "$BUNDLE/manifest.json" "$WORK/bin" <<'PY' || exit 1
import json, sys
m = json.load(open(sys.argv[1]))
print("bundle:", json.dumps(m["built"]))
with open(sys.argv[2] + "/unpack.txt", "w") as f:
    for packed, name in [(m["whet"]["packed"], m["whet"]["file"])] + [(t["packed"], t["file"]) for t in m["tests"]]:
        f.write(f"{packed} {name}\n")
json.dump(m, open(sys.argv[2] + "/manifest.json", "w"), indent=1)
PY
    while read -r packed name; do unxz_to "$BUNDLE/$packed" "$WORK/bin/$name" || exit 1; done <"$WORK/bin/unpack.txt"
    WHET=$WORK/bin/whet
    TESTS=$WORK/bin/manifest.json
    # The test binaries find tests/fixtures through the path they were built at
    # (CARGO_MANIFEST_DIR); this copy of the tree holds the same files somewhere else.
    ROOT=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["built"]["root"])' "$TESTS")
    if [[ ! -e $ROOT/tests/fixtures ]]; then
        if [[ ! -e $ROOT ]] && mkdir -p "$(dirname "$ROOT")" 2>/dev/null && ln -s "$PWD" "$ROOT" 2>/dev/null; then
            echo "linked $ROOT -> $PWD (the test binaries' fixture path)"
        else
            echo "cannot link $ROOT -> $PWD: the parity tests will not find their fixtures"
        fi
    fi
elif [[ $MODE == gpu ]]; then
    echo "gpu_check: no $BUNDLE/manifest.json: run scripts/gpu/prepare.sh here and carry $BUNDLE"
    exit 1
else
    for w in target/release/whet target/debug/whet; do [[ -x $w ]] && { WHET=$PWD/$w; break; }; done
    [[ -n ${WHET:-} ]] || { echo "gpu_check: no whet binary: cargo build -p whet"; exit 1; }
    echo "no $BUNDLE (scripts/gpu/prepare.sh [--cpu]): whet is $WHET, the parity stage is skipped"
fi

if [[ $MODE == gpu ]]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv || true
    # whet's CUDA runtime (cubecl through cudarc) opens the driver, NVRTC and NCCL at run time
    # by name: give whet and the test binaries (only them: LD_LIBRARY_PATH would override
    # PyTorch's own RUNPATH) PyTorch's CUDA library folders and the toolkit's.
    libs=$("$PY" -c 'import glob, os, site
dirs = []
for sp in site.getsitepackages():
    dirs += sorted(glob.glob(sp + "/nvidia/*/lib"))
dirs += ["/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib", "/usr/local/nvidia/lib64"]
print(":".join(dict.fromkeys(d for d in dirs if os.path.isdir(d))))' 2>/dev/null)
    export WHET_LD_LIBRARY_PATH=${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$libs
    # whet's CUDA build compiles its kernels with NVRTC, which reads the toolkit's headers
    # (cuda_fp16.h, ...) from CUDA_PATH, default /usr/local/cuda; else PyTorch's wheels'.
    if [[ -z ${CUDA_PATH:-} && ! -e /usr/local/cuda/include/cuda_fp16.h ]]; then
        hdr=$("$PY" -c 'import glob, site
print(next(iter(sorted(h for sp in site.getsitepackages() for h in glob.glob(sp + "/nvidia/*/include/cuda_fp16.h"))), ""))' 2>/dev/null)
        [[ -n $hdr ]] && export CUDA_PATH=$(dirname "$(dirname "$hdr")")
    fi
    echo "CUDA_PATH=${CUDA_PATH:-/usr/local/cuda}: $(ls "${CUDA_PATH:-/usr/local/cuda}/include/cuda_fp16.h" 2>&1)"
    echo "whet's LD_LIBRARY_PATH=$WHET_LD_LIBRARY_PATH"
    ldconfig -p 2>/dev/null | grep -E "libcuda\.so|libnvrtc\.so|libnccl\.so" | head -6
fi
"$PY" -c 'import torch, transformers, peft; print("python", __import__("sys").version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available(), "transformers", transformers.__version__, "peft", peft.__version__)'

export PYTHONUNBUFFERED=1
timeout --kill-after=10 $((BUDGET + 45)) "$PY" scripts/gpu/check.py --mode "$MODE" --whet "$WHET" \
    --work "$WORK" --out "$OUTDIR" --budget "$BUDGET" ${TESTS:+--tests "$TESTS"} --ref-python "$PY" \
    --skip "${GPU_CHECK_SKIP:-}" ${GPU_CHECK_ONLY_TRAIN:+--only-train "$GPU_CHECK_ONLY_TRAIN"} \
    ${GPU_CHECK_DTYPES:+--dtypes "$GPU_CHECK_DTYPES"}
rc=$?
[[ $rc == 124 || $rc == 137 ]] && echo "gpu_check: stopped at the outer time limit; $OUTDIR/summary.md holds what finished"
echo "gpu_check: exit $rc; results in $OUTDIR"
exit $rc
