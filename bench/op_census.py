#!/usr/bin/env python3
"""bench/run op-census: the ops one full training step runs, ours (mat-bench op-census) against
the PyTorch peer's (bench/peers/bert_step.py --census), on the same BERT shape and batch, per
phase (forward, backward, optimizer), from the autograd profiler on this machine's LibTorch 1.x.

An op is counted as a kernel when it nests no other op and is not one that only allocates or
makes a view (NO_KERNEL), and a matmul (MATMULS) once per innermost call: on a GPU each such call
is one launch, and the input elements of the non-matmul ones are a proxy for the memory they
read (an expanded input counts at its expanded size). The table shows where our step runs more
(or fewer) kernels than the peer's, and the ops behind the difference. It is a census, not a
timing: a CPU run tells what a GPU run would launch, not how long it would take. The device's
own choices differ: on the CPU addmm copies the bias into its output (a copy_ here) where
cuBLASLt adds it in the matmul's epilogue, and the CPU optimizer phases differ because the
peer's torch.optim.AdamW runs per tensor on the CPU (foreach on CUDA).

Writes bench/results/op-census[-PRECISION][-CONFIG].json (MAT_BENCH_OUT_DIR overrides the folder,
MAT_BUILD_DIR the build).

    op_census.py [--config examples/bert-wikitext2.yaml] [--precision fp32|bf16] [--batch N]
    op_census.py --probe [--config ...] [--precision ...]: one λ probe of ours (the config's
        policy.estimator, probe_samples) against one of our training steps, no peer; writes
        op-census-probe[-PRECISION][-CONFIG].json.
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Leaf ops that launch nothing on a GPU: allocations, views, metadata.
NO_KERNEL = {
    "aten::empty", "aten::empty_strided", "aten::as_strided", "aten::view", "aten::_unsafe_view",
    "aten::reshape", "aten::_reshape_alias", "aten::t", "aten::transpose", "aten::permute",
    "aten::expand", "aten::expand_as", "aten::select", "aten::slice", "aten::narrow",
    "aten::unsqueeze", "aten::squeeze", "aten::detach", "aten::alias", "aten::resize_",
    "aten::lift_fresh", "aten::contiguous", "aten::view_as", "aten::flatten", "aten::unflatten",
    "aten::result_type", "aten::numpy_T", "aten::chunk", "aten::split", "aten::unbind",
    "aten::to", "aten::_to_copy", "aten::set_", "aten::is_nonzero", "aten::size", "aten::stride",
    "detach", "aten::detach_", "aten::zeros_like", "aten::ones_like", "aten::empty_like",
    "aten::resolve_conj", "aten::resolve_neg",
}
PHASES = ("forward", "backward", "optimizer")


def run(cmd):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out[out.index("{"):])


# Ops that run their own kernel after helper ops (the bias copy of addmm, resolve_conj), so they
# are never leaves: counted once per innermost call (autocast's wrapper has the same name).
MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmv", "aten::mv"}


def kernels(table):
    """{op: (launches, input elements)} of the ops counted as kernels (a matmul's elements are
    left at 0: they are the same FLOPs on both sides, and bench/run step compares time)."""
    out = {}
    for name, t in table.items():
        if name in MATMULS:
            out[name] = (t.get("innermost_calls", 0), 0.0)
        elif t["leaf_calls"] > 0 and name.startswith("aten::") and name not in NO_KERNEL:
            out[name] = (t["leaf_calls"], t["leaf_input_elements"])
    return out


def probe_census(a, build):
    """--probe: one λ probe against one training step of ours (no peer), per phase, and the ops
    with the most launches in the probe."""
    ours = run([os.path.join(build, "bin/mat-bench"), "op-census", "--probe", "--root", ROOT,
                "--config", a.config, "--precision", a.precision, "--threads", "2"])
    result = {k: ours[k] for k in ours if k != "phases"}
    result["phases"] = {}
    print("%s, %s, estimator %s, %d probe samples every %d steps of batch %d:"
          % (a.config, a.precision, ours["estimator"], ours["probe_samples"], ours["probe_every"],
             ours["batch"]))
    for phase in ("probe", "step"):
        k = kernels(ours["phases"][phase])
        launches, elements = sum(v[0] for v in k.values()), sum(v[1] for v in k.values())
        top = sorted(k.items(), key=lambda kv: -kv[1][0])[:a.top]
        result["phases"][phase] = {"launches": launches, "input_elements": elements,
                                   "top_ops": [{"op": n, "launches": v[0], "input_elements": v[1]}
                                               for n, v in top],
                                   "ops": ours["phases"][phase]}
        print("  %-6s %6d launches, %.4g input elements; most launched: %s"
              % (phase, launches, elements, ", ".join("%s %d" % (n, v[0]) for n, v in top[:6])))
    p, s = result["phases"]["probe"]["launches"], result["phases"]["step"]["launches"]
    result["probe_over_step_launches"] = p / max(s, 1)
    print("  probe/step launches %.3f; at one probe every %d steps, the probe's share of the "
          "launches %.4f" % (p / max(s, 1), ours["probe_every"], p / (p + ours["probe_every"] * s)))
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="examples/bert-wikitext2.yaml")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--probe", action="store_true",
                    help="one λ probe against one training step of ours instead of the peer")
    a = ap.parse_args()
    build = os.environ.get("MAT_BUILD_DIR", os.path.join(ROOT, "build"))
    if a.probe:
        result = probe_census(a, build)
        write(result, "op-census-probe", a)
        return
    ours = run([os.path.join(build, "bin/mat-bench"), "op-census", "--root", ROOT, "--config",
                a.config, "--precision", a.precision, "--batch", str(a.batch), "--threads", "2"])
    peer = run([sys.executable, os.path.join(ROOT, "bench/peers/bert_step.py"), "--census",
                "--layers", str(ours["layers"]), "--d-model", str(ours["d_model"]),
                "--heads", str(ours["heads"]), "--d-ff", str(ours["d_ff"]),
                "--batch", str(ours["batch"]), "--seq", str(ours["seq_len"]),
                "--threads", "2", "--precision", a.precision])
    result = {"benchmark": "op-census", "config": a.config, "precision": a.precision,
              "model": {k: ours[k] for k in ("layers", "d_model", "heads", "d_ff", "batch",
                                              "seq_len")},
              "peer_torch": peer.get("torch"), "phases": {}}
    print("%s, %s, batch %d x %d: kernels (leaf ops that launch work) per phase"
          % (a.config, a.precision, ours["batch"], ours["seq_len"]))
    print("%-10s %9s %9s %7s %14s %14s %7s" % ("phase", "ours", "peer", "ratio", "ours_elems",
                                                "peer_elems", "ratio"))
    details = []
    for phase in PHASES:
        o, p = kernels(ours["phases"][phase]), kernels(peer["phases"][phase])
        on, pn = sum(v[0] for v in o.values()), sum(v[0] for v in p.values())
        oe, pe = sum(v[1] for v in o.values()), sum(v[1] for v in p.values())
        diff = []
        for name in sorted(set(o) | set(p)):
            oc, oel = o.get(name, (0, 0.0))
            pc, pel = p.get(name, (0, 0.0))
            if oc != pc or abs(oel - pel) > 1e-9 * max(oel, pel, 1):
                diff.append({"op": name, "ours_launches": oc, "peer_launches": pc,
                             "ours_input_elements": oel, "peer_input_elements": pel})
        diff.sort(key=lambda d: -abs(d["ours_input_elements"] - d["peer_input_elements"]))
        result["phases"][phase] = {"ours_launches": on, "peer_launches": pn,
                                   "ours_input_elements": oe, "peer_input_elements": pe,
                                   "ops_that_differ": diff,
                                   "ours": ours["phases"][phase], "peer": peer["phases"][phase]}
        print("%-10s %9d %9d %7.3f %14.4g %14.4g %7.3f" % (phase, on, pn, on / max(pn, 1), oe, pe,
                                                          oe / max(pe, 1)))
        details.append((phase, diff))
    for phase, diff in details:
        if not diff:
            continue
        print("\n%s: ops that differ (largest input-element difference first)" % phase)
        print("  %-36s %8s %8s %12s %12s" % ("op", "ours_n", "peer_n", "ours_elems", "peer_elems"))
        for d in diff[:a.top]:
            print("  %-36s %8d %8d %12.4g %12.4g" % (d["op"], d["ours_launches"], d["peer_launches"],
                                                     d["ours_input_elements"],
                                                     d["peer_input_elements"]))
    write(result, "op-census", a)


def write(result, name, a):
    """bench/results/NAME[-PRECISION][-CONFIG].json (MAT_BENCH_OUT_DIR overrides the folder)."""
    out_dir = os.environ.get("MAT_BENCH_OUT_DIR", os.path.join(ROOT, "bench/results"))
    if a.precision != "fp32":
        name += "-" + a.precision
    if a.config != "examples/bert-wikitext2.yaml":
        name += "-" + os.path.basename(a.config).rsplit(".", 1)[0]
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, name + ".json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
