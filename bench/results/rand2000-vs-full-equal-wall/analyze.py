#!/usr/bin/env python3
"""The registered test of README.md beside this file: a random half of every module group kept for
2,000 steps and then re-drawn (`policy.kind=rand`, `rand_fraction` 0.5, `probe_every` 2,000,
`warmup_steps` 0; no probes), for the config's 24,000 steps (rand2000-sN, new runs), against two
kept arms of ../rand-vs-full-equal-wall/ on the same seeds 23, 25, 26, 27, 28:
- primary: p_N = rand2000 - full-wall (full training for 17,996 steps, the step count rand's
  measured wall ratio makes equal);
- secondary: q_N = rand2000 - rand (the same half re-drawn every 40 steps, 24,000 steps);
each in validation loss at each run's last evaluation, with the mean, SD, SE (SD / sqrt(5)) and the
criterion (below 0 by more than 2 SE: lower; above by more: higher; otherwise not resolved),
applied only when all five new runs ended as planned (README.md). Without a rule: against MAT,
frozen-random and full training at 24,000 steps; full-wall-s29 against the pilot's seed-29 runs;
seconds per step. Reads the runs' metrics.jsonl (validation only), summary.json, decisions.jsonl
and logs, and mat-train.sha256; no test figure.
Usage: bench/results/rand2000-vs-full-equal-wall/analyze.py [RUNS]   (default: kept-runs here)
"""
import importlib.util
import json
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent


def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The rand test's helpers (decisions, full_finished, SEEDS, WALL_STEPS) and through it the earlier
# tests' (wall.evals, wall.binary_ok, meq.curve/summary/full_flops_per_step, mvf.rule,
# ftec.diverged).
rw = load("rw", HERE.parent / "rand-vs-full-equal-wall" / "analyze.py")
wall, meq, mvf, ftec = rw.wall, rw.meq, rw.mvf, rw.ftec
RW_RUNS = HERE.parent / "rand-vs-full-equal-wall" / "kept-runs"
PILOT_RUNS = HERE.parent / "rand-redraw-pilot" / "kept-runs"

SEEDS = rw.SEEDS  # 23, 25, 26, 27, 28
STEPS = rw.STEPS  # 24,000
WALL_STEPS = rw.WALL_STEPS  # 17,996: ../rand-vs-full-equal-wall/'s full-wall step count
REDRAW = 2000  # policy.probe_every: rand decides at steps 0, 2,000, ..., 22,000
# The binary: rebuilt from 259fb24's tree on this machine (the earlier runs' binary, 99c7589d...,
# was not kept); README.md's check (steps 1,000 and 2,000 equal to the kept runs') came first.
BINARY = "47e30e4caa311b5faec42711e3dd9ca19d9c52287451a8b634132cf4f9c94fab"


def rand2000_finished(d, seed):
    """Whether rand2000-sSEED ended as planned: summary.json mode rand, its seed, 24,000 steps;
    decisions at exactly steps 0, 2,000, ..., 22,000, each exactly half of every group (by group
    name). Returns (ok, why-not)."""
    if not (d / "summary.json").is_file():
        return False, "no summary.json"
    s = json.loads((d / "summary.json").read_text())
    if s.get("mode") != "rand" or s.get("seed") != seed or s.get("steps") != STEPS:
        return False, f"summary says mode {s.get('mode')}, seed {s.get('seed')}, steps {s.get('steps')}"
    rows = rw.decisions(d)
    if [r["step"] for r in rows] != list(range(0, STEPS, REDRAW)):
        return False, f"decisions are not one at every {REDRAW}th step from 0 to {STEPS - REDRAW}"
    for row in rows:
        size, active = {}, {}
        for m in row["modules"]:
            size[m["group"]] = size.get(m["group"], 0) + 1
            active[m["group"]] = active.get(m["group"], 0) + bool(m["active"])
        want = {g: round(rw.RAND_FRACTION * n) for g, n in size.items()}
        if active != want:
            return False, f"step {row['step']}: active {active}, planned {want}"
    return True, ""


def binary_ok(runs):
    sha = runs / "mat-train.sha256"
    return sha.is_file() and sha.read_text().split()[:1] == [BINARY]


def paired(runs, arm, other, other_runs):
    """Rows per seed of ARM-sN (in runs) against full-wall-sN (../rand-vs-full-equal-wall/) and
    OTHER-sN (in other_runs): p = ARM - full-wall, q = ARM - OTHER at each run's last evaluation;
    ARM's run checked by rand2000_finished (its REDRAW). Returns (p, q, complete). Also used by
    ../rand-fixed-vs-full-equal-wall/analyze.py."""
    print(f"\nseed  {arm} (24,000)  full-wall (17,996)  {other} (24,000)  p = {arm} - full-wall"
          f"  q = {arm} - {other}  FLOPs {arm}/24k full  s/step {arm}")
    p, q, complete = [], [], True
    full_per_step = meq.full_flops_per_step()
    for seed in SEEDS:
        name = f"{arm}-s{seed}"
        if ftec.diverged(runs, name):
            print(f"{seed:4d}  {name} diverged (a non-finite training loss)")
            complete = False
            continue
        ev = wall.evals(runs / name)
        if not ev:
            print(f"{seed:4d}  no evaluation yet of {name}")
            complete = False
            continue
        ok, why = rand2000_finished(runs / name, seed)
        if not ok or ev[-1]["step"] != STEPS:
            print(f"      {name} not as planned: {why or 'last evaluation at step ' + str(ev[-1]['step'])}")
            complete = False
        fw = wall.evals(RW_RUNS / f"full-wall-s{seed}")[-1]
        ot = wall.evals(other_runs / f"{other}-s{seed}")[-1]
        e = ev[-1]
        print(f"{seed:4d}  {e['val_loss']:.4f}{'' if e['step'] == STEPS else ' (step %d)' % e['step']}"
              f"  {fw['val_loss']:.4f}  {ot['val_loss']:.4f}  {e['val_loss'] - fw['val_loss']:+.4f}"
              f"  {e['val_loss'] - ot['val_loss']:+.4f}"
              f"  {e['flops']['total'] / (e['step'] * full_per_step):.4f}  {e['wall_seconds'] / e['step']:.4f}")
        p.append(e["val_loss"] - fw["val_loss"])
        q.append(e["val_loss"] - ot["val_loss"])
    sha_ok = binary_ok(runs)
    if not sha_ok:
        print("\nmat-train.sha256 is not the planned binary's")
    return p, q, complete and len(p) == len(SEEDS) and sha_ok


