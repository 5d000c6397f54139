"""The sequential user tower learns an order that mean pooling cannot see, and with time gaps
a session boundary that positions cannot see.

A planted world: items come in pairs (a, g(a)). Each user watches distinct "a" items in a
random order and, after some of them, the partner g(a) right away. Validation is the partner
of the user's last item. Which "a" came last is only in the order, so a mean of the history
narrows the answer to the partners of every unpartnered "a" in it; causal attention with
positions reads the newest item and ranks its partner first.

A second world, in sessions: items a minute apart inside a session and a week apart between
sessions. Every session opens with an item a, goes on with 0-3 other items from the same pool
and, in most sessions, closes with the partner g(a) of the item that opened it; validation is
the partner closing the user's newest session. Openers and the items after them are drawn
alike, so which of the newest positions opened the session is only in the gaps: without them
the tower has to spread its guess over the partners of the newest few items.
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
# The session world: items 0..59 open sessions or follow an opener; 60..119 are partners.
N_SESSION_PAIRS = 60
N_SESSION_USERS = 600
SESSIONS = 6
CLOSE = 0.7  # chance an earlier session closes with its opener's partner
MINUTE, WEEK = 60, 7 * 86_400


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
    return _dataset(rows, N_USERS, 2 * N_PAIRS)


def _dataset(rows: list[tuple[int, int, int]], n_users: int, n_items: int) -> Dataset:
    """(user, item, unix seconds) rows -> a Dataset with one category value everywhere."""
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    inter["event_type"], inter["value"] = "watch", 1.0
    users = pd.DataFrame(
        {"user_id": np.arange(n_users), "gender": "F", "age_bucket": "25-34", "activity": "low"}
    )
    items = pd.DataFrame(
        {
            "item_id": np.arange(n_items),
            "genre": "drama",
            "provider": "major",
            "release_ts": 1_600_000_000,
        }
    )
    return Dataset.from_frames(users, items, inter)


def _cfg(out, encoder: str, **tower) -> TrainConfig:
    return TrainConfig(
        out=str(out),
        epochs=12,
        patience=100,
        batch_size=128,
        history_len=8,
        n_hash_buckets=8,
        min_user_interactions=1,
        val_users=N_SESSION_USERS,
        threads=1,
        resume=False,
        progress=False,
        tower=TowerConfig(
            id_dim=32, cat_dim=4, hidden_dim=64, out_dim=32, user_encoder=encoder, **tower
        ),
        split=SplitConfig(strategy="last_n", n_val=1, n_test=1),
        baselines=("toppop",),
        prior_betas=(0.0,),
        evaluate_test=False,
        refit_epochs=0,  # validation is what these tests read: nothing to refit for
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
    # The measured values sit far from both bounds (docs/results.md, "Sequential user
    # tower"). Mean pooling's ceiling here is a guess among ~5 partners (NDCG ~0.6); what this
    # checks is the gap at the same budget.
    assert seq["model"]["ndcg@10"] > 0.5
    assert seq["model"]["ndcg@10"] > 3 * mean["model"]["ndcg@10"]
    assert seq["model"]["ndcg@10"] > seq["toppop"]["ndcg@10"]


def session_world(seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    partner = N_SESSION_PAIRS + rng.permutation(N_SESSION_PAIRS)
    rows = []
    for u in range(N_SESSION_USERS):
        t = 1_700_000_000 + int(rng.integers(0, WEEK))
        drawn = rng.choice(N_SESSION_PAIRS, SESSIONS * 5, replace=False)
        openers, fillers = drawn[:SESSIONS], iter(drawn[SESSIONS:])
        seq: list[tuple[int, int]] = []
        for s, a in enumerate(openers):
            session = [int(a), *(int(next(fillers)) for _ in range(int(rng.integers(0, 4))))]
            if s == SESSIONS - 1 or rng.random() < CLOSE:
                session.append(int(partner[a]))  # the newest session's is validation
            for item in session:
                seq.append((item, t))
                t += MINUTE
            t += WEEK
        seq.append((int(next(fillers)), t))  # test: an unrelated item a week later
        rows += [(u, item, ts) for item, ts in seq]
    return _dataset(rows, N_SESSION_USERS, 2 * N_SESSION_PAIRS)


@pytest.mark.slow
def test_time_gaps_find_the_session_start_that_positions_cannot(tmp_path):
    ds = session_world()
    plain = train(_cfg(tmp_path / "plain", "sequence", dropout=0.0), dataset=ds)
    gaps = train(_cfg(tmp_path / "gaps", "sequence", dropout=0.0, time_gaps=True), dataset=ds)
    plain, gaps = plain["val"]["model"]["ndcg@10"], gaps["val"]["model"]["ndcg@10"]
    print(f"val ndcg@10: sequence + time gaps {gaps:.3f}, sequence {plain:.3f}")
    # Both worlds' measured values clear these bounds widely (docs/results.md, "Sequential
    # user tower").
    assert gaps > 0.6
    assert gaps > plain + 0.3
