#!/usr/bin/env bash
# Runs every recipe in recipes/ for two optimizer steps on small splits and prints one sha256
# line per saved file, so two builds of whet can be checked for byte-identical outputs:
#
#   scripts/check/recipe_outputs.sh /tmp/before > before.txt   # on the old commit
#   scripts/check/recipe_outputs.sh /tmp/after  > after.txt    # on the new one
#   diff before.txt after.txt
#
# Timing fields (runtime, throughput, peak memory) are dropped from all_results.json and
# trainer_state.json, and OUTPUT_DIR stands for the output folder in recipe.resolved.toml,
# before hashing; every other byte counts. `--hash-only OUTPUT_DIR` hashes a finished run. Needs the assets of
# scripts/fetch_assets.sh (all of them) and jq.
set -euo pipefail
cd "$(dirname "$0")/../.."
hash_only=false
if [ "${1:-}" = --hash-only ]; then hash_only=true; shift; fi
out=${1:?usage: recipe_outputs.sh [--hash-only] OUTPUT_DIR}
whet=${WHET:-target/debug/whet}
run() {
  local name=$1; shift
  "$whet" train "recipes/$name.toml" --set "training.output_dir=\"$out/$name\"" \
    --set training.max_steps=2 "$@" > "$out/$name.log" 2>&1 \
    || { echo "$name failed:" >&2; tail -20 "$out/$name.log" >&2; exit 1; }
}
small='data.split={ train = 48, validation = 16, test = 16, seed = 42 }'
if ! $hash_only; then
rm -rf "$out" && mkdir -p "$out"
run tweets-lora --set "$small" --set training.per_device_eval_batch_size=16
# The preference recipes on BIG-bench's HHH pairs where the cache holds them (no longer on PyPI),
# and on the film-review pairs every machine builds.
for pairs in hhh reviews; do
  [ $pairs = hhh ] && [ ! -d "${WHET_CACHE:-cache}/data/hhh" ] && continue
  run $pairs-reward --set "$small" --set training.save_strategy='"steps"' --set training.save_steps=1
  run $pairs-dpo --set "$small" --set training.per_device_train_batch_size=4
  run $pairs-ppo --set "$small" --set "ppo.reward_model=\"$out/$pairs-reward\"" \
    --set training.per_device_train_batch_size=4 --set training.eval_steps=1 --set training.save_steps=1
done
run smollm2-dates-lora --set "$small" --set training.per_device_train_batch_size=4
run smollm2-hamlet --set training.per_device_train_batch_size=2
fi
timing='runtime|per_second|peak_rss'
find "$out" -mindepth 2 -type f | sort | while read -r f; do
  rel=${f#"$out"/}
  case "$f" in
    */all_results.json)
      jq -S "with_entries(select(.key | test(\"$timing\") | not))" "$f" | sha256sum | sed "s|-\$|$rel|" ;;
    */trainer_state.json)
      jq -S "walk(if type == \"object\" then with_entries(select(.key | test(\"$timing\") | not)) else . end)" "$f" \
        | sha256sum | sed "s|-\$|$rel|" ;;
    */recipe.resolved.toml)
      sed "s|$out|OUTPUT_DIR|g" "$f" | sha256sum | sed "s|-\$|$rel|" ;;
    *) (cd "$out" && sha256sum "$rel") ;;
  esac
done
