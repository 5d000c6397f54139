"""Benchmark-sized model repositories: an untrained TwoTower of the real shape, exported for real.

Throughput does not depend on what the weights learned, only on the shapes, so the
benchmark uses randomly initialised towers (serving.testing.build_tiny_run with the
production TowerConfig, history 20, 256 hash buckets) at 100k or 1M items, exported
through models.export (dynamo exporter, parity check, atomic publish). Built once per
shape and cached; the serving configs are rewritten on every use so that a benchmark
can vary batching, instances and onnxruntime options without re-exporting.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock

from common.files import atomic_write_text
from models.compact_export import IndexConfig
from models.towers import TowerConfig
from serving import repository as layout
from serving.control import routing_config
from serving.publish import ExportConfig, export
from serving.routing import RoutingState
from serving.testing import build_tiny_run
from training.run import load_run, save_run

log = logging.getLogger(__name__)

BENCH_TOWER = TowerConfig(dropout=0.0)  # the production defaults: d=64, MLP 128


@dataclass(frozen=True)
class CatalogueShape:
    n_items: int = 100_000
    n_users: int = 20_000
    n_interactions: int = 200_000
    history_len: int = 20  # TrainConfig's default
    n_hash_buckets: int = 256  # TrainConfig's default
    k: int = 100  # ExportConfig's defaults: top-200 candidates come out of the graph
    overfetch: int = 100
    tower: TowerConfig = BENCH_TOWER
    # 0: item id embeddings as initialised (iid random, which ANN indexes cannot prune: any
    # item may be any user's best). > 0: items drawn around this many centres, the kind of
    # structure a trained catalogue has, so ANN rows measure what a trained model would get.
    item_clusters: int = 0

    @property
    def key(self) -> str:
        t = self.tower
        return (
            f"items{self.n_items}-users{self.n_users}-int{self.n_interactions}-h{self.history_len}"
            f"-hb{self.n_hash_buckets}-k{self.k}+{self.overfetch}"
            f"-t{t.id_dim}.{t.cat_dim}.{t.hidden_dim}.{t.out_dim}"
            + (f"-c{self.item_clusters}" if self.item_clusters else "")
            + (f"-seq{t.seq_layers}.{t.seq_heads}" if t.user_encoder == "sequence" else "")
            + ("-gaps" if t.time_gaps else "")
        )


# The smoke catalogue: tiny shapes (`northstar bench --tiny`, `python -m loadtest.run --tiny`).
TINY_SHAPE = CatalogueShape(
    n_items=500,
    n_users=200,
    n_interactions=3_000,
    history_len=6,
    n_hash_buckets=8,
    k=10,
    overfetch=10,
    tower=dataclasses.replace(BENCH_TOWER, id_dim=8, cat_dim=4, hidden_dim=16, out_dim=8),
)


@dataclass(frozen=True)
class BenchRepo:
    shape: CatalogueShape
    run: Path
    repo: Path
    version: int
    graph_k: int
    trained: bool  # False: random weights (fine for throughput, not for accuracy)


def default_cache() -> Path:
    env = os.environ.get("NORTHSTAR_BENCH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "northstar" / "bench"


def build(shape: CatalogueShape, cache: str | Path | None = None) -> BenchRepo:
    """The cached run + repository for `shape`, built (and exported) on first use."""
    root = Path(cache or default_cache()) / shape.key
    root.parent.mkdir(parents=True, exist_ok=True)
    if (root / "built.json").exists():  # written whole at the end: no need to wait for a
        return _build_locked(shape, root)  # builder of a variant that holds the lock
    # One builder per shape: concurrent test sessions or benchmarks wait for it.
    with FileLock(root.parent / f".{shape.key}.lock"):  # blocks until the builder is done
        return _build_locked(shape, root)


def _build_locked(shape: CatalogueShape, root: Path) -> BenchRepo:
    done = root / "built.json"
    if done.exists():
        info = json.loads(done.read_text())
        version, graph_k = info["version"], info["graph_k"]
        return BenchRepo(shape, root / "run", root / "repo", version, graph_k, False)
    shutil.rmtree(root, ignore_errors=True)  # a build that died half-way
    root.mkdir(parents=True)
    log.info("building an untrained %d-item catalogue in %s", shape.n_items, root)
    build_tiny_run(
        root / "run",
        n_users=shape.n_users,
        n_items=shape.n_items,
        n_interactions=shape.n_interactions,
        history_len=shape.history_len,
        n_hash_buckets=shape.n_hash_buckets,
        tower=shape.tower,
    )
    if shape.item_clusters:
        plant_item_clusters(root / "run", shape.item_clusters)
    # 64 parity users: the check materialises (users, n_items) scores, 0.3 GB at 1M items.
    res = export(
        ExportConfig(
            run=str(root / "run"),
            repo=str(root / "repo"),
            k=shape.k,
            overfetch=shape.overfetch,
            parity_users=64,
            index=IndexConfig(mode="exact"),  # the fp32 baseline; `variant` adds the others
        )
    )
    info = {"version": res.version, "graph_k": res.graph_k, "shape": asdict(shape)}
    # The mark that the build is done: written whole or not at all.
    atomic_write_text(done, json.dumps(info, indent=1, default=str))
    return BenchRepo(shape, root / "run", root / "repo", res.version, res.graph_k, False)


def from_existing(run: str | Path, repo: str | Path) -> BenchRepo:
    """A trained run and the repository it was exported to (e.g. `make demo`'s)."""

    routing = RoutingState.load(layout.routing_path(repo))
    meta = layout.read_meta(repo, routing.production)
    shape = CatalogueShape(
        n_items=int(meta["bounds"]["n_items"]),
        n_users=0,
        history_len=int(meta["dims"]["history_len"]),
        k=int(meta["k"]),
        overfetch=int(meta["graph_k"]) - int(meta["k"]),
    )
    return BenchRepo(shape, Path(run), Path(repo), routing.production, int(meta["graph_k"]), True)


def write_serving_configs(
    repo: str | Path,
    retrieval: layout.RetrievalServing,
    recommend: layout.RecommendServing,
) -> None:
    """Rewrite both config.pbtxt files for these settings (cpu target, current routing).

    Also refreshes the Python-backend code from model_repository/, so a cached repository
    serves the code of this checkout.
    """

    repo = Path(repo)
    layout.init_repository(repo)
    src = layout.SOURCE_REPO / layout.RETRIEVAL / layout.BACKEND_FILE
    for v in layout.list_versions(repo):
        shutil.copyfile(src, layout.version_dir(repo, v) / layout.BACKEND_FILE)
    routing = RoutingState.load(layout.routing_path(repo))
    layout.write_config(repo, routing_config(repo, routing, "cpu", retrieval))
    layout.write_config(repo, layout.recommend_config(recommend))


def plant_item_clusters(run: Path, clusters: int, *, spread: float = 0.35, seed: int = 0) -> None:
    """Overwrite the run's item id embeddings with points around `clusters` centres."""

    r = load_run(run)
    weight = r.model.item_tower.item_emb.weight
    n, dim = weight.shape
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    points = centres[rng.integers(0, clusters, n)]
    points += spread * rng.standard_normal((n, dim)).astype(np.float32)
    with torch.no_grad():
        weight.copy_(torch.from_numpy(points))
    meta = json.loads((Path(run) / "run.json").read_text())
    meta = {k: v for k, v in meta.items() if k not in ("tower", "spec", "popularity_prior")}
    save_run(Path(run), r.model, r.vocab, {**meta, "item_clusters": clusters})


def variant(br: BenchRepo, mode: str, index: IndexConfig | None = None) -> int:
    """The version of `br`'s run exported with `index.mode = mode` (not routed), exported on
    first use and remembered in built.json; the exact baseline is br.version."""

    index = dataclasses.replace(index or IndexConfig(), mode=mode)
    if mode == "exact":
        return br.version
    root = br.repo.parent
    key = variant_key(index)
    known = json.loads((root / "built.json").read_text()).get("variants", {})
    if key in known:  # built.json is replaced whole: readable while another variant builds
        return int(known[key])
    with FileLock(root.parent / f".{root.name}.lock"):
        done = root / "built.json"
        info = json.loads(done.read_text())
        known = info.setdefault("variants", {})
        if key in known and (layout.version_dir(br.repo, known[key]) / layout.META_FILE).exists():
            return int(known[key])
        log.info("exporting %s with index.mode=%s", br.repo, mode)
        res = export(
            ExportConfig(
                run=str(br.run),
                repo=str(br.repo),
                k=br.shape.k,
                overfetch=br.shape.overfetch,
                parity_users=64,
                promote=False,
                index=index,
            )
        )
        known[key] = res.version
        atomic_write_text(done, json.dumps(info, indent=1, default=str))
        return res.version


# The IndexConfig fields each mode's export reads: a variant is rebuilt only when one changes.
_VARIANT_FIELDS = {
    "int8": ("rerank", "min_overlap"),
    "hnsw": ("hnsw_m", "hnsw_ef_construction", "ef_search", "min_recall", "recall_k"),
    "ivf": ("ivf_lists", "nprobe", "min_recall", "recall_k"),
}


def variant_key(index: IndexConfig) -> str:
    fields = dataclasses.asdict(index)
    return json.dumps(
        {"mode": index.mode, **{f: fields[f] for f in _VARIANT_FIELDS[index.mode]}},
        sort_keys=True,
    )
