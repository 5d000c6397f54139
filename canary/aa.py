"""A/A calibration of the online verdict: simulated canaries that are production's twin.

Production routes `canary_percent` of users to a canary and looks at it at every poll until
`canary.verdict.online_decision` decides, with `OnlineGates`' defaults: CUPED on, τ 0.02,
the always-valid mSPRT at α, non-inferiority at the horizon, the sample-ratio check, the
serving guardrails and online fairness. Here both arms draw every number from the same
distributions, so every rollback is a false rollback and every "canary wins" a false
promote. One simulated run:

- a population of users, each hashed to the canary with probability canary_percent/100,
  with a gender and an age bucket (the synthetic world's shares) and a click propensity:
  Beta around `ctr` times a factor of their groups, the same in both arms;
- a pre-period of impressions and clicks per user, the CUPED covariate, built as
  `canary.online._pre_period` builds it (0 for users without one);
- looks: before each, every user makes Poisson(`visits_per_look`) requests of `k`
  impressions with Binomial clicks. The evidence is built from the cumulative per-user sums
  with the functions `canary.online.gather_evidence` calls (`delta_test`,
  `sequential_update`, `srm_chi2`, `ratio_diff_upper`), and serving metrics drawn from one
  latency and error distribution for both arms;
- the verdict is the first promote or rollback; a run that reaches `max_looks` undecided
  is counted as such. The sequential statistics go on to the horizon whatever the verdict
  did, so the test's own type-I error is measured on its own.

`python -m canary.aa --runs 2000` prints the rates as JSON (`AAResult.to_dict`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
from scipy.stats import beta as beta_dist
from scipy.stats import binom

from canary.decide import CONTINUE, PROMOTE, ROLLBACK
from canary.group_ratio_ci import ratio_diff_upper
from canary.inference import ArmUsers, SequentialState, delta_test, sequential_update
from canary.stats import srm_chi2
from canary.verdict import Arm, OnlineEvidence, OnlineGates, online_decision
from serving.metrics import LATENCY_BUCKETS_MS, VersionMetrics
from training.synth import AGE_BUCKETS, AGE_SHARES, GENDER_SHARES, GENDERS

PRODUCTION_VERSION, CANARY_VERSION = 1, 2
BOUNDS = np.array([*LATENCY_BUCKETS_MS, np.inf], dtype=np.float64)


@dataclass(frozen=True)
class AAConfig:
    runs: int = 500
    seed: int = 0
    gates: OnlineGates = field(default_factory=OnlineGates)  # what production runs
    canary_percent: int = 10  # canary.pipeline.RetrainConfig's default
    users: int = 5000
    ctr: float = 0.08  # mean click propensity per impression
    concentration: float = 20.0  # Beta(a, b) with a + b = this: users differ in taste
    # Per-group CTR factors (same in both arms): the groups differ, as real ones do.
    gender_factor: tuple[float, ...] = (1.0, 0.9, 0.8)
    age_factor: tuple[float, ...] = (1.2, 1.1, 1.0, 0.9, 0.8)
    k: int = 10  # impressions per request (a slate)
    visits_per_look: float = 0.2  # requests per user between two looks
    pre_share: float = 0.7  # users with a pre-period (the CUPED covariate)
    pre_visits: float = 2.0  # their requests before the canary started
    # Past the nominal horizon the verdict may move it out (`margin_resolved`), so
    # the looks go on until at least max_horizon_factor horizons.
    max_looks: int = 90
    # 1: A/A. Below 1 the canary's users click less after the start: the check that the
    # harness can see a real loss at all.
    canary_ctr_factor: float = 1.0
    # Not A/A: the canary multiplies one group's CTR by a factor, (attribute, group index,
    # factor), and scales the attribute's other groups so that its mean CTR stays
    # production's: a canary as good overall that is unfair, which only fairness can see.
    canary_group_factor: tuple[str, int, float] | None = None
    latency_ms: float = 20.0  # lognormal median, both arms
    latency_sigma: float = 0.4
    error_rate: float = 0.001  # failed requests, both arms
    canary_error_rate: float | None = None  # not A/A: the canary's own (None: error_rate)

    def __post_init__(self) -> None:
        if not 0 < self.canary_percent < 100:
            raise ValueError(f"canary_percent={self.canary_percent}; expected 1..99")
        if self.runs < 1 or self.users < 10:
            raise ValueError(f"runs={self.runs}, users={self.users}; expected >= 1 and >= 10")


@dataclass(frozen=True)
class RunOutcome:
    action: str  # promote | rollback | continue (undecided after max_looks)
    rule: str  # the deciding check: sequential, noninferiority, sample_ratio, ... or "none"
    look: int  # the look that decided (max_looks when undecided)
    sequential_rejected: bool  # the always-valid p fell below alpha at any look to the horizon
    sequential_direction: int
    cs_excluded_zero: bool  # the confidence sequence left out 0 at some look
    fixed_rejected: bool | None  # the fixed-horizon z-test at the horizon (None: not reached)


@dataclass
class AAResult:
    config: dict
    runs: int
    outcomes: dict[str, int]  # "promote: sequential", "rollback: fairness_gender", ...
    false_promote: int  # promoted because the canary "wins"
    false_rollback: int  # every rollback: the canary is production's twin
    promote_noninferior: int
    undecided: int
    sequential_rejected: int  # always-valid test, either direction, to the horizon
    cs_excluded_zero: int
    fixed_rejected: int  # fixed-horizon test at the horizon (looked at once)
    fixed_runs: int  # runs that reached the horizon
    mean_decision_look: float
    alpha: float

    def rate(self, count: int, n: int | None = None) -> float:
        n = self.runs if n is None else n
        return count / n if n else math.nan

    def to_dict(self) -> dict:
        d = asdict(self)
        rates = {
            "false_promote": (self.false_promote, self.runs),
            "false_rollback": (self.false_rollback, self.runs),
            "promote_noninferior": (self.promote_noninferior, self.runs),
            "undecided": (self.undecided, self.runs),
            "sequential_type1": (self.sequential_rejected, self.runs),
            "confidence_sequence_miss": (self.cs_excluded_zero, self.runs),
            "fixed_horizon_type1": (self.fixed_rejected, self.fixed_runs),
        }
        d["rates"] = {
            k: {"rate": self.rate(c, n), "ci95": list(clopper_pearson(c, n)), "count": c, "n": n}
            for k, (c, n) in rates.items()
        }
        return d


def clopper_pearson(count: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact two-sided binomial interval of a rate."""
    if n <= 0:
        return (math.nan, math.nan)
    a = (1 - level) / 2
    lo = 0.0 if count == 0 else float(beta_dist.ppf(a, count, n - count + 1))
    hi = 1.0 if count == n else float(beta_dist.ppf(1 - a, count + 1, n - count))
    return lo, hi


