"""The canary's decisions as pure functions of numbers: offline gates and the online verdict.

Nothing here reads a file or talks to a server, so every rule is unit-tested with
hand-made inputs. Each function returns a `Verdict`: the action, one reason per rule that
fired (or that explains why nothing fired), and every check with its value and threshold,
which is what the decision history stores as evidence.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from canary.stats import MSPRT, SRM, ZTest
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
    # to noise (two runs of the same config differ by ~2-3% on small worlds), not more.
    min_metric_ratio: float = 0.95
    # Candidate / TopPop: a model that only learned popularity (shuffled labels) sits at ~1.
    min_lift_over_toppop: float = 1.2
    # Stability: mean |top-K(candidate) ∩ top-K(production)| / K over the same users. Two
    # healthy retrains of one world share ~40-70% of their top 10; a model that forgot
    # everyone's taste shares little more than the popular head.
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


# ---------------------------------------------------------------------------- online


@dataclass(frozen=True)
class OnlineGates:
    # Per arm, before the CTR comparison may decide: at CTR ~0.15 a 2-point difference has
    # a standard error of ~0.01 at 2,500 impressions per arm.
    min_impressions: int = 2000
    # Fixed horizon: with this many per arm and no significant difference, decide by
    # non-inferiority (the canary's CTR interval must stay above -margin).
    max_impressions: int = 20000
    alpha: float = 0.05  # for both the z-test interval and the always-valid mSPRT p-value
    tau: float = 0.02  # mSPRT mixture scale: the CTR difference (absolute) we care about
    noninferiority_margin: float = 0.01
    srm_alpha: float = 0.001  # the usual SRM alarm level: a broken split, not bad luck
    min_srm_users: int = 50  # below this many users the chi-square is not meaningful
    max_error_rate: float = 0.01  # Triton request failures / requests, canary version
    # p99 latency of the canary vs production: above both ratio x production and production
    # + slack (ms) is a regression (the slack keeps millisecond noise from deciding).
    max_p99_ratio: float = 1.5
    p99_slack_ms: float = 25.0
    # A p99 from fewer requests is the maximum of a handful, dominated by the first calls
    # of a freshly loaded version; compare latencies only past this many per version.
    min_latency_requests: int = 300
    # Online fairness: the canary's min/max CTR ratio across groups of an attribute may not
    # fall below production's by more than this; groups need min_group_impressions each.
    max_group_ratio_drop: float = 0.2
    min_group_impressions: int = 300
    fairness_attributes: tuple[str, ...] = ("gender", "age_bucket")


@dataclass(frozen=True)
class Arm:
    version: int
    impressions: int
    clicks: int
    users: int

    @property
    def ctr(self) -> float:
        return self.clicks / self.impressions if self.impressions else math.nan


@dataclass(frozen=True)
class Guardrail:
    """Triton's own numbers for one retrieval version (canary.prom)."""

    requests: int = 0
    failures: int = 0
    p99_ms: float | None = None

    @property
    def error_rate(self) -> float:
        return self.failures / self.requests if self.requests else 0.0


@dataclass(frozen=True)
class OnlineEvidence:
    production: Arm
    canary: Arm
    z: ZTest | None
    sequential: MSPRT | None
    srm: SRM | None
    guard_production: Guardrail | None = None
    guard_canary: Guardrail | None = None
    # attribute -> {"production": min/max CTR ratio, "canary": ...}; None when too small
    fairness: dict[str, dict[str, float | None]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "production": {**asdict(self.production), "ctr": self.production.ctr},
            "canary": {**asdict(self.canary), "ctr": self.canary.ctr},
            "z_test": self.z.to_dict() if self.z else None,
            "msprt": self.sequential.to_dict() if self.sequential else None,
            "srm": self.srm.to_dict() if self.srm else None,
            "guardrails": {
                name: None if g is None else {**asdict(g), "error_rate": g.error_rate}
                for name, g in (
                    ("production", self.guard_production),
                    ("canary", self.guard_canary),
                )
            },
            "fairness": self.fairness,
        }


