#!/usr/bin/env bash
# The folder the CUDA scripts (check.sh, repro.sh, verdict.sh) take as DEPS_DIR: the Debian 12
# .deb files they extract into a private prefix on the device machine (which has PyTorch, CUDA,
# protobuf, Boost, spdlog and GoogleTest headers but not these versions or libraries, nor gRPC,
# SQLite or libsystemd), and a copy
# of the WikiText-2 corpus (the ../shared beside the checkout does not travel). About 27 MB.
#
#   bench/gpu/deps.sh [DIR]   (default .gpudeps, ignored by git; name it in the device call's carry)
set -euo pipefail
cd "$(dirname "$0")/../.."
dir=${1:-.gpudeps}
mkdir -p "$dir"
pkgs="libabsl-dev libabsl20220623 libspdlog-dev libspdlog1.10 libfmt-dev libfmt9 libyaml-cpp-dev
  libyaml-cpp0.7 libcli11-dev nlohmann-json3-dev liblzma-dev libgtest-dev libgmock-dev
  prometheus-cpp-dev libprometheus-cpp-core1.0"
# The service (bench/gpu/service.sh: -DMAT_WITH_SERVICE=ON): gRPC 1.51 and protobuf 3.21 with
# their compilers and dependencies, SQLite, libsystemd. About 20 MB more.
pkgs="$pkgs libgrpc++-dev libgrpc++1.51 libgrpc-dev libgrpc29 protobuf-compiler-grpc
  libprotobuf-dev libprotobuf32 libprotobuf-lite32 libprotoc32 protobuf-compiler libc-ares-dev
  libc-ares2 libre2-dev libre2-9 libssl-dev libssl3 zlib1g-dev zlib1g libsqlite3-dev libsqlite3-0
  libsystemd-dev libsystemd0"
# Gloo's headers (49 kB), which PyTorch's pip LibTorch does not ship: ProcessGroupGloo for two
# ranks on one GPU (NCCL refuses them). Headers only: the Gloo code is inside LibTorch, and
# trainer/CMakeLists.txt checks that these headers build against it (MAT_GLOO_HEADERS_FIT).
pkgs="$pkgs libgloo-dev"
# shellcheck disable=SC2086
(cd "$dir" && apt-get download $pkgs)
rm -rf "$dir/wikitext-2" && cp -r ../shared/data/wikitext-2 "$dir/wikitext-2"
du -sh "$dir"
