#!/usr/bin/env bash
# Side-by-side causal-LM fine-tuning benchmark and quality check: whet against trl's SFTTrainer
# (+ peft) on PyTorch, CPU, same split (whet writes it to OUT/data), same settings, same thread
# count, one after the other in one run.
# Usage: scripts/bench/bench_sft.sh [chat|blocks] [lora|full] [STEPS] [THREADS] [SEED] [f32|bf16] [smollm2|gemma3]
# bf16: `training.bf16 = true` on both sides (whet's AVX512-BF16 kernel, SFTConfig(bf16=True)).
#   chat:   recipes/smollm2-dates-lora.toml (chat SFT, loss on the assistant turn)
#   blocks: recipes/smollm2-hamlet.toml (plain text, blocks of 256 tokens, batch 4)
#   gemma3 (chat only): recipes/gemma3-dates-lora.toml, Gemma-3-270M with the chat template of
#     recipes/templates/gemma3-chat.jinja on both sides (SFTConfig(chat_template_path=...))
# Prints eval loss (mean over learnt tokens of the validation split), tokens/s and peak RSS.
set -euo pipefail
cd "$(dirname "$0")/../.."
KIND=${1:-chat}
METHOD=${2:-lora}
STEPS=${3:-100}
THREADS=${4:-$(nproc)}
SEED=${5:-42}
PRECISION=${6:-f32}
MODEL=${7:-smollm2}
RECIPE=recipes/smollm2-dates-lora.toml
[[ $KIND == blocks ]] && RECIPE=recipes/smollm2-hamlet.toml
GGUF=${WHET_CACHE:-cache}/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
REF_TEMPLATE=()
if [[ $MODEL == gemma3 ]]; then
    [[ $KIND == chat ]] || { echo "gemma3 runs the chat benchmark only" >&2; exit 2; }
    RECIPE=recipes/gemma3-dates-lora.toml
    GGUF=${WHET_CACHE:-cache}/gemma3/gemma-3-270m-q4_k_m.gguf
    REF_TEMPLATE=(--chat-template recipes/templates/gemma3-chat.jinja)
fi
OUT=runs/bench-sft-$KIND-$METHOD
[[ $MODEL != smollm2 ]] && OUT=$OUT-$MODEL
[[ $SEED != 42 ]] && OUT=$OUT-seed$SEED
BF16=(); REF_BF16=()
if [[ $PRECISION == bf16 ]]; then OUT=$OUT-bf16; BF16=(--set training.bf16=true); REF_BF16=(--bf16); fi
LR=2e-4; [[ $METHOD == full ]] && LR=2e-5
scripts/fetch_assets.sh --only smollm2,evals,rotten-tomatoes,$MODEL >/dev/null
cargo build -p whet 2>/dev/null
# WHET_PROFILE=FILE (scripts/bench/bench_all.sh PROFILE=1): whet's side runs under `perf record`.
PERF=(); [[ -n ${WHET_PROFILE:-} ]] && PERF=(perf record -q -F 199 -o "$WHET_PROFILE" --)
RAYON_NUM_THREADS=$THREADS "${PERF[@]}" target/debug/whet train $RECIPE --set method=$METHOD \
    --set training.learning_rate=$LR --set training.max_steps=$STEPS \
    --set training.eval_strategy=\"no\" --set training.seed=$SEED --set training.output_dir=\"$OUT\" "${BF16[@]}" >/dev/null
OMP_NUM_THREADS=$THREADS .venv-ref/bin/python scripts/reference/reference_sft.py --data $OUT/data \
    --gguf $GGUF --kind $KIND "${REF_TEMPLATE[@]}" \
    --method $METHOD --max-steps $STEPS --lr $LR --threads $THREADS --seed $SEED "${REF_BF16[@]}" --out $OUT/reference.json >/dev/null 2>&1
python3 - "$OUT/all_results.json" "$OUT/reference.json" "$THREADS" <<'PY'
import json, sys
w, r, threads = json.load(open(sys.argv[1])), json.load(open(sys.argv[2])), sys.argv[3]
print(f"threads: {threads}; steps: {r['max_steps']}; reference: {r['impl']}")
print(f"{'metric':28} {'whet':>10} {'reference':>10} {'whet/ref':>9}")
for k in ["eval_loss", "eval_perplexity", "train_loss", "train_runtime", "train_tokens_per_second", "train_peak_rss_mb"]:
    print(f"{k:28} {w[k]:10.4g} {r[k]:10.4g} {w[k]/r[k]:8.3f}x")
PY
