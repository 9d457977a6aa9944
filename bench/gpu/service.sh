#!/usr/bin/env bash
# The whole service on a CUDA machine (issue 23, item 2): builds mat-coordinator, mat-worker,
# matctl, mat-train and mat-bench against PyTorch's CUDA LibTorch with -DMAT_WITH_SERVICE=ON (gRPC,
# protobuf, SQLite and libsystemd from Debian 12 .debs in a private prefix: prepare.sh), starts a
# coordinator and one CUDA worker (--device cuda:0) on loopback, submits a MAT job (the tiny BERT
# of examples/bert-wikitext2-tiny.yaml, STEPS steps, train.deterministic) with matctl and waits
# for it; runs the same config through mat-train --set train.device=cuda:0; compares the two
# (every evaluation's losses, every decision's mask, the parameter checksum); then the step
# against the PyTorch peer on BERT-base (fp32 and bf16) in the same lease (MAT_STEP_BENCH=0 skips
# it).
#
# Then two ranks on the same GPU: a second CUDA worker joins and a job of 2 workers runs with
# Gloo (NCCL refuses two ranks on one device; the workers' process groups choose Gloo for ranks
# that share a GPU, trainer/grad_sync.h ResolveBackend). It must succeed with both ranks ending on
# the same parameters. MAT_TWO_RANKS=0 skips it.
#
#   bench/gpu/service.sh DEPS_DIR OUT_DIR [STEPS]   (STEPS default 300)
#     DEPS_DIR: bench/gpu/deps.sh's folder (.gpudeps).
#     OUT_DIR:  service.json (state, device, equal_to_mat_train, wall_seconds, the overhead
#               against mat-train, two_ranks: {state, backend, ranks_equal, wall_seconds},
#               step_vs_pytorch_worst_ratio), machine.txt, build.log,
#               service.log (the daemons' and matctl's output), step-vs-pytorch-*.json.
# service.json is written also when a step fails or the time runs out, with what is known. Exit
# status 0 when the job equalled mat-train and the two ranks (when run) agreed.
# MAT_DEADLINE (epoch seconds, budget.sh): every command ends by then.
# On the device machine run it through check.sh (MAT_CHECK_PARTS), which packs its files into
# five: the device tool returns at most 8 files from $OUT, and alone it writes more.
set -euo pipefail
deps_dir=$(readlink -f "${1:?deps dir}")
out=$(readlink -f "${2:?out dir}")
steps=${3:-300}
cd "$(dirname "$0")/../.."
mkdir -p "$out"
# shellcheck source=bench/gpu/budget.sh
source bench/gpu/budget.sh
work=/tmp/mat-gpu-service
rm -rf "$work" && mkdir -p "$work"
echo '{}' > "$work/result.json"
note() {  # KEY JSON-VALUE: one field of service.json
  python3 - "$work/result.json" "$1" "$2" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); d[sys.argv[2]] = json.loads(sys.argv[3])
json.dump(d, open(sys.argv[1], "w"), indent=1)
PY
}
pids=()
finish() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2> /dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2> /dev/null || true; done
  cp "$work/result.json" "$out/service.json"
  for f in coordinator.err worker.err worker2.err matctl.out mat-train.err; do
    [ -f "$work/$f" ] && { echo "== $f"; tail -n 40 "$work/$f"; } >> "$out/service.log"
  done
  cat "$out/service.json"; echo
}
trap finish EXIT

# MAT_PREBUILT=DIR (a built tree) and MAT_DEVICE=cpu try the script's service part on a machine
# without a GPU; the defaults build here and use cuda:0.
device=${MAT_DEVICE:-cuda:0}
if [ -n "${MAT_PREBUILT:-}" ]; then
  build=$MAT_PREBUILT
  start=$(date +%s)
else
  service=ON
  # shellcheck source=bench/gpu/prepare.sh
  source bench/gpu/prepare.sh
  ninja -C "$build" -k 0 -j "$(nproc)" mat-coordinator mat-worker matctl mat-train mat-bench \
    >> "$out/build.log" 2>&1 || { grep -E -A3 "error" "$out/build.log" | head -n 60; exit 1; }
  echo "build: $(( $(date +%s) - start )) s" | tee -a "$out/machine.txt"
  note build_seconds "$(( $(date +%s) - start ))"
fi
bin=$build/bin