def max_count_under(alpha: float, n: int, *, miss: float = 0.001) -> int:
    """The largest count of n runs that a true rate of `alpha` exceeds with probability at
    most `miss` (one-sided binomial): a count above it says the rate is above alpha."""
    return int(binom.ppf(1 - miss, n, alpha))


# ---------------------------------------------------------------------------- one run


@dataclass
class _World:
    canary: np.ndarray  # (U,) bool
    p: np.ndarray  # (U,) click propensity per impression
    groups: dict[str, tuple[tuple[str, ...], np.ndarray]]  # attribute -> (names, (U,) codes)
    x: np.ndarray  # (U,) CUPED covariate


def _world(cfg: AAConfig, rng: np.random.Generator) -> _World:
    u = cfg.users
    canary = rng.random(u) < cfg.canary_percent / 100
    gender = rng.choice(len(GENDERS), size=u, p=GENDER_SHARES)
    age = rng.choice(len(AGE_BUCKETS), size=u, p=AGE_SHARES)
    a = cfg.ctr * cfg.concentration
    base = rng.beta(a, cfg.concentration - a, u)
    factor = np.asarray(cfg.gender_factor)[gender] * np.asarray(cfg.age_factor)[age]
    p = np.clip(base * factor, 0, 1)
    # Pre-period: what canary.online._pre_period computes from the labels before the start.
    has_pre = rng.random(u) < cfg.pre_share
    pre_n = np.where(has_pre, (rng.poisson(cfg.pre_visits, u) + 1) * cfg.k, 0)
    pre_y = rng.binomial(pre_n, p)
    seen = pre_n > 0
    x = np.zeros(u)
    if seen.any():
        r = pre_y[seen].sum() / pre_n[seen].sum()
        x[seen] = (pre_y[seen] - r * pre_n[seen]) / pre_n[seen].mean()
    groups = {"gender": (GENDERS, gender), "age_bucket": (AGE_BUCKETS, age)}
    shift = np.where(canary, cfg.canary_ctr_factor, 1.0)
    if cfg.canary_group_factor is not None:
        attr, group, f = cfg.canary_group_factor
        hit = groups[attr][1] == group
        rest = (p.sum() - f * p[hit].sum()) / p[~hit].sum()  # keeps the mean propensity
        shift = shift * np.where(canary, np.where(hit, f, rest), 1.0)
    p_test = np.clip(p * shift, 0, 1)
    return _World(canary, p_test, groups, x)


