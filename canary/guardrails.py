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
from canary.stats import binomial_excess
from serving.metrics import VersionMetrics


@dataclass(frozen=True)
class GuardrailGates:
    # Users the canary must have been routed before any guardrail may pass: below this
    # the metrics say too little to call it safe (a rate of 0 of 10 proves nothing).
    min_requests: int = 100
    # Canary users not answered by the canary (failed or served by production instead):
    # the canary is rolled back when its error rate is above this AND significantly above
    # production's (always-valid, `error_alpha`). The rate alone is not enough: one error
    # in the canary's first hundred users is above any small limit by chance.
    max_error_rate: float = 0.01
    # Canary users answered by production because the canary failed: a version that
    # mostly falls back is broken even if every user got an answer. Production cannot fall
    # back, so this rate is tested against the limit itself (always-valid, `error_alpha`).
    max_fallback_rate: float = 0.01
    # The alarm level of both tests: a broken canary, not bad luck (as the sample-ratio
    # and latency alarms). The tests are always-valid, so it holds over every look.
    error_alpha: float = 0.001
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
        checks.append(_error_check(canary, production, gates))
        fb = canary.error_count("fallback")
        test = binomial_excess(successes=fb, trials=n, null_rate=gates.max_fallback_rate)
        bad = fb / n > gates.max_fallback_rate and test.p_value < gates.error_alpha
        checks.append(
            Check(
                "fallback_rate",
                fb / n,
                gates.max_fallback_rate,
                not bad,
                f"fallback rate {fb / n:.4f}: canary users answered by production after the "
                f"canary failed: {fb}/{n} (max {gates.max_fallback_rate}; always-valid p "
                f"{test.p_value:.2g} that it is above, alarm below {gates.error_alpha})",
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
        # A failure decides at any sample size: each test is significant at its alarm level
        # over every look, so an early failure is a broken canary, not an early error.
        return GuardrailResult(tuple(checks), True)
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


def _error_check(
    canary: VersionMetrics, production: VersionMetrics | None, gates: GuardrailGates
) -> Check:
    """The canary's error rate against production's.

    Both arms share one error process when the canary is as good: every error then lands on
    the canary with the probability of the canary's share of requests. The test is that the
    canary's share of the errors exceeds its share of the requests (`binomial_excess`,
    always-valid over looks). Without production's numbers the limit itself is the null."""
    n = canary.requests
    failed = canary.error_count("failed", "fallback")
    rate = failed / n
    if production is not None and production.requests > 0:
        p_failed = production.error_count("failed", "fallback")
        share = n / (n + production.requests)
        test = binomial_excess(successes=failed, trials=failed + p_failed, null_rate=share)
        versus = (
            f"production {p_failed / production.requests:.4f} ({p_failed}/"
            f"{production.requests}); canary's share of errors {failed}/{failed + p_failed} "
            f"vs of requests {share:.3f}"
        )
    else:
        test = binomial_excess(successes=failed, trials=n, null_rate=gates.max_error_rate)
        versus = "no production numbers: tested against the limit"
    bad = rate > gates.max_error_rate and test.p_value < gates.error_alpha
    return Check(
        "error_rate",
        rate,
        gates.max_error_rate,
        not bad,
        f"error rate {rate:.4f}: canary users not answered by the canary: {failed}/{n} "
        f"(max {gates.max_error_rate}); {versus}: always-valid p {test.p_value:.2g} "
        f"(alarm below {gates.error_alpha})",
    )
