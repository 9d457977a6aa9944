#!/usr/bin/env bash
# bench/repro on a CUDA machine (Ubuntu 24.04 + pip PyTorch, no gRPC/SQLite; see check.sh):
# builds mat-train against PyTorch's LibTorch (-DMAT_WITH_SERVICE=OFF), runs the switch and VGG
# building blocks' CPU tests there, then the tables with --device cuda, several runs at once:
#   switch   its convergence preset (examples/switch-wikitext2.yaml, 2,000 steps)
#   bert     the tiny BERT at the tiny config's own 1,000 steps (the quick preset's model, longer)
# Each table's runs go to runs-<table> as they finish (summary.json, metrics.jsonl,
# decisions.jsonl, mat-train.log), so a run cut short by the time limit still leaves the finished
# ones for `bench/repro TABLE --analyze-only --runs DIR` on any machine.
#
#   bench/gpu/repro.sh DEPS_DIR OUT_DIR [SWITCH_SECONDS [BERT_SECONDS]]   (limits, default 260 160)
#     OUT_DIR: four files, as the device tool returns at most 8 files two folders deep from its
#              $OUT: machine.txt, logs.tar.gz (build.log, repro-<table>.log), tables.tar.gz (each
#              table's folder: table.md, table.json, results.json, the SVGs) and runs.tar.xz
#              (runs-<table>/<run>/...; elsewhere: tar -xJf runs.tar.xz -C DIR, then bench/repro
#              TABLE --analyze-only --runs DIR/runs-TABLE). The script works in /tmp/mat-gpu-repro
#              and fills OUT_DIR on any exit.
set -euo pipefail
deps_dir=$(readlink -f "${1:?deps dir}")
final=$(readlink -f "${2:?out dir}")
switch_seconds=${3:-260}
bert_seconds=${4:-160}
cd "$(dirname "$0")/../.."
out=/tmp/mat-gpu-repro
rm -rf "$out" && mkdir -p "$out" "$final"
pack() {
  set +e
  pkill -f build-gpu/bin/mat-train 2> /dev/null || true  # timeout stops bench/repro, not its runs
  cp "$out/machine.txt" "$final/" 2> /dev/null
  (cd "$out" && tar czf "$final/logs.tar.gz" --ignore-failed-read ./*.log)
  local tables=()
  for t in switch bert; do [ -d "$out/$t" ] && tables+=("$t"); done
  [ ${#tables[@]} -gt 0 ] && (cd "$out" && tar czf "$final/tables.tar.gz" "${tables[@]}")
  (cd "$out" && ls -d runs-* > /dev/null 2>&1 \
     && tar -I 'xz -T0' -cf "$final/runs.tar.xz" --warning=no-file-changed \
       --exclude='checkpoint.pt*' --exclude='*.safetensors' runs-*)
  ls -l "$final"
}
trap pack EXIT
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
}
table switch "$switch_seconds" switch
table bert "$bert_seconds" bert --quick --set train.steps=1000 --set train.eval_every=50 \
  --set policy.warmup_steps=200
echo "total: $(( $(date +%s) - start )) s" | tee -a "$out/machine.txt"
