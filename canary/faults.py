"""Fault injection for the tests and the demo; never part of a real retrain.

`RetrainConfig.fault` names at most one fault. The pipeline (`canary.pipeline`) calls into
this module only when `cfg.fault != "none"`, at one marked call site per hook:

    hook                        where            fault
    training_data(...)          step 1 collect   shuffle_labels: item ids shuffled across
                                                 every interaction the candidate learns from
    allows_warm_start(...)      step 2 train     shuffle_labels: the candidate starts fresh
                                                 (production's weights would mask the fault)
    served_run(...)             step 5 export    serving_skew: export a copy of the run whose
                                                 item table is permuted
    apply_after_export(...)     step 5 export    corrupt_export: the published graph is
                                                 overwritten with bytes Triton must refuse;
                                                 broken_features: the version's online
                                                 features are truncated, so it loads but
                                                 every request for it fails in `recommend`

Each fault is a class of bug the pipeline must catch at a different gate: `shuffle_labels`
offline (the candidate learns nothing), `serving_skew` only online (what is served is not
what was evaluated), `corrupt_export` at the load step (the old set keeps serving),
`broken_features` by the serving guardrails (its users fall back to production, which
counts against the canary).
"""

from __future__ import annotations

import shutil
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import torch

from serving import repository as layout
from training.run import MODEL_FILE
from training.schema import Dataset
from training.split import split

if TYPE_CHECKING:
    from training.split import SplitConfig

Fault = Literal["none", "shuffle_labels", "serving_skew", "corrupt_export", "broken_features"]
FAULTS: tuple[Fault, ...] = (
    "none",
    "shuffle_labels",
    "serving_skew",
    "corrupt_export",
    "broken_features",
)


def check(fault: str) -> None:
    if fault not in FAULTS:
        raise ValueError(f"fault={fault!r}; expected one of {FAULTS}")


# ---------------------------------------------------------------------------- collect


def training_data(
    fault: Fault,
    *,
    dataset: Dataset,
    interactions: pd.DataFrame,
    positives: pd.DataFrame,
    split_cfg: SplitConfig,
    run_dir: Path,
    data: Path,
    extra: Path | None,
) -> tuple[Path, Path | None]:
    """The dataset dir and feedback file the candidate learns from: `(data, extra)` as given,
    or, for `shuffle_labels`, copies whose item ids are shuffled across the interactions it
    learns from (train + val and the feedback positives), so no user keeps their own taste.
    Row count and timestamps are kept, so the copy's time split is the same, and its newest
    slice (what the candidate is evaluated on) stays the real one."""
    if fault != "shuffle_labels":
        return data, extra

    sp = split(interactions, split_cfg)
    rng = np.random.default_rng(0)
    learn = pd.concat([sp.train, sp.val], ignore_index=True)
    learn["item_id"] = rng.permutation(learn["item_id"].to_numpy())
    shuffled_dir = run_dir / "data-shuffled"
    shuffled = pd.concat([learn, sp.test], ignore_index=True)
    Dataset.from_frames(dataset.users, dataset.items, shuffled, source="shuffled").save(
        shuffled_dir
    )
    shuffled_extra = None
    if len(positives):
        shuffled_extra = run_dir / "extra-shuffled.parquet"
        positives.assign(item_id=rng.permutation(positives["item_id"].to_numpy())).to_parquet(
            shuffled_extra, index=False
        )
    return shuffled_dir, shuffled_extra


# ---------------------------------------------------------------------------- train


def allows_warm_start(fault: Fault) -> bool:
    """A shuffled-label candidate trains from scratch: production's weights would mask it."""
    return fault != "shuffle_labels"


# ---------------------------------------------------------------------------- export


def served_run(fault: Fault, run: Path, out: Path, *, seed: str) -> Path:
    """The run dir to export: `run`, or for `serving_skew` a copy with a permuted item table."""
    if fault != "serving_skew":
        return run
    return skew_item_table(run, out, seed=seed)


def skew_item_table(run_dir: Path, out: Path, *, seed: str) -> Path:
    """A copy of a run whose item table is permuted: item i gets item π(i)'s id embedding
    and categories. Its offline-evaluated weights are unchanged elsewhere; what it serves
    is a mismatch between item rows and raw ids, the training/serving skew a canary exists
    to catch (`fault="serving_skew"`)."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(run_dir, out, ignore=shutil.ignore_patterns("checkpoint.pt"))
    state = torch.load(out / MODEL_FILE, map_location="cpu", weights_only=True)
    n = state["item_cats"].shape[0]
    perm = torch.from_numpy(np.random.default_rng(zlib.crc32(seed.encode())).permutation(n))
    for key in ("item_tower.item_emb.weight", "item_cats"):
        state[key] = state[key][perm].clone()
    torch.save(state, out / MODEL_FILE)
    return out


def apply_after_export(fault: Fault, version_dir: Path) -> None:
    """`corrupt_export`: a disk or copy fault after publishing; Triton must refuse the
    version, and the load step must leave the old set serving. `broken_features`: the
    version's online features are torn, so Triton loads it but `recommend` cannot serve it:
    its users fall back to production and the serving guardrails must roll it back."""
    if fault == "corrupt_export":
        (version_dir / layout.ONNX_FILE).write_bytes(b"not an onnx graph")
    elif fault == "broken_features":
        repo, version = version_dir.parent.parent, int(version_dir.name)
        path = layout.features_path(repo, version)
        path.write_bytes(path.read_bytes()[:100])  # a torn copy: not a readable .npz
