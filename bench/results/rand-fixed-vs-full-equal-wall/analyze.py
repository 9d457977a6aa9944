#!/usr/bin/env python3
"""The registered test of README.md beside this file: one random half of every module group drawn
at step 0 and kept for the whole run (`policy.kind=rand`, `rand_fraction` 0.5, `probe_every`
24,000, `warmup_steps` 0; no probes), for the config's 24,000 steps (randfixed-sN, new runs),
against kept arms on the same seeds 23, 25, 26, 27, 28:
- primary: p_N = randfixed - full-wall (../rand-vs-full-equal-wall/: full training for 17,996
  steps, the step count rand's measured wall ratio makes equal);
- secondary: q_N = randfixed - rand2000 (../rand2000-vs-full-equal-wall/: a half re-drawn every
  2,000 steps from step 0, 24,000 steps);
each in validation loss at each run's last evaluation, with the mean, SD, SE (SD / sqrt(5)) and the
criterion (below 0 by more than 2 SE: lower; above by more: higher; otherwise not resolved),
applied only when all five new runs ended as planned (README.md). Without a rule: against
frozen-random, MAT and rand at 24,000 steps; the curves; seconds per step. Reads the runs'
metrics.jsonl (validation only), summary.json, decisions.jsonl and logs, and mat-train.sha256; no
test figure.
Usage: bench/results/rand-fixed-vs-full-equal-wall/analyze.py [RUNS]   (default: kept-runs here)
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


# The rand2000 test's module: its run check (rand2000_finished, with its REDRAW set to this test's
# interval below), BINARY, and through it the rand test's and the earlier tests' helpers.
r2k = load("r2k", HERE.parent / "rand2000-vs-full-equal-wall" / "analyze.py")
rw, wall, meq, mvf, ftec = r2k.rw, r2k.wall, r2k.meq, r2k.mvf, r2k.ftec
RW_RUNS = r2k.RW_RUNS
R2K_RUNS = HERE.parent / "rand2000-vs-full-equal-wall" / "kept-runs"

SEEDS = r2k.SEEDS  # 23, 25, 26, 27, 28
STEPS = r2k.STEPS  # 24,000
r2k.REDRAW = STEPS  # one decision, at step 0: exactly half of every group, kept to the end
BINARY = r2k.BINARY  # the rand2000 test's binary, rebuilt from 259fb24 and checked there


def unruled(runs):
    """Without a rule, over the runs with an evaluation at step 24,000."""
    new = r2k.common_unruled(runs, "randfixed")
    done = list(new)
    rand = [new[s]["val_loss"] - wall.evals(RW_RUNS / f"rand-s{s}")[-1]["val_loss"] for s in done]
    if done:
        print(f"\nWithout a rule: randfixed - rand (re-drawn every 40; seeds {done}): "
              + ", ".join(f"{x:+.4f}" for x in rand))
    if len(done) >= 2:  # added after the results were read (no rule): the step count's uncertainty
        longer = {"full-equal (18,557-19,288 steps; ../mat-vs-full-equal-compute/)":
                      lambda s: meq.run_dir(rw.MEQ_RUNS, "full-equal", s),
                  "full-wall (20,611; ../mat-vs-full-equal-wall-long/)": lambda s: rw.LONG_RUNS / f"full-wall-s{s}",
                  "full-wall (21,891; ../mat-vs-full-equal-wall/)": lambda s: wall.HERE / "kept-runs" / f"full-wall-s{s}"}
        for name, where in longer.items():
            ends = {s: wall.evals(where(s))[-1] for s in done}
            meq.summary(f"Without a rule, added after the results: randfixed - {name}; steps "
                        + ", ".join(str(e["step"]) for e in ends.values()),
                        [new[s]["val_loss"] - ends[s]["val_loss"] for s in done])
    same = []
    for s in SEEDS:  # the same first half as rand2000-sN: the same figures up to its first re-draw
        mine = {e["step"]: e for e in wall.evals(runs / f"randfixed-s{s}")}
        theirs = {e["step"]: e for e in wall.evals(R2K_RUNS / f"rand2000-s{s}")}
        same.append(f"s{s} " + ("yes" if all(k in mine and all(mine[k][f] == theirs[k][f] for f in (
            "train_loss", "val_loss", "flops")) for k in (1000, 2000)) else "no"))
    print("\nWithout a rule: train and validation loss and FLOPs at steps 1,000 and 2,000 equal to "
          "rand2000's (the same first half): " + ", ".join(same))
    d = runs / "randfixed-s29"  # added before its run, no rule
    ev = wall.evals(d)
    ok, why = r2k.rand2000_finished(d, 29)
    if ev and ok and ev[-1]["step"] == STEPS:
        others = {"full-wall-s29 (17,996)": R2K_RUNS / "full-wall-s29",
                  "rand2000-s29": r2k.PILOT_RUNS / "rand2000-s29", "rand40-s29": r2k.PILOT_RUNS / "rand40-s29"}
        print(f"\nWithout a rule (seed 29): randfixed-s29 {ev[-1]['val_loss']:.4f}; minus "
              + ", ".join(f"{n} {ev[-1]['val_loss'] - wall.evals(o)[-1]['val_loss']:+.4f}" for n, o in others.items()))
    else:
        print(f"\nrandfixed-s29: not finished as planned ({why or 'last evaluation not at 24,000'})")


def main(runs):
    runs = pathlib.Path(runs)
    print("randfixed: 24,000 steps, one half of each group drawn at step 0 and kept; full-wall: "
          f"../rand-vs-full-equal-wall/kept-runs ({r2k.WALL_STEPS} steps); rand2000: "
          "../rand2000-vs-full-equal-wall/kept-runs")
    p, q, complete = r2k.paired(runs, "randfixed", "rand2000", R2K_RUNS)
    if not complete:
        print("\nNot all five new runs ended as planned (README.md): no conclusion. What finished:")
        unruled(runs)
        return
    mvf.rule("Primary, p = randfixed - full-wall (validation, last evaluation)", p,
             "randfixed lower at the step count rand's measured wall ratio makes equal",
             "randfixed higher at the step count rand's measured wall ratio makes equal")
    mvf.rule("Secondary, q = randfixed - rand2000 (validation, both 24,000 steps)", q,
             "a half kept for the whole run ends lower than one re-drawn every 2,000 steps",
             "a half kept for the whole run ends higher than one re-drawn every 2,000 steps")
    unruled(runs)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else HERE / "kept-runs")
