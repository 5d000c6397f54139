"""Fill the shared online store: seed it from a run's dataset, replay the event log into it.

`northstar online seed|rebuild` and `northstar export --set online_store=…` call these.
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from feedback.events import INTERACTION
from feedback.sink import open_source
from training.schema import Dataset

REPLAY_CHUNK = 50_000


def seed_from_run(run: str | Path, url: str, *, checkpoint: int = 0, history_len: int = 50):
    """Seed `url` with everything the run's dataset knows. Returns the store's SeedStats."""
    # lazy: redis (online.store) and torch (training.run); `northstar --help` imports this
    from online.store import RedisFeatureStore
    from training.run import RUN_FILE

    meta = json.loads((Path(run) / RUN_FILE).read_text())
    ds = Dataset.load(meta["data_dir"])
    store = RedisFeatureStore(url, history_len=history_len)
    bar = tqdm(unit="user", desc="seed", leave=False)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        return store.seed(
            ds.users,
            ds.interactions,
            checkpoint=checkpoint,
            progress=progress,
        )
    finally:
        bar.close()
        store.close()


def replay(url: str, event_log: str, *, run: str | None = None) -> tuple[int, int]:
    """Replay interactions after the store's checkpoint; reseed first if the seed is gone.
    Returns (from_seq, rows replayed)."""
    # lazy: redis (online.store); `northstar --help` imports this module
    from online.store import RedisFeatureStore

    store = RedisFeatureStore(url)
    try:
        after = store.replay_from()
        if after is None:
            if run is None:
                raise ValueError(
                    f"{url}: the store has no complete seed; pass --run to seed it again"
                )
            seed_from_run(run, url, checkpoint=0)
            after = 0
        with open_source(event_log) as src:
            upto = int(src.snapshot()[INTERACTION])
            rows = 0

            def frames():
                nonlocal rows
                lo = after
                while lo < upto:
                    hi = min(lo + REPLAY_CHUNK, upto)
                    df = src.read(INTERACTION, after=lo, upto=hi, with_meta=True)
                    rows += len(df)
                    yield df
                    lo = hi

            store.rebuild(frames())
        return after, rows
    finally:
        store.close()
