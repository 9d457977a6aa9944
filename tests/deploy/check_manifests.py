#!/usr/bin/env python3
"""Checks deploy/ (ctest deploy_manifests).

  check_manifests.py --source-dir REPO --bin-dir BUILD/bin [--promtool PROMTOOL]

- every *.yaml / *.yml under deploy/ parses (all documents);
- compose.yaml: the services coordinator, worker-1, worker-2, prometheus, grafana; relative bind
  mounts exist; Prometheus' targets are compose services listening on that port for /metrics;
  Grafana mounts the provisioning and the dashboards where the provider looks;
- prometheus/prometheus.yml passes `promtool check config` and sets honor_labels on every MAT job;
  prometheus-kubernetes.yml too where promtool knows kubernetes_sd_configs (Debian's does not:
  then YAML and honor_labels only); both load alerts.yml (rule_files, resolved beside the file),
  and compose.yaml mounts every rule file beside prometheus.yml;
- Grafana provisioning: a Prometheus datasource with uid "prometheus", a file provider;
- k8s/: apiVersion, kind, metadata.name and namespace mat on every object; selectors match
  the pod labels; Service targetPorts and prometheus.io/port annotations name container ports;
  every volumeMount has a volume or claim template; the coordinator is a 1-replica StatefulSet
  with a claim for its state dir; kustomization lists existing files;
- the example job in k8s/jobs-configmap.yaml is accepted by mat-train (keys and ranges);
- every --flag given to mat-coordinator / mat-worker / matctl in compose.yaml, k8s/*.yaml, the
  systemd units and the Containerfile is one the binary's --help lists;
- the runtime stage's Debian packages (with their dependencies) provide every shared library the
  three binaries load (ldd + dpkg -S + apt-cache depends on this Debian 12 host);
- where installed: `docker compose config` / `docker-compose config` accept compose.yaml,
  `kubectl kustomize` renders k8s/.
Exits 1 with every problem listed.
"""
import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

try:
    import yaml
except ImportError:  # pragma: no cover
    print("FAIL python3-yaml is not installed (Debian package python3-yaml)")
    sys.exit(1)

BINARIES = ("mat-coordinator", "mat-worker", "matctl")
problems = []


def fail(msg):
    problems.append(msg)


_loaded = {}


def load_all(path):
    """Every document of a YAML file ([] after reporting it unreadable, once)."""
    path = os.path.normpath(path)
    if path not in _loaded:
        try:
            with open(path, encoding="utf-8") as f:
                _loaded[path] = [d for d in yaml.safe_load_all(f) if d is not None]
        except (OSError, yaml.YAMLError) as e:
            fail(f"{path}: not valid YAML: {e}")
            _loaded[path] = []
    return _loaded[path]


class FlagChecker:
    """Knows each binary's flags (from --help, subcommands' too for matctl)."""

    def __init__(self, bin_dir):
        self.flags = {}
        for b in BINARIES:
            path = os.path.join(bin_dir, b)
            text = self._help([path])
            if b == "matctl":
                for sub in re.findall(r"^  ([a-z]+)\s{2,}", text.split("Subcommands:")[-1], re.M):
                    text += self._help([path, sub])
            self.flags[b] = set(re.findall(r"(--[a-z][a-z0-9-]*)", text))

    @staticmethod
    def _help(cmd):
        try:
            r = subprocess.run(cmd + ["--help"], capture_output=True, text=True, timeout=60)
        except OSError as e:
            fail(f"cannot run {' '.join(cmd)} --help: {e}")
            return ""
        return r.stdout + r.stderr

    def check(self, argv, where):
        """argv: a command line whose first word names a MAT binary (possibly with a path)."""
        if not argv:
            return
        b = os.path.basename(str(argv[0]))
        if b not in self.flags:
            fail(f"{where}: runs {argv[0]!r}, not one of {BINARIES}")
            return
        for a in argv[1:]:
            a = str(a)
            if a.startswith("--"):
                flag = a.split("=", 1)[0]
                if flag not in self.flags[b]:
                    fail(f"{where}: {b} has no flag {flag}")