def common_unruled(runs, arm):
    """Without a rule, over the ARM-sN runs that have an evaluation at step 24,000 (all five when
    the rules applied; what finished otherwise): p at [MASK], ARM - MAT and - frozen-random, ARM -
    full training at 24,000 steps, the curves every 2,000 steps. Returns {seed: last evaluation}."""
    done = [s for s in SEEDS if (ev := wall.evals(runs / f"{arm}-s{s}")) and ev[-1]["step"] == STEPS]
    new = {s: wall.evals(runs / f"{arm}-s{s}")[-1] for s in done}
    if done:
        at_mask = [new[s]["val_loss_at_mask"]
                   - wall.evals(RW_RUNS / f"full-wall-s{s}")[-1]["val_loss_at_mask"] for s in done]
        print(f"\nWithout a rule: p at [MASK] (seeds {done}): " + ", ".join(f"{x:+.4f}" for x in at_mask))
    if len(done) >= 2:
        for kind in ("mat", "frozen-random"):
            other = {s: meq.curve(rw.MEQ_RUNS, kind, s)[-1]["val_loss"] for s in done}
            meq.summary(f"Without a rule: {arm} - {kind} (both 24,000 steps; seeds {done})",
                        [new[s]["val_loss"] - other[s] for s in done])
    full = {s: meq.curve(rw.MEQ_RUNS, "full", s)[-1]["val_loss"] for s in (23, 25, 26) if s in done}
    if full:
        print(f"\nWithout a rule: {arm} - full training at 24,000 steps (../mat-vs-full-1nat/): "
              + ", ".join(f"s{s} {new[s]['val_loss'] - full[s]:+.4f}" for s in full))
    print("\nValidation loss every 2,000 steps:")
    for s in SEEDS + (29,):
        ev = wall.evals(runs / f"{arm}-s{s}")
        if ev or s in SEEDS:
            print(f"  {arm}-s{s}: " + (" ".join(f"{x['val_loss']:.2f}" for x in ev if x["step"] % 2000 == 0)
                                       or "no evaluation"))
    return new


def unruled(runs):
    common_unruled(runs, "rand2000")
    d = runs / "full-wall-s29"
    ev = wall.evals(d)
    if not ev or not (d / "summary.json").is_file():
        print("\nfull-wall-s29: not finished")
        return
    s = json.loads((d / "summary.json").read_text())
    if s.get("mode") != "full" or s.get("seed") != 29 or s.get("steps") != WALL_STEPS \
            or ev[-1]["step"] != WALL_STEPS or ftec.diverged(runs, "full-wall-s29"):
        print(f"\nfull-wall-s29 not as planned: mode {s.get('mode')}, seed {s.get('seed')}, steps "
              f"{s.get('steps')}, last evaluation at {ev[-1]['step']}")
        return
    seed29 = {n: wall.evals(PILOT_RUNS / n)[-1]["val_loss"] for n in ("rand2000-s29", "rand40-s29")}
    print(f"\nWithout a rule (seed 29, the pilot's seed): full-wall-s29 {ev[-1]['val_loss']:.4f} at "
          f"step {ev[-1]['step']}; rand2000-s29 - it {seed29['rand2000-s29'] - ev[-1]['val_loss']:+.4f}, "
          f"rand40-s29 - it {seed29['rand40-s29'] - ev[-1]['val_loss']:+.4f}")


def main(runs):
    runs = pathlib.Path(runs)
    print(f"rand2000: 24,000 steps, a new half of each group at every {REDRAW}th step from 0; "
          f"full-wall and rand: ../rand-vs-full-equal-wall/kept-runs ({WALL_STEPS} and 24,000 steps)")
    p, q, complete = paired(runs, "rand2000", "rand", RW_RUNS)
    if not complete:
        print("\nNot all five new runs ended as planned (README.md): no conclusion. What finished:")
        unruled(runs)
        return
    mvf.rule("Primary, p = rand2000 - full-wall (validation, last evaluation)", p,
             "rand2000 lower at the step count rand's measured wall ratio makes equal",
             "rand2000 higher at the step count rand's measured wall ratio makes equal")
    mvf.rule("Secondary, q = rand2000 - rand (validation, both 24,000 steps)", q,
             "rand2000 (a half kept 2,000 steps, from step 0) ends lower than rand (re-drawn every 40, "
             "all modules for its first 320 steps)",
             "rand2000 (a half kept 2,000 steps, from step 0) ends higher than rand (re-drawn every 40, "
             "all modules for its first 320 steps)")
    unruled(runs)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else HERE / "kept-runs")
