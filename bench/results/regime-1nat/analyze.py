#!/usr/bin/env python3
"""Prints each pilot's validation curve and where it first reaches the qualifying loss, then
MAT's pilots j (addendum 2) and k (addendum 4) and rand's l (addendum 4) against full
training's i: at equal steps, full's margins below the unigram model (whole and at [MASK]),
full's validation loss at the other run's total FLOPs (with and without the decoder), and which
modules MAT trained; then l against j at equal steps (addendum 4's rule); then addendum 5: m
(i's command, k's build) against i, k and n (frozen-random at j's counts) against m, and n
against j and l; then addendum 6: o (frozen-random at k's counts) and p (inverse at j's counts)
against i, o against k, p against j and n, and which modules n, o and p trained; then, exploratory
and in no plan, how far each run's trained set is the top of its own λ ranking (and, given a
verdict's kept runs, the same over its seeds, with the spread of mat - frozen-random over them);
then addendum 7: r (o's command on seed 20) against q (k's command on seed 20), with its rule and
both seeds' differences side by side.

Reads only validation figures (the pilots' plan: README.md beside this file), and decisions.
Usage (the second argument, optional: the exploratory λ reading on a verdict's kept runs):
  bench/results/regime-1nat/analyze.py bench/results/regime-1nat/pilots \
      bench/results/confirm/kept-runs
"""
import json
import lzma
import math
import pathlib
import statistics
import sys

UNIGRAM_VAL = 6.015
QUALIFY = UNIGRAM_VAL - 1.10


UNIGRAM_VAL_AT_MASK = 6.0270  # h's and i's summary.json: unigram_eval_val_loss_at_mask


def json_lines(lines):
    """Each non-blank line parsed; a last line that does not parse (a run still writing it) is
    left out, any other bad line raises."""
    lines = [line for line in lines if line.strip()]
    rows = []
    for k, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if k + 1 < len(lines):
                raise
    return rows


def evaluations(pilot):
    rows = json_lines((pilot / "metrics.jsonl").read_text().splitlines())
    return [r for r in rows if "val_loss" in r]


def compare(full_dir, mat_dir, kind="mat"):
    """MAT against full at every evaluation both reached, and where MAT first reaches full's best
    validation loss (its FLOPs as a fraction of full's FLOPs to that best)."""
    full, mat = evaluations(full_dir), evaluations(mat_dir)
    if not full or not mat:
        return
    by_step = {r["step"]: r for r in mat}
    print(f"\n{mat_dir.name} ({kind}) against {full_dir.name} (full), validation only")
    print(f"  step  full val  {kind} val  {kind}-full  full@[MASK]  {kind}@[MASK]  "
          f"{kind} FLOPs/full FLOPs  active")
    for f in full:
        m = by_step.get(f["step"])
        if m is None:
            continue
        print(f"  {f['step']:5d}  {f['val_loss']:.4f}   {m['val_loss']:.4f}  "
              f"{m['val_loss'] - f['val_loss']:+.4f}   {f.get('val_loss_at_mask', float('nan')):.4f}"
              f"      {m.get('val_loss_at_mask', float('nan')):.4f}      "
              f"{m['flops']['total'] / f['flops']['total']:.3f}               "
              f"{sum(m['active_modules'].values())}")
    if not (full_dir / "summary.json").is_file() or not (mat_dir / "summary.json").is_file():
        print("  (unfinished: no summary.json yet; the end, the best and equal FLOPs are not read)")
        return
    best_full = min(full, key=lambda r: r["val_loss"])
    best_mat = min(mat, key=lambda r: r["val_loss"])
    print(f"  best: full {best_full['val_loss']:.4f} at {best_full['step']}, {kind} "
          f"{best_mat['val_loss']:.4f} at {best_mat['step']} ({kind} - full "
          f"{best_mat['val_loss'] - best_full['val_loss']:+.4f}); at [MASK]: full "
          f"{best_full.get('val_loss_at_mask', float('nan')):.4f}, {kind} "
          f"{best_mat.get('val_loss_at_mask', float('nan')):.4f} (unigram {UNIGRAM_VAL_AT_MASK})")
    with open(full_dir / "summary.json") as fh:
        summary = json.load(fh)
    end = full[-1]
    print(f"  full's end: {summary['unigram_eval_val_loss'] - end['val_loss']:.4f} nat below the "
          f"unigram model on the same tokens ({summary['unigram_eval_val_loss']:.4f}); "
          f"{summary['unigram_eval_val_loss_at_mask'] - end['val_loss_at_mask']:.4f} at [MASK] "
          f"({summary['unigram_eval_val_loss_at_mask']:.4f})")
    one_nat = summary["unigram_eval_val_loss_at_mask"] - 1.0
    cross = next((f for f in full if f["val_loss_at_mask"] <= one_nat), None)
    if cross:
        print(f"  full first 1 nat below it at [MASK] ({one_nat:.4f}) at step {cross['step']}")
    for key, name in (("total", "FLOPs"), ("total_without_decoder", "FLOPs without the decoder")):
        budget = mat[-1]["flops"][key]
        at = at_flops(full, budget, key)
        if at is None:
            continue
        step, val = at
        print(f"  at {kind}'s total {name} ({budget:.3e}, {budget / end['flops'][key]:.3f} of "
              f"full's): full at step {step:.0f}, val {val:.4f} (linear between evaluations); "
              f"{kind}'s end {mat[-1]['val_loss']:.4f} is {mat[-1]['val_loss'] - val:+.4f} from it")
    reach = next((m for m in mat if m["val_loss"] <= best_full["val_loss"]), None)
    if reach:
        print(f"  {kind} first reaches full's best at step {reach['step']}, with "
              f"{reach['flops']['total'] / best_full['flops']['total']:.3f} of full's FLOPs to "
              f"its best ({reach['flops']['total_without_decoder'] / best_full['flops']['total_without_decoder']:.3f} "
              f"without the decoder)")
    else:
        print(f"  {kind} does not reach full's best")


