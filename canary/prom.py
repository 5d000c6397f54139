"""Guardrails from Triton's Prometheus endpoint (`http://HOST:8002/metrics`).

What this build (nvidia-pytriton's tritonserver) exposes per model *version*, measured:

    nv_inference_request_success{model,version}            counter
    nv_inference_request_failure{model,reason,version}     counter, one per reason
                                                           (OTHER, BACKEND, CANCELED, REJECTED)
    nv_inference_request_duration_us{model,version}        counter (sum of latencies)
    nv_inference_request_summary_us{model,version,quantile} summary, only with
        --metrics-config=summary_latencies=true (serving.server.ServerConfig.metrics_config);
        quantiles 0.5, 0.9, 0.95, 0.99, 0.999 over a sliding window

There is no latency histogram in this build, so p99 comes from the summary; without it
the guardrail falls back to nothing rather than guess a tail from the mean.
Production and canary are two versions of `retrieval`, so the labels tell them apart.
"""

from __future__ import annotations

import math
import re
import urllib.request

from canary.decide import Guardrail

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


def guardrails(text: str, *, model: str = "retrieval") -> dict[int, Guardrail]:
    """Per version of `model`: requests (success + failure), failures, p99 in ms."""
    succ: dict[int, float] = {}
    fail: dict[int, float] = {}
    p99: dict[int, float] = {}
    for name, labels, value in parse_prometheus(text):
        if labels.get("model") != model or not labels.get("version", "").isdigit():
            continue
        v = int(labels["version"])
        if name == "nv_inference_request_success":
            succ[v] = succ.get(v, 0.0) + value
        elif name == "nv_inference_request_failure":
            fail[v] = fail.get(v, 0.0) + value
        elif (
            name == "nv_inference_request_summary_us"
            and labels.get("quantile") == "0.99"
            and math.isfinite(value)
        ):
            p99[v] = value / 1000.0
    return {
        v: Guardrail(
            requests=int(succ.get(v, 0) + fail.get(v, 0)),
            failures=int(fail.get(v, 0)),
            p99_ms=p99.get(v),
        )
        for v in sorted(set(succ) | set(fail) | set(p99))
    }


def fetch(metrics_url: str, timeout: float = 5.0) -> str:
    url = metrics_url if metrics_url.startswith("http") else f"http://{metrics_url}"
    if not url.rstrip("/").endswith("/metrics"):
        url = url.rstrip("/") + "/metrics"
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()
