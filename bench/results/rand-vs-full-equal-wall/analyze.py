#!/usr/bin/env python3
"""The registered test of README.md beside this file: a random half of every module group, drawn
afresh at every decision (`policy.kind=rand`, `rand_fraction` 0.5; no probes), for the config's
24,000 steps (rand-sN), against full training at the config's rate for the step count that rand's
measured wall ratio makes equal (full-wall-sN: 24,000 x the mean of the two rounds below,
rounded), on seeds 23, 25, 26, 27, 28. Primary: r_N = rand - full-wall in validation loss at each
run's last evaluation; the mean, SD, SE (SD / sqrt(5)) and the criterion (below 0 by more than
2 SE: rand lower; above by more: rand higher; otherwise not resolved), applied only when all ten
runs ended as planned (README.md). Without a rule: rand against the 24,000-step full runs (seeds
23, 25, 26), against MAT and frozen-random at 24,000 steps, and full-wall here against the longer
full-wall runs; seconds per step. Reads the runs' metrics.jsonl, summary.json, decisions.jsonl
and logs (divergence) and mat-train.sha256; no test figure.
Usage:
  bench/results/rand-vs-full-equal-wall/analyze.py [RUNS]   (default: kept-runs beside this file)
  bench/results/rand-vs-full-equal-wall/analyze.py --wall-steps   (run.sh's train.steps)
"""
import importlib.util
import json
import lzma
import pathlib
import statistics
import sys

HERE = pathlib.Path(__file__).resolve().parent


def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The earlier wall test's helpers (evals, binary_ok, BINARY, CONFIG_LR) and through it meq (curve,
# summary, full_flops_per_step), mvf (rule, at_step), ftec (peak_lr, diverged).
wall = load("wall", HERE.parent / "mat-vs-full-equal-wall" / "analyze.py")
meq, mvf, ftec = wall.meq, wall.mvf, wall.ftec
MEQ_RUNS = wall.MEQ_RUNS
LONG_RUNS = HERE.parent / "mat-vs-full-equal-wall-long" / "kept-runs"

SEEDS = (23, 25, 26, 27, 28)
STEPS = meq.STEPS  # 24,000, the config's
RAND_FRACTION = 0.5
WARMUP = 300  # the config's policy.warmup_steps: every decision before it is all active
PROBE_EVERY = 40  # the config's policy.probe_every: rand decides at every such step
# `bench/run mat-wall` with policy.kind=rand, rand_fraction 0.5, one round each, two runs side by
# side, one thread each, nothing else running, steps from 1,000: wall_ratio as each file holds it.
# Fixed here so that a later measurement cannot move the plan.
RATIOS = {
    "../mat-vs-full-equal-wall-long/rand-wall.json (seed 23, 600 s)": 0.7078189655546593,
    "rand-wall-2.json (seed 25, 900 s)": 0.7918768135910987,
}
WALL_RATIO = statistics.fmean(RATIOS.values())
WALL_STEPS = round(STEPS * WALL_RATIO)  # 17,996


def decisions(d):
    for name, opener in (("decisions.jsonl", open), ("decisions.jsonl.xz", lzma.open)):
        if (d / name).is_file():
            with opener(d / name, "rt") as f:
                return [json.loads(line) for line in f if line.strip()]
    return []


def rand_finished(d, seed):
    """Whether rand-sSEED ended as planned: summary.json mode rand, its seed, 24,000 steps; every
    decision before the warm-up's end all active and every later one exactly half of each group
    (by group name); decisions reaching the last probe step. Returns (ok, why-not)."""
    if not (d / "summary.json").is_file():
        return False, "no summary.json"
    s = json.loads((d / "summary.json").read_text())
    if s.get("mode") != "rand" or s.get("seed") != seed or s.get("steps") != STEPS:
        return False, f"summary says mode {s.get('mode')}, seed {s.get('seed')}, steps {s.get('steps')}"
    rows = decisions(d)
    if [r["step"] for r in rows] != list(range(0, STEPS, PROBE_EVERY)):
        return False, f"decisions are not one at every {PROBE_EVERY}th step from 0 to {STEPS - PROBE_EVERY}"
    for row in rows:
        size, active = {}, {}
        for m in row["modules"]:
            size[m["group"]] = size.get(m["group"], 0) + 1
            active[m["group"]] = active.get(m["group"], 0) + bool(m["active"])
        want = {g: n if row["step"] < WARMUP else round(RAND_FRACTION * n) for g, n in size.items()}
        if active != want:
            return False, f"step {row['step']}: active {active}, planned {want}"
    return True, ""


