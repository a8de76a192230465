#!/usr/bin/env bash
# A GPT-2-shaped model with random weights (6 layers at GPT-2's width: 768, 12 heads, its
# 50257-token vocabulary), saved by transformers, and a recipe that trains it on the hamlet
# workload of recipes/smollm2-hamlet.toml. No package ships GPT-2 weights; this is the model of
# BENCHMARKS.md's whole-step measurement of split_last (session 21).
# Needs .venv-ref (scripts/reference/setup_reference_env.sh) and the gpt2-tokenizer asset.
# Usage: scripts/bench/gpt2_random.sh [DIR]      (default runs/gpt2-random)
# Then:  scripts/bench/ab.sh BEFORE AFTER 3 DIR/hamlet.toml --set method=full \
#            --set training.learning_rate=2e-5 --set training.max_steps=10 \
#            --set training.eval_strategy='"no"' --set training.save_strategy='"no"'
set -euo pipefail
cd "$(dirname "$0")/../.."
DIR=${1:-runs/gpt2-random}
CACHE=${WHET_CACHE:-cache}
scripts/fetch_assets.sh --only gpt2-tokenizer >/dev/null
mkdir -p "$DIR"
.venv-ref/bin/python - "$DIR/model" "$CACHE/gpt2-tokenizer" <<'PY'
import sys
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

out, tok_dir = sys.argv[1:]
torch.manual_seed(0)
GPT2LMHeadModel(GPT2Config(n_layer=6, n_embd=768, n_head=12, vocab_size=50257)).save_pretrained(out)
# Built from the BPE files directly: transformers 5's GPT2TokenizerFast(vocab_file=...,
# merges_file=...) saved a tokenizer.json with an empty vocabulary here.
bpe = Tokenizer(models.BPE.from_file(f"{tok_dir}/vocab.json", f"{tok_dir}/merges.txt"))
bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
bpe.decoder = decoders.ByteLevel()
eos = "<|endoftext|>"
PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=eos, bos_token=eos, unk_token=eos).save_pretrained(out)
PY
sed -e "s#<cache>/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf#$DIR/model#" \
    -e 's/^target_modules = .*/target_modules = ["c_attn"]/' \
    -e "s#output_dir = .*#output_dir = \"runs/gpt2-random-hamlet\"#" \
    recipes/smollm2-hamlet.toml > "$DIR/hamlet.toml"
echo "wrote $DIR/model and $DIR/hamlet.toml"
