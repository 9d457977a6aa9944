#!/usr/bin/env bash
# Runs the plan in README.md: full training at the equal-compute budget (18,798 steps) on tuning
# seed 101 with four peak learning rates, then, when the lowest validation loss is not the
# config's 1e-3, full training at that learning rate with MAT's compute on seeds 23, 25, 26, 27, 28
# (full-tuned-sN: the steps of ../mat-vs-full-equal-compute/'s full-equal-sN). One queue, two
# slots side by side, each taking the next run when its last one ends (a test run waits for the
# four tuning runs).
#   bench/results/full-tuned-equal-compute/run.sh MAT_TRAIN OUT_ROOT
# MAT_TRAIN: the mat-train binary the earlier tests used (sha256 99c7589d...); OUT_ROOT: where the
# runs go (OUT_ROOT/NAME, its output in OUT_ROOT/NAME.log).
set -euo pipefail
here=$(realpath "$(dirname "$0")")
bin=$(realpath "$1")
root=$(realpath "$2")
config=$(realpath "$here/../../../examples/bert-wikitext2-regime.yaml")
data=$(realpath "$here/../../../../shared/data/wikitext-2")
common=(--config "$config" --set "data.dir=$data" --set train.threads=1 --set policy.kind=full
        --no-progress)
tuning=(tune-lr0.0014-s101 tune-lr0.002-s101 tune-lr0.0007-s101 tune-lr0.001-s101)
queue=("${tuning[@]}" full-tuned-s23 full-tuned-s25 full-tuned-s26 full-tuned-s27 full-tuned-s28)
TUNING_STEPS=18798

chosen_lr() {  # waits for the four tuning runs; prints the chosen learning rate (or fails)
  local name
  for name in "${tuning[@]}"; do
    while [[ ! -f "$root/$name.done" ]]; do sleep 30; done
  done
  python3 "$here/analyze.py" --chosen-lr "$root" 2>> "$root/choice.log"  # the tuning table
}

one() {  # NAME: tune-lrLR-s101 or full-tuned-sSEED
  local name=$1 seed=${1##*-s} lr steps
  case $name in
    tune-*) lr=${name#tune-lr}; lr=${lr%-s*}; steps=$TUNING_STEPS ;;
    full-tuned-*)
      if ! lr=$(chosen_lr); then
        echo "$name: no learning rate chosen (see $root/choice.log); not run" >&2
        touch "$root/$name.done"
        return
      fi
      if [[ $lr == 0.001 ]]; then  # the config's: full-equal-sN is this run already
        echo "$name: the chosen learning rate is the config's 0.001; not run (README.md)" >&2
        touch "$root/$name.done"
        return
      fi
      if ! steps=$(python3 "$here/analyze.py" --equal-steps "$seed"); then
        echo "$name: no step count (analyze.py --equal-steps failed); not run" >&2
        touch "$root/$name.done"
        return
      fi ;;
  esac
  (cd "$root" && "$bin" "${common[@]}" --set "seed=$seed" --set "train.lr=$lr" \
      --set "train.steps=$steps" --out "$name" > "$name.log" 2>&1) || true
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
if compgen -G "$root/*.done" > /dev/null; then  # an earlier start's runs would pass for these
  echo "run.sh: $root holds runs of an earlier start; give another OUT_ROOT" >&2
  exit 1
fi
sha256sum "$bin" > "$root/mat-train.sha256"
echo 0 > "$root/queue.next"
slot & first=$!
slot & second=$!
rc=0
wait "$first" || rc=$?
wait "$second" || rc=$?
(( rc == 0 )) || echo "run.sh: a slot ended with status $rc: its queue entries may not have run" >&2
exit "$rc"
