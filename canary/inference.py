"""User-level inference for the canary: users are what is randomised, so users are the unit.

A per-impression test treats a user's 20 or 50 impressions as independent trials. They are
not (one slate, one taste), so it understates the variance by the design effect
1 + (m - 1)·ICC and declares differences that are not there. Here every metric is a ratio
of per-user sums (clicks / impressions, engaged value / impressions) and its variance comes
from the delta method over users (Deng, Knoblich & Lu, KDD 2018):

    R      = Σ Y_i / Σ N_i = Ȳ / N̄
    L_i    = R + (Y_i - R·N_i) / N̄            (the linearised metric: mean R, same variance)
    Var(R) ≈ Var(L) / n = (σ_Y² - 2R·σ_YN + R²·σ_N²) / (n·N̄²)

CUPED (Deng, Xu, Kohavi & Walker, WSDM 2013) then removes what each user's behaviour before
the canary started already explains. With a covariate X_i measured before assignment (so
independent of the arm) and θ = Cov(L, X) / Var(X) pooled over both arms:

    Δ_cuped = (R_b - R_a) - θ·(X̄_b - X̄_a)
    Var     = Var_b(L - θX) / n_b + Var_a(L - θX) / n_a

The sequential test is the normal-mixture mSPRT of `canary.stats.msprt` fed these
user-level estimates; `SequentialState` keeps its always-valid p-value with the direction it
was reached in, and the matching always-valid confidence sequence for non-inferiority.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
from scipy.stats import norm

from canary.stats import msprt


@dataclass(frozen=True)
class ArmUsers:
    """One arm, one row per user: the metric's numerator and denominator summed per user."""

    y: np.ndarray  # (n,) clicks (or engaged value) of each user in the test period
    n: np.ndarray  # (n,) impressions of each user in the test period, all > 0
    x: np.ndarray | None = None  # (n,) the CUPED covariate, measured before the canary

    def __post_init__(self) -> None:
        y, n = np.asarray(self.y, np.float64), np.asarray(self.n, np.float64)
        if y.shape != n.shape or y.ndim != 1:
            raise ValueError(f"ArmUsers: y {y.shape} and n {n.shape}; expected equal 1-d shapes")
        if len(n) and (n <= 0).any():
            raise ValueError("ArmUsers: every user needs at least one impression (n > 0)")
        if self.x is not None and np.asarray(self.x).shape != y.shape:
            raise ValueError("ArmUsers: x must have one value per user")

    @property
    def users(self) -> int:
        return len(self.y)

    def rate(self) -> float:
        total = float(np.sum(self.n))
        return float(np.sum(self.y)) / total if total > 0 else float("nan")

    def linearized(self) -> np.ndarray:
        """L_i = R + (Y_i - R·N_i) / N̄: its mean is R and Var(L)/n is the delta variance."""
        y, n = np.asarray(self.y, np.float64), np.asarray(self.n, np.float64)
        r = self.rate()
        return r + (y - r * n) / n.mean()


@dataclass(frozen=True)
class DeltaTest:
    """Canary (b) minus production (a) on a ratio metric, with user-level variance."""

    rate_a: float
    rate_b: float
    diff: float  # rate_b - rate_a, CUPED-adjusted when `cuped`
    se: float
    z: float
    p_value: float  # two-sided, fixed horizon
    ci_low: float
    ci_high: float
    users_a: int
    users_b: int
    impressions_a: int
    impressions_b: int
    # Var(delta method) / Var(as if impressions were independent): how far a per-impression
    # test would have understated the uncertainty.
    design_effect: float
    cuped: bool = False
    theta: float = 0.0
    variance_reduction: float = 0.0  # 1 - Var(cuped) / Var(delta method without CUPED)

    @property
    def var(self) -> float:
        return self.se * self.se

    def to_dict(self) -> dict:
        return asdict(self)


def delta_test(a: ArmUsers, b: ArmUsers, *, alpha: float = 0.05, cuped: bool = True) -> DeltaTest:
    """The fixed-horizon z-test of rate_b - rate_a at user level (module docstring)."""
    if a.users < 2 or b.users < 2:
        raise ValueError(f"delta_test: {a.users} and {b.users} users; expected at least 2 per arm")
    la, lb = a.linearized(), b.linearized()
    var_plain = la.var(ddof=1) / a.users + lb.var(ddof=1) / b.users
    ra, rb = a.rate(), b.rate()
    diff, var, theta, use_cuped = rb - ra, var_plain, 0.0, False
    if cuped and a.x is not None and b.x is not None:
        xa, xb = np.asarray(a.x, np.float64), np.asarray(b.x, np.float64)
        x = np.concatenate([xa, xb])
        if x.var() > 0:
            l_all = np.concatenate([la, lb])
            theta = float(np.cov(l_all, x, ddof=1)[0, 1] / x.var(ddof=1))
            diff = (rb - ra) - theta * (xb.mean() - xa.mean())
            var = (la - theta * xa).var(ddof=1) / a.users + (lb - theta * xb).var(ddof=1) / b.users
            use_cuped = True
    se = math.sqrt(max(var, 0.0))
    z = diff / se if se > 0 else 0.0
    q = float(norm.ppf(1 - alpha / 2))
    na, nb = float(np.sum(a.n)), float(np.sum(b.n))
    naive = ra * (1 - ra) / na + rb * (1 - rb) / nb if 0 <= min(ra, rb) <= max(ra, rb) <= 1 else 0
    return DeltaTest(
        rate_a=ra,
        rate_b=rb,
        diff=float(diff),
        se=se,
        z=float(z),
        p_value=float(2 * norm.sf(abs(z))) if se > 0 else 1.0,
        ci_low=float(diff - q * se),
        ci_high=float(diff + q * se),
        users_a=a.users,
        users_b=b.users,
        impressions_a=int(na),
        impressions_b=int(nb),
        design_effect=float(var_plain / naive) if naive > 0 else float("nan"),
        cuped=use_cuped,
        theta=theta,
        variance_reduction=float(1 - var / var_plain) if use_cuped and var_plain > 0 else 0.0,
    )


