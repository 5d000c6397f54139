"""A tiny, untrained run directory in under a second: for serving tests and smoke checks.

It has every file `northstar export` reads (run.json, model.pt, vocab, features.npz)
and the shapes of a real run, but random weights, so serving tests do not wait
for training and do not depend on its code path.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from common.redis_server import RedisServer
from models.features import FeatureVocab
from models.snapshot import FeatureSnapshot
from models.towers import TowerConfig, TwoTower
from online.store import RedisFeatureStore
from serving import repository as layout
from serving.publish import ExportConfig, export
from serving.server import ServerConfig, TritonServer
from training.run import FEATURES_FILE, save_run
from training.synth import SynthConfig, generate_dataset

TINY_TOWER = TowerConfig(id_dim=8, cat_dim=4, hidden_dim=16, out_dim=8, dropout=0.0)


def build_tiny_run(
    path: str | Path,
    *,
    n_users: int = 60,
    n_items: int = 80,
    n_interactions: int = 900,
    history_len: int = 6,
    n_hash_buckets: int = 8,
    seed: int = 0,
    tower: TowerConfig = TINY_TOWER,
) -> Path:
    """Write a run with random weights; users 1000.. (the last few without interactions)."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    users = pd.DataFrame(
        {
            "user_id": 1000 + np.arange(n_users, dtype=np.int64),
            "gender": rng.choice(["f", "m", "unknown"], n_users),
            "age_bucket": rng.choice(["18-24", "25-34", "35-49", "50+"], n_users),
            "activity": rng.choice(["low", "mid", "high"], n_users),
            "occupation": "unknown",
        }
    )
    items = pd.DataFrame(
        {
            "item_id": 50_000 + 3 * np.arange(n_items, dtype=np.int64),  # raw ids != indices
            "genre": rng.choice(["drama", "comedy", "docs", "kids"], n_items),
            "provider": rng.choice(["a", "b"], n_items),
        }
    )
    # Most users interact, a few never do (snapshot rows without history), and some only
    # once (below min_user_interactions=2: they share hashed rows).
    active = users["user_id"].to_numpy()[: max(1, n_users - 4)]
    inter = pd.DataFrame(
        {
            "user_id": rng.choice(active, n_interactions),
            "item_id": rng.choice(items["item_id"].to_numpy(), n_interactions),
            "timestamp": np.sort(rng.integers(1_700_000_000, 1_700_100_000, n_interactions)),
        }
    ).drop_duplicates(["user_id", "item_id"])
    vocab = FeatureVocab.fit(
        users,
        items,
        inter,
        n_hash_buckets=n_hash_buckets,
        history_len=history_len,
        min_user_interactions=2,
    )
    item_cats = torch.from_numpy(
        vocab.encode_item_cats(items.set_index("item_id").loc[vocab.item_ids].reset_index())
    )
    torch.manual_seed(seed)
    model = TwoTower(vocab.spec, tower, item_cats).eval()
    save_run(path, model, vocab, {"data": "serving.testing.build_tiny_run", "seed": seed})
    FeatureSnapshot.build(vocab, users, inter).save(path / FEATURES_FILE)
    return path


def world_run(ds, path: str | Path, *, seed: int = 0, tower: TowerConfig = TINY_TOWER) -> Path:
    """A run with random weights on a synthetic world's own ids (training.synth Dataset):
    enough to serve users the simulator knows, in a second, without training."""
    path = Path(path)
    vocab = FeatureVocab.fit(
        ds.users,
        ds.items,
        ds.interactions,
        n_hash_buckets=8,
        history_len=6,
        min_user_interactions=2,
    )
    item_cats = torch.from_numpy(
        vocab.encode_item_cats(ds.items.set_index("item_id").loc[vocab.item_ids].reset_index())
    )
    torch.manual_seed(seed)
    model = TwoTower(vocab.spec, tower, item_cats).eval()
    save_run(path, model, vocab, {"data": "serving.testing.world_run", "seed": seed})
    FeatureSnapshot.build(vocab, ds.users, ds.interactions).save(path / FEATURES_FILE)
    return path


