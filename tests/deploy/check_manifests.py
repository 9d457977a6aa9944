#!/usr/bin/env python3
"""Checks deploy/ (ctest deploy_manifests).

  check_manifests.py --source-dir REPO --bin-dir BUILD/bin [--promtool PROMTOOL]

- every *.yaml / *.yml under deploy/ parses (all documents);
- compose.yaml: the services coordinator, worker-1, worker-2, prometheus, grafana; relative bind
  mounts exist; Prometheus' targets are compose services listening on that port for /metrics;
  Grafana mounts the provisioning and the dashboards where the provider looks;
- prometheus/prometheus.yml and prometheus-kubernetes-dns.yml pass `promtool check config` and
  no MAT scrape job sets honor_labels (the MAT job id is the daemons' `mat_job`); prometheus-kubernetes.yml too where promtool knows
  kubernetes_sd_configs (Debian's does not: then a copy with its discovery replaced by static
  targets passes it); all load alerts.yml (rule_files, resolved beside the file), and
  compose.yaml mounts every rule file beside prometheus.yml;
- the relabelling of both Kubernetes configurations, run by `promtool check service-discovery`
  over discovery results simulated from the k8s/ pods (pod role: an IPv4 and an IPv6 pod IP per
  pod, one target per container port; DNS: the SRV records of the named Services): one target
  per annotated pod at HOST:PORT ([IPv6]:PORT) of prometheus.io/port, with __metrics_path__,
  job="mat", component and pod as the alert rules expect, the rest dropped;
- Grafana provisioning: a Prometheus datasource with uid "prometheus", a file provider;
- k8s/: apiVersion, kind, metadata.name and namespace mat on every object; selectors match
  the pod labels; Service targetPorts and prometheus.io/port annotations name container ports;
  every volumeMount has a volume or claim template; the coordinator is a 1-replica StatefulSet
  with a claim for its state dir; kustomization lists existing files, and every file holding a
  ServiceAccount, PodDisruptionBudget, NetworkPolicy or StatefulSet;
- k8s/ security and operations: every StatefulSet/Deployment pod names a ServiceAccount of the
  manifests with automountServiceAccountToken: false (a Job's pod mounts no token either);
  every image has a pinned tag (not `latest`) or digest, the MAT image's being the version of
  CMakeLists.txt's project() there and in kustomization.yaml; each PodDisruptionBudget selects
  one workload's pods, the coordinator's allows no eviction, a worker one allows one; the
  NetworkPolicies select existing pods and, evaluated over the manifests' pods plus a Prometheus
  (namespace monitoring) and the cluster DNS, allow workers/matctl -> coordinator gRPC,
  Prometheus -> both metrics ports, worker <-> worker on the rendezvous and an ephemeral port,
  DNS from every pod, and deny a list of other flows (a default deny exists); httpGet probes
  name container ports on the --metrics-listen port, the worker has a readinessProbe on /readyz
  and a startupProbe on /healthz; podmonitor.yaml is a PodMonitor left out of the kustomization
  that selects both daemons' pods, scrapes their `metrics` port without honorLabels and gives
  job="mat" and component;
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
import json
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
    for fname in ("prometheus.yml", "prometheus-kubernetes.yml", "prometheus-kubernetes-dns.yml"):
        path = os.path.join(deploy, "prometheus", fname)
        docs = load_all(path)
        if not docs:
            fail(f"{path}: missing or empty")
            continue
        jobs = docs[0].get("scrape_configs", [])
        for j in jobs:
            # The MAT job id is the daemons' `mat_job`; `job` must stay the scrape job's name,
            # which the alert rules and the "targets up" panel match on.
            if j.get("job_name", "").startswith("mat") and j.get("honor_labels"):
                fail(f"{path}: scrape job {j.get('job_name')} sets honor_labels (not needed: "
                     "the MAT job id is mat_job)")
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
                print(f"note: {promtool} has no Kubernetes service discovery; {fname} is checked "
                      f"with static targets in its place (below)")
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
        d["_file"] = f
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
        return kinds
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
    return kinds


# ---- k8s: service accounts, images, disruption budgets, network policies, probes, PodMonitor ----

WORKLOADS = ("StatefulSet", "Deployment", "DaemonSet", "Job")


def project_version(source_dir):
    """x.y.z of CMakeLists.txt's project(mat ... VERSION x.y.z ...)."""
    with open(os.path.join(source_dir, "CMakeLists.txt"), encoding="utf-8") as f:
        m = re.search(r"project\(\s*mat\b[^)]*\bVERSION\s+([0-9][0-9.]*)", f.read())
    if not m:
        fail("CMakeLists.txt: no project(mat ... VERSION x.y.z)")
        return None
    return m.group(1)