def active_sets(mat_dir, kind="mat"):
    """Which modules a run trained (MAT's, or a control's: `kind`): how many distinct modules were
    ever active after step 2,000, and at the last decision the smoothed λ of the active modules
    against the inactive ones' largest, per group (decisions.jsonl, or decisions.jsonl.xz). A
    control replaying another run's decisions also logs its own MAT rules' threshold and
    converged modules; they decide nothing there."""
    rows = read_decisions(mat_dir)
    if rows is None:
        return
    later = [r for r in rows if r["step"] > 2000]
    after5k = [r for r in rows if r["step"] > 5000]
    if not later:
        print(f"\n{mat_dir.name}: no decision after step 2,000 yet")
        return
    small = sum(1 for r in after5k if sum(m["active"] for m in r["modules"]) in (3, 4))
    print(f"\n{mat_dir.name}: after step 5,000, {small} of {len(after5k)} decisions trained 3 or 4 "
          "modules")
    ever = sorted({m["name"] for r in later for m in r["modules"] if m["active"]})
    print(f"{mat_dir.name}: {len(rows)} decisions; modules ever trained after step 2,000: "
          f"{len(ever)} of {len(rows[-1]['modules'])} ({', '.join(ever)})")
    counts = {}
    for r in after5k:
        n = sum(m["active"] for m in r["modules"])
        counts[n] = counts.get(n, 0) + 1
    print(f"  active modules per decision after step 5,000: "
          + ", ".join(f"{n}: {counts[n]}" for n in sorted(counts)))
    changed = sum(1 for a, b in zip(later, later[1:])
                  if [m["active"] for m in a["modules"]] != [m["active"] for m in b["modules"]])
    print(f"  after step 2,000, {changed} of {len(later) - 1} decisions changed the active set; "
          f"share of the {len(later)} decisions after step 2,000 in which each module was active:")
    for k, m in enumerate(rows[-1]["modules"]):
        share = sum(r["modules"][k]["active"] for r in later) / len(later)
        print(f"    {m['name']:24s} {share:.2f}")
    logged = "" if kind == "mat" else f" (logged by {kind}'s own MAT rules; they decide nothing)"
    converged = max(sum(m["converged"] for m in r["modules"]) for r in rows)
    print(f"  modules converged (the temporal rule) at any decision: at most {converged}{logged}")
    print(f"  at the last decision (step {rows[-1]['step']}):")
    for group in sorted({m["group"] for m in rows[-1]["modules"]}):
        members = [m for m in rows[-1]["modules"] if m["group"] == group]
        on = sorted(float(m["lambda_smoothed"]) for m in members if m["active"])
        off = sorted(float(m["lambda_smoothed"]) for m in members if not m["active"])
        print(f"  {group}: threshold{logged} {float(rows[-1]['threshold'][group]):.4g}; active λ "
              f"{', '.join(f'{x:.4g}' for x in on)}; inactive λ "
              f"{', '.join(f'{x:.4g}' for x in off)}")