def online_decision(ev: OnlineEvidence, gates: OnlineGates) -> Verdict:
    """promote, rollback or continue, first matching rule wins:

    1. guardrails (any time): canary error rate, canary p99 vs production -> rollback;
    2. sample-ratio mismatch of users vs the configured split -> rollback (untrusted split);
    3. fewer than min_impressions in an arm -> continue;
    4. the canary significantly worse (always-valid mSPRT p < alpha) and/or a group-CTR
       ratio drop vs production (online fairness) -> rollback, every reason listed;
    5. the canary significantly better (mSPRT p < alpha) -> promote;
    6. both arms past max_impressions: non-inferior (CI low > -margin) -> promote, else rollback;
    7. otherwise continue.
    """
    checks: list[Check] = []
    gc, gp = ev.guard_canary, ev.guard_production
    if gc is not None and gc.requests:
        ok = gc.error_rate <= gates.max_error_rate
        checks.append(
            Check(
                "error_rate",
                gc.error_rate,
                gates.max_error_rate,
                ok,
                f"canary error rate {gc.error_rate:.4f} ({gc.failures}/{gc.requests}); max "
                f"{gates.max_error_rate}",
            )
        )
    if (
        gc is not None
        and gp is not None
        and gc.p99_ms is not None
        and gp.p99_ms is not None
        and min(gc.requests, gp.requests) >= gates.min_latency_requests
    ):
        limit = max(gp.p99_ms * gates.max_p99_ratio, gp.p99_ms + gates.p99_slack_ms)
        checks.append(
            Check(
                "p99_latency",
                gc.p99_ms,
                limit,
                gc.p99_ms <= limit,
                f"canary p99 {gc.p99_ms:.1f} ms vs production {gp.p99_ms:.1f} ms (limit "
                f"{limit:.1f} ms)",
            )
        )
    users = ev.production.users + ev.canary.users
    if ev.srm is not None and users >= gates.min_srm_users:
        checks.append(
            Check(
                "sample_ratio",
                ev.srm.p_value,
                gates.srm_alpha,
                ev.srm.p_value >= gates.srm_alpha,
                f"users per arm {list(ev.srm.observed)} vs expected "
                f"{[round(x, 1) for x in ev.srm.expected]}: chi2 {ev.srm.chi2:.2f}, "
                f"p {ev.srm.p_value:.2g} (alarm below {gates.srm_alpha})",
            )
        )
    bad = [c.reason for c in checks if not c.passed]
    if bad:
        return Verdict(ROLLBACK, ("guardrail: " + "; ".join(bad),), tuple(checks))

    n_p, n_c = ev.production.impressions, ev.canary.impressions
    if min(n_p, n_c) < gates.min_impressions:
        return Verdict(
            CONTINUE,
            (
                f"waiting for sample: production {n_p}, canary {n_c} impressions; need "
                f"{gates.min_impressions} per arm",
            ),
            tuple(checks),
        )

    for attr, ratios in ev.fairness.items():
        rp, rc = ratios.get("production"), ratios.get("canary")
        if rp is None or rc is None:
            continue
        ok = rc >= rp - gates.max_group_ratio_drop
        checks.append(
            Check(
                f"fairness_{attr}",
                rc,
                rp - gates.max_group_ratio_drop,
                ok,
                f"CTR ratio across {attr} groups: canary {rc:.3f} vs production {rp:.3f} "
                f"(max drop {gates.max_group_ratio_drop})",
            )
        )
    unfair = [c.reason for c in checks if not c.passed]

    z, seq = ev.z, ev.sequential
    ctr_text = (
        f"CTR canary {ev.canary.ctr:.4f} ({ev.canary.clicks}/{n_c}) vs production "
        f"{ev.production.ctr:.4f} ({ev.production.clicks}/{n_p})"
    )
    significant = z is not None and seq is not None and seq.p_value < gates.alpha
    if z is not None and seq is not None:
        checks.append(
            Check(
                "msprt",
                seq.p_value,
                gates.alpha,
                not (significant and z.diff < 0),
                f"{ctr_text}: diff {z.diff:+.4f}, z {z.z:.2f}, p {z.p_value:.3g}, "
                f"always-valid p {seq.p_value:.3g} (alpha {gates.alpha})",
            )
        )
    # A loser and an unfair canary both roll back, with every reason that applies; a canary
    # that wins on CTR but hurts a group is rolled back too (fairness is a guardrail).
    losing = [f"canary loses: {checks[-1].reason}"] if significant and z.diff < 0 else []
    if losing or unfair:
        fair = ["online fairness: " + "; ".join(unfair)] if unfair else []
        return Verdict(ROLLBACK, tuple(losing + fair), tuple(checks))
    if z is not None and seq is not None:
        if significant:
            return Verdict(PROMOTE, (f"canary wins: {checks[-1].reason}",), tuple(checks))
        if min(n_p, n_c) >= gates.max_impressions:
            ok = z.ci_low > -gates.noninferiority_margin
            checks.append(
                Check(
                    "noninferiority",
                    z.ci_low,
                    -gates.noninferiority_margin,
                    ok,
                    f"horizon reached ({gates.max_impressions} per arm), no significant "
                    f"difference; CTR diff CI [{z.ci_low:+.4f}, {z.ci_high:+.4f}] vs margin "
                    f"-{gates.noninferiority_margin}",
                )
            )
            action = PROMOTE if ok else ROLLBACK
            verb = "non-inferior" if ok else "not shown non-inferior"
            return Verdict(action, (f"canary {verb}: {checks[-1].reason}",), tuple(checks))
    return Verdict(
        CONTINUE,
        (
            f"no decision yet: {ctr_text}; always-valid p "
            f"{seq.p_value if seq else math.nan:.3g} >= {gates.alpha}",
        ),
        tuple(checks),
    )


def _num(x: Any) -> float | None:
    """A check's value as stored: a float, or None where it is missing or not finite."""
    return None if x is None else to_jsonable(float(x))
