#!/usr/bin/env python3
"""bench/repro's whole pipeline, shrunk: for each MODEL given, `bench/repro MODEL --quick` with
20 steps a run (4 modes x 3 seeds, 2 at a time), then checks what it wrote: results.json (one row
per run with the issue's columns, every mode and seed, finite numbers), table.md (the paper's
columns, every mode, the goals), table.json and the two SVG plots. Runs in a temporary folder;
the committed results are not touched. vgg runs on Fashion-MNIST (dataset-fashion-mnist).

usage: check_repro.py --source-dir DIR --mat-train BIN MODEL [MODEL ...]
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile

COLUMNS = ["model", "mode", "seed", "best_val_loss", "test_metric", "test_metric_name",
           "flops_to_best", "wall_seconds_to_best", "flops_total", "wall_seconds"]
MODES = ["full", "mat", "rand", "multirate"]


def check(model, source_dir, mat_train, work):
    out, runs = os.path.join(work, model + "-out"), os.path.join(work, model + "-runs")
    cmd = [sys.executable, os.path.join(source_dir, "bench", "repro"), model, "--quick",
           "--mat-train", mat_train, "--out", out, "--runs", runs,
           "--set", "train.steps=20", "--set", "train.eval_every=10",
           "--set", "policy.warmup_steps=5", "--set", "policy.probe_every=5",
           "--set", "policy.probe_samples=2"]
    r = subprocess.run(cmd, cwd=source_dir, capture_output=True, text=True, timeout=900)
    problems = []
    if r.returncode != 0:
        return [f"{model}: bench/repro exited {r.returncode}:\n{r.stderr[-3000:]}"]
    with open(os.path.join(out, "results.json")) as f:
        rows = json.load(f)
    if len(rows) != 12:
        problems.append(f"{model}: results.json has {len(rows)} rows, want 12")
    seen = set()
    for row in rows:
        for c in COLUMNS:
            if c not in row:
                problems.append(f"{model}: a row lacks {c}: {row}")
        if row.get("model") != model:
            problems.append(f"{model}: row model is {row.get('model')}")
        for c in ["best_val_loss", "test_metric", "flops_total", "wall_seconds"]:
            v = row.get(c)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                problems.append(f"{model}: {row.get('mode')}-s{row.get('seed')}: {c} = {v}")
        seen.add((row.get("mode"), row.get("seed")))
    want = {(m, s) for m in MODES for s in (1, 2, 3)}
    if seen != want:
        problems.append(f"{model}: runs {sorted(seen)} != {sorted(want)}")
    mat = [r for r in rows if r.get("mode") == "mat"]
    if mat and all(r.get("mean_active_fraction", 1.0) >= 1.0 for r in mat):
        problems.append(f"{model}: MAT never switched a module off in 20 steps")
    with open(os.path.join(out, "table.md")) as f:
        table = f.read()
    metric = "test accuracy" if model == "vgg" else "test loss"
    for row in rows:
        if row.get("test_metric_name") != metric.replace(" ", "_"):
            problems.append(f"{model}: test_metric_name = {row.get('test_metric_name')}")
        if model == "vgg" and not 0 < row.get("test_metric", -1) <= 1:
            problems.append(f"{model}: an accuracy outside (0, 1]: {row.get('test_metric')}")
    for needle in ["| mode |", f"{metric} at convergence", "Goals"] + [f"| {m} |" for m in MODES]:
        if needle not in table:
            problems.append(f"{model}: table.md lacks {needle!r}")
    with open(os.path.join(out, "table.json")) as f:
        meta = json.load(f)["meta"]
    if meta.get("model") != model:
        problems.append(f"{model}: table.json meta.model = {meta.get('model')}")
    for svg in ["loss_vs_flops.svg", "lambda_heatmap.svg"]:
        p = os.path.join(out, svg)
        if not os.path.exists(p) or "<svg" not in open(p).read(200):
            problems.append(f"{model}: {svg} missing or not SVG")
    return problems


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--source-dir", required=True)
    ap.add_argument("--mat-train", required=True)
    ap.add_argument("models", nargs="+")
    a = ap.parse_args()
    problems = []
    with tempfile.TemporaryDirectory(prefix="mat-check-repro-") as work:
        for model in a.models:
            problems += check(model, a.source_dir, a.mat_train, work)
    for p in problems:
        print("FAIL:", p)
    if not problems:
        print(f"bench/repro {', '.join(a.models)}: 12 runs each, results.json, table.md, "
              "table.json and plots as expected")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