def selects(selector, labels):
    """A Kubernetes LabelSelector (matchLabels, matchExpressions) against a label map;
    an empty selector selects everything."""
    selector = selector or {}
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        k, op, values = e.get("key"), e.get("operator"), e.get("values") or []
        if op == "In" and labels.get(k) not in values:
            return False
        if op == "NotIn" and k in labels and labels[k] in values:
            return False
        if op == "Exists" and k not in labels:
            return False
        if op == "DoesNotExist" and k in labels:
            return False
        if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
            fail(f"label selector: unknown operator {op}")
            return False
    return True


def pod_templates(kinds):
    """(workload, pod template) of every StatefulSet, Deployment, DaemonSet and Job."""
    return [(w, w["spec"]["template"]) for k in WORKLOADS for w in kinds.get(k, {}).values()
            if w.get("spec", {}).get("template")]


def kustomization_resources(k8s):
    docs = load_all(os.path.join(k8s, "kustomization.yaml"))
    return (docs[0] if docs else {}), set((docs[0].get("resources") or []) if docs else [])


def image_tag(image):
    """The tag of an image reference ('' without one), or 'sha256:…' for a digest."""
    if "@" in image:
        return image.split("@", 1)[1]
    last = image.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else ""


def version_tag(tag, version):
    """Whether an image tag follows the scheme: the project version, or VERSION-SUFFIX (e.g.
    0.1.0-g55772d5 between releases)."""
    return not version or tag == version or tag.startswith(version + "-")


def check_k8s_images(k8s, kinds, version):
    """Every container image carries a pinned tag (not latest) or a digest; the MAT image's tag
    is the project version (or VERSION-SUFFIX), in the manifests (submit-job.yaml is applied
    without kustomize) and in kustomization.yaml's images entry."""
    for w, t in pod_templates(kinds):
        spec = t.get("spec", {})
        for c in spec.get("initContainers", []) + spec.get("containers", []):
            image = str(c.get("image", ""))
            tag = image_tag(image)
            where = f"k8s/{w['_file']}: {w['kind']} {w['metadata']['name']} container {c.get('name')}"
            if not tag or tag == "latest":
                fail(f"{where}: image {image!r} has no pinned tag (not `latest`, not none)")
            elif image.split("@")[0].rsplit(":", 1)[0].rsplit("/", 1)[-1] == "mat" and \
                    not tag.startswith("sha256:") and not version_tag(tag, version):
                fail(f"{where}: image {image!r}: the tag should be the project version {version} "
                     f"(CMakeLists.txt), or {version}-SUFFIX")
    kust, _ = kustomization_resources(k8s)
    entries = [i for i in kust.get("images") or [] if i.get("name") == "mat"]
    if not entries:
        fail("k8s/kustomization.yaml: no images entry for mat")
    for i in entries:
        if i.get("newDigest"):
            continue
        tag = str(i.get("newTag", ""))
        if not tag or tag == "latest":
            fail(f"k8s/kustomization.yaml: images mat: newTag {tag!r} is not a pinned version")
        elif not version_tag(tag, version):
            fail(f"k8s/kustomization.yaml: images mat: newTag {tag} is not the project version "
                 f"{version} (or {version}-SUFFIX)")


