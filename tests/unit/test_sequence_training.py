"""The sequential user tower learns an order that mean pooling cannot see.

A planted world: items come in pairs (a, g(a)). Each user watches distinct "a" items in a
random order and, after some of them, the partner g(a) right away. Validation is the partner
of the user's last item. Which "a" came last is only in the order, so a mean of the history
narrows the answer to the partners of every unpartnered "a" in it; causal attention with
positions reads the newest item and ranks its partner first.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from models.towers import TowerConfig
from training.schema import Dataset
from training.split import SplitConfig
from training.train import TrainConfig, train

N_PAIRS = 60  # items 0..59 are "a", 60..119 their partners
N_USERS = 400
PER_USER = 10  # "a" items per user before the last one
FOLLOW = 0.25  # chance an "a" is followed by its partner at once


def planted_world(seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    partner = N_PAIRS + rng.permutation(N_PAIRS)  # g: a -> its partner
    rows = []
    for u in range(N_USERS):
        seq: list[int] = []
        a_items = rng.choice(N_PAIRS, PER_USER + 2, replace=False)
        for a in a_items[:PER_USER]:
            seq.append(int(a))
            if rng.random() < FOLLOW:
                seq.append(int(partner[a]))
        last, after = a_items[PER_USER], a_items[PER_USER + 1]
        # ... then the last "a" and its partner (validation), then an unrelated "a" (test).
        seq += [int(last), int(partner[last]), int(after)]
        rows += [(u, item, 1_700_000_000 + u * 1000 + t) for t, item in enumerate(seq)]
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    inter["event_type"], inter["value"] = "watch", 1.0
    users = pd.DataFrame(
        {"user_id": np.arange(N_USERS), "gender": "F", "age_bucket": "25-34", "activity": "low"}
    )
    items = pd.DataFrame(
        {
            "item_id": np.arange(2 * N_PAIRS),
            "genre": "drama",
            "provider": "major",
            "release_ts": 1_600_000_000,
        }
    )
    return Dataset.from_frames(users, items, inter)


def _cfg(out, encoder: str) -> TrainConfig:
    return TrainConfig(
        out=str(out),
        epochs=12,
        patience=100,
        batch_size=128,
        history_len=8,
        n_hash_buckets=8,
        min_user_interactions=1,
        val_users=N_USERS,
        threads=1,
        resume=False,
        progress=False,
        tower=TowerConfig(id_dim=32, cat_dim=4, hidden_dim=64, out_dim=32, user_encoder=encoder),
        split=SplitConfig(strategy="last_n", n_val=1, n_test=1),
        baselines=("toppop",),
        prior_betas=(0.0,),
        evaluate_test=False,
    )


@pytest.mark.slow
def test_sequence_tower_beats_mean_pooling_on_a_sequential_world(tmp_path):
    ds = planted_world()
    mean = train(_cfg(tmp_path / "mean", "mean"), dataset=ds)["val"]
    seq = train(_cfg(tmp_path / "seq", "sequence"), dataset=ds)["val"]
    print(
        f"val ndcg@10: sequence {seq['model']['ndcg@10']:.3f}, "
        f"mean {mean['model']['ndcg@10']:.3f}, toppop {mean['toppop']['ndcg@10']:.3f}"
    )
    # Measured over two worlds: sequence 0.80-0.87 (best by epoch 6), mean 0.09-0.11 and still
    # creeping up at epoch 12. Mean pooling's ceiling here is a guess among ~5 partners (NDCG
    # ~0.6); what this checks is the gap at the same budget, not that ceiling.
    assert seq["model"]["ndcg@10"] > 0.5
    assert seq["model"]["ndcg@10"] > 3 * mean["model"]["ndcg@10"]
    assert seq["model"]["ndcg@10"] > seq["toppop"]["ndcg@10"]