def check_compose(deploy, flags):
    path = os.path.join(deploy, "compose.yaml")
    docs = load_all(path)
    if len(docs) != 1:
        fail(f"{path}: want one document")
        return {}
    c = docs[0]
    services = c.get("services", {})
    for s in ("coordinator", "worker-1", "worker-2", "prometheus", "grafana"):
        if s not in services:
            fail(f"{path}: no service {s}")
    listen = {}
    for name, s in services.items():
        cmd = s.get("command")
        if isinstance(cmd, list) and cmd and os.path.basename(str(cmd[0])) in BINARIES:
            flags.check(cmd, f"compose.yaml: {name}")
            for a in cmd:
                if str(a).startswith("--metrics-listen="):
                    listen[name] = str(a).split("=", 1)[1].rsplit(":", 1)[-1]
        for v in s.get("volumes", []):
            src = str(v).split(":")[0] if isinstance(v, str) else str(v.get("source", ""))
            if src.startswith("${"):
                m = re.match(r"\$\{[A-Z_]+:-([^}]*)\}", src)
                src = m.group(1) if m else ""
            if src.startswith(".") and not os.path.exists(os.path.join(deploy, src)):
                fail(f"compose.yaml: {name} mounts {src}, which does not exist (relative to deploy/)")
    return {"services": services, "listen": listen}


def check_prometheus(deploy, compose, promtool):
    for fname in ("prometheus.yml", "prometheus-kubernetes.yml"):
        path = os.path.join(deploy, "prometheus", fname)
        docs = load_all(path)
        if not docs:
            fail(f"{path}: missing or empty")
            continue
        jobs = docs[0].get("scrape_configs", [])
        for j in jobs:
            if j.get("job_name", "").startswith("mat") and j.get("honor_labels") is not True:
                fail(f"{path}: scrape job {j.get('job_name')} lacks honor_labels: true")
        if not any(j.get("job_name", "").startswith("mat") for j in jobs):
            fail(f"{path}: no MAT scrape job")
        # promtool and Prometheus take a rule_files pattern that matches nothing silently.
        rule_files = docs[0].get("rule_files") or []
        if "alerts.yml" not in [os.path.basename(str(r)) for r in rule_files]:
            fail(f"{path}: rule_files does not load alerts.yml")
        for r in rule_files:
            if not glob.glob(os.path.join(os.path.dirname(path), str(r))):
                fail(f"{path}: rule_files entry {r} matches no file beside it")
        if fname == "prometheus.yml" and compose:
            mounts = {}
            for v in compose["services"].get("prometheus", {}).get("volumes", []):
                parts = str(v).split(":")
                if len(parts) >= 2:
                    mounts[parts[1]] = parts[0]
            config_dir = None
            for target, source in mounts.items():
                if os.path.normpath(source) == os.path.normpath("./prometheus/prometheus.yml"):
                    config_dir = os.path.dirname(target)
            if config_dir is None:
                fail("compose.yaml: prometheus does not mount ./prometheus/prometheus.yml")
            else:
                for r in rule_files:
                    want = os.path.normpath(os.path.join("./prometheus", str(r)))
                    got = mounts.get(os.path.join(config_dir, str(r)))
                    if got is None or os.path.normpath(got) != want:
                        fail(f"compose.yaml: prometheus does not mount {want} at "
                             f"{os.path.join(config_dir, str(r))} (prometheus.yml's rule_files)")
        if promtool is None:
            fail("promtool not found: install the Debian package prometheus")
            continue
        r = subprocess.run([promtool, "check", "config", path], capture_output=True, text=True)
        out = r.stdout + r.stderr
        if r.returncode != 0:
            if fname == "prometheus-kubernetes.yml" and "kubernetes_sd_configs not found" in out:
                print(f"note: {promtool} has no Kubernetes service discovery; {fname} checked as YAML only")
            else:
                fail(f"promtool check config {path}:\n{out.strip()}")
        if fname == "prometheus.yml" and compose:
            services, listen = compose["services"], compose["listen"]
            for j in jobs:
                for sc in j.get("static_configs", []):
                    for t in sc.get("targets", []):
                        host, port = t.rsplit(":", 1)
                        if host == "localhost":
                            continue
                        if host not in services:
                            fail(f"{path}: target {t}: no compose service {host}")
                        elif listen.get(host) != port:
                            fail(f"{path}: target {t}: {host} serves /metrics on port {listen.get(host)}")


