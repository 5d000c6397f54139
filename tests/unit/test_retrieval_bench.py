"""`northstar bench --retrieval`: rows (f) per retrieval mode, validated before anything runs."""

from __future__ import annotations

import pytest

from loadtest.bench import BenchConfig, run_bench
from northstar.cli import build_parser


def test_retrieval_flag_sets_the_modes():
    from loadtest.cli import bench_config

    args = build_parser().parse_args(
        ["bench", "--items", "1000000", "--retrieval", "exact,int8,hnsw", "--set",
         "mode_concurrency=1,32", "index.ef_search=128,256", "item_clusters=1000"]
    )  # fmt: skip
    cfg = bench_config(args)
    assert cfg.retrieval_modes == ("exact", "int8", "hnsw")
    assert cfg.mode_concurrency == (1, 32) and cfg.index.ef_search == (128, 256)
    assert cfg.items == (1_000_000,) and cfg.item_clusters == 1000


def test_unknown_mode_is_refused_before_anything_is_built(tmp_path):
    with pytest.raises(ValueError, match="retrieval_modes: unknown"):
        run_bench(BenchConfig(out=str(tmp_path), retrieval_modes=("pq",)))
    assert not (tmp_path / "bench.json").exists()
