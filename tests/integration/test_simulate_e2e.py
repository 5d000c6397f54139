"""End to end on a real tritonserver: simulate -> impressions + interactions -> join -> metrics,
and every count reconciles exactly.

The server holds `retrieval` + `recommend` exported from a run on a synthetic world (the
simulator needs the world's ground truth for the same user and item ids, which is why
this does not reuse the `served` fixture's tiny run), plus the `feedback` ingest model.
NORTHSTAR_EVENT_LOG points both `recommend` (impressions) and `feedback` at one log.
"""

import numpy as np
import pytest

from feedback.join import read_labels
from feedback.metrics import compute_metrics
from feedback.sink import EVENT_LOG_ENV, open_source
from serving import repository as layout
from serving.client import RecommenderClient
from serving.server import ServerConfig, TritonServer
from serving.testing import world_repo
from simulator import SimulateConfig, reconcile, simulate

pytestmark = pytest.mark.integration

K = 10


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    _, _, repo = world_repo(root, k=K)  # init_repository copies the feedback model too
    log = root / "events.db"
    mp = pytest.MonkeyPatch()
    mp.setenv(EVENT_LOG_ENV, str(log))  # serving.server.server_env passes os.environ on
    server = TritonServer(
        ServerConfig.on_free_ports(
            str(repo),
            models=(layout.RETRIEVAL, layout.RECOMMEND, "feedback"),
            log_file=str(root / "tritonserver.log"),
        )
    )
    server.start()
    try:
        yield root, server, log
    finally:
        server.stop()
        mp.undo()


def _assert_recommend_logs_its_impressions(server, log):
    """The hookup is in (model_repository/recommend/1/model.py -> feedback.hook): a server
    that answers without logging what it showed is a broken loop, not a skipped test."""
    before = open_source(log).count("impression")
    with RecommenderClient(server.grpc_url) as c:
        (rec,) = c.recommend([1], k=K)
    shown = int((np.asarray(rec.item_ids) >= 0).sum())  # padding is not shown
    assert shown > 0
    assert open_source(log).count("impression") - before == shown, (
        "`recommend` answered without logging its impressions (feedback.hook)"
    )


def test_closed_loop_counts_reconcile_exactly(loop):
    root, server, log = loop
    _assert_recommend_logs_its_impressions(server, log)

    cfg = SimulateConfig(
        world=str(root / "world"),
        users=120,
        requests=400,
        url=server.grpc_url,
        protocol="grpc",
        seed=3,
        k=K,
        concurrency=8,
        request_id_share=1.0,
        resend_share=0.05,
        malformed_share=0.02,
        orphan_share=0.02,
    )
    rep = simulate(cfg)
    assert rep.requests_failed == 0 and rep.send_failed_batches == 0
    assert rep.clicks > 0 and rep.delay_after_window > 0

    rec = reconcile(rep, log_path=str(log), labels_dir=str(root / "labels"), window_s=cfg.window_s)
    assert rec["impressions_logged"] == rep.items_returned  # impressions logged = items returned
    assert rec["interactions_in_log"] == rep.accepted  # re-sends stored once
    got = rec["statuses"]
    assert got["joined"] + got["late"] + got["unattributed"] == rep.accepted
    assert got == rep.expected and rec["status_mismatches"] == 0
    assert got["unattributed"] == rep.orphans_sent
    assert rec["quarantine"] == rep.rejected
    assert rec["ok"]

    labels = read_labels(root / "labels")
    mine = labels[labels["request_id"].isin(set(rep.request_ids))]
    assert mine["n_interactions"].sum() == got["joined"]
    with RecommenderClient(server.grpc_url) as c:
        params = c.model_config(layout.RECOMMEND).get("parameters", {})
    eps = float(params.get("exploration_epsilon", {}).get("string_value", 0) or 0)
    prop = mine["propensity"].to_numpy()
    if eps == 0:
        assert (prop == 1.0).all()  # a deterministic policy
    else:  # greedy slots log 1 - ε + ε/N, explored ones ε/N (feedback/explore.py)
        assert ((prop > 1 - eps) & (prop <= 1)).mean() > 0.5 and (prop < eps).any()
    m = compute_metrics(mine)
    assert sum(r["impressions"] for r in m["by_version"]) == rep.items_returned
    assert sum(r["clicks"] for r in m["by_version"]) == int(mine["clicked"].sum())


def test_http_protocol_round_trip(loop):
    root, server, log = loop
    _assert_recommend_logs_its_impressions(server, log)
    cfg = SimulateConfig(
        world=str(root / "world"),
        users=30,
        requests=60,
        url=server.http_url,
        protocol="http",
        seed=4,
        k=K,
        concurrency=4,
        request_id_share=1.0,
    )
    rep = simulate(cfg)
    rec = reconcile(
        rep, log_path=str(log), labels_dir=str(root / "labels-http"), window_s=cfg.window_s
    )
    assert rec["ok"] and rec["impressions_logged"] == rep.items_returned