def _serving(
    cfg: AAConfig, requests: int, rng: np.random.Generator, m: VersionMetrics, error_rate: float
) -> None:
    """Add `requests` requests from the latency distribution both arms share."""
    failed = int(rng.binomial(requests, error_rate))
    lat = rng.lognormal(math.log(cfg.latency_ms), cfg.latency_sigma, requests - failed)
    m.requests += requests
    if failed:
        m.errors["failed"] = m.errors.get("failed", 0) + failed
    m.latency_counts = m.latency_counts + np.bincount(
        np.searchsorted(BOUNDS, lat), minlength=len(BOUNDS)
    )[: len(BOUNDS)].astype(np.float64)


def _fairness(
    w: _World, y: np.ndarray, n: np.ndarray, gates: OnlineGates
) -> dict[str, dict[str, float | None]]:
    """canary.online.group_ratios on per-user sums: per attribute and arm the min/max CTR
    across groups with enough impressions, and the bootstrap bound of the difference.

    The bound can change the verdict only where the drop is material (canary.verdict rolls
    back on material and significant), so it is computed only there: the bootstrap is most
    of a look's cost, and elsewhere the check passes whatever the bound says."""
    out: dict[str, dict[str, float | None]] = {}
    active = n > 0
    for attr in gates.fairness_attributes:
        names, codes = w.groups[attr]
        arms = {"production": ~w.canary & active, "canary": w.canary & active}
        eligible, ratio = {}, {}
        for arm, mask in arms.items():
            clicks = np.bincount(codes[mask], weights=y[mask], minlength=len(names))
            imps = np.bincount(codes[mask], weights=n[mask], minlength=len(names))
            ok = imps >= gates.min_group_impressions
            eligible[arm] = sorted(str(x) for x in np.asarray(names)[ok])
            ctrs = clicks[ok] / imps[ok]
            good = len(ctrs) >= 2 and ctrs.max() > 0
            ratio[arm] = float(ctrs.min() / ctrs.max()) if good else None
        out[attr] = dict(ratio)
        rp, rc = ratio["production"], ratio["canary"]
        if rp is None or rc is None or rc >= rp - gates.max_group_ratio_drop:
            continue
        rows = {
            arm: pd.DataFrame(
                {"group": np.asarray(names)[codes[m]], "clicks": y[m], "impressions": n[m]}
            )
            for arm, m in arms.items()
        }
        out[attr]["diff_upper"] = ratio_diff_upper(
            rows["production"],
            rows["canary"],
            groups_production=eligible["production"],
            groups_canary=eligible["canary"],
            alpha=gates.fairness_level,
            tau=gates.max_group_ratio_drop,
        )
    return out


def _evidence(
    cfg: AAConfig,
    w: _World,
    y: np.ndarray,
    n: np.ndarray,
    seq: SequentialState,
    serving: tuple[VersionMetrics, VersionMetrics],
    with_fairness: bool,
) -> OnlineEvidence:
    g = cfg.gates
    active = n > 0
    ia, ib = ~w.canary & active, w.canary & active
    ua = ArmUsers(y[ia], n[ia], w.x[ia] if g.cuped else None)
    ub = ArmUsers(y[ib], n[ib], w.x[ib] if g.cuped else None)
    a = Arm(PRODUCTION_VERSION, int(n[ia].sum()), int(y[ia].sum()), ua.users)
    b = Arm(CANARY_VERSION, int(n[ib].sum()), int(y[ib].sum()), ub.users)
    test = None
    if min(ua.users, ub.users) >= 2:
        test = delta_test(ua, ub, alpha=g.alpha, cuped=g.cuped)
    srm = None
    if a.users + b.users > 0:
        pct = cfg.canary_percent
        srm = srm_chi2(observed=[a.users, b.users], shares=[100 - pct, pct])
    fairness = _fairness(w, y, n, g) if with_fairness else {}
    return OnlineEvidence(
        a, b, test, seq if test is not None else None, srm, serving[0], serving[1], fairness
    )


