"""What an audit reads: ranked lists, who got them, what they went on to watch.

The audit never asks where the lists came from. `from_run` ranks with a trained run's model
(offline, like `training.train.evaluate_splits`); a served model version, a log of
impressions or a hand-built list for a test all go through `make_audit_input`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from common import config as config_mod
from models.features import USER_CATEGORICALS
from training.schema import Dataset

if TYPE_CHECKING:
    from training.run import Run

EMPTY = -1  # marks an empty slot in `ranked` (a list shorter than K)


@dataclass(frozen=True)
class AuditInput:
    """Per-user ranked lists plus the tables needed to judge them. Ids are raw ids.

    Rows of `user_ids` and `ranked` align. `relevant` holds the held-out (user_id, item_id)
    pairs that count as hits; `popularity` is each item's interaction count in the history
    the lists were made from.
    """

    user_ids: np.ndarray  # (U,) int64
    ranked: np.ndarray  # (U, K) int64 raw item ids in rank order, EMPTY for no item
    relevant: pd.DataFrame  # user_id, item_id
    users: pd.DataFrame  # user_id + USER_CATEGORICALS (missing values become "unknown")
    items: pd.DataFrame  # item_id, provider (+ any other columns)
    popularity: pd.Series  # item_id -> count; items absent count 0
    label: str = "model"
    source: dict = field(default_factory=dict)  # where the lists came from, for the report

    def __post_init__(self) -> None:
        if self.ranked.ndim != 2 or self.ranked.shape[0] != len(self.user_ids):
            raise ValueError(
                f"AuditInput: ranked has shape {self.ranked.shape}; expected "
                f"({len(self.user_ids)}, K), one row per user id"
            )
        if len(np.unique(self.user_ids)) != len(self.user_ids):
            raise ValueError("AuditInput: user_ids has duplicates; expected one list per user")
        for name, df, cols in (
            ("relevant", self.relevant, ("user_id", "item_id")),
            ("users", self.users, ("user_id",)),
            ("items", self.items, ("item_id", "provider")),
        ):
            missing = [c for c in cols if c not in df.columns]
            if missing:
                raise ValueError(f"AuditInput.{name}: missing column(s) {missing}")
        shown = self.ranked[self.ranked != EMPTY]
        catalogue = np.sort(self.items["item_id"].to_numpy(np.int64))
        at = np.minimum(np.searchsorted(catalogue, shown), max(len(catalogue) - 1, 0))
        unknown = catalogue[at] != shown if len(catalogue) else np.ones(len(shown), bool)
        if unknown.any():
            raise ValueError(
                f"AuditInput: {int(unknown.sum())} ranked slots hold item ids not in the items "
                f"table, e.g. {np.unique(shown[unknown])[:3].tolist()}"
            )


def make_audit_input(
    *,
    user_ids: np.ndarray,
    ranked_item_ids: np.ndarray,
    dataset: Dataset,
    history: pd.DataFrame,
    target: pd.DataFrame,
    label: str = "model",
    source: dict | None = None,
) -> AuditInput:
    """Build an AuditInput from lists and a dataset's time split.

    `history` is what was known when the lists were made (it sets popularity); `target` is
    what the users did next (it sets relevance). Users without a list are not audited.
    """
    return AuditInput(
        user_ids=np.asarray(user_ids, dtype=np.int64),
        ranked=np.asarray(ranked_item_ids, dtype=np.int64),
        relevant=target[["user_id", "item_id"]],
        users=dataset.users,
        items=dataset.items,
        popularity=history["item_id"].value_counts(),
        label=label,
        source=dict(source or {}),
    )


def load_split(run: Run, data: str):
    """The run's own time split of `data`: (dataset, split, train_df), as training made it."""
    # lazy: torch (training.*); canary.online and fairness.online use this module without it
    from training.train import TrainConfig, load_training_data

    cfg = config_mod.build(TrainConfig, {**run.meta["train"], "data": data})
    return load_training_data(cfg)


def from_run(run: Run, data: str, *, label: str | None = None) -> AuditInput:
    """Rank the test period with the run's model, history = train + val.

    Same users, exclusions and ranking as `training.train.evaluate_splits`, so the audit's
    overall NDCG equals the "test" NDCG in the run's metrics.json.
    """
    # lazy: torch (training.*); canary.online and fairness.online use this module without it
    from training.evaluate import evaluate

    ds, sp, train_df = load_split(run, data)
    known = pd.concat([train_df, sp.val], ignore_index=True).sort_values("timestamp", kind="stable")
    res = evaluate(model=run.model, vocab=run.vocab, users=ds.users, known=known, target=sp.test)[
        "model"
    ]
    ranked = np.where(res.ranked >= 0, run.vocab.item_ids[np.maximum(res.ranked, 0)], EMPTY)
    return make_audit_input(
        user_ids=res.user_ids,
        ranked_item_ids=ranked,
        dataset=ds,
        history=known,
        target=sp.test,
        label=label or run.path.name,
        source={
            "kind": "run",
            "run": str(run.path),
            "data": str(data),
            "split": "test",
            "history": "train+val",
        },
    )


def user_attributes(*, users: pd.DataFrame, user_ids: np.ndarray) -> pd.DataFrame:
    """(U, ...) attribute rows aligned with user_ids; users missing from the table and
    missing columns read "unknown"."""
    table = users.drop_duplicates("user_id").set_index("user_id")
    out = table.reindex(np.asarray(user_ids, dtype=np.int64))
    for col in USER_CATEGORICALS:
        if col not in out.columns:
            out[col] = "unknown"
    return out.fillna("unknown").astype(str).reset_index(drop=True)
