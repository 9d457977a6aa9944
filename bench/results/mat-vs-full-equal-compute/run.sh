#!/usr/bin/env bash
# Runs the plan in README.md: MAT with the floor on seeds 27 and 28, full training with MAT's
# compute and its own schedule (full-equal) on seeds 23, 25, 26, 27, 28, then frozen-random
# replaying mat-s27's and mat-s28's decisions. One queue, two slots side by side, each taking the
# next run when its last one ends (a run that needs a MAT run waits for that run's end).
#   bench/results/mat-vs-full-equal-compute/run.sh MAT_TRAIN OUT_ROOT
# MAT_TRAIN: the mat-train binary (the one ../lambda-vs-random and ../mat-vs-full-1nat used,
# sha256 99c7589d...); OUT_ROOT: where the runs go (OUT_ROOT/NAME, its output in OUT_ROOT/NAME.log).
set -euo pipefail
here=$(realpath "$(dirname "$0")")
bin=$(realpath "$1")
root=$(realpath "$2")
config=$(realpath "$here/../../../examples/bert-wikitext2-regime.yaml")
data=$(realpath "$here/../../../../shared/data/wikitext-2")
common=(--config "$config" --set "data.dir=$data" --set train.threads=1
        --set policy.min_active_fraction=0.5 --no-progress)
queue=(mat-s27 mat-s28 full-equal-s23 full-equal-s25 full-equal-s26 full-equal-s27
       full-equal-s28 frozen-random-s27 frozen-random-s28)

mat_dir() {  # SEED: the MAT run of that seed (kept by an earlier test, or new here)
  case $1 in
    21|22|23) echo "$here/../lambda-vs-random/kept-runs/mat-s$1" ;;
    25|26) echo "$here/../mat-vs-full-1nat/kept-runs/mat-s$1" ;;
    *) echo "$root/mat-s$1" ;;
  esac
}

wait_for_mat() {  # SEED: waits for a new MAT run's end; fails when it has no summary
  [[ $1 == 27 || $1 == 28 ]] || return 0
  while [[ ! -f "$root/mat-s$1.done" ]]; do sleep 30; done
  [[ -f "$root/mat-s$1/summary.json" ]]
}

equal_steps() {  # SEED: round(MAT's total FLOPs / full training's FLOPs per step)
  python3 "$here/analyze.py" --equal-steps "$(mat_dir "$1")"
}

one() {  # NAME: kind-sSEED
  local name=$1 kind=${1%-s*} seed=${1##*-s} extra=()
  case $kind in
    mat) ;;
    full-equal|frozen-random)
      if ! wait_for_mat "$seed"; then
        echo "$name: mat-s$seed did not finish; not run" >&2
        touch "$root/$name.done"
        return
      fi
      if [[ $kind == full-equal ]]; then
        extra=(--set policy.kind=full --set "train.steps=$(equal_steps "$seed")")
      else
        extra=(--set policy.kind=frozen-random --set "policy.rand_schedule=mat-s$seed/decisions.jsonl")
      fi ;;
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
