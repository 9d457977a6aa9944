#!/usr/bin/env python3
"""The PyTorch peer of mat-bench's `step`: the same BERT masked-LM, one full training step
(forward, backward, AdamW) on the same batch shape, median of repeated steps.

Same architecture as trainer/models/bert.h: post-LN (or pre-LN) encoder, fused QKV, GELU FFN, the MLM
head (dense + GELU + LayerNorm) applied to the masked positions only, decoder tied to the token
embedding, dropout as configured. Prints one JSON object.

  bert_step.py --layers 4 --d-model 256 --heads 8 --d-ff 1024 --batch 32 --seq 128 \
               --vocab 33279 --reps 10 --threads 2 --device cpu
"""
import argparse
import json
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def up(t):
    """Layer norms take float32, as trainer/models/bert.cc's UpIfLow (torch 1.13's CPU layer_norm rejects
    a bf16 input with float32 weights; CUDA autocast casts it up itself)."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


class Layer(nn.Module):
    def __init__(self, d, h, f, p, pre_ln):
        super().__init__()
        self.h, self.p, self.pre_ln = h, p, pre_ln
        self.qkv = nn.Linear(d, 3 * d)
        self.o = nn.Linear(d, d)
        self.ff1 = nn.Linear(d, f)
        self.ff2 = nn.Linear(f, d)
        self.ln1 = nn.LayerNorm(d)
        self.ln2 = nn.LayerNorm(d)

    def attn(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).chunk(3, -1)
        q, k, v = (z.view(b, t, self.h, d // self.h).transpose(1, 2) for z in (q, k, v))
        s = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(d // self.h)
        a = F.dropout(torch.softmax(s, -1), self.p, self.training)
        return self.o(torch.matmul(a, v).transpose(1, 2).reshape(b, t, d))

    def ffn(self, x):
        return self.ff2(F.dropout(F.gelu(self.ff1(x)), self.p, self.training))

    def forward(self, x):
        if self.pre_ln:
            x = x + F.dropout(self.attn(self.ln1(up(x))), self.p, self.training)
            return x + F.dropout(self.ffn(self.ln2(up(x))), self.p, self.training)
        x = self.ln1(up(x + F.dropout(self.attn(x), self.p, self.training)))
        return self.ln2(up(x + F.dropout(self.ffn(x), self.p, self.training)))


class BertMlm(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.p = a.dropout
        self.tok = nn.Embedding(a.vocab, a.d_model)
        self.pos = nn.Embedding(a.seq, a.d_model)
        self.emb_ln = nn.LayerNorm(a.d_model)
        self.layers = nn.ModuleList(
            Layer(a.d_model, a.heads, a.d_ff, a.dropout, a.pre_ln) for _ in range(a.layers))
        self.dense = nn.Linear(a.d_model, a.d_model)
        self.head_ln = nn.LayerNorm(a.d_model)
        self.dec_bias = nn.Parameter(torch.zeros(a.vocab))

    def forward(self, ids, positions):
        b, t = ids.shape
        x = self.tok(ids) + self.pos(torch.arange(t, device=ids.device)).unsqueeze(0)
        x = F.dropout(self.emb_ln(x), self.p, self.training)
        for layer in self.layers:
            x = layer(x)
        h = x.reshape(b * t, -1).index_select(0, positions)
        h = self.head_ln(up(F.gelu(self.dense(h))))
        return F.linear(h, self.tok.weight, self.dec_bias)


def census(a, opt, forward, step):
    """The ops of one step after a warm-up step, per phase, by name: calls, calls that nest no
    other op ("leaf"), calls that nest none of their own name ("innermost"), their input elements (the product of each tensor argument's shape) and
    their calls by input shapes, in mat-bench op-census's format."""
    step()  # warm-up
    phases, state = {}, {}
    steps = (("forward", lambda: state.update(loss=forward())),
             ("backward", lambda: state["loss"].backward()),
             ("optimizer", lambda: (opt.step(), opt.zero_grad(set_to_none=True))))
    for phase, fn in steps:
        with torch.autograd.profiler.profile(record_shapes=True) as prof:
            fn()
        table = {}
        for e in prof.function_events:
            t = table.setdefault(e.name, {"calls": 0, "leaf_calls": 0, "innermost_calls": 0,
                                          "leaf_input_elements": 0.0, "leaf_shapes": {}})
            t["calls"] += 1
            if all(c.name != e.name for c in e.cpu_children):
                t["innermost_calls"] += 1
            if not e.cpu_children:
                t["leaf_calls"] += 1
                t["leaf_input_elements"] += float(sum(
                    math.prod(s) for s in e.input_shapes
                    if s and all(isinstance(d, int) for d in s)))
                key = json.dumps(e.input_shapes, separators=(",", ":"))
                t["leaf_shapes"][key] = t["leaf_shapes"].get(key, 0) + 1
        phases[phase] = table
    return {"benchmark": "op-census", "program": "pytorch", "torch": torch.__version__,
            "device": a.device, "precision": a.precision, "layers": a.layers,
            "d_model": a.d_model, "heads": a.heads, "d_ff": a.d_ff, "batch": a.batch,
            "seq_len": a.seq, "phases": phases}


def main():
    ap = argparse.ArgumentParser()
    for k, v in [("layers", 4), ("d-model", 256), ("heads", 8), ("d-ff", 1024), ("batch", 32),
                 ("seq", 128), ("vocab", 33279), ("reps", 10), ("threads", 2)]:
        ap.add_argument("--" + k, type=int, default=v)
    ap.add_argument("--like", default="",
                    help="take layers, d-model, heads, d-ff, batch and seq from this JSON of "
                         "mat-bench step (its --out)")
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--pre-ln", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                    help="bf16: forward and loss under torch.autocast(bfloat16), as mat-train")
    ap.add_argument("--trace", default="",
                    help="also write a Chrome trace (torch.profiler: CPU ops, CUDA kernels) of 3 "
                         "steps, each in a 'mat::step' scope, to this path (mat-bench step "
                         "--trace's counterpart; bench/gpu/kernels.py compares them)")
    ap.add_argument("--census", action="store_true",
                    help="print the ops of one step per phase instead of timings (mat-bench "
                         "op-census's counterpart; bench/op_census.py compares them)")
    a = ap.parse_args()
    if a.like:
        with open(a.like) as f:
            ours = json.load(f)
        a.layers, a.d_model, a.heads, a.d_ff, a.batch, a.seq = (
            ours[k] for k in ("layers", "d_model", "heads", "d_ff", "batch", "seq_len"))
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dev = torch.device(a.device)
    model = BertMlm(a)
    with torch.no_grad():  # the same initialisation as trainer/models/bert.cc
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.02)
            elif "ln" not in name:
                p.zero_()
    model = model.to(dev).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                             {"params": rest, "weight_decay": 0.0}], lr=1e-4)
    ids = torch.randint(0, a.vocab - 1, (a.batch, a.seq), device=dev)
    m = a.batch * a.seq * 15 // 100
    positions = torch.randperm(a.batch * a.seq)[:m].sort().values.to(dev)
    labels = torch.randint(0, a.vocab - 1, (m,), device=dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def forward():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.precision == "bf16"):
            return F.cross_entropy(model(ids, positions), labels)

    def step():
        loss = forward()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    if a.census:
        print(json.dumps(census(a, opt, forward, step)))
        return
    times = []
    for r in range(a.reps + 1):
        sync()
        t0 = time.perf_counter()
        loss = step()
        sync()
        if r > 0:  # the first step is warm-up
            times.append(time.perf_counter() - t0)
    # Where the time goes: separate repeats, synchronized between phases.
    phases = {"forward": [], "backward": [], "optimizer": []}
    for r in range(a.reps):
        sync()
        t0 = time.perf_counter()
        loss = forward()
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        t3 = time.perf_counter()
        phases["forward"].append(t1 - t0)
        phases["backward"].append(t2 - t1)
        phases["optimizer"].append(t3 - t2)
    if a.trace:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if dev.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(3):
                with torch.profiler.record_function("mat::step"):
                    step()
            sync()
        prof.export_chrome_trace(a.trace)
    times.sort()
    print(json.dumps({"peer": "pytorch", "torch": torch.__version__, "device": a.device,
                      "precision": a.precision,
                      "threads": torch.get_num_threads(), "reps": a.reps,
                      "step_seconds_median": times[len(times) // 2],
                      "phases_seconds_median": {k: sorted(v)[len(v) // 2] for k, v in phases.items()},
                      "loss": float(loss)}))


if __name__ == "__main__":
    main()
