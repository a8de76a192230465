#!/usr/bin/env bash
# Create .venv-ref/: the Python reference environment (torch on CPU, transformers, peft, gguf,
# safetensors) used to regenerate tests/fixtures/ and to run side-by-side benchmarks.
# Not needed to build or test whet: the fixtures are committed.
#
# Usage: scripts/reference/setup_reference_env.sh [--force]
#   --force   delete and recreate .venv-ref/ even if it matches the lock file
#
# Every package is pinned in scripts/reference/requirements-reference.txt and installed with --no-deps;
# that file explains how torch ends up CPU-usable without triton and the optional CUDA pieces.
# Downloads about 2.5 GB from PyPI; the venv takes about 4.3 GB.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$ROOT/.venv-ref"
REQS="$ROOT/scripts/reference/requirements-reference.txt"
STAMP="$VENV/.requirements.sha256"
PYTHON="${PYTHON:-python3}"

die() { echo "setup_reference_env: error: $*" >&2; exit 1; }

force=0
case "${1:-}" in
    "") ;;
    --force) force=1 ;;
    -h|--help) sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (try --help)" ;;
esac

command -v "$PYTHON" >/dev/null || die "$PYTHON not found"
"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' 2>/dev/null \
    || die "the lock file pins cp311 wheels; $PYTHON is $("$PYTHON" -V 2>&1) (set PYTHON=python3.11)"

want="$(sha256sum "$REQS" | cut -d' ' -f1)"
if [[ $force -eq 0 && -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    echo "reference env: up to date ($VENV)"
    exit 0
fi

rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
log="$(mktemp)"
if ! "$VENV/bin/pip" install --disable-pip-version-check --no-cache-dir --no-deps \
        --only-binary :all: -r "$REQS" >"$log" 2>&1; then
    tail -n 15 "$log" >&2
    die "pip install failed (cannot reach PyPI? check network/proxy); full log: $log"
fi
rm -f "$log"
# seqeval (run_ner.py's entity metrics, for scripts/fixtures/make_metrics_fixture.py) ships as a
# source archive only: pure Python, built in place with the venv's setuptools, checked by hash.
sdist="$(mktemp -d)"
"$VENV/bin/pip" download --disable-pip-version-check --no-deps --no-binary :all: \
    seqeval==1.2.2 -d "$sdist" >/dev/null 2>&1 || die "cannot download seqeval 1.2.2"
echo "f28e97c3ab96d6fcd32b648f6438ff2e09cfba87f05939da9b3970713ec56e6f  $sdist/seqeval-1.2.2.tar.gz" \
    | sha256sum -c --quiet || die "seqeval 1.2.2's archive does not match its hash"
"$VENV/bin/pip" install --disable-pip-version-check --no-deps --no-build-isolation \
    "$sdist/seqeval-1.2.2.tar.gz" >/dev/null 2>&1 || die "cannot install seqeval 1.2.2"
rm -rf "$sdist"

"$VENV/bin/python" - <<'PY' || die "smoke test of the reference env failed"
import torch, transformers, peft, gguf, safetensors, numpy, tokenizers
from importlib.metadata import version
x = torch.randn(3, 4, requires_grad=True)
(x @ torch.randn(4, 2)).sum().backward()
assert x.grad is not None
print(f"reference env: torch {torch.__version__} (cuda available: {torch.cuda.is_available()}), "
      f"transformers {transformers.__version__}, peft {peft.__version__}, gguf {version('gguf')}, "
      f"safetensors {safetensors.__version__}, tokenizers {tokenizers.__version__}, numpy {numpy.__version__}")
PY
echo "$want" >"$STAMP"