def confidence_sequence_halfwidth(*, var: float, tau2: float, alpha: float) -> float:
    """Half-width of the always-valid interval that inverts the normal-mixture mSPRT.

    θ₀ is rejected at level α when Λ(θ₀) ≥ 1/α, i.e. when
        (θ̂ - θ₀)² ≥ (V (V + τ²) / τ²) · (2 ln(1/α) + ln((V + τ²) / V)),
    so θ̂ ± the square root of the right side covers θ at every look with probability
    ≥ 1 - α (Howard, Ramdas et al. 2021; the same mixture as the p-value).
    """
    if var <= 0:
        return 0.0
    return math.sqrt(
        var * (var + tau2) / tau2 * (2 * math.log(1 / alpha) + math.log((var + tau2) / var))
    )


@dataclass(frozen=True)
class SequentialState:
    """The always-valid test across looks: stored with the canary, updated at each look."""

    p_value: float = 1.0  # running minimum of 1/Λ over looks
    direction: int = 0  # sign of the difference at the look that set p_value (+1 canary better)
    ci_low: float = -math.inf  # running intersection of the confidence sequence
    ci_high: float = math.inf
    looks: int = 0
    history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("ci_low", "ci_high"):  # JSON has no infinity
            d[k] = None if math.isinf(d[k]) else d[k]
        return d

    @classmethod
    def from_dict(cls, d: dict | None) -> SequentialState:
        if not d:
            return cls()
        return cls(
            p_value=float(d.get("p_value", 1.0)),
            direction=int(d.get("direction", 0)),
            ci_low=-math.inf if d.get("ci_low") is None else float(d["ci_low"]),
            ci_high=math.inf if d.get("ci_high") is None else float(d["ci_high"]),
            looks=int(d.get("looks", 0)),
            history=list(d.get("history", [])),
        )

    def significant(self, alpha: float) -> bool:
        return self.p_value < alpha


def sequential_update(
    state: SequentialState, *, diff: float, var: float, tau2: float, alpha: float
) -> SequentialState:
    """One more look. The p-value only falls, and it keeps the direction it fell in: an old
    significant loss stays a loss even if the current difference has turned positive."""
    now = msprt(diff=diff, var=var, tau2=tau2).p_value
    p, direction = state.p_value, state.direction
    if now < p:
        p, direction = now, int(np.sign(diff))
    half = confidence_sequence_halfwidth(var=var, tau2=tau2, alpha=alpha)
    lo = max(state.ci_low, diff - half) if var > 0 else state.ci_low
    hi = min(state.ci_high, diff + half) if var > 0 else state.ci_high
    look = {"diff": diff, "var": var, "p_now": now, "ci_low": lo, "ci_high": hi}
    return SequentialState(p, direction, lo, hi, state.looks + 1, [*state.history, look][-50:])


# ---------------------------------------------------------------------------- from labels


def per_user(
    labels: pd.DataFrame, *, versions: tuple[int, int], metric: str = "clicked"
) -> list[tuple[np.ndarray, ArmUsers]]:
    """Per-user sums of `metric` and impressions for production (a) and canary (b), each
    with its user ids.

    `labels`: one row per impression with `user_id`, `model_version` and `metric`. A user
    who saw both versions (a routing change mid-window) is counted in the arm that served
    most of their impressions: the hash assigns users, so an arm is a set of users.
    """
    need = {"user_id", "model_version", metric}
    if missing := need - set(labels.columns):
        raise ValueError(f"per_user: labels lack columns {sorted(missing)}")
    g = labels.groupby(["user_id", "model_version"], sort=False)[metric].agg(["sum", "size"])
    g = g.reset_index().sort_values("size", ascending=False, kind="stable")
    g = g.drop_duplicates("user_id")
    out = []
    for v in versions:
        rows = g[g["model_version"] == v]
        arm = ArmUsers(rows["sum"].to_numpy(np.float64), rows["size"].to_numpy(np.float64))
        out.append((rows["user_id"].to_numpy(np.int64), arm))
    return out


def with_covariate(arm: ArmUsers, user_ids: np.ndarray, pre: pd.Series) -> ArmUsers:
    """Attach the CUPED covariate: each user's pre-period value (`pre`, indexed by user id),
    0 for users with no pre-period history (a constant: still independent of the arm)."""
    x = pre.reindex(user_ids).fillna(0.0).to_numpy(np.float64)
    return ArmUsers(arm.y, arm.n, x)