def check_grafana(deploy, compose):
    ds = load_all(os.path.join(deploy, "grafana/provisioning/datasources/prometheus.yaml"))
    if not ds or not any(d.get("type") == "prometheus" and d.get("uid") == "prometheus"
                         for d in ds[0].get("datasources", [])):
        fail("grafana datasources: no Prometheus datasource with uid prometheus")
    provider_paths = []
    for path in glob.glob(os.path.join(deploy, "grafana/provisioning/dashboards/*.yaml")):
        for d in load_all(path):
            for p in d.get("providers", []):
                if p.get("type") != "file" or not p.get("options", {}).get("path"):
                    fail(f"{path}: provider {p.get('name')} is not a file provider with a path")
                provider_paths.append(p.get("options", {}).get("path"))
    if not provider_paths:
        fail("grafana: no dashboard provider")
    if compose:
        mounts = {}
        for v in compose["services"].get("grafana", {}).get("volumes", []):
            parts = str(v).split(":")
            if len(parts) >= 2:
                mounts[parts[1]] = parts[0]
        for p in provider_paths:
            if os.path.normpath(mounts.get(p, "")) != os.path.normpath("../dashboards"):
                fail(f"compose.yaml: grafana does not mount ../dashboards at the provider path {p}")
        if mounts.get("/etc/grafana/provisioning") != "./grafana/provisioning":
            fail("compose.yaml: grafana does not mount ./grafana/provisioning at /etc/grafana/provisioning")


def check_k8s(deploy, flags, bin_dir):
    k8s = os.path.join(deploy, "k8s")
    objects = []
    for path in sorted(glob.glob(os.path.join(k8s, "*.yaml"))):
        for d in load_all(path):
            objects.append((os.path.basename(path), d))
    kinds = {}
    for f, d in objects:
        where = f"k8s/{f}: {d.get('kind')} {d.get('metadata', {}).get('name')}"
        if d.get("kind") == "Kustomization":
            for r in d.get("resources", []):
                if not os.path.exists(os.path.join(k8s, r)):
                    fail(f"k8s/{f}: resource {r} does not exist")
            continue
        if not d.get("apiVersion") or not d.get("kind") or not d.get("metadata", {}).get("name"):
            fail(f"{where}: needs apiVersion, kind and metadata.name")
            continue
        kinds.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
        if d["kind"] != "Namespace" and d["metadata"].get("namespace") != "mat":
            fail(f"{where}: not in namespace mat")
        spec = d.get("spec", {})
        pod = spec.get("template", {}).get("spec") if d["kind"] in ("StatefulSet", "Deployment", "Job") else None
        if pod is None:
            continue
        labels = spec.get("template", {}).get("metadata", {}).get("labels", {})
        for k, v in spec.get("selector", {}).get("matchLabels", {}).items():
            if labels.get(k) != v:
                fail(f"{where}: selector {k}={v} does not match the pod labels")
        ports = {}
        volumes = {v["name"] for v in pod.get("volumes", [])}
        volumes |= {c["metadata"]["name"] for c in spec.get("volumeClaimTemplates", [])}
        for c in pod.get("containers", []):
            flags.check(c.get("command", []) + c.get("args", []), where)
            for p in c.get("ports", []):
                ports[p.get("name")] = p.get("containerPort")
            for m in c.get("volumeMounts", []):
                if m.get("name") not in volumes:
                    fail(f"{where}: volumeMount {m.get('name')} has no volume")
        ann = spec.get("template", {}).get("metadata", {}).get("annotations", {})
        if ann.get("prometheus.io/scrape") == "true":
            if str(ann.get("prometheus.io/port")) not in {str(p) for p in ports.values()}:
                fail(f"{where}: prometheus.io/port {ann.get('prometheus.io/port')} is no container port")
        d["_ports"], d["_labels"] = ports, labels
    for name, svc in kinds.get("Service", {}).items():
        sel = svc.get("spec", {}).get("selector", {})
        targets = [w for k in ("StatefulSet", "Deployment") for w in kinds.get(k, {}).values()
                   if sel and all(w["_labels"].get(a) == b for a, b in sel.items())]
        if not targets:
            fail(f"k8s Service {name}: selects no workload")
        for p in svc.get("spec", {}).get("ports", []):
            tp = p.get("targetPort", p.get("port"))
            for w in targets:
                if tp not in w["_ports"] and tp not in w["_ports"].values():
                    fail(f"k8s Service {name}: targetPort {tp} is no port of {w['metadata']['name']}")
    coord = kinds.get("StatefulSet", {}).get("mat-coordinator")
    if not coord:
        fail("k8s: no StatefulSet mat-coordinator")
    else:
        if coord["spec"].get("replicas") != 1:
            fail("k8s: mat-coordinator must have exactly 1 replica")
        claims = {c["metadata"]["name"] for c in coord["spec"].get("volumeClaimTemplates", [])}
        mounts = {m["name"]: m["mountPath"] for c in coord["spec"]["template"]["spec"]["containers"]
                  for m in c.get("volumeMounts", [])}
        args = [a for c in coord["spec"]["template"]["spec"]["containers"] for a in c.get("args", [])]
        state = [a.split("=", 1)[1] for a in args if str(a).startswith("--state-dir=")]
        if not state or not any(mounts.get(c) == state[0] for c in claims):
            fail("k8s: mat-coordinator's --state-dir is not on a volumeClaimTemplate")
    if not any(k in kinds for k in ("Deployment", "StatefulSet")) or \
            not any("worker" in n for k in ("Deployment", "StatefulSet") for n in kinds.get(k, {})):
        fail("k8s: no worker Deployment or StatefulSet")
    cm = kinds.get("ConfigMap", {}).get("mat-jobs")
    if not cm or not cm.get("data"):
        fail("k8s: no ConfigMap mat-jobs with a job spec")
        return
    trainer = os.path.join(bin_dir, "mat-train")
    for key, text in cm["data"].items():
        try:
            spec = yaml.safe_load(text)
        except yaml.YAMLError as e:
            fail(f"k8s ConfigMap mat-jobs {key}: not valid YAML: {e}")
            continue
        if not isinstance(spec, dict) or "resources" not in spec:
            fail(f"k8s ConfigMap mat-jobs {key}: a job spec needs a resources section")
        with tempfile.TemporaryDirectory() as tmp:
            job = os.path.join(tmp, key)
            with open(job, "w", encoding="utf-8") as f:
                f.write(text)
            r = subprocess.run([trainer, "--config", job, "--out", os.path.join(tmp, "out"), "--print-config"],
                               capture_output=True, text=True, cwd=tmp)
            if r.returncode != 0:
                fail(f"k8s ConfigMap mat-jobs {key}: mat-train rejects it: {(r.stdout + r.stderr).strip()}")


