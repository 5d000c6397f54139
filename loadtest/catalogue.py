"""Benchmark-sized model repositories: an untrained TwoTower of the real shape, exported for real.

Throughput does not depend on what the weights learned, only on the shapes, so the
benchmark uses randomly initialised towers (serving.testing.build_tiny_run with the
production TowerConfig, history 20, 256 hash buckets) at 100k or 1M items, exported
through models.export (dynamo exporter, parity check, atomic publish). Built once per
shape and cached; the serving configs are rewritten on every use so that a benchmark
can vary batching, instances and onnxruntime options without re-exporting.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from filelock import FileLock

from common.files import atomic_write_text
from models.towers import TowerConfig
from serving import repository as layout

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

    @property
    def key(self) -> str:
        t = self.tower
        return (
            f"items{self.n_items}-users{self.n_users}-int{self.n_interactions}-h{self.history_len}"
            f"-hb{self.n_hash_buckets}-k{self.k}+{self.overfetch}"
            f"-t{t.id_dim}.{t.cat_dim}.{t.hidden_dim}.{t.out_dim}"
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
    # One builder per shape: concurrent test sessions or benchmarks wait for it.
    with FileLock(root.parent / f".{shape.key}.lock"):  # blocks until the builder is done
        return _build_locked(shape, root)


def _build_locked(shape: CatalogueShape, root: Path) -> BenchRepo:
    from serving.publish import ExportConfig, export
    from serving.testing import build_tiny_run

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
    # 64 parity users: the check materialises (users, n_items) scores, 0.3 GB at 1M items.
    res = export(
        ExportConfig(
            run=str(root / "run"),
            repo=str(root / "repo"),
            k=shape.k,
            overfetch=shape.overfetch,
            parity_users=64,
        )
    )
    info = {"version": res.version, "graph_k": res.graph_k, "shape": asdict(shape)}
    # The mark that the build is done: written whole or not at all.
    atomic_write_text(done, json.dumps(info, indent=1, default=str))
    return BenchRepo(shape, root / "run", root / "repo", res.version, res.graph_k, False)


def from_existing(run: str | Path, repo: str | Path) -> BenchRepo:
    """A trained run and the repository it was exported to (e.g. `make demo`'s)."""
    from serving.routing import RoutingState

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
    from serving.control import routing_config
    from serving.routing import RoutingState

    repo = Path(repo)
    layout.init_repository(repo)
    src = layout.SOURCE_REPO / layout.RETRIEVAL / layout.BACKEND_FILE
    for v in layout.list_versions(repo):
        shutil.copyfile(src, layout.version_dir(repo, v) / layout.BACKEND_FILE)
    routing = RoutingState.load(layout.routing_path(repo))
    layout.write_config(repo, routing_config(repo, routing, "cpu", retrieval))
    layout.write_config(repo, layout.recommend_config(recommend))
