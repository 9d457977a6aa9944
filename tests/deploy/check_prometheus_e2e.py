#!/usr/bin/env python3
"""The dashboards' queries against a real Prometheus scraping real daemons (ctest deploy_prometheus_e2e).

  check_prometheus_e2e.py --bin-dir BUILD/bin --source-dir REPO --data-dir SHARED/data/wikitext-2
                          [--prometheus prometheus]

Starts mat-coordinator and two mat-workers on loopback and a Prometheus (the Debian package's
server, a temporary TSDB) whose configuration is deploy/prometheus/prometheus.yml with only the
targets and the scrape interval replaced and its rule_files made absolute (so its labelling is
what is tested, and the server loads alerts.yml). Runs a
small 2-rank MAT job and then the same job with policy.kind=full as the baseline, waits for a few
scrapes, then:
- label_values(mat_job_step, mat_job) as the dashboards' `job` variable asks for it
  (/api/v1/label/mat_job/values?match[]=mat_job_step) holds both MAT job ids, and `up`'s `job`
  label names a MAT scrape job (the scrape job's name, not overridden);
- every listed metric family but the ones only set on rare events has series in Prometheus;
- every query of every dashboard, with $job / $baseline_job set to the two jobs and Grafana's
  interval variables to concrete values, runs as a range query over the run without an error (no
  many-to-many matching, no type errors: what promtool's parser cannot see), and the panels listed
  in MUST_HAVE_DATA return data.
ctest runs it under run_sandboxed.sh, so the daemons also show that they write nothing outside
their state and work dirs (all under the private /tmp there). Exits 1 with every problem listed.
"""
import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import check_dashboards  # noqa: E402
import metric_names  # noqa: E402

try:
    import yaml
except ImportError:  # pragma: no cover
    print("FAIL python3-yaml is not installed (Debian package python3-yaml)")
    sys.exit(1)

# Families that have no series in a healthy short run.
MAY_BE_ABSENT = {"mat_coordinator_rejected_messages_total", "mat_coordinator_worker_heartbeat_age_seconds"}
# (dashboard file, panel title) pairs whose every query must return data after the run.
MUST_HAVE_DATA = {
    ("module-spectra.json", "λ_max per module over time"),
    ("module-spectra.json", "Mask: module active (1) or frozen (0)"),
    ("module-spectra.json", "Active modules per group"),
    ("training.json", "Validation loss over time: MAT vs baseline"),
    ("training.json", "FLOPs spent: MAT vs baseline"),
    ("training.json", "Loss against FLOPs: MAT ($job)"),
    ("training.json", "FLOPs per step vs baseline"),
    ("cluster.json", "Workers by state"),
    ("cluster.json", "Jobs by state"),
    ("cluster.json", "Worker busy"),
    ("cluster.json", "Scrape targets up"),
}
SCRAPE_S = 1
problems = []


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_file(path, proc, what, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path) and open(path, encoding="utf-8").read().strip():
            return open(path, encoding="utf-8").read().strip()
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before writing {path}")
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not write {path} within {timeout} s")


def api(base, path, params):
    url = f"{base}{path}?{urllib.parse.urlencode(params, doseq=True)}"
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        try:
            return json.load(e)
        except ValueError:
            return {"status": "error", "error": f"HTTP {e.code}"}


def job_yaml(data_dir, policy):
    return ("seed: 3\n"
            "model: {kind: bert, layers: 2, d_model: 64, heads: 4, d_ff: 128, ffn_groups: 2,"
            " max_seq_len: 32, dropout: 0.1}\n"
            f"data: {{kind: wikitext, dir: {data_dir}, seq_len: 32}}\n"
            "train: {steps: 160, batch_size: 8, lr: 1.0e-3, warmup_steps: 5, eval_every: 20,"
            " eval_batches: 2, threads: 1}\n"
            f"policy: {{kind: {policy}, alpha: 0.5, beta: 0.0, gamma: 0.5, warmup_steps: 20,"
            " probe_every: 10, probe_samples: 2, estimator: gram, min_active_fraction: 0.25}\n"
            "resources: {workers: 2, device: cpu}\n")


def prometheus_config(source_dir, coordinator, workers):
    with open(os.path.join(source_dir, "deploy/prometheus/prometheus.yml"), encoding="utf-8") as f:
        cfg = yaml.safe_load(f)
    cfg["global"]["scrape_interval"] = f"{SCRAPE_S}s"
    jobs = []
    for j in cfg["scrape_configs"]:
        if j["job_name"] == "mat-coordinator":
            j["static_configs"] = [{"targets": [coordinator]}]
        elif j["job_name"] == "mat-worker":
            j["static_configs"] = [{"targets": workers}]
        else:
            continue
        jobs.append(j)
    if len(jobs) != 2:
        raise RuntimeError("deploy/prometheus/prometheus.yml lacks the mat-coordinator or mat-worker job")
    cfg["scrape_configs"] = jobs
    # rule_files are relative to prometheus.yml (alerts.yml): the copy in a temporary folder
    # loads them from deploy/prometheus/, so the server refuses to start on a broken rule.
    cfg["rule_files"] = [os.path.join(source_dir, "deploy/prometheus", r)
                         for r in cfg.get("rule_files") or []]
    return cfg