def check_k8s_service_accounts(k8s, kinds):
    """Every StatefulSet/Deployment/DaemonSet pod names a ServiceAccount of the manifests (in the
    kustomization) whose automountServiceAccountToken is false, and does not turn it back on;
    a Job's pod mounts no token either (its own field or its account's)."""
    _, resources = kustomization_resources(k8s)
    accounts = kinds.get("ServiceAccount", {})
    for w, t in pod_templates(kinds):
        pod = t.get("spec", {})
        where = f"k8s/{w['_file']}: {w['kind']} {w['metadata']['name']}"
        sa_name = pod.get("serviceAccountName")
        sa = accounts.get(sa_name) if sa_name else None
        if w["kind"] != "Job":
            if not sa_name or sa_name == "default":
                fail(f"{where}: the pod uses the namespace's default ServiceAccount (set serviceAccountName)")
                continue
            if sa is None:
                fail(f"{where}: ServiceAccount {sa_name} is not in k8s/")
                continue
            if sa["_file"] not in resources:
                fail(f"{where}: ServiceAccount {sa_name} ({sa['_file']}) is not in kustomization.yaml")
            if sa.get("automountServiceAccountToken") is not False:
                fail(f"k8s/{sa['_file']}: ServiceAccount {sa_name}: automountServiceAccountToken is not false")
            if pod.get("automountServiceAccountToken") is True:
                fail(f"{where}: the pod sets automountServiceAccountToken: true")
        else:
            own = pod.get("automountServiceAccountToken")
            if own is not False and not (own is None and sa is not None and
                                         sa.get("automountServiceAccountToken") is False):
                fail(f"{where}: the pod mounts a ServiceAccount token (automountServiceAccountToken)")


def check_k8s_disruption_budgets(k8s, kinds):
    """Each PodDisruptionBudget is in the kustomization, sets one of minAvailable/maxUnavailable
    and selects the pods of a workload; no pod has two; the coordinator (one replica) has one that
    allows no voluntary eviction; a worker budget, if any, allows one (or drains would hang)."""
    _, resources = kustomization_resources(k8s)
    covered = {}
    for name, pdb in kinds.get("PodDisruptionBudget", {}).items():
        where = f"k8s/{pdb['_file']}: PodDisruptionBudget {name}"
        if pdb["_file"] not in resources:
            fail(f"{where}: not in kustomization.yaml")
        spec = pdb.get("spec", {})
        if ("minAvailable" in spec) == ("maxUnavailable" in spec):
            fail(f"{where}: set exactly one of minAvailable and maxUnavailable")
        if not (spec.get("selector") or {}).get("matchLabels") and \
                not (spec.get("selector") or {}).get("matchExpressions"):
            fail(f"{where}: no selector (an empty one selects every pod of the namespace)")
            continue
        targets = [w for w, t in pod_templates(kinds) if w["kind"] != "Job" and
                   selects(spec["selector"], t.get("metadata", {}).get("labels", {}))]
        if not targets:
            fail(f"{where}: selects no StatefulSet/Deployment pods")
        for w in targets:
            wname = w["metadata"]["name"]
            if wname in covered:
                fail(f"{where}: pods of {wname} already have PodDisruptionBudget {covered[wname]} "
                     f"(two budgets on one pod make its eviction fail)")
            covered[wname] = name
            replicas = w["spec"].get("replicas", 1)
            if "maxUnavailable" in spec:
                allowed = spec["maxUnavailable"] if isinstance(spec["maxUnavailable"], int) else None
            else:
                m = spec.get("minAvailable")
                allowed = replicas - m if isinstance(m, int) else None
            if allowed is None:
                continue  # percentages: not judged here
            if "coordinator" in wname and allowed > 0:
                fail(f"{where}: allows {allowed} voluntary eviction(s) of the single coordinator")
            if "worker" in wname and allowed < 1:
                fail(f"{where}: allows no voluntary eviction of a worker (every drain would hang)")
    if not any("coordinator" in w for w in covered):
        fail("k8s: no PodDisruptionBudget selects the coordinator")


class Endpoint:
    """A pod for the NetworkPolicy model: its namespace (and that namespace's labels), its labels
    and its named container ports."""

    def __init__(self, name, namespace, labels, ports=None, ns_labels=None):
        self.name, self.namespace, self.labels = name, namespace, labels
        self.ports = ports or {}
        self.ns_labels = dict(ns_labels or {}, **{"kubernetes.io/metadata.name": namespace})


def _peer_matches(peer, policy_ns, ep):
    if "ipBlock" in peer:
        return False  # no pod IPs in this model: an ipBlock allows none of the flows checked
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], ep.ns_labels):
            return False
    elif ep.namespace != policy_ns:
        return False
    return "podSelector" not in peer or selects(peer["podSelector"], ep.labels)


