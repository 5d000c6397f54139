"""`run_audit(cfg)`: a trained run -> consumer and provider fairness numbers.

    AuditInput (ranked lists + users + items + relevance)
      ├─ per-user Recall/NDCG/HitRate@K -> MetricFrame by group (+ numpy bootstrap CIs)
      └─ position-weighted exposure     -> shares vs relevance, DTR, Gini, coverage, ARP, APLT

`audit(inp, cfg)` is the core and takes lists from any source; `run_audit` only adds "rank
the test period with this run". Writing files is `fairness.report`; pass/fail is
`fairness.gates`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fairness import exposure as ex
from fairness.groups import GroupTable, disaggregate
from fairness.inputs import EMPTY, AuditInput, from_run, user_attributes
from training.metrics import hit_matrix, per_user_metrics

log = logging.getLogger(__name__)

INTERSECTION_SEP = "*"  # in configs: "gender*age_bucket"
INTERSECTION_NAME = "×"  # in reports: "gender×age_bucket"
MAX_PAIRWISE_GROUPS = 8  # beyond this the pairwise DTR table is noise to a reader


@dataclass(frozen=True)
class AuditConfig:
    run: str = ""  # RUN_DIR written by `northstar train`
    data: str = ""  # the dataset the run was trained on (its time split is recomputed)
    k: int = 10  # list length users see; metrics, exposure and gates all use this cut
    # 200 resamples put the 2.5% / 97.5% quantiles on ~5 draws each side: stable to about
    # a tenth of the interval's width, and cheap enough to audit every grouping of a large
    # user base in one run (`python -m fairness.bench`; docs/results.md).
    n_boot: int = 200
    ci: float = 0.95
    seed: int = 0  # bootstrap stream; the audit is otherwise deterministic
    # Sensitive attributes audited on their own. One with a single value (e.g. occupation
    # that is all "unknown" in synthetic data) is skipped and named in meta["skipped"].
    attributes: tuple[str, ...] = ("gender", "age_bucket", "activity", "occupation")
    # Crossed attributes: harms that hit e.g. older women can hide in each marginal.
    intersections: tuple[str, ...] = ("gender*age_bucket",)
    # Popularity buckets by share of history interactions (Abdollahpouri et al. 2019):
    # head = the most popular items that hold the first 20%; tail = those holding the last
    # 20% (never-seen items included); mid = the rest. APLT counts mid + tail as long tail.
    head_share: float = 0.2
    tail_share: float = 0.2
    label: str = ""  # name in reports; defaults to the run folder's name

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"AuditConfig.k must be >= 1, got {self.k}")
        if self.n_boot < 0:
            raise ValueError(f"AuditConfig.n_boot must be >= 0, got {self.n_boot}")
        if not 0 < self.ci < 1:
            raise ValueError(f"AuditConfig.ci must be in (0, 1), got {self.ci}")
        shares = (self.head_share, self.tail_share)
        if min(shares) < 0 or sum(shares) > 1:
            raise ValueError("AuditConfig.head_share and tail_share must be >= 0 and sum <= 1")


@dataclass(frozen=True)
class AuditResult:
    meta: dict[str, Any]  # label, k, sizes, source, timings, skipped attributes
    users: dict[str, GroupTable]  # grouping name -> table
    items: dict[str, Any]  # summary, per item-grouping shares and DTR, Lorenz points
    # Per-item numbers (item_id, provider, popularity, bucket, exposure, relevance); only in
    # memory and items.csv, not in audit.json, so a baseline loaded from JSON has None.
    item_table: pd.DataFrame | None = field(default=None, compare=False)

    @property
    def label(self) -> str:
        return str(self.meta.get("label", ""))

    def metric(self, name: str) -> str:
        """'ndcg' -> 'ndcg@10' at this audit's k; full names pass through."""
        return name if "@" in name else f"{name}@{self.meta['k']}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "meta": self.meta,
            "users": {k: v.to_dict() for k, v in self.users.items()},
            "items": self.items,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AuditResult:
        return cls(
            meta=d["meta"],
            users={k: GroupTable.from_dict(v) for k, v in d["users"].items()},
            items=d["items"],
        )


