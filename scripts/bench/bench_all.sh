#!/usr/bin/env bash
# Every benchmark row against its reference in one command, in alternating rounds, and the
# table written into BENCHMARKS.md (between the `bench_all` markers) with the CPU and its flags.
#
# Usage: scripts/bench/bench_all.sh [ROUNDS] [THREADS]
#   ROUNDS (default 2): each round runs every row once, and each row runs whet then the
#   reference, so a row's runs alternate A B A B; the table gives the median of each side and
#   of the per-round ratios, and the spread of the ratios.
#   SFT_STEPS (default 40), DPO_STEPS (default 10): the length of those rows' runs.
#   BF16 (default: whether the CPU has AVX512-BF16): also the bf16 rows (both sides in bf16).
#   PROFILE=1: the last round records whet's side of every row with `perf record` (199 Hz,
#   user space), and benchmarks/profiles/ROW.txt gets its hottest symbols.
#   RESUME=1: keeps runs/bench-all/results.jsonl and runs only the (row, round) pairs it lacks.
#   ONLY=REGEX: only the rows whose name matches (e.g. ONLY='bf16|generation').
#   TABLE=NAME: writes between the `bench_all-NAME` markers instead (one table per machine
#   kind; the markers are added at the end of the "Every row" section when missing).
#
# Rows, each a committed side-by-side script (see its header for the settings):
#   minilm-lora   scripts/bench/bench_train.sh lora      the README's main job, 1 epoch
#   minilm-full   scripts/bench/bench_train.sh full      full fine-tuning, same data
#   sft-lora      scripts/bench/bench_sft.sh chat lora   SmolLM2 chat SFT against trl
#   sft-full      scripts/bench/bench_sft.sh blocks full SmolLM2 blocks of 256 against trl
#   dpo           scripts/bench/bench_dpo.sh             SmolLM2 DPO LoRA against trl (film-review pairs)
#   generation    scripts/bench/bench_inference.sh       greedy generation against generate()
# Takes about an hour a round on 2 cores (f32 and bf16 rows).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${1:-2}
THREADS=${2:-$(nproc)}
SFT_STEPS=${SFT_STEPS:-40}
DPO_STEPS=${DPO_STEPS:-10}
if [[ -z ${BF16:-} ]]; then
    BF16=0; grep -qw avx512_bf16 /proc/cpuinfo && BF16=1
fi
OUT=runs/bench-all
mkdir -p $OUT benchmarks/profiles
[[ ${RESUME:-0} == 1 ]] || : >$OUT/results.jsonl
touch $OUT/results.jsonl

# name | command | output folder | throughput key (whet's all_results.json, the reference's json)
rows=(
    "minilm-lora f32|scripts/bench/bench_train.sh lora $THREADS 42 f32|runs/bench-lora-seed42|train_tokens_per_second"
    "minilm-full f32|scripts/bench/bench_train.sh full $THREADS 42 f32|runs/bench-full-seed42|train_tokens_per_second"
    "sft-lora f32|scripts/bench/bench_sft.sh chat lora $SFT_STEPS $THREADS 42 f32|runs/bench-sft-chat-lora|train_tokens_per_second"
    "sft-full f32|scripts/bench/bench_sft.sh blocks full $SFT_STEPS $THREADS 42 f32|runs/bench-sft-blocks-full|train_tokens_per_second"
    "dpo f32|scripts/bench/bench_dpo.sh $DPO_STEPS $THREADS|runs/bench-dpo|train_samples_per_second"
    "generation f32|scripts/bench/bench_inference.sh $THREADS|runs/bench-inference|smollm2_generate_tokens_per_s"
)
if [[ $BF16 == 1 ]]; then
    rows+=(
        "minilm-lora bf16|scripts/bench/bench_train.sh lora $THREADS 42 bf16|runs/bench-lora-seed42-bf16|train_tokens_per_second"
        "minilm-full bf16|scripts/bench/bench_train.sh full $THREADS 42 bf16|runs/bench-full-seed42-bf16|train_tokens_per_second"
        "sft-lora bf16|scripts/bench/bench_sft.sh chat lora $SFT_STEPS $THREADS 42 bf16|runs/bench-sft-chat-lora-bf16|train_tokens_per_second"
        "sft-full bf16|scripts/bench/bench_sft.sh blocks full $SFT_STEPS $THREADS 42 bf16|runs/bench-sft-blocks-full-bf16|train_tokens_per_second"
        "dpo bf16|scripts/bench/bench_dpo.sh $DPO_STEPS $THREADS bf16|runs/bench-dpo-bf16|train_samples_per_second"
    )
fi

