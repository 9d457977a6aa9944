#!/usr/bin/env bash
# Runs the plan in README.md: rand2000-sN, a random half of each module group kept for 2,000 steps
# and then re-drawn (policy.kind=rand, rand_fraction 0.5, probe_every 2,000, warmup_steps 0), for
# the config's 24,000 steps on seeds 23, 25, 26, 27, 28, and full-wall-s29 (full training for the
# rand test's 17,996 steps on the pilot's seed, no rule). One queue, two slots side by side, each
# taking the next run when its last one ends.
#   bench/results/rand2000-vs-full-equal-wall/run.sh MAT_TRAIN OUT_ROOT
# MAT_TRAIN: the binary README.md names; OUT_ROOT: where the runs go (OUT_ROOT/NAME, its output in
# OUT_ROOT/NAME.log).
set -euo pipefail
here=$(realpath "$(dirname "$0")")
bin=$(realpath "$1")
root=$(realpath "$2")
config=$(realpath "$here/../../../examples/bert-wikitext2-regime.yaml")
data=$(realpath "$here/../../../../shared/data/wikitext-2")
steps=$(python3 "$here/../rand-vs-full-equal-wall/analyze.py" --wall-steps)
common=(--config "$config" --set "data.dir=$data" --set train.threads=1 --no-progress)
queue=(rand2000-s23 rand2000-s25 rand2000-s26 rand2000-s27 rand2000-s28 full-wall-s29)

one() {  # NAME: rand2000-sSEED or full-wall-sSEED
  local name=$1 seed=${1##*-s} kind
  case $name in
    rand2000-*) kind=(--set policy.kind=rand --set policy.rand_fraction=0.5
                      --set policy.probe_every=2000 --set policy.warmup_steps=0) ;;
    full-wall-*) kind=(--set policy.kind=full --set "train.steps=$steps") ;;
  esac
  (cd "$root" && "$bin" "${common[@]}" "${kind[@]}" --set "seed=$seed" --out "$name" \
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
if [[ -e "$root/queue.next" ]]; then  # an earlier start's runs would pass for these
  echo "run.sh: $root holds runs of an earlier start; give another OUT_ROOT" >&2
  exit 1
fi
sha256sum "$bin" > "$root/mat-train.sha256"
echo 0 > "$root/queue.next"
pids=()
for _ in 1 2; do slot & pids+=($!); done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
(( rc == 0 )) || echo "run.sh: a slot ended with status $rc: its queue entries may not have run" >&2
exit "$rc"
