"""Export a trained run to the Triton model repository as a new `retrieval` version.

One ONNX graph: user tower -> MatMul against the item-embedding table (an
initializer) -> TopK -> Gather of raw item ids. Before anything becomes
visible, the graph must agree with PyTorch on real users from the run's
feature snapshot and on a few cold users; a version that fails is never written.

Writes are atomic: the version is assembled in a dot-folder inside
`retrieval/` (Triton ignores non-numeric folders), fsynced, then renamed to
its number in one step. Its online features go to `recommend/state/versions/<N>/`
the same way. See serving/repository.py for the layout.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import shutil
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from models.features import (
    INPUT_HISTORY,
    INPUT_USER_CATS,
    INPUT_USER_INDEX,
    OUTPUT_ITEM_IDS,
    OUTPUT_SCORES,
    FeatureSpec,
)
from models.retrieval import TwoTowerRetrieval
from serving import repository as layout
from serving.backend import onnx_session
from serving.routing import RoutingState
from training.run import FEATURES_FILE, VOCAB_FILE, Run, load_run
from training.snapshot import FeatureSnapshot, UserFeatures

log = logging.getLogger(__name__)

INPUT_NAMES = [INPUT_USER_INDEX, INPUT_USER_CATS, INPUT_HISTORY]
OUTPUT_NAMES = [OUTPUT_ITEM_IDS, OUTPUT_SCORES]
# A protobuf cannot exceed 2 GB; bigger catalogues keep their tensors in model.onnx.data.
_EXTERNAL_DATA_BYTES = 1 << 30


@dataclass(frozen=True)
class ExportConfig:
    run: str = "runs/demo"
    repo: str = "model_repository"
    target: Literal["cpu", "gpu"] = "cpu"  # cpu: Python backend + onnxruntime; gpu: native ORT
    k: int = 100  # the largest k `recommend` serves (capped at the catalogue size)
    # The graph returns k + overfetch candidates so that k remain after removing the
    # items a user has already seen; a user who saw more of them gets a padded answer.
    overfetch: int = 100
    opset: int = 18  # onnxruntime 1.19 (Triton 24.10's ORT backend) reads up to opset 21
    exporter: Literal["dynamo", "legacy"] = "dynamo"  # legacy is the fallback if dynamo fails
    parity_users: int = 256  # real users from the snapshot, sampled
    parity_cold_users: int = 16  # raw ids absent from the snapshot: hashed rows, no history
    score_atol: float = 1e-4  # fp32 scores of the same item, torch vs onnxruntime
    tie_atol: float = 1e-5  # two items this close may swap ranks
    seed: int = 0
    # Route all traffic to the new version (rewrite routing.json). The retrain pipeline
    # passes False and starts a canary itself (serving.server.deploy).
    promote: bool = True
    # A running server's gRPC address: with it, promotion loads the version in Triton
    # before routing.json moves traffic. Without it, only files change (a restart serves it).
    url: str | None = None
    retrieval: layout.RetrievalServing = field(default_factory=layout.RetrievalServing)
    recommend: layout.RecommendServing = field(default_factory=layout.RecommendServing)
    # keep: config.pbtxt files already in the repository (same target and dims) keep their
    # settings (hand tuning, exploration ε) and only their version list changes, so a
    # scheduled retrain does not reset what an operator tuned; `retrieval`/`recommend`
    # set to anything but their defaults still win. rewrite: always write both from them.
    serving_configs: Literal["keep", "rewrite"] = "keep"


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


@dataclass(frozen=True)
class ExportResult:
    version: int
    path: Path
    k: int
    graph_k: int
    exporter: str
    parity: ParityReport
    routing: RoutingState


def export(cfg: ExportConfig) -> ExportResult:
    run = load_run(cfg.run)
    if not run.features_path.exists():
        raise FileNotFoundError(
            f"{run.features_path}: the run has no online feature snapshot; expected "
            f"{FEATURES_FILE} written by `northstar train`"
        )
    snapshot = FeatureSnapshot.load(run.features_path)
    spec = run.model.spec
    if cfg.k < 1 or cfg.overfetch < 0:
        raise ValueError(f"export: k={cfg.k}, overfetch={cfg.overfetch}; expected k >= 1, >= 0")
    if cfg.target not in ("cpu", "gpu") or cfg.exporter not in ("dynamo", "legacy"):
        raise ValueError(
            f"export: target={cfg.target!r}, exporter={cfg.exporter!r}; expected target cpu|gpu "
            "and exporter dynamo|legacy"
        )
    if cfg.target == "gpu" and cfg.recommend.retrieval_call == "inline":
        raise ValueError(
            "export: recommend.retrieval_call='inline' with target='gpu'; expected 'bls' "
            "(inline runs retrieval on recommend's CPU instances, away from the GPU)"
        )
    k = min(cfg.k, spec.n_items)
    graph_k = min(cfg.k + cfg.overfetch, spec.n_items)
    module = build_retrieval(run, graph_k)
    repo = layout.init_repository(cfg.repo)

    staging = layout.make_staging_dir(layout.retrieval_dir(repo), "export")
    try:
        exporter = export_onnx(
            module, spec, staging / layout.ONNX_FILE, opset=cfg.opset, exporter=cfg.exporter
        )
        users = parity_user_ids(snapshot, cfg.parity_users, cfg.parity_cold_users, cfg.seed)
        report = check_parity(
            module,
            staging / layout.ONNX_FILE,
            snapshot.lookup(users),
            users,
            score_atol=cfg.score_atol,
            tie_atol=cfg.tie_atol,
            prefer_gpu=cfg.target == "gpu",
        )
        shutil.copyfile(
            layout.SOURCE_REPO / layout.RETRIEVAL / layout.BACKEND_FILE,
            staging / layout.BACKEND_FILE,
        )
        meta = _meta(cfg, run, k, graph_k, exporter, report)
        version = _publish_version(repo, staging, meta)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _publish_features(repo, version, run)
    routing = _route(cfg, repo, version)
    log.info(
        "exported %s as %s/%d (k=%d, graph k=%d, %s exporter); max |Δscore| %.2e",
        run.path,
        layout.retrieval_dir(repo),
        version,
        k,
        graph_k,
        exporter,
        report.max_score_diff,
    )
    return ExportResult(
        version, layout.version_dir(repo, version), k, graph_k, exporter, report, routing
    )


def build_retrieval(run: Run, graph_k: int) -> TwoTowerRetrieval:
    raw_ids = torch.as_tensor(run.vocab.item_ids, dtype=torch.long)
    return TwoTowerRetrieval.from_two_tower(run.model, raw_ids, graph_k).eval()


def _sample_inputs(spec: FeatureSpec, batch: int = 2) -> tuple[torch.Tensor, ...]:
    # Zeros are valid everywhere: row 0, category "unknown", empty history.
    return (
        torch.zeros(batch, 1, dtype=torch.long),
        torch.zeros(batch, len(spec.user_cat_cardinalities), dtype=torch.long),
        torch.zeros(batch, spec.history_len, dtype=torch.long),
    )


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
    args = _sample_inputs(spec)
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
                    input_names=INPUT_NAMES,
                    output_names=OUTPUT_NAMES,
                    dynamic_shapes=tuple({0: batch} for _ in INPUT_NAMES),
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
            input_names=INPUT_NAMES,
            output_names=OUTPUT_NAMES,
            dynamic_axes={n: {0: "batch"} for n in INPUT_NAMES + OUTPUT_NAMES},
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
    feeds = {
        INPUT_USER_INDEX: np.ascontiguousarray(feats.user_index, dtype=np.int64),
        INPUT_USER_CATS: np.ascontiguousarray(feats.user_cats, dtype=np.int64),
        INPUT_HISTORY: np.ascontiguousarray(feats.history, dtype=np.int64),
    }
    with torch.no_grad():
        tensors = [torch.from_numpy(feeds[n]) for n in INPUT_NAMES]
        t_ids, t_scores = (t.numpy() for t in module(*tensors))  # (B, K) each
        all_scores = (module.user_tower(*tensors) @ module.item_embeddings.T).numpy()  # (B, N)
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
    ids, scores = session.run(OUTPUT_NAMES, feeds)
    return ids, scores


def _meta(
    cfg: ExportConfig, run: Run, k: int, graph_k: int, exporter: str, report: ParityReport
) -> dict:
    spec = run.model.spec
    c, h = len(spec.user_cat_cardinalities), spec.history_len
    return {
        "version": None,  # filled in when the number is claimed
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "run": str(run.path.resolve()),
        "target": cfg.target,
        "exporter": exporter,
        "opset": cfg.opset,
        "k": k,
        "graph_k": graph_k,
        "max_batch_size": layout.capped_max_batch(cfg.retrieval, run.model.spec.n_items),
        "dims": {
            "n_user_cats": c,
            "history_len": h,
            "graph_k": graph_k,
            "embedding_dim": run.model.cfg.out_dim,
        },
        "bounds": {
            "user_rows": spec.user_rows,
            "n_items": spec.n_items,
            "user_cat_cardinalities": list(spec.user_cat_cardinalities),
        },
        "inputs": {
            INPUT_USER_INDEX: ["INT64", [-1, 1]],
            INPUT_USER_CATS: ["INT64", [-1, c]],
            INPUT_HISTORY: ["INT64", [-1, h]],
        },
        "outputs": {
            OUTPUT_ITEM_IDS: ["INT64", [-1, graph_k]],
            OUTPUT_SCORES: ["FP32", [-1, graph_k]],
        },
        "parity": asdict(report),
    }


def _publish_version(repo: Path, staging: Path, meta: dict) -> int:
    """Claim the next free number by renaming the staging folder onto it."""
    for _ in range(100):
        versions = layout.list_versions(repo)
        version = (versions[-1] if versions else 0) + 1
        meta = {**meta, "version": version}
        (staging / layout.META_FILE).write_text(json.dumps(meta, indent=1))
        try:
            layout.publish_dir(staging, layout.version_dir(repo, version))
            return version
        except FileExistsError:  # a concurrent export took the number; take the next one
            continue
    raise RuntimeError(f"{layout.retrieval_dir(repo)}: could not claim a version number")


def _publish_features(repo: Path, version: int, run: Run) -> None:
    target = layout.features_dir(repo, version)
    staging = layout.make_staging_dir(target.parent, f"v{version}")
    try:
        shutil.copyfile(run.features_path, staging / layout.FEATURES_FILE)
        for suffix in (".npz", ".json"):
            src = (run.path / VOCAB_FILE).with_suffix(suffix)
            shutil.copyfile(src, staging / src.name)
        if target.exists():  # left by an export whose version folder was later deleted
            shutil.rmtree(target)
        layout.publish_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _route(cfg: ExportConfig, repo: Path, version: int) -> RoutingState:
    path = layout.routing_path(repo)
    current = RoutingState.load(path) if path.exists() else None
    if cfg.promote or current is None:
        routing = RoutingState(production=version, salt=current.salt if current else 0)
    else:
        routing = current
    keep = cfg.serving_configs == "keep"
    retrieval_cfg = routing_config(
        repo,
        routing,
        cfg.target,
        cfg.retrieval,
        keep_existing=keep and cfg.retrieval == layout.RetrievalServing(),
    )
    rec_path = repo / layout.RECOMMEND / layout.CONFIG_FILE
    if not (keep and cfg.recommend == layout.RecommendServing() and rec_path.exists()):
        layout.write_config(repo, layout.recommend_config(cfg.recommend))
    if cfg.url and (cfg.promote or current is None):
        from serving.server import deploy  # a client is only needed for a live server

        deploy(cfg.url, repo, routing, retrieval_cfg=retrieval_cfg)
    else:
        layout.write_config(repo, retrieval_cfg)
        routing.save(path)
    return routing


def routing_config(
    repo: Path,
    routing: RoutingState,
    target: str,
    serving: layout.RetrievalServing,
    *,
    keep_existing: bool = False,
):
    """The retrieval config serving `routing.versions`; they must share I/O dims.

    With `keep_existing`, the repository's config.pbtxt is reused with the new version
    list when it is for the same target and dims (its other settings may be tuned).
    """
    metas = {v: layout.read_meta(repo, v) for v in routing.versions}
    dims = {v: layout.RetrievalDims.from_meta(m) for v, m in metas.items()}
    prod = dims[routing.production]
    for v, d in dims.items():
        if d != prod:
            raise ValueError(
                f"retrieval version {v} has dims {d} but production {routing.production} has "
                f"{prod}; versions served side by side share one config.pbtxt, so they must "
                "share history length, category count and K"
            )
    path = repo / layout.RETRIEVAL / layout.CONFIG_FILE
    if keep_existing and path.exists():
        current = layout.read_config(path)
        if layout.config_target(current) == target and layout.config_dims(current) == prod:
            return layout.with_versions(current, routing.versions)
        log.info("%s is for another target or dims: writing a fresh one", path)
    n_items = max(int(m["bounds"]["n_items"]) for m in metas.values())
    return layout.retrieval_config(
        prod, target=target, versions=routing.versions, serving=serving, n_items=n_items
    )
