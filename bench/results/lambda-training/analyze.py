#!/usr/bin/env python3
"""The registered check of README.md beside this file: for each frozen-random run in RUNS
(frozen-random-s16 .. -s19), the share of its active heads among the top-k of its own λ at the
first decision (S_first) and in its last 2,000-step bin (S_last, chance C_last), the criterion
(S_last > S_first and S_last >= 2 * C_last in at least 3 of 4 runs), and, without a criterion,
the FFN slices' figures and the heads' λ growth from step 2,000 to the last decision. Reads only
decisions.jsonl(.xz). Usage:
  bench/results/lambda-training/analyze.py [RUNS]   (default: kept-runs beside this file)
"""
import math
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "regime-1nat"))
import analyze as regime  # noqa: E402  (lambda_follows_training, read_decisions)

SEEDS = (16, 17, 18, 19)


def growth(run_dir, group):
    """Per module of `group`: smoothed λ at the last decision over its value at the first
    decision at or after step 2,000, split by whether the module is active at the last one."""
    rows = [r for r in regime.read_decisions(run_dir) or [] if "modules" in r]
    start = next((r for r in rows if r["step"] >= 2000), None)
    if start is None:
        return None
    last = rows[-1]
    out = {True: [], False: []}
    for a, b in zip(start["modules"], last["modules"]):
        if b["group"] != group:
            continue
        x, y = float(a["lambda_smoothed"]), float(b["lambda_smoothed"])
        if math.isfinite(x) and math.isfinite(y) and x > 0:
            out[bool(b["active"])].append(y / x)
    return start["step"], last["step"], out


def main(runs):
    met = 0
    for seed in SEEDS:
        run = pathlib.Path(runs) / f"frozen-random-s{seed}"
        got = regime.lambda_follows_training(run) if run.is_dir() else None
        heads = (got or {}).get("heads")
        if heads is None:
            print(f"  s{seed}: no decision with a partly active heads group: does not meet it")
            continue
        (s_first, _), (s_last, c_last) = heads
        ok = s_last > s_first and s_last >= 2 * c_last
        met += ok
        print(f"  s{seed} heads: S_first {s_first:.2f}, S_last {s_last:.2f}, C_last {c_last:.2f}: "
              f"{'meets' if ok else 'does not meet'} S_last > S_first and S_last >= 2 C_last")
        g = growth(run, "heads")
        if g:
            a, b, by = g
            fmt = lambda xs: (f"x {min(xs):.2g}-{max(xs):.2g}" if xs else "none")
            print(f"  s{seed} heads' smoothed λ from step {a} to {b}: active at the end "
                  f"{fmt(by[True])}, inactive {fmt(by[False])}")
    print(f"criterion: {met} of {len(SEEDS)} runs meet it (3 needed): "
          f"{'CONFIRMED' if met >= 3 else 'NOT CONFIRMED'}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else pathlib.Path(__file__).parent / "kept-runs")
