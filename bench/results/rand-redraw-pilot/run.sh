#!/usr/bin/env bash
# The pilot in README.md: on seed 29, rand re-drawn every 40 steps (the registered test's setting)
# and rand re-drawn every 2,000 steps (policy.probe_every=2000, policy.warmup_steps=0), side by
# side, one thread each.
#   bench/results/rand-redraw-pilot/run.sh MAT_TRAIN OUT_ROOT
set -euo pipefail
here=$(realpath "$(dirname "$0")")
bin=$(realpath "$1")
root=$(realpath "$2")
config=$(realpath "$here/../../../examples/bert-wikitext2-regime.yaml")
data=$(realpath "$here/../../../../shared/data/wikitext-2")
common=(--config "$config" --set "data.dir=$data" --set train.threads=1 --no-progress
        --set policy.kind=rand --set policy.rand_fraction=0.5 --set seed=29)
mkdir -p "$root"
if [[ -e "$root/rand40-s29" || -e "$root/rand2000-s29" ]]; then
  echo "run.sh: $root holds runs of an earlier start; give another OUT_ROOT" >&2
  exit 1
fi
sha256sum "$bin" > "$root/mat-train.sha256"
cd "$root"
"$bin" "${common[@]}" --out rand40-s29 > rand40-s29.log 2>&1 &
a=$!
"$bin" "${common[@]}" --set policy.probe_every=2000 --set policy.warmup_steps=0 \
  --out rand2000-s29 > rand2000-s29.log 2>&1 &
b=$!
rc=0
wait "$a" || rc=$?
wait "$b" || rc=$?
exit "$rc"
