#!/usr/bin/env python3
"""The registered test of README.md beside this file. Tuning: full training for 18,798 steps on
seed 101 at four peak learning rates; the chosen one has the lowest validation loss at the last
evaluation (all four must reach it). Primary: g'_N = mat - full-tuned in validation loss at each
run's last evaluation, N = 23, 25, 26, 27, 28 (full-tuned-sN: full training at the chosen learning
rate with mat-sN's compute; when the chosen rate is the config's 1e-3 it is
../mat-vs-full-equal-compute/'s full-equal-sN); the mean, standard deviation, standard error
(SD / sqrt(5)) and the criterion (mean below 0 by more than 2 standard errors: MAT lower; above 0
by more: MAT higher; otherwise not resolved), applied only when all five full-tuned runs reached
their last step at the planned learning rate and their FLOPs are within 1 % of their MAT runs'.
Secondary: h'_N = frozen-random - full-tuned, the same rule. Without a criterion: full-tuned -
full-equal per seed, differences at [MASK], seconds per step. Reads metrics.jsonl only; no test
figure.
Usage:
  bench/results/full-tuned-equal-compute/analyze.py [RUNS]   (default: kept-runs beside this file)
  bench/results/full-tuned-equal-compute/analyze.py --chosen-lr RUNS   (run.sh: the chosen rate)
  bench/results/full-tuned-equal-compute/analyze.py --equal-steps SEED   (run.sh's train.steps)
"""
import contextlib
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
regime, mvf, lvr = meq.regime, meq.mvf, meq.lvr
MEQ_RUNS = HERE.parent / "mat-vs-full-equal-compute" / "kept-runs"

TUNING_SEED = 101
TUNING_STEPS = 18798  # the mean of full-equal-s23, -s25, -s26, -s27, -s28's steps
TUNING_LRS = ("0.0007", "0.001", "0.0014", "0.002")
CONFIG_LR = "0.001"
SEEDS = meq.SEEDS
WARMUP = 100  # the config's train.warmup_steps


def evals(d):
    return regime.evaluations(d) if (d / "metrics.jsonl").is_file() else []


def peak_lr(rows, steps):
    """The peak learning rate a run used, from the rate logged at its first evaluation past the
    warm-up (linear decay to zero at `steps`: the rate logged at step s is the one step s - 1
    used)."""
    row = next((r for r in rows if WARMUP < r["step"] < steps), None)
    return None if row is None else row["lr"] * (steps - WARMUP) / (steps - row["step"] + 1)


def diverged(runs, name):
    """Whether the run stopped on a non-finite training loss (its log: NAME.log beside the run
    while run.sh runs, NAME/mat-train.log once kept)."""
    for log in (runs / f"{name}.log", runs / name / "mat-train.log"):
        if log.is_file() and "training loss is not finite" in log.read_text(errors="replace"):
            return True
    return False


def tuning(runs):
    """Prints the tuning table; returns the chosen rate (a string of TUNING_LRS) or None. A run
    that stopped on a non-finite loss is ranked last (a rate that diverges is a result); any other
    unfinished run means no choice. Ties (equal losses) go to the config's rate, then the lower."""
    print(f"Tuning: full training, {TUNING_STEPS} steps, seed {TUNING_SEED} (validation, last "
          f"evaluation)")
    print("peak lr   val loss  at [MASK]  step   peak lr read back  s/step")
    ends, complete = {}, True
    full_per_step = meq.full_flops_per_step()
    for lr in TUNING_LRS:
        name = f"tune-lr{lr}-s{TUNING_SEED}"
        rows = evals(runs / name)
        if diverged(runs, name):
            print(f"{lr:8s}  diverged (a non-finite training loss) after step "
                  f"{rows[-1]['step'] if rows else 0}: ranked last")
            continue
        if not rows:
            print(f"{lr:8s}  no evaluation yet")
            complete = False
            continue
        last, peak = rows[-1], peak_lr(rows, TUNING_STEPS)
        per_step = last["flops"]["total"] / last["step"]
        ok = (last["step"] == TUNING_STEPS and peak is not None
              and abs(peak / float(lr) - 1) < 0.01 and abs(per_step / full_per_step - 1) < 0.01)
        complete = complete and ok
        print(f"{lr:8s}  {last['val_loss']:.4f}    {last['val_loss_at_mask']:.4f}     "
              f"{last['step']:5d}  {peak if peak is None else f'{peak:.6f}'}           "
              f"{last['wall_seconds'] / last['step']:.3f}")
        ends[lr] = last["val_loss"]
    if not complete or not ends:
        print("Not every tuning run either reached its last step at its learning rate (as full "
              "training) or diverged: no rate chosen (README.md's plan).")
        return None
    chosen = min(ends, key=lambda lr: (ends[lr], lr != CONFIG_LR, float(lr)))
    print(f"chosen: {chosen} (lowest validation loss{', the config' + chr(39) + 's' if chosen == CONFIG_LR else ''})")
    return chosen


