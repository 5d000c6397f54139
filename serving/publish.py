"""Publish a trained run into the Triton model repository as a new `retrieval` version.

The graph is written and parity-checked by `models.export`; a version that fails is
never written. Writes are atomic: the version is assembled in a dot-folder inside
`retrieval/` (Triton ignores non-numeric folders), fsynced, then renamed to its
number in one step. Its online features go to `recommend/state/versions/<N>/` the
same way. Routing then moves (or not) through `serving.control.switch_routing`.
See serving/repository.py for the layout.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from common.files import PRIVATE_DIR, PRIVATE_FILE, private_dir
from common.redact import redacted
from models import ann as ann_mod
from models import compact_export as compact
from models.export import ParityReport, build_retrieval, check_parity, export_onnx, parity_user_ids
from models.features import (
    INPUT_HISTORY,
    INPUT_HISTORY_TS,
    INPUT_USER_CATS,
    INPUT_USER_INDEX,
    OUTPUT_ITEM_IDS,
    OUTPUT_SCORES,
)
from models.snapshot import FeatureSnapshot
from online.store import RedisFeatureStore
from serving import repository as layout
from serving.control import routing_config, switch_routing
from serving.routing import RoutingState
from serving.seed import seed_from_run
from training.run import FEATURES_FILE, VOCAB_FILE, Run, load_run

log = logging.getLogger(__name__)


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
    # Route all traffic to the new version, through the running server(s) at `url`. The
    # retrain pipeline passes False and starts a canary itself (serving.control).
    promote: bool = True
    # A running server's gRPC address: with it, promotion loads the version in Triton
    # before routing moves traffic (a control-plane call, so it needs the admin key).
    # Without it an export only publishes: routing changes only for a repository that has
    # none yet (the first export). A live server re-reads routing.json within a second, so
    # a file-only switch would move users to a version Triton never loaded.
    url: str | None = None
    retrieval: layout.RetrievalServing = field(default_factory=layout.RetrievalServing)
    recommend: layout.RecommendServing = field(default_factory=layout.RecommendServing)
    # keep: config.pbtxt files already in the repository (same target and dims) keep their
    # settings (hand tuning, exploration ε) and only their version list changes, so a
    # scheduled retrain does not reset what an operator tuned; `retrieval`/`recommend`
    # set to anything but their defaults still win. rewrite: always write both from them.
    serving_configs: Literal["keep", "rewrite"] = "keep"
    # The shared online store (serving/live.py). A store without a seed is seeded from this
    # run's dataset; one already seeded is left alone: its live clicks are newer than the
    # run's data, and every version reads it through its own vocabulary.
    online_store: str | None = None
    # How the version retrieves: exact fp32, an int8 item table, or a faiss ANN index, each
    # checked against exact search at export (models/compact_export.py); auto: by size.
    index: compact.IndexConfig = field(default_factory=compact.IndexConfig)


def _seed_if_empty(url: str, run: Path) -> None:
    store = RedisFeatureStore(url)
    try:
        seeded = store.replay_from() is not None
    finally:
        store.close()
    if seeded:
        log.info("online store %s already seeded; left as it is", redacted(url))
        return
    stats = seed_from_run(run, url)
    log.info(
        "seeded online store %s: %d users in %.1f s", redacted(url), stats.users, stats.seconds
    )


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
    module = build_retrieval(run.model, run.vocab.item_ids, graph_k)
    mode = compact.choose_mode(cfg.index, spec.n_items, cfg.target)
    repo = layout.init_repository(cfg.repo)

    staging = layout.make_staging_dir(layout.retrieval_dir(repo), "export")
    try:
        users = parity_user_ids(snapshot, cfg.parity_users, cfg.parity_cold_users, cfg.seed)
        index_meta: dict = {"mode": mode}
        if mode == "int8":  # model.onnx is the int8 graph, checked against fp32 by overlap
            exporter = "legacy+int8"
            report, index_meta = compact.write_int8(
                module, spec, staging, snapshot.lookup(users), users, cfg.index,
                opset=cfg.opset, score_atol=cfg.score_atol,
            )  # fmt: skip
        else:
            exporter = export_onnx(
                module, spec, staging / layout.ONNX_FILE, opset=cfg.opset, exporter=cfg.exporter
            )
            report = check_parity(
                module,
                staging / layout.ONNX_FILE,
                snapshot.lookup(users),
                users,
                score_atol=cfg.score_atol,
                tie_atol=cfg.tie_atol,
                prefer_gpu=cfg.target == "gpu",
            )
        if mode in ann_mod.ANN_MODES:  # the exact graph stays; the cpu runners use the index
            index_meta = compact.write_ann(
                module, spec, staging, snapshot.lookup(users), users, cfg.index, mode,
                opset=cfg.opset, score_atol=cfg.score_atol, seed=cfg.seed,
            )  # fmt: skip
        shutil.copyfile(
            layout.SOURCE_REPO / layout.RETRIEVAL / layout.BACKEND_FILE,
            staging / layout.BACKEND_FILE,
        )
        meta = {**_meta(cfg, run, k, graph_k, exporter, report), "index": index_meta}
        version = _publish_version(repo, staging, meta)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _publish_features(repo, version, run)
    if cfg.online_store:  # before routing names the version: its users read the store
        _seed_if_empty(cfg.online_store, run.path)
    routing = _route(cfg, repo, version)
    if mode != "exact":
        log.info("version %d retrieves by %s", version, compact.index_summary(index_meta))
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
            # Only a sequence tower with time gaps reads it (models.features.input_names).
            **({INPUT_HISTORY_TS: ["INT64", [-1, h]]} if run.model.cfg.time_gaps else {}),
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
    private_dir(target.parent)  # owner-only, like routing.json: they decide what is served
    staging = layout.make_staging_dir(target.parent, f"v{version}")
    try:
        staging.chmod(PRIVATE_DIR)
        copies = [(run.features_path, staging / layout.FEATURES_FILE)]
        for suffix in (".npz", ".json"):
            src = (run.path / VOCAB_FILE).with_suffix(suffix)
            copies.append((src, staging / src.name))
        for src, dst in copies:
            shutil.copyfile(src, dst)
            dst.chmod(PRIVATE_FILE)
        if target.exists():  # left by an export whose version folder was later deleted
            shutil.rmtree(target)
        layout.publish_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _route(cfg: ExportConfig, repo: Path, version: int) -> RoutingState:
    path = layout.routing_path(repo)
    current = RoutingState.load(path) if path.exists() else None
    moves = current is None or (cfg.promote and bool(cfg.url))
    if cfg.promote and not moves:
        log.warning(
            "version %d published; routing stays at %s: pass the server's url (--url) to "
            "promote it, which loads it there first",
            version,
            current.to_dict() if current else None,
        )
    routing = (
        RoutingState(production=version, salt=current.salt if current else 0) if moves else current
    )
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
    # A live server loads the new version before routing names it; without a URL (or when
    # the version is only published for a canary) only the files change.
    switch_routing(repo, routing, url=cfg.url if moves else None, base_config=retrieval_cfg)
    return routing
