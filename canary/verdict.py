"""The online verdict on a canary: promote, roll back or continue, from user-level evidence.

A pure function of numbers, like the offline gates in `canary.decide`: nothing here reads a
file or a server. The evidence is what `canary.online.gather_evidence` measured:

- the north star per arm, aggregated per user (users are what the routing hash randomises),
  with the delta-method z-test and CUPED (`canary.inference`);
- the always-valid sequential state (mSPRT p-value with its direction, the confidence
  sequence), updated at every look;
- the sample-ratio check on users;
- `recommend`'s per-version serving metrics (`canary.guardrails`);
- per-group CTR ratios (online fairness).

Rules, first match wins:
1. a serving guardrail fails (errors or fallbacks significantly above production's or the
   limit, always-valid; latency) -> rollback;
2. the split itself is broken (sample-ratio mismatch on users) -> rollback;
3. the canary is significantly worse (always-valid, in the direction it was reached) or
   hurts a user group (its CTR ratio across groups falls below production's by more than
   the margin, and significantly, always-valid: `canary.group_ratio_ci`) -> rollback,
   every reason listed;
4. the guardrails cannot vouch for the canary yet (no metrics, too few requests) ->
   continue, "cannot decide": nothing is promoted on missing numbers;
5. fewer than `min_users` users in an arm -> continue;
6. significantly better -> promote;
7. both arms past the horizon (`max_impressions`, moved out up to `max_horizon_factor`
   times while the observed variance is too large for the margin, `margin_resolved`), one
   fixed-horizon test: non-inferior (the one-sided lower bound above -margin × production's
   CTR) -> promote; inferior by more than the margin (the upper bound below it) ->
   rollback; neither -> continue, "hold": inconclusive, production keeps the canary at its
   share until a person decides or an always-valid rule fires;
8. otherwise continue.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from statistics import NormalDist
from typing import Any

from canary.decide import CONTINUE, PROMOTE, ROLLBACK, Check, Verdict
from canary.guardrails import GuardrailGates, check_guardrails
from canary.inference import DeltaTest, SequentialState
from canary.stats import SRM
from serving.metrics import VersionMetrics


@dataclass(frozen=True)
class OnlineGates:
    # Per arm, before the CTR comparison may decide (users: the unit of randomisation).
    min_users: int = 200
    min_impressions: int = 2000
    # Fixed horizon: with this many impressions per arm and no significant difference,
    # decide by non-inferiority (`margin_resolved`: later where the margin needs it).
    max_impressions: int = 20000
    alpha: float = 0.05  # the sequential test, the confidence sequence and the fixed test
    tau: float = 0.02  # mSPRT mixture scale: the CTR difference (absolute) we care about
    # Non-inferiority margin, relative to production's CTR: 0.10 = the canary may be at
    # most 10% worse. Tested once, at the horizon, as a fixed-horizon one-sided test at
    # alpha: one look needs no always-valid width, which is wider than the margin there.
    noninferiority_margin: float = 0.10
    # The chance that a canary as good as production is shown non-inferior at the horizon:
    # the horizon moves out until the observed variance allows it (or the cap).
    noninferiority_power: float = 0.99
    # Where the observed variance says max_impressions is too few for the margin, the
    # horizon moves out to the sample it needs, at most this many times max_impressions.
    max_horizon_factor: float = 3.0
    cuped: bool = True  # each user's pre-canary behaviour as the covariate
    srm_alpha: float = 0.001  # the usual SRM alarm level: a broken split, not bad luck
    min_srm_users: int = 50  # below this many users the chi-square is not meaningful
    guardrails: GuardrailGates = field(default_factory=GuardrailGates)
    # Without serving metrics the canary is never promoted ("cannot decide"); False only
    # for offline replays of labels where no server ran.
    require_serving_metrics: bool = True
    # Online fairness: the canary's min/max CTR ratio across groups of an attribute may not
    # fall below production's by more than this, credibly (the user-clustered,
    # bias-corrected, always-valid upper bound of the difference below minus this,
    # canary.group_ratio_ci; the mixture scale is this drop); groups need
    # min_group_impressions each.
    max_group_ratio_drop: float = 0.2
    min_group_impressions: int = 300
    fairness_attributes: tuple[str, ...] = ("gender", "age_bucket")
    # The fairness test's share of the false-rollback budget, split over the attributes.
    fairness_alpha: float = 0.01

    @property
    def fairness_level(self) -> float:
        """The always-valid level of each attribute's fairness bound (Bonferroni)."""
        return self.fairness_alpha / max(1, len(self.fairness_attributes))


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
class OnlineEvidence:
    production: Arm
    canary: Arm
    test: DeltaTest | None  # CTR, user-level delta method (+ CUPED)
    sequential: SequentialState | None  # after this look
    srm: SRM | None
    serving_production: VersionMetrics | None = None
    serving_canary: VersionMetrics | None = None
    # attribute -> {"production": min/max CTR ratio, "canary": ..., "diff_upper": always-valid
    # upper bound of canary - production}; None when too small
    fairness: dict[str, dict[str, float | None]] = field(default_factory=dict)
    value_test: DeltaTest | None = None  # engaged value per impression: reported

    def to_dict(self) -> dict[str, Any]:
        return {
            "production": {**asdict(self.production), "ctr": self.production.ctr},
            "canary": {**asdict(self.canary), "ctr": self.canary.ctr},
            "ctr_test": self.test.to_dict() if self.test else None,
            "value_test": self.value_test.to_dict() if self.value_test else None,
            "sequential": self.sequential.to_dict() if self.sequential else None,
            "srm": self.srm.to_dict() if self.srm else None,
            "serving": {
                "production": self.serving_production.to_dict()
                if self.serving_production
                else None,
                "canary": self.serving_canary.to_dict() if self.serving_canary else None,
            },
            "fairness": self.fairness,
        }