def tuned_dir(runs, chosen, seed):
    if chosen == CONFIG_LR:
        return MEQ_RUNS / f"full-equal-s{seed}"
    return runs / f"full-tuned-s{seed}"


def against_tuned(runs, chosen, kind):
    """Rows of kind (mat or frozen-random) against full-tuned; (differences, complete)."""
    print(f"\nseed  full-tuned (steps)  {kind:13s}  {kind} - full-tuned  at [MASK]  "
          f"FLOPs {kind}/full-tuned  full-equal  s/step full-tuned")
    diffs, complete = [], True
    for seed in SEEDS:
        tuned, other = evals(tuned_dir(runs, chosen, seed)), meq.curve(MEQ_RUNS, kind, seed)
        if not tuned or other is None:
            print(f"{seed:4d}  no evaluation yet of {'full-tuned' if not tuned else kind}")
            complete = False
            continue
        t, o = tuned[-1], other[-1]
        planned = meq.equal_steps(meq.run_dir(MEQ_RUNS, "mat", seed))
        peak = peak_lr(tuned, planned)
        ratio = o["flops"]["total"] / t["flops"]["total"]
        if (t["step"] != planned or o["step"] != meq.STEPS or abs(ratio - 1) > 0.01
                or peak is None or abs(peak / float(chosen) - 1) > 0.01):
            complete = False
        equal = meq.curve(MEQ_RUNS, "full-equal", seed)[-1]["val_loss"]
        steps = f"{t['step']}" + ("" if t["step"] == planned else f" of {planned}")
        print(f"{seed:4d}  {t['val_loss']:.4f} ({steps})   {o['val_loss']:.4f}         "
              f"{o['val_loss'] - t['val_loss']:+.4f}            "
              f"{o['val_loss_at_mask'] - t['val_loss_at_mask']:+.4f}    {ratio:.4f}"
              f"                 {equal:.4f}      {t['wall_seconds'] / t['step']:.3f}")
        diffs.append(o["val_loss"] - t["val_loss"])
    return diffs, complete and len(diffs) == len(SEEDS)


def main(runs):
    runs = pathlib.Path(runs)
    chosen = tuning(runs)
    if chosen is None:
        return
    print(f"\nTest: full training at peak lr {chosen} with MAT's compute"
          + (" (the config's rate: ../mat-vs-full-equal-compute/'s full-equal runs)"
             if chosen == CONFIG_LR else ""))
    g, complete = against_tuned(runs, chosen, "mat")
    if complete:
        mvf.rule("Primary, g' = mat - full-tuned (validation, last evaluation)", g,
                 "MAT lower than tuned full training at equal compute",
                 "MAT higher than tuned full training at equal compute")
    else:
        print("\nNot all five full-tuned runs reached their last step at the chosen rate (or "
              "FLOPs differ by more than 1 %): no conclusion (README.md's plan).")
    h, h_complete = against_tuned(runs, chosen, "frozen-random")
    if h_complete:
        mvf.rule("Secondary, h' = frozen-random - full-tuned (validation, last evaluation)", h,
                 "the fixed random set lower than tuned full training at equal compute",
                 "the fixed random set higher than tuned full training at equal compute")
    else:
        print("\nSecondary unfinished: not applied (README.md's plan).")
    if chosen != CONFIG_LR:
        d = []
        for seed in SEEDS:
            tuned = evals(tuned_dir(runs, chosen, seed))
            if tuned and tuned[-1]["step"] == meq.equal_steps(meq.run_dir(MEQ_RUNS, "mat", seed)):
                d.append(tuned[-1]["val_loss"]
                         - meq.curve(MEQ_RUNS, "full-equal", seed)[-1]["val_loss"])
        if len(d) == len(SEEDS):
            meq.summary("Without a rule: full-tuned - full-equal (what the tuned rate changed)", d)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--chosen-lr":
        with contextlib.redirect_stdout(sys.stderr):  # the table: run.sh's stderr
            lr = tuning(pathlib.Path(sys.argv[2]))
        if lr is None:
            sys.exit(1)
        print(lr)
    elif len(sys.argv) == 3 and sys.argv[1] == "--equal-steps":
        print(meq.equal_steps(meq.run_dir(MEQ_RUNS, "mat", int(sys.argv[2]))))
    else:
        main(sys.argv[1] if len(sys.argv) > 1 else HERE / "kept-runs")
