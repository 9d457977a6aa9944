#!/usr/bin/env python3
"""Checks tests/deploy/metric_names.txt against the daemons' real /metrics (ctest deploy_metrics_live).

  check_metrics_live.py --bin-dir BUILD/bin --source-dir REPO

Starts mat-coordinator (gRPC and HTTP on 127.0.0.1 port 0, a temporary state dir) and one
mat-worker (--metrics-listen 127.0.0.1:0), reads both /metrics and checks, per daemon, that every
family the list gives it is exposed with the listed type (# TYPE line) and that every mat_* family
it exposes is in the list. Then it submits the example job of deploy/k8s/jobs-configmap.yaml with
matctl (the coordinator's validation: the spec is a valid job) and expects it on /metrics as
mat_coordinator_jobs{state="queued"} 1 (it needs 2 workers; one is connected, as
mat_coordinator_workers{state="idle"} 1), the label values the cluster dashboard uses. Also runs
the coordinator health checks of deploy/ (compose.yaml's healthcheck command, the k8s probes'
paths) against it, and the worker's k8s probe paths against the worker.
Exits 1 with every problem listed.
"""
import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import metric_names  # noqa: E402

TYPE_LINE = re.compile(r"^# TYPE (\S+) (\S+)$", re.M)
problems = []


def wait_file(path, proc, what, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path):
            text = open(path, encoding="utf-8").read().strip()
            if text:
                return text
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before writing {path}")
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not write {path} within {timeout} s")


def scrape(addr):
    try:
        with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as r:
            ctype = r.headers.get("Content-Type", "")
            body = r.read().decode("utf-8")
    except urllib.error.URLError as e:
        raise RuntimeError(f"GET http://{addr}/metrics: {e}") from e
    if not ctype.startswith("text/plain"):
        problems.append(f"{addr}/metrics: Content-Type {ctype!r}, want text/plain; version=0.0.4")
    return body


def compare(daemon, body, names):
    exposed = dict(TYPE_LINE.findall(body))
    for name, (typ, who) in names.items():
        if not metric_names.exposed_by((typ, who), daemon):
            continue
        if name not in exposed:
            problems.append(f"{daemon}: {name} is listed but not exposed on /metrics")
        elif exposed[name] != typ:
            problems.append(f"{daemon}: {name} is a {exposed[name]}, listed as {typ}")
    for name in exposed:
        if name.startswith("mat_") and name not in names:
            problems.append(f"{daemon}: exposes {name}, which metric_names.txt lacks")
        elif name.startswith("mat_") and not metric_names.exposed_by(names[name], daemon):
            problems.append(f"{daemon}: exposes {name}, listed for {names[name][1]}")
    print(f"{daemon}: {sum(1 for n in exposed if n.startswith('mat_'))} mat_* families exposed")


def sample(body, series):
    for line in body.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return None


def wait_sample(addr, series, want, timeout=15):
    deadline = time.time() + timeout
    got = None
    while time.time() < deadline:
        got = sample(scrape(addr), series)
        if got == want:
            return
        time.sleep(0.2)
    problems.append(f"coordinator: {series} is {got}, want {want}")


def job_spec(source_dir, tmp):
    """The first job of deploy/k8s/jobs-configmap.yaml, written to a file."""
    import yaml  # python3-yaml; only needed here
    with open(os.path.join(source_dir, "deploy/k8s/jobs-configmap.yaml"), encoding="utf-8") as f:
        cm = yaml.safe_load(f)
    key, text = next(iter(cm["data"].items()))
    path = os.path.join(tmp, key)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def check_http_probes(source_dir, manifest, addr):
    """GETs the httpGet paths of the StatefulSet's probes in deploy/k8s/MANIFEST at ADDR."""
    import yaml
    with open(os.path.join(source_dir, "deploy/k8s", manifest), encoding="utf-8") as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    found = 0
    for d in docs:
        if d.get("kind") != "StatefulSet":
            continue
        for c in d["spec"]["template"]["spec"]["containers"]:
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                path = c.get(probe, {}).get("httpGet", {}).get("path")
                if not path:
                    continue
                found += 1
                try:
                    with urllib.request.urlopen(f"http://{addr}{path}", timeout=10) as r:
                        status = r.status
                except urllib.error.HTTPError as e:
                    status = e.code
                except urllib.error.URLError as e:
                    status = str(e)
                if status != 200:
                    problems.append(f"k8s/{manifest}: {probe} GET {path} answers {status}, want 200")
    if not found:
        problems.append(f"k8s/{manifest}: no httpGet probe")


