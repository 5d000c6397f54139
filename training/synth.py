"""A synthetic streaming world with ground truth, reproducible from a seed.

The world knows *why* each user watches what they watch: every user has a latent taste that
drifts over the period, every item a latent factor and a popularity, and a choice model ties
them together. Training only ever sees the sampled interactions; the simulator, the canary
tests and the oracle checks read the ground truth through the public methods of `World`.

Shapes: U = n_users, I = n_items, d = latent dim, B = a batch, K = candidates per row.
Indices (`user_idx`, `item_idx`) are dense 0-based positions into the ground-truth arrays.
Raw ids in the tables are `idx + 1`, so that code which confuses the two fails loudly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from common.files import atomic_path, atomic_write_text
from training.schema import Dataset

WORLD_ARRAYS_FILE = "world.npz"
WORLD_CONFIG_FILE = "world.json"
_FORMAT_VERSION = 1

# Shares loosely follow streaming-service panels; "X" is small but present so that the
# fairness audit has a minority group to find gaps in.
GENDERS = ("F", "M", "X")
GENDER_SHARES = (0.49, 0.48, 0.03)
# The same buckets are used by the MovieLens loader so that audits compare like with like.
AGE_BUCKETS = ("18-24", "25-34", "35-44", "45-54", "55+")
AGE_SHARES = (0.18, 0.30, 0.22, 0.16, 0.14)
ACTIVITY_LEVELS = ("low", "medium", "high")
PROVIDERS = ("major", "indie")
# Event kinds the world emits; all are members of schema.EVENT_TYPES.
SYNTH_EVENT_TYPES = ("click", "watch", "like")
GENRE_NAMES = (
    "drama", "comedy", "action", "thriller", "documentary", "animation", "romance", "scifi",
    "horror", "crime", "family", "reality", "fantasy", "music", "sports", "history",
    "war", "western", "anime", "kids", "mystery", "musical", "news", "talk",
)  # fmt: skip

_DAY_S = 86_400
# Catalogue items "released at start" are spread over the three years before the period,
# so that the back catalogue has a believable range of ages.
_BACK_CATALOGUE_S = 3 * 365 * _DAY_S


@dataclass(frozen=True)
class SynthConfig:
    """Everything that defines a world. Same config (seed included) -> same world, bit for bit."""

    n_users: int = 3_000
    n_items: int = 1_000
    # Target row count; the result can be a little lower after (user, item) dedupe.
    n_interactions: int = 80_000
    # Enough genres for visible clusters in the latent space without tiny genres.
    n_genres: int = 16
    # 16 dims: enough for groups + genres + individual noise, small enough that a two-tower
    # model with d=32..64 can represent the truth exactly.
    dim: int = 16
    # About one season of a streaming service: long enough for drift and releases to matter.
    days: int = 120
    # 2024-01-01T00:00:00Z, fixed so that timestamps do not depend on when the code runs.
    start_ts: int = 1_704_067_200
    seed: int = 0
    # Item popularity is lognormal with this sigma. A lognormal, unlike Zipf over ranks, has
    # the same head share at every catalogue size, so presets behave alike. At 1.0 the top 1%
    # of items get ~9% of exposure and the top 20% ~55%, close to MovieLens. (Zipf at 0.8
    # gave the top 1% ~20% at 3k items and more at 100k, and a most-popular list that no
    # personalised model could beat by much.)
    popularity_sigma: float = 1.0
    # Weight of taste . factor (a cosine of ~unit vectors) in the choice logit. The higher
    # it is, the further the oracle and a trained model pull ahead of most-popular
    # (docs/results.md, "Synthetic world settings"). 8 leaves margin for a trainer on a short
    # budget; choices are still far from deterministic.
    taste_beta: float = 8.0
    # Length of the drift vector reached at the end of the period (taste norm is ~1), so
    # late-period tastes are visibly different: models trained on old data go stale.
    drift: float = 0.5
    # Scale of the gender and age-bucket offsets (each ~unit norm) added to the taste. At 0.4
    # groups differ visibly (and pick different favourite genres) while individuals still
    # differ more within a group than groups do on average.
    group_bias: float = 0.4
    # Noise (relative to the unit genre centroid) in item factors: 0.5 keeps genres distinct
    # but items within a genre still differ, so genre alone is not the whole answer.
    item_spread: float = 0.5
    # The same for users around their favourite genre: room for individual taste beyond genre
    # (what a learned model can exploit and a genre-popularity baseline cannot).
    user_spread: float = 0.5
    # Lognormal sigma of per-user activity: a long tail of heavy users as in real logs.
    activity_sigma: float = 1.0
    # The rest of the catalogue is released uniformly over the period: cold items to handle.
    frac_released_at_start: float = 0.6
    # Examination model: P(examine position p) = 1 / (1 + p) ** eta. eta = 1 is the classic
    # 1/rank decay measured in eye-tracking studies.
    position_decay: float = 1.0
    # Items a user "browses" per interaction; the choice is a softmax over them.
    n_candidates: int = 32
    # Relevance = sigmoid(taste_beta * taste.factor + relevance_pop_weight * z(log pop) - offset).
    # At offset 3 an examined random item is rarely clicked, the most popular items a little
    # more often and the oracle's top 10 almost always (docs/results.md, "Synthetic world
    # settings"), so CTR gaps between models are large enough to measure in a short canary.
    relevance_offset: float = 3.0
    # Popular items are a little more clickable at equal taste (social proof), but weakly.
    relevance_pop_weight: float = 0.25

    def __post_init__(self) -> None:
        for name in ("n_users", "n_items", "n_interactions", "n_genres", "dim", "days"):
            if getattr(self, name) < 1:
                raise ValueError(f"SynthConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_candidates < 1:
            raise ValueError(f"SynthConfig.n_candidates must be >= 1, got {self.n_candidates}")
        if not 0.0 <= self.frac_released_at_start <= 1.0:
            raise ValueError("SynthConfig.frac_released_at_start must be in [0, 1]")
        if self.popularity_sigma < 0 or self.position_decay < 0:
            raise ValueError("SynthConfig.popularity_sigma and position_decay must be >= 0")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> SynthConfig:
        """A named size. Overrides replace single fields, e.g. `preset("tiny", seed=3)`."""
        if name not in PRESETS:
            raise ValueError(f"unknown synth preset {name!r}; expected one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    @property
    def period_s(self) -> int:
        return self.days * _DAY_S

    @property
    def end_ts(self) -> int:
        return self.start_ts + self.period_s


PRESETS: dict[str, SynthConfig] = {
    # Unit tests: generates in tens of milliseconds.
    "tiny": SynthConfig(n_users=300, n_items=200, n_interactions=6_000, n_genres=6),
    # Quick experiments and integration tests.
    "small": SynthConfig(n_users=3_000, n_items=1_000, n_interactions=80_000, n_genres=16),
    # The demo's preset: big enough to show the whole loop, small enough to train on a CPU.
    "demo": SynthConfig(n_users=20_000, n_items=3_000, n_interactions=400_000, n_genres=20),
    # Serving and load tests at production-like catalogue size; chunked generation.
    "large": SynthConfig(
        n_users=1_000_000, n_items=100_000, n_interactions=20_000_000, n_genres=24
    ),
}


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # tanh form: no overflow warnings for large |x|


def activity_buckets(counts: np.ndarray) -> np.ndarray:
    """Map interaction counts to "low" / "medium" / "high" by count terciles.

    Thresholds are the 1/3 and 2/3 quantiles of `counts`: low <= q1 < medium <= q2 < high.
    Users with equal counts always land in the same bucket (a rank split would separate them
    arbitrarily), so buckets can be unequal in size when many users share a count.
    """
    counts = np.asarray(counts)
    if counts.size == 0:
        return np.empty(0, dtype=object)
    q1, q2 = np.quantile(counts, [1 / 3, 2 / 3])
    level = (counts > q1).astype(np.int8) + (counts > q2).astype(np.int8)  # 0, 1, 2
    return np.asarray(ACTIVITY_LEVELS, dtype=object)[level]


class AliasSampler:
    """O(1)-per-draw categorical sampling (Walker/Vose alias method).

    Why not cumsum + searchsorted: at the "large" size we draw 640M candidates, and a binary
    search over 100k items per draw made sampling a large share of generating the world.
    The table is built once, in O(n).
    """

    def __init__(self, weights: np.ndarray) -> None:
        p = np.asarray(weights, dtype=np.float64)
        if p.ndim != 1 or p.size == 0 or not np.all(p >= 0) or p.sum() <= 0:
            raise ValueError("AliasSampler needs a non-empty 1-D array of non-negative weights")
        n = p.size
        scaled = (p * (n / p.sum())).tolist()
        threshold = np.ones(n, dtype=np.float64)
        alias = np.arange(n, dtype=np.int64)
        small = [i for i, v in enumerate(scaled) if v < 1.0]
        large = [i for i, v in enumerate(scaled) if v >= 1.0]
        while small and large:
            s, g = small.pop(), large.pop()
            threshold[s], alias[s] = scaled[s], g
            scaled[g] += scaled[s] - 1.0
            (small if scaled[g] < 1.0 else large).append(g)
        # Leftovers are 1.0 up to rounding: they keep threshold 1 and alias to themselves.
        self.n = n
        self._threshold = threshold.astype(np.float32)
        self._alias = alias.astype(np.int32 if n < 2**31 else np.int64)

    def sample(self, rng: np.random.Generator, size: int | tuple[int, ...]) -> np.ndarray:
        j = rng.integers(0, self.n, size=size, dtype=self._alias.dtype)
        keep = rng.random(size=size, dtype=np.float32) < self._threshold[j]
        return np.where(keep, j, self._alias[j])


# Ground-truth arrays, in the order they are saved. Dtypes are part of the contract.
_ARRAY_FIELDS: dict[str, type] = {
    "user_base": np.float32,  # (U, d) taste at the start of the period
    "user_drift_dir": np.float32,  # (U, d) unit direction the taste moves in
    "user_gender": np.int8,  # (U,) index into GENDERS
    "user_age": np.int8,  # (U,) index into AGE_BUCKETS
    "user_rate": np.float64,  # (U,) relative activity rate (how often the user shows up)
    "item_factors": np.float32,  # (I, d) unit-norm latent factors
    "item_genre": np.int16,  # (I,) index into genre_names()
    "item_popularity": np.float64,  # (I,) exposure probability, sums to 1
    "item_provider": np.int8,  # (I,) index into PROVIDERS
    "item_release_ts": np.int64,  # (I,) unix seconds
    "item_duration_s": np.float32,  # (I,) running time, bounds the watch seconds
}


@dataclass(frozen=True, eq=False)
class World:
    """The ground truth of one synthetic world. Build with `World.generate(cfg)`.

    All arrays are read-only: a simulator that mutated the truth would silently invalidate
    every comparison made against it.
    """

    cfg: SynthConfig
    user_base: np.ndarray
    user_drift_dir: np.ndarray
    user_gender: np.ndarray
    user_age: np.ndarray
    user_rate: np.ndarray
    item_factors: np.ndarray
    item_genre: np.ndarray
    item_popularity: np.ndarray
    item_provider: np.ndarray
    item_release_ts: np.ndarray
    item_duration_s: np.ndarray
    _log_pop: np.ndarray = field(init=False, repr=False)
    _pop_z: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        cfg = self.cfg
        expected = {"user": (cfg.n_users,), "item": (cfg.n_items,)}
        for name, dtype in _ARRAY_FIELDS.items():
            arr = np.ascontiguousarray(getattr(self, name), dtype=dtype)
            lead = expected[name.split("_", 1)[0]]
            is_matrix = name in ("user_base", "user_drift_dir", "item_factors")
            want = (*lead, cfg.dim) if is_matrix else lead
            if arr.shape != want:
                raise ValueError(f"World.{name}: shape {arr.shape}, expected {want}")
            arr.flags.writeable = False
            object.__setattr__(self, name, arr)
        log_pop = np.log(self.item_popularity)
        object.__setattr__(self, "_log_pop", log_pop.astype(np.float32))
        z = (log_pop - log_pop.mean()) / max(float(log_pop.std()), 1e-12)
        object.__setattr__(self, "_pop_z", z.astype(np.float32))

    # ------------------------------------------------------------------ construction

    @classmethod
    def generate(cls, cfg: SynthConfig) -> World:
        """Draw the ground truth. Uses its own random stream: `[seed, 0]`."""
        rng = np.random.default_rng([cfg.seed, 0])
        d, n_u, n_i = cfg.dim, cfg.n_users, cfg.n_items

        # Items: genre centroid + noise, unit norm so that taste . factor is a cosine.
        genre_share = rng.dirichlet(np.full(cfg.n_genres, 5.0))  # mildly unequal genre sizes
        genre = rng.choice(cfg.n_genres, size=n_i, p=genre_share).astype(np.int16)
        centroids = _unit_rows(rng.standard_normal((cfg.n_genres, d)))
        item_noise = rng.standard_normal((n_i, d)) / math.sqrt(d)
        factors = _unit_rows(centroids[genre] + cfg.item_spread * item_noise)

        # Users: a favourite genre + group offsets + individual noise. Real viewers have a home
        # genre; without one, tastes are diffuse and popularity explains almost everything.
        # The favourite is drawn from a group-dependent distribution (offsets . centroids), so
        # gender and age shift both the latent taste and which genres a group watches.
        gender = rng.choice(len(GENDERS), size=n_u, p=GENDER_SHARES).astype(np.int8)
        age = rng.choice(len(AGE_BUCKETS), size=n_u, p=AGE_SHARES).astype(np.int8)
        gender_off = rng.standard_normal((len(GENDERS), d)) / math.sqrt(d)
        age_off = rng.standard_normal((len(AGE_BUCKETS), d)) / math.sqrt(d)
        group = cfg.group_bias * (gender_off[gender] + age_off[age])  # (U, d)
        fav_logits = 4.0 * (group @ centroids.T) + rng.gumbel(size=(n_u, cfg.n_genres))
        favourite = np.argmax(fav_logits, axis=1)
        noise = rng.standard_normal((n_u, d)) / math.sqrt(d)
        base = _unit_rows(centroids[favourite] + group + cfg.user_spread * noise)

        # Each user drifts towards a genre they pick up during the period: a realistic kind of
        # drift (a new interest), and one a retrained model can catch but a stale one cannot.
        new_interest = rng.integers(0, cfg.n_genres, size=n_u)
        drift_dir = _unit_rows(centroids[new_interest] - base)

        # Popularity is drawn independently of taste, so the popularity baseline cannot stand
        # in for personalisation.
        popularity = rng.lognormal(0.0, cfg.popularity_sigma, size=n_i)
        popularity /= popularity.sum()
        # Majors own most of the head and little of the tail: P(major) goes 0.7 -> 0.15.
        rank = np.argsort(np.argsort(-popularity))  # 0 = most popular
        p_major = 0.15 + 0.55 * (1.0 - rank / max(n_i - 1, 1)) ** 2
        provider = np.where(rng.random(n_i) < p_major, 0, 1).astype(np.int8)

        at_start = rng.random(n_i) < cfg.frac_released_at_start
        back = cfg.start_ts - rng.integers(0, _BACK_CATALOGUE_S, size=n_i)
        fresh = cfg.start_ts + rng.integers(1, cfg.period_s, size=n_i)
        release_ts = np.where(at_start, back, fresh)

        # ~45 min median running time: episodes and films mixed.
        duration = np.exp(rng.normal(math.log(2_700.0), 0.5, size=n_i)).clip(300, 4 * 3_600)
        rate = rng.lognormal(0.0, cfg.activity_sigma, size=n_u)

        return cls(
            cfg=cfg,
            user_base=base,
            user_drift_dir=drift_dir,
            user_gender=gender,
            user_age=age,
            user_rate=rate,
            item_factors=factors,
            item_genre=genre,
            item_popularity=popularity,
            item_provider=provider,
            item_release_ts=release_ts,
            item_duration_s=duration,
        )

    # ------------------------------------------------------------------ ground truth API

    @property
    def n_users(self) -> int:
        return self.cfg.n_users

    @property
    def n_items(self) -> int:
        return self.cfg.n_items

    def genre_names(self) -> tuple[str, ...]:
        n = self.cfg.n_genres
        extra = tuple(f"genre_{k}" for k in range(len(GENRE_NAMES), n))
        return (GENRE_NAMES + extra)[:n]

    def elapsed_frac(self, ts: np.ndarray | int) -> np.ndarray:
        """Fraction of the period elapsed at `ts`, clipped to [0, 1]."""
        t = np.asarray(ts, dtype=np.float64)
        return np.clip((t - self.cfg.start_ts) / self.cfg.period_s, 0.0, 1.0)

    def taste(self, user_idx: np.ndarray, ts: np.ndarray | int) -> np.ndarray:
        """True taste at time `ts`: base + drift * elapsed_frac * drift_dir.

        `user_idx` and `ts` broadcast (numpy rules); returns broadcast_shape + (d,), float32.
        """
        u, t = np.broadcast_arrays(np.asarray(user_idx), np.asarray(ts))
        frac = (self.cfg.drift * self.elapsed_frac(t)).astype(np.float32)[..., None]
        return self.user_base[u] + frac * self.user_drift_dir[u]

    def affinity(
        self, user_idx: np.ndarray, item_idx: np.ndarray, ts: np.ndarray | int
    ) -> np.ndarray:
        """Taste part of the choice logit: taste_beta * taste(ts) . factor. Broadcasts."""
        u, i, t = np.broadcast_arrays(np.asarray(user_idx), np.asarray(item_idx), np.asarray(ts))
        dots = np.einsum("...d,...d->...", self.taste(u, t), self.item_factors[i])
        return (self.cfg.taste_beta * dots).astype(np.float32)

    def choice_logit(
        self, user_idx: np.ndarray, item_idx: np.ndarray, ts: np.ndarray | int
    ) -> np.ndarray:
        """Log-odds (up to a per-user constant) that the user *chooses* the item to watch.

        P(choose i | u, t) is proportional to popularity_i * exp(affinity(u, i, t)) over the
        items available at t (exactly so as n_candidates grows; with 32 candidates the log is
        a little more popularity-driven). Ranking by this is the oracle recommender.
        Broadcasts.
        """
        return self.affinity(user_idx, item_idx, ts) + self._log_pop[np.asarray(item_idx)]

    def oracle_scores(self, user_idx: np.ndarray, ts: np.ndarray | int) -> np.ndarray:
        """choice_logit against the whole catalogue, -inf for unreleased items.

        user_idx: (B,), ts: scalar or (B,). Returns (B, I) float32.
        """
        u = np.atleast_1d(np.asarray(user_idx))
        t = np.broadcast_to(np.asarray(ts), u.shape)
        scores = self.cfg.taste_beta * (self.taste(u, t) @ self.item_factors.T) + self._log_pop
        scores[self.item_release_ts[None, :] > t[:, None]] = -np.inf
        return scores.astype(np.float32, copy=False)

    def relevance(
        self, user_idx: np.ndarray, item_idx: np.ndarray, ts: np.ndarray | int
    ) -> np.ndarray:
        """P(click | the user examines the item) in (0, 1). Broadcasts.

        sigmoid(affinity + relevance_pop_weight * z(log popularity) - relevance_offset).
        """
        i = np.asarray(item_idx)
        logit = (
            self.affinity(user_idx, i, ts)
            + self.cfg.relevance_pop_weight * self._pop_z[i]
            - self.cfg.relevance_offset
        )
        return _sigmoid(logit.astype(np.float64))

    def examination(self, position: np.ndarray | int) -> np.ndarray:
        """P(the user looks at slot `position`); position 0 is the top. 1 / (1 + p) ** eta."""
        p = np.asarray(position, dtype=np.float64)
        if np.any(p < 0):
            raise ValueError("positions must be >= 0 (0 is the top slot)")
        return 1.0 / (1.0 + p) ** self.cfg.position_decay

    def click_prob(
        self,
        user_idx: np.ndarray,
        item_idx: np.ndarray,
        position: np.ndarray | int,
        ts: np.ndarray | int,
    ) -> np.ndarray:
        """Position-based click model: examination(position) * relevance(u, i, ts)."""
        return self.examination(position) * self.relevance(user_idx, item_idx, ts)

    def sample_clicks(
        self,
        user_idx: np.ndarray,
        item_idx: np.ndarray,
        position: np.ndarray | int,
        ts: np.ndarray | int,
        rng: np.random.Generator,
    ) -> np.ndarray:
        """Bernoulli draws of click_prob; bool array of the broadcast shape."""
        p = self.click_prob(user_idx, item_idx, position, ts)
        return rng.random(p.shape) < p

    def available(self, item_idx: np.ndarray, ts: np.ndarray | int) -> np.ndarray:
        """True where the item has been released by `ts`. Broadcasts."""
        return self.item_release_ts[np.asarray(item_idx)] <= np.asarray(ts)

    # ------------------------------------------------------------------ ids and tables

    def user_index(self, user_ids: np.ndarray | pd.Series) -> np.ndarray:
        """Raw user ids -> dense indices. Raises ValueError for ids not in this world."""
        return _dense_index(user_ids, self.cfg.n_users, "user_id")

    def item_index(self, item_ids: np.ndarray | pd.Series) -> np.ndarray:
        """Raw item ids -> dense indices. Raises ValueError for ids not in this world."""
        return _dense_index(item_ids, self.cfg.n_items, "item_id")

    @staticmethod
    def user_id_of(user_idx: np.ndarray) -> np.ndarray:
        return np.asarray(user_idx, dtype=np.int64) + 1

    @staticmethod
    def item_id_of(item_idx: np.ndarray) -> np.ndarray:
        return np.asarray(item_idx, dtype=np.int64) + 1

    def users_frame(self, interactions: pd.DataFrame | None = None) -> pd.DataFrame:
        """The users table in the schema.

        `activity` comes from interaction-count terciles of `interactions` when given (what a
        real pipeline would see); otherwise from the true activity rates (expected counts).
        """
        if interactions is not None:
            counts = np.bincount(
                self.user_index(interactions["user_id"].to_numpy()), minlength=self.n_users
            )
        else:
            counts = self.user_rate
        return pd.DataFrame(
            {
                "user_id": self.user_id_of(np.arange(self.n_users)),
                "gender": np.asarray(GENDERS, dtype=object)[self.user_gender],
                "age_bucket": np.asarray(AGE_BUCKETS, dtype=object)[self.user_age],
                "activity": activity_buckets(counts),
                "occupation": np.full(self.n_users, "unknown", dtype=object),
            }
        )

    def items_frame(self) -> pd.DataFrame:
        """The items table in the schema."""
        return pd.DataFrame(
            {
                "item_id": self.item_id_of(np.arange(self.n_items)),
                "genre": np.asarray(self.genre_names(), dtype=object)[self.item_genre],
                "provider": np.asarray(PROVIDERS, dtype=object)[self.item_provider],
                "release_ts": self.item_release_ts.astype(np.int64),
            }
        )

    # ------------------------------------------------------------------ interaction log

    def sample_interactions(
        self,
        rng: np.random.Generator | None = None,
        progress: bool = True,
        chunk_rows: int = 1 << 17,
    ) -> pd.DataFrame:
        """Sample the historical interaction log, in the schema of training/schema.py.

        Each row: a user drawn in proportion to their activity rate; a time uniform in the
        period; `n_candidates` items drawn by popularity; unreleased candidates dropped; one
        chosen by Gumbel-max on affinity. Sampling candidates by popularity and choosing by
        exp(affinity) is sampling-importance-resampling of P(i) ~ popularity_i * exp(affinity):
        adding log(popularity) to the Gumbel logits as well would count popularity twice.

        Each (user, item) pair is kept once, at its earliest time (a streaming log records the
        first play; re-watches carry no new preference signal). Duplicates are topped up with
        fresh draws for a few rounds, so the result is close to, and never above,
        `cfg.n_interactions`.

        `chunk_rows` bounds memory: the (chunk, K) logits and candidates are ~50 MB at the
        default. `rng` defaults to the stream `[seed, 1]`.
        """
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, 1]) if rng is None else rng
        user_sampler = AliasSampler(self.user_rate)
        item_sampler = AliasSampler(self.item_popularity)
        show = progress and sys.stderr.isatty()
        target = cfg.n_interactions
        users: list[np.ndarray] = []
        items: list[np.ndarray] = []
        times: list[np.ndarray] = []
        have, dup_rate = 0, 0.0  # dup_rate: share of the last round's draws that were repeats
        with tqdm(total=target, desc="synth interactions", unit="row", disable=not show) as bar:
            for _ in range(8):  # top-up rounds; usually 2-3 close the gap to < 0.1%
                need = target - have
                if need <= max(1, target // 1000):
                    break
                draws = math.ceil(need / max(1.0 - dup_rate, 0.05) * 1.02)
                for start in range(0, draws, chunk_rows):
                    u, i, t = self._sample_chunk(
                        rng, min(chunk_rows, draws - start), user_sampler, item_sampler
                    )
                    users.append(u)
                    items.append(i)
                    times.append(t)
                    bar.update(min(len(u), max(target - bar.n, 0)))
                drawn = sum(len(x) for x in users[1:]) if have else sum(map(len, users))
                u, i, t = self._dedupe(
                    np.concatenate(users), np.concatenate(items), np.concatenate(times)
                )
                users, items, times = [u], [i], [t]
                dup_rate = 1.0 - (len(u) - have) / max(drawn, 1)
                have = len(u)
                bar.n = min(have, target)
                bar.refresh()
        u, i, t = users[0], items[0], times[0]
        if len(u) > target:  # drop the surplus at random, not by time, to keep time uniform
            keep = np.sort(rng.choice(len(u), size=target, replace=False))
            u, i, t = u[keep], i[keep], t[keep]
        u, i, t = self._time_order(u, i, t)
        event, value = self._engagement(u, i, t, rng)
        return pd.DataFrame(
            {
                "user_id": self.user_id_of(u),
                "item_id": self.item_id_of(i),
                "timestamp": t.astype(np.int64),
                "event_type": event,
                "value": value,
            }
        )

    def _sample_chunk(
        self,
        rng: np.random.Generator,
        n: int,
        user_sampler: AliasSampler,
        item_sampler: AliasSampler,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        cfg = self.cfg
        u = user_sampler.sample(rng, n)  # (n,)
        t = cfg.start_ts + rng.integers(0, cfg.period_s, size=n)  # (n,)
        cand = item_sampler.sample(rng, (n, cfg.n_candidates))  # (n, K)
        avail = self.item_release_ts[cand] <= t[:, None]  # (n, K)
        taste = self.taste(u, t)  # (n, d)
        # Gather candidate factors block by block: a (4096, K, d) float32 block stays in
        # cache for the einsum, where gathering the whole chunk at once went to DRAM and was
        # several times slower; it is most of the cost of the "large" preset.
        logits = np.empty(cand.shape, dtype=np.float32)  # (n, K)
        block = 4096
        factors = np.empty((min(block, n), cfg.n_candidates, cfg.dim), dtype=np.float32)
        for s in range(0, n, block):
            c = cand[s : s + block]
            f = factors[: len(c)]  # (b, K, d)
            np.take(self.item_factors, c, axis=0, out=f)
            np.einsum("nd,nkd->nk", taste[s : s + block], f, out=logits[s : s + block])
        logits *= cfg.taste_beta
        # Gumbel-max in float32: half the memory traffic of float64, ample precision here.
        gumbel = rng.random(size=logits.shape, dtype=np.float32)
        with np.errstate(divide="ignore"):  # u == 0 gives a Gumbel of -inf: never chosen
            np.log(gumbel, out=gumbel)
            np.negative(gumbel, out=gumbel)
            np.log(gumbel, out=gumbel)
        logits -= gumbel
        logits[~avail] = -np.inf
        best = np.argmax(logits, axis=1)
        ok = avail.any(axis=1)  # rows whose candidates were all unreleased are dropped
        chosen = cand[np.arange(n), best]
        return u[ok], chosen[ok], t[ok]

    def _dedupe(
        self, u: np.ndarray, i: np.ndarray, t: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Keep the earliest row of each (user, item) pair. Output is in pair order."""
        pair, when = self._pair_key(u, i), t - self.cfg.start_ts
        if (packed := self._pack(pair, when, self.cfg.period_s)) is not None:
            packed.sort()  # by pair, then time
            pair, when = self._unpack(packed, self.cfg.period_s)
            first = np.r_[True, pair[1:] != pair[:-1]]
            pair, when = pair[first], when[first]
        else:
            order = np.lexsort((when, pair))
            first = np.r_[True, pair[order][1:] != pair[order][:-1]]
            pair, when = pair[order][first], when[order][first]
        return (*self._split_pair(pair, u.dtype, i.dtype), when + self.cfg.start_ts)

    def _time_order(
        self, u: np.ndarray, i: np.ndarray, t: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sort rows by (timestamp, user, item): the order Dataset.from_frames settles on."""
        pair, when = self._pair_key(u, i), t - self.cfg.start_ts
        n_pairs = self.cfg.n_users * self.cfg.n_items
        if (packed := self._pack(when, pair, n_pairs)) is not None:
            packed.sort()
            when, pair = self._unpack(packed, n_pairs)
        else:
            order = np.lexsort((pair, when))
            when, pair = when[order], pair[order]
        return (*self._split_pair(pair, u.dtype, i.dtype), when + self.cfg.start_ts)

    # Sorting one packed int64 is an order of magnitude faster than np.lexsort on two keys
    # at the "large" preset's size, and that preset sorts several times. Falls back to
    # lexsort when the two keys do not fit in 62 bits.
    def _pair_key(self, u: np.ndarray, i: np.ndarray) -> np.ndarray:
        return u.astype(np.int64) * self.cfg.n_items + i.astype(np.int64)

    def _split_pair(
        self, pair: np.ndarray, u_dtype: np.dtype, i_dtype: np.dtype
    ) -> tuple[np.ndarray, np.ndarray]:
        u, i = np.divmod(pair, self.cfg.n_items)
        return u.astype(u_dtype), i.astype(i_dtype)

    @staticmethod
    def _pack(hi: np.ndarray, lo: np.ndarray, lo_bound: int) -> np.ndarray | None:
        lo_bits = max(int(lo_bound - 1).bit_length(), 1)
        hi_max = int(hi.max(initial=0))
        if hi_max.bit_length() + lo_bits > 62:
            return None
        return (hi.astype(np.int64) << lo_bits) | lo.astype(np.int64)

    @staticmethod
    def _unpack(packed: np.ndarray, lo_bound: int) -> tuple[np.ndarray, np.ndarray]:
        lo_bits = max(int(lo_bound - 1).bit_length(), 1)
        return packed >> lo_bits, packed & ((1 << lo_bits) - 1)

    def _engagement(
        self, u: np.ndarray, i: np.ndarray, t: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Event type and watch seconds: more relevant items are watched further.

        Completion ~ relevance + noise. Under 15% is a bounce ("click"); over 80% is a
        "like" half of the time; anything else is a "watch". Value is always watch seconds.
        """
        completion = np.empty(len(u), dtype=np.float64)
        step = 1 << 20  # bounded temporaries on the large preset
        for s in range(0, len(u), step):
            rel = self.relevance(u[s : s + step], i[s : s + step], t[s : s + step])
            completion[s : s + step] = rel + 0.2 * rng.standard_normal(len(rel))
        completion = completion.clip(0.01, 1.0)
        liked = (completion > 0.8) & (rng.random(len(u)) < 0.5)
        kind = np.where(completion < 0.15, 0, np.where(liked, 2, 1))
        event = np.asarray(SYNTH_EVENT_TYPES, dtype=object)[kind]
        value = (completion * self.item_duration_s[i]).astype(np.float32)
        return event, value

    # ------------------------------------------------------------------ persistence

    def save(self, directory: str | Path) -> Path:
        """Write world.npz (arrays) and world.json (config). No pickle anywhere."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        arrays = {name: getattr(self, name) for name in _ARRAY_FIELDS}
        with atomic_path(directory / WORLD_ARRAYS_FILE, suffix=".npz") as tmp:
            np.savez(tmp, **arrays)
        meta = {"format_version": _FORMAT_VERSION, "config": dataclasses.asdict(self.cfg)}
        atomic_write_text(
            directory / WORLD_CONFIG_FILE, json.dumps(meta, indent=2, sort_keys=True) + "\n"
        )
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> World:
        directory = Path(directory)
        meta_path, npz_path = directory / WORLD_CONFIG_FILE, directory / WORLD_ARRAYS_FILE
        for path in (meta_path, npz_path):
            if not path.exists():
                raise FileNotFoundError(f"{path}: not found; expected a saved synthetic world")
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != _FORMAT_VERSION:
            raise ValueError(
                f"{meta_path}: format_version {meta.get('format_version')!r}, "
                f"expected {_FORMAT_VERSION}"
            )
        known = {f.name for f in dataclasses.fields(SynthConfig)}
        unknown = sorted(set(meta["config"]) - known)
        if unknown:
            raise ValueError(f"{meta_path}: unknown config fields {unknown}")
        cfg = SynthConfig(**meta["config"])
        with np.load(npz_path, allow_pickle=False) as npz:
            missing = [name for name in _ARRAY_FIELDS if name not in npz.files]
            if missing:
                raise ValueError(f"{npz_path}: missing arrays {missing}")
            arrays = {name: npz[name] for name in _ARRAY_FIELDS}
        return cls(cfg=cfg, **arrays)


def _dense_index(ids: np.ndarray | pd.Series, n: int, column: str) -> np.ndarray:
    idx = np.asarray(ids, dtype=np.int64) - 1
    bad = (idx < 0) | (idx >= n)
    if bad.any():
        examples = (idx[bad][:3] + 1).tolist()
        raise ValueError(f"{column}: ids {examples} are not in this world (valid: 1..{n})")
    return idx


def generate_dataset(cfg: SynthConfig, progress: bool = True) -> tuple[World, Dataset]:
    """Generate a world and its interaction log, validated against the schema."""
    world = World.generate(cfg)
    interactions = world.sample_interactions(progress=progress)
    dataset = Dataset.from_frames(
        world.users_frame(interactions),
        world.items_frame(),
        interactions,
        source=f"synth:seed={cfg.seed}",
    )
    return world, dataset
