#!/usr/bin/env bash
# Binary check: the rebuilt mat-train runs the pilot's rand2000-s29 and the rand test's
# full-wall-s23 to step 2,000; their train and validation figures at steps 1,000 and 2,000 must
# equal the kept runs' exactly.
set -euo pipefail
bin=$1; out=$2; m=/work/main
config=$m/examples/bert-wikitext2-regime.yaml; data=/work/shared/data/wikitext-2
common=(--config $config --set data.dir=$data --set train.threads=1 --no-progress)
mkdir -p $out; cd $out
$bin "${common[@]}" --set policy.kind=rand --set policy.rand_fraction=0.5 --set seed=29 \
  --set policy.probe_every=2000 --set policy.warmup_steps=0 --out rand2000-s29 > rand2000-s29.log 2>&1 & a=$!
$bin "${common[@]}" --set policy.kind=full --set train.steps=17996 --set seed=23 --out full-wall-s23 > full-wall-s23.log 2>&1 & b=$!
while [[ $(grep -c '"step":2000,' rand2000-s29/metrics.jsonl 2>/dev/null) != 1 || $(grep -c '"step":2000,' full-wall-s23/metrics.jsonl 2>/dev/null) != 1 ]]; do sleep 5; done
kill $a $b; wait || true
python3 - <<'PY'
import json
keys = ("train_loss", "val_loss", "val_loss_at_mask", "flops", "lr", "active_modules")
ok = True
for name, kept in (("rand2000-s29", "/work/main/bench/results/rand-redraw-pilot/kept-runs/rand2000-s29"),
                   ("full-wall-s23", "/work/main/bench/results/rand-vs-full-equal-wall/kept-runs/full-wall-s23")):
    def rows(d):
        return {r["step"]: r for r in map(json.loads, open(d + "/metrics.jsonl")) if r["step"] in (1000, 2000)}
    new, old = rows(name), rows(kept)
    for step in (1000, 2000):
        same = all(new[step].get(k) == old[step].get(k) for k in keys)
        ok &= same
        print(f"{name} step {step}: {'equal' if same else 'DIFFERENT'} in {', '.join(keys)}")
print("binary check:", "passed" if ok else "FAILED")
PY
