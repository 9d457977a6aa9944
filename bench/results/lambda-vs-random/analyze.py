#!/usr/bin/env python3
"""The registered test of README.md beside this file, as amended: for seeds 21-23, d_N =
frozen-random-sN - mat-sN in validation loss at the last evaluation (step 24,000), their mean,
standard deviation and standard error (SD / sqrt(3)), and the criterion (mean below 0 by more than
2 standard errors: λ's choice worse; above 0 by more: better; otherwise not resolved), which
applies only when all six runs reached step 24,000 and every frozen-random run trained its MAT
run's per-group active counts at every decision. Without a criterion: the signs, the same differences at [MASK] and at the best
validation loss, FLOPs, seconds per step, and the λ reading of ../lambda-training/. Reads
metrics.jsonl and decisions.jsonl(.xz) only; no test figure. Usage:
  bench/results/lambda-vs-random/analyze.py [RUNS]   (default: kept-runs beside this file)
"""
import collections
import math
import pathlib
import statistics
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "regime-1nat"))
import analyze as regime  # noqa: E402  (evaluations, read_decisions, lambda_follows_training)

SEEDS = (21, 22, 23)  # the amendment in README.md: seed 24 not run
STEPS = 24000


def counts(rows):
    """Per decision step: the per-group active counts."""
    out = {}
    for r in rows:
        c = collections.Counter()
        for m in r["modules"]:
            c[m["group"]] += 1 if m["active"] else 0
        out[r["step"]] = dict(c)
    return out


def replay_matches(mat_dir, ctrl_dir):
    """(decisions compared, decisions whose per-group active counts differ); None when a
    decision file is missing or the two runs did not decide at the same steps."""
    mat, ctrl = regime.read_decisions(mat_dir), regime.read_decisions(ctrl_dir)
    if mat is None or ctrl is None:
        return None
    a, b = counts(mat), counts(ctrl)
    if sorted(a) != sorted(b):
        return None
    return len(a), sum(a[s] != b[s] for s in a)


def main(runs):
    runs = pathlib.Path(runs)
    rows, complete = [], True
    for seed in SEEDS:
        mat_dir, ctrl_dir = runs / f"mat-s{seed}", runs / f"frozen-random-s{seed}"
        if not (mat_dir / "metrics.jsonl").is_file() or not (ctrl_dir / "metrics.jsonl").is_file():
            print(f"seed {seed}: missing {'mat' if not (mat_dir / 'metrics.jsonl').is_file() else 'frozen-random'}")
            complete = False
            continue
        m, c = regime.evaluations(mat_dir), regime.evaluations(ctrl_dir)
        if not m or not c:
            print(f"seed {seed}: no evaluation yet")
            complete = False
            continue
        replay = replay_matches(mat_dir, ctrl_dir)
        done = m[-1]["step"] == STEPS and c[-1]["step"] == STEPS
        if not done or replay is None or replay[1] != 0:
            complete = False
        best_m, best_c = min(r["val_loss"] for r in m), min(r["val_loss"] for r in c)
        rows.append(dict(seed=seed, mat=m[-1], ctrl=c[-1], done=done, replay=replay,
                         best=(best_m, best_c)))
    print("seed  mat val   frozen-random val  d (fr - mat)  d at [MASK]  d at best  "
          "FLOPs fr/mat  s/step mat, fr  counts differ")
    for r in rows:
        m, c = r["mat"], r["ctrl"]
        replay = ("?" if r["replay"] is None else f"{r['replay'][1]} of {r['replay'][0]}")
        print(f"{r['seed']:4d}  {m['val_loss']:.4f}    {c['val_loss']:.4f}"
              f"{'' if r['done'] else ' (step ' + str(c['step']) + '/' + str(m['step']) + ')'}"
              f"            {c['val_loss'] - m['val_loss']:+.4f}       "
              f"{c['val_loss_at_mask'] - m['val_loss_at_mask']:+.4f}      "
              f"{r['best'][1] - r['best'][0]:+.4f}     "
              f"{c['flops']['total'] / m['flops']['total']:.4f}        "
              f"{m['wall_seconds'] / m['step']:.3f}, {c['wall_seconds'] / c['step']:.3f}   {replay}")
    print("\nExploratory, in no criterion: the λ reading of ../lambda-training/ (share of the "
          "active modules in the top-k of the run's own λ)")
    for r in rows:
        for name in (f"mat-s{r['seed']}", f"frozen-random-s{r['seed']}"):
            regime.lambda_follows_training(runs / name)
    if not complete or len(rows) != len(SEEDS):
        print("\nNot every run reached step 24,000 with its counts replayed: no conclusion "
              "(README.md's plan).")
        return
    d = [r["ctrl"]["val_loss"] - r["mat"]["val_loss"] for r in rows]
    mean, sd = statistics.fmean(d), statistics.stdev(d)
    se = sd / math.sqrt(len(d))
    print(f"\nd = frozen-random - mat over seeds {', '.join(str(s) for s in SEEDS)}: "
          f"{', '.join(f'{x:+.4f}' for x in d)}")
    print(f"mean {mean:+.4f}, SD {sd:.4f}, SE {se:.4f} ({mean / se:+.2f} standard errors); "
          f"frozen-random lower on {sum(x < 0 for x in d)} of {len(d)} seeds")
    if mean < -2 * se:
        print("criterion: λ's choice worse (frozen-random lower by more than 2 standard errors)")
    elif mean > 2 * se:
        print("criterion: λ's choice better (MAT lower by more than 2 standard errors)")
    else:
        print("criterion: not resolved (|mean| within 2 standard errors)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else pathlib.Path(__file__).parent / "kept-runs")
