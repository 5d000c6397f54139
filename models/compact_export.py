"""Export-time side of the compact retrieval modes: int8 item tables and ANN indexes.

`IndexConfig.mode` picks how a version retrieves:
  exact  the fp32 graph (models.export), as before;
  int8   model.onnx scores against an int8 copy of the item table, then rescored exactly
         (models.quantize); refused unless its top-K overlaps the fp32 top-K on the
         parity users by at least `min_overlap`;
  hnsw / ivf
         model.onnx stays the exact graph (the gpu target, the benchmark's ceiling and any
         tool that reads it keep working) and the version also carries the user tower's
         graph and a faiss index (models.ann), which the cpu target's runners use; refused
         unless recall@`recall_k` against exact search reaches `min_recall`;
  auto   by catalogue size: exact below `int8_from_items`, int8 below `ann_from_items`,
         then `ann_mode`. The gpu target always gets exact under auto.

Both checks run on the same users as the fp32 parity check (models.export.parity_user_ids).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from models import ann, quantize
from models.export import ParityError, ParityReport, _quiet_exporter, _sample_inputs, run_onnx
from models.features import (
    FeatureSpec,
)
from models.onnx_session import onnx_session
from models.retrieval import TwoTowerRetrieval
from models.snapshot import UserFeatures

log = logging.getLogger(__name__)

MODES = ("auto", "exact", "int8", *ann.ANN_MODES)


@dataclass(frozen=True)
class IndexConfig:
    """How a version retrieves; `northstar export --set index.mode=int8` and so on."""

    mode: Literal["auto", "exact", "int8", "hnsw", "ivf"] = "auto"
    # auto: the catalogue sizes where streaming the fp32 table for one user stops being
    # cheap next to the rest of a request (loadtest/RESULTS.md, compact catalogues).
    int8_from_items: int = 500_000
    ann_from_items: int = 2_000_000
    # IVF: on a clustered 1M-item bench catalogue it met the recall floor, where HNSW
    # (M=16) took longer to build and stayed below it at efSearch=1024.
    ann_mode: Literal["hnsw", "ivf"] = "ivf"
    # int8: mean top-K overlap with fp32 on the parity users, K = the graph's k.
    min_overlap: float = 0.99
    # int8: candidates the int8 pass keeps for exact fp32 rescoring, as a multiple of the
    # graph's k; 0 = no rescoring (int8 scores out, no fp32 table in the graph).
    rerank: int = 2
    # ANN: mean recall@recall_k against exact search on the parity users.
    min_recall: float = 0.95
    recall_k: int = 100
    # Search widths tried in order; the first that meets min_recall is kept.
    ef_search: tuple[int, ...] = (64, 128, 256, 512, 1024)
    nprobe: tuple[int, ...] = (4, 8, 16, 32, 64, 128, 256)
    hnsw_m: int = 32
    hnsw_ef_construction: int = 80
    ivf_lists: int = 0  # 0 = about 4 sqrt(N)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"index.mode={self.mode!r}: expected one of {', '.join(MODES)}")
        if self.ann_mode not in ann.ANN_MODES:
            raise ValueError(f"index.ann_mode={self.ann_mode!r}: expected hnsw or ivf")
        if not (0 < self.min_overlap <= 1 and 0 < self.min_recall <= 1):
            raise ValueError("index.min_overlap and index.min_recall: expected in (0, 1]")


def choose_mode(cfg: IndexConfig, n_items: int, target: str) -> str:
    """The mode a version of `n_items` items gets on `target`."""
    if cfg.mode == "auto":
        if target != "cpu" or n_items < cfg.int8_from_items:
            return "exact"
        return "int8" if n_items < cfg.ann_from_items else cfg.ann_mode
    if cfg.mode != "exact" and target != "cpu":
        raise ValueError(
            f"index.mode={cfg.mode!r} with target={target!r}: the compact modes are for the cpu "
            "target; expected exact or auto"
        )
    return cfg.mode


class _UserVec(torch.nn.Module):
    def __init__(self, user_tower: torch.nn.Module):
        super().__init__()
        self.user_tower = user_tower

    def forward(self, user_index, user_cats, history, history_ts=None):
        return self.user_tower(user_index, user_cats, history, history_ts)


def export_user_tower(
    module: TwoTowerRetrieval, spec: FeatureSpec, path: Path, *, opset: int = 18
) -> Path:
    """The user tower alone: model.onnx's inputs, output quantize.USER_VEC (B, d)."""
    wrapper = _UserVec(module.user_tower).eval()
    names = module.input_names
    with _quiet_exporter():
        # The legacy exporter: the tower is small, and its graph merges cleanly with
        # onnx.compose (one default-domain opset, no local functions).
        torch.onnx.export(
            wrapper,
            _sample_inputs(spec, names),
            str(path),
            dynamo=False,
            input_names=list(names),
            output_names=[quantize.USER_VEC],
            dynamic_axes={n: {0: "batch"} for n in (*names, quantize.USER_VEC)},
            opset_version=min(opset, 17),
        )
    return Path(path)


