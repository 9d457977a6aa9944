#!/usr/bin/env bash
# Runs the plan in README.md: for each seed, MAT with the floor (k's command), then frozen-random
# replaying that run's own decisions; two slots side by side, each slot's runs one after another.
#   bench/results/lambda-vs-random/run.sh MAT_TRAIN OUT_ROOT
# MAT_TRAIN: the mat-train binary (copied out of build/); OUT_ROOT: where the runs go (each in
# OUT_ROOT/mat-sN and OUT_ROOT/frozen-random-sN, its stdout and stderr in OUT_ROOT/NAME.log).
set -euo pipefail
bin=$(realpath "$1")
root=$(realpath "$2")
config=$(realpath "$(dirname "$0")/../../../examples/bert-wikitext2-regime.yaml")
data=$(realpath "$(dirname "$0")/../../../../shared/data/wikitext-2")
common=(--config "$config" --set "data.dir=$data" --set train.threads=1
        --set policy.min_active_fraction=0.5 --no-progress)

pair() {  # one seed: MAT, then frozen-random replaying its decisions
  local seed=$1
  (cd "$root" && "$bin" "${common[@]}" --set "seed=$seed" --out "mat-s$seed" \
      > "mat-s$seed.log" 2>&1)
  (cd "$root" && "$bin" "${common[@]}" --set "seed=$seed" --set policy.kind=frozen-random \
      --set "policy.rand_schedule=mat-s$seed/decisions.jsonl" --out "frozen-random-s$seed" \
      > "frozen-random-s$seed.log" 2>&1)
}

mkdir -p "$root"
sha256sum "$bin" > "$root/mat-train.sha256"
(pair 21 || true; pair 23 || true) &
(pair 22 || true; pair 24 || true) &
wait
