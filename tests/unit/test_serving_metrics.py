"""What `recommend` counts per version, and how the canary reads it back from the endpoint
text. The live endpoint is covered in tests/integration/test_serving.py."""

import numpy as np
import pytest

from canary.prom import parse_prometheus
from serving.metrics import ERRORS, LATENCY, REQUESTS, BatchMetrics, read_serving_metrics

# The exposition format Triton writes for the families (as scraped from a real server).
TEXT = f"""
# HELP {REQUESTS} users routed to a version
# TYPE {REQUESTS} counter
{REQUESTS}{{version="1"}} 90
{REQUESTS}{{version="2"}} 10
{REQUESTS}{{version="none"}} 3
# TYPE {ERRORS} counter
{ERRORS}{{reason="fallback",version="2"}} 4
{ERRORS}{{reason="failed",version="2"}} 1
{ERRORS}{{reason="bad_input",version="none"}} 3
# TYPE {LATENCY} histogram
{LATENCY}_count{{version="1"}} 90
{LATENCY}_sum{{version="1"}} 450
{LATENCY}_bucket{{version="1",le="5"}} 60
{LATENCY}_bucket{{version="1",le="10"}} 90
{LATENCY}_bucket{{version="1",le="+Inf"}} 90
{LATENCY}_bucket{{version="2",le="5"}} 1
{LATENCY}_bucket{{version="2",le="10"}} 5
{LATENCY}_bucket{{version="2",le="+Inf"}} 9
nv_inference_request_success{{model="recommend",version="1"}} 42
"""


def test_read_serving_metrics_per_version():
    got = read_serving_metrics(parse_prometheus(TEXT))
    assert set(got) == {"1", "2", "none"}
    assert got["1"].requests == 90 and got["1"].errors == {}
    assert got["2"].errors == {"fallback": 4, "failed": 1}
    assert got["2"].error_count() == 5 and got["2"].error_count("fallback") == 4
    assert got["none"].errors == {"bad_input": 3}
    np.testing.assert_array_equal(got["1"].latency_bounds, [5, 10, np.inf])
    np.testing.assert_array_equal(got["1"].latency_counts, [60, 30, 0])  # per bucket
    np.testing.assert_array_equal(got["2"].latency_counts, [1, 4, 4])
    assert got["2"].answered == 9


def test_batch_metrics_latency_per_user():
    m = BatchMetrics()
    m.add_latency("2", 3.5, count=2)
    m.add_latency("2", 1.0)
    m.requests["2"] += 3
    assert m.latency_ms == {"2": [3.5, 3.5, 1.0]}
    assert m.requests["2"] == 3


@pytest.mark.parametrize("text", ["", "garbage\n# only comments\n", TEXT.replace("version", "v")])
def test_read_serving_metrics_without_the_families_is_empty(text):
    assert read_serving_metrics(parse_prometheus(text)) == {}


def test_counters_from_several_replicas_add_up():
    one = read_serving_metrics(parse_prometheus(TEXT))
    both = read_serving_metrics(parse_prometheus(TEXT) + parse_prometheus(TEXT))
    for v, m in one.items():
        assert both[v].requests == 2 * m.requests
        assert both[v].errors == {r: 2 * n for r, n in m.errors.items()}
        assert both[v].answered == 2 * m.answered
        assert both[v].latency_quantile(0.5) == m.latency_quantile(0.5)
