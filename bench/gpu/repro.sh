#!/usr/bin/env bash
# bench/repro on a CUDA machine (Ubuntu 24.04 + pip PyTorch, no gRPC/SQLite; see check.sh):
# builds mat-train against PyTorch's LibTorch (-DMAT_WITH_SERVICE=OFF), runs the switch and VGG
# building blocks' CPU tests there, then the tables with --device cuda, several runs at once:
#   switch   its convergence preset (examples/switch-wikitext2.yaml, 2,000 steps)
#   bert     the tiny BERT at the tiny config's own 1,000 steps (the quick preset's model, longer)
# Each table's runs go to OUT_DIR/runs-<table> as they finish (summary.json, metrics.jsonl,
# decisions.jsonl), so a run cut short by the time limit still leaves the finished ones for
# `bench/repro TABLE --analyze-only --runs DIR` on any machine.
#
#   bench/gpu/repro.sh DEPS_DIR OUT_DIR [SWITCH_SECONDS [BERT_SECONDS]]   (limits, default 260 160)
set -euo pipefail
deps_dir=$(readlink -f "${1:?deps dir}")
out=$(readlink -f "${2:?out dir}")
switch_seconds=${3:-260}
bert_seconds=${4:-160}
cd "$(dirname "$0")/../.."
mkdir -p "$out"
# shellcheck source=bench/gpu/prepare.sh
source bench/gpu/prepare.sh
ninja -C build-gpu -k 0 -j "$(nproc)" mat-train trainer_switch_test trainer_vgg_test \
  trainer_sgd_test trainer_image_data_test >> "$out/build.log" 2>&1 \
  || { grep -E -A3 "error" "$out/build.log" | head -n 60; [ -x build-gpu/bin/mat-train ] || exit 1; }
echo "build: $(( $(date +%s) - start )) s" | tee -a "$out/machine.txt"

set +e
for t in trainer_switch_test trainer_vgg_test trainer_sgd_test; do
  [ -x "build-gpu/tests/$t" ] && timeout 120 "build-gpu/tests/$t" 2>&1 \
    | grep -E "^\[ +(PASSED|FAILED) |Failure" | head -n 20 | sed "s/^/$t: /" | tee -a "$out/machine.txt"
done

table() {  # NAME SECONDS ARGS...: bench/repro with a time limit; the runs stay in $out/runs-NAME
  local name=$1 per_table=$2; shift 2
  local t0; t0=$(date +%s)
  timeout "$per_table" python3 bench/repro "$@" --device cuda --jobs 4 --threads 2 \
    --mat-train build-gpu/bin/mat-train --runs "$out/runs-$name" --out "$out/$name" \
    --set "data.dir=$deps_dir/wikitext-2" > "$out/repro-$name.log" 2>&1
  echo "table $name: rc $? in $(( $(date +%s) - t0 )) s" | tee -a "$out/machine.txt"
  tail -n 5 "$out/repro-$name.log"
  # Keep the runs small: no checkpoints (repro deletes them; this is for a cut run).
  find "$out/runs-$name" -name 'checkpoint.pt*' -delete 2>/dev/null
}
table switch "$switch_seconds" switch
table bert "$bert_seconds" bert --quick --set train.steps=1000 --set train.eval_every=50 \
  --set policy.warmup_steps=200
echo "total: $(( $(date +%s) - start )) s" | tee -a "$out/machine.txt"
