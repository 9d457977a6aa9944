#!/usr/bin/env python3
"""The registered test of README.md beside this file: for seeds 21, 22, 23, 25, 26, MAT with the
floor against full training in validation loss at the last evaluation (step 24,000), d_N =
mat - full, and at equal compute, e_N = mat's last validation loss - full's at mat's total FLOPs
(probes included; full's curve linear between evaluations); for each the mean, standard
deviation, standard error (SD / sqrt(5)) and the criterion (mean below 0 by more than 2 standard
errors: MAT lower; above 0 by more: MAT higher; otherwise not resolved), which applies only when
all ten runs reached step 24,000. Then the secondary extension of ../lambda-vs-random/:
frozen-random - mat on seeds 25 and 26, pooled with that test's seeds 21-23. Without a criterion:
signs, differences at [MASK] and at the best, FLOPs fractions, where full reached MAT's final
loss, seconds per step. Then the exploratory addendum (full-equal-s21, -s22: full training with
MAT's compute and its own schedule). Reads metrics.jsonl and decisions.jsonl(.xz) only; no
test figure.
Usage:
  bench/results/mat-vs-full-1nat/analyze.py [RUNS]   (default: kept-runs beside this file)
MAT runs of seeds 21-23 are read from ../lambda-vs-random/kept-runs (the plan reuses them).
"""
import importlib.util
import math
import pathlib
import statistics
import sys

HERE = pathlib.Path(__file__).resolve().parent


def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


regime = load("regime", HERE.parent / "regime-1nat" / "analyze.py")  # evaluations, at_flops
lvr = load("lvr", HERE.parent / "lambda-vs-random" / "analyze.py")  # replay_matches
LVR_RUNS = HERE.parent / "lambda-vs-random" / "kept-runs"

SEEDS = (21, 22, 23, 25, 26)
NEW_SEEDS = (25, 26)  # those with a new MAT and frozen-random run
STEPS = 24000


def run_dir(runs, kind, seed):
    if kind == "mat" and seed not in NEW_SEEDS:
        return LVR_RUNS / f"mat-s{seed}"
    return runs / f"{kind}-s{seed}"


def curve(runs, kind, seed):
    """The run's evaluations, or None when it has none (not started, or no metrics yet)."""
    d = run_dir(runs, kind, seed)
    if not (d / "metrics.jsonl").is_file():
        return None
    return regime.evaluations(d) or None


def step_reaching(evals, loss):
    """The step (linear between evaluations) where the curve first reaches `loss`; None if never."""
    for k, r in enumerate(evals):
        if r["val_loss"] <= loss:
            if k == 0:
                return float(r["step"])
            a = evals[k - 1]
            t = (a["val_loss"] - loss) / (a["val_loss"] - r["val_loss"])
            return a["step"] + t * (r["step"] - a["step"])
    return None


def rule(name, values, lower, higher):
    mean, sd = statistics.fmean(values), statistics.stdev(values)
    se = sd / math.sqrt(len(values))
    print(f"\n{name}: {', '.join(f'{x:+.4f}' for x in values)}")
    print(f"mean {mean:+.4f}, SD {sd:.4f}, SE {se:.4f} ({mean / se:+.2f} standard errors); "
          f"below 0 on {sum(x < 0 for x in values)} of {len(values)} seeds")
    if mean < -2 * se:
        print(f"criterion: {lower}")
    elif mean > 2 * se:
        print(f"criterion: {higher}")
    else:
        print("criterion: not resolved (|mean| within 2 standard errors)")


