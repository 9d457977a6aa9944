#!/usr/bin/env python3
"""Where a GPU step's time goes, ours against the PyTorch peer's, from two Chrome traces of the
same steps: mat-bench step --trace (LibTorch's Kineto) and bench/peers/bert_step.py --trace
(torch.profiler), each of 3 steps inside "mat::step" scopes.

Per step: wall time (the scopes), device time (every kernel, memcpy and memset), the device's
busy fraction (device / wall: far below 1 means the host does not launch fast enough), kernel
launches, and device time by kernel family (matmul, elementwise, reduction, softmax, layer norm,
dropout, copies (casts included) and cat, optimizer, ...), then the kernels whose time differs most. Writes the
figures as JSON with --out.

    kernels.py OURS.json PEER.json [--steps 3] [--top 15] [--out FILE]
"""
import argparse
import collections
import json

DEVICE_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
# First match wins; names are lower-cased CUDA kernel names.
FAMILIES = [
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "sm90_", "sm80_", "ampere_", "hopper")),
    ("optimizer", ("adam", "multi_tensor_apply", "foreach")),
    ("softmax", ("softmax",)),
    ("layer_norm", ("layer_norm", "layernorm")),
    ("dropout", ("dropout", "bernoulli", "philox")),
    ("copy_cast_cat", ("catarraybatchedcopy", "cat_", "copy", "memcpy")),
    ("memset", ("memset", "fill")),
    ("reduction", ("reduce",)),
    ("embedding_index", ("embedding", "index", "gather", "scatter")),
    ("cross_entropy", ("nll_loss", "log_softmax")),
    ("elementwise", ("elementwise", "vectorized", "unrolled")),
]


def family(name):
    n = name.lower()
    for fam, keys in FAMILIES:
        if any(k in n for k in keys):
            return fam
    return "other"


def load(path, steps):
    with open(path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    xs = [e for e in events if e.get("ph") == "X"]
    # (a trace without Kineto, as torch 1.13 on the CPU writes, has no categories)
    scopes = [e for e in xs if e.get("name") == "mat::step" and e.get("cat") in ("user_annotation", None)]
    kernels = [e for e in xs if e.get("cat") in DEVICE_CATEGORIES]
    runtime = [e for e in xs if e.get("cat") in ("cuda_runtime", "cuda_driver")]
    by_name = collections.defaultdict(lambda: [0, 0.0])
    by_family = collections.defaultdict(lambda: [0, 0.0])
    for k in kernels:
        for table, key in ((by_name, k["name"]), (by_family, family(k["name"]))):
            table[key][0] += 1
            table[key][1] += float(k.get("dur", 0))
    per = 1.0 / steps
    return {
        "steps_in_trace": len(scopes),
        "wall_ms_per_step": sum(float(s["dur"]) for s in scopes) / 1000.0 / max(len(scopes), 1),
        "device_ms_per_step": sum(float(k.get("dur", 0)) for k in kernels) / 1000.0 * per,
        "launches_per_step": len(kernels) * per,
        "runtime_calls_per_step": len(runtime) * per,
        "runtime_ms_per_step": sum(float(r.get("dur", 0)) for r in runtime) / 1000.0 * per,
        "families": {f: {"launches": n * per, "ms": t / 1000.0 * per}
                     for f, (n, t) in sorted(by_family.items())},
        "kernels": {k: {"launches": n * per, "ms": t / 1000.0 * per}
                    for k, (n, t) in by_name.items()},
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ours")
    ap.add_argument("peer")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    o, p = load(a.ours, a.steps), load(a.peer, a.steps)
    for who, r in (("ours", o), ("peer", p)):
        if r["steps_in_trace"] != a.steps:
            print("warning: %s trace has %d mat::step scopes, expected %d"
                  % (who, r["steps_in_trace"], a.steps))
    print("%-24s %10s %10s %7s" % ("per step", "ours", "peer", "ratio"))
    for key, label in (("wall_ms_per_step", "wall ms"), ("device_ms_per_step", "device ms"),
                       ("launches_per_step", "kernel launches"),
                       ("runtime_ms_per_step", "CUDA runtime ms (host)")):
        print("%-24s %10.2f %10.2f %7.3f" % (label, o[key], p[key], o[key] / max(p[key], 1e-12)))
    for who, r in (("ours", o), ("peer", p)):
        print("%s: device busy %.0f %% of the wall time" %
              (who, 100.0 * r["device_ms_per_step"] / max(r["wall_ms_per_step"], 1e-12)))
    print("\n%-16s %9s %9s %9s %9s" % ("family", "ours_ms", "peer_ms", "ours_n", "peer_n"))
    for fam in sorted(set(o["families"]) | set(p["families"])):
        of = o["families"].get(fam, {"ms": 0, "launches": 0})
        pf = p["families"].get(fam, {"ms": 0, "launches": 0})
        print("%-16s %9.3f %9.3f %9.1f %9.1f" % (fam, of["ms"], pf["ms"], of["launches"],
                                                 pf["launches"]))
    diff = []
    for k in set(o["kernels"]) | set(p["kernels"]):
        ok = o["kernels"].get(k, {"ms": 0, "launches": 0})
        pk = p["kernels"].get(k, {"ms": 0, "launches": 0})
        diff.append((ok["ms"] - pk["ms"], k, ok, pk))
    diff.sort(key=lambda d: -abs(d[0]))
    print("\nkernels whose time differs most (ms per step, launches per step)")
    for d, k, ok, pk in diff[:a.top]:
        print("  %+8.3f  ours %7.3f (%5.1f)  peer %7.3f (%5.1f)  %s"
              % (d, ok["ms"], ok["launches"], pk["ms"], pk["launches"], k[:110]))
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"ours": o, "peer": p}, f, indent=1)


if __name__ == "__main__":
    main()
