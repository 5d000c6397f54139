"""The benchmark script runs end to end at toy sizes (figures are measured, never asserted)."""

from feedback.bench import IngestBenchConfig, format_bench, run_bench


def test_bench_smoke(tmp_path):
    res = run_bench(
        IngestBenchConfig(
            events=3000,
            batch=500,
            small_batch=100,
            random_ids=600,
            writers=0,
            impressions=2000,
            dir=str(tmp_path),
        )
    )
    assert res["ingest"]["events"] == 3000 and res["ingest_random_ids"]["events"] == 600
    assert res["join"]["labels"] == 2000 and res["join"]["rerun_noop"]
    assert sum(res["join"]["statuses"].values()) == res["join"]["clicks"]
    assert "join 2,000 impressions" in format_bench(res)
