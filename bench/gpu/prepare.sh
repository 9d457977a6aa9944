# Sourced by the CUDA scripts (check.sh, repro.sh, verdict.sh) from the repository root, with
# deps_dir and out set: extracts DEPS_DIR's Debian .debs into a private prefix (never into /),
# points the loader at it, writes OUT/machine.txt (card, versions, commit) and configures build-gpu
# against PyTorch's LibTorch, its log in OUT/build.log.
#   service=ON before sourcing: with the service (-DMAT_WITH_SERVICE=ON: gRPC, protobuf, SQLite
#   and libsystemd from the prefix); the default is OFF, the one-process trainer only.
#   BUILD_DIR / TORCH_PREFIX (environment): where to configure (default build-gpu) and which
#   LibTorch (default PyTorch's), so that the same prefix logic can be tried on a CPU machine.
# Sets prefix, torch_prefix, build and start (the time the configure began).
prefix=/tmp/mat-gpu-deps
build=${BUILD_DIR:-build-gpu}
rm -rf "$prefix" && mkdir -p "$prefix"
for f in "$deps_dir"/*.deb; do dpkg -x "$f" "$prefix"; done
# Relocate what the .debs say about /usr: pkg-config files name their prefix, and a few
# development links are absolute (zlib's libz.so -> /lib/x86_64-linux-gnu/libz.so.1.2.13).
for pc in "$prefix"/usr/lib/x86_64-linux-gnu/pkgconfig/*.pc "$prefix"/usr/share/pkgconfig/*.pc; do
  [ -f "$pc" ] && sed -i "s#\([= ]\)/usr#\1$prefix/usr#g; s#-I/usr#-I$prefix/usr#g; s#-L/usr#-L$prefix/usr#g" "$pc"
done
for l in "$prefix"/usr/lib/x86_64-linux-gnu/*.so; do
  t=$(readlink "$l" || true)
  if [[ "$t" == /* && -e "$prefix$t" ]]; then ln -sf "$prefix$t" "$l"; fi
done
export LD_LIBRARY_PATH="$prefix/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
export PKG_CONFIG_PATH="$prefix/usr/lib/x86_64-linux-gnu/pkgconfig:$prefix/usr/share/pkgconfig:${PKG_CONFIG_PATH:-}"
export PATH="$prefix/usr/bin:$PATH"
torch_prefix=${TORCH_PREFIX:-$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
  nproc
  git log -1 --format='commit %h %s' 2>/dev/null || true
} | tee "$out/machine.txt"
start=$(date +%s)
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMAT_WITH_SERVICE="${service:-OFF}" \
  -DCMAKE_PREFIX_PATH="$prefix/usr;$torch_prefix" -DMAT_SHARED_DIR="$deps_dir/.." \
  > "$out/build.log" 2>&1 || { tail -n 60 "$out/build.log"; exit 1; }
if [ "${service:-OFF}" = ON ]; then
  # Where each service dependency was found: the prefix, not a stray system copy.
  grep -E "^(gRPC_DIR|Protobuf_INCLUDE_DIR|Protobuf_PROTOC_EXECUTABLE|Protobuf_LIBRARY_RELEASE|SQLite3_INCLUDE_DIR|SQLite3_LIBRARY|SYSTEMD_INCLUDEDIR|absl_DIR|MAT_NCCL_INCLUDE_DIR|MAT_GLOO|MAT_PROMETHEUS_CPP)" \
    "$build/CMakeCache.txt" | tee -a "$out/machine.txt" || true
fi