def primary(runs):
    rows, complete = [], True
    for seed in SEEDS:
        full, mat = curve(runs, "full", seed), curve(runs, "mat", seed)
        if full is None or mat is None:
            print(f"seed {seed}: no evaluation yet of {'full' if full is None else 'mat'}")
            complete = False
            continue
        if full[-1]["step"] != STEPS or mat[-1]["step"] != STEPS:
            complete = False
        rows.append((seed, full, mat))
    print("seed  full val  mat val   d (mat - full)  at [MASK]  at best   "
          "FLOPs mat/full (w/o decoder)  full at mat's FLOPs: step, val   e      "
          "full reached mat's end at  s/step full, mat")
    d, e = [], []
    for seed, full, mat in rows:
        f, m = full[-1], mat[-1]
        unfinished = "" if f["step"] == m["step"] == STEPS else f" (steps {f['step']}, {m['step']})"
        at = regime.at_flops(full, m["flops"]["total"]) if f["step"] == STEPS else None
        reach = step_reaching(full, m["val_loss"])
        best = min(r["val_loss"] for r in mat) - min(r["val_loss"] for r in full)
        print(f"{seed:4d}  {f['val_loss']:.4f}    {m['val_loss']:.4f}{unfinished}    "
              f"{m['val_loss'] - f['val_loss']:+.4f}        "
              f"{m['val_loss_at_mask'] - f['val_loss_at_mask']:+.4f}    {best:+.4f}    "
              f"{m['flops']['total'] / f['flops']['total']:.4f} "
              f"({m['flops']['total_without_decoder'] / f['flops']['total_without_decoder']:.4f})"
              f"              "
              + (f"{at[0]:.0f}, {at[1]:.4f}      {m['val_loss'] - at[1]:+.4f}" if at else "-")
              + f"    {'never' if reach is None else f'{reach:.0f}'}"
              f"    {f['wall_seconds'] / f['step']:.3f}, {m['wall_seconds'] / m['step']:.3f}")
        d.append(m["val_loss"] - f["val_loss"])
        if at:
            e.append(m["val_loss"] - at[1])
    if not complete or len(rows) != len(SEEDS) or len(e) != len(SEEDS):
        print("\nNot all ten runs reached step 24,000: no conclusion (README.md's plan).")
        return
    rule("1. equal steps, d = mat - full", d, "MAT lower", "MAT higher")
    rule("2. equal compute, e = mat - full at mat's FLOPs", e, "MAT lower at equal compute",
         "MAT higher at equal compute")


def secondary(runs):
    print("\nSecondary (an extension of ../lambda-vs-random/; seeds 21-23 known before these runs):")
    f, ok = [], True
    for seed in (21, 22, 23) + NEW_SEEDS:
        base = LVR_RUNS if seed not in NEW_SEEDS else runs
        mat_dir, ctrl_dir = base / f"mat-s{seed}", base / f"frozen-random-s{seed}"
        m, c = curve(runs, "mat", seed), None
        if (ctrl_dir / "metrics.jsonl").is_file():
            c = regime.evaluations(ctrl_dir) or None
        if m is None or c is None:
            print(f"  seed {seed}: no evaluation yet")
            ok = False
            continue
        replay = lvr.replay_matches(mat_dir, ctrl_dir)
        done = m[-1]["step"] == STEPS and c[-1]["step"] == STEPS
        if not done or replay is None or replay[1] != 0:
            ok = False
        counts = "?" if replay is None else f"{replay[1]} of {replay[0]}"
        print(f"  seed {seed}: mat {m[-1]['val_loss']:.4f}, frozen-random {c[-1]['val_loss']:.4f}"
              f"{'' if done else ' (unfinished)'}, f = {c[-1]['val_loss'] - m[-1]['val_loss']:+.4f}"
              f" (at [MASK] {c[-1]['val_loss_at_mask'] - m[-1]['val_loss_at_mask']:+.4f}); "
              f"counts differ at {counts} decisions")
        f.append(c[-1]["val_loss"] - m[-1]["val_loss"])
    if not ok or len(f) != 5:
        print("  unfinished, or counts not replayed: not pooled (README.md's plan).")
        return
    rule("f = frozen-random - mat, seeds 21-23 and 25-26 pooled", f, "λ's choice worse",
         "λ's choice better")


def at_step(evals, step):
    """The validation loss at `step`, linear between the evaluations around it (None outside)."""
    for a, b in zip(evals, evals[1:]):
        if a["step"] <= step <= b["step"]:
            t = (step - a["step"]) / (b["step"] - a["step"])
            return a["val_loss"] + t * (b["val_loss"] - a["val_loss"])
    return None


def addendum(runs):
    """The exploratory addendum: full training with mat-sN's compute and its own schedule."""
    print("\nAddendum (exploratory, no rule): full with MAT's compute and its own schedule")
    for seed in (21, 22):
        equal = curve(runs, "full-equal", seed)
        if equal is None:
            print(f"  seed {seed}: no evaluation yet")
            continue
        mat, full = curve(runs, "mat", seed), curve(runs, "full", seed)
        e = equal[-1]
        long_run = at_step(full, e["step"])
        print(f"  seed {seed}: full-equal {e['val_loss']:.4f} at step {e['step']}"
              f" (FLOPs {e['flops']['total'] / mat[-1]['flops']['total']:.4f} x mat's); "
              f"mat - it {mat[-1]['val_loss'] - e['val_loss']:+.4f}; the 24,000-step full run "
              f"there {long_run:.4f} (it - full-equal {long_run - e['val_loss']:+.4f})")


def main(runs):
    runs = pathlib.Path(runs)
    primary(runs)
    secondary(runs)
    addendum(runs)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else HERE / "kept-runs")
