#!/usr/bin/env python3
"""The registered test of README.md beside this file: ../mat-vs-full-equal-wall/'s test again, with
full training given the step count of the longer wall measurement (full-wall here: the config's
rate, `train.steps` = 24,000 x 0.858785, ../mat-vs-full-equal-wall/mat-wall-long.json's ratio,
rounded: 20,611), on seeds 23, 25, 26, 27, 28. Primary: w_N = mat - full-wall in validation loss
at each run's last evaluation, the mean, SD, SE (SD / sqrt(5)) and the criterion (below 0 by more
than 2 SE: MAT lower; above by more: MAT higher; otherwise not resolved), applied only when all
five runs ended as planned (summary.json: mode full, seed N, 20,611 steps; the config's peak rate;
the binary's sha256 99c7589d...). Secondary: v_N = frozen-random - full-wall, the same rule.
Without a rule: full-wall here against ../mat-vs-full-equal-wall/'s 21,891-step runs and the
full-equal runs, and against the linear estimate that README stated before these runs.
Reads metrics.jsonl only; no test figure.
Usage:
  bench/results/mat-vs-full-equal-wall-long/analyze.py [RUNS]   (default: kept-runs beside this file)
  bench/results/mat-vs-full-equal-wall-long/analyze.py --wall-steps   (run.sh's train.steps)
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


# The earlier test's functions, read with this test's step count (they read these two globals).
wall = load("wall", HERE.parent / "mat-vs-full-equal-wall" / "analyze.py")
WALL_RUNS = HERE.parent / "mat-vs-full-equal-wall" / "kept-runs"
# ../mat-vs-full-equal-wall/mat-wall-long.json's wall_ratio_median as committed in b48e8a6 (seed 23,
# floor 1/2, one round of 1,200 s side by side, steps 1,000-18,750 full and -22,000 MAT): fixed
# here so that a later measurement cannot move the plan.
WALL_RATIO = 0.8587850040775074
WALL_STEPS = round(wall.meq.STEPS * WALL_RATIO)  # 20,611
wall.WALL_RATIO, wall.WALL_STEPS = WALL_RATIO, WALL_STEPS
# The linear estimate of w that ../mat-vs-full-equal-wall/README.md stated before these runs
# (between each seed's full-equal and 21,891-step ends, at 20,616 steps), by seed.
ESTIMATE = {23: -0.119, 25: -0.139, 26: +0.060, 27: -0.091, 28: -0.028}


def main(runs):
    runs = pathlib.Path(runs)
    print(f"full-wall: {WALL_STEPS} steps (24,000 x wall ratio {WALL_RATIO:.4f}, the longer "
          f"window), peak lr {wall.CONFIG_LR} (the config's)")
    w, complete = wall.against_wall(runs, "mat")
    if complete:
        wall.mvf.rule("Primary, w = mat - full-wall (validation, last evaluation)", w,
                      "MAT lower at the step count the longer window's ratio makes equal",
                      "MAT higher at the step count the longer window's ratio makes equal")
    else:
        print("\nNot all five full-wall runs reached their last step at the config's rate as "
              "full training with the planned binary: no conclusion (README.md's plan).")
    v, v_complete = wall.against_wall(runs, "frozen-random")
    if v_complete:
        wall.mvf.rule("Secondary, v = frozen-random - full-wall (validation, last evaluation)", v,
                      "the fixed random set lower at that step count (its wall time not measured)",
                      "the fixed random set higher at that step count (its wall time not measured)")
    else:
        print("\nSecondary unfinished: not applied (README.md's plan).")
    if not complete:
        return
    here = {s: wall.evals(runs / f"full-wall-s{s}")[-1]["val_loss"] for s in wall.SEEDS}
    longer = {s: wall.evals(WALL_RUNS / f"full-wall-s{s}")[-1]["val_loss"] for s in wall.SEEDS}
    wall.meq.summary("Without a rule: full-wall (20,611) - full-wall (21,891), "
                     "../mat-vs-full-equal-wall/", [here[s] - longer[s] for s in wall.SEEDS])
    equal = {s: wall.meq.curve(wall.MEQ_RUNS, "full-equal", s)[-1]["val_loss"]
             for s in wall.SEEDS}
    wall.meq.summary("Without a rule: full-wall (20,611) - full-equal (about 18,800)",
                     [here[s] - equal[s] for s in wall.SEEDS])
    print("\nseed  w here   the estimate stated before the runs  w here - estimate")
    for s, ws in zip(wall.SEEDS, w):
        print(f"{s:4d}  {ws:+.4f}  {ESTIMATE[s]:+.3f}                               "
              f"{ws - ESTIMATE[s]:+.4f}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--wall-steps"]:
        print(WALL_STEPS)
    else:
        main(sys.argv[1] if len(sys.argv) > 1 else HERE / "kept-runs")