def saved_world_run(root: str | Path, preset: str = "tiny", **synth) -> tuple[Path, Path]:
    """(world dir, run dir): a synthetic world of `preset` (SynthConfig fields in `synth`
    override it) with its dataset saved in ROOT/world, and `world_run`'s run in ROOT/run."""

    root = Path(root)
    world, ds = generate_dataset(SynthConfig.preset(preset, **synth), progress=False)
    world.save(root / "world")
    ds.save(root / "world")
    return root / "world", world_run(ds, root / "run")


def world_repo(root: str | Path, *, k: int = 10, versions: int = 1, seed: int = 0):
    """The `tiny` synthetic world (saved in root/world, for the simulator), a world_run on
    its ids, and a model repository with `versions` exports of it (the first routed as
    production, the rest not routed). Returns (dataset, run, repo)."""

    root = Path(root)
    world, ds = generate_dataset(SynthConfig.preset("tiny", seed=seed), progress=False)
    world.save(root / "world")
    ds.save(root / "world")
    run = world_run(ds, root / "run", seed=seed)
    repo = root / "model_repository"
    for i in range(versions):
        export(ExportConfig(run=str(run), repo=str(repo), k=k, overfetch=k, promote=i == 0))
    return ds, run, repo


@functools.cache
def _cached_export(k: int, overfetch: int):
    root = Path(tempfile.mkdtemp(prefix="northstar-tiny-export-"))
    atexit.register(shutil.rmtree, root, True)
    run = build_tiny_run(root / "run")
    res = export(ExportConfig(run=str(run), repo=str(root / "repo"), k=k, overfetch=overfetch))
    return run, root / "repo", res


def tiny_export(dest: str | Path | None = None, *, k: int = 10, overfetch: int = 10):
    """(run, repo, ExportResult) of a tiny run exported with the default (dynamo) exporter.

    The dynamo exporter takes seconds, so one export per process is shared: with `dest`,
    the repository is copied there (safe to change); without, the shared one is returned
    and must only be read.
    """
    run, repo, res = _cached_export(k, overfetch)
    if dest is None:
        return run, repo, res
    dest = Path(dest)
    shutil.copytree(repo, dest, ignore=shutil.ignore_patterns("__pycache__"))
    path = dest / res.path.relative_to(repo)
    return run, dest, dataclasses.replace(res, path=path)


@contextlib.contextmanager
def ingest_only_server(root: str | Path):
    """The `feedback` ingest model alone on a real tritonserver, writing its own event log
    (`root/events.db`); yields (server, log path) and stops the server on exit."""

    root = Path(root)
    repo = root / "repo"
    layout.init_repository(repo)  # copies the committed `feedback` model
    log = root / "events.db"
    server = TritonServer(
        ServerConfig.on_free_ports(
            str(repo),
            models=(layout.FEEDBACK,),
            event_log=str(log),
            log_file=str(root / "tritonserver.log"),
        )
    )
    server.start()
    try:
        yield server, log
    finally:
        server.stop()


def seeded_store(ds, root: str | Path):
    """A real redis-server (its data in `root`) seeded with the world's users and
    interactions, as `northstar online seed` would; the caller closes it."""

    redis = RedisServer(Path(root)).start()
    store = RedisFeatureStore(redis.url)
    try:
        store.seed(ds.users, ds.interactions)
    finally:
        store.close()
    return redis


def wait_until(fn, what: str, *, bound_s: float = 120.0, poll_s: float = 0.05):
    """fn()'s first truthy value. Tests wait on a condition, never on a delay; `bound_s`
    only ends a hang, with `what` in the error."""

    deadline = time.monotonic() + bound_s
    while time.monotonic() < deadline:
        got = fn()
        if got:
            return got
        time.sleep(poll_s)
    raise AssertionError(f"not within {bound_s:.0f} s: {what}")