def online_decision(ev: OnlineEvidence, gates: OnlineGates) -> Verdict:
    """promote, rollback or continue (module docstring, rules 1-8)."""
    # A twin may be rolled back by any rule, so each rule that can roll back holds its own
    # level over every look (always-valid tests, or one fixed look at the horizon), and
    # the levels add up to about alpha: the losing side of the mSPRT, fairness_alpha, the
    # horizon's inferiority bound (beyond the margin, so a twin almost never reaches it),
    # and the guardrails' small alarm levels.
    guard = check_guardrails(ev.serving_canary, ev.serving_production, gates.guardrails)
    checks: list[Check] = list(guard.checks)
    if guard.failed:
        return Verdict(
            ROLLBACK, ("guardrail: " + "; ".join(c.reason for c in guard.failed),), tuple(checks)
        )
    users = ev.production.users + ev.canary.users
    if ev.srm is not None and users >= gates.min_srm_users:
        ok = ev.srm.p_value >= gates.srm_alpha
        checks.append(
            Check(
                "sample_ratio",
                ev.srm.p_value,
                gates.srm_alpha,
                ok,
                f"users per arm {list(ev.srm.observed)} vs expected "
                f"{[round(x, 1) for x in ev.srm.expected]}: chi2 {ev.srm.chi2:.2f}, "
                f"p {ev.srm.p_value:.2g} (alarm below {gates.srm_alpha})",
            )
        )
        if not ok:
            return Verdict(ROLLBACK, ("guardrail: " + checks[-1].reason,), tuple(checks))

    unfair = _fairness_checks(ev, gates, checks)
    t, seq = ev.test, ev.sequential
    significant = t is not None and seq is not None and seq.significant(gates.alpha)
    text = _ctr_text(ev)
    if t is not None and seq is not None:
        checks.append(
            Check(
                "sequential",
                seq.p_value,
                gates.alpha,
                not (significant and seq.direction < 0),
                f"{text}; always-valid p {seq.p_value:.3g} ({_DIRECTION[seq.direction]}, "
                f"alpha {gates.alpha}, look {seq.looks})",
            )
        )
    losing = [f"canary loses: {checks[-1].reason}"] if significant and seq.direction < 0 else []
    if losing or unfair:
        fair = ["online fairness: " + "; ".join(unfair)] if unfair else []
        return Verdict(ROLLBACK, tuple(losing + fair), tuple(checks))

    if not guard.decidable and gates.require_serving_metrics:
        return Verdict(CONTINUE, (f"cannot decide: {guard.why_not}",), tuple(checks))
    a, b = ev.production, ev.canary
    if min(a.users, b.users) < gates.min_users or min(a.impressions, b.impressions) < (
        gates.min_impressions
    ):
        return Verdict(
            CONTINUE,
            (
                f"waiting for sample: production {a.users} users / {a.impressions} impressions, "
                f"canary {b.users} / {b.impressions}; need {gates.min_users} users and "
                f"{gates.min_impressions} impressions per arm",
            ),
            tuple(checks),
        )
    if t is None or seq is None:
        return Verdict(CONTINUE, ("no CTR comparison yet",), tuple(checks))
    if significant and seq.direction > 0:
        return Verdict(PROMOTE, (f"canary wins: {checks[-1].reason}",), tuple(checks))
    n_now = min(a.impressions, b.impressions)
    if n_now >= gates.max_impressions:
        margin = gates.noninferiority_margin * t.rate_a
        z = _Z.inv_cdf(1 - gates.alpha)
        cap = math.ceil(gates.max_horizon_factor * gates.max_impressions)
        if not margin_resolved(t.se, margin, gates) and n_now < cap:
            return Verdict(
                CONTINUE,
                (
                    f"horizon extended (up to {cap} impressions per arm): at the observed "
                    f"standard error {t.se:.4f} a canary as good as production would not be "
                    f"shown within the {gates.noninferiority_margin:.0%} margin ({margin:.4f}) "
                    f"with power {gates.noninferiority_power:.0%}; {text}",
                ),
                tuple(checks),
            )
        low, high = t.diff - z * t.se, t.diff + z * t.se
        ok = low > -margin
        worse = high < -margin
        checks.append(
            Check(
                "noninferiority",
                low,
                -margin,
                not worse,
                f"horizon reached ({n_now} impressions per arm), no significant difference "
                f"on the always-valid test; fixed-horizon one-sided {1 - gates.alpha:.0%} bounds "
                f"of the CTR diff [{low:+.4f}, {high:+.4f}] (diff {t.diff:+.4f}, se "
                f"{t.se:.4f}) vs margin -{margin:.4f} ({gates.noninferiority_margin:.0%} of "
                f"production's {t.rate_a:.4f})",
            )
        )
        if ok:
            return Verdict(PROMOTE, (f"canary non-inferior: {checks[-1].reason}",), tuple(checks))
        if worse:
            return Verdict(
                ROLLBACK,
                (f"canary inferior by more than the margin: {checks[-1].reason}",),
                tuple(checks),
            )
        return Verdict(
            CONTINUE,
            (f"hold, inconclusive at the horizon (not shown non-inferior): {checks[-1].reason}",),
            tuple(checks),
        )
    return Verdict(
        CONTINUE,
        (f"no decision yet: {text}; always-valid p {seq.p_value:.3g} >= {gates.alpha}",),
        tuple(checks),
    )


