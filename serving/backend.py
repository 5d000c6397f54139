"""Code the Triton Python models run, kept out of model_repository/ so it is tested in-process.

Nothing here imports `triton_python_backend_utils`: the model.py files adapt
Triton tensors to numpy and errors to `pb_utils.TritonError`, and call this.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from models.ann import ANN_MODES, AnnSearch
from models.features import (
    INPUT_HISTORY,
    INPUT_HISTORY_TS,
    INPUT_USER_CATS,
    INPUT_USER_INDEX,
    OUTPUT_NAMES,
    graph_input_names,
)
from models.onnx_session import onnx_session


class InputError(ValueError):
    """A bad request. The message names the input and what was expected."""


def check_int_matrix(
    name: str,
    arr: np.ndarray | None,
    *,
    width: int,
    dtype: type = np.int64,
    low: int | np.ndarray = 0,
    high: int | np.ndarray | None = None,
    what: str = "",
    rows: int | None = None,
) -> np.ndarray:
    """Check presence, dtype, shape (B, width) and value range [low, high); return the array.

    `low`/`high` may be per-column arrays (one bound per categorical attribute).
    Called per request in `recommend`, so a valid input costs a few comparisons and the
    error message is only built for a bad one.
    """
    want = np.dtype(dtype)
    if (
        arr is not None
        and arr.dtype == want
        and arr.ndim == 2
        and arr.shape[1] == width
        and arr.shape[0] > 0
        and (rows is None or arr.shape[0] == rows)
        and not (arr < low).any()
        and (high is None or not (arr >= high).any())
    ):
        return arr
    return _raise_int_matrix_error(name, arr, width, want, low, high, what, rows)


def _raise_int_matrix_error(name, arr, width, dtype, low, high, what, rows) -> np.ndarray:
    """check_int_matrix's slow path: find what is wrong and say so (or return a valid arr)."""
    dtype_name = np.dtype(dtype).name.upper()
    expect = f"{dtype_name} [B, {width}]" + (f" ({what})" if what else "")
    if arr is None:
        raise InputError(f"missing required input '{name}': expected {expect}")
    if arr.dtype != np.dtype(dtype):
        raise InputError(f"input '{name}' has dtype {arr.dtype}: expected {expect}")
    if arr.ndim != 2 or arr.shape[1] != width:
        raise InputError(f"input '{name}' has shape {list(arr.shape)}: expected {expect}")
    if arr.shape[0] == 0:
        raise InputError(f"input '{name}' is an empty batch: expected {expect} with B >= 1")
    if rows is not None and arr.shape[0] != rows:
        raise InputError(f"input '{name}' has {arr.shape[0]} rows: expected {rows} like the others")
    lo = np.broadcast_to(np.asarray(low), (width,))
    bad = arr < lo
    if high is not None:
        bad |= arr >= np.broadcast_to(np.asarray(high), (width,))
    if bad.any():
        r, c = (int(x[0]) for x in np.nonzero(bad))
        where = f"row {r}" if width == 1 else f"row {r}, column {c}"
        if high is None:
            allowed = f">= {int(lo[c])}"
        else:
            allowed = f"in {int(lo[c])}..{int(np.broadcast_to(np.asarray(high), (width,))[c]) - 1}"
        raise InputError(
            f"input '{name}' has value {int(arr[r, c])} at {where}: expected values {allowed}"
            + (f" ({what})" if what else "")
        )
    return arr


class RetrievalRunner:
    """One onnxruntime session over a version's model.onnx; many requests, one run."""

    def __init__(
        self,
        version_dir: str | Path,
        *,
        intra_op_threads: int = 0,
        allow_spinning: bool = False,
        prepack: bool = True,
    ):
        version_dir = Path(version_dir)
        self.meta = json.loads((version_dir / "meta.json").read_text())
        # An ANN version (models/ann.py) answers from its user tower and faiss index; its
        # model.onnx is the exact graph, kept for the gpu target and other readers.
        self.mode = self.meta.get("index", {}).get("mode", "exact")
        self.ann: AnnSearch | None = None
        self.session = None
        if self.mode in ANN_MODES:
            self.ann = AnnSearch(version_dir, self.meta, threads=intra_op_threads)
        else:
            self.session = onnx_session(
                version_dir / "model.onnx",
                intra_op_threads=intra_op_threads,
                allow_spinning=allow_spinning,
                prepack=prepack,
            )
        b = self.meta["bounds"]
        d = self.meta["dims"]
        # The graph's inputs: three, or four for a sequence tower that reads time gaps.
        self.input_names = graph_input_names(self.meta)
        self.widths = {
            INPUT_USER_INDEX: 1,
            INPUT_USER_CATS: int(d["n_user_cats"]),
            INPUT_HISTORY: int(d["history_len"]),
            INPUT_HISTORY_TS: int(d["history_len"]),
        }
        self.high = {
            INPUT_USER_INDEX: int(b["user_rows"]),
            INPUT_USER_CATS: np.asarray(b["user_cat_cardinalities"], dtype=np.int64),
            INPUT_HISTORY: int(b["n_items"]) + 1,
            INPUT_HISTORY_TS: None,
        }
        self.what = {
            INPUT_USER_INDEX: "dense user row",
            INPUT_USER_CATS: "category codes, 0 = unknown",
            INPUT_HISTORY: "item index + 1, 0 = padding",
            INPUT_HISTORY_TS: "unix seconds of each history item, 0 = padding",
        }

    def validate(self, feeds: dict[str, np.ndarray | None]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        rows = None
        for name in self.input_names:
            out[name] = check_int_matrix(
                name,
                feeds.get(name),
                width=self.widths[name],
                high=self.high[name],
                what=self.what[name],
                rows=rows,
            )
            rows = out[name].shape[0]
        return out

    def run(self, batch: list[dict[str, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Concatenate the requests of a dynamic batch, run the graph once, split the result."""
        if not batch:
            return []
        sizes = [f[INPUT_USER_INDEX].shape[0] for f in batch]
        feeds = {
            n: np.concatenate([f[n] for f in batch]) if len(batch) > 1 else batch[0][n]
            for n in self.input_names
        }
        if self.ann is not None:
            ids, scores = self.ann.run(feeds)
        else:
            ids, scores = self.session.run(list(OUTPUT_NAMES), feeds)  # (ΣB, K) each
        cuts = np.cumsum(sizes)[:-1]
        return list(zip(np.split(ids, cuts), np.split(scores, cuts), strict=True))
