"""Per-user online features in Redis, keyed by raw ids.

Key layout (`p` = prefix; the braces are a Redis Cluster hash tag, so one user's three
keys live on one slot):

    p:u:{<user_id>}:h   ZSET   the last H history events; score = ts, member = "<key>|<item>|<ts>"
    p:u:{<user_id>}:s   SET    every raw item id the user interacted with (the seen set)
    p:u:{<user_id>}:c   HASH   categorical name -> raw value, as a string
    p:meta              HASH   seed epoch, seed state, checkpoint, applied_seq, history_len

History is one member per *event*, not per item: training's history (last_n_history) keeps
repeats, so a user who watched an item twice has it twice, and so does the store. The
`<key>` part makes a member unique and idempotent: the event id for a live event (a
redelivered batch re-adds the same members with the same scores: a no-op), and for a
seeded row "a" + its position in the user's time-ordered rows. It also breaks ties of
equal ts the way training does (file order): seeded positions are zero-padded so they
sort as numbers, and "a..." sorts before the "b<event_id>" of live events.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from common.redact import redacted
from models.features import USER_CATEGORICALS
from online.config import OnlineStoreConfig, OnlineStoreError
from online.rows import group_by_user, history_rows
from online.state import ABSENT, RawUserState, UserRecord

SEED_KEY = "a"  # + 8 hex digits: a seeded row's position in its user's rows
LIVE_KEY = "b"  # + event id

# Raise applied_seq, never lower it: a late or replayed batch must not move the replay
# point back (that would only cost time) or, worse, a stale writer move it forward.
_RAISE_APPLIED = """
local cur = tonumber(redis.call('HGET', KEYS[1], 'applied_seq') or '-1')
if tonumber(ARGV[1]) > cur then redis.call('HSET', KEYS[1], 'applied_seq', ARGV[1]) end
return 0
"""


@dataclass(frozen=True)
class SeedStats:
    users: int  # users written (users table ∪ users with interactions)
    interactions: int  # history rows read
    history_entries: int  # entries written to history sets (at most H per user)
    round_trips: int
    seconds: float
    epoch: str
    checkpoint: int


@dataclass(frozen=True)
class ApplyStats:
    rows: int  # history rows applied (redelivered ones included: they are no-ops)
    users: int
    ignored: int  # rows that are not history (event type)
    applied_seq: int | None  # the event-log seq recorded as applied, when the rows had one


@dataclass(frozen=True)
class StoreMeta:
    epoch: str
    state: str  # "seeding" until a seed completes, then "ready"
    checkpoint: int  # the event-log seq the seed covers: replay after it
    applied_seq: int  # the highest event-log seq applied since
    history_len: int
    users: int


class RedisFeatureStore:
    """Writes (seed, apply_interactions, rebuild) and the batched read serving does."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "northstar",
        history_len: int = 50,
        socket_timeout_s: float = 0.25,
        connect_timeout_s: float = 0.25,
        seed_chunk_users: int = 2000,
        check: bool = True,
    ):
        self.config = OnlineStoreConfig(
            url=url,
            prefix=prefix,
            history_len=history_len,
            socket_timeout_s=socket_timeout_s,
            connect_timeout_s=connect_timeout_s,
            seed_chunk_users=seed_chunk_users,
        )
        self.prefix = prefix
        self.history_len = history_len
        # No retries inside the client: its default retries ten times with backoff, which
        # turns a dead server into seconds of stalled serving. online.cache decides when
        # to try again; writers (seed, the consumer) re-run their idempotent batch.
        self.redis = redis.Redis.from_url(
            url,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=connect_timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        self._read_script = self.redis.register_script(_READ)
        if check:
            self.check()

    @classmethod
    def from_config(cls, cfg: OnlineStoreConfig, *, check: bool = True) -> RedisFeatureStore:
        return cls(
            cfg.url,
            prefix=cfg.prefix,
            history_len=cfg.history_len,
            socket_timeout_s=cfg.socket_timeout_s,
            connect_timeout_s=cfg.connect_timeout_s,
            seed_chunk_users=cfg.seed_chunk_users,
            check=check,
        )

    def check(self) -> None:
        """PING; a server that does not answer is an OnlineStoreError saying what to do."""
        try:
            self.redis.ping()
        except redis.RedisError as exc:
            reason = getattr(exc, "__cause__", None) or exc
            detail = getattr(reason, "strerror", None) or str(reason) or type(exc).__name__
            raise OnlineStoreError(
                f"{redacted(self.config.url)}: no answer ({detail}); "
                "start redis-server or fix --online-store"
            ) from exc

    def close(self) -> None:
        self.redis.close()

    # ------------------------------------------------------------------ keys

    def _keys(self, user_id: int) -> tuple[str, str, str]:
        base = f"{self.prefix}:u:{{{user_id}}}:"
        return base + "h", base + "s", base + "c"

    @property
    def meta_key(self) -> str:
        return f"{self.prefix}:meta"

    # ------------------------------------------------------------------ writes

    def seed(
        self,
        users: pd.DataFrame,
        interactions: pd.DataFrame,
        *,
        checkpoint: int = 0,
        epoch: str | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> SeedStats:
        """Write every user's categoricals, last H events and seen set, replacing what the
        store had for them; a second seed with the same input leaves the same state.

        `interactions` must be in time order (as FeatureSnapshot.build wants them);
        `checkpoint` is the event-log seq they cover: events after it are replayed with
        `rebuild`. Pipelined, not transactional: `seed_chunk_users` users per round trip.
        A reader may see a user mid-chunk; the meta says "seeding" until the end.
        """
        t0 = time.perf_counter()
        rows = history_rows(interactions, need_event_id=False)
        order, hist_users, starts = group_by_user(rows.user_id)
        table = users.drop_duplicates("user_id", keep="last").sort_values("user_id")
        table_ids = table["user_id"].to_numpy(np.int64)
        cat_cols = {
            c: table[c].astype(str).to_numpy(object) for c in USER_CATEGORICALS if c in table
        }
        all_users = np.union1d(table_ids, hist_users)
        cat_pos, has_cats = _positions(table_ids, all_users)
        hist_pos, has_hist = _positions(hist_users, all_users)
        epoch = epoch or _digest(all_users, rows.item_id, rows.ts, checkpoint)
        self.redis.hset(
            self.meta_key,
            mapping={"state": "seeding", "epoch": epoch, "history_len": self.history_len},
        )
        h_len, entries, trips = self.history_len, 0, 0
        chunk = self.config.seed_chunk_users
        for lo in range(0, len(all_users), chunk):
            hi = min(lo + chunk, len(all_users))
            # Python lists, one chunk at a time: redis-py encodes int and float, not numpy
            # scalars, and a whole 50M-row table as Python objects would be gigabytes.
            groups = hist_pos[lo:hi][has_hist[lo:hi]]
            r0 = int(starts[groups[0]]) if len(groups) else 0
            r1 = int(starts[groups[-1] + 1]) if len(groups) else 0
            items, ts = rows.item_id[order[r0:r1]].tolist(), rows.ts[order[r0:r1]].tolist()
            cats = {name: col[cat_pos[lo:hi]].tolist() for name, col in cat_cols.items()}
            pipe = self.redis.pipeline(transaction=False)
            for j, u in enumerate(all_users[lo:hi].tolist()):
                h, s, c = self._keys(u)
                pipe.execute_command("DEL", h, s, c)
                if has_cats[lo + j] and cats:
                    pipe.execute_command(
                        "HSET", c, *(x for n, v in cats.items() for x in (n, v[j]))
                    )
                if has_hist[lo + j]:
                    g = int(hist_pos[lo + j])
                    a, b = int(starts[g]) - r0, int(starts[g + 1]) - r0
                    first = max(a, b - h_len)
                    zargs = []
                    for k in range(first, b):
                        zargs += (ts[k], _member(f"{SEED_KEY}{k - a:08x}", items[k], ts[k]))
                    pipe.execute_command("ZADD", h, *zargs)
                    pipe.execute_command("SADD", s, *set(items[a:b]))
                    entries += b - first
            pipe.execute()
            trips += 1
            if progress is not None:
                progress(hi, len(all_users))
        self.redis.hset(
            self.meta_key,
            mapping={
                "state": "ready",
                "epoch": epoch,
                "checkpoint": int(checkpoint),
                "applied_seq": int(checkpoint),
                "history_len": self.history_len,
                "users": len(all_users),
            },
        )
        return SeedStats(
            users=len(all_users),
            interactions=len(rows),
            history_entries=entries,
            round_trips=trips + 2,
            seconds=time.perf_counter() - t0,
            epoch=epoch,
            checkpoint=int(checkpoint),
        )

    def apply_interactions(self, df: pd.DataFrame) -> ApplyStats:
        """Add a batch of live interactions (event-log rows) in ONE round trip.

        Idempotent: applying a batch twice leaves the state of applying it once (members
        are event ids, the seen set is a set, the trim is by rank). Order between batches
        does not matter either: history is ordered by ts, not by arrival. With a `seq`
        column (the log read with_meta) the batch also raises `applied_seq` in the meta.
        """
        rows = history_rows(df, need_event_id=True)
        order, us, starts = group_by_user(rows.user_id)
        items, ts = rows.item_id[order].tolist(), rows.ts[order].tolist()
        eids = rows.event_id[order].tolist()
        pipe = self.redis.pipeline(transaction=False)
        for g, u in enumerate(us.tolist()):
            h, s, _ = self._keys(u)
            a, b = int(starts[g]), int(starts[g + 1])
            zargs = []
            for k in range(a, b):
                zargs += (ts[k], _member(_live_key(eids[k]), items[k], ts[k]))
            pipe.execute_command("ZADD", h, *zargs)
            pipe.execute_command("ZREMRANGEBYRANK", h, 0, -(self.history_len + 1))
            pipe.execute_command("SADD", s, *set(items[a:b]))
        if rows.seq is not None:
            pipe.eval(_RAISE_APPLIED, 1, self.meta_key, rows.seq)
        if len(pipe):
            pipe.execute()
        return ApplyStats(len(rows), len(us), rows.ignored, rows.seq)

    def rebuild(self, frames: Iterable[pd.DataFrame]) -> ApplyStats:
        """Replay event-log rows (e.g. feedback.sink's `read(INTERACTION, after=
        replay_from(), with_meta=True)`, in chunks) after the store lost writes.

        Replaying rows the store already has is harmless (apply is idempotent), so the
        caller may start from the seed's checkpoint whenever it is unsure.
        """
        n = users = ignored = 0
        seq = None
        for df in frames:
            st = self.apply_interactions(df)
            n, users, ignored = n + st.rows, users + st.users, ignored + st.ignored
            seq = st.applied_seq if st.applied_seq is not None else seq
        return ApplyStats(n, users, ignored, seq)

    # ------------------------------------------------------------------ reads

    def meta(self) -> StoreMeta | None:
        """The seed marker; None when the store has none (never seeded, or it lost it)."""
        m = {k.decode(): v.decode() for k, v in self.redis.hgetall(self.meta_key).items()}
        if not m:
            return None
        return StoreMeta(
            epoch=m.get("epoch", ""),
            state=m.get("state", ""),
            checkpoint=int(m.get("checkpoint", 0)),
            applied_seq=int(m.get("applied_seq", m.get("checkpoint", 0))),
            history_len=int(m.get("history_len", 0)),
            users=int(m.get("users", 0)),
        )

    def replay_from(self) -> int | None:
        """The event-log seq to replay after, or None: the seed is gone (or incomplete),
        so seed again, then replay from that seed's checkpoint."""
        m = self.meta()
        if m is None or m.state != "ready":
            return None
        return m.applied_seq

    def read(self, raw_user_ids: np.ndarray) -> RawUserState:
        """Every requested user's record in ONE pipelined round trip."""
        raw = np.asarray(raw_user_ids, dtype=np.int64).reshape(-1)
        uniq, inverse = np.unique(raw, return_inverse=True)
        got = self.read_records(uniq)
        return RawUserState(raw, [got[i] for i in inverse], np.zeros(len(raw), dtype=bool))

    def read_records(self, user_ids: np.ndarray) -> list[UserRecord]:
        """One record per id of `user_ids` (distinct ids), one round trip. Raises
        redis.ConnectionError / TimeoutError when the server does not answer."""
        ids = np.asarray(user_ids, dtype=np.int64).reshape(-1).tolist()
        if not ids:
            return []
        keys = [k for u in ids for k in self._keys(u)]
        out = self._read_script(keys=keys, args=[self.history_len])
        return _records(out, len(ids))


# The batch read, server side: one EVALSHA returns, per user, the newest H history
# members, the seen set and the categoricals. A pipeline of ZRANGE/SMEMBERS/HGETALL per
# user is one round trip too, but redis-py then parses every reply one by one in Python,
# which cost more than the script; asking for scores (WITHSCORES) makes the script itself
# slow (the server formats every double), which is why a member carries its ts as text. KEYS are
# declared, three per user under one hash tag; on a Redis Cluster a batch would be split
# by slot first (a known limit: we run one primary).
_READ = """
local h = tonumber(ARGV[1])
local out = {}
for i = 1, #KEYS, 3 do
  out[#out + 1] = redis.call('ZRANGE', KEYS[i], -h, -1)
  out[#out + 1] = redis.call('SMEMBERS', KEYS[i + 1])
  out[#out + 1] = redis.call('HGETALL', KEYS[i + 2])
end
return out
"""


def _member(key: str, item: int, ts: float) -> str:
    """A history member: "<key>|<item>|<ts>". repr(float) round-trips exactly."""
    return f"{key}|{item}|{ts!r}"


def _live_key(event_id: str) -> str:
    # The read splits members on " " and "|": neither may appear in the key.
    if " " in event_id or "|" in event_id or "%" in event_id:
        event_id = event_id.replace("%", "%25").replace(" ", "%20").replace("|", "%7C")
    return LIVE_KEY + event_id


def _records(out: list, n: int) -> list[UserRecord]:
    """Lua reply -> records. ZRANGE from -H keeps the newest H even when a reader catches
    a user between a ZADD and its trim; oldest first, as it ascends by score."""
    hist, seen_raw, cats = out[0::3], out[1::3], out[2::3]
    # Every member is "<key>|<item>|<ts>": split the whole batch at once, parse in C.
    tokens = b" ".join(m for ms in hist for m in ms).replace(b"|", b" ").split()
    counts = [len(ms) for ms in hist]
    items = _split(tokens[1::3], counts, np.int64)
    ts = _split(tokens[2::3], counts, np.float64)
    seen = _split([x for xs in seen_raw for x in xs], [len(xs) for xs in seen_raw], np.int64)
    records = []
    for i in range(n):
        if not hist[i] and not seen_raw[i] and not cats[i]:
            records.append(ABSENT)
            continue
        c = cats[i]
        records.append(
            UserRecord(
                exists=True,
                history_items=items[i],
                history_ts=ts[i],
                seen=np.sort(seen[i]),
                cats={c[k].decode(): c[k + 1].decode() for k in range(0, len(c), 2)},
            )
        )
    return records


def _split(tokens: list[bytes], counts: list[int], dtype) -> list[np.ndarray]:
    """Numbers as text -> one array per user, parsed in one C call. Text keeps int64 ids
    exact (no float round trip)."""
    flat = np.fromstring(b" ".join(tokens), dtype=dtype, sep=" ")
    return np.split(flat, np.cumsum(counts)[:-1])


def _positions(sorted_ids: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of each query in `sorted_ids` and whether it is there."""
    if len(sorted_ids) == 0:
        return np.zeros(len(queries), np.int64), np.zeros(len(queries), bool)
    pos = np.minimum(np.searchsorted(sorted_ids, queries), len(sorted_ids) - 1)
    return pos, sorted_ids[pos] == queries


def _digest(*parts: object) -> str:
    """A seed's default epoch: the same input gives the same epoch (seeding is idempotent)."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(
            np.ascontiguousarray(p).tobytes() if isinstance(p, np.ndarray) else repr(p).encode()
        )
    return h.hexdigest()