def _torch_reference(module: TwoTowerRetrieval, feeds: dict[str, np.ndarray]):
    with torch.no_grad():
        tensors = [torch.from_numpy(feeds[n]) for n in module.input_names]
        ids, scores = (t.numpy() for t in module(*tensors))
        user_vecs = module.user_tower(*tensors).numpy()
        all_scores = module.scores(*tensors).numpy()
    return ids, scores, user_vecs, all_scores


def _bias(module: TwoTowerRetrieval) -> np.ndarray | None:
    return None if module.item_bias is None else module.item_bias.numpy()


def overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row: the share of b's items that a holds too (a, b (B, K) ids)."""
    k = b.shape[1]
    return np.array([len(np.intersect1d(x, y)) / k for x, y in zip(a, b, strict=True)])


def write_int8(
    module: TwoTowerRetrieval,
    spec: FeatureSpec,
    version_dir: Path,
    feats: UserFeatures,
    user_ids: np.ndarray,
    cfg: IndexConfig,
    *,
    onnx_file: str = "model.onnx",
    opset: int = 18,
    score_atol: float = 1e-4,
) -> tuple[ParityReport, dict]:
    """Write the int8 model.onnx into `version_dir` and check it against the fp32 module.

    Raises ParityError (naming the overlap) when the top-K overlap misses `cfg.min_overlap`.
    """
    version_dir = Path(version_dir)
    tower_path = export_user_tower(module, spec, version_dir / ".user_tower_int8.onnx", opset=opset)
    path = version_dir / onnx_file
    try:
        quantize.write_int8_graph(
            tower_path,
            path,
            module.item_embeddings.numpy(),
            module.raw_item_ids.numpy(),
            module.k,
            item_bias=_bias(module),
            rerank=cfg.rerank,
        )
    finally:
        tower_path.unlink(missing_ok=True)
    report, info = check_overlap(
        module,
        path,
        feats,
        user_ids,
        min_overlap=cfg.min_overlap,
        score_atol=score_atol,
        exact_scores=cfg.rerank > 0,
    )
    return report, {"mode": "int8", "rerank": cfg.rerank, **info}


def check_overlap(
    module: TwoTowerRetrieval,
    onnx_path: str | Path,
    feats: UserFeatures,
    user_ids: np.ndarray,
    *,
    min_overlap: float = 0.99,
    score_atol: float = 1e-4,
    exact_scores: bool = True,
) -> tuple[ParityReport, dict]:
    """An approximate graph against the fp32 module: mean top-K overlap >= min_overlap, the
    scores it returns are the fp32 scores of its items (when `exact_scores`), and one user
    alone gets what it gets inside the batch. Raises ParityError naming the numbers."""
    feeds = feats.feeds(module.input_names)
    t_ids, _t_scores, _u, all_scores = _torch_reference(module, feeds)
    session = onnx_session(onnx_path)
    o_ids, o_scores = run_onnx(session, feeds)
    one_ids, one_scores = run_onnx(session, {n: v[:1] for n, v in feeds.items()})
    if o_ids.shape != t_ids.shape:
        raise ParityError(f"{onnx_path}: onnx returned shape {o_ids.shape}, torch {t_ids.shape}")
    per_user = overlap(o_ids, t_ids)
    raw = module.raw_item_ids.numpy()
    col = np.searchsorted(raw, o_ids)  # raw ids are sorted (the vocabulary's order)
    col = np.minimum(col, len(raw) - 1)
    known = raw[col] == o_ids
    torch_of_onnx = np.take_along_axis(all_scores, col, axis=1)
    max_diff = float(np.abs(torch_of_onnx - o_scores).max()) if o_scores.size else 0.0
    problems = []
    mean, worst = float(per_user.mean()), float(per_user.min())
    if mean < min_overlap:
        r = int(per_user.argmin())
        problems.append(
            f"mean top-{t_ids.shape[1]} overlap with fp32 {mean:.4f} < {min_overlap:g} "
            f"(worst user {user_ids[r]}: {worst:.3f})"
        )
    if not known.all():
        problems.append(f"{int((~known).sum())} returned ids are not in the catalogue")
    if exact_scores and max_diff > score_atol:
        problems.append(
            f"returned scores differ from fp32 by up to {max_diff:.3g} > {score_atol:g}"
        )
    if not (
        np.array_equal(np.sort(one_ids[0]), np.sort(o_ids[0]))
        and np.allclose(one_scores[0], o_scores[0], atol=score_atol, rtol=0)
    ):
        problems.append("batch of 1 and the same user inside a batch give different answers")
    if problems:
        raise ParityError(
            f"int8 parity check failed for {onnx_path} on {len(user_ids)} users; refusing to "
            "write this version: " + "; ".join(problems)
        )
    report = ParityReport(
        users=len(user_ids),
        cold_users=int((~feats.known).sum()),
        k=int(t_ids.shape[1]),
        max_score_diff=max_diff,
        id_mismatches=int((o_ids != t_ids).sum()),
        tie_swaps=0,
        batch_sizes=(len(user_ids), 1),
        provider=session.get_providers()[0],
    )
    return report, {"overlap_mean": mean, "overlap_min": worst, "overlap_k": int(t_ids.shape[1])}


