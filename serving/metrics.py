"""`recommend`'s own per-version serving metrics, on Triton's metrics endpoint.

Triton counts a request as a success whenever `execute` returns a response, even one that
carries an error (a bad `k`, a version whose features are missing), and it only sees the
`recommend` model, not which retrieval version answered each user. So `recommend` counts
for itself, per routed version, as Triton custom metrics of the Python backend:

    northstar_recommend_requests_total{version}          users routed to the version
    northstar_recommend_errors_total{version,reason}     see REASONS
    northstar_recommend_latency_ms{version}              histogram, per answered request
    northstar_state_file_errors_total{file}              a state file on disk is unreadable

Requests and errors count users (a request for several users counts once per user): users
are what the canary randomises. Latency counts requests: one observation per answered
request and version it touched, the batch's shared work plus that version's own.
A user routed to the canary but answered by production counts as a `fallback` error of the
canary: the user got an answer, but not from the model under test. `bad_input` requests
never reach routing, so their version label is "none".
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

NO_VERSION = "none"
REQUESTS = "northstar_recommend_requests_total"
ERRORS = "northstar_recommend_errors_total"
LATENCY = "northstar_recommend_latency_ms"
STATE_ERRORS = "northstar_state_file_errors_total"
# bad_input: refused before routing (400); no_state: routing or version metadata unreadable;
# failed: the routed version (and any fallback) failed, the user got an error (500);
# fallback: the routed version failed and production answered instead;
# degraded: answered, but as a cold start: the online store did not answer (serving/live.py).
REASONS = ("bad_input", "no_state", "failed", "fallback", "degraded")
# Upper bounds in ms; +Inf is implied. Fine where a CPU request lands (1-50 ms).
LATENCY_BUCKETS_MS = (1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 200, 500, 1000, 5000)


@dataclass
class BatchMetrics:
    """What one dynamic batch adds to the counters: built by `serving.recommender`."""

    requests: Counter = field(default_factory=Counter)  # version -> users
    errors: Counter = field(default_factory=Counter)  # (version, reason) -> users
    latency_ms: dict[str, list[float]] = field(default_factory=dict)  # version -> per request

    def add_latency(self, version: str, ms: float, count: int = 1) -> None:
        self.latency_ms.setdefault(version, []).extend([float(ms)] * int(count))


class TritonMetrics:
    """The families above, registered through `pb_utils.MetricFamily`; one per process.

    `pb_utils` is passed in (it only exists inside the backend stub), so this module stays
    importable and testable anywhere; the integration tests read the real endpoint.
    """

    def __init__(self, pb_utils) -> None:
        fam = pb_utils.MetricFamily
        self._requests = fam(
            name=REQUESTS, description="users routed to a version", kind=fam.COUNTER
        )
        self._errors = fam(
            name=ERRORS,
            description="users not answered by their routed version, by reason",
            kind=fam.COUNTER,
        )
        self._latency = fam(
            name=LATENCY,
            description="per-request latency inside recommend, by routed version, ms",
            kind=fam.HISTOGRAM,
        )
        self._state = fam(
            name=STATE_ERRORS, description="unreadable state files seen", kind=fam.COUNTER
        )
        self._metrics: dict[tuple, object] = {}

    def _metric(self, family, labels: dict[str, str], **kw):
        key = (id(family), tuple(sorted(labels.items())))
        m = self._metrics.get(key)
        if m is None:
            m = self._metrics[key] = family.Metric(labels=labels, **kw)
        return m

    def record(self, batch: BatchMetrics) -> None:
        for version, n in batch.requests.items():
            self._metric(self._requests, {"version": str(version)}).increment(float(n))
        for (version, reason), n in batch.errors.items():
            labels = {"version": str(version), "reason": reason}
            self._metric(self._errors, labels).increment(float(n))
        for version, values in batch.latency_ms.items():
            m = self._metric(
                self._latency, {"version": str(version)}, buckets=list(LATENCY_BUCKETS_MS)
            )
            for v in values:
                m.observe(v)

    def state_error(self, file: str) -> None:
        self._metric(self._state, {"file": file}).increment(1.0)


# ---------------------------------------------------------------------------- reading them


@dataclass
class VersionMetrics:
    """One version's counters as scraped: what the canary guardrails read."""

    requests: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latency_bounds: np.ndarray = field(default_factory=lambda: np.zeros(0))  # upper bounds
    latency_counts: np.ndarray = field(default_factory=lambda: np.zeros(0))  # per bucket

    def error_count(self, *reasons: str) -> int:
        return int(sum(self.errors.get(r, 0) for r in (reasons or self.errors)))

    @property
    def answered(self) -> int:
        return int(self.latency_counts.sum()) if self.latency_counts.size else 0

    def latency_quantile(self, q: float) -> float | None:
        if not self.answered:
            return None
        return histogram_quantile(self.latency_bounds, self.latency_counts, q)

    def to_dict(self) -> dict:
        return {
            "requests": self.requests,
            "errors": dict(self.errors),
            "answered": self.answered,
            "p50_ms": self.latency_quantile(0.5),
            "p99_ms": self.latency_quantile(0.99),
        }


def read_serving_metrics(
    samples: list[tuple[str, dict[str, str], float]],
) -> dict[str, VersionMetrics]:
    """Per version label ("1", "2", …, "none"): requests, errors by reason, latency buckets.

    `samples`: (name, labels, value) of the text exposition (canary.prom.parse_prometheus).
    """
    out: dict[str, VersionMetrics] = {}
    buckets: dict[str, dict[float, float]] = {}
    for name, labels, value in samples:
        v = labels.get("version")
        if v is None:
            continue
        if name == REQUESTS:
            out.setdefault(v, VersionMetrics()).requests += int(value)
        elif name == ERRORS:
            m = out.setdefault(v, VersionMetrics())
            r = labels.get("reason", "")
            m.errors[r] = m.errors.get(r, 0) + int(value)
        elif name == LATENCY + "_bucket":
            le = labels.get("le", "")
            bound = float("inf") if le in ("+Inf", "inf") else float(le)
            # summed: the samples may come from several replicas (canary.prom)
            per = buckets.setdefault(v, {})
            per[bound] = per.get(bound, 0.0) + value
    for v, cum in buckets.items():
        bounds = np.array(sorted(cum), dtype=np.float64)
        c = np.array([cum[b] for b in bounds], dtype=np.float64)
        m = out.setdefault(v, VersionMetrics())
        m.latency_bounds, m.latency_counts = bounds, np.diff(np.concatenate([[0.0], c]))
    return out


def histogram_quantile(upper_bounds: np.ndarray, counts: np.ndarray, q: float) -> float:
    """The q-quantile of a histogram with bucket upper bounds `upper_bounds` (the last may be
    +inf) and per-bucket (not cumulative) `counts`, linear inside a bucket like Prometheus."""
    ub = np.asarray(upper_bounds, np.float64)
    c = np.asarray(counts, np.float64)
    total = c.sum()
    if total <= 0:
        return float("nan")
    rank = q * total
    cum = np.cumsum(c)
    k = int(np.searchsorted(cum, rank, side="left"))
    k = min(k, len(c) - 1)
    lo = 0.0 if k == 0 else ub[k - 1]
    hi = ub[k]
    if math.isinf(hi):  # beyond the last finite bound: the bound is all we know
        return float(lo)
    below = 0.0 if k == 0 else cum[k - 1]
    inside = c[k]
    return float(lo + (hi - lo) * ((rank - below) / inside if inside > 0 else 1.0))
