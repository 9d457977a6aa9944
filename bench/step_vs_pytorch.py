#!/usr/bin/env python3
"""bench/run step-vs-pytorch: this project's full training step against the PyTorch peer
(bench/peers/bert_step.py) on the same BERT, batch and sequence, side by side in one run.

Rounds alternate the two programs (ours, peer with glibc's default malloc, peer with the malloc
settings this project applies in-process) so machine noise hits all of them alike; each figure is
the median over rounds of each program's median step. Writes bench/results/step-vs-pytorch.json
(CPU, fp32) or step-vs-pytorch-DEVICE-PRECISION.json; MAT_BENCH_OUT_DIR overrides the folder and
MAT_BUILD_DIR the build (default build/), MAT_BENCH_CONFIG the model (default
examples/bert-wikitext2.yaml; the peer gets the same shape).

    step_vs_pytorch.py [REPS [ROUNDS [DEVICE [PRECISION]]]]   PRECISION: fp32 | bf16
"""
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd, env=None):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out[out.index("{"):])


def main():
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    device = sys.argv[3] if len(sys.argv) > 3 else "cpu"
    precision = sys.argv[4] if len(sys.argv) > 4 else "fp32"
    build = os.environ.get("MAT_BUILD_DIR", os.path.join(ROOT, "build"))
    config = os.environ.get("MAT_BENCH_CONFIG", "examples/bert-wikitext2.yaml")
    ours_cmd = [os.path.join(build, "bin/mat-bench"), "step", "--root", ROOT,
                "--reps", str(reps), "--device", device, "--precision", precision,
                "--config", config]
    threads = 2 if device == "cpu" else 1
    ours0 = run(ours_cmd)
    peer_cmd = [sys.executable, os.path.join(ROOT, "bench/peers/bert_step.py"),
                "--layers", str(ours0["layers"]), "--d-model", str(ours0["d_model"]),
                "--heads", str(ours0["heads"]), "--d-ff", str(ours0["d_ff"]),
                "--batch", str(ours0["batch"]),
                "--seq", str(ours0["seq_len"]), "--reps", str(reps), "--device", device,
                "--threads", str(os.cpu_count() if device == "cpu" else threads),
                "--precision", precision]
    tuned = dict(os.environ, MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_="1073741824",
                 MALLOC_TOP_PAD_="67108864")
    ours, peer, peer_tuned = [ours0["step_seconds_median"]], [], []
    peer0 = None
    for r in range(rounds):
        pr = run(peer_cmd)
        peer0 = peer0 or pr
        peer.append(pr["step_seconds_median"])
        peer_tuned.append(run(peer_cmd, tuned)["step_seconds_median"])
        if r + 1 < rounds:
            ours.append(run(ours_cmd)["step_seconds_median"])
    o, p, pt = statistics.median(ours), statistics.median(peer), statistics.median(peer_tuned)
    result = {
        "benchmark": "step-vs-pytorch", "device": device, "precision": precision, "reps": reps,
        "rounds": rounds,
        "config": config,
        "model": {k: ours0[k] for k in ("layers", "d_model", "heads", "d_ff", "batch", "seq_len")},
        "ours_step_seconds": o, "peer_step_seconds": p, "peer_tuned_malloc_step_seconds": pt,
        "ratio_ours_over_peer": o / p, "ratio_ours_over_peer_tuned_malloc": o / pt,
        "goal_ratio": 0.9, "ours_rounds": ours, "peer_rounds": peer, "peer_tuned_rounds": peer_tuned,
        "flops_per_step": ours0["flops_per_step"],
        "ours_achieved_flops_per_second": ours0["flops_per_step"] / o,
        "ours_phases_seconds": ours0.get("phases_seconds_median"),
        "peer_phases_seconds": peer0.get("phases_seconds_median"),
    }
    out_dir = os.environ.get("MAT_BENCH_OUT_DIR", os.path.join(ROOT, "bench/results"))
    name = "step-vs-pytorch"
    if device != "cpu" or precision != "fp32":
        name += "-%s-%s" % (device.replace(":", ""), precision)
    if "MAT_BENCH_CONFIG" in os.environ:
        name += "-" + os.path.basename(config).rsplit(".", 1)[0]
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, name + ".json"), "w") as f:
        json.dump(result, f, indent=2)
    print("%-28s %10s" % ("program", "step_s"))
    print("%-28s %10.4f" % ("mat-bench step", o))
    print("%-28s %10.4f" % ("pytorch peer", p))
    print("%-28s %10.4f" % ("pytorch peer, tuned malloc", pt))
    print("ratio ours/peer %.3f, ours/peer(tuned malloc) %.3f (goal <= 0.9)" % (o / p, o / pt))
    for who, ph in (("ours", result["ours_phases_seconds"]), ("peer", result["peer_phases_seconds"])):
        if ph:
            print("%s synchronized phases: forward %.4f s, backward %.4f s, optimizer %.4f s"
                  % (who, ph["forward"], ph["backward"], ph["optimizer"]))


if __name__ == "__main__":
    main()
