#!/usr/bin/env python3
"""The registered test of README.md beside this file: MAT with the floor (24,000 steps) against
full training given the wall time MAT's steps take on this CPU (full-wall: the config's rate,
`train.steps` = 24,000 x the wall ratio that `bench/run mat-wall` measured, 0.912, rounded:
21,891), on seeds 23, 25, 26, 27, 28. Primary: w_N = mat - full-wall in validation loss at each
run's last evaluation; the mean, standard deviation, standard error (SD / sqrt(5)) and the
criterion (mean below 0 by more than 2 standard errors: MAT lower; above 0 by more: MAT higher;
otherwise not resolved), applied only when all five full-wall runs reached their last step at the
config's peak rate as full training (summary.json: seed N, 21,891 steps; the binary's sha256
99c7589d...). Secondary: v_N = frozen-random - full-wall, the same rule.
Without a criterion: full-wall against full-equal and against the 24,000-step full runs at the
same step, differences at [MASK], seconds per step. Reads metrics.jsonl only; no test figure.
Usage:
  bench/results/mat-vs-full-equal-wall/analyze.py [RUNS]   (default: kept-runs beside this file)
  bench/results/mat-vs-full-equal-wall/analyze.py --wall-steps   (run.sh's train.steps)
"""
import importlib.util
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent


def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


meq = load("meq", HERE.parent / "mat-vs-full-equal-compute" / "analyze.py")
ftec = load("ftec", HERE.parent / "full-tuned-equal-compute" / "analyze.py")  # peak_lr
mvf = meq.mvf
MEQ_RUNS = HERE.parent / "mat-vs-full-equal-compute" / "kept-runs"

SEEDS = meq.SEEDS
# ../mat-wall.json's wall_ratio_median as committed in 5e777d5, unchanged at b0e67a5 (seed 23, floor 1/2, steps
# 1,000-2,500, two rounds of 150 s side by side, one thread each): fixed here so that a later
# `bench/run mat-wall` cannot move the plan.
WALL_RATIO = 0.912108205189984
WALL_STEPS = round(meq.STEPS * WALL_RATIO)  # 21,891
CONFIG_LR = 0.001
BINARY = "99c7589dc973c7d982f01af360934e9cbf89c477655e7032e8ef078240506e2f"


def evals(d):
    return meq.regime.evaluations(d) if (d / "metrics.jsonl").is_file() else []


def binary_ok(runs):
    sha = runs / "mat-train.sha256"
    return sha.is_file() and sha.read_text().split()[:1] == [BINARY]


def finished(runs, seed):
    """Whether full-wall-sSEED ended normally as planned (summary.json: its seed, 21,891 steps)."""
    summary = runs / f"full-wall-s{seed}" / "summary.json"
    if not summary.is_file():
        return False
    s = meq.json.loads(summary.read_text())
    return s.get("seed") == seed and s.get("steps") == WALL_STEPS and s.get("mode") == "full"


def against_wall(runs, kind):
    """Rows of kind (mat or frozen-random) against full-wall; (differences, complete)."""
    print(f"\nseed  full-wall (steps)  {kind:13s}  {kind} - full-wall  at [MASK]  "
          f"full-equal  24k full at that step  s/step full-wall")
    diffs, complete = [], True
    full_per_step = meq.full_flops_per_step()
    for seed in SEEDS:
        wall, other = evals(runs / f"full-wall-s{seed}"), meq.curve(MEQ_RUNS, kind, seed)
        if ftec.diverged(runs, f"full-wall-s{seed}"):
            print(f"{seed:4d}  full-wall diverged (a non-finite training loss) after step "
                  f"{wall[-1]['step'] if wall else 0}")
            complete = False
            continue
        if not wall or other is None:
            print(f"{seed:4d}  no evaluation yet of {'full-wall' if not wall else kind}")
            complete = False
            continue
        w, o = wall[-1], other[-1]
        peak = ftec.peak_lr(wall, WALL_STEPS)
        if (w["step"] != WALL_STEPS or not finished(runs, seed) or o["step"] != meq.STEPS
                or peak is None
                or abs(peak / CONFIG_LR - 1) > 0.01
                or abs(w["flops"]["total"] / w["step"] / full_per_step - 1) > 0.01):
            complete = False
        equal = meq.curve(MEQ_RUNS, "full-equal", seed)[-1]["val_loss"]
        full = meq.curve(MEQ_RUNS, "full", seed) if seed in (23, 25, 26) else None
        long_run = mvf.at_step(full, w["step"]) if full else None
        steps = f"{w['step']}" + ("" if w["step"] == WALL_STEPS else f" of {WALL_STEPS}")
        print(f"{seed:4d}  {w['val_loss']:.4f} ({steps})   {o['val_loss']:.4f}         "
              f"{o['val_loss'] - w['val_loss']:+.4f}            "
              f"{o['val_loss_at_mask'] - w['val_loss_at_mask']:+.4f}    {equal:.4f}      "
              f"{'-' if long_run is None else f'{long_run:.4f}'}                "
              f"{w['wall_seconds'] / w['step']:.3f}")
        diffs.append(o["val_loss"] - w["val_loss"])
    return diffs, complete and len(diffs) == len(SEEDS) and binary_ok(runs)


def main(runs):
    runs = pathlib.Path(runs)
    print(f"full-wall: {WALL_STEPS} steps (24,000 x wall ratio {WALL_RATIO:.4f}), peak lr "
          f"{CONFIG_LR} (the config's)")
    w, complete = against_wall(runs, "mat")
    if complete:
        mvf.rule("Primary, w = mat - full-wall (validation, last evaluation)", w,
                 "MAT lower at equal wall time (this CPU's ratio)",
                 "MAT higher at equal wall time (this CPU's ratio)")
    else:
        print("\nNot all five full-wall runs reached their last step at the config's rate as "
              "full training with the planned binary: no conclusion (README.md's plan).")
    v, v_complete = against_wall(runs, "frozen-random")
    if v_complete:
        mvf.rule("Secondary, v = frozen-random - full-wall (validation, last evaluation)", v,
                 "the fixed random set lower at MAT's wall time",
                 "the fixed random set higher at MAT's wall time")
    else:
        print("\nSecondary unfinished: not applied (README.md's plan).")
    if complete:
        d = [evals(runs / f"full-wall-s{seed}")[-1]["val_loss"]
             - meq.curve(MEQ_RUNS, "full-equal", seed)[-1]["val_loss"] for seed in SEEDS]
        meq.summary("Without a rule: full-wall - full-equal (what 2,603-3,334 more steps gave "
                    "full training)", d)


if __name__ == "__main__":
    if sys.argv[1:] == ["--wall-steps"]:
        print(WALL_STEPS)
    else:
        main(sys.argv[1] if len(sys.argv) > 1 else HERE / "kept-runs")
