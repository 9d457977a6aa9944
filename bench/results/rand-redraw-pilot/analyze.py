#!/usr/bin/env python3
"""The pilot of README.md beside this file (seed 29, no rule): rand re-drawn every 40 steps
(rand40-s29) against every 2,000 steps (rand2000-s29). Prints each run's validation loss every
2,000 steps and at its end, its FLOPs as a fraction of a 24,000-step full run's, its decision
steps' count, and rand2000 - rand40 at the end. Reads metrics.jsonl, summary.json and
decisions.jsonl(.xz) only; no test figure.
Usage: bench/results/rand-redraw-pilot/analyze.py [RUNS]   (default: kept-runs beside this file)
"""
import json
import lzma
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent


def rows(d):
    with open(d / "metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if "val_loss" in r]


def decision_steps(d):
    for name, opener in (("decisions.jsonl", open), ("decisions.jsonl.xz", lzma.open)):
        if (d / name).is_file():
            with opener(d / name, "rt") as f:
                return [json.loads(line)["step"] for line in f if line.strip()]
    return []


def main(runs):
    runs = pathlib.Path(runs)
    full = rows(HERE.parent / "mat-vs-full-1nat" / "kept-runs" / "full-s23")[-1]["flops"]["total"]
    ends = {}
    for name in ("rand40-s29", "rand2000-s29"):
        d = runs / name
        if not (d / "summary.json").is_file():
            print(f"{name}: not finished")
            continue
        r = rows(d)
        s = json.loads((d / "summary.json").read_text())
        steps = decision_steps(d)
        print(f"{name}: steps {s['steps']}, {len(steps)} decisions (first {steps[:3]}), FLOPs "
              f"{s['flops_total'] / full:.4f} x a 24,000-step full run's, mean active "
              f"{s['mean_active_fraction']:.4f}")
        print("  val every 2,000: " + " ".join(f"{x['val_loss']:.2f}" for x in r
                                                if x["step"] % 2000 == 0))
        print(f"  end (step {r[-1]['step']}): {r[-1]['val_loss']:.4f}, at [MASK] "
              f"{r[-1]['val_loss_at_mask']:.4f}")
        ends[name] = r[-1]
    if len(ends) == 2:
        a, b = ends["rand40-s29"], ends["rand2000-s29"]
        print(f"rand2000 - rand40 at the end: {b['val_loss'] - a['val_loss']:+.4f} "
              f"(at [MASK] {b['val_loss_at_mask'] - a['val_loss_at_mask']:+.4f}); one seed, no rule")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else HERE / "kept-runs")
