"""What `recommend` does for one dynamic batch, without Triton in the way.

The Triton model (model_repository/recommend/1/model.py) only converts tensors
and passes a `retrieve(version, features)` callable that makes the BLS call.
Tests pass one that runs onnxruntime in-process, so the logic below is tested
without a server and the same code runs inside one.

Per batch:
  1. refresh routing and online features from disk (at most once a second);
  2. route every user to production or canary by a hash of the user id;
  3. one retrieval call per version for all its users (never one per user);
  4. drop already-seen items from the over-fetched candidates, keep the first k;
  5. hand the served rows to the impression hook, build per-request answers.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from feedback.events import ServedImpressions
from feedback.explore import rank_with_exploration
from feedback.ids import uuid7_batch
from models.features import FeatureVocab
from models.snapshot import FeatureSnapshot, UserFeatures
from online.cache import CachedFeatures
from serving import repository as layout
from serving.backend import InputError, check_int_matrix
from serving.live import VOCAB_STEM, StoreFeatures
from serving.metrics import NO_VERSION, BatchMetrics
from serving.routing import RoutingState, StoreRouting, unservable

log = logging.getLogger(__name__)

# retrieve(version, features) -> (item_ids (n, K), scores (n, K)) from `retrieval`.
Retrieve = Callable[[int, UserFeatures], tuple[np.ndarray, np.ndarray]]


class StateFileError(RuntimeError):
    """A state file (routing.json, a version's features) is missing or unreadable and no
    good copy of it was ever read. The message names the file."""


@dataclass
class _Watched:
    """A file's parsed content, re-read when its mtime or size changes.

    A file that turns unreadable (torn, truncated, deleted) keeps serving its last good
    content: the problem is kept in `error` and reported once per change of the file
    (`on_error`), never raised while a good copy exists. Without one, `get` raises
    StateFileError naming the file.
    """

    path: Path
    load: Callable[[Path], object]
    on_error: Callable[[Path, str], None] | None = None
    value: object = None
    stamp: tuple[int, int] | None = None  # (mtime_ns, size) of the content in `value`
    seen: tuple[int, int] | None = None  # the stamp last looked at, good or bad
    error: str | None = None

    def get(self) -> object:
        regular = True
        try:
            st = self.path.stat()
            stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
            regular = stat.S_ISREG(st.st_mode)
        except FileNotFoundError:
            stamp = None
        if stamp is not None and stamp == self.stamp and regular:
            self.error = None
            return self.value
        if stamp == self.seen and self.error is not None:  # still bad, already reported
            return self._last_good()
        self.seen = stamp
        if stamp is None:
            return self._bad(f"{self.path}: missing")
        if not regular:  # a FIFO would block the reader (and the request) forever
            return self._bad(f"{self.path}: not a regular file")
        try:
            value = self.load(self.path)
        except Exception as exc:  # torn, truncated, not ours: keep what we had
            return self._bad(f"{self.path}: unreadable ({type(exc).__name__}: {exc})")
        self.value, self.stamp, self.error = value, stamp, None
        return value

    def _bad(self, message: str) -> object:
        self.error = message
        kept = "serving its last good copy" if self.stamp is not None else "no good copy yet"
        log.error("%s; %s", message, kept)
        if self.on_error is not None:
            self.on_error(self.path, message)
        return self._last_good()

    def _last_good(self) -> object:
        if self.stamp is None:
            raise StateFileError(self.error)
        return self.value


class OnlineState:
    """Routing, per-version feature snapshots and version metadata, as the server sees them."""

    def __init__(
        self,
        repo: str | Path,
        *,
        check_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        store: CachedFeatures | None = None,
    ):
        self.repo = Path(repo)
        # The shared online store (serving/live.py): when set, every version reads live
        # features from it through its own vocabulary, instead of its snapshot file.
        self.store = store
        self._live: dict[int, StoreFeatures] = {}
        self.check_interval_s = check_interval_s
        self.clock = clock
        # Told (path, message) when a state file turns unreadable: `recommend` counts it on
        # the metrics endpoint (serving.metrics.STATE_ERRORS).
        self.on_error: list[Callable[[Path, str], None]] = []
        self._routing = _Watched(layout.routing_path(self.repo), self._load_routing, self._error)
        # With the store, routing is its record (serving.routing.StoreRouting): re-read with
        # the rest, at most once per check_interval_s, and switched at the record's instant;
        # routing.json is only read while the store has no record. A failed read keeps the
        # last good record and is counted as the state "file" routing.store.
        self._store_routing: StoreRouting | None = None
        if store is not None:
            inner = store.store  # online.store.RedisFeatureStore: reuse its connection
            self._store_routing = StoreRouting.from_client(
                inner.redis,
                prefix=inner.prefix,
                url=inner.config.url,
                check=functools.partial(self._check_routing, where=inner.config.url),
                on_error=functools.partial(
                    self._error, layout.routing_path(self.repo).with_name("routing.store")
                ),
            )
        self._features: dict[int, _Watched] = {}
        self._meta: dict[int, dict] = {}
        self._checked = -float("inf")
        # Called with the routed versions on every refresh: whoever holds per-version state
        # (serving.inline's onnxruntime sessions) drops what left the routing, as below.
        self.on_routing: list[Callable[[list[int]], None]] = []

    def _load_routing(self, path: Path) -> RoutingState:
        routing = RoutingState.load(path)
        self._check_routing(routing, where=str(path))
        return routing

    def _check_routing(self, routing: RoutingState, where: str) -> None:
        """Refuse (ValueError) a well-formed routing whose production is not a complete
        version here: taking it would fail every request while readiness says ready, so
        the last good routing stays in service and the refusal is counted as a state error.
        A canary without files only fails over to production per request (counted there)."""
        if why := unservable(self.repo, routing, canary=False):
            raise ValueError(f"{where}: routing refused: production {'; '.join(why)}")

    def _error(self, path: Path, message: str) -> None:
        for fn in self.on_error:
            fn(path, message)

    def refresh(self, force: bool = False) -> None:
        """stat() the files we depend on, at most once per `check_interval_s`. A file that
        turned bad keeps its last good content (see _Watched); nothing here raises for it."""
        now = self.clock()
        if not force and now - self._checked < self.check_interval_s:
            return
        self._checked = now
        routed = self._refresh_routing()
        if routed is not None:
            # A version that left the routing (promoted over, rolled back) would otherwise
            # keep its snapshot in this process forever: one more per retrain, for the life
            # of the server. A late request for it simply loads it again.
            for v in set(self._features) - set(routed):
                del self._features[v]
                self._meta.pop(v, None)
            for v in set(self._live) - set(routed):
                del self._live[v]
            for fn in self.on_routing:
                fn(list(routed))
        for w in self._features.values():
            with contextlib.suppress(StateFileError):  # never read: its requests say why
                w.get()

    def _refresh_routing(self) -> tuple[int, ...] | None:
        """Re-read the routing source; the versions that may be routed to until the next
        re-read (both sides of a pending switch), or None when there is no routing."""
        if self._store_routing is not None and self._store_routing.refresh():
            return self._store_routing.versions()
        try:
            return self._routing.get().versions
        except StateFileError:
            return None

    @property
    def routing_epoch(self) -> int:
        """The store's routing epoch in service; 0 when routing comes from routing.json."""
        return self._store_routing.epoch if self._store_routing is not None else 0

    @property
    def routing(self) -> RoutingState:
        if self._store_routing is not None and self._store_routing.has_record:
            return self._store_routing.routing()  # in force now: the record names the instant
        if self._routing.stamp is not None:
            return self._routing.value
        try:
            return self._routing.get()
        except StateFileError as exc:
            raise StateFileError(f"{exc}; no routing state: run `northstar export` first") from None

    def features(self, version: int) -> FeatureSnapshot | StoreFeatures:
        if self.store is not None:
            return self._store_features(version)
        w = self._features.get(version)
        if w is None:
            w = self._features[version] = _Watched(
                layout.features_path(self.repo, version), FeatureSnapshot.load, self._error
            )
        if w.stamp is not None:
            return w.value
        try:
            return w.get()
        except StateFileError as exc:
            raise StateFileError(
                f"no online features for retrieval version {version}: {exc}"
            ) from None

    def _store_features(self, version: int) -> StoreFeatures:
        live = self._live.get(version)
        if live is None:
            path = layout.features_dir(self.repo, version) / VOCAB_STEM
            try:  # a published version's vocabulary never changes: read once
                vocab = FeatureVocab.load(path)
            except (OSError, ValueError, KeyError) as exc:
                raise StateFileError(
                    f"no vocabulary for retrieval version {version} ({path}.json/.npz): {exc}"
                ) from None
            live = self._live[version] = StoreFeatures(vocab, self.store)
        return live

    def take_degraded(self) -> dict[int, int]:
        """Per version: users answered as cold starts because the store did not answer."""
        out = {v: live.take_degraded() for v, live in self._live.items()}
        return {v: n for v, n in out.items() if n}

    def meta(self, version: int) -> dict:
        if version not in self._meta:  # a published version never changes
            self._meta[version] = layout.read_meta(self.repo, version)
        return self._meta[version]

    def problems(self) -> list[str]:
        """The state files that are bad right now (each still served from a good copy)."""
        out = [w.error for w in (self._routing, *self._features.values()) if w.error]
        if self._store_routing is not None and self._store_routing.last_error:
            out.append(self._store_routing.last_error)
        return out

    def max_k(self) -> int:
        """The largest k every routed version can answer.

        A canary without metadata (not exported here) does not block production: its
        users fall back to production at request time.
        """
        routing = self.routing
        ks = [int(self.meta(routing.production)["k"])]
        for v in routing.versions[1:]:
            try:
                ks.append(int(self.meta(v)["k"]))
            except (FileNotFoundError, KeyError, ValueError):
                log.warning("retrieval version %d has no readable meta.json", v)
        return min(ks)


@dataclass(frozen=True)
class ParsedRequest:
    user_ids: np.ndarray  # (B,) int64
    ks: np.ndarray  # (B,) int64


@dataclass
class RequestResult:
    item_ids: np.ndarray  # (B, W) int64, W = max k of the request, PAD_ITEM where short
    scores: np.ndarray  # (B, W) float32
    model_version: np.ndarray  # (B, 1) int64
    request_id: np.ndarray  # (B, 1) object (bytes)
    cold_start: np.ndarray  # (B, 1) bool


@dataclass
class BatchResult:
    results: list[RequestResult | InputError | RuntimeError]
    impressions: ServedImpressions  # the rows served in the batch, for the event log
    versions: dict[int, int] = field(default_factory=dict)  # version -> users served
    # Per routed version: users, errors by reason (serving.metrics); latencies are added by
    # `observe_latency` once the caller knows the batch's total time.
    metrics: BatchMetrics = field(default_factory=BatchMetrics)
    serve_s: dict[str, float] = field(default_factory=dict)  # version -> time serving it
    # One per (answered request, routed version it touched): (version, its serve time)
    answered: list[tuple[str, float]] = field(default_factory=list)

    def observe_latency(self, total_s: float) -> BatchMetrics:
        """Each answered request's latency: the batch's shared work (state, parsing, the
        event log) plus the time spent on its own version(s), so a slow canary shows up in
        the canary's latency and not in production's."""
        shared = max(0.0, total_s - sum(self.serve_s.values()))
        for version, own in self.answered:
            self.metrics.add_latency(version, (shared + own) * 1000.0, 1)
        return self.metrics


# Above this many (row, candidate, seen item) comparisons the sort-based path is cheaper.
_BROADCAST_CELLS = 1 << 20


def _absent_id(item_ids: np.ndarray) -> int:
    """An id no candidate has: pads the seen lists of the broadcast path."""
    return int(item_ids.min()) - 1 if item_ids.size else 0


def select_unseen(
    item_ids: np.ndarray, scores: np.ndarray, seen: list[np.ndarray], ks: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Drop seen items and keep the first k per row, vectorised over the batch.

    item_ids/scores (n, K) in rank order; seen: n arrays of raw ids; ks (n,).
    Returns (ids (n, W), scores (n, W), counts (n,)) with W = max(ks); short rows padded.
    """
    n, K = item_ids.shape
    lens = np.fromiter((len(s) for s in seen), dtype=np.int64, count=n)
    width = int(ks.max()) if n else 0
    keep = np.ones((n, K), dtype=bool)
    longest = int(lens.max()) if n else 0
    if longest and n * K * longest <= _BROADCAST_CELLS:
        # Short seen lists (the common case per request): compare every candidate with its
        # row's seen items at once: faster than sorting at a dynamic batch's sizes.
        padded = np.full((n, longest), _absent_id(item_ids), dtype=item_ids.dtype)  # (n, L)
        padded[np.arange(longest)[None, :] < lens[:, None]] = np.concatenate(seen)
        keep = ~(item_ids[:, :, None] == padded[:, None, :]).any(axis=2)
    elif longest:
        # Same (row, item) pair on both sides <=> seen: code items densely, then one isin.
        seen_items = np.concatenate(seen)
        seen_rows = np.repeat(np.arange(n), lens)
        uniq, codes = np.unique(np.concatenate([item_ids.ravel(), seen_items]), return_inverse=True)
        m = np.int64(len(uniq))
        cand_key = np.repeat(np.arange(n), K) * m + codes[: n * K]
        seen_key = seen_rows * m + codes[n * K :]
        keep = ~np.isin(cand_key, seen_key).reshape(n, K)
    rank = np.cumsum(keep, axis=1) - 1  # position among kept items
    take = keep & (rank < ks[:, None])
    rows, cols = np.nonzero(take)
    out_ids = np.full((n, width), layout.PAD_ITEM, dtype=np.int64)
    out_scores = np.full((n, width), layout.PAD_SCORE, dtype=np.float32)
    out_ids[rows, rank[rows, cols]] = item_ids[rows, cols]
    out_scores[rows, rank[rows, cols]] = scores[rows, cols]
    return out_ids, out_scores, take.sum(axis=1)


@dataclass(frozen=True)
class RequestLimits:
    """How much one `recommend` request may ask for. Every served slate is written to the
    event log (fsync'd) before the answer goes out, so without a bound a small request of
    many user ids and a large k makes the server write users x k rows: one client could
    fill the disk and slow every other client's answers. A request over a bound is refused
    whole (400, naming the input and the limit); the server goes on serving.

    Set in recommend's config.pbtxt `parameters` (`max_users_per_request`,
    `max_impressions_per_request`); absent: these defaults.
    """

    # Rows of `user_id` in one request. The default is recommend's max_batch_size, so a
    # client may still fill a batch with one request; lower it per deployment.
    max_users_per_request: int = 256
    # Slate slots one request may ask for: the sum of its k over its users, the most
    # impressions it can log. The binding bound by default: 256 users at k=8, or 20 at
    # k=100; a request of 256 users at k=100 would log 25,600 rows.
    max_impressions_per_request: int = 2048

    def __post_init__(self) -> None:
        for name in ("max_users_per_request", "max_impressions_per_request"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected >= 1")

    @classmethod
    def from_params(cls, params: dict[str, str]) -> RequestLimits:
        """From a model config's parameters (strings); absent or blank keys keep defaults."""
        kw = {}
        for f in fields(cls):
            text = (params.get(f.name) or "").strip()
            if text:
                try:
                    kw[f.name] = int(text)
                except ValueError:
                    raise ValueError(
                        f"recommend parameter {f.name}={text!r}: expected an integer"
                    ) from None
        return cls(**kw)


class Recommender:
    def __init__(
        self,
        repo: str | Path,
        *,
        default_k: int = 10,
        check_interval_s: float = 1.0,
        epsilon: float = 0.0,
        seed: int | None = None,
        store: CachedFeatures | None = None,
        limits: RequestLimits | None = None,
    ):
        self.state = OnlineState(repo, check_interval_s=check_interval_s, store=store)
        self.default_k = int(default_k)
        self.limits = limits or RequestLimits()
        # ε-greedy exploration (feedback/explore.py): the share of slates served a random
        # ranking of the unseen candidates, so the log supports off-policy evaluation.
        self.epsilon = float(epsilon)
        self.rng = np.random.default_rng(seed)
        # Request ids draw from their own OS-seeded generator, made once: seeding a fresh one
        # per batch showed in every batch's cost, and ids must not consume the (seedable)
        # exploration stream.
        self._id_rng = np.random.default_rng()
        # The last production version that answered: where users go if their version fails
        # (e.g. routing.json names a version Triton has not loaded yet).
        self.last_good: int | None = None

    def check_servable(self) -> int:
        """Production's version, once its routing, metadata and features are readable now;
        else the error names the file. `recommend` refuses to load (so the server is not
        ready) when this fails: ready means it can answer."""
        self.state.refresh(force=True)
        production = self.state.routing.production
        self.state.meta(production)
        self.state.features(production)
        return production

    def begin(self) -> int:
        """Refresh state for a new batch; returns the largest k requests may ask for."""
        self.state.refresh()
        return self.state.max_k()

    def parse(self, user_id: np.ndarray | None, k: np.ndarray | None, max_k: int) -> ParsedRequest:
        uid = check_int_matrix(
            "user_id",
            user_id,
            width=1,
            low=0,
            # The event log refuses negative ids: a slate it could not log is never shown.
            what="raw user ids, >= 0 like every id the event log stores",
        )
        b = uid.shape[0]
        lim = self.limits
        if b > lim.max_users_per_request:
            raise InputError(
                f"input 'user_id' has {b} rows: at most {lim.max_users_per_request} users per "
                "request (max_users_per_request); split the users over several requests"
            )
        if k is None:
            ks = np.full(b, self.default_k, dtype=np.int64)
        else:
            ks = check_int_matrix(
                "k",
                k,
                width=1,
                dtype=np.int32,
                low=1,
                high=max_k + 1,
                # Triton parses JSON into INT32 first: a value past 2^31-1 wraps before it
                # arrives here, and the message says so rather than show a surprise.
                what="items per user; an INT32, so values past 2147483647 arrive wrapped",
                rows=b,
            )[:, 0].astype(np.int64)
        asked = int(ks.sum())
        if asked > lim.max_impressions_per_request:
            raise InputError(
                f"input 'k' asks for {asked} items over {b} users: at most "
                f"{lim.max_impressions_per_request} per request (max_impressions_per_request, "
                "every served item is logged); ask for fewer users or a smaller k"
            )
        return ParsedRequest(uid[:, 0], ks)

    def run(self, parsed: list[ParsedRequest | InputError], retrieve: Retrieve) -> BatchResult:
        """Answer every parsed request of a batch; InputErrors pass through in place."""
        ok = [p for p in parsed if isinstance(p, ParsedRequest)]
        metrics = BatchMetrics()
        if bad := len(parsed) - len(ok):  # refused before routing: no version to blame
            metrics.requests[NO_VERSION] += bad
            metrics.errors[(NO_VERSION, "bad_input")] += bad
        if not ok:
            return BatchResult(list(parsed), ServedImpressions.empty(), metrics=metrics)
        user_ids = np.concatenate([p.user_ids for p in ok])  # (N,)
        ks = np.concatenate([p.ks for p in ok])
        n = len(user_ids)
        width = int(ks.max())
        ids = np.full((n, width), layout.PAD_ITEM, dtype=np.int64)
        scores = np.full((n, width), layout.PAD_SCORE, dtype=np.float32)
        counts = np.zeros(n, dtype=np.int64)
        propensity = np.zeros((n, width), dtype=np.float64)
        served_by = np.zeros(n, dtype=np.int64)
        cold = np.zeros(n, dtype=bool)
        failed: dict[int, str] = {}  # row -> message

        routing = self.state.routing
        routed = routing.version_for(user_ids)
        # Every version fills the same output arrays, each for its own rows.
        serve = functools.partial(
            self._serve,
            user_ids=user_ids,
            ks=ks,
            retrieve=retrieve,
            ids=ids,
            scores=scores,
            counts=counts,
            served_by=served_by,
            cold=cold,
            prop=propensity,
        )
        # version -> (its metrics label, seconds spent serving it in this batch)
        spent: dict[int, tuple[str, float]] = {}
        for version in np.unique(routed):
            rows = np.flatnonzero(routed == version)
            label = str(int(version))
            t0 = time.perf_counter()
            error = serve(int(version), rows)
            fb = self.last_good
            fell_back = False
            if error and fb is not None and fb != version:
                log.warning(
                    "retrieval version %d failed (%s); answering with %d", version, error, fb
                )
                error = serve(fb, rows)
                fell_back = error is None
            spent[int(version)] = (label, time.perf_counter() - t0)
            metrics.requests[label] += len(rows)
            if error:
                failed.update(dict.fromkeys(rows.tolist(), error))
                metrics.errors[(label, "failed")] += len(rows)
            elif fell_back:  # answered, but not by the version under test: its error
                metrics.errors[(label, "fallback")] += len(rows)
            elif version == routing.production:
                self.last_good = int(version)

        # Not `n`: that is the batch's row count, which the request ids below need.
        for v, count in self.state.take_degraded().items():
            metrics.errors[(str(v), "degraded")] += count

        # Time-ordered ids (UUIDv7 as 32 hex digits): impression event ids start with them,
        # and the log's unique index stays fast when new keys land at its end.
        request_ids = uuid7_batch(n, rng=self._id_rng)
        results: list[RequestResult | InputError | RuntimeError] = []
        answered: list[tuple[str, float]] = []
        start = 0
        for p in parsed:
            if not isinstance(p, ParsedRequest):
                results.append(p)
                continue
            sl = slice(start, start + len(p.user_ids))
            start = sl.stop
            errs = [failed[r] for r in range(sl.start, sl.stop) if r in failed]
            if errs:
                results.append(RuntimeError(errs[0]))
                continue
            # One latency per (request, version it touched): a request for users of both
            # arms counts in each, with that version's own serve time.
            touched = np.unique(routed[sl]) if len(p.user_ids) > 1 else routed[sl]
            answered += [spent[int(v)] for v in touched]
            w = int(p.ks.max())
            results.append(
                RequestResult(
                    item_ids=ids[sl, :w].copy(),
                    scores=scores[sl, :w].copy(),
                    model_version=served_by[sl, None].copy(),
                    request_id=np.array([r.encode() for r in request_ids[sl]], dtype=object)[
                        :, None
                    ],
                    cold_start=cold[sl, None].copy(),
                )
            )
        good = np.ones(n, dtype=bool)
        good[list(failed)] = False
        imp = _impressions(request_ids, user_ids, ids, scores, counts, served_by, good, propensity)
        versions = {
            int(v): int(c)
            for v, c in zip(*np.unique(served_by[good], return_counts=True), strict=True)
        }
        serve_s = {label: secs for label, secs in spent.values()}
        return BatchResult(results, imp, versions, metrics, serve_s, answered)

    def _serve(
        self, version, rows, user_ids, ks, retrieve, ids, scores, counts, served_by, cold, prop
    ):
        """Fill `rows` from one retrieval version; returns an error message or None."""
        try:
            feats = self.state.features(version).lookup(user_ids[rows])
            cand_ids, cand_scores = retrieve(version, feats)  # (n, K) each
        except Exception as exc:  # the caller decides: fall back or fail these requests
            return f"retrieval version {version}: {exc}"
        if self.epsilon > 0:
            # Every unseen candidate, compacted in rank order; then the greedy k or, for an
            # ε share of rows, a random k, with the propensity of each shown slot.
            n_cand = np.full(len(rows), cand_ids.shape[1], dtype=np.int64)
            all_ids, all_scores, _ = select_unseen(cand_ids, cand_scores, feats.seen, n_cand)
            r = rank_with_exploration(
                all_ids,
                all_scores,
                ks[rows],
                epsilon=self.epsilon,
                rng=self.rng,
                pad_item=layout.PAD_ITEM,
                pad_score=layout.PAD_SCORE,
            )
            sel_ids, sel_scores, sel_prop = r.item_ids, r.scores, r.propensity
            cnt = (sel_ids != layout.PAD_ITEM).sum(axis=1)
        else:
            sel_ids, sel_scores, cnt = select_unseen(cand_ids, cand_scores, feats.seen, ks[rows])
            sel_prop = (np.arange(sel_ids.shape[1])[None, :] < cnt[:, None]).astype(np.float64)
        prop[rows, : sel_prop.shape[1]] = sel_prop
        ids[rows, : sel_ids.shape[1]] = sel_ids
        scores[rows, : sel_scores.shape[1]] = sel_scores
        counts[rows] = cnt
        served_by[rows] = version
        cold[rows] = ~feats.known
        return None


def _impressions(
    request_ids, user_ids, ids, scores, counts, served_by, good, propensity
) -> ServedImpressions:
    w = ids.shape[1]
    mask = (np.arange(w)[None, :] < counts[:, None]) & good[:, None]  # (n, W) served cells
    rows, pos = np.nonzero(mask)
    return ServedImpressions(
        request_id=request_ids[rows],
        user_id=user_ids[rows],
        item_id=ids[rows, pos],
        position=pos.astype(np.int32),
        score=scores[rows, pos],
        model_version=served_by[rows],
        propensity=propensity[rows, pos],
    )


class ImpressionSink:
    """Where served rows go when no event log is configured: nowhere (serving still works)."""

    def write(self, impressions: ServedImpressions) -> None:
        """Called once per batch with every served row; the default drops them."""