# The job: the tiny BERT, one rank on cuda:0, deterministic kernels so that two runs can be equal.
python3 - "$deps_dir/wikitext-2" "$steps" "$work" "$device" <<'PY'
import sys, yaml
data, steps, work, device = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
c = yaml.safe_load(open("examples/bert-wikitext2-tiny.yaml"))
c["data"]["dir"] = data
c["train"].update(steps=steps, eval_every=max(1, steps // 3), eval_batches=5, deterministic=True)
c["policy"]["warmup_steps"] = max(1, steps // 3)
c.pop("resources")
local = dict(c, train=dict(c["train"], device=device))
yaml.safe_dump(local, open(work + "/local.yaml", "w"))
c["resources"] = {"workers": 1, "device": "cpu" if device == "cpu" else "cuda"}
yaml.safe_dump(c, open(work + "/job.yaml", "w"))
c["resources"]["workers"] = 2  # batch 16 and probe_samples 8: 8 samples a rank
yaml.safe_dump(c, open(work + "/job2.yaml", "w"))
PY

"$bin/mat-coordinator" --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --state-dir "$work/state" \
  > "$work/coordinator.out" 2> "$work/coordinator.err" &
pids+=($!)
for _ in $(seq 100); do [ -s "$work/state/coordinator.addr" ] && break; sleep 0.1; done
addr=$(cat "$work/state/coordinator.addr")
"$bin/mat-worker" --coordinator "$addr" --work-dir "$work/w1" --device "$device" \
  > "$work/worker.out" 2> "$work/worker.err" &
pids+=($!)
# submit_and_wait TAG JOB_YAML: matctl submit --wait, then the job's status into
# $work/status-TAG.json; sets job (its id), submit_rc and job_seconds (submit to the end).
submit_and_wait() {
  local t0 t1
  t0=$(date +%s.%N)
  set +e
  within 300 "$bin/matctl" --coordinator "$addr" submit "$2" --wait --no-progress \
    > "$work/submit-$1.out" 2>> "$work/matctl.out"
  submit_rc=$?
  job=$(head -n 1 "$work/submit-$1.out")
  t1=$(date +%s.%N)
  "$bin/matctl" --coordinator "$addr" status "$job" -o json > "$work/status-$1.json" 2>> "$work/matctl.out"
  set -e
  job_seconds=$(python3 -c "print($t1 - $t0)")
}
submit_and_wait one "$work/job.yaml"
note submit_exit_code "$submit_rc"
note job_wall_seconds "$job_seconds"
python3 - "$work/status-one.json" "$work/result.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[2]))
try:
    s = json.load(open(sys.argv[1]))
except Exception as e:
    s = {"state": "UNKNOWN (%s)" % e}
r["state"] = s.get("state")
summary = s.get("summary") or {}
r["device"] = summary.get("device")
r["wall_seconds"] = summary.get("wall_seconds")
r["param_checksum_service"] = (s.get("ranks") or [{}])[0].get("param_checksum")
json.dump(r, open(sys.argv[2], "w"), indent=1)
PY
echo "service: job $job $(python3 -c "import json; print(json.load(open('$work/result.json'))['state'])")"

# The same config alone.
t0=$(date +%s.%N)
set +e
within 300 "$bin/mat-train" --config "$work/local.yaml" --out "$work/local" --no-progress \
  > "$work/mat-train.out" 2> "$work/mat-train.err"
echo "mat-train rc $?"
set -e
t1=$(date +%s.%N)
note mat_train_process_seconds "$(python3 -c "print($t1 - $t0)")"

python3 - "$work" "$job" "$work/result.json" <<'PY'
import json, os, sys
work, job, res = sys.argv[1], sys.argv[2], sys.argv[3]
r = json.load(open(res))
def lines(p):
    return [json.loads(l) for l in open(p) if l.strip()] if os.path.exists(p) else []
rank0 = os.path.join(work, "w1", "jobs", job, "rank0")
svc, alone = lines(rank0 + "/metrics.jsonl"), lines(work + "/local/metrics.jsonl")
masks, decisions = lines(rank0 + "/masks.jsonl"), lines(work + "/local/decisions.jsonl")
local = json.load(open(work + "/local/summary.json")) if os.path.exists(work + "/local/summary.json") else {}
keys = ("step", "train_loss", "val_loss", "test_loss")
losses_equal = bool(svc) and len(svc) == len(alone) and all(
    a.get(k) == b.get(k) for a, b in zip(svc, alone) for k in keys)
masks_equal = bool(masks) and len(masks) == len(decisions) and all(
    m["step"] == d["step"] and m["every_step"] == [1 if x["active"] else 0 for x in d["modules"]]
    for m, d in zip(masks, decisions))
r["param_checksum_mat_train"] = local.get("param_checksum")
checksum_equal = bool(local.get("param_checksum")) and local.get("param_checksum") == r.get("param_checksum_service")
r.update(evaluations=len(svc), decisions=len(masks), losses_equal=losses_equal,
         masks_equal=masks_equal, checksum_equal=checksum_equal,
         equal_to_mat_train=losses_equal and masks_equal and checksum_equal,
         mat_train_wall_seconds=local.get("wall_seconds"), mat_train_device=local.get("device"))
if not losses_equal:
    r["loss_rows"] = {"service": svc[:4], "mat_train": alone[:4]}
if r.get("wall_seconds") and local.get("wall_seconds"):
    # Training wall time of the rank against mat-train's (both exclude process start), and the
    # whole submit-to-SUCCEEDED time against mat-train's process time.
    r["service_overhead_ratio"] = r["wall_seconds"] / local["wall_seconds"]
    r["end_to_end_over_mat_train_process"] = r["job_wall_seconds"] / r["mat_train_process_seconds"]
json.dump(r, open(res, "w"), indent=1)
print("equal_to_mat_train", r["equal_to_mat_train"], "losses", losses_equal, "masks", masks_equal,
      "checksum", checksum_equal)
PY

# Two ranks on one device: a second worker on the same device, a job of 2 workers.
if [ "${MAT_TWO_RANKS:-1}" != 0 ] && [ "$(seconds_left)" -lt 30 ]; then
  note two_ranks '"skipped for time"'
elif [ "${MAT_TWO_RANKS:-1}" != 0 ]; then
  "$bin/mat-worker" --coordinator "$addr" --work-dir "$work/w2" --device "$device" \
    > "$work/worker2.out" 2> "$work/worker2.err" &
  pids+=($!)
  submit_and_wait two "$work/job2.yaml"
  python3 - "$work/status-two.json" "$work/result.json" "$job_seconds" \
    "$work/worker.err" "$work/worker2.err" <<'PY'
import json, re, sys
r = json.load(open(sys.argv[2]))
try:
    s = json.load(open(sys.argv[1]))
except Exception as e:
    s = {"state": "UNKNOWN (%s)" % e}
ranks = s.get("ranks") or []
sums = [k.get("param_checksum") for k in ranks]
backends = set()
for log in sys.argv[4:]:
    # RankRunner: "job-... rank N: process group of 2 ranks over gloo"
    backends.update(re.findall(r"process group of 2 ranks over (\w+)", open(log).read()))
r["two_ranks"] = {
    "state": s.get("state"), "job_wall_seconds": float(sys.argv[3]),
    "wall_seconds": (s.get("summary") or {}).get("wall_seconds"),
    "backend": ",".join(sorted(backends)) or None, "param_checksums": sums,
    "ranks_equal": len(sums) == 2 and bool(sums[0]) and sums[0] == sums[1]}
json.dump(r, open(sys.argv[2], "w"), indent=1)
print("two ranks:", json.dumps(r["two_ranks"]))
PY
fi

for pid in "${pids[@]}"; do kill -TERM "$pid" 2> /dev/null || true; done

# The step against the PyTorch peer on BERT-base, fp32 and bf16, in this lease.
set +e
precisions="fp32 bf16"
[ "${MAT_STEP_BENCH:-1}" = 0 ] && precisions=""
for p in $precisions; do
  mkdir -p "$work/step-$p"
  MAT_BUILD_DIR=$build MAT_BENCH_OUT_DIR="$work/step-$p" MAT_BENCH_CONFIG=examples/bert-base-wikitext2.yaml \
    within 200 python3 bench/step_vs_pytorch.py 10 1 "${device%%:*}" "$p" 2>&1 | tail -n 3
  cp "$work/step-$p"/*.json "$out/step-vs-pytorch-base-$p.json" 2> /dev/null
done
set -e
python3 - "$out" "$work/result.json" <<'PY'
import glob, json, sys
r = json.load(open(sys.argv[2]))
ratios = {}
for f in glob.glob(sys.argv[1] + "/step-vs-pytorch-base-*.json"):
    d = json.load(open(f))
    ratios[d["precision"]] = d["ratio_ours_over_peer"]
r["step_vs_pytorch_ratios"] = ratios
r["step_vs_pytorch_worst_ratio"] = max(ratios.values()) if ratios else None
json.dump(r, open(sys.argv[2], "w"), indent=1)
PY
echo "total: $(( $(date +%s) - start )) s" | tee -a "$out/machine.txt"
# The exit status: 0 only when the job succeeded and equalled mat-train, and the two-rank job (when
# run) succeeded with equal ranks.
python3 - "$work/result.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
two = r.get("two_ranks", {"state": "SUCCEEDED", "ranks_equal": True})  # absent: MAT_TWO_RANKS=0
ok = r.get("state") == "SUCCEEDED" and r.get("equal_to_mat_train") and isinstance(two, dict) \
    and two.get("state") == "SUCCEEDED" and two.get("ranks_equal")
sys.exit(0 if ok else 1)
PY
