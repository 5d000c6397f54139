"""Non-neural baselines, ranked by `training.evaluate.evaluate` through the model's code path.

Each baseline is fitted on the evaluation's known interactions (`History`) and then scores
the full catalogue for a block of evaluated users; evaluation excludes known items, takes
the top K and computes the same metrics as for the model. So a baseline sees exactly what
the model sees: the same candidates, the same exclusions, the same users.

- `TopPop`: interactions per item over the whole history.
- `RecentPop(window)`: interactions per item in the last days or the newest share of the
  history (`models.prior.RecentWindow`); ties broken by all-time popularity.
- `EASE(lam)`: Steck, "Embarrassingly Shallow Autoencoders for Sparse Data", WWW 2019. An
  item-item linear model in closed form: P = (XᵀX + λI)⁻¹, B = I - P·diag(1/diag(P)) (so
  diag(B) = 0), scores = X_u B, X the binary user x item matrix of the history. The N x N
  matrices need ~2 x 8·N² bytes, so above `max_items` it is skipped with the reason.
  Users with no history get TopPop scores (an all-zero row of X ranks nothing).

`parse_baseline("recentpop:7d")` turns a config string into one.
"""

from __future__ import annotations

import abc
import logging
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from models.prior import RecentWindow

log = logging.getLogger(__name__)

EASE_MAX_ITEMS = 20_000  # 20k² float64 = 3.2 GB per matrix; P and G/B make two


class BaselineSkipped(RuntimeError):
    """The baseline cannot run on this data; the message says why."""


@dataclass(frozen=True)
class History:
    """The known interactions of one evaluation, encoded. Rows with unknown items dropped."""

    n_items: int
    n_eval_users: int
    items: np.ndarray  # (n,) dense item index
    users: np.ndarray  # (n,) raw user id (every known user, evaluated or not)
    eval_rows: np.ndarray  # (n,) row of the user among the evaluated users, -1 if not one
    timestamps: np.ndarray  # (n,) seconds

    def popularity(self) -> np.ndarray:
        """(n_items,) interactions per item over the whole history."""
        return np.bincount(self.items, minlength=self.n_items).astype(np.float64)


class Baseline(abc.ABC):
    """fit(history) once per evaluation, then score(rows) -> (len(rows), n_items) float64.

    `rows` index the evaluated users (0..n_eval_users-1). Higher is better; known items are
    excluded by the evaluator, not here. `fit` raises BaselineSkipped when it cannot run.
    """

    name: str

    @abc.abstractmethod
    def fit(self, history: History) -> None: ...

    @abc.abstractmethod
    def score(self, rows: np.ndarray) -> np.ndarray: ...

    def describe(self) -> dict:
        """Parameters for metrics.json."""
        return {}


def _index_tie_break(n_items: int) -> np.ndarray:
    # Tiny, index-based, so that equal counts rank deterministically.
    return np.arange(n_items) * 1e-9


class _Static(Baseline):
    """The same scores for every user."""

    _scores: np.ndarray

    def score(self, rows: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self._scores, (len(rows), self._scores.size)).copy()


class TopPop(_Static):
    name = "toppop"

    def fit(self, history: History) -> None:
        self._scores = history.popularity() - _index_tie_break(history.n_items)


class RecentPop(_Static):
    def __init__(self, window: RecentWindow | str):
        self.window = RecentWindow.parse(window) if isinstance(window, str) else window
        self.name = f"recentpop_{self.window.label}"

    def fit(self, history: History) -> None:
        recent = self.window.counts(history.items, history.timestamps, history.n_items)
        total = history.popularity()
        # All-time popularity breaks ties among equal recent counts (it stays below 1).
        self._scores = (
            recent + 0.5 * total / (total.max() + 1.0) - _index_tie_break(history.n_items) * 1e-3
        )

    def describe(self) -> dict:
        return {"window_days": self.window.days, "window_share": self.window.share}


def ease_weights(x: sp.spmatrix | np.ndarray, lam: float) -> np.ndarray:
    """(N, N) float64 B of EASE for the binary user x item matrix `x` (U, N)."""
    g = x.T @ x
    g = g.toarray() if sp.issparse(g) else np.array(g)
    g = g.astype(np.float64, copy=False)
    g[np.diag_indices_from(g)] += lam
    p = np.linalg.inv(g)
    b = p / (-np.diag(p))  # column j divided by -P_jj
    b[np.diag_indices_from(b)] = 0.0
    return b


def _binary(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    m = sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=shape)
    m.sum_duplicates()
    m.data[:] = 1.0  # a re-watch is one interaction
    return m


class EASE(Baseline):
    name = "ease"

    def __init__(self, lam: float = 200.0, max_items: int = EASE_MAX_ITEMS):
        if lam <= 0:
            raise ValueError(f"EASE lambda={lam}: expected > 0")
        self.lam = float(lam)
        self.max_items = int(max_items)

    def fit(self, history: History) -> None:
        n = history.n_items
        if n > self.max_items:
            gb = 2 * 8 * n * n / 1e9
            raise BaselineSkipped(
                f"catalogue of {n} items > ease_max_items={self.max_items}: the item-item "
                f"matrices would need ~{gb:.1f} GB"
            )
        _, user_code = np.unique(history.users, return_inverse=True)
        x = _binary(user_code, history.items, (int(user_code.max(initial=-1)) + 1, n))
        self._b = ease_weights(x, self.lam).astype(np.float32)
        sel = history.eval_rows >= 0
        self._x_eval = _binary(
            history.eval_rows[sel], history.items[sel], (history.n_eval_users, n)
        )
        self._has_history = np.diff(self._x_eval.indptr) > 0
        self._fallback = history.popularity() - _index_tie_break(n)

    def score(self, rows: np.ndarray) -> np.ndarray:
        s = np.asarray(self._x_eval[rows] @ self._b, dtype=np.float64)
        cold = ~self._has_history[rows]
        if cold.any():
            s[cold] = self._fallback
        return s

    def describe(self) -> dict:
        return {"lambda": self.lam, "max_items": self.max_items}


def parse_baseline(spec: str, *, ease_max_items: int = EASE_MAX_ITEMS) -> Baseline:
    """ "toppop" | "recentpop:<window>" ("7d", "10%") | "ease" | "ease:<lambda>"."""
    kind, _, arg = str(spec).strip().lower().partition(":")
    if kind == "toppop" and not arg:
        return TopPop()
    if kind == "recentpop" and arg:
        return RecentPop(arg)
    if kind == "ease":
        return EASE(float(arg) if arg else 200.0, max_items=ease_max_items)
    raise ValueError(
        f"baseline {spec!r}: expected 'toppop', 'recentpop:<7d|10%>' or 'ease[:<lambda>]'"
    )