def load_audit(path: str | Path) -> AuditResult:
    """An AuditResult from an audit.json (or the folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "audit.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no audit.json; run `northstar audit` first")
    d = json.loads(path.read_text())
    return AuditResult.from_dict(d.get("audit", d))


def _groupings(
    attrs: pd.DataFrame, cfg: AuditConfig
) -> tuple[dict[str, tuple[str, ...]], dict[str, str]]:
    groupings: dict[str, tuple[str, ...]] = {}
    skipped: dict[str, str] = {}
    for a in cfg.attributes:
        if a not in attrs.columns:
            skipped[a] = "not a column of the users table"
        elif attrs[a].nunique() < 2:
            skipped[a] = f"a single value ({attrs[a].iloc[0]!r}) for every audited user"
        else:
            groupings[a] = (a,)
    for spec in cfg.intersections:
        cols = tuple(c.strip() for c in spec.split(INTERSECTION_SEP))
        name = INTERSECTION_NAME.join(cols)
        bad = [c for c in cols if c not in attrs.columns or attrs[c].nunique() < 2]
        if bad:
            skipped[name] = f"{bad} missing or single-valued"
        else:
            groupings[name] = cols
    return groupings, skipped


def _item_groups(
    codes: np.ndarray, names: list[str], exposure: np.ndarray, relevance: np.ndarray
) -> dict[str, Any]:
    """Exposure vs relevance for one way of grouping items, Singh & Joachims style."""
    n = len(names)
    e_share = ex.group_shares(values=exposure, groups=codes, n_groups=n)
    r_share = ex.group_shares(values=relevance, groups=codes, n_groups=n)
    n_items = np.bincount(codes, minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_rel = np.where(r_share > 0, e_share / np.where(r_share > 0, r_share, 1), np.nan)
    groups = {
        g: {
            "items": int(n_items[j]),
            "exposure_share": float(e_share[j]),
            "relevance_share": float(r_share[j]),
            "exposure_per_relevance": float(per_rel[j]),
        }
        for j, g in enumerate(names)
    }
    finite = [j for j in range(n) if np.isfinite(per_rel[j]) and r_share[j] > 0]
    out: dict[str, Any] = {"groups": groups}
    if len(finite) >= 2:
        lo = min(finite, key=lambda j: per_rel[j])
        hi = max(finite, key=lambda j: per_rel[j])
        # The worst pair: the most under-exposed group against the most over-exposed one.
        out["dtr_min"] = ex.disparate_treatment_ratio(
            exposure_a=e_share[lo],
            relevance_a=r_share[lo],
            exposure_b=e_share[hi],
            relevance_b=r_share[hi],
        )
        out["dtr_min_pair"] = [names[lo], names[hi]]
    else:
        out["dtr_min"], out["dtr_min_pair"] = float("nan"), []
    if n <= MAX_PAIRWISE_GROUPS:
        out["dtr"] = {
            a: {
                b: ex.disparate_treatment_ratio(
                    exposure_a=e_share[i],
                    relevance_a=r_share[i],
                    exposure_b=e_share[j],
                    relevance_b=r_share[j],
                )
                for j, b in enumerate(names)
            }
            for i, a in enumerate(names)
        }
    return out


def audit(inp: AuditInput, cfg: AuditConfig | None = None) -> AuditResult:
    """The audit core: any source of ranked lists in, every fairness number out."""
    cfg = cfg or AuditConfig()
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    k = min(cfg.k, inp.ranked.shape[1])

    # Dense indices over the items table: metrics and exposure work on arrays, not ids.
    item_ids = np.sort(inp.items["item_id"].to_numpy(np.int64))
    n_items = len(item_ids)
    items = inp.items.set_index("item_id").loc[item_ids].reset_index()
    ranked = np.full(inp.ranked.shape, EMPTY, dtype=np.int64)
    full = inp.ranked != EMPTY
    ranked[full] = np.searchsorted(item_ids, inp.ranked[full])

    # Relevance: each held-out (user, item) pair once, for users that have a list.
    rel = inp.relevant[["user_id", "item_id"]].drop_duplicates()
    order = np.argsort(inp.user_ids, kind="stable")
    sorted_users = inp.user_ids[order]
    pos = np.searchsorted(sorted_users, rel["user_id"].to_numpy(np.int64))
    pos_c = np.minimum(pos, max(len(sorted_users) - 1, 0))
    rel_item_pos = np.searchsorted(item_ids, rel["item_id"].to_numpy(np.int64))
    rel_item_pos_c = np.minimum(rel_item_pos, n_items - 1)
    keep = (
        (len(sorted_users) > 0)
        & (sorted_users[pos_c] == rel["user_id"].to_numpy())
        & (item_ids[rel_item_pos_c] == rel["item_id"].to_numpy())
    )
    rel_rows, rel_items = order[pos_c[keep]], rel_item_pos_c[keep]
    n_relevant = np.bincount(rel_rows, minlength=len(inp.user_ids))

    # Only users with something to find are audited, as in training.evaluate.
    audited = n_relevant > 0
    if not audited.any():
        raise ValueError("audit: no user with a list has a relevant (held-out) item")
    row_map = np.cumsum(audited) - 1
    ranked = ranked[audited]
    rel_rows = row_map[rel_rows]
    n_relevant = n_relevant[audited]
    user_ids = inp.user_ids[audited]

    # --- consumer side
    hits = hit_matrix(
        ranked=ranked[:, :k], relevant_users=rel_rows, relevant_items=rel_items, n_items=n_items
    )
    per_user = per_user_metrics(
        hits=hits, n_relevant=n_relevant, recall_ks=(k,), ndcg_ks=(k,), hit_ks=(k,)
    )
    attrs = user_attributes(users=inp.users, user_ids=user_ids)
    groupings, skipped = _groupings(attrs, cfg)
    timings["rank_metrics_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    users = disaggregate(
        per_user=per_user,
        users=attrs,
        groupings=groupings,
        n_boot=cfg.n_boot,
        ci=cfg.ci,
        seed=cfg.seed,
    )
    timings["user_groups_s"] = time.perf_counter() - t1

    # --- provider side
    t2 = time.perf_counter()
    exposure = ex.item_exposure(ranked=ranked, n_items=n_items, k=k)
    relevance = np.bincount(rel_items, minlength=n_items).astype(np.float64)
    popularity = inp.popularity.reindex(item_ids).fillna(0).to_numpy(np.float64)
    bucket = ex.popularity_buckets(
        counts=popularity, head_share=cfg.head_share, tail_share=cfg.tail_share
    )
    provider_codes, provider_names = pd.factorize(items["provider"].astype(str), sort=True)
    lorenz_x, lorenz_y = ex.lorenz_curve(values=exposure)
    summary = {
        "k": k,
        "n_items": n_items,
        "exposure_gini": ex.gini(values=exposure),
        "coverage": ex.catalogue_coverage(ranked=ranked, n_items=n_items, k=k),
        "arp": ex.average_recommendation_popularity(ranked=ranked, popularity=popularity, k=k),
        "aplt": ex.average_percentage_long_tail(ranked=ranked, long_tail=bucket != ex.HEAD, k=k),
        # The same two numbers for the held-out interactions: what users actually chose.
        "relevance_gini": ex.gini(values=relevance),
        "relevant_arp": float(np.average(popularity, weights=relevance))
        if relevance.sum() > 0
        else 0.0,
    }
    item_groups = {
        "provider": _item_groups(
            provider_codes.astype(np.int64), list(map(str, provider_names)), exposure, relevance
        ),
        "popularity": _item_groups(bucket, list(ex.POPULARITY_BUCKETS), exposure, relevance),
    }
    bucket_bounds = {
        b: {
            "items": int((bucket == j).sum()),
            "min_count": float(popularity[bucket == j].min()) if (bucket == j).any() else None,
            "max_count": float(popularity[bucket == j].max()) if (bucket == j).any() else None,
        }
        for j, b in enumerate(ex.POPULARITY_BUCKETS)
    }
    item_table = pd.DataFrame(
        {
            "item_id": item_ids,
            "provider": items["provider"].astype(str).to_numpy(),
            "popularity": popularity,
            "bucket": np.asarray(ex.POPULARITY_BUCKETS, dtype=object)[bucket],
            "exposure": exposure,
            "relevance": relevance,
        }
    )
    timings["items_s"] = time.perf_counter() - t2
    timings["total_s"] = time.perf_counter() - t0

    meta = {
        "label": inp.label,
        "k": k,
        "n_users": int(audited.sum()),
        "n_users_without_relevant": int((~audited).sum()),
        "n_items": n_items,
        "n_relevant_pairs": len(rel_items),
        "n_boot": cfg.n_boot,
        "ci": cfg.ci,
        "metrics": list(per_user),
        "skipped": skipped,
        "source": inp.source,
        "config": asdict(cfg),
        "popularity_buckets": bucket_bounds,
        "timings": {k_: round(v, 3) for k_, v in timings.items()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    items_out = {
        "summary": summary,
        "groups": item_groups,
        "lorenz": {"x": lorenz_x.round(4).tolist(), "y": lorenz_y.round(6).tolist()},
    }
    log.info(
        "audit %s: %d users, %d items in %.1fs",
        inp.label,
        meta["n_users"],
        n_items,
        timings["total_s"],
    )
    return AuditResult(meta=meta, users=users, items=items_out, item_table=item_table)


def run_audit(cfg: AuditConfig) -> AuditResult:
    """Audit a trained run on its test period (history = train + val)."""
    # lazy: torch (training.run); the audit's tables need no model (fairness.bench)
    from training.run import load_run

    if not cfg.run or not cfg.data:
        raise ValueError("run_audit: AuditConfig.run and AuditConfig.data are both required")
    t0 = time.perf_counter()
    run = load_run(cfg.run)
    inp = from_run(run, cfg.data, label=cfg.label or None)
    rank_s = time.perf_counter() - t0
    result = audit(inp, cfg)
    result.meta["timings"]["ranking_s"] = round(rank_s, 3)
    return result
