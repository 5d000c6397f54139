"""Approximate retrieval: the user tower's graph, then a faiss index over the item table.

A version exported with `index.mode = hnsw | ivf` (models.compact_export) carries, beside
the exact model.onnx that every other reader keeps using:

    user_tower.onnx   the user tower alone: inputs as model.onnx, output user_vec (B, d)
    items.faiss       faiss HNSW or IVF index over the item vectors, inner product
    items.npz         raw_item_ids (N,) in index order

The popularity prior rides inside the index: each item vector gets its bias as one more
component and every query a 1 there, so the inner product the index ranks by is exactly
u . e + bias, the score the exact graph ranks by. No re-ranking pass is needed for the
prior, and the seen-item filter still runs on the candidates in serving.recommender.

The search parameter (efSearch for HNSW, nprobe for IVF) is chosen at export as the
smallest one whose recall against exact search meets the floor (`compact_export`), and
stored in meta.json. Nothing here imports torch: `recommend`'s stub runs it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from models.onnx_session import onnx_session

USER_TOWER_FILE = "user_tower.onnx"
INDEX_FILE = "items.faiss"
ITEMS_FILE = "items.npz"
ANN_MODES = ("hnsw", "ivf")
SEARCH_PARAM = {"hnsw": "efSearch", "ivf": "nprobe"}


def item_vectors(item_embeddings: np.ndarray, item_bias: np.ndarray | None) -> np.ndarray:
    """(N, d) or (N, d + 1) with the bias as the last component: what the index stores."""
    emb = np.asarray(item_embeddings, dtype=np.float32)
    if item_bias is None:
        return np.ascontiguousarray(emb)
    return np.ascontiguousarray(np.hstack([emb, np.asarray(item_bias, np.float32)[:, None]]))


def query_vectors(user_vecs: np.ndarray, with_bias: bool) -> np.ndarray:
    u = np.asarray(user_vecs, dtype=np.float32)
    if not with_bias:
        return np.ascontiguousarray(u)
    return np.ascontiguousarray(np.hstack([u, np.ones((len(u), 1), np.float32)]))


def _faiss():
    # lazy: the gpu serving image has no faiss, and its Python models import this module
    import faiss

    return faiss


def build_index(
    vectors: np.ndarray,
    mode: str,
    *,
    hnsw_m: int = 32,
    ef_construction: int = 80,
    ivf_lists: int = 0,
    seed: int = 0,
    threads: int = 0,
):
    """A faiss inner-product index over `vectors` (N, D)."""
    faiss = _faiss()

    if threads:
        faiss.omp_set_num_threads(int(threads))
    n, dim = vectors.shape
    if mode == "hnsw":
        index = faiss.IndexHNSWFlat(dim, int(hnsw_m), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(ef_construction)
    elif mode == "ivf":
        lists = int(ivf_lists) or max(1, min(n // 39, int(4 * np.sqrt(n))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        sample = vectors[rng.choice(n, size=min(n, lists * 64), replace=False)]
        index.train(np.ascontiguousarray(sample))
    else:
        raise ValueError(f"ann mode={mode!r}: expected one of {', '.join(ANN_MODES)}")
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def set_search_param(index, mode: str, value: int) -> None:
    faiss = _faiss()

    if mode == "hnsw":
        faiss.downcast_index(index).hnsw.efSearch = int(value)
    else:
        faiss.extract_index_ivf(index).nprobe = int(value)


def _widest(index, mode: str) -> int:
    """The parameter value that makes the search exhaustive (IVF) or as wide as the index."""
    faiss = _faiss()

    if mode == "ivf":
        return int(faiss.extract_index_ivf(index).nlist)
    return int(index.ntotal)


def search(index, mode: str, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, n) labels and scores, best first. A row the search could not fill (an IVF probe
    that saw fewer than n items) is searched again exhaustively: no row comes back short."""
    scores, labels = index.search(queries, n)
    short = np.flatnonzero((labels < 0).any(axis=1))
    if short.size:
        mode_value = _current(index, mode)
        set_search_param(index, mode, max(mode_value, _widest(index, mode)))
        try:
            s2, l2 = index.search(np.ascontiguousarray(queries[short]), n)
        finally:
            set_search_param(index, mode, mode_value)
        scores[short], labels[short] = s2, l2
        if (l2 < 0).any():
            raise RuntimeError(f"ANN index returned fewer than {n} items for some users")
    return labels, scores


def _current(index, mode: str) -> int:
    faiss = _faiss()

    if mode == "hnsw":
        return int(faiss.downcast_index(index).hnsw.efSearch)
    return int(faiss.extract_index_ivf(index).nprobe)


def write_ann_files(version_dir: str | Path, index, raw_item_ids: np.ndarray) -> None:
    faiss = _faiss()

    version_dir = Path(version_dir)
    faiss.write_index(index, str(version_dir / INDEX_FILE))
    np.savez(version_dir / ITEMS_FILE, raw_item_ids=np.asarray(raw_item_ids, dtype=np.int64))


class AnnSearch:
    """retrieval for an ANN version: user_tower.onnx -> faiss -> raw ids, like model.onnx's
    outputs ((B, graph_k) ids and scores, best first)."""

    def __init__(self, version_dir: str | Path, meta: dict | None = None, *, threads: int = 0):
        faiss = _faiss()

        version_dir = Path(version_dir)
        meta = meta or json.loads((version_dir / "meta.json").read_text())
        info = meta["index"]
        self.mode = info["mode"]
        self.graph_k = int(meta["graph_k"])
        self.with_bias = bool(info["with_bias"])
        self.session = onnx_session(version_dir / USER_TOWER_FILE, intra_op_threads=threads)
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.index = faiss.read_index(str(version_dir / INDEX_FILE))
        set_search_param(self.index, self.mode, int(info["search_value"]))
        if threads:
            # faiss's OpenMP pool is per process: the same share of the cores as onnxruntime.
            faiss.omp_set_num_threads(int(threads))
        self.raw_item_ids = np.load(version_dir / ITEMS_FILE)["raw_item_ids"]

    def user_vectors(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        (u,) = self.session.run(None, {n: feeds[n] for n in self.input_names})
        return u

    def run(self, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        q = query_vectors(self.user_vectors(feeds), self.with_bias)
        labels, scores = search(self.index, self.mode, q, self.graph_k)
        return self.raw_item_ids[labels], scores
