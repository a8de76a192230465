#!/usr/bin/env bash
# Builds, here, what scripts/gpu_check.sh needs on a lent GPU machine, into gpu-bundle/
# (git-ignored; the device tool's `carry`): whet and the tiny-model parity test binaries, built
# with `--release --features cuda` (no CUDA toolkit needed to build; the driver is loaded at run
# time there), stripped and xz-compressed, and manifest.json (what was built, from which commit,
# at which path). Checks that the bundle and the working tree that travels with it fit in 64 MiB.
#
# Usage: scripts/gpu/prepare.sh          # release + cuda: the real thing (a long build)
#        scripts/gpu/prepare.sh --cpu    # dev profile, no GPU features: for --cpu-dry-run
# GPU_TESTS: the test binaries, as PACKAGE:TEST-TARGET:FILTER words (default below). A test
# module runs on the device only if it reads WHET_TEST_DEVICE (whet_models::device::for_tests).
set -euo pipefail
cd "$(dirname "$0")/../.."
PROFILE=(--release)
FEATURES=(--features cuda)
if [[ ${1:-} == --cpu ]]; then PROFILE=(); FEATURES=(); fi
TESTS=${GPU_TESTS:-"whet-models:main:parity_tiny::"}
BUNDLE=gpu-bundle
LIMIT_MIB=64

cargo build "${PROFILE[@]}" "${FEATURES[@]}" -p whet
DIR=debug; [[ ${#PROFILE[@]} -gt 0 ]] && DIR=release
rm -rf "$BUNDLE"
mkdir -p "$BUNDLE"
pack() {  # BINARY NAME: strip and compress into the bundle
    cp "$1" "$BUNDLE/$2"
    strip "$BUNDLE/$2"
    xz -T0 -9 -f "$BUNDLE/$2"
}
pack "target/$DIR/whet" whet
entries=()
for spec in $TESTS; do
    IFS=: read -r pkg target filter <<<"$spec"
    # cargo prints the test binary's path in its JSON messages (the file name has a hash).
    exe=$(cargo test "${PROFILE[@]}" "${FEATURES[@]}" -p "$pkg" --test "$target" --no-run \
            --message-format=json 2>/dev/null | python3 -c '
import json, sys
pkg, target = sys.argv[1], sys.argv[2]
for line in sys.stdin:
    m = json.loads(line)
    pid = m.get("package_id", "")
    ours = pid.startswith(pkg + " ") or ("/" + pkg + "#") in pid or ("#" + pkg + "@") in pid
    if m.get("reason") == "compiler-artifact" and m.get("executable") and ours \
            and m["target"]["name"] == target:
        print(m["executable"])' "$pkg" "$target")
    [[ -n $exe ]] || { echo "prepare: no test binary for $spec" >&2; exit 1; }
    name=test-$pkg-$target
    pack "$exe" "$name"
    entries+=("{\"name\": \"$pkg/$target\", \"file\": \"$name\", \"packed\": \"$name.xz\", \"filter\": \"$filter\"}")
done

commit=$(git rev-parse --short HEAD)
dirty=false; git diff --quiet HEAD -- crates Cargo.toml Cargo.lock || dirty=true
tests_json=$(IFS=,; echo "${entries[*]}")
cat >"$BUNDLE/manifest.json" <<EOF
{
 "built": {"commit": "$commit", "dirty": $dirty, "root": "$PWD",
           "cargo": "$(echo cargo build ${PROFILE[*]} ${FEATURES[*]} -p whet)",
           "rustc": "$(rustc --version)", "date": "$(date -u +%Y-%m-%dT%H:%MZ)"},
 "whet": {"file": "whet", "packed": "whet.xz"},
 "tests": [$tests_json]
}
EOF
python3 -m json.tool "$BUNDLE/manifest.json" >/dev/null

# What travels: the bundle, plus tracked and untracked-not-ignored files.
bundle=$(du -sb "$BUNDLE" | cut -f1)
# (stat skips files deleted from the work tree but still in the index: they do not travel.)
tree=$( (git ls-files -co --exclude-standard -z | xargs -0 stat -c %s 2>/dev/null || true) |
    awk '{s+=$1} END {print s+0}')
total=$((bundle + tree))
ls -l "$BUNDLE"
awk -v b="$bundle" -v t="$tree" -v l="$LIMIT_MIB" 'BEGIN {
    printf "bundle %.1f MiB + working tree %.1f MiB = %.1f MiB (limit %d MiB)\n", b / 2^20, t / 2^20, (b + t) / 2^20, l }'
if ((total > LIMIT_MIB * 1048576)); then
    echo "prepare: over the $LIMIT_MIB MiB the device tool carries" >&2
    exit 1
fi
echo "ready: run scripts/gpu_check.sh there with carry [\"$BUNDLE\"]"
