#!/usr/bin/env bash
# The test command of the README: fetch the assets the tests read, then run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch_assets.sh --only minilm,smollm2,gpt2-tokenizer
cargo test --workspace --no-fail-fast 2>&1
