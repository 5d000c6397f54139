"""The canary's offline gates as pure functions of numbers, and the verdict types both use.

Nothing here reads a file or talks to a server, so every rule is unit-tested with
hand-made inputs. Each function returns a `Verdict`: the action, one reason per rule that
fired (or that explains why nothing fired), and every check with its value and threshold,
which is what the decision history stores as evidence.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from typing import Any

from common.jsonsafe import to_jsonable

PROMOTE, ROLLBACK, CONTINUE = "promote", "rollback", "continue"
PASS, REJECT = "pass", "reject"


@dataclass(frozen=True)
class Check:
    name: str
    value: float | None
    threshold: float | None
    passed: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Verdict:
    action: str  # pass | reject (offline); promote | rollback | continue (online)
    reasons: tuple[str, ...]
    checks: tuple[Check, ...] = ()

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "reasons": list(self.reasons),
            "checks": [c.to_dict() for c in self.checks],
        }


# ---------------------------------------------------------------------------- offline


@dataclass(frozen=True)
class OfflineGates:
    metric: str = "ndcg@10"  # the training metric the candidate is judged on
    # Candidate / production on the same newest slice. 0.95: a retrain may lose a little
    # to noise (two runs of the same config differ by a few percent on small worlds), not
    # more.
    min_metric_ratio: float = 0.95
    # Candidate / TopPop: a model that only learned popularity (shuffled labels) sits at ~1.
    min_lift_over_toppop: float = 1.2
    # Stability: mean |top-K(candidate) ∩ top-K(production)| / K over the same users. Two
    # healthy retrains of one world share far more of their top 10 than this floor; a model
    # that forgot everyone's taste shares little more than the popular head.
    min_topk_overlap: float = 0.25
    # Popularity bias vs production: ARP ratio and exposure-Gini increase (fairness audit).
    max_arp_ratio: float = 1.25
    max_gini_increase: float = 0.05
    # Bias trend across versions: ARP rising at each of the last `trend_window` versions
    # (candidate included) and by more than `max_arp_drift` in total is a feedback loop
    # amplifying popularity, even when each single step passes max_arp_ratio.
    trend_window: int = 3
    max_arp_drift: float = 0.25


def offline_decision(
    *,
    candidate: dict[str, float],
    production: dict[str, float],
    toppop: dict[str, float],
    overlap: float,
    bias: dict[str, float],
    production_bias: dict[str, float],
    bias_history: list[dict[str, float]],
    fairness_passed: bool,
    fairness_reasons: list[str],
    gates: OfflineGates,
) -> Verdict:
    """pass or reject. `candidate`, `production`, `toppop`: metric -> value on one slice;
    `bias`: {"arp", "exposure_gini"} of the candidate; `bias_history`: the same per past
    production version, oldest first."""
    m = gates.metric
    checks: list[Check] = []

    def add(name, value, threshold, ok, text):
        checks.append(Check(name, _num(value), _num(threshold), bool(ok), text))

    c, p, t = candidate.get(m, math.nan), production.get(m, math.nan), toppop.get(m, math.nan)
    ratio = c / p if p > 0 else math.inf
    add(
        "metric_vs_production",
        ratio,
        gates.min_metric_ratio,
        ratio >= gates.min_metric_ratio,
        f"{m} candidate {c:.4f} vs production {p:.4f} (ratio {ratio:.3f}, min "
        f"{gates.min_metric_ratio})",
    )
    lift = c / t if t > 0 else math.inf
    add(
        "lift_over_toppop",
        lift,
        gates.min_lift_over_toppop,
        lift >= gates.min_lift_over_toppop,
        f"{m} candidate {c:.4f} vs TopPop {t:.4f} (lift {lift:.2f}x, min "
        f"{gates.min_lift_over_toppop}x)",
    )
    add(
        "topk_overlap",
        overlap,
        gates.min_topk_overlap,
        overlap >= gates.min_topk_overlap,
        f"top-K overlap with production {overlap:.3f} (churn {1 - overlap:.3f}); min overlap "
        f"{gates.min_topk_overlap}",
    )
    arp, parp = bias["arp"], production_bias["arp"]
    arp_ratio = arp / parp if parp > 0 else 1.0
    add(
        "arp_ratio",
        arp_ratio,
        gates.max_arp_ratio,
        arp_ratio <= gates.max_arp_ratio,
        f"ARP candidate {arp:.1f} vs production {parp:.1f} (ratio {arp_ratio:.3f}, max "
        f"{gates.max_arp_ratio})",
    )
    dg = bias["exposure_gini"] - production_bias["exposure_gini"]
    add(
        "gini_increase",
        dg,
        gates.max_gini_increase,
        dg <= gates.max_gini_increase,
        f"exposure Gini candidate {bias['exposure_gini']:.4f} vs production "
        f"{production_bias['exposure_gini']:.4f} (+{dg:.4f}, max +{gates.max_gini_increase})",
    )
    series = [h["arp"] for h in bias_history] + [arp]
    window = series[-gates.trend_window :] if gates.trend_window >= 2 else []
    rising = len(window) == gates.trend_window and all(b > a for a, b in itertools.pairwise(window))
    drift = window[-1] / window[0] - 1 if window and window[0] > 0 else 0.0
    amplifying = rising and drift > gates.max_arp_drift
    add(
        "bias_trend",
        drift,
        gates.max_arp_drift,
        not amplifying,
        f"ARP over the last {len(window)} versions {[round(x, 1) for x in window]}: "
        + (
            f"rising every version, +{drift:.1%} (max {gates.max_arp_drift:.0%}): the loop "
            "amplifies popularity bias"
            if amplifying
            else f"{'rising' if rising else 'not rising every version'}, {drift:+.1%}"
        ),
    )
    add(
        "fairness_gates",
        None,
        None,
        fairness_passed,
        "fairness gates vs production: "
        + ("passed" if fairness_passed else "; ".join(fairness_reasons) or "failed"),
    )
    failed = [ch.reason for ch in checks if not ch.passed]
    if failed:
        return Verdict(REJECT, tuple(failed), tuple(checks))
    return Verdict(PASS, ("every offline gate passed",), tuple(checks))


def _num(x: Any) -> float | None:
    """A check's value as stored: a float, or None where it is missing or not finite."""
    return None if x is None else to_jsonable(float(x))