def full_finished(runs, seed, rows, full_per_step):
    """Whether full-wall-sSEED ended as planned: summary.json mode full, its seed, WALL_STEPS; its
    last evaluation at WALL_STEPS with full training's FLOPs per step (within 1 %) and the config's
    peak rate (within 1 %). Returns (ok, why-not)."""
    summary = runs / f"full-wall-s{seed}" / "summary.json"
    if not summary.is_file():
        return False, "no summary.json"
    s = json.loads(summary.read_text())
    if s.get("seed") != seed or s.get("steps") != WALL_STEPS or s.get("mode") != "full":
        return False, f"summary says mode {s.get('mode')}, seed {s.get('seed')}, steps {s.get('steps')}"
    last, peak = rows[-1], ftec.peak_lr(rows, WALL_STEPS)
    if last["step"] != WALL_STEPS:
        return False, f"last evaluation at step {last['step']}"
    if abs(last["flops"]["total"] / last["step"] / full_per_step - 1) > 0.01:
        return False, "FLOPs per step not full training's"
    if peak is None or abs(peak / wall.CONFIG_LR - 1) > 0.01:
        return False, f"peak rate {peak}, not the config's {wall.CONFIG_LR}"
    return True, ""


def primary(runs):
    """Rows of rand against full-wall; (differences, complete)."""
    print(f"\nseed  full-wall (steps)  rand (24,000)  rand - full-wall  at [MASK]  "
          f"FLOPs rand/24k full  s/step full-wall, rand")
    diffs, complete = [], True
    full_per_step = meq.full_flops_per_step()
    for seed in SEEDS:
        fw, rd = wall.evals(runs / f"full-wall-s{seed}"), wall.evals(runs / f"rand-s{seed}")
        bad = [n for n in (f"full-wall-s{seed}", f"rand-s{seed}") if ftec.diverged(runs, n)]
        if bad:
            print(f"{seed:4d}  {', '.join(bad)} diverged (a non-finite training loss)")
            complete = False
            continue
        if not fw or not rd:
            print(f"{seed:4d}  no evaluation yet of {'full-wall' if not fw else 'rand'}")
            complete = False
            continue
        w, r = fw[-1], rd[-1]
        ok, why = rand_finished(runs / f"rand-s{seed}", seed)
        fok, fwhy = full_finished(runs, seed, fw, full_per_step)
        for name, good, reason in ((f"rand-s{seed}", ok, why), (f"full-wall-s{seed}", fok, fwhy)):
            if not good:
                print(f"      {name} not as planned: {reason}")
        if not ok or not fok or r["step"] != STEPS:
            complete = False
        steps = f"{w['step']}" + ("" if w["step"] == WALL_STEPS else f" of {WALL_STEPS}")
        rend = f"{r['val_loss']:.4f}" + ("" if r["step"] == STEPS else f" (step {r['step']})")
        print(f"{seed:4d}  {w['val_loss']:.4f} ({steps})   {rend}         "
              f"{r['val_loss'] - w['val_loss']:+.4f}            "
              f"{r['val_loss_at_mask'] - w['val_loss_at_mask']:+.4f}    "
              f"{r['flops']['total'] / (r['step'] * full_per_step):.4f}              "
              f"{w['wall_seconds'] / w['step']:.3f}, {r['wall_seconds'] / r['step']:.3f}")
        diffs.append(r["val_loss"] - w["val_loss"])
    return diffs, complete and len(diffs) == len(SEEDS) and wall.binary_ok(runs)


def unruled(runs):
    rand = {s: wall.evals(runs / f"rand-s{s}")[-1]["val_loss"] for s in SEEDS}
    here = {s: wall.evals(runs / f"full-wall-s{s}")[-1]["val_loss"] for s in SEEDS}
    full = {s: meq.curve(MEQ_RUNS, "full", s)[-1]["val_loss"] for s in (23, 25, 26)}
    print("\nWithout a rule: rand - full training at 24,000 steps (../mat-vs-full-1nat/, seeds "
          "23, 25, 26): " + ", ".join(f"{rand[s] - full[s]:+.4f}" for s in full))
    for kind in ("mat", "frozen-random"):
        other = {s: meq.curve(MEQ_RUNS, kind, s)[-1]["val_loss"] for s in SEEDS}
        meq.summary(f"Without a rule: rand - {kind} (both 24,000 steps)",
                    [rand[s] - other[s] for s in SEEDS])
    longer = {s: wall.evals(LONG_RUNS / f"full-wall-s{s}")[-1]["val_loss"] for s in SEEDS}
    meq.summary(f"Without a rule: full-wall ({WALL_STEPS}) - full-wall (20,611), "
                "../mat-vs-full-equal-wall-long/", [here[s] - longer[s] for s in SEEDS])


def main(runs):
    runs = pathlib.Path(runs)
    for name, ratio in RATIOS.items():
        print(f"wall ratio {ratio:.4f}: {name}")
    print(f"full-wall: {WALL_STEPS} steps (24,000 x {WALL_RATIO:.4f}, the mean), peak lr "
          f"{wall.CONFIG_LR} (the config's); rand: 24,000 steps, fraction {RAND_FRACTION}")
    r, complete = primary(runs)
    if not complete:
        print("\nNot all ten runs ended as planned (README.md): no conclusion.")
        return
    mvf.rule("Primary, r = rand - full-wall (validation, last evaluation)", r,
             "rand lower at the step count its measured wall ratio makes equal",
             "rand higher at the step count its measured wall ratio makes equal")
    unruled(runs)


if __name__ == "__main__":
    if sys.argv[1:] == ["--wall-steps"]:
        print(WALL_STEPS)
    else:
        main(sys.argv[1] if len(sys.argv) > 1 else HERE / "kept-runs")