def write_ann(
    module: TwoTowerRetrieval,
    spec: FeatureSpec,
    version_dir: Path,
    feats: UserFeatures,
    user_ids: np.ndarray,
    cfg: IndexConfig,
    mode: str,
    *,
    opset: int = 18,
    score_atol: float = 1e-4,
    seed: int = 0,
) -> dict:
    """Write user_tower.onnx, items.faiss and items.npz into `version_dir`; choose the search
    width by recall. Raises ParityError when no width reaches `cfg.min_recall`."""
    version_dir = Path(version_dir)
    tower_path = export_user_tower(module, spec, version_dir / ann.USER_TOWER_FILE, opset=opset)
    feeds = feats.feeds(module.input_names)
    _ids, _scores, t_u, all_scores = _torch_reference(module, feeds)
    (o_u,) = onnx_session(tower_path).run(None, feeds)
    u_diff = float(np.abs(o_u - t_u).max()) if o_u.size else 0.0
    if u_diff > score_atol:
        raise ParityError(
            f"{tower_path}: user vectors differ from PyTorch by up to {u_diff:.3g} > "
            f"{score_atol:g}; refusing to write this version"
        )
    bias = _bias(module)
    index = ann.build_index(
        ann.item_vectors(module.item_embeddings.numpy(), bias),
        mode,
        hnsw_m=cfg.hnsw_m,
        ef_construction=cfg.hnsw_ef_construction,
        ivf_lists=cfg.ivf_lists,
        seed=seed,
    )
    info = tune_recall(
        index,
        mode,
        ann.query_vectors(o_u, bias is not None),
        all_scores,
        cfg,
        graph_k=module.k,
        user_ids=user_ids,
    )
    ann.write_ann_files(version_dir, index, module.raw_item_ids.numpy())
    return {"mode": mode, "with_bias": bias is not None, "n_items": int(index.ntotal), **info}


def tune_recall(
    index,
    mode: str,
    queries: np.ndarray,
    all_scores: np.ndarray,
    cfg: IndexConfig,
    *,
    graph_k: int,
    user_ids: np.ndarray,
) -> dict:
    """The smallest search width whose mean recall@k against exact search (`all_scores`,
    (B, N), the bias included) reaches cfg.min_recall; ParityError when none does."""
    k = min(cfg.recall_k, graph_k)
    exact = np.argpartition(-all_scores, k - 1, axis=1)[:, :k]
    values = cfg.ef_search if mode == "hnsw" else cfg.nprobe
    tried = []
    for value in values:
        ann.set_search_param(index, mode, value)
        labels, _ = ann.search(index, mode, queries, graph_k)
        recall = overlap(labels[:, :k], exact)
        tried.append((value, float(recall.mean())))
        if recall.mean() >= cfg.min_recall:
            return {
                "search_param": ann.SEARCH_PARAM[mode],
                "search_value": int(value),
                "recall": float(recall.mean()),
                "recall_min": float(recall.min()),
                "recall_k": k,
                "users": len(queries),
                "tried": tried,
            }
    figures = ", ".join(f"{ann.SEARCH_PARAM[mode]}={v}: {r:.4f}" for v, r in tried)
    raise ParityError(
        f"{mode} recall@{k} against exact search stays below {cfg.min_recall:g} on "
        f"{len(user_ids)} users ({figures}); refusing to write this version"
    )


def index_summary(info: dict) -> str:
    keep = {k: v for k, v in info.items() if k != "tried"}
    return ", ".join(
        f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in keep.items()
    )
