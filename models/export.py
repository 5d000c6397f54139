"""Write a trained two-tower model as one ONNX retrieval graph, and prove it matches PyTorch.

One graph: user tower -> MatMul against the item-embedding table (an initializer)
[-> Add of the per-item popularity prior, only when the run has one (beta > 0)]
-> TopK -> Gather of raw item ids. `check_parity` runs it in onnxruntime beside the
PyTorch module on real and cold users; publishing a version that passed into the
model repository is `serving.publish`'s job.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.features import (
    INPUT_HISTORY,
    INPUT_HISTORY_TS,
    INPUT_USER_CATS,
    INPUT_USER_INDEX,
    OUTPUT_NAMES,
    FeatureSpec,
)
from models.onnx_session import onnx_session
from models.retrieval import TwoTowerRetrieval
from models.snapshot import FeatureSnapshot, UserFeatures
from models.towers import TwoTower

log = logging.getLogger(__name__)

# A protobuf cannot exceed 2 GB; bigger catalogues keep their tensors in model.onnx.data.
_EXTERNAL_DATA_BYTES = 1 << 30


class ParityError(RuntimeError):
    """ONNX and PyTorch disagree; the version was not written."""


@dataclass(frozen=True)
class ParityReport:
    users: int  # rows compared, cold users included
    cold_users: int
    k: int
    max_score_diff: float  # max |score_onnx - score_torch| over all positions
    id_mismatches: int  # positions whose item differs
    tie_swaps: int  # of those, explained by scores tied within tie_atol
    batch_sizes: tuple[int, ...]  # the dynamic batch axis was exercised at these sizes
    provider: str


def build_retrieval(model: TwoTower, item_ids: np.ndarray, graph_k: int) -> TwoTowerRetrieval:
    """The inference module export writes: `model`'s towers over the catalogue `item_ids`,
    with the model's popularity prior (`model.item_bias`) added to the scores when it has one
    (`model.prior`, beta > 0); without one the graph is the plain MatMul -> TopK."""
    raw_ids = torch.as_tensor(np.asarray(item_ids), dtype=torch.long)
    return TwoTowerRetrieval.from_two_tower(model, raw_ids, graph_k).eval()


def _sample_inputs(
    spec: FeatureSpec, names: tuple[str, ...], batch: int = 2
) -> tuple[torch.Tensor, ...]:
    # Zeros are valid everywhere: row 0, category "unknown", empty history, no timestamps.
    widths = {
        INPUT_USER_INDEX: 1,
        INPUT_USER_CATS: len(spec.user_cat_cardinalities),
        INPUT_HISTORY: spec.history_len,
        INPUT_HISTORY_TS: spec.history_len,
    }
    return tuple(torch.zeros(batch, widths[n], dtype=torch.long) for n in names)


def export_onnx(
    module: TwoTowerRetrieval,
    spec: FeatureSpec,
    path: Path,
    *,
    opset: int = 18,
    exporter: str = "dynamo",
) -> str:
    """Write `module` to `path` with a dynamic batch axis; returns the exporter used."""
    path = Path(path)
    names = module.input_names
    args = _sample_inputs(spec, names)
    n_bytes = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
    external = n_bytes > _EXTERNAL_DATA_BYTES
    if exporter == "dynamo":
        try:
            with _quiet_exporter():
                batch = torch.export.Dim("batch", min=1)
                program = torch.onnx.export(
                    module,
                    args,
                    dynamo=True,
                    input_names=list(names),
                    output_names=list(OUTPUT_NAMES),
                    dynamic_shapes=tuple({0: batch} for _ in names),
                    opset_version=opset,
                    verbose=False,
                )
                program.save(str(path), external_data=external)
            return "dynamo"
        except Exception as exc:  # the exporter is young; the legacy one still works
            log.warning("dynamo ONNX export failed (%s); falling back to the legacy exporter", exc)
    elif exporter != "legacy":
        raise ValueError(f"exporter={exporter!r}; expected 'dynamo' or 'legacy'")
    with _quiet_exporter():
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=False,
            input_names=list(names),
            output_names=list(OUTPUT_NAMES),
            dynamic_axes={n: {0: "batch"} for n in (*names, *OUTPUT_NAMES)},
            opset_version=min(opset, 17),
        )
    return "legacy"


@contextlib.contextmanager
def _quiet_exporter():
    """The exporters warn about things that do not apply here (torchvision ops, deprecations)."""
    names = ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript", "onnx_ir")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(_NullIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


class _NullIO:
    def write(self, _s: str) -> int:
        return 0

    def flush(self) -> None:
        pass


def parity_user_ids(snapshot: FeatureSnapshot, n: int, n_cold: int, seed: int = 0) -> np.ndarray:
    """(n + n_cold,) raw ids: sampled snapshot users, then ids the snapshot does not know."""
    rng = np.random.default_rng(seed)
    known = snapshot.user_ids
    take = rng.choice(known, size=min(n, len(known)), replace=False) if len(known) else known
    top = int(known.max()) if len(known) else 0
    cold = top + 1 + np.arange(n_cold, dtype=np.int64) * 7919  # spread over hash buckets
    return np.concatenate([take.astype(np.int64), cold])


def check_parity(
    module: TwoTowerRetrieval,
    onnx_path: str | Path,
    feats: UserFeatures,
    user_ids: np.ndarray,
    *,
    score_atol: float = 1e-4,
    tie_atol: float = 1e-5,
    prefer_gpu: bool = False,
) -> ParityReport:
    """Top-K ids must match PyTorch, except where scores tie; scores within `score_atol`.

    A position may hold a different item only if PyTorch scores that item within
    `tie_atol` of the item PyTorch put there. Raises ParityError otherwise.
    """
    feeds = feats.feeds(module.input_names)
    with torch.no_grad():
        tensors = [torch.from_numpy(feeds[n]) for n in module.input_names]
        t_ids, t_scores = (t.numpy() for t in module(*tensors))  # (B, K) each
        all_scores = module.scores(*tensors).numpy()  # (B, N), the item bias included
    session = onnx_session(onnx_path, prefer_gpu=prefer_gpu)
    o_ids, o_scores = run_onnx(session, feeds)
    # The dynamic batch axis: one row alone must give what it gave inside the batch.
    one_ids, one_scores = run_onnx(session, {n: v[:1] for n, v in feeds.items()})
    raw_items = module.raw_item_ids.numpy()
    problems: list[str] = []
    if o_ids.shape != t_ids.shape:
        raise ParityError(f"{onnx_path}: onnx returned shape {o_ids.shape}, torch {t_ids.shape}")

    diff = np.abs(o_scores.astype(np.float64) - t_scores)
    max_diff = float(diff.max()) if diff.size else 0.0
    if max_diff > score_atol:
        r, p = np.unravel_index(int(diff.argmax()), diff.shape)
        problems.append(
            f"scores differ by up to {max_diff:.3g} > {score_atol:g} "
            f"(user {user_ids[r]}, rank {p}: torch {t_scores[r, p]:.6f}, onnx {o_scores[r, p]:.6f})"
        )
    mism = o_ids != t_ids
    tie_swaps = 0
    if mism.any():
        rows, pos = np.nonzero(mism)
        idx = np.searchsorted(raw_items, o_ids[rows, pos])
        idx_c = np.minimum(idx, len(raw_items) - 1)
        in_catalogue = raw_items[idx_c] == o_ids[rows, pos]
        torch_score_of_onnx_item = all_scores[rows, idx_c]
        tie = in_catalogue & (np.abs(torch_score_of_onnx_item - t_scores[rows, pos]) <= tie_atol)
        tie_swaps = int(tie.sum())
        if not tie.all():
            j = int(np.flatnonzero(~tie)[0])
            r, p = rows[j], pos[j]
            problems.append(
                f"{int((~tie).sum())} of {mism.size} top-K positions hold a different item "
                f"beyond ties (user {user_ids[r]}, rank {p}: torch item {t_ids[r, p]} "
                f"score {t_scores[r, p]:.6f}, onnx item {o_ids[r, p]} score {o_scores[r, p]:.6f})"
            )
    # Alone and inside a batch, TopK may order exactly tied items differently (a different
    # kernel path per batch size): a position may differ only where the scores tie.
    swapped = one_ids[0] != o_ids[0]
    if not (
        np.allclose(one_scores[0], o_scores[0], atol=score_atol, rtol=0)
        and np.all(np.abs(one_scores[0][swapped] - o_scores[0][swapped]) <= tie_atol)
    ):
        problems.append("batch of 1 and the same user inside a batch give different answers")
    if problems:
        raise ParityError(
            f"ONNX parity check failed for {onnx_path} on {len(user_ids)} users; refusing to "
            "write this version: " + "; ".join(problems)
        )
    return ParityReport(
        users=len(user_ids),
        cold_users=int((~feats.known).sum()),
        k=int(t_ids.shape[1]),
        max_score_diff=max_diff,
        id_mismatches=int(mism.sum()),
        tie_swaps=tie_swaps,
        batch_sizes=(len(user_ids), 1),
        provider=session.get_providers()[0],
    )


def run_onnx(session, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    ids, scores = session.run(list(OUTPUT_NAMES), feeds)
    return ids, scores