def check_probes(source_dir, addr):
    """The health checks deploy/ configures, against the live coordinator: compose.yaml's
    healthcheck command (its port rewritten) and the k8s probes' HTTP paths."""
    import yaml
    host, port = addr.rsplit(":", 1)
    with open(os.path.join(source_dir, "deploy/compose.yaml"), encoding="utf-8") as f:
        test = yaml.safe_load(f)["services"]["coordinator"]["healthcheck"]["test"]
    if test[0] != "CMD":
        problems.append(f"compose.yaml: coordinator healthcheck {test!r} is not a CMD list")
    else:
        argv = [a.replace("127.0.0.1/9464", f"{host}/{port}") for a in test[1:]]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            problems.append(f"compose.yaml: the coordinator healthcheck fails against a ready coordinator: "
                            f"{(r.stdout + r.stderr).strip()}")
    check_http_probes(source_dir, "coordinator.yaml", addr)


def stop(proc, what):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            problems.append(f"{what} did not stop within 30 s of SIGTERM")
            return
    if proc.returncode not in (0, -signal.SIGTERM):
        problems.append(f"{what} exited with {proc.returncode} after SIGTERM")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin-dir", required=True)
    ap.add_argument("--source-dir", required=True)
    args = ap.parse_args()
    names = metric_names.load()
    procs = []
    with tempfile.TemporaryDirectory() as tmp:
        state = os.path.join(tmp, "coordinator")
        work = os.path.join(tmp, "worker")
        try:
            coord = subprocess.Popen(
                [os.path.join(args.bin_dir, "mat-coordinator"), "--listen", "127.0.0.1:0",
                 "--metrics-listen", "127.0.0.1:0", "--state-dir", state],
                stdout=open(os.path.join(tmp, "coordinator.log"), "w"), stderr=subprocess.STDOUT)
            procs.append((coord, "mat-coordinator"))
            grpc_addr = wait_file(os.path.join(state, "coordinator.addr"), coord, "mat-coordinator")
            coord_metrics = wait_file(os.path.join(state, "coordinator.metrics.addr"), coord, "mat-coordinator")
            compare("coordinator", scrape(coord_metrics), names)
            check_probes(args.source_dir, coord_metrics)

            worker = subprocess.Popen(
                [os.path.join(args.bin_dir, "mat-worker"), "--coordinator", grpc_addr, "--work-dir", work,
                 "--metrics-listen", "127.0.0.1:0", "--threads", "1"],
                stdout=open(os.path.join(tmp, "worker.log"), "w"), stderr=subprocess.STDOUT)
            procs.append((worker, "mat-worker"))
            worker_metrics = wait_file(os.path.join(work, "worker.metrics.addr"), worker, "mat-worker")
            compare("worker", scrape(worker_metrics), names)
            # Ready once its session is open: the address file is written before it registers.
            wait_sample(coord_metrics, 'mat_coordinator_workers{state="idle"}', 1.0)
            check_http_probes(args.source_dir, "worker.yaml", worker_metrics)

            r = subprocess.run([os.path.join(args.bin_dir, "matctl"), "--coordinator", grpc_addr, "submit",
                                job_spec(args.source_dir, tmp)], capture_output=True, text=True, timeout=60)
            if r.returncode != 0:
                problems.append(f"matctl submit of deploy/k8s/jobs-configmap.yaml's job failed: "
                                f"{(r.stdout + r.stderr).strip()}")
            else:
                wait_sample(coord_metrics, 'mat_coordinator_jobs{state="queued"}', 1.0)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:  # URLError is an OSError
            problems.append(str(e))
        finally:
            for proc, what in reversed(procs):
                stop(proc, what)
            if problems:
                for log in ("coordinator.log", "worker.log"):
                    path = os.path.join(tmp, log)
                    if os.path.exists(path):
                        print(f"--- {log} (last lines)")
                        print("".join(open(path, encoding="utf-8", errors="replace").readlines()[-20:]))
    for p in problems:
        print("FAIL", p)
    print(f"{len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
