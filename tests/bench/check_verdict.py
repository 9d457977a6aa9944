#!/usr/bin/env python3
"""bench/sweep and bench/verdict, shrunk to 20 steps a run: the sweep trains full and a
two-setting grid (the gram and the output estimator, weights and detach backward) on one tuning
seed and writes the chosen setting; the verdict trains the six modes (full, mat, rand,
frozen-random and inverse replaying mat's decisions, multirate) on two seeds and checks the
replays' active counts against mat's, and writes results.json (every mode and
seed, flops_to_full_best and steps_to_full_best keys, unigram_test_loss, verdict, paired
differences) and table.md. Then --analyze-only rebuilds the same verdict from the kept runs,
and judges a registered confirmation (mat against frozen-random, no full runs) from them: complete,
a seed missing, a frozen-random run whose counts drifted, and a pooled difference.
Runs in a temporary folder; the committed results are not touched.

usage: check_verdict.py --source-dir DIR --mat-train BIN
"""
import argparse
import hashlib
import json
import lzma
import math
import os
import shutil
import subprocess
import sys
import tempfile

SMALL = ["--set", "train.steps=20", "--set", "train.eval_every=10", "--set",
         "policy.warmup_steps=5", "--set", "policy.probe_every=5", "--set",
         "policy.probe_samples=2"]
MODES = ["full", "mat", "rand", "frozen-random", "inverse", "multirate"]


def run(cmd, cwd):
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} exited {r.returncode}:\n{r.stderr[-3000:]}")
    return r


