#!/usr/bin/env bash
# The device half of the test command: the GPU code path on Mesa's software Vulkan (lavapipe,
# a wgpu adapter of kind Cpu), and a check that the CUDA build compiles without the toolkit.
# Run by scripts/test.sh after the CPU tests; installs lavapipe when it is missing.
#
#   scripts/test_devices.sh [LOG]   appends the cargo test output to LOG when given
set -euo pipefail
cd "$(dirname "$0")/.."
log=${1:-/dev/null}

if ! ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1; then
    echo "installing Mesa's software Vulkan driver (mesa-vulkan-drivers)"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq mesa-vulkan-drivers >/dev/null
fi

# cubecl-cuda compiles kernels to PTX with an LLVM that tracel-llvm-bundler's build script
# downloads from GitHub; without network that download fails, and DOCS_RS=1 (the switch the
# bundler gives docs.rs) skips it. `cargo check` links nothing, so it needs no LLVM: this checks
# that every line of the cuda build compiles, not that it links.
echo "== DOCS_RS=1 cargo check -p whet --features cuda (no CUDA toolkit, no LLVM download)"
DOCS_RS=1 cargo check -p whet --features cuda

# Only the software adapter: a machine with a GPU would otherwise test that instead.
export WHET_TEST_DEVICE=wgpu:cpu
status=0
run() {
    echo "== WHET_TEST_DEVICE=$WHET_TEST_DEVICE cargo test $*"
    cargo test --no-fail-fast "$@" 2>&1 | tee -a "$log" || status=$?
}
run -p whet-models --features wgpu --lib -- device:: kernels::
run -p whet-models --features wgpu --test main -- parity_tiny::
run -p whet-infer --features wgpu --test main -- device::
run -p whet-train --features wgpu --test main -- paged:: precision::
run -p whet --features wgpu --test main -- device_cli::
exit $status
