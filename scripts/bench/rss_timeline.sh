#!/usr/bin/env bash
# Resident memory of a command over time: samples /proc/PID/status every 0.2 s and prints, for
# each second, the largest anonymous and file-backed resident memory seen (MB), then the
# process's own high-water mark (VmHWM). Shows in which phase of a run its peak falls.
# Usage: scripts/bench/rss_timeline.sh COMMAND [ARGS...]
# Example: scripts/bench/rss_timeline.sh target/debug/whet train recipes/smollm2-hamlet.toml \
#     --set method=full --set training.max_steps=4 --set training.eval_strategy='"no"'
set -euo pipefail
"$@" >/dev/null 2>&1 &
pid=$!
start=$(date +%s.%N)
hwm=0
samples=$(mktemp)
while kill -0 "$pid" 2>/dev/null; do
    status=$(cat "/proc/$pid/status" 2>/dev/null || true)
    anon=$(awk '/^RssAnon/ {print $2}' <<<"$status")
    file=$(awk '/^RssFile/ {print $2}' <<<"$status")
    h=$(awk '/^VmHWM/ {print $2}' <<<"$status")
    [[ -n $h ]] && hwm=$h
    [[ -n $anon ]] && echo "$(date +%s.%N) $anon $file" >>"$samples"
    sleep 0.2
done
wait "$pid" || echo "the command exited with $?" >&2
echo "second: anonymous / file-backed MB (largest sample in that second)"
awk -v t0="$start" '{ s = int($1 - t0); if ($2 > a[s]) { a[s] = $2; f[s] = $3 } if (s > last) last = s }
    END { for (i = 0; i <= last; i++) if (i in a) printf "%d: %d / %d\n", i, a[i] / 1024, f[i] / 1024 }' "$samples"
echo "high-water mark (VmHWM, last read): $((hwm / 1024)) MB"
rm -f "$samples"
