#!/usr/bin/env bash
# The training step on a CUDA machine, short (about 3 minutes on 16 cores): builds mat-bench and
# the CUDA tests against PyTorch's LibTorch (-DMAT_WITH_SERVICE=OFF, prepare.sh), runs the CUDA
# tests (trainer_cuda_test: CPU against CUDA, the optimizer step included; trainer_optimizer_test),
# then our step against the PyTorch peer side by side (bench/step_vs_pytorch.py) on the default
# BERT and on BERT-base, fp32 and bf16, each with its synchronized phases (forward, backward,
# optimizer), then Kineto traces of BERT-base steps, ours and the peer's, compared kernel by
# kernel (bench/gpu/kernels.py).
#
#   bench/gpu/step.sh DEPS_DIR OUT_DIR
#     DEPS_DIR: bench/gpu/deps.sh's folder (.gpudeps).
#     OUT_DIR:  machine.txt, build.log, ctest.log, step.txt (the printed ratios and phases),
#               step-vs-pytorch-{default,base}-{fp32,bf16}.json, kernels.txt and
#               kernels-base-{bf16,fp32}.json (device time by kernel family, ours and the
#               peer's), trace-{ours,peer}-base-{bf16,fp32}.json.gz (the Chrome traces).
#   MAT_STEP_PARTS: which parts, in order (default "tests default base kernels"); a part is
#     tests, default, base (both precisions), default-fp32 ... base-bf16, kernels (both),
#     kernels-bf16, kernels-fp32.
#   MAT_PREBUILT=DIR: use a built tree (check.sh's) instead of configuring and building here.
#   MAT_DEADLINE (epoch seconds, budget.sh): every command ends by then.
#   On the device machine run it through check.sh (MAT_CHECK_PARTS), which packs its files into
#   five: the device tool returns at most 8 files from $OUT, and alone it writes more.
set -euo pipefail
deps_dir=$(readlink -f "${1:?deps dir}")
out=$(readlink -f "${2:?out dir}")
cd "$(dirname "$0")/../.."
mkdir -p "$out"
# shellcheck source=bench/gpu/budget.sh
source bench/gpu/budget.sh
if [ -n "${MAT_PREBUILT:-}" ]; then
  build=$MAT_PREBUILT
  start=$(date +%s)
else
  # shellcheck source=bench/gpu/prepare.sh
  source bench/gpu/prepare.sh
  ninja -C "$build" -k 0 -j "$(nproc)" mat-bench trainer_cuda_test trainer_optimizer_test \
    >> "$out/build.log" 2>&1 || { grep -E -A3 "error" "$out/build.log" | head -n 60; exit 1; }
  echo "build: $(( $(date +%s) - start )) s" | tee -a "$out/machine.txt"
fi

parts=${MAT_STEP_PARTS:-tests default base kernels}
parts=${parts//default-/default_}  # default-fp32 -> default_fp32, so that "default" is whole
parts=${parts//base-/base_}
parts=${parts//kernels-/kernels_}
set +e
failed=0  # the exit status: 1 when any test or comparison failed or was cut short
tests() {
  local rc
  for t in trainer_cuda_test trainer_optimizer_test; do
    within 120 "$build/tests/$t" > "/tmp/$t.log" 2>&1
    rc=$?
    [ "$rc" = 0 ] || failed=1
    echo "$t rc $rc" | tee -a "$out/machine.txt"
    grep -E "^\[ +(OK|SKIPPED|FAILED|PASSED) |Failure|Expected|Which is|actual" "/tmp/$t.log" >> "$out/ctest.log"
  done
  tail -n 25 "$out/ctest.log"
}
compare() {  # MODEL PRECISION: ours against the peer, side by side
  local model=$1 p=$2 config=examples/bert-wikitext2.yaml reps="30 3" json=/tmp/mat-gpu-step
  [ "$model" = base ] && config=examples/bert-base-wikitext2.yaml reps="10 1"
  rm -rf "$json" && mkdir -p "$json"
  echo "== $model $p" | tee -a "$out/step.txt"
  # shellcheck disable=SC2086
  MAT_BUILD_DIR=$build MAT_BENCH_OUT_DIR="$json" MAT_BENCH_CONFIG=$config \
    within 200 python3 bench/step_vs_pytorch.py $reps cuda "$p" 2>&1 | tail -n 3 | tee -a "$out/step.txt"
  cp "$json"/*.json "$out/step-vs-pytorch-$model-$p.json" 2> /dev/null || failed=1
}
# Where the BERT-base step's time goes on the device: Kineto traces of 3 steps of ours and of the
# peer, compared by kernel family (bench/gpu/kernels.py); the traces are kept gzipped.
kernels() {  # PRECISION
  local p=$1
  echo "== kernels base $p" | tee -a "$out/kernels.txt"
  within 120 "$build/bin/mat-bench" step --root . --reps 3 --device cuda --precision "$p" \
    --config examples/bert-base-wikitext2.yaml --out /tmp/mat-trace-step.json \
    --trace "$out/trace-ours-base-$p.json" > /dev/null 2>> "$out/kernels.txt" || { failed=1; return; }
  within 120 python3 bench/peers/bert_step.py --like /tmp/mat-trace-step.json --reps 3 \
    --device cuda --threads 1 --precision "$p" --trace "$out/trace-peer-base-$p.json" \
    > /dev/null 2>> "$out/kernels.txt" || { failed=1; return; }
  python3 bench/gpu/kernels.py "$out/trace-ours-base-$p.json" "$out/trace-peer-base-$p.json" \
    --out "$out/kernels-base-$p.json" 2>&1 | tee -a "$out/kernels.txt"
  [ -f "$out/kernels-base-$p.json" ] || failed=1
  gzip -f "$out/trace-ours-base-$p.json" "$out/trace-peer-base-$p.json"
}
for part in $parts; do
  case $part in
    tests) tests ;;
    default | base) compare "$part" fp32; compare "$part" bf16 ;;
    default_* | base_*) compare "${part%_*}" "${part#*_}" ;;
    kernels) kernels bf16; kernels fp32 ;;
    kernels_*) kernels "${part#*_}" ;;
    *) echo "step.sh: unknown part '$part'" >&2; exit 2 ;;
  esac
done
echo "total: $(( $(date +%s) - start )) s" | tee -a "$out/machine.txt"
exit "$failed"