def stop(proc, what):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run(args, tmp):
    bin_dir = args.bin_dir
    procs = []

    def start(name, argv):
        log = open(os.path.join(tmp, name + ".log"), "w")
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
        procs.append((p, name))
        return p

    try:
        state = os.path.join(tmp, "coordinator")
        coord = start("coordinator", [os.path.join(bin_dir, "mat-coordinator"), "--listen", "127.0.0.1:0",
                                      "--metrics-listen", "127.0.0.1:0", "--state-dir", state])
        grpc_addr = wait_file(os.path.join(state, "coordinator.addr"), coord, "mat-coordinator")
        coord_metrics = wait_file(os.path.join(state, "coordinator.metrics.addr"), coord, "mat-coordinator")
        worker_metrics = []
        for i in (1, 2):
            work = os.path.join(tmp, f"worker{i}")
            w = start(f"worker{i}", [os.path.join(bin_dir, "mat-worker"), "--coordinator", grpc_addr,
                                     "--work-dir", work, "--metrics-listen", "127.0.0.1:0", "--threads", "1"])
            worker_metrics.append(wait_file(os.path.join(work, "worker.metrics.addr"), w, f"mat-worker {i}"))
        cfg_path = os.path.join(tmp, "prometheus.yml")
        with open(cfg_path, "w", encoding="utf-8") as f:
            yaml.safe_dump(prometheus_config(args.source_dir, coord_metrics, worker_metrics), f)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        prom = start("prometheus", [args.prometheus, f"--config.file={cfg_path}",
                                    f"--storage.tsdb.path={os.path.join(tmp, 'tsdb')}",
                                    f"--web.listen-address=127.0.0.1:{port}"])
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(base + "/-/ready", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if prom.poll() is not None or time.time() > deadline:
                raise RuntimeError("prometheus did not become ready (see prometheus.log)")
            time.sleep(0.2)
        t0 = time.time()
        jobs = []
        for policy in ("mat", "full"):
            spec = os.path.join(tmp, f"{policy}.yaml")
            with open(spec, "w", encoding="utf-8") as f:
                f.write(job_yaml(args.data_dir, policy))
            r = subprocess.run([os.path.join(bin_dir, "matctl"), "--coordinator", grpc_addr, "submit",
                                "--wait", "--no-progress", spec], capture_output=True, text=True, timeout=600)
            ids = [w for w in r.stdout.split() if w.startswith("job-")]
            if r.returncode != 0 or not ids:
                raise RuntimeError(f"the {policy} job did not succeed: {(r.stdout + r.stderr).strip()[-2000:]}")
            jobs.append(ids[0])
        time.sleep(4 * SCRAPE_S)
        t1 = time.time()
        print(f"jobs {jobs[0]} (mat) and {jobs[1]} (full) ran in {t1 - t0:.0f} s")
        check(base, jobs, t0, t1, args.source_dir)
    finally:
        for p, name in reversed(procs):
            stop(p, name)
        if problems:
            for _, name in procs:
                path = os.path.join(tmp, name + ".log")
                print(f"--- {name}.log (last lines)")
                print("".join(open(path, encoding="utf-8", errors="replace").readlines()[-15:]))


def check(base, jobs, t0, t1, source_dir):
    names = metric_names.load()
    r = api(base, "/api/v1/label/mat_job/values", {"match[]": "mat_job_step", "start": t0, "end": t1})
    got = set(r.get("data") or [])
    if not set(jobs) <= got:
        problems.append(f"label_values(mat_job_step, mat_job) = {sorted(got)}, want {jobs} among them")
    r = api(base, "/api/v1/label/job/values", {"match[]": "up", "start": t0, "end": t1})
    scrape_jobs = set(r.get("data") or [])
    if not scrape_jobs & {"mat", "mat-coordinator", "mat-worker"}:
        problems.append(f"up's job values {sorted(scrape_jobs)} name no MAT scrape job")
    for name in names:
        if name in MAY_BE_ABSENT:
            continue
        series = name + "_count" if names[name][0] == "histogram" else name
        r = api(base, "/api/v1/series", {"match[]": series, "start": t0, "end": t1})
        if r.get("status") != "success" or not r.get("data"):
            problems.append(f"no series of {series} in Prometheus after the run")
    check_dashboards.SAMPLE_VALUES.update({"job": jobs[0], "baseline_job": jobs[1], "group": ".*"})
    check_dashboards.BUILTINS.update({"__rate_interval": f"{4 * SCRAPE_S}s", "__interval": f"{SCRAPE_S}s"})
    dash_problems = []
    step = max(1, int((t1 - t0) / 200))
    checked = 0
    seen = set()
    for path in sorted(os.listdir(os.path.join(source_dir, "dashboards"))):
        if not path.endswith(".json"):
            continue
        for where, expr in check_dashboards.collect(os.path.join(source_dir, "dashboards", path),
                                                    dash_problems, {}):
            if ": variable " in where:
                continue
            checked += 1
            r = api(base, "/api/v1/query_range", {"query": expr, "start": t0, "end": t1, "step": step})
            if r.get("status") != "success":
                problems.append(f"{where}: {expr!r}: {r.get('errorType')}: {r.get('error')}")
                continue
            title = where.split(" '", 1)[1].split("'", 1)[0] if " '" in where else ""
            seen.add((path, title))
            if (path, title) in MUST_HAVE_DATA and not r["data"]["result"]:
                problems.append(f"{where}: {expr!r} returned no data after the run")
    problems.extend(dash_problems)
    for path, title in sorted(MUST_HAVE_DATA - seen):
        problems.append(f"{path}: no panel {title!r} (MUST_HAVE_DATA is out of date)")
    print(f"{checked} dashboard queries run against Prometheus")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin-dir", required=True)
    ap.add_argument("--source-dir", required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--prometheus", default="prometheus")
    args = ap.parse_args()
    prom = shutil.which(args.prometheus)
    if not prom:
        print(f"FAIL {args.prometheus} not found: install the Debian package prometheus")
        return 1
    args.prometheus = prom
    with tempfile.TemporaryDirectory() as tmp:
        try:
            run(args, tmp)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
            problems.append(str(e))
    for p in problems:
        print("FAIL", p)
    print(f"{len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
