#!/usr/bin/env bash
# The whole CUDA check in one lease, within a time budget (issue 23, item 4), for a machine with
# PyTorch (its LibTorch) and CUDA but none of this project's Debian packages (Ubuntu 24.04 + pip
# PyTorch): builds everything once against PyTorch's LibTorch with -DMAT_WITH_SERVICE=ON (gRPC,
# protobuf, SQLite, libsystemd and Gloo's headers from Debian 12 .debs in a private prefix:
# deps.sh, prepare.sh), then runs its parts most important first, each stopped at the budget:
#
#   tests          the CUDA tests (ctest label gpu: CPU against CUDA in fp32 and bf16, the
#                  optimizer; NCCL all-reduce; Gloo with two ranks on one GPU) and a few CPU ones
#   step-base      our step against the PyTorch peer on BERT-base, fp32 and bf16 (step.sh)
#   service        a coordinator and a CUDA worker on loopback, a MAT job through matctl checked
#                  against mat-train, then two workers on the one GPU over Gloo (service.sh)
#   gram           the gram probe's share of training time (mat-bench spectral-cost), default
#                  BERT in fp32 and BERT-base in bf16
#   kernels-bf16   Kineto traces of BERT-base steps, ours and the peer's, by kernel family
#   step-default   the step against the peer on the default BERT, fp32 and bf16
#   kernels-fp32   the same traces in fp32
#   extra          masked backward, the matmul peak, the estimators compared (spectral-compare)
#
#   bench/gpu/check.sh DEPS_DIR OUT_DIR [BUDGET_SECONDS]   (default 450: 7.5 minutes)
#     DEPS_DIR: bench/gpu/deps.sh's folder (.gpudeps).
#     OUT_DIR:  five files, as the device tool returns at most 8 from its $OUT:
#               machine.txt (card, versions, each part's time), parts.json (each part: rc or
#               "skipped", seconds), results.json (every JSON result by name: step-vs-pytorch-*,
#               service, kernels-base-*, spectral-cost-*, ...), logs.tar.gz (the parts' own
#               files: ctest.log, step.txt, service.log, kernels.txt, bench.txt, build.log and
#               the JSONs) and traces.tar (the Kineto traces, gzipped).
#     The parts write into /tmp/mat-gpu-check first; OUT_DIR is filled on any exit.
#   MAT_CHECK_PARTS: the parts to run, in order (default: all, as listed).
#   MAT_PREBUILT=DIR: a built tree instead of the prefix and the build (to try the script).
# A part that would start with under 15 s left is recorded as skipped; one cut by the budget
# keeps what it wrote. Everything written so far is merged into results.json on any exit. Exit
# status 1 when a part failed.
set -euo pipefail
deps_dir=$(readlink -f "${1:?deps dir}")
final=$(readlink -f "${2:?out dir}")
budget=${3:-450}
cd "$(dirname "$0")/../.."
out=/tmp/mat-gpu-check
rm -rf "$out" && mkdir -p "$out" "$final"
MAT_DEADLINE=$(( $(date +%s) + budget ))
export MAT_DEADLINE
# shellcheck source=bench/gpu/budget.sh
source bench/gpu/budget.sh
json=/tmp/mat-gpu-json
rm -rf "$json" "$out/parts.jsonl" && mkdir -p "$json"