def main(root):
    for pilot in sorted(p for p in pathlib.Path(root).iterdir()
                        if (p / "metrics.jsonl").is_file()):
        rows = evaluations(pilot)
        if not rows:
            print(f"{pilot.name}: no evaluation yet")
            continue
        per_step = rows[-1]["wall_seconds"] / rows[-1]["step"]
        crossed = next((r for r in rows if r["val_loss"] <= QUALIFY), None)
        best = min(rows, key=lambda r: r["val_loss"])
        print(f"{pilot.name}: {rows[-1]['step']} steps, {per_step:.3f} s/step, best val "
              f"{best['val_loss']:.4f} at {best['step']} (margin {UNIGRAM_VAL - best['val_loss']:.3f} nat)"
              + (f", reaches {QUALIFY:.3f} at step {crossed['step']}" if crossed else
                 f", does not reach {QUALIFY:.3f}"))
        at_mask = all("val_loss_at_mask" in r for r in rows)
        print("  step  val_loss  train_loss" + ("  val_loss_at_mask" if at_mask else ""))
        for r in rows:
            print(f"  {r['step']:5d}  {r['val_loss']:.4f}    {r['train_loss']:.4f}"
                  + (f"      {r['val_loss_at_mask']:.4f}" if at_mask else ""))


    root = pathlib.Path(root)

    def has(name):
        return has_run(root, name)

    # Addendum 2: j (MAT, the verdict's setting); addendum 4: k (MAT keeping at least half of
    # each group) and l (rand at j's active counts), each against full (i); addendum 5: m (i's
    # command with k's and l's build) and n (frozen-random at j's counts).
    for other, kind in (("j", "mat"), ("k", "mat"), ("l", "rand"), ("o", "frozen-random"),
                        ("p", "inverse")):
        if has("i") and has(other):
            compare(root / "i", root / other, kind)
            if kind == "mat":
                active_sets(root / other)
    if has("j") and has("l"):
        control_against_mat(root / "j", root / "l", "rand")
    if has("i") and has("m"):
        build_drift(root / "i", root / "m")
    for other, kind in (("k", "mat"), ("n", "frozen-random")):
        if has("m") and has(other):
            compare(root / "m", root / other, kind)
    if has("j") and has("n"):
        control_against_mat(root / "j", root / "n", "frozen-random")
    if has("l") and has("n"):
        control_against_mat(root / "l", root / "n", "frozen-random", base_kind="rand")
    # Addendum 6: o (frozen-random at k's counts) against k; p (inverse: the lowest-λ modules
    # at j's counts) against j and against n (frozen-random at j's counts), with which modules
    # o and p trained and how often their sets changed.
    for base, ctrl, kind, base_kind in (("k", "o", "frozen-random", "mat"),
                                        ("j", "p", "inverse", "mat"),
                                        ("n", "p", "inverse", "frozen-random")):
        if has(base) and has(ctrl):
            control_against_mat(root / base, root / ctrl, kind, base_kind=base_kind)
    for ctrl, kind in (("n", "frozen-random"), ("o", "frozen-random"), ("p", "inverse")):
        if has(ctrl):
            active_sets(root / ctrl, kind)
    # Exploratory (read after n, in no plan): does λ follow training? (l, rand, does not probe: no
    # λ to read.)
    print("\nExploratory, in no plan: how far each run's trained set is the top of its own λ "
          "ranking")
    for name in ("j", "k", "n", "o", "p"):
        if has(name):
            lambda_follows_training(root / name)
    # Addendum 7: o against k once more, on seed 20 (q: k's command, r: o's), one new build.
    if has("q") and has("r"):
        addendum7(root)


