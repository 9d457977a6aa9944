#!/usr/bin/env python3
"""The registered test of README.md beside this file: MAT with the floor (24,000 steps) against
full training given MAT's compute and its own schedule (full-equal: `train.steps` = MAT's total
FLOPs / full training's FLOPs per step, rounded), on seeds 23, 25, 26, 27, 28. Primary:
g_N = mat - full-equal in validation loss at each run's last evaluation; the mean, standard
deviation, standard error (SD / sqrt(5)) and the criterion (mean below 0 by more than 2 standard
errors: MAT lower; above 0 by more: MAT higher; otherwise not resolved), which applies only when
all ten runs reached their last step and each full-equal run's FLOPs are within 1 % of its MAT
run's. Secondary: h_N = frozen-random - full-equal on the same seeds (the same rule, applied only
when those runs are complete, within 1 % of the FLOPs, and frozen-random-s27/-s28 kept their MAT
runs' per-group counts at every decision). Without a
criterion: g pooled with ../mat-vs-full-1nat's exploratory seeds 21 and 22, differences at
[MASK], FLOPs fractions, full-equal against the 24,000-step full run at the same step (seeds 23,
25, 26), seconds per step, and frozen-random - mat on seeds 27 and 28 beside
../lambda-vs-random's and ../mat-vs-full-1nat's. Reads metrics.jsonl and decisions.jsonl(.xz)
only; no test figure.
Usage:
  bench/results/mat-vs-full-equal-compute/analyze.py [RUNS]   (default: kept-runs beside this file)
  bench/results/mat-vs-full-equal-compute/analyze.py --equal-steps MAT_RUN   (run.sh's train.steps)
"""
import importlib.util
import json
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


regime = load("regime", HERE.parent / "regime-1nat" / "analyze.py")  # evaluations
lvr = load("lvr", HERE.parent / "lambda-vs-random" / "analyze.py")  # replay_matches
mvf = load("mvf", HERE.parent / "mat-vs-full-1nat" / "analyze.py")  # rule, at_step
LVR_RUNS = HERE.parent / "lambda-vs-random" / "kept-runs"
MVF_RUNS = HERE.parent / "mat-vs-full-1nat" / "kept-runs"

SEEDS = (23, 25, 26, 27, 28)
NEW_SEEDS = (27, 28)  # those with a new MAT and frozen-random run
STEPS = 24000


def last_line(path):
    return json.loads(path.read_text().strip().splitlines()[-1])


def full_flops_per_step():
    """Full training's FLOPs per step: the mean over ../mat-vs-full-1nat's five 24,000-step full
    runs (they differ by under 0.03 %: the decoder's count follows the masked positions)."""
    rows = [last_line(MVF_RUNS / f"full-s{s}" / "metrics.jsonl") for s in (21, 22, 23, 25, 26)]
    return statistics.fmean(r["flops"]["total"] / r["step"] for r in rows)


def equal_steps(mat_run):
    return round(last_line(pathlib.Path(mat_run) / "metrics.jsonl")["flops"]["total"]
                 / full_flops_per_step())


def run_dir(runs, kind, seed):
    if seed not in NEW_SEEDS and kind in ("mat", "frozen-random"):
        return (LVR_RUNS if seed in (21, 22, 23) else MVF_RUNS) / f"{kind}-s{seed}"
    if seed in (21, 22) or (kind == "full" and seed in (23, 25, 26)):
        return MVF_RUNS / f"{kind}-s{seed}"
    return runs / f"{kind}-s{seed}"


def curve(runs, kind, seed):
    """The run's evaluations, or None when it has none (not started, or no metrics yet)."""
    d = run_dir(runs, kind, seed)
    if not (d / "metrics.jsonl").is_file():
        return None
    return regime.evaluations(d) or None


def summary(name, values):
    mean, sd = statistics.fmean(values), statistics.stdev(values)
    se = sd / math.sqrt(len(values))
    print(f"\n{name}: {', '.join(f'{x:+.4f}' for x in values)}")
    print(f"mean {mean:+.4f}, SD {sd:.4f}, SE {se:.4f} ({mean / se:+.2f} standard errors); "
          f"below 0 on {sum(x < 0 for x in values)} of {len(values)} seeds (no rule)")


