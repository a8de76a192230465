#!/usr/bin/env bash
# The main job on a fresh machine: fetch the real models, build whet, describe the models and
# generate text with SmolLM2-135M-Instruct (GGUF) on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch_assets.sh --only minilm,smollm2
cargo build --release -p whet
W=target/release/whet
SMOL=${WHET_CACHE:-cache}/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
$W info "${WHET_CACHE:-cache}/minilm"
echo
$W info "$SMOL"
echo
$W generate --model "$SMOL" --chat --prompt "Give me three tips for learning a new programming language." --max-new-tokens 96