def mean_active_fraction(run_dir):
    """The mean share of active modules over the post-warm-up decisions."""
    rows = [r for r in read_decisions(run_dir) if r["phase"] != "warmup"]
    return statistics.fmean(r["num_active"] / len(r["modules"]) for r in rows), len(rows)


def at_flops(curve, flops, key="total"):
    """(step, validation loss) of a run's curve at `flops` FLOPs (flops[key]), linear between the
    two evaluations around it; None before its first evaluation's FLOPs or past its last."""
    after = next((k for k, r in enumerate(curve) if r["flops"][key] >= flops), None)
    if after is None or after == 0:
        return None
    a, b = curve[after - 1], curve[after]
    t = (flops - a["flops"][key]) / (b["flops"][key] - a["flops"][key])
    return a["step"] + t * (b["step"] - a["step"]), a["val_loss"] + t * (b["val_loss"] - a["val_loss"])


def addendum7(root):
    """Addendum 7's rule: r (frozen-random replaying k's masks, seed 20) against q (MAT with the
    floor, seed 20) at the last evaluation, step 24,000; also at equal FLOPs when their totals
    differ by more than 2 %; then both seeds' differences (o - k, r - q) side by side."""
    q, r = root / "q", root / "r"
    control_against_mat(q, r, "frozen-random")
    for run, kind in ((q, "mat"), (r, "frozen-random")):
        active_sets(run, kind)
    print("\nExploratory, in no plan: the same λ reading for q and r")
    for run in (q, r):
        lambda_follows_training(run)
    qe, re_ = evaluations(q), evaluations(r)
    print("\nAddendum 7's rule (validation, the last evaluation)")
    if qe[-1]["step"] != 24000 or re_[-1]["step"] != 24000:
        print(f"  unfinished (q at step {qe[-1]['step']}, r at {re_[-1]['step']}): no rule applied")
        return
    d = re_[-1]["val_loss"] - qe[-1]["val_loss"]
    print(f"  q (mat) {qe[-1]['val_loss']:.4f}, r (frozen-random) {re_[-1]['val_loss']:.4f}: "
          f"r - q {d:+.4f} (best: q {min(x['val_loss'] for x in qe):.4f}, r "
          f"{min(x['val_loss'] for x in re_):.4f}; at [MASK]: q {qe[-1]['val_loss_at_mask']:.4f}, "
          f"r {re_[-1]['val_loss_at_mask']:.4f})")
    for run in (q, r):
        frac, n = mean_active_fraction(run)
        print(f"  {run.name}: mean active fraction {frac:.4f} over {n} post-warm-up decisions")
    ratio = re_[-1]["flops"]["total"] / qe[-1]["flops"]["total"]
    print(f"  r's total FLOPs / q's: {ratio:.4f}")
    readings = [("at the end", d)]
    if abs(ratio - 1) > 0.02:
        at = at_flops(qe, re_[-1]["flops"]["total"])
        if at is not None:
            readings.append(("at equal FLOPs (q's curve at r's total)", re_[-1]["val_loss"] - at[1]))
        else:
            print("  r's total FLOPs lie outside q's curve: no equal-FLOPs reading")
    for label, diff in readings:
        verdict = ("o's result holds on a second seed (λ's choice did worse than a persistent "
                   "random one)" if diff < -0.1 else
                   "λ's choice did better on this seed; o is not replicated" if diff > 0.1 else
                   "level on this seed (within 0.1 nat)")
        print(f"  {label}: r - q {diff:+.4f} → {verdict}")
    if has_run(root, "k") and has_run(root, "o"):
        ke, oe = evaluations(root / "k"), evaluations(root / "o")
        d1 = oe[-1]["val_loss"] - ke[-1]["val_loss"]
        print(f"  both seeds: seed 1 o - k {d1:+.4f}, seed 20 r - q {d:+.4f}, mean "
              f"{(d1 + d) / 2:+.4f}; the signs {'agree' if (d1 < 0) == (d < 0) else 'disagree'}")


def has_run(root, name):
    return (root / name / "metrics.jsonl").is_file()


