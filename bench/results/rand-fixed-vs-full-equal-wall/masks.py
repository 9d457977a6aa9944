#!/usr/bin/env python3
"""How persistent MAT's masks are: for each kept MAT run of seeds 23, 25-28
(../mat-vs-full-equal-compute/'s, through its run_dir; frozen-random replays the same masks
through a permutation of each group), over the decisions from step 320 on (after the policy's
warm-up): each module's fraction of decisions with it active, sorted; how many modules are active
at >= 0.8 and at <= 0.05 of them; and how many modules flip on or off at a decision that changes
the mask, on average. Reads decisions.jsonl(.xz) only.
Usage: bench/results/rand-fixed-vs-full-equal-wall/masks.py
"""
import importlib.util
import pathlib

HERE = pathlib.Path(__file__).resolve().parent
spec = importlib.util.spec_from_file_location(
    "r2k", HERE.parent / "rand2000-vs-full-equal-wall" / "analyze.py")
r2k = importlib.util.module_from_spec(spec)
spec.loader.exec_module(r2k)
meq, rw = r2k.meq, r2k.rw

for seed in r2k.SEEDS:
    rows = [r for r in rw.decisions(meq.run_dir(rw.MEQ_RUNS, "mat", seed)) if r["step"] >= 320]
    n = len(rows[0]["modules"])
    on = sorted((sum(r["modules"][k]["active"] for r in rows) / len(rows) for k in range(n)),
                reverse=True)
    flips = [sum(a["active"] != b["active"] for a, b in zip(x["modules"], y["modules"]))
             for x, y in zip(rows, rows[1:])]
    changes = [f for f in flips if f]
    print(f"mat-s{seed}: {len(rows)} decisions; active fraction per module "
          + " ".join(f"{x:.3f}" for x in on)
          + f"; >= 0.8: {sum(x >= 0.8 for x in on)}, <= 0.05: {sum(x <= 0.05 for x in on)}; "
          f"{len(changes)} changes, {sum(changes) / len(changes):.2f} modules flipped per change")