merge() {
  set +e
  python3 - "$json" "$out" <<'PY'
import json, os, sys
src, out = sys.argv[1], sys.argv[2]
d = {}
for folder in (src, out):
    for f in sorted(os.listdir(folder)):
        if f.endswith(".json") and f not in ("results.json", "parts.json") and not f.startswith("trace-"):
            try:
                d[f[:-5]] = json.load(open(os.path.join(folder, f)))
            except ValueError as e:
                d[f[:-5]] = {"unreadable": str(e)}
parts = [json.loads(l) for l in open(os.path.join(out, "parts.jsonl"))] \
    if os.path.exists(os.path.join(out, "parts.jsonl")) else []
json.dump(parts, open(os.path.join(out, "parts.json"), "w"), indent=1)
json.dump(d, open(os.path.join(out, "results.json"), "w"), indent=1)
PY
  cp "$out/machine.txt" "$out/parts.json" "$out/results.json" "$final/" 2> /dev/null
  (cd "$out" && tar czf "$final/logs.tar.gz" --exclude='trace-*' ./*)
  (cd "$out" && ls trace-* > /dev/null 2>&1 && tar cf "$final/traces.tar" trace-*)
  ls -l "$final"
}
trap merge EXIT

tests="trainer_cuda_test trainer_optimizer_test trainer_grad_sync_test trainer_autocast_test
  spectral_estimator_test trainer_masked_backward_test trainer_flops_test policy_test"
if [ -n "${MAT_PREBUILT:-}" ]; then
  # A built tree (e.g. build/ on a CPU machine, to try the parts and the budget without a GPU).
  build=$MAT_PREBUILT
  start=$(date +%s)
  git log -1 --format='commit %h %s' > "$out/machine.txt"
else
  # The prefix, machine.txt and the configure of build-gpu, with the service.
  service=ON
  # shellcheck source=bench/gpu/prepare.sh
  source bench/gpu/prepare.sh
  g++ --version | sed -n 1p | tee -a "$out/machine.txt"
  grep -E "^(MAT_NCCL_INCLUDE_DIR|MAT_GLOO_INCLUDE_DIR|MAT_GLOO_HEADERS_FIT|MAT_HAVE_KINETO_API)" \
    "$build/CMakeCache.txt" | tee -a "$out/machine.txt" || true
  # shellcheck disable=SC2086
  within 300 ninja -C "$build" -k 0 -j "$(nproc)" mat-coordinator mat-worker matctl mat-train \
    mat-bench $tests >> "$out/build.log" 2>&1 \
    || { grep -E -A3 "error|Error" "$out/build.log" | head -n 60; exit 1; }
  echo "build: $(( $(date +%s) - start )) s" | tee -a "$out/machine.txt"
fi
set +e

part() {  # NAME FUNCTION: runs one part unless the budget is spent; its rc and time to parts.jsonl
  local name=$1 t0 rc
  t0=$(date +%s)
  if [ "$(seconds_left)" -lt "${MAT_MIN_SECONDS:-15}" ]; then
    rc='"skipped"'
  else
    "$2"
    rc=$?
  fi
  echo "{\"part\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - t0 ))}" >> "$out/parts.jsonl"
  echo "part $name: rc $rc, $(( $(date +%s) - t0 )) s, $(seconds_left) s left" | tee -a "$out/machine.txt"
}
bench() {  # TAG ARGS...: mat-bench on cuda, its JSON into $json/TAG.json
  local tag=$1
  shift
  echo "== $tag" | tee -a "$out/bench.txt"
  within 240 "$build/bin/mat-bench" "$@" --root . --device cuda --out "$json/$tag.json" 2>&1 \
    | grep -v '^ \|^{\|^}' | tee -a "$out/bench.txt"
}
step_parts() { MAT_PREBUILT=$build MAT_STEP_PARTS=$1 bash bench/gpu/step.sh "$deps_dir" "$out"; }

run_tests() {
  local names
  # shellcheck disable=SC2086
  names=$(printf '%s|' $tests)
  # -V: every test's own output, so the log shows which CUDA cases ran and which were skipped.
  (cd "$build" && within 150 ctest -V -R "^(${names%|})\$") > "$out/ctest.log" 2>&1
  local rc=$?
  grep -E "\[ +(SKIPPED|FAILED) +\]|tests passed|tests failed|Test +#" "$out/ctest.log" | tail -n 40
  return $rc
}
run_step_base() { step_parts base; }
run_service() { MAT_PREBUILT=$build MAT_STEP_BENCH=0 bash bench/gpu/service.sh "$deps_dir" "$out" 300; }
run_gram() {
  bench spectral-cost-cuda-fp32 spectral-cost --reps 20 --data-dir "$deps_dir/wikitext-2"
  bench spectral-cost-cuda-bf16-base spectral-cost --reps 10 --precision bf16 \
    --config examples/bert-base-wikitext2.yaml --data-dir "$deps_dir/wikitext-2"
}
run_kernels_bf16() { step_parts kernels-bf16; }
run_step_default() { step_parts default; }
run_kernels_fp32() { step_parts kernels-fp32; }
run_extra() {
  bench masked-backward-cuda-fp32 masked-backward --reps 20
  bench masked-backward-cuda-bf16 masked-backward --reps 20 --precision bf16
  bench matmul-peak-cuda-bf16-base matmul-peak --reps 10 --precision bf16 \
    --config examples/bert-base-wikitext2.yaml
  bench spectral-compare-cuda spectral-compare --reps 3 --data-dir "$deps_dir/wikitext-2"
}

for p in ${MAT_CHECK_PARTS:-tests step-base service gram kernels-bf16 step-default kernels-fp32 extra}; do
  fn=run_${p//-/_}
  if ! declare -F "$fn" > /dev/null; then echo "check.sh: unknown part '$p'" >&2; exit 2; fi
  part "$p" "$fn"
done
echo "total: $(( $(date +%s) - start )) s" | tee -a "$out/machine.txt"
# Exit status 1 when a part failed (parts.json says which; a part skipped for time is not a failure).
! grep -qv '"rc": \(0\|"skipped"\)' "$out/parts.jsonl"