def simulate_run(cfg: AAConfig, rng: np.random.Generator, *, verdict: bool = True) -> RunOutcome:
    """One A/A canary: looks until the verdict decides; the sequential test to the horizon.
    verdict=False: the statistics alone (delta method, CUPED, mSPRT, confidence sequence)."""
    g = cfg.gates
    w = _world(cfg, rng)
    y = np.zeros(cfg.users)
    n = np.zeros(cfg.users)
    seq = SequentialState()
    serving = (
        VersionMetrics(0, {}, BOUNDS, np.zeros(len(BOUNDS))),
        VersionMetrics(0, {}, BOUNDS, np.zeros(len(BOUNDS))),
    )
    decided: tuple[str, str, int] | None = None
    ever, direction, cs_miss, fixed = False, 0, False, None
    for look in range(1, cfg.max_looks + 1):
        visits = rng.poisson(cfg.visits_per_look, cfg.users)
        imps = visits * cfg.k
        n += imps
        y += rng.binomial(imps, w.p)
        if verdict:
            canary_errors = (
                cfg.error_rate if cfg.canary_error_rate is None else cfg.canary_error_rate
            )
            rates = (cfg.error_rate, canary_errors)
            for m, arm, e in zip(serving, (~w.canary, w.canary), rates, strict=True):
                _serving(cfg, int((visits[arm] > 0).sum()), rng, m, e)
        ev = _evidence(cfg, w, y, n, seq, serving, with_fairness=verdict and decided is None)
        if ev.test is not None:
            seq = sequential_update(
                seq, diff=ev.test.diff, var=ev.test.var, tau2=g.tau**2, alpha=g.alpha
            )
            ev = OnlineEvidence(
                ev.production, ev.canary, ev.test, seq, ev.srm,
                ev.serving_production, ev.serving_canary, ev.fairness,
            )  # fmt: skip
            if seq.significant(g.alpha) and not ever:
                ever, direction = True, seq.direction
            cs_miss = cs_miss or seq.ci_low > 0 or seq.ci_high < 0
        if verdict and decided is None:
            v = online_decision(ev, g)
            if v.action != CONTINUE:
                failed = v.failures
                rule = failed[0].name if failed else v.checks[-1].name if v.checks else "none"
                decided = (v.action, rule, look)
        horizon = min(ev.canary.impressions, ev.production.impressions) >= g.max_impressions
        if horizon and ev.test is not None and fixed is None:  # the one look at the horizon
            fixed = ev.test.p_value < g.alpha
        if (decided is not None or not verdict) and horizon:
            break
    action, rule, at = decided or (CONTINUE, "none", cfg.max_looks)
    return RunOutcome(action, rule, at, ever, direction, cs_miss, fixed)


def _one(cfg: AAConfig, i: int, verdict: bool) -> RunOutcome:
    return simulate_run(cfg, np.random.default_rng([cfg.seed, i]), verdict=verdict)


def run_aa(cfg: AAConfig, *, verdict: bool = True, jobs: int = 1) -> AAResult:
    """`cfg.runs` A/A canaries, each on its own seed (cfg.seed, run index); verdict=False:
    the statistics alone, every run to the horizon (no verdict outcomes). `jobs` processes
    share the runs; each run's seed is its own, so the result does not depend on them."""
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            outs = list(
                pool.map(_one, *zip(*((cfg, i, verdict) for i in range(cfg.runs)), strict=True))
            )
    else:
        outs = [_one(cfg, i, verdict) for i in range(cfg.runs)]
    counts = Counter(f"{o.action}: {o.rule}" for o in outs)
    decided = [o.look for o in outs if o.action != CONTINUE]
    fixed = [o.fixed_rejected for o in outs if o.fixed_rejected is not None]
    cfg_dict = asdict(cfg)
    return AAResult(
        config=cfg_dict,
        runs=cfg.runs,
        outcomes=dict(sorted(counts.items())),
        false_promote=sum(o.action == PROMOTE and o.rule == "sequential" for o in outs),
        false_rollback=sum(o.action == ROLLBACK for o in outs),
        promote_noninferior=sum(o.action == PROMOTE and o.rule == "noninferiority" for o in outs),
        undecided=sum(o.action == CONTINUE for o in outs),
        sequential_rejected=sum(o.sequential_rejected for o in outs),
        cs_excluded_zero=sum(o.cs_excluded_zero for o in outs),
        fixed_rejected=sum(fixed),
        fixed_runs=len(fixed),
        mean_decision_look=float(np.mean(decided)) if decided else math.nan,
        alpha=cfg.gates.alpha,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m canary.aa", description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=AAConfig.runs)
    p.add_argument("--seed", type=int, default=AAConfig.seed)
    p.add_argument("--statistics-only", action="store_true", help="no verdict: the tests alone")
    p.add_argument("--jobs", type=int, default=1, help="processes (the result is the same)")
    args = p.parse_args(argv)
    cfg = AAConfig(runs=args.runs, seed=args.seed)
    res = run_aa(cfg, verdict=not args.statistics_only, jobs=args.jobs)
    json.dump(res.to_dict(), sys.stdout, indent=1, default=str)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