def _port_matches(rule_ports, dst, port, proto):
    if not rule_ports:
        return True
    for p in rule_ports:
        if p.get("protocol", "TCP") != proto:
            continue
        want = p.get("port")
        if want is None:
            return True
        if isinstance(want, str):
            want = dst.ports.get(want)
            if want is None:
                continue
        if want == port or (p.get("endPort") and want <= port <= p["endPort"]):
            return True
    return False


def _policy_types(np):
    spec = np.get("spec", {})
    return spec.get("policyTypes") or (["Ingress"] + (["Egress"] if "egress" in spec else []))


def np_allows(policies, src, dst, port, proto="TCP"):
    """Whether the NetworkPolicies (all in one namespace) let src open port/proto on dst: the
    source's egress and the destination's ingress must both allow it (a side that no policy of
    that type selects is open; traffic outside the policies' namespace is not theirs to judge)."""
    def side(direction, subject, other, peers_key):
        applying = [np for np in policies if np["metadata"]["namespace"] == subject.namespace
                    and selects(np["spec"].get("podSelector"), subject.labels)
                    and direction in _policy_types(np)]
        if not applying:
            return True
        rules_key = "ingress" if direction == "Ingress" else "egress"
        for np in applying:
            for rule in np["spec"].get(rules_key) or []:
                peers = rule.get(peers_key)
                if peers and not any(_peer_matches(p, np["metadata"]["namespace"], other) for p in peers):
                    continue
                if _port_matches(rule.get("ports"), dst, port, proto):
                    return True
        return False
    return side("Egress", src, dst, "to") and side("Ingress", dst, src, "from")


def check_k8s_network_policies(k8s, kinds):
    """The NetworkPolicies are in the kustomization, select existing pods (their own podSelector
    and every same-namespace peer's), and, evaluated over the manifests' pods plus a Prometheus
    pod (namespace monitoring) and the cluster DNS (kube-system), allow exactly the flows the
    service needs on the ports its pods declare, and deny the rest (a default deny)."""
    _, resources = kustomization_resources(k8s)
    policies = list(kinds.get("NetworkPolicy", {}).values())
    if not policies:
        fail("k8s: no NetworkPolicy")
        return
    templates = pod_templates(kinds)
    ns_labels = {}
    for ns in kinds.get("Namespace", {}).values():
        if ns["metadata"]["name"] == "mat":
            ns_labels = ns["metadata"].get("labels", {})
    pods = {}
    for w, t in templates:
        labels = t.get("metadata", {}).get("labels", {})
        pods[w["metadata"]["name"]] = Endpoint(w["metadata"]["name"], "mat", labels,
                                               w.get("_ports", {}), ns_labels)
    for np in policies:
        name = np["metadata"]["name"]
        where = f"k8s/{np['_file']}: NetworkPolicy {name}"
        if np["_file"] not in resources:
            fail(f"{where}: not in kustomization.yaml")
        sel = np["spec"].get("podSelector")
        if sel is None:
            fail(f"{where}: no podSelector")
        elif (sel.get("matchLabels") or sel.get("matchExpressions")) and \
                not any(selects(sel, p.labels) for p in pods.values()):
            fail(f"{where}: podSelector {sel} selects no pod of the manifests")
        for key in ("ingress", "egress"):
            for rule in np["spec"].get(key) or []:
                for peer in rule.get("from" if key == "ingress" else "to") or []:
                    if "podSelector" in peer and "namespaceSelector" not in peer and \
                            not any(selects(peer["podSelector"], p.labels) for p in pods.values()):
                        fail(f"{where}: {key} peer podSelector {peer['podSelector']} selects no pod of the manifests")
    if not any(np["spec"].get("podSelector") == {} and set(_policy_types(np)) == {"Ingress", "Egress"}
               and not np["spec"].get("ingress") and not np["spec"].get("egress") for np in policies):
        fail("k8s: no default-deny NetworkPolicy (podSelector {}, policyTypes Ingress and Egress, no rules)")

    def by_component(c):
        found = [p for p in pods.values() if p.labels.get("app.kubernetes.io/component") == c]
        if not found:
            fail(f"k8s NetworkPolicy check: no pod with app.kubernetes.io/component={c}")
        return found[0] if found else None

    coord, worker, client = by_component("coordinator"), by_component("worker"), by_component("client")
    if not (coord and worker and client):
        return
    prometheus = Endpoint("prometheus", "monitoring", {"app.kubernetes.io/name": "prometheus"})
    dns = Endpoint("kube-dns", "kube-system", {"k8s-app": "kube-dns"}, {"dns": 53})
    stranger = Endpoint("stranger", "mat", {"run": "debug"}, {}, ns_labels)
    prometheus_elsewhere = Endpoint("prometheus", "default", {"app.kubernetes.io/name": "prometheus"})
    outside = Endpoint("outside", "default", {}, {"https": 443})

    def port(ep, name):
        if name not in ep.ports:
            fail(f"k8s: {ep.name} declares no container port {name}")
        return ep.ports.get(name, -1)

    grpc, cmetrics = port(coord, "grpc"), port(coord, "metrics")
    wmetrics, rdv = port(worker, "metrics"), port(worker, "rendezvous")
    must = [(worker, coord, grpc, "TCP", "workers -> coordinator gRPC"),
            (client, coord, grpc, "TCP", "matctl (submit Job) -> coordinator gRPC"),
            (prometheus, coord, cmetrics, "TCP", "Prometheus -> coordinator /metrics"),
            (prometheus, worker, wmetrics, "TCP", "Prometheus -> worker /metrics"),
            (worker, worker, rdv, "TCP", "worker -> worker c10d rendezvous"),
            (worker, worker, 45123, "TCP", "worker -> worker Gloo/NCCL pair (an ephemeral port)")]
    for p in pods.values():
        must += [(p, dns, 53, "UDP", f"{p.name} -> DNS"), (p, dns, 53, "TCP", f"{p.name} -> DNS (TCP)")]
    must_not = [(stranger, coord, grpc, "TCP", "another pod of namespace mat -> coordinator gRPC"),
                (prometheus_elsewhere, coord, cmetrics, "TCP",
                 "a pod labelled prometheus outside namespace monitoring -> coordinator /metrics"),
                (prometheus, coord, grpc, "TCP", "Prometheus -> coordinator gRPC"),
                (client, worker, wmetrics, "TCP", "matctl -> worker /metrics"),
                (client, worker, rdv, "TCP", "matctl -> worker rendezvous"),
                (coord, worker, rdv, "TCP", "coordinator -> worker"),
                (worker, outside, 443, "TCP", "worker -> outside the namespace"),
                (stranger, worker, wmetrics, "TCP", "another pod of namespace mat -> worker /metrics")]
    for src, dst, prt, proto, what in must:
        if not np_allows(policies, src, dst, prt, proto):
            fail(f"k8s NetworkPolicy: {what} ({proto} {prt}) is not allowed")
    for src, dst, prt, proto, what in must_not:
        if np_allows(policies, src, dst, prt, proto):
            fail(f"k8s NetworkPolicy: {what} ({proto} {prt}) is allowed; it should not be")


