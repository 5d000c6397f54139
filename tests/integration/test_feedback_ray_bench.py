"""`northstar feedback bench --engine ray` runs end to end at a toy size on a local Ray
cluster (figures are measured, never asserted; the label equality is)."""

import math

import pytest

from feedback.bench_ray import (
    DAY_S,
    RayBenchConfig,
    format_ray_bench,
    run_ray_bench,
    workers_per_day,
)


def test_projection_arithmetic():
    per_worker = 10_000_000_000 / DAY_S  # exactly one day's rows in one day
    assert workers_per_day(per_worker) == 1
    assert workers_per_day(per_worker / 2.5) == 3
    assert workers_per_day(1.0, rows_per_day=DAY_S) == 1


@pytest.mark.integration  # starts a local Ray cluster
def test_ray_bench_smoke(tmp_path):
    res = run_ray_bench(
        RayBenchConfig(impressions=4000, k=8, buckets=4, workers=(2,), dir=str(tmp_path))
    )
    (r,) = res["ray"]
    assert r["same_labels_as_local"] is True
    assert r["labels"] == res["local"]["labels"] == res["data"]["impressions"] == 4000
    assert sum(res["local"]["statuses"].values()) == res["data"]["clicks"]
    assert r["peak_rss_bytes_per_worker"] > 0 and 1 <= r["worker_processes"] <= 4
    assert r["workers_per_day_10b"] == workers_per_day(r["impressions_per_s_per_worker"])
    assert math.isfinite(r["rows_per_s_per_worker"])
    assert "| ray | 2 |" in format_ray_bench(res)
