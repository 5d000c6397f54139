"""What the stability term buys: churn and accuracy of a retrain, with and without it.

The same loop feedback as `northstar simulate tiers` (simulated traffic on one clock, the
real join at a cut), the same warm fine-tune of the production run on the final
positives, once per stability weight (`TrainConfig.stability_weight`; 0 = off). Each
candidate is compared with production exactly as the retrain's offline gates compare
them (`canary.offline.compare_offline`: both rank the newest slice with the same
history): accuracy on that slice and the top-K overlap the churn guardrail reads
(`OfflineGates.min_topk_overlap`). Neither side has a popularity prior in this comparison:
the term holds the learned scores, and a prior picked per run would move the lists too.

    northstar stability-study --dir reports/stability [--set weights=0,0.5,2 requests=20000]
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from canary.decide import OfflineGates
from canary.offline import compare_offline
from common.files import atomic_write_text
from feedback.tiers import TierConfig, export_tiered
from studies.config import StabilityStudyConfig
from studies.label_tiers import study_feedback, warm_finetune
from training.run import load_run
from training.train import train


def run_study(cfg: StabilityStudyConfig, progress=None) -> dict[str, Any]:
    t0 = time.perf_counter()
    root, data, prod_dir, labels, joined = study_feedback(cfg)
    extra = root / "positives.parquet"
    counts = export_tiered(labels, extra, "final", TierConfig(weak_weight=1.0))
    if progress:
        progress(f"feedback: {counts['positives']} final positives")
    base = warm_finetune(
        cfg, data, prod_dir, extra_interactions=str(extra), stability_k=cfg.k, baselines=("toppop",)
    )
    production = load_run(prod_dir)
    # Churn of what the term holds: the learned scores. Production's popularity prior is
    # taken off its ranking here, as the candidates are trained and ranked without one
    # (a prior chosen per run would move the lists for reasons of its own).
    production.model.set_prior(None)
    gate = OfflineGates().min_topk_overlap
    arms = []
    for w in cfg.weights:
        out = root / "runs" / f"stability-{w:g}"
        train(replace(base, out=str(out), stability_weight=w))
        rep = compare_offline(
            candidate=load_run(out), production=production, train_cfg=base, k=cfg.eval_k
        )
        metric = f"ndcg@{cfg.eval_k}"
        arms.append(
            {
                "stability_weight": w,
                metric: rep.candidate[metric],
                "production_" + metric: rep.production[metric],
                "topk_overlap": rep.overlap,
                "churn": 1 - rep.overlap,
                "passes_churn_gate": rep.overlap >= gate,
                "users": rep.users,
            }
        )
        if progress:
            progress(f"stability {w:g}: {arms[-1]}")
    result = {
        "config": asdict(cfg),
        "positives": counts,
        "join": {"final": joined.labels_written, "pending": joined.pending},
        "min_topk_overlap": gate,
        "arms": arms,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    path = Path(cfg.out) if cfg.out else root / "stability.json"
    atomic_write_text(path, json.dumps(result, indent=1, default=str))
    result["path"] = str(path)
    return result


def table(result: dict[str, Any]) -> str:
    k = result["config"]["eval_k"]
    lines = [
        f"| stability weight | NDCG@{k} (production) | top-{k} churn vs production | "
        f"churn gate (overlap ≥ {result['min_topk_overlap']}) |",
        "| --- | --- | --- | --- |",
    ]
    for a in result["arms"]:
        lines.append(
            f"| {a['stability_weight']:g} | {a[f'ndcg@{k}']:.4f} "
            f"({a[f'production_ndcg@{k}']:.4f}) | {a['churn']:.3f} | "
            f"{'passes' if a['passes_churn_gate'] else 'rejects'} |"
        )
    return "\n".join(lines)
