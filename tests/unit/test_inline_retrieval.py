"""recommend runs retrieval's graph itself (serving/inline.py): same answers, bounded memory."""

from __future__ import annotations

import numpy as np
import pytest

from models.onnx_session import onnx_session
from models.snapshot import FeatureSnapshot
from serving import repository as layout
from serving.inline import InlineRetrieval, inline_threads, resolve_retrieval_call
from serving.publish import ExportConfig, export
from serving.routing import RoutingState
from serving.testing import tiny_export

K, OVERFETCH = 10, 10


@pytest.fixture
def repo(tmp_path):
    return tiny_export(tmp_path / "repo", k=K, overfetch=OVERFETCH)[1]


def test_inline_answers_what_the_graph_answers(repo):
    snap = FeatureSnapshot.load(layout.features_path(repo, 1))
    feats = snap.lookup(np.r_[snap.user_ids[:7], 10**12])  # known users and a cold one
    ids, scores = InlineRetrieval(repo)(1, feats)
    session = onnx_session(layout.version_dir(repo, 1) / layout.ONNX_FILE)
    want_ids, want_scores = session.run(
        ["item_ids", "scores"],
        {"user_index": feats.user_index, "user_cats": feats.user_cats, "history": feats.history},
    )
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-6)
    assert ids.shape == (8, K + OVERFETCH)


def test_sessions_follow_the_routing(repo):
    export(
        ExportConfig(
            run=str(tiny_export()[0]),
            repo=str(repo),
            k=K,
            overfetch=OVERFETCH,
            exporter="legacy",
            promote=False,
        )
    )  # version 2, a canary to be
    inline = InlineRetrieval(repo)
    inline.warm([1, 2])
    assert inline.versions == [1, 2]
    first = inline.runner(1)
    inline.retain(RoutingState(production=1, canary=2, canary_percent=10).versions)
    assert inline.runner(1) is first  # kept: no reload per batch
    inline.retain(RoutingState(production=2).versions)  # 2 promoted over 1
    assert inline.versions == [2]  # 1's item table is released
    # On a routing re-read, a version that arrives is loaded (and run once) at once, before
    # its first request; one that left is released.
    inline.follow(RoutingState(production=2, canary=1, canary_percent=10).versions)
    assert inline.versions == [1, 2] and inline.runner(2) is not None
    inline.follow(RoutingState(production=1).versions)
    assert inline.versions == [1]


def test_warm_logs_and_survives_a_version_that_cannot_load(repo, caplog):
    (layout.version_dir(repo, 1) / layout.ONNX_FILE).write_bytes(b"not an onnx graph")
    inline = InlineRetrieval(repo)
    # corrupt and missing: requests fail over later, start-up does not
    assert inline.warm([1, 7]) == [1, 7]
    assert inline.versions == []
    assert "version 1 did not load" in caplog.text and "version 7 did not load" in caplog.text
    # Routing re-reads try a version that cannot load once, not every second.
    caplog.clear()
    inline.follow([7])
    inline.follow([7])
    assert caplog.text.count("version 7 did not load") == 1


def test_auto_is_inline_on_the_cpu_target_and_bls_on_gpu(repo, tmp_path):
    assert resolve_retrieval_call("auto", repo) == "inline"  # tiny_export writes cpu
    cpu = layout.read_config(repo / layout.RETRIEVAL / layout.CONFIG_FILE)
    gpu = layout.retrieval_config(layout.config_dims(cpu), target="gpu", versions=[1])
    layout.write_config(repo, gpu)
    assert resolve_retrieval_call("auto", repo) == "bls"
    assert resolve_retrieval_call("inline", repo) == "inline"  # explicit wins
    assert resolve_retrieval_call("auto", tmp_path / "empty") == "bls"
    # The committed examples (the gpu image decides from the file's text: no protobuf there).
    for target, want in (("cpu", "inline"), ("gpu", "bls")):
        example = layout.SOURCE_REPO / layout.RETRIEVAL / f"config.{target}.pbtxt.example"
        (repo / layout.RETRIEVAL / layout.CONFIG_FILE).write_text(example.read_text())
        assert resolve_retrieval_call("auto", repo) == want


def test_recommend_config_carries_the_mode_and_refuses_unknown_ones():
    cfg = layout.recommend_config(layout.RecommendServing(retrieval_call="inline"))
    assert cfg.parameters["retrieval_call"].string_value == "inline"
    assert cfg.parameters["retrieval_threads"].string_value == "0"
    bls = layout.recommend_config(layout.RecommendServing(retrieval_call="bls"))
    assert "retrieval_threads" not in bls.parameters
    with pytest.raises(ValueError, match=r"grpc.: expected one of auto, bls, inline"):
        layout.RecommendServing(retrieval_call="grpc")


def test_export_refuses_inline_on_the_gpu_target(tmp_path):
    run = tiny_export()[0]
    cfg = ExportConfig(
        run=str(run),
        repo=str(tmp_path / "repo"),
        target="gpu",
        recommend=layout.RecommendServing(retrieval_call="inline"),
    )
    with pytest.raises(ValueError, match="retrieval_call='inline' with target='gpu'"):
        export(cfg)


def test_instances_share_the_cores_unless_told(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    assert [inline_threads(n) for n in (1, 2, 3, 16)] == [8, 4, 2, 1]
