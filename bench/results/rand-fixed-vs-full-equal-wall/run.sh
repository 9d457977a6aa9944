#!/usr/bin/env bash
# Runs the plan in README.md: randfixed-sN, one random half of each module group drawn at step 0
# and kept for the whole run (policy.kind=rand, rand_fraction 0.5, probe_every 24,000 = the run's
# length, warmup_steps 0), for the config's 24,000 steps on seeds 23, 25, 26, 27, 28. One queue,
# two slots side by side, each taking the next run when its last one ends.
#   bench/results/rand-fixed-vs-full-equal-wall/run.sh MAT_TRAIN OUT_ROOT
# MAT_TRAIN: the binary README.md names; OUT_ROOT: where the runs go (OUT_ROOT/NAME, its output in
# OUT_ROOT/NAME.log).
set -euo pipefail
here=$(realpath "$(dirname "$0")")
bin=$(realpath "$1")
root=$(realpath "$2")
config=$(realpath "$here/../../../examples/bert-wikitext2-regime.yaml")
data=$(realpath "$here/../../../../shared/data/wikitext-2")
common=(--config "$config" --set "data.dir=$data" --set train.threads=1 --no-progress)
queue=(randfixed-s23 randfixed-s25 randfixed-s26 randfixed-s27 randfixed-s28)

one() {  # NAME: randfixed-sSEED
  local name=$1 seed=${1##*-s} kind
  case $name in
    randfixed-*) kind=(--set policy.kind=rand --set policy.rand_fraction=0.5
                      --set policy.probe_every=24000 --set policy.warmup_steps=0) ;;
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
