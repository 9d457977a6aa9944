#!/usr/bin/env bash
# The verdict's final runs (bench/verdict: six modes x seeds 1-5 with the setting committed in
# bench/results/verdict/criteria.json, or another registered criteria.json's modes and seeds)
# on a CUDA machine (Ubuntu 24.04 + pip PyTorch, no gRPC or
# SQLite; see check.sh): builds mat-train against PyTorch's LibTorch (-DMAT_WITH_SERVICE=OFF),
# checks every policy kind for a few steps on the GPU, then trains the table several runs at
# once with train.device=cuda (fp32), seed by seed, so that a time limit leaves whole seeds.
# CUDA's MPS daemon is started where it works, so that the small runs' kernels share the GPU
# instead of taking turns.
#
#   bench/gpu/verdict.sh DEPS_DIR OUT_DIR [SECONDS [JOBS [CRITERIA]]]   (runs' limit, default
#       480 s; JOBS default 15 at once with MPS, 8 without; CRITERIA: a registered criteria.json,
#       default bench/results/verdict/criteria.json; its "config" is the runs' config)
#     DEPS_DIR: bench/gpu/deps.sh's folder (.gpudeps).
#     OUT_DIR:  machine.txt, build.log, smoke.log, verdict.log, runs.tar.xz (every finished run's
#               summary.json, metrics.jsonl, decisions.jsonl, mat-train.log), verdict/table.md
#               and verdict/results.json where all 30 runs finished. Elsewhere:
#               tar -xJf runs.tar.xz -C DIR; bench/verdict --analyze-only --runs DIR.
set -euo pipefail
deps_dir=$(readlink -f "${1:?deps dir}")
out=$(readlink -f "${2:?out dir}")
seconds=${3:-480}
jobs=${4:-auto}  # auto: 15 at once with MPS, 8 without
if [ -n "${5:-}" ] && [ ! -f "$5" ]; then echo "criteria $5: no such file"; exit 2; fi
criteria_arg=${5:+$(readlink -f "$5")}
cd "$(dirname "$0")/../.."
criteria=${criteria_arg:-bench/results/verdict/criteria.json}
mkdir -p "$out"
# The runs' config, setting, modes and seeds, as bench/verdict resolves them from the criteria
# (refused before the build when the setting is null, or when the config was edited since a
# registered config_sha256: neither committed criteria.json has one yet).
plan=$(python3 bench/verdict --criteria "$criteria" --plan)
# shellcheck source=bench/gpu/prepare.sh
source bench/gpu/prepare.sh
ninja -C build-gpu -j "$(nproc)" mat-train >> "$out/build.log" 2>&1 \
  || { grep -E -A3 "error" "$out/build.log" | head -n 60; exit 1; }
echo "build: $(( $(date +%s) - start )) s" | tee -a "$out/machine.txt"

mps=off
if command -v nvidia-cuda-mps-control > /dev/null && nvidia-cuda-mps-control -d 2>> "$out/machine.txt"; then
  if timeout 30 python3 -c 'import torch; print(torch.ones(4, device="cuda").sum().item())' \
      >> "$out/machine.txt" 2>&1; then
    mps=on
  else
    echo quit | nvidia-cuda-mps-control || true
  fi
fi
[ "$jobs" = auto ] && { [ "$mps" = on ] && jobs=15 || jobs=8; }
echo "mps: $mps; $jobs runs at once" | tee -a "$out/machine.txt"

# Every policy kind for 100 steps on the GPU (probes from step 20), at once: a CUDA failure shows
# here, before the table's runs.
config=$(python3 -c "import json, sys; print(json.loads(sys.argv[1])['config'])" "$plan")
sets=$(python3 -c "
import json, sys
for s in json.loads(sys.argv[1])['sets']: print('--set'); print(s)" "$plan")
setting=()
[ -z "$sets" ] || mapfile -t setting <<< "$sets"
common=(--config "$config" "${setting[@]}" --set train.device=cuda
  --set "data.dir=$deps_dir/wikitext-2" --set train.threads=1 --no-progress --log-level warn)
smoke=(--set train.steps=100 --set train.eval_every=50 --set train.eval_batches=2
  --set policy.warmup_steps=20)
pids=()
for kind in full mat frozen-random inverse multirate; do
  timeout 120 build-gpu/bin/mat-train "${common[@]}" "${smoke[@]}" --set policy.kind=$kind \
    --out "/tmp/mat-smoke-$kind" > "/tmp/mat-smoke-$kind.log" 2>&1 &
  pids+=($!)
done
ok=1
for i in "${!pids[@]}"; do wait "${pids[$i]}" || ok=0; done
for kind in full mat frozen-random inverse multirate; do
  { echo "== $kind"; tail -n 5 "/tmp/mat-smoke-$kind.log"
    python3 -c "import json; s=json.load(open('/tmp/mat-smoke-$kind/summary.json')); print('smoke $kind: device', s['device'], 'best val', round(s['best_val_loss'], 3), 'active', round(s['mean_active_fraction'], 3), 'wall', round(s['wall_seconds'], 1))" 2>&1; } >> "$out/smoke.log"
done
cat "$out/smoke.log"
[ "$ok" = 1 ] || { echo "smoke failed"; exit 1; }
echo "smoke: $(( $(date +%s) - start )) s" | tee -a "$out/machine.txt"

runs=/tmp/mat-verdict-runs
expected=$(python3 -c "
import json, sys; p = json.loads(sys.argv[1]); print(len(p['modes']) * len(p['seeds']))" "$plan")
mkdir -p "$runs"
pack() {
  # timeout stops bench/verdict, not the mat-train runs it started: stop them first.
  pkill -f build-gpu/bin/mat-train 2> /dev/null || true
  sleep 1
  (cd "$runs" && find . -maxdepth 2 \( -name summary.json -o -name metrics.jsonl \
     -o -name decisions.jsonl -o -name mat-train.log \) -print0 \
     | tar --null -T - --warning=no-file-changed -I 'xz -T0' -cf "$out/runs.tar.xz") || true
  echo "runs finished: $(find "$runs" -name summary.json | wc -l) of $expected; total $(( $(date +%s) - start )) s" \
    | tee -a "$out/machine.txt"
}
trap pack EXIT
set +e
PYTHONUNBUFFERED=1 timeout "$seconds" python3 bench/verdict --criteria "$criteria" \
  --mat-train build-gpu/bin/mat-train --set train.device=cuda --set "data.dir=$deps_dir/wikitext-2" \
  --jobs "$jobs" --runs "$runs" --out "$out/verdict" > "$out/verdict.log" 2>&1
echo "verdict rc $?" | tee -a "$out/machine.txt"
tail -n 20 "$out/verdict.log"
