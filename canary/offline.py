"""Offline comparison of a candidate run with the production run, on the same newest slice.

Both models rank the same users with the same history (the candidate's training data:
train + feedback positives + val) against the same target (the test split: the newest
time slice of the data), through `training.evaluate.evaluate`, the code path training
reports with. On top of the accuracy metrics:

- churn: mean top-K overlap |top-K(candidate) ∩ top-K(production)| / K over those users;
- popularity bias: ARP and exposure Gini from `fairness.audit` of each model's lists;
- the fairness audit of the candidate gated against production's (`check_gates`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fairness.audit import AuditConfig, AuditResult, audit
from fairness.gates import GateConfig, GateResult, check_gates, compare
from fairness.inputs import EMPTY, make_audit_input
from fairness.report import write_report
from training.evaluate import EvalResult, evaluate
from training.run import Run
from training.schema import Dataset
from training.train import TrainConfig, load_training_data


@dataclass(frozen=True)
class OfflineReport:
    candidate: dict[str, float]  # metric -> value on the slice
    production: dict[str, float]
    toppop: dict[str, float]
    overlap: float  # mean top-K overlap, candidate vs production
    k: int
    users: int
    bias: dict[str, float]  # candidate {"arp", "exposure_gini", "coverage", "aplt"}
    production_bias: dict[str, float]
    fairness: GateResult
    candidate_audit: AuditResult
    production_audit: AuditResult
    report_dir: Path | None = None

    def evidence(self) -> dict[str, Any]:
        return {
            "slice": "test split (newest time slice), history = train + feedback + val",
            "users": self.users,
            "k": self.k,
            "candidate": self.candidate,
            "production": self.production,
            "toppop": self.toppop,
            "topk_overlap": self.overlap,
            "churn": 1 - self.overlap,
            "bias": {"candidate": self.bias, "production": self.production_bias},
            "fairness": {"passed": self.fairness.passed, "reasons": self.fairness.reasons},
        }


def raw_ranked(res: EvalResult, run: Run, k: int) -> np.ndarray:
    """(U, k) raw item ids of an EvalResult's dense ranking, EMPTY where short."""
    r = res.ranked[:, :k]
    return np.where(r >= 0, run.vocab.item_ids[np.maximum(r, 0)], EMPTY)


def topk_overlap(*, a: np.ndarray, b: np.ndarray) -> float:
    """Mean over rows of |set(a_u) ∩ set(b_u)| / K, rows aligned (same users); EMPTY ignored."""
    if a.shape != b.shape:
        raise ValueError(f"topk_overlap: shapes {a.shape} and {b.shape} differ")
    if a.size == 0:
        return float("nan")
    k = a.shape[1]
    same = (a[:, :, None] == b[:, None, :]) & (a[:, :, None] != EMPTY)  # (U, K, K)
    return float(same.any(axis=2).sum(axis=1).mean() / k)


def compare_offline(
    *,
    candidate: Run,
    production: Run,
    train_cfg: TrainConfig,
    k: int = 10,
    gates: GateConfig | None = None,
    n_boot: int = 50,
    report_dir: str | Path | None = None,
    dataset: Dataset | None = None,
) -> OfflineReport:
    """Rank the newest slice with both runs; accuracy, churn, bias and fairness.

    `dataset`: `train_cfg.data` already in memory, when the caller has it.
    """
    ds, sp, train_df = load_training_data(train_cfg, dataset)
    known = pd.concat([train_df, sp.val], ignore_index=True).sort_values("timestamp", kind="stable")
    target = sp.test
    res_c = evaluate(
        model=candidate.model, vocab=candidate.vocab, users=ds.users, known=known, target=target
    )
    res_p = evaluate(
        model=production.model, vocab=production.vocab, users=ds.users, known=known, target=target
    )
    mc, mp = res_c["model"], res_p["model"]
    if not np.array_equal(mc.user_ids, mp.user_ids):
        # Different catalogues drop different target rows; compare on the common users.
        common = np.intersect1d(mc.user_ids, mp.user_ids)
        rc = raw_ranked(mc, candidate, k)[np.isin(mc.user_ids, common)]
        rp = raw_ranked(mp, production, k)[np.isin(mp.user_ids, common)]
    else:
        common, rc, rp = mc.user_ids, raw_ranked(mc, candidate, k), raw_ranked(mp, production, k)
    overlap = topk_overlap(a=rc, b=rp)

    cfg = AuditConfig(k=k, n_boot=n_boot)
    audits = {}
    for name, res, run in (("candidate", mc, candidate), ("production", mp, production)):
        inp = make_audit_input(
            user_ids=res.user_ids,
            ranked_item_ids=raw_ranked(res, run, k),
            dataset=ds,
            history=known,
            target=target,
            label=name,
            source={"kind": "run", "run": str(run.path), "split": "test"},
        )
        audits[name] = audit(inp, replace(cfg, label=name))
    gate_cfg = gates or GateConfig()
    gate_cfg = replace(gate_cfg, metric=f"{gate_cfg.metric.split('@')[0]}@{k}")
    fairness = check_gates(audits["candidate"], gate_cfg, baseline=audits["production"])
    out = None
    if report_dir is not None:
        out = Path(report_dir)
        write_report(
            out,
            audits["candidate"],
            fairness,
            compare(audits["candidate"], audits["production"]),
        )

    def bias(a: AuditResult) -> dict[str, float]:
        s = a.items["summary"]
        return {key: float(s[key]) for key in ("arp", "exposure_gini", "coverage", "aplt")}

    return OfflineReport(
        candidate=_summary(mc),
        production=_summary(mp),
        toppop=_summary(res_c["toppop"]),
        overlap=overlap,
        k=k,
        users=len(common),
        bias=bias(audits["candidate"]),
        production_bias=bias(audits["production"]),
        fairness=fairness,
        candidate_audit=audits["candidate"],
        production_audit=audits["production"],
        report_dir=out,
    )


def _summary(res: EvalResult) -> dict[str, float]:
    return {m: float(v) for m, v in res.summary.items()}
