#!/usr/bin/env bash
# The test command of the README: fetch the assets the tests read, then run every test and
# close with one summary line over all test binaries (the CPU build's, then the device tests'
# of scripts/test_devices.sh) ("N passed, N failed").
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch_assets.sh --only minilm,smollm2,gpt2-tokenizer,gemma3
log=$(mktemp)
status=0
cargo test --workspace --no-fail-fast 2>&1 | tee "$log" || status=$?
# The GPU code path on the software Vulkan device (wgpu build), and `--features cuda` compiling.
scripts/test_devices.sh "$log" || status=$?
passed=$(awk '/^test result:/ { for (i = 1; i <= NF; i++) if ($i ~ /^passed/) s += $(i - 1) } END { print s + 0 }' "$log")
failed=$(awk '/^test result:/ { for (i = 1; i <= NF; i++) if ($i ~ /^failed/) s += $(i - 1) } END { print s + 0 }' "$log")
rm -f "$log"
echo
echo "all tests: ${passed:-0} passed, ${failed:-0} failed"
exit $status