def check_k8s_probes(kinds):
    """Every httpGet probe names a container port; the worker has a readinessProbe on /readyz
    and a startupProbe on /healthz, on the port its --metrics-listen serves."""
    for w, t in pod_templates(kinds):
        for c in t.get("spec", {}).get("containers", []):
            ports = {p.get("name"): p.get("containerPort") for p in c.get("ports", [])}
            where = f"k8s/{w['_file']}: {w['kind']} {w['metadata']['name']} container {c.get('name')}"
            listen = [str(a).split("=", 1)[1].rsplit(":", 1)[-1] for a in c.get("args", [])
                      if str(a).startswith("--metrics-listen=")]
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                get = (c.get(kind) or {}).get("httpGet")
                if not get:
                    continue
                p = get.get("port")
                number = ports.get(p) if isinstance(p, str) else p
                if number is None or number not in ports.values():
                    fail(f"{where}: {kind} port {p} is no container port")
                elif listen and str(number) != listen[0]:
                    fail(f"{where}: {kind} port {number} is not the --metrics-listen port {listen[0]}")
            if w["metadata"]["name"] == "mat-worker":
                for kind, path in (("readinessProbe", "/readyz"), ("startupProbe", "/healthz")):
                    got = ((c.get(kind) or {}).get("httpGet") or {}).get("path")
                    if got != path:
                        fail(f"{where}: no {kind} with httpGet path {path} (has {got})")
    if "mat-worker" not in kinds.get("StatefulSet", {}):
        fail("k8s: no StatefulSet mat-worker (for its probes)")


