#!/usr/bin/env python3
"""Checks the Grafana dashboards in dashboards/ (ctest deploy_dashboards).

  check_dashboards.py --promtool PROMTOOL DASHBOARD_DIR

For every *.json: it parses; schemaVersion 39; a unique uid and title; unique panel ids; every
panel and target uses the Prometheus datasource variable ${DS_PROMETHEUS} (or uid "prometheus");
a `job` variable from label_values(mat_job_step, job). Every PromQL expression (panel targets,
also inside rows, and label_values() selectors of query variables) after replacing Grafana's
variables with concrete values must parse (promtool check rules on a generated rules file) and may
name only the mat_* metrics of tests/deploy/metric_names.txt; every listed metric is on some
dashboard. Exits 1 with every problem listed.
"""
import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import metric_names  # noqa: E402

DATASOURCE_UIDS = ("${DS_PROMETHEUS}", "prometheus")
# Concrete values for Grafana's built-in variables and some of the dashboards' own; a variable a
# dashboard defines and that is not listed here becomes "value"; any other $name is an error.
BUILTINS = {
    "__rate_interval": "1m", "__interval": "30s", "__range": "1h", "__interval_ms": "30000",
    "__range_s": "3600", "__range_ms": "3600000",
}
SAMPLE_VALUES = {"job": "job-000001", "baseline_job": "job-000002", "group": "heads"}
VARIABLE = re.compile(r"\$\{([A-Za-z0-9_]+)(?::[A-Za-z]+)?\}|\$([A-Za-z0-9_]+)|\[\[([A-Za-z0-9_]+)\]\]")
STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
MAT_NAME = re.compile(r"(?<![A-Za-z0-9_:])mat_[A-Za-z0-9_:]*")
# Label names that start like metric names: the MAT job id's label.
MAT_LABELS = {"mat_job"}
LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*$", re.S)


def substitute(expr, defined, problems, where):
    def repl(m):
        name = m.group(1) or m.group(2) or m.group(3)
        if m.group(3):
            problems.append(f"{where}: deprecated [[{name}]] syntax")
        if name in BUILTINS:
            return BUILTINS[name]
        if name not in defined:
            problems.append(f"{where}: ${name} is not a variable of the dashboard")
            return "unknown"
        return SAMPLE_VALUES.get(name, "value")
    return VARIABLE.sub(repl, expr)


def panels_of(panels):
    for p in panels:
        yield p
        yield from panels_of(p.get("panels", []))


def check_datasource(ds, where, problems):
    if not isinstance(ds, dict) or ds.get("type") != "prometheus" or ds.get("uid") not in DATASOURCE_UIDS:
        problems.append(f"{where}: datasource {ds!r} is not the Prometheus one (uid ${{DS_PROMETHEUS}} or prometheus)")


def collect(path, problems, seen_uids):
    """Returns [(where, expr)] of one dashboard, after structural checks."""
    name = os.path.basename(path)
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        problems.append(f"{name}: not valid JSON: {e}")
        return []
    exprs = []
    if d.get("schemaVersion") != 39:
        problems.append(f"{name}: schemaVersion {d.get('schemaVersion')!r}, want 39")
    for key in ("uid", "title"):
        if not d.get(key):
            problems.append(f"{name}: no {key}")
        elif (key, d[key]) in seen_uids:
            problems.append(f"{name}: {key} {d[key]!r} also in {seen_uids[(key, d[key])]}")
        else:
            seen_uids[(key, d[key])] = name
    variables = {v.get("name"): v for v in d.get("templating", {}).get("list", [])}
    ds_var = variables.get("DS_PROMETHEUS")
    if not ds_var or ds_var.get("type") != "datasource" or ds_var.get("query") != "prometheus":
        problems.append(f"{name}: no datasource variable DS_PROMETHEUS of type prometheus")
    job = variables.get("job")
    if not job or not re.match(r"label_values\(mat_(job|worker)_step\s*,\s*mat_job\)", job.get("definition", "")):
        problems.append(f"{name}: no `job` variable from label_values(mat_job_step, mat_job)")
    for vname, v in variables.items():
        if v.get("type") != "query":
            continue
        where = f"{name}: variable {vname}"
        check_datasource(v.get("datasource"), where, problems)
        q = v.get("query")
        q = q.get("query", "") if isinstance(q, dict) else (q or "")
        if q != v.get("definition", q):
            problems.append(f"{where}: query {q!r} differs from definition {v.get('definition')!r}")
        m = LABEL_VALUES.match(q)
        if not m:
            problems.append(f"{where}: query {q!r} is not label_values(SELECTOR, LABEL)")
            continue
        exprs.append((where, substitute(m.group(1), variables, problems, where)))
    ids = set()
    panels = list(panels_of(d.get("panels", [])))
    if not panels:
        problems.append(f"{name}: no panels")
    for p in panels:
        where = f"{name}: panel {p.get('id')} {p.get('title')!r}"
        if p.get("id") in ids or not isinstance(p.get("id"), int):
            problems.append(f"{where}: missing or duplicate id")
        ids.add(p.get("id"))
        gp = p.get("gridPos", {})
        if not all(isinstance(gp.get(k), int) for k in ("h", "w", "x", "y")) or gp.get("x", 0) + gp.get("w", 0) > 24:
            problems.append(f"{where}: bad gridPos {gp!r}")
        if p.get("type") == "row":
            continue
        if not p.get("title"):
            problems.append(f"{where}: no title")
        check_datasource(p.get("datasource"), where, problems)
        targets = p.get("targets", [])
        if not targets:
            problems.append(f"{where}: no targets")
        refs = set()
        for t in targets:
            twhere = f"{where} target {t.get('refId')}"
            check_datasource(t.get("datasource"), twhere, problems)
            if not t.get("refId") or t.get("refId") in refs:
                problems.append(f"{twhere}: missing or duplicate refId")
            refs.add(t.get("refId"))
            expr = t.get("expr", "")
            if not expr.strip():
                problems.append(f"{twhere}: empty expr")
                continue
            exprs.append((twhere, substitute(expr, variables, problems, twhere)))
    return exprs