def group_counts(decisions_jsonl):
    """Per decision: {group: (active, size)}."""
    out = []
    with open(decisions_jsonl) as f:
        for line in f:
            if not line.strip():
                continue
            d = {}
            for m in json.loads(line)["modules"]:
                n, size = d.get(m["group"], (0, 0))
                d[m["group"]] = (n + (1 if m["active"] else 0), size + 1)
            out.append(d)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--source-dir", required=True)
    p.add_argument("--mat-train", required=True)
    a = p.parse_args()
    problems = []
    with tempfile.TemporaryDirectory(prefix="mat-check-verdict-") as work:
        sweep_out, sweep_runs = os.path.join(work, "sweep"), os.path.join(work, "sweep-runs")
        run([sys.executable, os.path.join(a.source_dir, "bench", "sweep"), "--quick",
             "--seeds", "101", "--mat-train", a.mat_train, "--out", sweep_out,
             "--runs", sweep_runs] + SMALL, a.source_dir)
        with open(os.path.join(sweep_out, "chosen.json")) as f:
            chosen = json.load(f)
        if not chosen.get("setting") or chosen.get("tuning_seeds") != [101]:
            problems.append(f"sweep: chosen.json is {chosen}")
        with open(os.path.join(sweep_out, "grid.json")) as f:
            grid = json.load(f)
        if len(grid["grid"]) != 2 or any(g["val_loss_at_budget"] is None for g in grid["grid"]):
            problems.append(f"sweep: grid.json scores {grid['grid']}")
        # Tuning seed 102 was not trained: the grid is incomplete and nothing is chosen.
        partial = os.path.join(work, "sweep-partial")
        run([sys.executable, os.path.join(a.source_dir, "bench", "sweep"), "--quick",
             "--seeds", "101,102", "--out", partial, "--runs", sweep_runs, "--analyze-only"],
            a.source_dir)
        if os.path.exists(os.path.join(partial, "chosen.json")):
            problems.append("sweep: an incomplete grid wrote chosen.json")
        r = subprocess.run([sys.executable, os.path.join(a.source_dir, "bench", "sweep"),
                            "--seeds", "3", "--mat-train", a.mat_train, "--out",
                            os.path.join(work, "x"), "--analyze-only", "--runs", sweep_runs],
                           cwd=a.source_dir, capture_output=True, text=True)
        if r.returncode == 0 or "disjoint" not in r.stderr:
            problems.append("sweep accepted a final seed as a tuning seed")

        out, runs = os.path.join(work, "verdict"), os.path.join(work, "verdict-runs")
        run([sys.executable, os.path.join(a.source_dir, "bench", "verdict"), "--quick",
             "--seeds", "1,2", "--mat-train", a.mat_train, "--out", out, "--runs", runs] + SMALL,
            a.source_dir)
        with open(os.path.join(out, "results.json")) as f:
            res = json.load(f)
        for key in ("unigram_test_loss", "verdict", "paired", "checks", "rows"):
            if key not in res:
                problems.append(f"verdict: results.json lacks {key}")
        u = res.get("unigram_test_loss")
        if not (isinstance(u, float) and math.isfinite(u) and u > 0):
            problems.append(f"verdict: unigram_test_loss is {u}")
        seen = {(w["mode"], w["seed"]) for w in res.get("rows", [])}
        want = {(m, s) for m in MODES for s in (1, 2)}
        if seen != want:
            problems.append(f"verdict: rows for {sorted(seen)}, want {sorted(want)}")
        for w in res.get("rows", []):
            for key in ("flops_to_full_best", "steps_to_full_best", "test_metric", "best_val_loss"):
                if key not in w:
                    problems.append(f"verdict: row {w['mode']}-s{w['seed']} lacks {key}")
        for pair in ("mat - rand", "mat - frozen-random", "mat - inverse", "mat - multirate"):
            if pair not in res.get("paired", {}) or res["paired"][pair]["n"] != 2:
                problems.append(f"verdict: no paired difference {pair} over 2 seeds")
        # The three controls replay their seed's mat run: the same active count per group at
        # every decision (the first verdict's frozen-random and inverse drifted from it).
        for seed in (1, 2):
            want = group_counts(os.path.join(runs, f"mat-s{seed}", "decisions.jsonl"))
            if not any(n < size for d in want for n, size in d.values()):
                problems.append(f"verdict: mat-s{seed} never masked a module: nothing replayed")
            for m in ("rand", "frozen-random", "inverse"):
                got = group_counts(os.path.join(runs, f"{m}-s{seed}", "decisions.jsonl"))
                if got != want:
                    problems.append(f"verdict: {m}-s{seed}'s active counts {got} are not "
                                    f"mat-s{seed}'s {want}")
        with open(os.path.join(out, "table.md")) as f:
            md = f.read()
        if "runs' training took" not in md:
            problems.append("verdict: table.md does not say how long the runs trained")
        for m in MODES:
            if f"| {m} |" not in md:
                problems.append(f"verdict: table.md has no {m} row")
        if "Verdict:" not in md:
            problems.append("verdict: table.md states no verdict")
        # The same table from the kept runs alone.
        again = os.path.join(work, "verdict-again")
        run([sys.executable, os.path.join(a.source_dir, "bench", "verdict"), "--quick",
             "--seeds", "1,2", "--mat-train", a.mat_train, "--out", again, "--runs", runs,
             "--analyze-only"], a.source_dir)
        with open(os.path.join(again, "results.json")) as f:
            res2 = json.load(f)
        if res2["rows"] != res["rows"] or res2["verdict"] != res["verdict"]:
            problems.append("verdict: --analyze-only gave another table from the same runs")
        if "incomplete" in res["verdict"]:
            problems.append(f"verdict: two complete seeds gave the verdict {res['verdict']!r}")

        def verdict_of(name, seeds, runs_dir, recorded=None):
            """The quick verdict from runs_dir's kept runs, into work/name (with `recorded` as
            its replay-check.json's "runs", when given)."""
            vdir = os.path.join(work, name)
            os.makedirs(vdir)
            if recorded is not None:
                with open(os.path.join(vdir, "replay-check.json"), "w") as f:
                    json.dump({"runs": recorded}, f)
            run([sys.executable, os.path.join(a.source_dir, "bench", "verdict"), "--quick",
                 "--seeds", seeds, "--out", vdir, "--runs", runs_dir, "--analyze-only"],
                a.source_dir)
            with open(os.path.join(vdir, "results.json")) as f:
                return json.load(f)["verdict"]

        # A registered seed without its runs: the criteria are not judged.
        v = verdict_of("verdict-short", "1,2,4", runs)
        if "(incomplete: 2 of 3 registered seeds" not in v:
            problems.append(f"verdict: a missing seed gave the verdict {v!r}")

        # A regime registered on the loss at [MASK]: judged on full's test_loss_at_mask_at_best
        # against unigram_eval_test_loss_at_mask (the means over full's seeds), not on the
        # whole test loss; an unknown basis and a --config other than the registered one are
        # refused.
        def with_criteria(name, criteria, extra=()):
            vdir = os.path.join(work, name)
            os.makedirs(vdir)
            with open(os.path.join(vdir, "criteria.json"), "w") as f:
                json.dump(criteria, f)
            return vdir, subprocess.run(
                [sys.executable, os.path.join(a.source_dir, "bench", "verdict"), "--quick",
                 "--seeds", "1,2", "--out", vdir, "--runs", runs, "--analyze-only", *extra],
                cwd=a.source_dir, capture_output=True, text=True, timeout=900)

        vdir, r = with_criteria("verdict-at-mask", {"setting": [], "criteria": {
            "regime_basis": "test_at_mask", "regime_margin_nats": -100.0}})
        if r.returncode != 0:
            problems.append(f"verdict at [MASK]: exited {r.returncode}: {r.stderr[-500:]}")
        else:
            with open(os.path.join(vdir, "results.json")) as f:
                regime = json.load(f)["checks"][0]
            sums = []
            for seed in (1, 2):
                with open(os.path.join(runs, f"full-s{seed}", "summary.json")) as f:
                    sums.append(json.load(f))
            base = sum(x["unigram_eval_test_loss_at_mask"] for x in sums) / 2
            loss = sum(x["test_loss_at_mask_at_best"] for x in sums) / 2
            want = f"unigram {base:.4f}, full {loss:.4f} at [MASK]: {base - loss:.3f} nat below"
            if regime.get("value") != want or not regime.get("met") or "[MASK]" not in regime.get(
                    "text", ""):
                problems.append(f"verdict at [MASK]: regime check {regime}, want value {want!r}")
            res = json.load(open(os.path.join(vdir, "results.json")))
            if res.get("regime") != {"basis": "test_at_mask", "unigram": base, "full": loss}:
                problems.append(f"verdict at [MASK]: results.json regime {res.get('regime')}")
            # A margin beyond the one reached is not met.
            vdir, r = with_criteria("verdict-at-mask-unmet", {"setting": [], "criteria": {
                "regime_basis": "test_at_mask", "regime_margin_nats": base - loss + 0.001}})
            with open(os.path.join(vdir, "results.json")) as f:
                if r.returncode != 0 or json.load(f)["checks"][0].get("met") is not False:
                    problems.append("verdict at [MASK]: a margin beyond the reached one was met")
        _, r = with_criteria("verdict-bad-basis", {"setting": [], "criteria": {
            "regime_basis": "val"}})
        if r.returncode == 0 or "regime_basis 'val'" not in r.stderr:
            problems.append(f"verdict: an unknown regime_basis was not refused: {r.stderr[-300:]}")
        _, r = with_criteria("verdict-other-config", {"setting": [], "config": "examples/x.yaml"},
                             ["--config", "examples/bert-wikitext2-tiny.yaml"])
        if r.returncode == 0 or "is not the config registered" not in r.stderr:
            problems.append(f"verdict: a --config other than the registered one was not refused: "
                            f"{r.stderr[-300:]}")
        # --plan prints what the runs would be (bench/gpu/verdict.sh reads it): the registered
        # config, setting, modes and seeds; it writes nothing (not even --out).
        plan_dir = os.path.join(work, "verdict-plan")
        os.makedirs(plan_dir)
        with open(os.path.join(plan_dir, "criteria.json"), "w") as f:
            json.dump({"setting": ["policy.alpha=0.2"], "config": "examples/bert-wikitext2-tiny.yaml",
                       "modes": ["full", "mat"], "final_seeds": [7, 8]}, f)
        plan_out = os.path.join(work, "verdict-plan-out")
        r = run([sys.executable, os.path.join(a.source_dir, "bench", "verdict"), "--criteria",
                 os.path.join(plan_dir, "criteria.json"), "--set", "train.threads=1",
                 "--out", plan_out, "--plan"], a.source_dir)
        plan = json.loads(r.stdout)
        want = {"config": "examples/bert-wikitext2-tiny.yaml",
                "sets": ["policy.alpha=0.2", "train.threads=1"], "modes": ["full", "mat"],
                "seeds": [7, 8]}
        if plan != want:
            problems.append(f"verdict --plan printed {plan}, want {want}")
        if os.path.exists(plan_out):
            problems.append("verdict --plan created its --out folder")

        # A registered config_sha256 binds the registered config's content: another hash, a
        # malformed one and one without a config are refused; the right one is judged, and
        # results.json records the hash of the config the table used (here --quick's tiny
        # config, not the registered one).
        def sha(rel):
            with open(os.path.join(a.source_dir, rel), "rb") as f:
                return hashlib.sha256(f.read()).hexdigest()
        registered_cfg, tiny = "examples/bert-wikitext2-verdict.yaml", "examples/bert-wikitext2-tiny.yaml"
        for name, crit, want_err in (
                ("verdict-edited-config", {"config": registered_cfg, "config_sha256": "0" * 64},
                 f"has sha256 {sha(registered_cfg)}, not the config_sha256"),
                ("verdict-bad-hash", {"config": registered_cfg, "config_sha256": "abc"},
                 "is not 64 lowercase hex digits"),
                ("verdict-hash-alone", {"config_sha256": sha(registered_cfg)},
                 "config_sha256 without the config")):
            _, r = with_criteria(name, {"setting": [], **crit})
            if r.returncode == 0 or want_err not in r.stderr:
                problems.append(f"verdict: {name} was not refused with {want_err!r}: "
                                f"{r.stderr[-300:]}")
        vdir, r = with_criteria("verdict-config-hash", {"setting": [], "config": registered_cfg,
                                                        "config_sha256": sha(registered_cfg)})
        if r.returncode != 0:
            problems.append(f"verdict: the registered config_sha256 was refused: {r.stderr[-300:]}")
        else:
            with open(os.path.join(vdir, "results.json")) as f:
                meta = json.load(f)["meta"]
            if meta.get("config_sha256_at_analysis") != sha(tiny) or "config_sha256" in meta:
                problems.append(f"verdict: results.json meta {meta} does not record the used "
                                f"config's hash {sha(tiny)} as config_sha256_at_analysis")

        # A registered confirmation (bench/results/confirm/): mat against the count-matched
        # frozen-random only, no full runs; judged only when every seed has its runs and every
        # replay has mat's counts.
        def confirm(name, seeds, required, runs_dir, pool=None):
            cdir = os.path.join(work, name)
            os.makedirs(cdir)
            with open(os.path.join(cdir, "criteria.json"), "w") as f:
                json.dump({"design": "confirmation", "setting": [], "final_seeds": seeds,
                           "modes": ["mat", "frozen-random"],
                           "criteria": {"controls_beaten": ["frozen-random"],
                                        "standard_errors": 2.0, "seeds_required": required}}, f)
            cmd = [sys.executable, os.path.join(a.source_dir, "bench", "verdict"), "--quick",
                   "--out", cdir, "--runs", runs_dir, "--analyze-only"]
            run(cmd + (["--pool", pool] if pool else []), a.source_dir)
            with open(os.path.join(cdir, "results.json")) as f:
                res = json.load(f)
            with open(os.path.join(cdir, "table.md")) as f:
                return res, f.read()

        res, md = confirm("confirm", [1, 2], 2, runs)
        v = res.get("verdict", "")
        if "incomplete" in v or "confirmed" not in v:
            problems.append(f"confirm: two complete seeds gave the verdict {v!r}")
        if res.get("paired", {}).get("mat - frozen-random", {}).get("n") != 2:
            problems.append(f"confirm: paired {res.get('paired')}, want mat - frozen-random over 2")
        if {r["mode"] for r in res.get("rows", [])} != {"mat", "frozen-random"}:
            problems.append("confirm: rows for modes other than mat and frozen-random")
        rc = res.get("replay_check", {})
        if sorted(rc) != ["frozen-random-s1", "frozen-random-s2"] or not all(
                e.get("ok") and e.get("same_histories") for e in rc.values()):
            problems.append(f"confirm: replay check {rc}")
        if "| mat - frozen-random |" not in md:
            problems.append("confirm: table.md has no paired difference")
        if "unigram model's test loss" not in md:
            problems.append("confirm: table.md does not state the regime (unigram test loss)")
        res, md = confirm("confirm-short", [1, 2, 4], 3, runs)
        if not res.get("verdict", "").startswith("none: the quick preset is a smoke run of the "
                                                   "pipeline (incomplete: 2 of 3"):
            problems.append(f"confirm: a missing seed gave the verdict {res.get('verdict')!r}")
        if res.get("paired") or "| mat - frozen-random |" in md:
            problems.append("confirm: a paired difference was reported before every seed ran")
        # A frozen-random run whose counts are not mat's: the criterion is not tested.
        tampered = os.path.join(work, "tampered-runs")
        for d in ("mat-s1", "frozen-random-s1"):
            shutil.copytree(os.path.join(runs, d), os.path.join(tampered, d))
        path = os.path.join(tampered, "frozen-random-s1", "decisions.jsonl")
        with open(path) as f:
            lines = f.read().splitlines()
        last = json.loads(lines[-1])
        last["modules"][0]["active"] = not last["modules"][0]["active"]
        lines[-1] = json.dumps(last)
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        res, md = confirm("confirm-tampered", [1], 1, tampered)
        if "frozen-random-s1 do not replay" not in res.get("verdict", "") or res.get("paired"):
            problems.append(f"confirm: a drifted replay gave the verdict {res.get('verdict')!r}")
        # The same drifted run in a verdict (seed 1's six modes): not judged either.
        for m in MODES:
            if not os.path.exists(os.path.join(tampered, f"{m}-s1")):
                shutil.copytree(os.path.join(runs, f"{m}-s1"), os.path.join(tampered, f"{m}-s1"))
        v = verdict_of("verdict-tampered", "1", tampered)
        if "frozen-random-s1 do not replay" not in v:
            problems.append(f"verdict: a drifted replay gave the verdict {v!r}")
        # Kept runs without their decisions.jsonl (bench/results/verdict/kept-runs) are judged
        # by replay-check.json beside the criteria: an entry counts only for the run whose
        # summary.json it names, and only when it shows a full replay.
        kept = os.path.join(work, "kept-runs")
        for m in MODES:
            shutil.copytree(os.path.join(runs, f"{m}-s1"), os.path.join(kept, f"{m}-s1"))
        n_dec = len(group_counts(os.path.join(kept, "mat-s1", "decisions.jsonl")))
        n_eval = sum(1 for line in open(os.path.join(kept, "rand-s1", "metrics.jsonl"))
                     if line.strip())
        for m in ("rand", "frozen-random"):
            os.remove(os.path.join(kept, f"{m}-s1", "decisions.jsonl"))

        def sha(m):
            with open(os.path.join(kept, f"{m}-s1", "summary.json"), "rb") as f:
                return hashlib.sha256(f.read()).hexdigest()

        good = {"rand-s1": {"evaluations": n_eval, "same_counts": n_eval,
                            "summary_sha256": sha("rand"), "mat_summary_sha256": sha("mat")},
                "frozen-random-s1": {"decisions": n_dec, "same_counts": n_dec, "same_steps": True,
                                     "permuted_histories": True,
                                     "summary_sha256": sha("frozen-random"),
                                     "mat_summary_sha256": sha("mat")}}
        v = verdict_of("kept-recorded", "1", kept, good)
        if "incomplete" in v:
            problems.append(f"verdict: recorded replay checks were not taken: {v!r}")
        short = json.loads(json.dumps(good))
        short["frozen-random-s1"]["same_counts"] = n_dec - 1
        other = json.loads(json.dumps(good))
        other["rand-s1"]["summary_sha256"] = sha("mat")  # an entry about another run
        other_mat = json.loads(json.dumps(good))
        other_mat["rand-s1"]["mat_summary_sha256"] = sha("inverse")  # another mat run replayed
        counts_only = json.loads(json.dumps(good))  # frozen-random needs mat's histories
        counts_only["frozen-random-s1"] = {"evaluations": n_eval, "same_counts": n_eval,
                                           "summary_sha256": sha("frozen-random"),
                                           "mat_summary_sha256": sha("mat")}
        for name, entries, want in (("kept-short", short, "frozen-random-s1 do not replay"),
                                    ("kept-other", other, "rand-s1 do not replay"),
                                    ("kept-other-mat", other_mat, "rand-s1 do not replay"),
                                    ("kept-counts-only", counts_only,
                                     "frozen-random-s1 do not replay"),
                                    ("kept-none", None, "frozen-random-s1, rand-s1 do not replay")):
            v = verdict_of(name, "1", kept, entries)
            if want not in v:
                problems.append(f"verdict: {name} gave the verdict {v!r}, want {want!r}")
        # --pool: a pooled difference over both folders' seeds, reported beside the judged one.
        solo = os.path.join(work, "seed2-runs")
        for d in ("mat-s2", "frozen-random-s2"):
            shutil.copytree(os.path.join(runs, d), os.path.join(solo, d))
        # Kept runs hold their decisions xz-compressed (bench/results/confirm/kept-runs).
        for d in ("mat-s2", "frozen-random-s2"):
            plain = os.path.join(solo, d, "decisions.jsonl")
            with open(plain, "rb") as f, lzma.open(plain + ".xz", "wb") as out:
                out.write(f.read())
            os.remove(plain)
        res, md = confirm("confirm-pooled", [2], 1, solo, pool=tampered)
        pooled = res.get("pooled", {}).get("mat - frozen-random", {})
        if pooled.get("seeds") != [1, 2] or res["paired"]["mat - frozen-random"]["seeds"] != [2]:
            problems.append(f"confirm: pooled {pooled}, paired {res.get('paired')}")
        if not res.get("replay_check", {}).get("frozen-random-s2", {}).get("ok"):
            problems.append(f"confirm: xz-compressed decisions not checked: {res.get('replay_check')}")
    for line in problems:
        print("FAIL:", line)
    print(f"{0 if problems else 1} passed, {1 if problems else 0} failed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