def check_k8s_podmonitor(k8s, kinds):
    """podmonitor.yaml: a PodMonitor outside the kustomization that selects the coordinator and
    worker pods in namespace mat, scrapes a container port they both declare, keeps their labels
    (honorLabels) and gives the alert rules' labels: job (jobLabel) = mat, component."""
    _, resources = kustomization_resources(k8s)
    monitors = list(kinds.get("PodMonitor", {}).values())
    if not monitors:
        fail("k8s: no PodMonitor")
        return
    for pm in monitors:
        where = f"k8s/{pm['_file']}: PodMonitor {pm['metadata']['name']}"
        if pm["_file"] in resources:
            fail(f"{where}: is in kustomization.yaml (it must stay optional: the CRD may be absent)")
        if pm.get("apiVersion") != "monitoring.coreos.com/v1":
            fail(f"{where}: apiVersion {pm.get('apiVersion')} (want monitoring.coreos.com/v1)")
        spec = pm.get("spec", {})
        if "mat" not in (spec.get("namespaceSelector") or {}).get("matchNames", ["mat"]):
            fail(f"{where}: namespaceSelector does not include namespace mat")
        selected = [(w, t) for w, t in pod_templates(kinds)
                    if selects(spec.get("selector"), t.get("metadata", {}).get("labels", {}))]
        comps = {t["metadata"]["labels"].get("app.kubernetes.io/component") for w, t in selected}
        if not {"coordinator", "worker"} <= comps:
            fail(f"{where}: selects {sorted(c for c in comps if c)}, not both coordinator and worker")
        endpoints = spec.get("podMetricsEndpoints") or []
        if not endpoints:
            fail(f"{where}: no podMetricsEndpoints")
        for e in endpoints:
            if e.get("honorLabels"):
                fail(f"{where}: endpoint {e.get('port')}: honorLabels would let a daemon's "
                     "labels override job=\"mat\" (the MAT job id is mat_job)")
            for w, t in selected:
                if t["metadata"]["labels"].get("app.kubernetes.io/component") not in ("coordinator", "worker"):
                    continue
                if e.get("port") not in w.get("_ports", {}):
                    fail(f"{where}: {w['metadata']['name']} has no container port named {e.get('port')}")
                ann = t.get("metadata", {}).get("annotations", {})
                if e.get("path", "/metrics") != ann.get("prometheus.io/path", "/metrics"):
                    fail(f"{where}: path {e.get('path')} is not {w['metadata']['name']}'s metrics path")
            if not any(r.get("targetLabel") == "component" and r.get("sourceLabels") ==
                       ["__meta_kubernetes_pod_label_app_kubernetes_io_component"]
                       for r in e.get("relabelings") or []):
                fail(f"{where}: endpoint {e.get('port')}: no relabeling sets `component` from the pod label")
        job_label = spec.get("jobLabel")
        for w, t in selected:
            if t["metadata"]["labels"].get(job_label) != "mat":
                fail(f"{where}: jobLabel {job_label}: pods of {w['metadata']['name']} would get "
                     f"job={t['metadata']['labels'].get(job_label)!r}; the alert rules want job=\"mat\"")


def check_kustomization_lists(k8s, kinds):
    _, resources = kustomization_resources(k8s)
    for kind in ("ServiceAccount", "PodDisruptionBudget", "NetworkPolicy", "StatefulSet"):
        for name, d in kinds.get(kind, {}).items():
            if d["_file"] not in resources:
                fail(f"k8s/kustomization.yaml does not list {d['_file']} ({kind} {name})")


# ---- Prometheus on Kubernetes: relabelling run by promtool over simulated discovery ----