def check_names(exprs, names, problems):
    for where, expr in exprs:
        for n in MAT_NAME.findall(STRING.sub('""', expr)):
            if n in MAT_LABELS:
                continue
            if not metric_names.known(n, names):
                problems.append(f"{where}: metric {n} is not in metric_names.txt")


def promtool_rules(promtool, exprs, tmp):
    path = os.path.join(tmp, "rules.yml")
    with open(path, "w", encoding="utf-8") as f:
        f.write("groups:\n  - name: dashboards\n    rules:\n")
        for i, (_, expr) in enumerate(exprs):
            f.write(f"      - record: dashboard:expr{i}\n        expr: {json.dumps(expr)}\n")
    r = subprocess.run([promtool, "check", "rules", path], capture_output=True, text=True)
    return r.returncode, r.stdout + r.stderr


def check_promql(promtool, exprs, problems):
    with tempfile.TemporaryDirectory() as tmp:
        rc, out = promtool_rules(promtool, exprs, tmp)
        if rc == 0:
            return
        # Find which expressions fail, one at a time.
        bad = 0
        for where, expr in exprs:
            rc1, out1 = promtool_rules(promtool, [(where, expr)], tmp)
            if rc1 != 0:
                bad += 1
                problems.append(f"{where}: promtool rejects {expr!r}:\n{out1.strip()}")
        if bad == 0:
            problems.append(f"promtool check rules failed:\n{out.strip()}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--promtool", default="promtool")
    ap.add_argument("--names", default=None, help="metric_names.txt (default: beside this script)")
    ap.add_argument("dashboards")
    args = ap.parse_args()
    problems = []
    names = metric_names.load(args.names)
    files = sorted(glob.glob(os.path.join(args.dashboards, "*.json")))
    if not files:
        problems.append(f"no dashboards in {args.dashboards}")
    exprs, seen = [], {}
    for path in files:
        exprs += collect(path, problems, seen)
    check_names(exprs, names, problems)
    used = {n for _, e in exprs for n in MAT_NAME.findall(STRING.sub('""', e))} - MAT_LABELS
    for name, (typ, _) in names.items():
        forms = {name} | ({name + s for s in metric_names.HISTOGRAM_SUFFIXES} if typ == "histogram" else set())
        if files and not forms & used:
            problems.append(f"{name} (metric_names.txt) is on no dashboard")
    if exprs:
        promtool = shutil.which(args.promtool)
        r = subprocess.run([promtool, "--version"], capture_output=True, text=True) if promtool else None
        if r is None or r.returncode != 0:
            problems.append(f"promtool not runnable ({args.promtool}): install the Debian package prometheus")
        else:
            check_promql(promtool, exprs, problems)
    for p in problems:
        print("FAIL", p)
    print(f"{len(files)} dashboards, {len(exprs)} expressions, {len(used)} mat_* names used, "
          f"{len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
