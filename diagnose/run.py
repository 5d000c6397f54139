"""`diagnose(cfg)`: load, run every analyser, rank, plan, write the report."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from tqdm import tqdm

from diagnose.causes import (
    ANALYSERS,
    Finding,
    ctr,
    drop,
    drop_test,
    input_drift,
    prediction_drift,
    split,
    where,
)
from diagnose.config import DiagnoseConfig
from diagnose.data import CUR, REF, Inputs, load
from diagnose.report import write_report

# A cause enters the plan when it explains at least this share of the drop.
PLAN_MIN_SHARE = 0.2
ONLY_LABELS_SHARE = 0.7
# One-sided level of the drop's significance test: the suite's healthy runs measure how
# often a drop is claimed where there is none.
ALPHA = 0.01


@dataclass
class Diagnosis:
    summary: dict[str, Any]
    findings: list[Finding]  # ranked, largest share first
    plan: list[dict[str, Any]]
    where: dict[str, list[dict]]
    drift: dict[str, Any]
    prediction: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def top(self) -> Finding:
        return self.findings[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "summary": self.summary,
            "ranked_causes": [f.to_dict() for f in self.findings],
            "plan": self.plan,
            "where": self.where,
            "input_drift": self.drift,
            "prediction_drift": self.prediction,
            "config": self.config,
        }


def rank(findings: list[Finding]) -> list[Finding]:
    return sorted(findings, key=lambda f: -f.explained)


def plan(findings: list[Finding], d: float) -> list[dict[str, Any]]:
    out = []
    for f in findings:
        if d <= 0 or f.share_of_drop < PLAN_MIN_SHARE or not f.remediation:
            continue
        out.append(
            {
                "cause": f.cause,
                "action": f.remediation,
                "expected_recovery_ctr": f.expected_recovery,
                "expected_recovery_share": f.expected_recovery / d,
            }
        )
    return out


def analyse(inp: Inputs, *, progress: bool = True) -> Diagnosis:
    ref, cur = split(inp)
    d = drop(inp)
    steps = [*ANALYSERS]
    findings = []
    bar = tqdm(total=len(steps) + 3, desc="diagnose", disable=not progress, unit="step")
    for fn in steps:
        bar.set_postfix_str(fn.__name__)
        found = fn(inp)
        findings.extend(found if isinstance(found, list) else [found])
        bar.update()
    bar.set_postfix_str("where")
    w = where(inp)
    bar.update()
    bar.set_postfix_str("input drift")
    drift = input_drift(inp)
    bar.update()
    pred = prediction_drift(inp)
    bar.update()
    bar.close()
    ranked = rank(findings)
    top = ranked[0]
    test = drop_test(inp, ALPHA)
    significant = test["significant"]
    summary = {
        "north_star": "CTR per impression",
        "reference": {"window": list(inp.windows[REF]), "impressions": len(ref), "ctr": ctr(ref)},
        "current": {"window": list(inp.windows[CUR]), "impressions": len(cur), "ctr": ctr(cur)},
        "drop": d,
        "relative_drop": d / ctr(ref) if ctr(ref) > 0 else math.nan,
        "significant": significant,
        "drop_test": test,
        # No cause is named for a drop the noise explains: that would be a false alarm.
        "top_cause": top.cause if significant else None,
        "headline": headline(ranked, d, test),
        "only_labels": bool(
            significant and top.cause == "label_delay" and top.share_of_drop >= ONLY_LABELS_SHARE
        ),
    }
    return Diagnosis(
        summary=summary,
        findings=ranked,
        plan=plan(ranked, d) if significant else [],
        where=w,
        drift=drift,
        prediction=pred,
        config=asdict(inp.cfg),
    )


def headline(ranked: list[Finding], d: float, test: dict[str, Any] | None = None) -> str:
    if not d > 0:
        return "No drop: the current window's north star is not below the reference."
    if test is not None and not test["significant"]:
        lo, hi = test["ci"]
        return (
            f"No significant drop: CTR fell {d:.4f}, within noise (p = {test['p_value']:.2g}, "
            f"{1 - test['alpha']:.0%} interval {lo:+.4f}..{hi:+.4f}, clustered by user)."
        )
    top = ranked[0]
    if top.cause == "label_delay" and top.share_of_drop >= ONLY_LABELS_SHARE:
        return (
            f"The drop is only labels that have not arrived: late or pending clicks account "
            f"for {top.share_of_drop:.0%} of it. Wait for the labels before acting."
        )
    return f"Top cause: {top.title}, explaining {top.share_of_drop:.0%} of the drop."


def diagnose(cfg: DiagnoseConfig, *, progress: bool = True, write: bool = True) -> Diagnosis:
    inp = load(cfg)
    result = analyse(inp, progress=progress)
    if write:
        write_report(cfg.out, result, inp)
    return result
