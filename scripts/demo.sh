#!/usr/bin/env bash
# The main job on a fresh machine: fetch MiniLM and the tweet sentiment data, build whet, and
# fine-tune MiniLM with LoRA on 3-class tweet sentiment (seeded 8000 / 1000 / 1000 split),
# printing example predictions before and after training and the test metrics.
# Results land in runs/tweets-lora/.
# The build is Cargo's dev profile, in which every dependency (burn, gemm, tokenizers) is
# optimised (see Cargo.toml): the tests share its artifacts, and a separate release build would
# cost another 20 minutes of compiling on 2 cores for little speed.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch_assets.sh --only minilm,tweets
cargo build -p whet
target/debug/whet train recipes/tweets-lora.toml "$@"