for round in $(seq 1 "$ROUNDS"); do
    for row in "${rows[@]}"; do
        IFS='|' read -r name cmd dir key <<<"$row"
        [[ -z ${ONLY:-} || $name =~ $ONLY ]] || continue
        slug=${name// /-}
        if grep -q "\"row\": \"$name\", \"round\": $round," $OUT/results.jsonl; then
            echo "round $round: $name (done before)" >&2
            continue
        fi
        profile=()
        if [[ ${PROFILE:-0} == 1 && $round == "$ROUNDS" ]]; then
            profile=(env WHET_PROFILE="$PWD/$OUT/$slug.perf")
        fi
        echo "round $round: $name ($cmd)" >&2
        "${profile[@]}" $cmd >"$OUT/$slug-round$round.log" 2>&1
        whet=$dir/all_results.json
        [[ -f $dir/whet.json ]] && whet=$dir/whet.json
        python3 - "$name" "$round" "$whet" "$dir/reference.json" "$key" >>$OUT/results.jsonl <<'PY'
import json, sys
name, rnd, w, r, key = sys.argv[1], int(sys.argv[2]), *map(lambda p: json.load(open(p)), sys.argv[3:5]), sys.argv[5]
print(json.dumps({"row": name, "round": rnd, "key": key, "whet": w[key], "reference": r[key],
                  "whet_rss": w.get("train_peak_rss_mb"), "reference_rss": r.get("train_peak_rss_mb"),
                  "reference_impl": r.get("impl", "")}))
PY
        if [[ ${#profile[@]} -gt 0 && -f $OUT/$slug.perf ]]; then
            {
                echo "# perf profile of whet's side of '$name' ($cmd), round $round"
                echo "# $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs); self time by symbol"
                # `head` closes the pipe early: not a failure.
                perf report -i "$OUT/$slug.perf" --stdio --no-children --sort symbol 2>/dev/null \
                    | grep -v '^#' | grep -v '^$' | head -30 | sed "s/ *- *- *$//" || true
            } >benchmarks/profiles/$slug.txt
        fi
    done
done

python3 - "$OUT/results.jsonl" "$ROUNDS" "$THREADS" "$SFT_STEPS" "$DPO_STEPS" "${TABLE:-}" "${ONLY:-}" <<'PY'
import json, statistics, sys, datetime, re
rows = [json.loads(l) for l in open(sys.argv[1])]
rounds, threads, sft, dpo, table_name, only = sys.argv[2:8]
flags = set()
for line in open("/proc/cpuinfo"):
    if line.startswith("flags"):
        flags = set(line.split(":")[1].split())
        break
model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
shown = [f for f in ["avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"] if f in flags]
out = [f"Measured {datetime.date.today()} by `scripts/bench/bench_all.sh {rounds} {threads}` "
       f"(SFT rows {sft} steps, DPO {dpo} steps) on: {model}, {threads} threads, flags "
       f"{' '.join(shown)}{f', rows matching {only!r}' if only else ''}. Median of {rounds} "
       "alternating rounds; the ratio is whet / reference per round (median, and min-max).", "",
       "| row | metric | whet | reference | ratio | ratio min-max | peak RSS whet / ref (MB) |",
       "|---|---|---:|---:|---:|---:|---:|"]
for name in dict.fromkeys(r["row"] for r in rows):
    rs = [r for r in rows if r["row"] == name]
    ratios = [r["whet"] / r["reference"] for r in rs]
    med = lambda k: statistics.median(r[k] for r in rs)
    rss = ""
    if rs[0]["whet_rss"] and rs[0]["reference_rss"]:
        rss = f"{med('whet_rss'):.0f} / {med('reference_rss'):.0f}"
    out.append(f"| {name} | {rs[0]['key']} | {med('whet'):.4g} | {med('reference'):.4g} | "
               f"{statistics.median(ratios):.2f}x | {min(ratios):.2f}-{max(ratios):.2f}x | {rss} |")
refs = sorted({r["reference_impl"] for r in rows if r["reference_impl"]})
out += ["", "References: " + "; ".join(refs) + "."]
table = "\n".join(out)
print(table)
path = "BENCHMARKS.md"
text = open(path).read()
tag = f"bench_all-{table_name}" if table_name else "bench_all"
begin, end = f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"
if table_name and begin not in text and "<!-- bench_all:end -->" in text:
    text = text.replace("<!-- bench_all:end -->", f"<!-- bench_all:end -->\n\n{begin}\n{end}", 1)
if begin in text and end in text:
    text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: f"{begin}\n{table}\n{end}", text, flags=re.S)
    open(path, "w").write(text)
    print(f"\nwritten into {path}")
else:
    print(f"\n{path} has no {begin} ... {end} markers: the table is printed only")
PY
