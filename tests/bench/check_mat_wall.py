#!/usr/bin/env python3
"""bench/run mat-wall, shrunk: one 30-second round on its default config (the 1-nat regime's
BERT), with a random half of each group's modules on at every step (policy.kind=rand) as the policy compared with full training, so that its FLOPs per
step are surely lower (MAT's own masks depend on its λ early in training). Checks the JSON it
writes: both runs' windows past --skip, positive seconds and FLOPs per step, the policy's FLOPs
per step below full's and above a quarter of them, and the medians equal to the one round's
ratios. Writes into a temporary folder; bench/results is not touched.

usage: check_mat_wall.py --source-dir DIR --mat-train BIN
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--source-dir", required=True)
    p.add_argument("--mat-train", required=True)
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="check-mat-wall-") as out:
        env = dict(os.environ, MAT_BENCH_OUT_DIR=out)
        cmd = [sys.executable, os.path.join(a.source_dir, "bench/mat_wall.py"),
               "--mat-train", a.mat_train,
               "--seconds", "30", "--rounds", "1", "--skip", "20",
               "--set", "train.steps=100000", "--set", "train.eval_every=10",
               "--set", "policy.kind=rand", "--set", "policy.rand_fraction=0.5",
               "--set", "policy.warmup_steps=5"]
        subprocess.run(cmd, check=True, env=env)
        with open(os.path.join(out, "mat-wall.json")) as f:
            r = json.load(f)
    assert r["benchmark"] == "mat-wall" and len(r["rounds"]) == 1, r
    k = r["rounds"][0]
    for name in ("full", "mat"):
        w = k[name]
        assert w["from_step"] >= 20 and w["to_step"] > w["from_step"], (name, w)
        assert w["seconds_per_step"] > 0 and w["flops_per_step"] > 0, (name, w)
    assert 0.25 < k["flops_ratio"] < 0.95, k  # half the modules off: fewer FLOPs, not none
    assert k["wall_ratio"] == k["mat"]["seconds_per_step"] / k["full"]["seconds_per_step"], k
    assert r["wall_ratio_median"] == k["wall_ratio"], r
    assert r["flops_ratio_median"] == k["flops_ratio"], r
    print("mat-wall: FLOPs ratio %.3f, wall ratio %.3f (one short round)"
          % (k["flops_ratio"], k["wall_ratio"]))


if __name__ == "__main__":
    main()
