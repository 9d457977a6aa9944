#!/usr/bin/env python3
"""Addendum 3 (README.md one folder up): the verdict's full runs again with a mat-train that
writes the losses at [MASK]. For each seed: whether its validation curve reproduces the kept
run's (bench/results/verdict/kept-runs/full-sS; the addendum's rule: every val_loss within
1e-6), and its test loss at the best validation step, whole and at [MASK], each against its
paired unigram baseline; then the means over the seeds present. Reads test figures: this is a
measurement of the registered regime, nothing is chosen on it. Usage:
  bench/results/regime-1nat/verdict-at-mask/analyze.py [RUNS_DIR [KEPT_DIR]]
"""
import json
import pathlib
import statistics
import sys

HERE = pathlib.Path(__file__).resolve().parent
TOLERANCE = 1e-6


def evaluations(run):
    with open(run / "metrics.jsonl") as fh:
        return [json.loads(line) for line in fh if line.strip() and "val_loss" in line]


def main(runs, kept):
    rows = []
    for run in sorted(p for p in runs.iterdir() if (p / "summary.json").is_file()):
        with open(run / "summary.json") as fh:
            s = json.load(fh)
        ours, theirs = evaluations(run), evaluations(kept / run.name)
        same_steps = [o["step"] for o in ours] == [t["step"] for t in theirs]
        drift = max(abs(o["val_loss"] - t["val_loss"]) for o, t in zip(ours, theirs))
        with open(kept / run.name / "summary.json") as fh:
            kept_test = json.load(fh)["test_loss_at_best"]
        rows.append({"run": run.name, "reproduced": same_steps and drift <= TOLERANCE,
                     "max_val_drift": drift, "best_step": s["best_step"],
                     "test": s["test_loss_at_best"], "kept_test": kept_test,
                     "test_at_mask": s["test_loss_at_mask_at_best"],
                     "unigram_test_paired": s["unigram_eval_test_loss"],
                     "unigram_test_at_mask": s["unigram_eval_test_loss_at_mask"],
                     "unigram_test_all_tokens": s["unigram_test_loss"]})
    print("run      reproduced  max |val drift|  best step  test    (kept)   test@[MASK]  "
          "margin whole (paired)  margin at [MASK]")
    for r in rows:
        print(f"{r['run']:8s} {str(r['reproduced']):10s}  {r['max_val_drift']:.2e}        "
              f"{r['best_step']:5d}    {r['test']:.4f} ({r['kept_test']:.4f})  "
              f"{r['test_at_mask']:.4f}       {r['unigram_test_paired'] - r['test']:.4f}"
              f"                 {r['unigram_test_at_mask'] - r['test_at_mask']:.4f}")
    if rows:
        mean = lambda k: statistics.fmean(r[k] for r in rows)
        print(f"mean over {len(rows)} seeds: test {mean('test'):.4f}, at [MASK] "
              f"{mean('test_at_mask'):.4f}; below the unigram model: {mean('unigram_test_all_tokens') - mean('test'):.4f} "
              f"(every test token, the verdict's criterion 1), {mean('unigram_test_paired') - mean('test'):.4f} "
              f"(paired tokens), {mean('unigram_test_at_mask') - mean('test_at_mask'):.4f} (at [MASK])")


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else HERE,
         pathlib.Path(sys.argv[2]) if len(sys.argv) > 2
         else HERE.parents[1] / "verdict" / "kept-runs")
