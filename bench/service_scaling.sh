#!/usr/bin/env bash
# bench/run service-scaling [STEPS]: the tiny example job through the real service with 1 worker
# and with 2 workers (data-parallel ranks), side by side on this machine: one coordinator, the
# workers share the machine's cores (1 worker: all cores; 2 workers: half each). Records the
# job's end-to-end time (submit -> SUCCEEDED), the rank-0 training wall time from the summary,
# the best validation loss and the all-reduce bytes. Writes bench/results/service-scaling.json.
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-1000}
bin=build/bin
tmp=$(mktemp -d /tmp/mat-scaling-XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  [[ -n "${MAT_KEEP:-}" ]] || rm -rf "$tmp"
}
trap cleanup EXIT

"$bin/mat-coordinator" --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --state-dir "$tmp/state" \
  >"$tmp/coordinator.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do [[ -s "$tmp/state/coordinator.addr" ]] && break; sleep 0.1; done
addr=$(cat "$tmp/state/coordinator.addr")
cores=$(nproc)

run() {  # run WORKERS: sets $seconds and $job
  local n=$1 threads=$(( cores / $1 )) wpids=()
  (( threads >= 1 )) || threads=1
  for i in $(seq "$n"); do
    "$bin/mat-worker" --coordinator "$addr" --work-dir "$tmp/w$n-$i" --threads "$threads" \
      >"$tmp/w$n-$i.log" 2>&1 &
    wpids+=($!)
    pids+=($!)
  done
  sed -e "s/^  workers: .*/  workers: $n/" -e "s/^  steps: .*/  steps: $steps/" \
    examples/bert-wikitext2-tiny.yaml >"$tmp/job$n.yaml"
  local t0 t1
  t0=$(date +%s.%N)
  "$bin/matctl" --coordinator "$addr" submit "$tmp/job$n.yaml" --wait --no-progress >"$tmp/submit$n.out"
  job=$(head -1 "$tmp/submit$n.out")
  t1=$(date +%s.%N)
  for pid in "${wpids[@]}"; do kill -TERM "$pid"; wait "$pid" || true; done
  seconds=$(python3 -c "print($t1 - $t0)")
}

run 1
s1=$seconds job1=$job
run 2
s2=$seconds job2=$job
"$bin/matctl" --coordinator "$addr" status "$job1" -o json >"$tmp/s1.json"
"$bin/matctl" --coordinator "$addr" status "$job2" -o json >"$tmp/s2.json"
mkdir -p bench/results
python3 - "$tmp/s1.json" "$tmp/s2.json" "$s1" "$s2" "$cores" "$steps" <<'EOF'
import json, sys
s1, s2 = (json.load(open(p)) for p in sys.argv[1:3])
e1, e2, cores, steps = float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
def row(s, e, n):
    m = s["summary"] or {}
    return {"workers": n, "state": s["state"], "end_to_end_seconds": e,
            "rank0_train_wall_seconds": m.get("wall_seconds"), "best_val_loss": m.get("best_val_loss"),
            "allreduce_bytes": m.get("allreduce_bytes", 0),
            "param_checksums": [r.get("param_checksum") for r in s.get("ranks", [])]}
out = {"bench": "service-scaling", "config": "examples/bert-wikitext2-tiny.yaml", "steps": steps,
       "cores": cores, "threads_per_worker": {"1": cores, "2": max(1, cores // 2)},
       "one_worker": row(s1, e1, 1), "two_workers": row(s2, e2, 2),
       "end_to_end_ratio_2_over_1": e2 / e1}
json.dump(out, open("bench/results/service-scaling.json", "w"), indent=2)
print(f"1 worker : {e1:7.1f} s end to end, best val {out['one_worker']['best_val_loss']}")
print(f"2 workers: {e2:7.1f} s end to end, best val {out['two_workers']['best_val_loss']}, "
      f"all-reduce {out['two_workers']['allreduce_bytes']/1e9:.2f} GB")
print(f"ratio 2/1: {out['end_to_end_ratio_2_over_1']:.3f} (cores {cores})")
EOF