def read_decisions(run_dir):
    """decisions.jsonl (or .xz) as a list of dicts; None when there is neither."""
    for name, opener in (("decisions.jsonl", open), ("decisions.jsonl.xz", lzma.open)):
        if (run_dir / name).is_file():
            with opener(run_dir / name, "rt") as fh:
                return json_lines(fh)
    return None


def lambda_follows_training(run_dir):
    """Exploratory (not in any addendum's plan; read after n had run). Per group, over each
    post-warm-up decision where the group has some but not all modules active (k of them) and
    every smoothed λ finite: the share of the k active modules that are among the group's k
    largest smoothed λ of the run's own reports (every module is probed, active or not), against
    k / (group size), the mean share of a set drawn without regard to λ. Printed at the first
    post-warm-up decision (for frozen-random the permutation is drawn there, from the seed alone:
    the run's paired null) and per 2,000 steps. MAT (j, k) trains its top by construction (1.0;
    less where the temporal rule switches a converged high-λ module off and the guard fills in);
    inverse (p) 0 by construction. A control with random identities (n, o) whose share climbs far
    above its first decision's says that training a module raises its own λ against its group's
    untrained modules, so a set chosen by λ reinforces itself; it says nothing of whether the
    chosen modules are useful. Returns {group: ((first share, chance), (last bin's share,
    chance))}, or None."""
    rows = read_decisions(run_dir)
    if rows is None:
        return None
    first, bins = {}, {}
    for r in rows:
        if r.get("phase") != "policy" or "modules" not in r:
            continue  # warm-up, or a coordinator's decision line without modules
        for group in sorted({m["group"] for m in r["modules"]}):
            members = [m for m in r["modules"] if m["group"] == group]
            lam = {m["name"]: float(m["lambda_smoothed"]) for m in members}
            active = {m["name"] for m in members if m["active"]}
            k = len(active)
            if k in (0, len(members)) or not all(math.isfinite(x) for x in lam.values()):
                continue
            top = set(sorted(lam, key=lambda name: -lam[name])[:k])
            share, chance = len(top & active) / k, k / len(members)
            first.setdefault(group, (share, chance))
            b = bins.setdefault(group, {}).setdefault(r["step"] // 2000, [0.0, 0.0, 0])
            b[0] += share
            b[1] += chance
            b[2] += 1
    if not first:
        return None
    out = {}
    for group in sorted(first):
        per_bin = bins[group]
        print(f"  {run_dir.name} {group}: share of active modules in the top-k of λ (chance): first "
              f"decision {first[group][0]:.2f} ({first[group][1]:.2f}); per 2,000 steps "
              + ", ".join(f"{2 * b}k {v[0] / v[2]:.2f} ({v[1] / v[2]:.2f})"
                          for b, v in sorted(per_bin.items())))
        last = per_bin[max(per_bin)]
        out[group] = (first[group], (last[0] / last[2], last[1] / last[2]))
    return out


def lambda_follows_training_kept(kept_runs):
    """The same reading on a verdict's kept runs (bench/results/confirm/kept-runs: 10 seeds of
    mat and of frozen-random replaying each seed's mat), the frozen-random seeds summarised per
    group: mean share at the first decision and in the last 2,000 steps, each with its chance, and
    in how many seeds the last share exceeds the first (one permutation per seed: the seeds are
    the units); then, as context for one seed's paired difference, the verdict's per-seed
    mat - frozen-random of the best validation loss."""
    kept_runs = pathlib.Path(kept_runs)
    if not kept_runs.is_dir():
        print(f"\n{kept_runs}: no such folder")
        return
    print(f"\nExploratory, in no plan: the same on {kept_runs}")
    shares = {}
    for run in sorted(p for p in kept_runs.iterdir() if p.is_dir()):
        got = lambda_follows_training(run)
        if got is not None and run.name.startswith("frozen-random"):
            for group, v in got.items():
                shares.setdefault(group, []).append(v)
    for group, runs in sorted(shares.items()):
        n = len(runs)
        rose = sum(1 for (a, _), (b, _) in runs if b > a)
        print(f"  frozen-random {group}, {n} seeds: mean share at the first decision "
              f"{sum(v[0][0] for v in runs) / n:.2f} (chance {sum(v[0][1] for v in runs) / n:.2f}), "
              f"in each seed's last 2,000-step bin with a partly active group "
              f"{sum(v[1][0] for v in runs) / n:.2f} (chance "
              f"{sum(v[1][1] for v in runs) / n:.2f}); higher at the end than at the first decision "
              f"in {rose} of {n} seeds; lowest last share {min(v[1][0] for v in runs):.2f}")
    results = kept_runs.parent / "results.json"
    if results.is_file():
        rows = json.loads(results.read_text())["rows"]
        best = {(r["mode"], r["seed"]): r["best_val_loss"] for r in rows}
        diffs = [best["mat", s] - best["frozen-random", s] for (mode, s) in sorted(best)
                 if mode == "mat" and ("frozen-random", s) in best]
        if len(diffs) > 1:
            print(f"  mat - frozen-random, best validation loss, {len(diffs)} seeds: mean "
                  f"{statistics.mean(diffs):+.4f}, standard deviation over seeds "
                  f"{statistics.stdev(diffs):.4f} (range {min(diffs):+.3f} to "
                  f"{max(diffs):+.3f})")


def build_drift(old_dir, new_dir):
    """Addendum 5: the same full run with two builds (i: da0b3f1's, m: 7c5b355's), at every
    common evaluation: how far apart the builds' validation losses are."""
    old = {r["step"]: r for r in evaluations(old_dir)}
    rows = [(r, old[r["step"]]) for r in evaluations(new_dir) if r["step"] in old]
    if not rows:
        return
    print(f"\n{new_dir.name} ({old_dir.name}'s command, another build) against {old_dir.name}")
    print("  step  " + old_dir.name + " val   " + new_dir.name + " val   difference  at [MASK]")
    for r, o in rows:
        print(f"  {r['step']:5d}  {o['val_loss']:.4f}  {r['val_loss']:.4f}  "
              f"{r['val_loss'] - o['val_loss']:+.2e}    "
              f"{r['val_loss_at_mask'] - o['val_loss_at_mask']:+.2e}")
    worst = max(rows, key=lambda p: abs(p[0]["val_loss"] - p[1]["val_loss"]))
    print(f"  largest |difference| {abs(worst[0]['val_loss'] - worst[1]['val_loss']):.2e} at step "
          f"{worst[0]['step']}; at the last common step ({rows[-1][0]['step']}) "
          f"{rows[-1][0]['val_loss'] - rows[-1][1]['val_loss']:+.2e}")


def control_against_mat(mat_dir, ctrl_dir, kind, base_kind="mat"):
    """Addenda 4 and 5: a control replaying a MAT run's decisions (l: rand at j's counts; n:
    frozen-random at j's) against that run (or against another control at the same counts: n
    against l), at every common evaluation and at the end; and whether the two trained the same
    per-group active counts."""
    mat = {r["step"]: r for r in evaluations(mat_dir)}
    ctrl = evaluations(ctrl_dir)
    print(f"\n{ctrl_dir.name} ({kind}) against {mat_dir.name} ({base_kind}), validation only")
    print(f"  step  {base_kind} val  {kind} val  {kind}-{base_kind}  {base_kind}@[MASK]  "
          f"{kind}@[MASK]  {kind} FLOPs/{base_kind} FLOPs")
    for r in ctrl:
        m = mat.get(r["step"])
        if m is None:
            continue
        print(f"  {r['step']:5d}  {m['val_loss']:.4f}   {r['val_loss']:.4f}  "
              f"{r['val_loss'] - m['val_loss']:+.4f}   {m['val_loss_at_mask']:.4f}      "
              f"{r['val_loss_at_mask']:.4f}       {r['flops']['total'] / m['flops']['total']:.3f}")
    common = [r for r in ctrl if r["step"] in mat]
    same = sum(mat[r["step"]]["active_modules"] == r["active_modules"] for r in common)
    print(f"  per-group active counts equal at {same} of {len(common)} common evaluations")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else pathlib.Path(__file__).parent / "pilots")
    if len(sys.argv) > 2:
        lambda_follows_training_kept(sys.argv[2])
