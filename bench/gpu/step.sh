#!/usr/bin/env bash
# The training step on a CUDA machine, short (about 3 minutes on 16 cores): builds mat-bench and
# the CUDA tests against PyTorch's LibTorch (-DMAT_WITH_SERVICE=OFF, prepare.sh), runs the CUDA
# tests (trainer_cuda_test: CPU against CUDA, the optimizer step included; trainer_optimizer_test),
# then our step against the PyTorch peer side by side (bench/step_vs_pytorch.py) on the default
# BERT and on BERT-base, fp32 and bf16, each with its synchronized phases (forward, backward,
# optimizer).
#
#   bench/gpu/step.sh DEPS_DIR OUT_DIR
#     DEPS_DIR: bench/gpu/deps.sh's folder (.gpudeps).
#     OUT_DIR:  machine.txt, build.log, ctest.log, step.txt (the printed ratios and phases),
#               step-vs-pytorch-{default,base}-{fp32,bf16}.json.
set -euo pipefail
deps_dir=$(readlink -f "${1:?deps dir}")
out=$(readlink -f "${2:?out dir}")
cd "$(dirname "$0")/../.."
mkdir -p "$out"
# shellcheck source=bench/gpu/prepare.sh
source bench/gpu/prepare.sh
ninja -C "$build" -k 0 -j "$(nproc)" mat-bench trainer_cuda_test trainer_optimizer_test \
  >> "$out/build.log" 2>&1 || { grep -E -A3 "error" "$out/build.log" | head -n 60; exit 1; }
echo "build: $(( $(date +%s) - start )) s" | tee -a "$out/machine.txt"

set +e
for t in trainer_cuda_test trainer_optimizer_test; do
  timeout 120 "$build/tests/$t" > "/tmp/$t.log" 2>&1
  echo "$t rc $?" | tee -a "$out/machine.txt"
  grep -E "^\[ +(OK|SKIPPED|FAILED|PASSED) |Failure|Expected|Which is|actual" "/tmp/$t.log" >> "$out/ctest.log"
done
tail -n 25 "$out/ctest.log"
json=/tmp/mat-gpu-step
for model in default base; do
  config=examples/bert-wikitext2.yaml reps="30 3"
  [ "$model" = base ] && config=examples/bert-base-wikitext2.yaml reps="10 1"
  for p in fp32 bf16; do
    rm -rf "$json" && mkdir -p "$json"
    echo "== $model $p" | tee -a "$out/step.txt"
    # shellcheck disable=SC2086
    MAT_BUILD_DIR=$build MAT_BENCH_OUT_DIR="$json" MAT_BENCH_CONFIG=$config \
      timeout 200 python3 bench/step_vs_pytorch.py $reps cuda "$p" 2>&1 | tail -n 3 | tee -a "$out/step.txt"
    cp "$json"/*.json "$out/step-vs-pytorch-$model-$p.json" 2> /dev/null
  done
done
echo "total: $(( $(date +%s) - start )) s" | tee -a "$out/machine.txt"