def margin_resolved(se: float, margin: float, gates: OnlineGates) -> bool:
    """Whether the observed standard error is small enough for the horizon test: a canary as
    good as production is shown within the margin with probability `noninferiority_power`
    when (z_(1-α) + z_power) · se <= margin. Decided on the variance only, never on the
    difference (an internal pilot), so the one test at the horizon keeps its level."""
    z = _Z.inv_cdf(1 - gates.alpha) + _Z.inv_cdf(gates.noninferiority_power)
    return z * se <= margin


_Z = NormalDist()  # the standard normal (statistics' is far lighter per call than scipy's)
_DIRECTION = {1: "canary better", -1: "canary worse", 0: "no direction yet"}


def _ctr_text(ev: OnlineEvidence) -> str:
    a, b, t = ev.production, ev.canary, ev.test
    head = (
        f"CTR canary {b.ctr:.4f} ({b.clicks}/{b.impressions}, {b.users} users) vs production "
        f"{a.ctr:.4f} ({a.clicks}/{a.impressions}, {a.users} users)"
    )
    if t is None:
        return head
    cuped = f", CUPED -{t.variance_reduction:.0%} variance" if t.cuped else ""
    return (
        f"{head}: diff {t.diff:+.4f} [{t.ci_low:+.4f}, {t.ci_high:+.4f}], z {t.z:.2f}, "
        f"fixed p {t.p_value:.3g}, design effect {t.design_effect:.2f}{cuped}"
    )


def _fairness_checks(ev: OnlineEvidence, gates: OnlineGates, checks: list[Check]) -> list[str]:
    unfair = []
    if min(ev.production.impressions, ev.canary.impressions) < gates.min_impressions:
        return unfair
    for attr, ratios in ev.fairness.items():
        rp, rc = ratios.get("production"), ratios.get("canary")
        if rp is None or rc is None:
            continue
        upper = ratios.get("diff_upper")
        material = rc < rp - gates.max_group_ratio_drop
        # Without an interval (evidence from before it existed) the point estimate decides.
        # Credibly worse than production by more than the margin, not merely below it.
        significant = upper is None or upper < -gates.max_group_ratio_drop
        ok = not (material and significant)
        bound = "" if upper is None else f"; upper bound of the difference {upper:+.3f}"
        noise = " (not significant: kept)" if material and not significant else ""
        checks.append(
            Check(
                f"fairness_{attr}",
                rc,
                rp - gates.max_group_ratio_drop,
                ok,
                f"CTR ratio across {attr} groups: canary {rc:.3f} vs production {rp:.3f} "
                f"(max drop {gates.max_group_ratio_drop}{bound}){noise}",
            )
        )
        if not ok:
            unfair.append(checks[-1].reason)
    return unfair
