"""Serving guardrails for the canary, from `recommend`'s own per-version metrics.

The numbers come from the front door (`serving.metrics`, scraped from Triton's metrics
endpoint), so they see the canary whatever runs its graph (inline onnxruntime on the cpu
target, or `retrieval` through BLS on the gpu target). Missing numbers never pass: a canary
the metrics do not show, or one with too few requests, is "cannot decide".
"""

from __future__ import annotations

from dataclasses import dataclass

from canary.decide import Check
from canary.latency import compare_latency
from serving.metrics import VersionMetrics


@dataclass(frozen=True)
class GuardrailGates:
    # Users the canary must have been routed before any guardrail may pass: below this
    # the metrics say too little to call it safe (a rate of 0 of 10 proves nothing).
    min_requests: int = 100
    # Canary users not answered by the canary (failed or served by production instead).
    max_error_rate: float = 0.01
    # Canary users answered by production because the canary failed: a version that
    # mostly falls back is broken even if every user got an answer.
    max_fallback_rate: float = 0.01
    # Latency: the canary is a regression when it is stochastically slower (one-sided
    # Mann-Whitney p below latency_alpha) AND its p99 exceeds production's by this ratio
    # and by p99_slack_ms. Both arms need min_latency_requests answered users.
    latency_alpha: float = 0.001
    max_p99_ratio: float = 1.5
    p99_slack_ms: float = 10.0
    min_latency_requests: int = 300


@dataclass(frozen=True)
class GuardrailResult:
    checks: tuple[Check, ...]
    decidable: bool  # False: the metrics cannot say whether the canary is safe yet
    why_not: str = ""

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]


def check_guardrails(
    canary: VersionMetrics | None, production: VersionMetrics | None, gates: GuardrailGates
) -> GuardrailResult:
    """Error rate, fallback rate and latency of the canary against production."""
    if canary is None:
        return GuardrailResult((), False, "no serving metrics for the canary version")
    checks: list[Check] = []
    n = canary.requests
    if n:
        failed = canary.error_count("failed", "fallback")
        rate = failed / n
        checks.append(
            Check(
                "error_rate",
                rate,
                gates.max_error_rate,
                rate <= gates.max_error_rate,
                f"error rate {rate:.4f}: canary users not answered by the canary: "
                f"{failed}/{n} (max {gates.max_error_rate})",
            )
        )
        fb = canary.error_count("fallback")
        checks.append(
            Check(
                "fallback_rate",
                fb / n,
                gates.max_fallback_rate,
                fb / n <= gates.max_fallback_rate,
                f"fallback rate {fb / n:.4f}: canary users answered by production after the "
                f"canary failed: {fb}/{n} (max {gates.max_fallback_rate})",
            )
        )
    if (
        production is not None
        and min(canary.answered, production.answered) >= gates.min_latency_requests
        and canary.latency_bounds.shape == production.latency_bounds.shape
    ):
        cmp = compare_latency(
            production.latency_bounds, production.latency_counts, canary.latency_counts
        )
        limit = max(cmp.p99_a_ms * gates.max_p99_ratio, cmp.p99_a_ms + gates.p99_slack_ms)
        slower = cmp.p_slower < gates.latency_alpha and cmp.p99_b_ms > limit
        checks.append(
            Check(
                "latency",
                cmp.p99_b_ms,
                limit,
                not slower,
                f"canary p99 {cmp.p99_b_ms:.1f} ms vs production {cmp.p99_a_ms:.1f} ms "
                f"(limit {limit:.1f}); Mann-Whitney: P(canary slower) {cmp.prob_slower:.3f}, "
                f"one-sided p {cmp.p_slower:.2g} (alpha {gates.latency_alpha}); "
                f"{cmp.requests_b} vs {cmp.requests_a} requests",
            )
        )
    if any(not c.passed for c in checks):
        return GuardrailResult(tuple(checks), True)  # a failure decides at any sample size
    if n < gates.min_requests:
        return GuardrailResult(
            tuple(checks),
            False,
            f"the canary was routed {n} users; guardrails need {gates.min_requests}",
        )
    if production is None or min(canary.answered, production.answered) < (
        gates.min_latency_requests
    ):
        answered = 0 if production is None else production.answered
        return GuardrailResult(
            tuple(checks),
            False,
            f"latency needs {gates.min_latency_requests} answered users per arm; canary "
            f"{canary.answered}, production {answered}",
        )
    return GuardrailResult(tuple(checks), True)