def against_full_equal(runs, kind, seeds):
    """Rows of kind (mat or frozen-random) against full-equal; (differences, complete)."""
    print(f"\nseed  full-equal (steps)  {kind:13s}  {kind} - full-equal  at [MASK]  "
          f"FLOPs {kind}/full-equal  24k full run at that step  s/step full-equal, {kind}")
    diffs, complete = [], True
    for seed in seeds:
        equal, other = curve(runs, "full-equal", seed), curve(runs, kind, seed)
        if equal is None or other is None:
            print(f"{seed:4d}  no evaluation yet of {'full-equal' if equal is None else kind}")
            complete = False
            continue
        e, o = equal[-1], other[-1]
        planned = equal_steps(run_dir(runs, "mat", seed))
        ratio = o["flops"]["total"] / e["flops"]["total"]
        if e["step"] != planned or o["step"] != STEPS:
            complete = False
        if abs(ratio - 1) > 0.01:
            complete = False
        full = curve(runs, "full", seed) if seed in (21, 22, 23, 25, 26) else None
        long_run = mvf.at_step(full, e["step"]) if full else None
        # (Seeds 21 and 22, the earlier addendum's, used their own full run's curve: no "of".)
        steps = f"{e['step']}" + ("" if e["step"] == planned or seed in (21, 22)
                                  else f" of {planned}")
        other_end = f"{o['val_loss']:.4f}" + ("" if o["step"] == STEPS else f" (step {o['step']})")
        there = "-" if long_run is None else f"{long_run:.4f}"
        print(f"{seed:4d}  {e['val_loss']:.4f} ({steps})   {other_end}         "
              f"{o['val_loss'] - e['val_loss']:+.4f}            "
              f"{o['val_loss_at_mask'] - e['val_loss_at_mask']:+.4f}    {ratio:.4f}"
              f"                  {there}                     "
              f"{e['wall_seconds'] / e['step']:.3f}, {o['wall_seconds'] / o['step']:.3f}")
        diffs.append(o["val_loss"] - e["val_loss"])
    return diffs, complete and len(diffs) == len(seeds)


def main(runs):
    runs = pathlib.Path(runs)
    print(f"full training's FLOPs per step: {full_flops_per_step():.0f}")
    g, complete = against_full_equal(runs, "mat", SEEDS)
    if complete:
        mvf.rule("Primary, g = mat - full-equal (validation, last evaluation)", g,
                 "MAT lower at equal compute", "MAT higher at equal compute")
    else:
        print("\nNot all ten runs reached their last step (or FLOPs differ by more than 1 %): "
              "no conclusion (README.md's plan).")
    old, _ = against_full_equal(runs, "mat", (21, 22))
    if complete and len(old) == 2:
        summary("Exploratory: g pooled with ../mat-vs-full-1nat's addendum (seeds 21, 22; "
                "known before this plan)", old + g)
    h, h_complete = against_full_equal(runs, "frozen-random", SEEDS)
    for seed in NEW_SEEDS:  # the plan: the new frozen-random runs kept MAT's counts throughout
        replay = lvr.replay_matches(run_dir(runs, "mat", seed), run_dir(runs, "frozen-random", seed))
        if replay is None or replay[1] != 0:
            h_complete = False
    if h_complete:
        mvf.rule("Secondary, h = frozen-random - full-equal (validation, last evaluation)", h,
                 "the fixed random set lower at MAT's compute",
                 "the fixed random set higher at MAT's compute")
    else:
        print("\nSecondary unfinished: not applied (README.md's plan).")
    print("\nWithout a rule: frozen-random - mat (the question of ../lambda-vs-random/)")
    f = []
    for seed in (21, 22, 23, 25, 26) + NEW_SEEDS:
        m, c = curve(runs, "mat", seed), curve(runs, "frozen-random", seed)
        if m is None or c is None:
            print(f"  seed {seed}: no evaluation yet")
            continue
        replay = lvr.replay_matches(run_dir(runs, "mat", seed), run_dir(runs, "frozen-random", seed))
        counts = "?" if replay is None else f"{replay[1]} of {replay[0]}"
        done = m[-1]["step"] == STEPS and c[-1]["step"] == STEPS
        print(f"  seed {seed}: mat {m[-1]['val_loss']:.4f}, frozen-random {c[-1]['val_loss']:.4f}"
              f"{'' if done else ' (unfinished)'}, f = {c[-1]['val_loss'] - m[-1]['val_loss']:+.4f};"
              f" counts differ at {counts} decisions")
        if done and replay is not None and replay[1] == 0:
            f.append(c[-1]["val_loss"] - m[-1]["val_loss"])
    if len(f) == 7:
        summary("f = frozen-random - mat, seeds 21-23, 25-28", f)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--equal-steps":
        print(equal_steps(sys.argv[2]))
    else:
        main(sys.argv[1] if len(sys.argv) > 1 else HERE / "kept-runs")
