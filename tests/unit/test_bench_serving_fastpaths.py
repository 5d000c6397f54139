"""The per-request fast paths taken for the benchmark targets give the same answers.

- serving.backend.check_int_matrix: valid input returns at once; every kind of bad input
  still raises InputError with the same message as before;
- serving.recommender.select_unseen: the broadcast path (short seen lists) and the
  sort-based path agree with a plain per-row reference.
"""

from __future__ import annotations

import numpy as np
import pytest

from serving import recommender
from serving.backend import InputError, check_int_matrix
from serving.recommender import select_unseen

# ----------------------------------------------------------------------------- check_int_matrix


def test_check_int_matrix_valid_returns_the_array():
    a = np.array([[1, 2], [3, 0]], dtype=np.int64)
    assert check_int_matrix("x", a, width=2, high=np.array([4, 3])) is a
    u = np.array([[-(2**63)]], dtype=np.int64)
    assert check_int_matrix("user_id", u, width=1, low=np.iinfo(np.int64).min) is u
    k = np.array([[3]], dtype=np.int32)
    assert check_int_matrix("k", k, width=1, dtype=np.int32, low=1, high=11, rows=1) is k


@pytest.mark.parametrize(
    ("arr", "kwargs", "message"),
    [
        (None, {}, "missing required input 'x': expected INT64 [B, 2] (codes)"),
        (
            np.zeros((1, 2), np.int32),
            {},
            "input 'x' has dtype int32: expected INT64 [B, 2] (codes)",
        ),
        (np.zeros((1, 3), np.int64), {}, "input 'x' has shape [1, 3]: expected INT64 [B, 2]"),
        (np.zeros(2, np.int64), {}, "input 'x' has shape [2]: expected INT64 [B, 2]"),
        (np.zeros((0, 2), np.int64), {}, "input 'x' is an empty batch"),
        (np.zeros((2, 2), np.int64), {"rows": 3}, "input 'x' has 2 rows: expected 3"),
        (
            np.array([[0, 1], [0, -1]], np.int64),
            {},
            "input 'x' has value -1 at row 1, column 1: expected values in 0..2 (codes)",
        ),
        (
            np.array([[0, 5]], np.int64),
            {"high": np.array([9, 5])},
            "input 'x' has value 5 at row 0, column 1: expected values in 0..4 (codes)",
        ),
    ],
)
def test_check_int_matrix_errors_name_the_problem(arr, kwargs, message):
    kw = {"width": 2, "high": 3, "what": "codes", **kwargs}
    with pytest.raises(InputError) as err:
        check_int_matrix("x", arr, **kw)
    assert message in str(err.value)


def test_check_int_matrix_without_high_reports_lower_bound():
    with pytest.raises(InputError, match=r"value 0 at row 0: expected values >= 1"):
        check_int_matrix("k", np.array([[0]], np.int32), width=1, dtype=np.int32, low=1)


# ----------------------------------------------------------------------------- select_unseen


def _reference(item_ids, scores, seen, ks):
    n = len(item_ids)
    width = int(ks.max()) if n else 0
    ids = np.full((n, width), -1, dtype=np.int64)
    sc = np.full((n, width), 0.0, dtype=np.float32)
    counts = np.zeros(n, dtype=np.int64)
    for i in range(n):
        keep = [j for j in range(item_ids.shape[1]) if item_ids[i, j] not in set(seen[i])]
        keep = keep[: ks[i]]
        ids[i, : len(keep)] = item_ids[i, keep]
        sc[i, : len(keep)] = scores[i, keep]
        counts[i] = len(keep)
    return ids, sc, counts


@pytest.mark.parametrize("path", ["broadcast", "sort"])
@pytest.mark.parametrize("seed", range(4))
def test_select_unseen_paths_match_reference(monkeypatch, path, seed):
    if path == "sort":
        monkeypatch.setattr(recommender, "_BROADCAST_CELLS", 0)
    rng = np.random.default_rng(seed)
    n, K = int(rng.integers(1, 40)), 30
    item_ids = np.stack([rng.choice(np.arange(-5, 200) * 7, K, replace=False) for _ in range(n)])
    scores = np.sort(rng.random((n, K)).astype(np.float32), axis=1)[:, ::-1]
    seen = []
    for i in range(n):
        m = int(rng.integers(0, 25))  # some users saw nothing, some most candidates
        own = rng.choice(item_ids[i], min(m, K), replace=False)
        other = rng.integers(-100, 2000, int(rng.integers(0, 5)))
        seen.append(np.concatenate([own, other]).astype(np.int64))
    ks = rng.integers(1, K + 1, n)
    got = select_unseen(item_ids, scores, seen, ks)
    want = _reference(item_ids, scores, seen, ks)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


def test_select_unseen_nobody_saw_anything_and_empty_batch():
    ids = np.array([[5, 6, 7]], dtype=np.int64)
    sc = np.array([[0.9, 0.8, 0.7]], dtype=np.float32)
    out, _, c = select_unseen(ids, sc, [np.zeros(0, np.int64)], np.array([2]))
    np.testing.assert_array_equal(out, [[5, 6]])
    np.testing.assert_array_equal(c, [2])
    e_ids, _, e_c = select_unseen(np.zeros((0, 3), np.int64), np.zeros((0, 3)), [], np.zeros(0))
    assert e_ids.shape == (0, 0) and len(e_c) == 0