def check_systemd_and_containerfile(deploy, flags):
    for unit in glob.glob(os.path.join(deploy, "systemd", "*.service")):
        with open(unit, encoding="utf-8") as f:
            for line in f:
                if line.startswith("ExecStart="):
                    argv = [a for a in line.split("=", 1)[1].split() if not a.startswith("$")]
                    flags.check(argv, f"systemd/{os.path.basename(unit)}")
    with open(os.path.join(deploy, "Containerfile"), encoding="utf-8") as f:
        text = f.read().replace("\\\n", " ")
    m = re.search(r"^CMD\s+(\[.*?\])\s*$", text, re.M)
    if not m:
        fail("Containerfile: no CMD [...]")
    else:
        flags.check(yaml.safe_load(m.group(1)), "Containerfile CMD")
    for stage in ("FROM debian:12 AS build", "FROM debian:12-slim AS runtime"):
        if stage not in text:
            fail(f"Containerfile: no stage `{stage}`")
    if not re.search(r"^USER\s+mat\s*$", text, re.M):
        fail("Containerfile: the runtime stage does not run as user mat")


def runtime_packages(containerfile_text):
    """The packages the runtime stage installs (its `apt-get install ... &&` list)."""
    stage = containerfile_text.split("AS runtime", 1)[-1]
    m = re.search(r"apt-get install (.*?)&&", stage, re.S)
    return [w for w in (m.group(1).split() if m else []) if not w.startswith("-")]


