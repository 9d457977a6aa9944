#!/usr/bin/env python3
"""Checks the Prometheus alert rules in deploy/prometheus/ (ctest deploy_alerts).

  check_alerts.py --source-dir REPO [--promtool PROMTOOL]

- `promtool check rules deploy/prometheus/alerts.yml` and `promtool test rules
  deploy/prometheus/alerts_test.yml` pass (their output is printed);
- every alert has a `severity` label (critical, warning or info) and the annotations summary,
  description and runbook_url; runbook_url is deploy/README.md#ANCHOR and deploy/README.md has a
  heading with that anchor (GitHub's: lower case, punctuation dropped, spaces to dashes);
- the alerts name only the mat_* metrics of tests/deploy/metric_names.txt;
- alerts_test.yml loads alerts.yml, and has for every alert at least one alert_rule_test where it
  fires (non-empty exp_alerts) and one where it does not (empty exp_alerts), and no test of an
  alert that alerts.yml lacks.
Exits 1 with every problem listed.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys

try:
    import yaml
except ImportError:  # pragma: no cover
    print("FAIL python3-yaml is not installed (Debian package python3-yaml)")
    sys.exit(1)

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import metric_names  # noqa: E402

SEVERITIES = ("critical", "warning", "info")
ANNOTATIONS = ("summary", "description", "runbook_url")
STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
MAT_NAME = re.compile(r"(?<![A-Za-z0-9_:])mat_[A-Za-z0-9_:]*")


def github_anchors(markdown):
    """The anchors GitHub gives the headings of a markdown file (duplicates get -1, -2, …)."""
    anchors, seen = set(), {}
    in_code = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        m = None if in_code else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda g: g.group(1) or "", m.group(1))
        slug = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def run_promtool(promtool, args, problems):
    r = subprocess.run([promtool] + args, capture_output=True, text=True)
    out = (r.stdout + r.stderr).strip()
    print(f"$ promtool {' '.join(args)}\n{out}")
    if r.returncode != 0:
        problems.append(f"promtool {' '.join(args)} failed (exit {r.returncode})")


def load(path, problems):
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        problems.append(f"{path}: {e}")
        return {}


def check_alerts(rules_path, readme_path, problems):
    """Returns the alert names of the rules file."""
    rules = load(rules_path, problems)
    try:
        with open(readme_path, encoding="utf-8") as f:
            anchors = github_anchors(f.read())
    except OSError as e:
        problems.append(f"{readme_path}: {e}")
        anchors = set()
    names = metric_names.load()
    alerts = []
    for group in rules.get("groups", []) or []:
        for rule in group.get("rules", []) or []:
            if "alert" not in rule:
                continue
            name = rule["alert"]
            where = f"alerts.yml: {name}"
            if name in alerts:
                problems.append(f"{where}: defined twice")
            alerts.append(name)
            severity = (rule.get("labels") or {}).get("severity")
            if severity not in SEVERITIES:
                problems.append(f"{where}: label severity is {severity!r}, want one of {SEVERITIES}")
            annotations = rule.get("annotations") or {}
            for a in ANNOTATIONS:
                if not str(annotations.get(a, "")).strip():
                    problems.append(f"{where}: no annotation {a}")
            url = str(annotations.get("runbook_url", ""))
            m = re.fullmatch(r"deploy/README\.md#([a-z0-9_-]+)", url)
            if not m:
                problems.append(f"{where}: runbook_url {url!r} is not deploy/README.md#ANCHOR")
            elif m.group(1) not in anchors:
                problems.append(f"{where}: deploy/README.md has no heading with anchor #{m.group(1)}")
            for n in MAT_NAME.findall(STRING.sub('""', str(rule.get("expr", "")))):
                if not metric_names.known(n, names):
                    problems.append(f"{where}: {n} is not a metric of tests/deploy/metric_names.txt")
    if not alerts:
        problems.append(f"{rules_path}: no alerts")
    return alerts


def check_coverage(tests_path, alerts, problems):
    tests = load(tests_path, problems)
    if "alerts.yml" not in [os.path.basename(str(f)) for f in tests.get("rule_files", []) or []]:
        problems.append("alerts_test.yml: rule_files does not load alerts.yml")
    fires, quiet = set(), set()
    for group in tests.get("tests", []) or []:
        for case in group.get("alert_rule_test", []) or []:
            name = case.get("alertname")
            if name not in alerts:
                problems.append(f"alerts_test.yml: {group.get('name')!r} tests {name!r}, which alerts.yml lacks")
            (fires if case.get("exp_alerts") else quiet).add(name)
    for name in alerts:
        if name not in fires:
            problems.append(f"alerts_test.yml: no case where {name} fires")
        if name not in quiet:
            problems.append(f"alerts_test.yml: no case where {name} does not fire")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source-dir", required=True)
    ap.add_argument("--promtool", default="promtool")
    args = ap.parse_args()
    prom_dir = os.path.join(args.source_dir, "deploy", "prometheus")
    rules_path = os.path.join(prom_dir, "alerts.yml")
    tests_path = os.path.join(prom_dir, "alerts_test.yml")
    problems = []
    promtool = shutil.which(args.promtool)
    if promtool is None:
        problems.append(f"promtool not found ({args.promtool}): install the Debian package prometheus")
    else:
        run_promtool(promtool, ["check", "rules", rules_path], problems)
        run_promtool(promtool, ["test", "rules", tests_path], problems)
    alerts = check_alerts(rules_path, os.path.join(args.source_dir, "deploy", "README.md"), problems)
    check_coverage(tests_path, alerts, problems)
    for p in problems:
        print("FAIL", p)
    print(f"{len(alerts)} alerts, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
