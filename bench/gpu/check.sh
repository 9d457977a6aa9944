#!/usr/bin/env bash
# The CUDA check, for a machine with PyTorch (its LibTorch) and CUDA but without gRPC, SQLite or
# the Debian libraries (Ubuntu 24.04 + pip PyTorch): builds the one-process trainer and the
# gradient sync (NCCL) against PyTorch's LibTorch with -DMAT_WITH_SERVICE=OFF, runs the CUDA
# tests (ctest label gpu: CPU against CUDA in fp32 and bf16, NCCL all-reduce) and a few CPU unit
# tests, then the benchmarks on the GPU: masked backward, the gram probe's cost, the matmul peak
# and the step's fraction of it (fp32 and bf16), the step against the PyTorch peer (fp32, bf16)
# on the default BERT and on a BERT-base shape, and the estimators compared (spectral-compare).
#
#   bench/gpu/check.sh DEPS_DIR OUT_DIR
#     DEPS_DIR: Debian 12 .deb files of abseil, yaml-cpp, CLI11, nlohmann-json, liblzma, gtest,
#               gmock, spdlog, fmt (extracted into a private prefix, never into /), and a
#               wikitext-2/ folder with the corpus.
#     OUT_DIR:  machine.txt (card, versions, timings), ctest.log, bench.txt (the printed tables),
#               results.json (every benchmark's JSON by name), build.log on a build failure.
# Everything in under 8 minutes on 16 cores.
set -euo pipefail
deps_dir=$(readlink -f "${1:?deps dir}")
out=$(readlink -f "${2:?out dir}")
cd "$(dirname "$0")/../.."
mkdir -p "$out"
json=/tmp/mat-gpu-json
rm -rf "$json" && mkdir -p "$json"
# The prefix, machine.txt and the configure of build-gpu (-DMAT_WITH_SERVICE=OFF).
# shellcheck source=bench/gpu/prepare.sh
source bench/gpu/prepare.sh
g++ --version | sed -n 1p | tee -a "$out/machine.txt"

# Every benchmark's JSON into one file, also when a step fails or the time runs out.
merge() {
  python3 - "$json" "$out/results.json" <<'PY'
import json, os, sys
d = {f[:-5]: json.load(open(os.path.join(sys.argv[1], f)))
     for f in sorted(os.listdir(sys.argv[1])) if f.endswith(".json")}
json.dump(d, open(sys.argv[2], "w"), indent=1)
PY
}
trap merge EXIT

grep -E "NCCL|Gloo|nccl" build-gpu/CMakeCache.txt | grep -v "^//" | tee -a "$out/machine.txt" || true
targets="trainer_cuda_test trainer_autocast_test spectral_estimator_test trainer_masked_backward_test
  trainer_flops_test policy_test mat-train mat-bench"
# shellcheck disable=SC2086
ninja -C build-gpu -k 0 -j "$(nproc)" $targets >> "$out/build.log" 2>&1 \
  || { grep -E "error|Error" "$out/build.log" | head -n 40; exit 1; }
# The NCCL gradient sync: reported, not fatal, so the rest of the check still runs.
ninja -C build-gpu -t targets all > /tmp/mat-gpu-targets.txt  # (grep -q in a pipe: SIGPIPE)
if grep -q '^trainer_grad_sync_test:' /tmp/mat-gpu-targets.txt; then
  ninja -C build-gpu -j "$(nproc)" trainer_grad_sync_test > /tmp/mat-grad-sync-build.log 2>&1 \
    && echo "grad sync (NCCL): built" | tee -a "$out/machine.txt" \
    || { echo "grad sync (NCCL): BUILD FAILED" | tee -a "$out/machine.txt";
         grep -E -A3 "error" /tmp/mat-grad-sync-build.log | head -n 40 | tee -a "$out/machine.txt"; }
else
  echo "grad sync: no target (neither Gloo nor NCCL found)" | tee -a "$out/machine.txt"
fi
echo "build: $(( $(date +%s) - start )) s" | tee -a "$out/machine.txt"

set +e
(cd build-gpu && ctest --output-on-failure \
  -R 'trainer_cuda_test|trainer_autocast_test|trainer_grad_sync_test|spectral_estimator_test|trainer_masked_backward_test|trainer_flops_test|policy_test') \
  > "$out/ctest.log" 2>&1
echo "ctest rc $?" | tee -a "$out/machine.txt"
for t in trainer_cuda_test trainer_grad_sync_test; do
  [ -x "build-gpu/tests/$t" ] && "build-gpu/tests/$t" 2>&1 | grep -E "^\[ +(OK|SKIPPED|FAILED|PASSED) " >> "$out/ctest.log"
done
tail -n 30 "$out/ctest.log"
echo "tests: $(( $(date +%s) - start )) s" | tee -a "$out/machine.txt"

bench() {  # NAME ARGS...: mat-bench NAME on cuda, JSON into $json/NAME-<suffix>.json
  local tag=$1; shift
  echo "== $tag" | tee -a "$out/bench.txt"
  timeout 240 build-gpu/bin/mat-bench "$@" --root . --device cuda --out "$json/$tag.json" 2>&1 \
    | grep -v '^ \|^{\|^}' | tee -a "$out/bench.txt"
}
bench masked-backward-cuda-fp32 masked-backward --reps 20
bench masked-backward-cuda-bf16 masked-backward --reps 20 --precision bf16
bench spectral-cost-cuda-fp32 spectral-cost --reps 20 --data-dir "$deps_dir/wikitext-2"
bench matmul-peak-cuda-fp32 matmul-peak --reps 20
bench matmul-peak-cuda-bf16 matmul-peak --reps 20 --precision bf16
for p in fp32 bf16; do
  echo "== step-vs-pytorch-cuda-$p" | tee -a "$out/bench.txt"
  MAT_BUILD_DIR=build-gpu MAT_BENCH_OUT_DIR="$json" timeout 240 \
    python3 bench/step_vs_pytorch.py 30 3 cuda "$p" 2>&1 | tee -a "$out/bench.txt"
done
# A BERT-base shape (12 x 768), where the GPU is not launch-bound: fraction of the bf16 matmul
# peak, and against the peer.
bench matmul-peak-cuda-bf16-base matmul-peak --reps 10 --precision bf16 \
  --config examples/bert-base-wikitext2.yaml
for p in bf16 fp32; do
  echo "== step-vs-pytorch-cuda-$p-base" | tee -a "$out/bench.txt"
  MAT_BUILD_DIR=build-gpu MAT_BENCH_OUT_DIR="$json" MAT_BENCH_CONFIG=examples/bert-base-wikitext2.yaml \
    timeout 240 python3 bench/step_vs_pytorch.py 10 1 cuda "$p" 2>&1 | tee -a "$out/bench.txt"
done
if build-gpu/bin/mat-bench --help 2>&1 | grep -q spectral-compare; then
  bench spectral-compare-cuda spectral-compare --reps 3 --data-dir "$deps_dir/wikitext-2"
fi
echo "total: $(( $(date +%s) - start )) s" | tee -a "$out/machine.txt"
