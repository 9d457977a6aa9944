#!/usr/bin/env bash
# Runs the plan in README.md: full training on seeds 21-23 (their MAT runs are
# ../lambda-vs-random/kept-runs/mat-s21..23), MAT with the floor and full on seeds 25 and 26, then
# frozen-random replaying mat-s25's and mat-s26's own decisions. One queue, two slots side by
# side, each taking the next run when its last one ends (a run whose replay needs a MAT run waits
# for that run's summary).
#   bench/results/mat-vs-full-1nat/run.sh MAT_TRAIN OUT_ROOT
# MAT_TRAIN: the mat-train binary (the one ../lambda-vs-random used, sha256 99c7589d...); OUT_ROOT:
# where the runs go (OUT_ROOT/NAME, its stdout and stderr in OUT_ROOT/NAME.log).
set -euo pipefail
bin=$(realpath "$1")
root=$(realpath "$2")
config=$(realpath "$(dirname "$0")/../../../examples/bert-wikitext2-regime.yaml")
data=$(realpath "$(dirname "$0")/../../../../shared/data/wikitext-2")
common=(--config "$config" --set "data.dir=$data" --set train.threads=1
        --set policy.min_active_fraction=0.5 --no-progress)
queue=(full-s21 full-s22 mat-s25 mat-s26 full-s23 full-s25 full-s26
       frozen-random-s25 frozen-random-s26)

one() {  # NAME: kind-sSEED
  local name=$1 kind=${1%-s*} seed=${1##*-s} extra=()
  case $kind in
    full) extra=(--set policy.kind=full) ;;
    mat) ;;
    frozen-random)
      # (After the runs, from a review: waiting for summary.json alone never ended if the MAT run
      # failed; it waits for the run's end and skips without a summary.)
      while [[ ! -f "$root/mat-s$seed.done" ]]; do sleep 30; done
      if [[ ! -f "$root/mat-s$seed/summary.json" ]]; then
        echo "$name: mat-s$seed did not finish; not run" >&2
        touch "$root/$name.done"
        return
      fi
      extra=(--set policy.kind=frozen-random --set "policy.rand_schedule=mat-s$seed/decisions.jsonl") ;;
  esac
  (cd "$root" && "$bin" "${common[@]}" --set "seed=$seed" "${extra[@]}" --out "$name" \
      > "$name.log" 2>&1) || true
  touch "$root/$name.done"
}

slot() {  # takes the next queue index under a lock until the queue is empty
  local k
  while true; do
    k=$(flock "$root/queue.lock" bash -c 'k=$(cat "$1"); echo $((k + 1)) > "$1"; echo "$k"' _ "$root/queue.next")
    (( k < ${#queue[@]} )) || return 0
    one "${queue[$k]}"
  done
}

mkdir -p "$root"
sha256sum "$bin" > "$root/mat-train.sha256"
echo 0 > "$root/queue.next"
slot &
slot &
wait
