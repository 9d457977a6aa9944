#!/usr/bin/env bash
# The CUDA check, for a machine with PyTorch (its LibTorch) and CUDA but without gRPC, SQLite or
# the Debian libraries (Ubuntu 24.04 + pip PyTorch): builds the one-process trainer against
# PyTorch's LibTorch with -DMAT_WITH_SERVICE=OFF, runs the CPU-vs-CUDA tests (ctest label gpu)
# and a few CPU unit tests, then times the masked backward and the gram probe on CUDA.
#
#   bench/gpu/check.sh DEPS_DIR OUT_DIR
#     DEPS_DIR: Debian 12 .deb files of abseil, yaml-cpp, CLI11, nlohmann-json, liblzma, gtest,
#               gmock, spdlog, fmt (extracted into a private prefix, never into /), and a
#               wikitext-2/ folder with the corpus.
#     OUT_DIR:  results (logs, JSON).
# Everything in under 8 minutes on 16 cores.
set -euo pipefail
deps_dir=$(readlink -f "${1:?deps dir}")
out=$(readlink -f "${2:?out dir}")
cd "$(dirname "$0")/../.."
mkdir -p "$out"
prefix=/tmp/mat-gpu-deps
rm -rf "$prefix" && mkdir -p "$prefix"
for f in "$deps_dir"/*.deb; do dpkg -x "$f" "$prefix"; done
export LD_LIBRARY_PATH="$prefix/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
torch_prefix=$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
  g++ --version | head -n1
} | tee "$out/machine.txt"

start=$(date +%s)
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DMAT_WITH_SERVICE=OFF \
  -DCMAKE_PREFIX_PATH="$torch_prefix;$prefix/usr" -DMAT_SHARED_DIR="$deps_dir/.." \
  > "$out/cmake.log" 2>&1 || { tail -n 60 "$out/cmake.log"; exit 1; }
ninja -C build-gpu -k 0 -j "$(nproc)" worker_cuda_test spectral_estimator_test worker_masked_backward_test \
  worker_flops_test coordinator_policy_test mat-train mat-bench > "$out/build.log" 2>&1 \
  || { grep -E "error|Error" "$out/build.log" | head -n 40; exit 1; }
echo "build: $(( $(date +%s) - start )) s" | tee -a "$out/machine.txt"

set +e
(cd build-gpu && ctest --output-on-failure -R 'worker_cuda_test|spectral_estimator_test|worker_masked_backward_test|worker_flops_test|coordinator_policy_test') \
  2>&1 | tee "$out/ctest.log" | tail -n 15
./build-gpu/tests/worker_cuda_test 2>&1 | grep -E "^\[ +(OK|SKIPPED|FAILED|PASSED)" | tee "$out/cuda_test.txt"
set -e
build-gpu/bin/mat-bench masked-backward --root . --device cuda --reps 20 --out "$out/masked-backward-cuda.json" \
  2>&1 | head -n 8 | tee "$out/masked-backward-cuda.txt"
build-gpu/bin/mat-bench spectral-cost --root . --device cuda --reps 20 --data-dir "$deps_dir/wikitext-2" \
  --out "$out/spectral-cost-cuda.json" 2>&1 | head -n 1 | tee "$out/spectral-cost-cuda.txt"
echo "total: $(( $(date +%s) - start )) s" | tee -a "$out/machine.txt"
