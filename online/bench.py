"""Benchmark: per-batch feature lookup (Redis store vs the embedded snapshot) and seed time.

    .venv/bin/python -m online.bench --users 200000 --history-len 50

Starts its own redis-server (common.redis_server, AOF with appendfsync always, as the
demo runs it) in a temporary folder. Synthetic data: every user has ~`per_user`
interactions (Poisson), so most histories are trimmed to H. Lookups are timed per batch
of `batch` distinct random users, through the whole serving path of each side:
  snapshot  FeatureSnapshot.lookup                       (today: in-process arrays)
  redis     store.read (one round trip) + VersionView    (no cache)
  cached    CachedFeatures.read + VersionView, every user cached and fresh
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from common.redis_server import RedisServer
from models.features import UNKNOWN, FeatureVocab
from models.snapshot import FeatureSnapshot
from online.cache import CachedFeatures
from online.store import RedisFeatureStore
from online.view import VersionView

_CATS = {
    "gender": ["f", "m", "x"],
    "age_bucket": ["18-24", "25-34", "35-44", "45+"],
    "activity": ["low", "mid", "high"],
    "occupation": ["a", "b", "c", UNKNOWN],
}


@dataclass(frozen=True)
class BenchResult:
    users: int
    interactions: int
    history_len: int
    seed_s: float
    redis_mb: float
    lookup_ms: dict[str, tuple[float, float]]  # path -> (p50, p99), per batch


def synth(n_users: int, per_user: float, n_items: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    users = pd.DataFrame(
        {"user_id": np.arange(1, n_users + 1, dtype=np.int64)}
        | {c: rng.choice(v, n_users) for c, v in _CATS.items()}
    )
    counts = rng.poisson(per_user, n_users)
    n = int(counts.sum())
    inter = pd.DataFrame(
        {
            "user_id": np.repeat(users["user_id"].to_numpy(), counts),
            "item_id": rng.zipf(1.3, n) % n_items + 1,  # popular items repeat
            "timestamp": rng.integers(1_700_000_000, 1_700_000_000 + 86_400 * 90, n),
            "event_type": "click",
        }
    ).sort_values("timestamp", kind="stable", ignore_index=True)
    vocab = FeatureVocab(
        user_ids=users["user_id"].to_numpy()[::2].copy(),  # half the users have a row
        item_ids=np.arange(1, int(n_items * 0.9) + 1, dtype=np.int64),  # 10% newer items
        user_cats={c: [UNKNOWN, *sorted(set(v) - {UNKNOWN})] for c, v in _CATS.items()},
        item_cats={"genre": [UNKNOWN], "provider": [UNKNOWN]},
        n_hash_buckets=1000,
        history_len=20,
    )
    return users, inter, vocab


def _percentiles(fn, batches: list[np.ndarray]) -> tuple[float, float]:
    for b in batches[:20]:  # warm-up: connections, caches, first-call costs
        fn(b)
    times = []
    for b in batches:
        t = time.perf_counter()
        fn(b)
        times.append((time.perf_counter() - t) * 1000.0)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def run(
    n_users: int = 200_000,
    *,
    history_len: int = 50,
    per_user: float = 60.0,
    n_items: int = 50_000,
    batch: int = 64,
    n_batches: int = 2000,
    log=print,
) -> BenchResult:
    log(f"synthesising {n_users:,} users x ~{per_user:g} interactions ...")
    users, inter, vocab = synth(n_users, per_user, n_items)
    rng = np.random.default_rng(1)
    batches = [rng.choice(n_users, batch, replace=False) + 1 for _ in range(n_batches)]
    snap = FeatureSnapshot.build(vocab, users, inter)
    with RedisServer() as server:
        store = RedisFeatureStore(server.url, history_len=history_len, socket_timeout_s=5.0)
        last = [0.0]

        def progress(done: int, total: int) -> None:
            if time.perf_counter() - last[0] > 10:
                last[0] = time.perf_counter()
                log(f"  seeded {done:,}/{total:,} users")

        stats = store.seed(users, inter, progress=progress)
        log(f"seeded {stats.users:,} users in {stats.seconds:.1f} s")
        redis_mb = int(store.redis.info("memory")["used_memory"]) / 2**20
        view = VersionView(vocab)
        cache = CachedFeatures(store, ttl_s=3600.0, max_users=n_users)
        for b in batches:
            cache.read(b)  # every user cached: the hit path
        lookup = {
            "snapshot": _percentiles(snap.lookup, batches),
            "redis": _percentiles(lambda b: view.to_features(store.read(b)), batches),
            "cached": _percentiles(lambda b: view.to_features(cache.read(b)), batches),
        }
        store.close()
    return BenchResult(n_users, len(inter), history_len, stats.seconds, redis_mb, lookup)


def table(r: BenchResult, batch: int = 64) -> str:
    lines = [
        f"seed: {r.users:,} users, {r.interactions:,} interactions, H={r.history_len}: "
        f"{r.seed_s:.1f} s ({r.users / r.seed_s:,.0f} users/s); redis used_memory "
        f"{r.redis_mb:,.0f} MiB",
        f"{'lookup of ' + str(batch) + ' users':<28}{'p50 ms':>10}{'p99 ms':>10}",
    ]
    names = {
        "snapshot": "FeatureSnapshot.lookup",
        "redis": "redis read + view",
        "cached": "cache hit + view",
    }
    for k, (p50, p99) in r.lookup_ms.items():
        lines.append(f"{names[k]:<28}{p50:>10.3f}{p99:>10.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--users", type=int, default=200_000)
    p.add_argument("--history-len", type=int, default=50)
    p.add_argument("--per-user", type=float, default=60.0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=2000)
    a = p.parse_args(argv)
    r = run(
        a.users,
        history_len=a.history_len,
        per_user=a.per_user,
        batch=a.batch,
        n_batches=a.batches,
    )
    print(table(r, a.batch))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
