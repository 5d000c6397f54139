"""Read Triton's Prometheus endpoint (`http://HOST:8002/metrics`).

The canary's guardrails read `recommend`'s own per-version families (serving/metrics.py):
Triton's `nv_inference_*` counters describe models, not which retrieval version answered a
user, and count an error returned inside a response as a success.
"""

from __future__ import annotations

import re
import urllib.request

from serving.discovery import split_urls
from serving.metrics import VersionMetrics, read_serving_metrics

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) per sample line of the text exposition format."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        labels = dict(_LABEL.findall(m.group(2) or ""))
        out.append((m.group(1), labels, value))
    return out


def serving_metrics(text: str) -> dict[str, VersionMetrics]:
    """`recommend`'s per-version counters (serving.metrics) from the endpoint's text."""
    return read_serving_metrics(parse_prometheus(text))


def fleet_serving_metrics(metrics_urls: str, timeout: float = 5.0) -> dict[str, VersionMetrics]:
    """The same counters summed over every replica: `metrics_urls` is one endpoint, "a,b"
    or dns:NAME:PORT (serving.discovery). Every replica must answer (OSError otherwise):
    guardrails on a partial sum would undercount the errors of the one that did not."""
    samples = []
    for url in split_urls(metrics_urls):
        samples += parse_prometheus(fetch(url, timeout))
    return read_serving_metrics(samples)


def fetch(metrics_url: str, timeout: float = 5.0) -> str:
    url = metrics_url if metrics_url.startswith("http") else f"http://{metrics_url}"
    if not url.rstrip("/").endswith("/metrics"):
        url = url.rstrip("/") + "/metrics"
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()