def _sanitize(name):
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def join_host_port(host, port):
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def promtool_relabel(promtool, path, sd_key, static_configs, workdir):
    """Runs the `mat` scrape job of the config at `path` through `promtool check service-discovery`
    with its `sd_key` discovery replaced by static_configs (targets with the __meta_* labels that
    discovery would attach), after `promtool check config` on that copy. Returns the surviving
    targets' label maps, or None after reporting a failure."""
    with open(path, encoding="utf-8") as f:
        cfg = yaml.safe_load(f)
    jobs = [j for j in cfg.get("scrape_configs", []) if j.get("job_name") == "mat"]
    if len(jobs) != 1 or sd_key not in jobs[0]:
        fail(f"{path}: no scrape job mat with {sd_key}")
        return None
    del jobs[0][sd_key]
    jobs[0]["static_configs"] = static_configs
    copy = os.path.join(workdir, "sim-" + os.path.basename(path))
    with open(copy, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    for r in cfg.get("rule_files") or []:
        for src in glob.glob(os.path.join(os.path.dirname(path), str(r))):
            shutil.copy(src, os.path.join(workdir, os.path.basename(src)))
    r = subprocess.run([promtool, "check", "config", copy], capture_output=True, text=True)
    if r.returncode != 0:
        fail(f"promtool check config {path} (its {sd_key} replaced by static targets):\n"
             f"{(r.stdout + r.stderr).strip()}")
        return None
    r = subprocess.run([promtool, "check", "service-discovery", "--timeout=1s", copy, "mat"],
                       capture_output=True, text=True)
    try:
        results = json.loads(r.stdout)
    except ValueError:
        results = None
    if r.returncode != 0 or not isinstance(results, list):
        fail(f"promtool check service-discovery on {path} (simulated {sd_key}) failed "
             f"(rc {r.returncode}):\n{(r.stdout + r.stderr).strip()[:2000]}")
        return None
    return [t.get("labels") or {} for t in results]


def check_prometheus_kubernetes(deploy, kinds, promtool):
    """prometheus-kubernetes.yml: the pod-role discovery simulated from the manifests' pods, with
    an IPv4 and an IPv6 pod IP each; the relabelling must keep each annotated pod once at
    HOST:PORT of its prometheus.io/port ([IPv6]:PORT), with its path, component and pod labels,
    and drop the others. prometheus-kubernetes-dns.yml: its SRV names are Services of the
    manifests with that named port (the worker's publishing not-ready pods), and the records
    those Services give relabel to the same job and component labels."""
    if promtool is None or not kinds:
        return
    with tempfile.TemporaryDirectory() as tmp:
        # -- kubernetes_sd_configs, role pod
        statics, want = [], {}
        for w, t in pod_templates(kinds):
            meta = t.get("metadata", {})
            labels, ann = meta.get("labels", {}), meta.get("annotations", {})
            pod_name = w["metadata"]["name"] + ("-0" if w["kind"] == "StatefulSet" else "-abcde")
            ports = [p for c in t["spec"].get("containers", []) for p in c.get("ports", [])]
            for ip in ("10.244.1.7", "fd00:10:244::7"):
                common = {"__meta_kubernetes_namespace": "mat",
                          "__meta_kubernetes_pod_name": pod_name,
                          "__meta_kubernetes_pod_ip": ip}
                common.update({"__meta_kubernetes_pod_label_" + _sanitize(k): str(v) for k, v in labels.items()})
                common.update({"__meta_kubernetes_pod_annotation_" + _sanitize(k): str(v) for k, v in ann.items()})
                for p in ports or [None]:
                    lab = dict(common)
                    if p:
                        lab["__meta_kubernetes_pod_container_port_name"] = str(p.get("name", ""))
                        lab["__meta_kubernetes_pod_container_port_number"] = str(p["containerPort"])
                    addr = join_host_port(ip, p["containerPort"]) if p else ip
                    statics.append({"targets": [addr], "labels": lab})
                if ann.get("prometheus.io/scrape") == "true":
                    want[join_host_port(ip, ann.get("prometheus.io/port"))] = {
                        "__metrics_path__": ann.get("prometheus.io/path", "/metrics"),
                        "component": labels.get("app.kubernetes.io/component"),
                        "pod": pod_name, "job": "mat"}
        path = os.path.join(deploy, "prometheus", "prometheus-kubernetes.yml")
        got = promtool_relabel(promtool, path, "kubernetes_sd_configs", statics, tmp)
        if got is not None:
            check_relabelled(path, got, want)
        # -- dns_sd_configs, SRV
        path = os.path.join(deploy, "prometheus", "prometheus-kubernetes-dns.yml")
        docs = load_all(path)
        jobs = [j for j in (docs[0].get("scrape_configs", []) if docs else []) if j.get("job_name") == "mat"]
        names = [n for j in jobs for sd in j.get("dns_sd_configs", []) for n in sd.get("names", [])
                 if sd.get("type") == "SRV"]
        if not names:
            fail(f"{path}: no SRV names in the mat job's dns_sd_configs")
            return
        statics, want = [], {}
        services = kinds.get("Service", {})
        for n in names:
            m = re.fullmatch(r"_([a-z0-9-]+)\._tcp\.([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.(.+?)\.?", n)
            if not m:
                fail(f"{path}: SRV name {n} is not _PORT._tcp.SERVICE.NAMESPACE.svc.DOMAIN")
                continue
            port_name, svc_name, ns, domain = m.groups()
            svc = services.get(svc_name)
            if ns != "mat" or svc is None:
                fail(f"{path}: SRV name {n}: no Service {svc_name} in namespace mat")
                continue
            sp = [p for p in svc["spec"].get("ports", []) if p.get("name") == port_name]
            if not sp:
                fail(f"{path}: SRV name {n}: Service {svc_name} has no port named {port_name}")
                continue
            sel = svc["spec"].get("selector", {})
            backing = [(w, t) for w, t in pod_templates(kinds) if w["kind"] != "Job" and
                       all(t.get("metadata", {}).get("labels", {}).get(k) == v for k, v in sel.items())]
            if not backing:
                fail(f"{path}: SRV name {n}: Service {svc_name} selects no pods")
                continue
            w, t = backing[0]
            component = t["metadata"]["labels"].get("app.kubernetes.io/component")
            if svc["spec"].get("clusterIP") == "None":
                if svc["spec"].get("publishNotReadyAddresses") is not True:
                    fail(f"k8s Service {svc_name}: headless without publishNotReadyAddresses: true: "
                         f"{path} would lose a worker's metrics while it is not Ready")
                hosts = [(f"{w['metadata']['name']}-{i}.{svc_name}.{ns}.svc.{domain}", f"{w['metadata']['name']}-{i}")
                         for i in range(max(1, w["spec"].get("replicas", 1)))]
            else:
                hosts = [(f"{svc_name}.{ns}.svc.{domain}", None)]
            for host, pod in hosts:
                addr = f"{host}:{sp[0]['port']}"
                statics.append({"targets": [addr], "labels": {
                    "__meta_dns_name": n, "__meta_dns_srv_record_target": host,
                    "__meta_dns_srv_record_port": str(sp[0]["port"])}})
                want[addr] = {"component": component, "job": "mat", "pod": pod,
                              "__metrics_path__": t.get("metadata", {}).get("annotations", {}).get(
                                  "prometheus.io/path", "/metrics")}
        if statics:
            got = promtool_relabel(promtool, path, "dns_sd_configs", statics, tmp)
            if got is not None:
                check_relabelled(path, got, want)


def check_relabelled(path, got, want):
    kept = {}
    for labels in got:
        if labels:
            kept.setdefault(labels.get("__address__"), labels)
    for addr, labels in kept.items():
        if addr not in want:
            fail(f"{path}: relabelling yields target {addr}, which is no pod's metrics address "
                 f"(want one of {sorted(want)})")
    for addr, expect in want.items():
        labels = kept.get(addr)
        if labels is None:
            fail(f"{path}: no target {addr} after relabelling (got {sorted(a for a in kept if a)})")
            continue
        for k, v in expect.items():
            if labels.get(k) != v:
                fail(f"{path}: target {addr}: label {k}={labels.get(k)!r}, want {v!r}")
    print(f"ok: {os.path.basename(path)}: relabelling of {len(got)} simulated targets gives "
          f"{len(kept)} ({', '.join(sorted(kept))})")


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
    kinds = check_k8s(deploy, flags, args.bin_dir) or {}
    k8s = os.path.join(deploy, "k8s")
    check_kustomization_lists(k8s, kinds)
    check_k8s_images(k8s, kinds, project_version(args.source_dir))
    check_k8s_service_accounts(k8s, kinds)
    check_k8s_disruption_budgets(k8s, kinds)
    check_k8s_network_policies(k8s, kinds)
    check_k8s_probes(kinds)
    check_k8s_podmonitor(k8s, kinds)
    check_prometheus_kubernetes(deploy, kinds, shutil.which(args.promtool))
    check_systemd_and_containerfile(deploy, flags)
    check_runtime_libraries(deploy, args.bin_dir)
    check_with_optional_tools(deploy)
    for p in problems:
        print("FAIL", p)
    print(f"{len(files)} YAML files, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