def check_runtime_libraries(deploy, bin_dir):
    """Every shared library the three binaries load (ldd, resolved through symlinks and
    alternatives) belongs to a Debian package in the dependency closure of the runtime stage's
    package list, on this Debian 12 host (needs dpkg and apt-cache)."""
    with open(os.path.join(deploy, "Containerfile"), encoding="utf-8") as f:
        packages = runtime_packages(f.read().replace("\\\n", " "))
    if not packages:
        fail("Containerfile: no apt-get install in the runtime stage")
        return
    if not (shutil.which("apt-cache") and shutil.which("dpkg")):
        fail("apt-cache/dpkg not found: the runtime-library check needs a Debian host")
        return
    r = subprocess.run(["apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests",
                        "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances"] + packages,
                       capture_output=True, text=True)
    closure = {line.strip() for line in r.stdout.splitlines() if line and not line.startswith(" ")}
    for p in packages:
        if p not in closure:
            fail(f"Containerfile: runtime package {p} is unknown to apt-cache")
    libs = set()
    for b in BINARIES:
        r = subprocess.run(["ldd", os.path.join(bin_dir, b)], capture_output=True, text=True)
        for line in r.stdout.splitlines():
            m = re.search(r"=>\s*(/\S+)", line)
            if m:
                libs.add(os.path.realpath(m.group(1)))
            elif "not found" in line:
                fail(f"{b}: {line.strip()}")
    # One dpkg -S for all (merged /usr: dpkg may know a library under /lib or /usr/lib).
    variants = {}
    for lib in libs:
        for v in (lib, re.sub(r"^/usr/lib/", "/lib/", lib), re.sub(r"^/lib/", "/usr/lib/", lib)):
            variants.setdefault(v, lib)
    r = subprocess.run(["dpkg", "-S"] + sorted(variants), capture_output=True, text=True)
    owners = {}
    for line in r.stdout.splitlines():
        pkgs, _, path = line.partition(": ")
        if path.strip() in variants:
            owners.setdefault(variants[path.strip()], pkgs.split(",")[0].split(":")[0].strip())
    for lib in sorted(libs):
        owner = owners.get(lib)
        if owner is None:
            fail(f"{lib}: no Debian package owns it (built locally?); the runtime image would lack it")
        elif owner not in closure:
            fail(f"Containerfile: the runtime stage lacks {owner} (for {lib})")
    print(f"runtime stage: {len(packages)} packages cover the {len(libs)} libraries the binaries load")


def check_with_optional_tools(deploy):
    """Schema checks by tools that are used when installed: `docker compose config` (the v2
    plugin) or `docker-compose config` (Debian's docker-compose 1.29, which also knows the
    Compose file schema), and `kubectl kustomize` (renders k8s/ offline)."""
    compose = os.path.join(deploy, "compose.yaml")
    commands = []
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        commands.append(("docker compose config", [docker, "compose", "-f", compose, "config", "-q"]))
    if shutil.which("docker-compose"):
        commands.append(("docker-compose config", [shutil.which("docker-compose"), "-f", compose, "config", "-q"]))
    if not commands:
        print("note: neither docker compose nor docker-compose installed; compose.yaml checked as YAML only")
    kubectl = shutil.which("kubectl")
    if kubectl:
        commands.append(("kubectl kustomize k8s", [kubectl, "kustomize", os.path.join(deploy, "k8s")]))
    else:
        print("note: no kubectl; k8s/kustomization.yaml not rendered")
    for label, cmd in commands:
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=deploy,
                           env=dict(os.environ, MAT_DATA_DIR=deploy))
        if r.returncode != 0:
            fail(f"{label}:\n{(r.stdout + r.stderr).strip()}")
        else:
            print(f"ok: {label}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source-dir", required=True)
    ap.add_argument("--bin-dir", required=True)
    ap.add_argument("--promtool", default="promtool")
    args = ap.parse_args()
    deploy = os.path.join(args.source_dir, "deploy")
    files = [p for ext in ("yaml", "yml") for p in glob.glob(os.path.join(deploy, "**", "*." + ext), recursive=True)]
    for path in files:
        load_all(path)
    flags = FlagChecker(args.bin_dir)
    compose = check_compose(deploy, flags)
    check_prometheus(deploy, compose, shutil.which(args.promtool))
    check_grafana(deploy, compose)
    check_k8s(deploy, flags, args.bin_dir)
    check_systemd_and_containerfile(deploy, flags)
    check_runtime_libraries(deploy, args.bin_dir)
    check_with_optional_tools(deploy)
    for p in problems:
        print("FAIL", p)
    print(f"{len(files)} YAML files, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
