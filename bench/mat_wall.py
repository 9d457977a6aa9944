#!/usr/bin/env python3
"""bench/run mat-wall: wall-clock seconds per step of MAT against full training, side by side.

Each round starts mat-train twice at once, one process per policy (policy.kind=full, and the
config's policy with the --set keys: "mat" in the output, MAT in the regime's config), one
thread each, on the same config and seed, and stops both
after --seconds (SIGTERM; the runs are thrown away). Per run it reads metrics.jsonl's evaluation
rows: seconds and FLOPs per step over the window from the first row at or after --skip steps
(past MAT's warm-up, in which every module trains) to the last row. Per round: MAT's seconds
per step over full's (the wall ratio) and its FLOPs per step over full's (the FLOPs ratio); the
median over rounds of each. The two processes share the machine alike, as the registered tests'
runs did (two at a time, one thread each); a round's ratio is the figure, not either side's
seconds. Evaluations cost both sides alike and are kept small (--set train.eval_batches).

Writes bench/results/mat-wall.json (MAT_BENCH_OUT_DIR overrides the folder) and prints a table.

usage: bench/mat_wall.py [--mat-train BIN] [--config YAML] [--seconds S] [--rounds R]
                         [--skip STEPS] [--set KEY=VALUE ...]
"""
import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def window(run_dir, skip):
    """Seconds, FLOPs and steps between the first evaluation row at or after `skip` and the
    last one; None when the run has fewer than two such rows."""
    path = os.path.join(run_dir, "metrics.jsonl")
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # the line being written when the run was stopped
                    continue
                if "val_loss" in row and row["step"] >= skip:
                    rows.append(row)
    if len(rows) < 2:
        return None
    a, b = rows[0], rows[-1]
    steps = b["step"] - a["step"]
    return {"from_step": a["step"], "to_step": b["step"],
            "seconds_per_step": (b["wall_seconds"] - a["wall_seconds"]) / steps,
            "flops_per_step": (b["flops"]["total"] - a["flops"]["total"]) / steps}


def one_round(args, sets, tmp, k):
    policies = {"full": ["--set", "policy.kind=full"], "mat": []}
    procs, logs, outs = {}, {}, {}
    for name, extra in policies.items():
        outs[name] = os.path.join(tmp, "%s-%d" % (name, k))
        logs[name] = open(outs[name] + ".log", "w")
        cmd = [args.mat_train, "--config", args.config, "--out", outs[name], "--no-progress",
               "--set", "train.threads=1"] + sets + extra
        procs[name] = subprocess.Popen(cmd, cwd=ROOT, stdout=logs[name], stderr=subprocess.STDOUT)
    result, deadline = {}, time.monotonic() + args.seconds
    for name, proc in procs.items():
        try:  # a run that ends first (too few steps) is fine
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for name, proc in procs.items():
        if proc.poll() is None:
            proc.terminate()
            proc.wait()
        logs[name].close()
        w = window(outs[name], args.skip)
        if w is None:
            with open(outs[name] + ".log") as f:
                tail = f.read()[-2000:]
            raise SystemExit("mat-wall: the %s run of round %d has fewer than two evaluations "
                             "past step %d in %g s (raise --seconds, lower --skip or "
                             "train.eval_every); its output ends:\n%s"
                             % (name, k, args.skip, args.seconds, tail))
        result[name] = w
    result["wall_ratio"] = result["mat"]["seconds_per_step"] / result["full"]["seconds_per_step"]
    result["flops_ratio"] = result["mat"]["flops_per_step"] / result["full"]["flops_per_step"]
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mat-train", default=os.path.join(ROOT, "build/bin/mat-train"))
    p.add_argument("--config", default=os.path.join(ROOT, "examples/bert-wikitext2-regime.yaml"))
    p.add_argument("--seconds", type=float, default=150, help="each round's length")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--skip", type=int, default=1000, help="steps before the window")
    p.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE")
    args = p.parse_args()
    args.mat_train, args.config = os.path.abspath(args.mat_train), os.path.abspath(args.config)
    if args.rounds < 1 or args.seconds <= 0:
        raise SystemExit("mat-wall: --rounds must be at least 1 and --seconds positive")
    # Small evaluations, then the caller's keys (a later --set replaces an earlier one). The runs
    # start in the repository's root, where the examples' relative data folders are.
    sets = ["--set", "train.eval_every=250", "--set", "train.eval_batches=2"]
    for kv in args.sets:
        sets += ["--set", kv]
    with tempfile.TemporaryDirectory(prefix="mat-wall-") as tmp:
        rounds = [one_round(args, sets, tmp, k) for k in range(args.rounds)]
    result = {
        "benchmark": "mat-wall",
        "config": os.path.relpath(os.path.abspath(args.config), ROOT),
        "sets": args.sets, "seconds_per_round": args.seconds, "skip_steps": args.skip,
        "threads_per_run": 1, "cpus": os.cpu_count(), "load_at_end": os.getloadavg()[0],
        "rounds": rounds,
        "wall_ratio_median": statistics.median(r["wall_ratio"] for r in rounds),
        "flops_ratio_median": statistics.median(r["flops_ratio"] for r in rounds),
    }
    out_dir = os.environ.get("MAT_BENCH_OUT_DIR", os.path.join(ROOT, "bench/results"))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "mat-wall.json"), "w") as f:
        json.dump(result, f, indent=2)
    print("round  steps full  steps mat  s/step full  s/step mat  wall mat/full  FLOPs mat/full")
    for k, r in enumerate(rounds):
        print("%5d  %5d-%-5d  %5d-%-5d  %11.4f  %10.4f  %13.3f  %14.3f" % (
            k, r["full"]["from_step"], r["full"]["to_step"], r["mat"]["from_step"],
            r["mat"]["to_step"], r["full"]["seconds_per_step"], r["mat"]["seconds_per_step"],
            r["wall_ratio"], r["flops_ratio"]))
    print("median: wall %.3f, FLOPs %.3f (MAT over full, per step, same window of each run)"
          % (result["wall_ratio_median"], result["flops_ratio_median"]))


if __name__ == "__main__":
    main()
