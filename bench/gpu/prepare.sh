# Sourced by the CUDA scripts (repro.sh, verdict.sh) from the repository root, with deps_dir and
# out set: extracts DEPS_DIR's Debian .debs into a private prefix (never into /), points the
# loader at it, writes OUT/machine.txt (card, versions, commit) and configures build-gpu against
# PyTorch's LibTorch without the service (-DMAT_WITH_SERVICE=OFF), its log in OUT/build.log.
# Sets prefix, torch_prefix and start (the time the configure began).
prefix=/tmp/mat-gpu-deps
rm -rf "$prefix" && mkdir -p "$prefix"
for f in "$deps_dir"/*.deb; do dpkg -x "$f" "$prefix"; done
export LD_LIBRARY_PATH="$prefix/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
torch_prefix=$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
  nproc
  git log -1 --format='commit %h %s' 2>/dev/null || true
} | tee "$out/machine.txt"
start=$(date +%s)
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DMAT_WITH_SERVICE=OFF \
  -DCMAKE_PREFIX_PATH="$torch_prefix;$prefix/usr" -DMAT_SHARED_DIR="$deps_dir/.." \
  > "$out/build.log" 2>&1 || { tail -n 60 "$out/build.log"; exit 1; }
