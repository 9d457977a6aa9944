"""The metric list shared by the deploy tests (tests/deploy/metric_names.txt)."""
import os

HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def load(path=None):
    """Returns {name: (type, daemon)} from metric_names.txt."""
    path = path or os.path.join(os.path.dirname(os.path.abspath(__file__)), "metric_names.txt")
    names = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 3 or parts[1] not in ("counter", "gauge", "histogram") or \
                    parts[2] not in ("coordinator", "worker", "both"):
                raise ValueError(
                    f"{path}:{n}: want NAME counter|gauge|histogram coordinator|worker|both")
            if parts[0] in names:
                raise ValueError(f"{path}:{n}: {parts[0]} listed twice")
            names[parts[0]] = (parts[1], parts[2])
    return names


def exposed_by(entry, daemon):
    """Whether a listed metric's (type, daemon) entry belongs on `daemon`'s /metrics."""
    return entry[1] in (daemon, "both")


def known(name, names):
    """Whether a series name is a listed family or a listed histogram's _bucket/_sum/_count."""
    if name in names:
        return True
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and names.get(name[: -len(suffix)], ("",))[0] == "histogram":
            return True
    return False
