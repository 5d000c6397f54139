"""`northstar export`: ONNX parity with PyTorch, atomic versions, routing, what recommend reads."""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading

import numpy as np
import onnx
import pytest
import torch

import models.export as export_mod
import serving.publish as publish_mod
from models.export import ParityError, build_retrieval, check_parity
from models.onnx_session import onnx_session
from models.snapshot import FeatureSnapshot
from serving import repository as layout
from serving.backend import InputError
from serving.inline import InlineRetrieval
from serving.publish import ExportConfig, export
from serving.recommender import OnlineState, Recommender, StateFileError, select_unseen
from serving.routing import RoutingState
from serving.testing import tiny_export
from training.run import load_run

K, OVERFETCH = 10, 10


@pytest.fixture(scope="module")
def shared():
    """One export with the default (dynamo) exporter, shared by the process: read only."""
    return tiny_export(k=K, overfetch=OVERFETCH)


@pytest.fixture(scope="module")
def tiny_run(shared):
    return shared[0]


@pytest.fixture(scope="module")
def exported(shared):
    return shared[1], shared[2]


@pytest.fixture
def repo_copy(tmp_path):
    _, repo, res = tiny_export(tmp_path / "repo", k=K, overfetch=OVERFETCH)
    return repo, res


def _cfg(run, repo, **kw):
    return ExportConfig(run=str(run), repo=str(repo), k=K, overfetch=OVERFETCH, **kw)


def test_export_writes_a_complete_version(exported, tiny_run):
    repo, res = exported
    assert res.version == 1 and res.exporter == "dynamo"
    vdir = layout.version_dir(repo, 1)
    assert {p.name for p in vdir.iterdir() if p.is_file()} == {
        "model.onnx",
        "model.py",
        "meta.json",
    }
    meta = json.loads((vdir / "meta.json").read_text())
    spec = load_run(tiny_run).model.spec
    assert meta["version"] == 1 and meta["k"] == K and meta["graph_k"] == K + OVERFETCH
    assert meta["run"] == str(tiny_run.resolve()) and meta["created"]
    assert meta["dims"]["history_len"] == spec.history_len
    assert meta["bounds"]["user_rows"] == spec.user_rows
    assert meta["parity"]["max_score_diff"] <= 1e-4 and meta["parity"]["cold_users"] > 0
    # What `recommend` reads: routing, and the run's snapshot + vocab for this version.
    assert RoutingState.load(layout.routing_path(repo)) == RoutingState(production=1)
    fdir = layout.features_dir(repo, 1)
    assert (fdir / "features.npz").read_bytes() == (tiny_run / "features.npz").read_bytes()
    assert (fdir / "vocab.npz").exists() and (fdir / "vocab.json").exists()
    cfg = layout.read_config(repo / "retrieval" / "config.pbtxt")
    assert layout.served_versions(cfg) == [1] and layout.config_target(cfg) == "cpu"
    assert (repo / "recommend" / "config.pbtxt").exists()
    assert (repo / "recommend" / "1" / "model.py").exists()
    assert not [p for p in (repo / "retrieval").iterdir() if p.name.startswith(".")]


def test_onnx_graph_has_a_dynamic_batch_and_matches_torch(exported, tiny_run):
    repo, _ = exported
    path = layout.version_dir(repo, 1) / "model.onnx"
    graph = onnx.load(str(path)).graph
    for v in [*graph.input, *graph.output]:
        batch = v.type.tensor_type.shape.dim[0]
        assert batch.dim_param and not batch.dim_value, f"{v.name}: batch axis is not dynamic"
    # The item table is an initializer: the catalogue travels inside model.onnx.
    assert {"TopK", "MatMul"} <= {n.op_type for n in graph.node} or "Gemm" in {
        n.op_type for n in graph.node
    }
    run = load_run(tiny_run)
    module = build_retrieval(run.model, run.vocab.item_ids, K + OVERFETCH)
    snap = FeatureSnapshot.load(tiny_run / "features.npz")
    session = onnx_session(path)
    for b in (1, 37):
        f = snap.lookup(snap.user_ids[:b])
        feeds = {"user_index": f.user_index, "user_cats": f.user_cats, "history": f.history}
        ids, scores = session.run(["item_ids", "scores"], feeds)
        with torch.no_grad():
            t_ids, t_scores = module(*(torch.from_numpy(feeds[n]) for n in feeds))
        np.testing.assert_array_equal(ids, t_ids.numpy())
        np.testing.assert_allclose(scores, t_scores.numpy(), rtol=0, atol=1e-5)
        assert set(np.unique(ids)) <= set(run.vocab.item_ids.tolist())


def test_next_export_takes_the_next_version_and_without_a_url_only_publishes(repo_copy, tiny_run):
    repo, _ = repo_copy
    res = export(_cfg(tiny_run, repo, exporter="legacy"))
    assert res.version == 2 and layout.list_versions(repo) == [1, 2]
    # No server to load it first: routing (which a live server re-reads) stays (issue 31).
    assert RoutingState.load(layout.routing_path(repo)).production == 1
    assert res.routing == RoutingState(production=1)
    assert layout.served_versions(layout.read_config(repo / "retrieval/config.pbtxt")) == [1]
    assert layout.features_path(repo, 2).exists()


def test_no_promote_leaves_routing_alone(repo_copy, tiny_run):
    repo, _ = repo_copy
    routing = RoutingState(production=1, salt=7)
    routing.save(layout.routing_path(repo))
    res = export(_cfg(tiny_run, repo, exporter="legacy", promote=False))
    assert res.version == 2 and res.routing == routing
    assert RoutingState.load(layout.routing_path(repo)) == routing
    assert layout.served_versions(layout.read_config(repo / "retrieval/config.pbtxt")) == [1]


def _assert_nothing_written(repo, versions_before):
    assert layout.list_versions(repo) == versions_before
    assert not [p for p in (repo / "retrieval").iterdir() if p.name.startswith(".")]
    assert not layout.features_dir(repo, max(versions_before) + 1).exists()
    assert RoutingState.load(layout.routing_path(repo)).production == max(versions_before)


def test_export_refuses_a_graph_whose_weights_differ_from_torch(repo_copy, tiny_run, monkeypatch):
    repo, _ = repo_copy
    real = export_mod.export_onnx

    def corrupt_then_export(module, spec, path, **kw):
        other = load_run(tiny_run)
        bad = build_retrieval(other.model, other.vocab.item_ids, module.k)
        with torch.no_grad():  # a weight changed between torch and onnx
            bad.user_tower.mlp[0].weight.mul_(-1.0)
        return real(bad, spec, path, **kw)

    monkeypatch.setattr(publish_mod, "export_onnx", corrupt_then_export)
    with pytest.raises(ParityError, match="refusing to write"):
        export(_cfg(tiny_run, repo, exporter="legacy"))
    _assert_nothing_written(repo, [1])


def test_export_refuses_scores_beyond_tolerance(repo_copy, tiny_run, monkeypatch):
    repo, _ = repo_copy
    real = export_mod.run_onnx

    def drift(session, feeds):
        ids, scores = real(session, feeds)
        return ids, scores + np.float32(5e-4)

    monkeypatch.setattr(export_mod, "run_onnx", drift)
    with pytest.raises(ParityError, match="scores differ"):
        export(_cfg(tiny_run, repo, exporter="legacy"))
    _assert_nothing_written(repo, [1])


def test_parity_allows_swaps_of_tied_items_only(tiny_run, tmp_path, monkeypatch):
    run = load_run(tiny_run)
    module = build_retrieval(run.model, run.vocab.item_ids, 20)
    snap = FeatureSnapshot.load(tiny_run / "features.npz")
    users = snap.user_ids
    feats = snap.lookup(users)
    with torch.no_grad():  # the first user's top item gets a twin: a guaranteed tie at rank 0
        f = [torch.from_numpy(a) for a in (feats.user_index, feats.user_cats, feats.history)]
        top = module(*f)[0][0, :6].numpy()
        a, b = np.searchsorted(run.vocab.item_ids, top[[0, 5]])
        module.item_embeddings[b] = module.item_embeddings[a]
    path = tmp_path / "m.onnx"
    export_mod.export_onnx(module, run.model.spec, path, exporter="legacy")
    tied = set(run.vocab.item_ids[[a, b]].tolist())
    real = export_mod.run_onnx

    def swap(which):
        def run_swapped(session, f):
            ids, scores = real(session, f)
            ids = ids.copy()
            for r in range(len(ids)):
                pos = [p for p, i in enumerate(ids[r]) if (i in tied) == (which == "tied")]
                if len(pos) >= 2 and (which == "tied" or pos[1] == pos[0] + 1):
                    ids[r, pos[0]], ids[r, pos[1]] = ids[r, pos[1]], ids[r, pos[0]]
            return ids, scores

        return run_swapped

    monkeypatch.setattr(export_mod, "run_onnx", swap("tied"))
    report = check_parity(module, path, feats, users)
    assert report.tie_swaps > 0 and report.tie_swaps == report.id_mismatches
    monkeypatch.setattr(export_mod, "run_onnx", swap("untied"))
    with pytest.raises(ParityError, match="different item"):
        check_parity(module, path, feats, users)


def test_versions_appear_atomically(repo_copy, tiny_run):
    """A watcher never sees a numbered folder without all of its files."""
    repo, _ = repo_copy
    seen_partial, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            for v in layout.list_versions(repo):
                d = layout.version_dir(repo, v)
                try:
                    names = {p.name for p in d.iterdir()}
                    meta = json.loads((d / "meta.json").read_text())
                except (FileNotFoundError, json.JSONDecodeError) as exc:
                    seen_partial.append((v, repr(exc)))
                    continue
                if not {"model.onnx", "model.py", "meta.json"} <= names or meta["version"] != v:
                    seen_partial.append((v, sorted(names)))

    t = threading.Thread(target=watch)
    t.start()
    try:
        for _ in range(3):
            export(_cfg(tiny_run, repo, exporter="legacy"))
    finally:
        stop.set()
        t.join()
    assert seen_partial == []
    assert layout.list_versions(repo) == [1, 2, 3, 4]


def test_a_crash_mid_publish_leaves_no_version(repo_copy, tiny_run, monkeypatch):
    repo, _ = repo_copy

    def crash(staging, target):
        raise OSError("disk full")

    monkeypatch.setattr(layout, "publish_dir", crash)
    with pytest.raises(OSError, match="disk full"):
        export(_cfg(tiny_run, repo, exporter="legacy"))
    _assert_nothing_written(repo, [1])


def test_export_errors_name_what_is_missing(tmp_path, tiny_run):
    with pytest.raises(FileNotFoundError, match=r"run\.json"):
        export(_cfg(tmp_path / "nope", tmp_path / "repo"))
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "features.npz").unlink()
    with pytest.raises(FileNotFoundError, match=r"features\.npz"):
        export(_cfg(run, tmp_path / "repo"))


# ---- what the Triton Python models do with an exported repository, run in-process ----
# (serving.inline.InlineRetrieval is what `recommend` runs on the cpu target.)


def test_recommender_serves_unseen_items_and_marks_cold_users(exported):
    repo, _ = exported
    rec = Recommender(repo)
    max_k = rec.begin()
    assert max_k == K
    snap = FeatureSnapshot.load(layout.features_path(repo, 1))
    users = np.r_[snap.user_ids[:5], 10**9]
    parsed = [
        rec.parse(users[:, None], np.full((6, 1), 4, np.int32), max_k),
        rec.parse(np.array([[users[0]]]), None, max_k),
    ]
    batch = rec.run(parsed, InlineRetrieval(repo))
    a, b = batch.results
    assert a.item_ids.shape == (6, 4) and b.item_ids.shape == (1, rec.default_k)
    assert a.cold_start[:, 0].tolist() == [False] * 5 + [True]
    feats = snap.lookup(users)
    for i in range(6):
        assert not set(a.item_ids[i].tolist()) & set(feats.seen[i].tolist())
    assert (a.model_version == 1).all()
    assert len(batch.impressions) == int((a.item_ids >= 0).sum() + (b.item_ids >= 0).sum())
    assert set(batch.impressions.position.tolist()) <= set(range(rec.default_k))


@pytest.mark.parametrize(
    ("user_id", "k", "name"),
    [
        (None, None, "user_id"),
        (np.array([[1.5]]), None, "user_id"),
        (np.zeros((0, 1), np.int64), None, "user_id"),
        (np.array([[1, 2]], np.int64), None, "user_id"),
        (np.array([[1]], np.int64), np.array([[0]], np.int32), "'k'"),
        (np.array([[1]], np.int64), np.array([[K + 1]], np.int32), "'k'"),
        (np.array([[1]], np.int64), np.array([[3.0]], np.float32), "'k'"),
    ],
)
def test_recommender_rejects_bad_requests_by_name(exported, user_id, k, name):
    rec = Recommender(exported[0])
    with pytest.raises(InputError, match=name):
        rec.parse(user_id, k, rec.begin())


def test_recommender_falls_back_when_a_routed_version_fails(repo_copy):
    repo, _ = repo_copy
    rec = Recommender(repo, check_interval_s=0.0)
    retrieve = InlineRetrieval(repo)
    users = np.arange(1000, 1010, dtype=np.int64)[:, None]
    first = rec.run([rec.parse(users, None, rec.begin())], retrieve).results[0]
    # Traffic moves to a version that does not exist (exported elsewhere, never loaded).
    RoutingState(production=1, canary=9, canary_percent=100).save(layout.routing_path(repo))

    def fail_on_9(version, feats):
        if version == 9:
            raise RuntimeError("version 9 is not at ready state")
        return retrieve(version, feats)

    bad = InputError("input 'k' has value 0")
    batch = rec.run([rec.parse(users, None, rec.begin()), bad], fail_on_9)
    again = batch.results[0]
    np.testing.assert_array_equal(again.item_ids, first.item_ids)
    assert (again.model_version == 1).all()
    # The users got production's answer, but the canary failed them: its error, not a pass.
    m = batch.metrics
    assert m.requests == {"9": 10, "none": 1}
    assert m.errors == {("9", "fallback"): 10, ("none", "bad_input"): 1}
    # One second of shared work on top of what serving took: the arithmetic, not a clock.
    own = batch.serve_s["9"]
    batch.observe_latency(1.0 + own)
    assert list(m.latency_ms) == ["9"] and len(m.latency_ms["9"]) == 1  # one request answered
    assert m.latency_ms["9"][0] == pytest.approx((1.0 + own) * 1000.0)  # ms, shared + own


def test_recommender_counts_a_failure_without_fallback_per_routed_version(repo_copy):
    repo, _ = repo_copy
    rec = Recommender(repo, check_interval_s=0.0)
    RoutingState(production=1, canary=2, canary_percent=50).save(layout.routing_path(repo))
    users = np.arange(1000, 1040, dtype=np.int64)[:, None]
    routed = RoutingState.load(layout.routing_path(repo)).version_for(users[:, 0])

    def broken(version, feats):
        raise RuntimeError(f"retrieval version {version}: features unreadable")

    batch = rec.run([rec.parse(u[None, :], None, rec.begin()) for u in users], broken)
    assert all(isinstance(r, RuntimeError) for r in batch.results)
    m = batch.metrics
    n2 = int((routed == 2).sum())
    assert m.requests == {"1": 40 - n2, "2": n2}
    # no production ever answered here, so nobody falls back: every user failed
    assert m.errors == {("1", "failed"): 40 - n2, ("2", "failed"): n2}
    assert len(batch.impressions) == 0


def test_select_unseen_pads_when_too_few_remain():
    ids = np.array([[10, 11, 12, 13], [20, 21, 22, 23]], dtype=np.int64)
    scores = np.array([[4, 3, 2, 1], [4, 3, 2, 1]], dtype=np.float32)
    seen = [np.array([11, 13, 99]), np.array([], dtype=np.int64)]
    out, sc, counts = select_unseen(ids, scores, seen, np.array([3, 2]))
    assert out.tolist() == [[10, 12, -1], [20, 21, -1]]
    assert sc.tolist() == [[4, 2, 0], [4, 3, 0]]
    assert counts.tolist() == [2, 2]


def test_online_state_rereads_changed_files_at_most_once_a_second(repo_copy):
    repo, _ = repo_copy
    now = [0.0]
    state = OnlineState(repo, check_interval_s=1.0, clock=lambda: now[0])
    state.refresh()
    snap = state.features(1)
    assert state.routing.production == 1
    # A new snapshot (e.g. after a feedback join) and a new routing land on disk.
    smaller = FeatureSnapshot.load(layout.features_path(repo, 1))
    smaller = dataclasses.replace(
        smaller,
        user_ids=smaller.user_ids[:3],
        user_index=smaller.user_index[:3],
        user_cats=smaller.user_cats[:3],
        history=smaller.history[:3],
        seen_indptr=smaller.seen_indptr[:4],
    )
    smaller.save(layout.features_path(repo, 1))
    RoutingState(production=1, salt=5).save(layout.routing_path(repo))
    now[0] = 0.5
    state.refresh()  # too soon: nothing is re-read
    assert state.features(1) is snap and state.routing.salt == 0
    now[0] = 1.6
    state.refresh()
    assert len(state.features(1).user_ids) == 3 and state.routing.salt == 5


def test_online_state_forgets_versions_that_left_the_routing(repo_copy, tiny_run):
    repo, _ = repo_copy
    export(_cfg(tiny_run, repo, exporter="legacy", promote=False))  # version 2
    now = [0.0]
    state = OnlineState(repo, check_interval_s=1.0, clock=lambda: now[0])
    RoutingState(production=1, canary=2, canary_percent=50).save(layout.routing_path(repo))
    state.refresh()
    state.features(1), state.features(2)
    RoutingState(production=2).save(layout.routing_path(repo))  # 2 promoted over 1
    now[0] = 2.0
    state.refresh()
    assert set(state._features) == {2}  # 1's snapshot is no longer held
    assert state.features(1) is not None  # a straggler for 1 still gets an answer


# A real `northstar export` process that dies like kill -9 at a chosen point: os._exit runs
# no cleanup (no `finally`, no atexit), which is what SIGKILL leaves behind, at a point we
# choose rather than a timer's luck.
_DIE_AT = """
import os, sys
from serving import repository as layout
from serving.publish import ExportConfig, export
real, calls = layout.publish_dir, []
def publish(staging, target):
    calls.append(target)
    if len(calls) == int(sys.argv[3]):
        os._exit(137)
    real(staging, target)
layout.publish_dir = publish
k, overfetch = int(sys.argv[4]), int(sys.argv[5])
export(ExportConfig(run=sys.argv[1], repo=sys.argv[2], k=k, overfetch=overfetch, exporter="legacy"))
"""


def _export_killed_at(run, repo, publish_call: int) -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", _DIE_AT, *map(str, (run, repo, publish_call, K, OVERFETCH))],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 137, proc.stderr[-2000:]


def test_an_export_killed_before_its_rename_leaves_nothing_loadable(repo_copy, tiny_run):
    repo, _ = repo_copy
    _export_killed_at(tiny_run, repo, publish_call=1)  # dies with the version still staged
    assert layout.list_versions(repo) == [1]  # Triton sees numeric folders only
    staged = [p for p in (repo / "retrieval").iterdir() if p.name.startswith(".")]
    assert staged and not any(p.name.isdigit() for p in staged)
    res = export(_cfg(tiny_run, repo, exporter="legacy"))  # the next export tidies up
    assert res.version == 2
    assert not [p for p in (repo / "retrieval").iterdir() if p.name.startswith(".")]


def test_an_export_killed_before_its_features_is_refused_by_load(repo_copy, tiny_run):
    from serving.control import ServerError, load_versions

    repo, _ = repo_copy
    _export_killed_at(tiny_run, repo, publish_call=2)  # version 2 published, features not
    assert layout.list_versions(repo) == [1, 2]
    assert layout.incomplete_reasons(repo, 1) == []
    assert "features.npz" in layout.incomplete_reasons(repo, 2)[0]
    assert RoutingState.load(layout.routing_path(repo)).production == 1  # never routed
    # Refused before Triton is asked (no server at this address is needed to prove it).
    with pytest.raises(ServerError, match="version 2 is incomplete"):
        load_versions("127.0.0.1:1", repo, [1, 2])


def test_export_keeps_tuned_serving_configs_and_only_moves_versions(repo_copy, tiny_run):
    repo, _ = repo_copy
    tuned_ret = layout.RetrievalServing(instances=3, max_queue_delay_us=123)
    tuned_rec = layout.RecommendServing(exploration_epsilon=0.2, instances=1)
    export(_cfg(tiny_run, repo, exporter="legacy", retrieval=tuned_ret, recommend=tuned_rec))

    def settings():
        ret = layout.read_config(repo / "retrieval" / "config.pbtxt")
        rec = layout.read_config(repo / "recommend" / "config.pbtxt")
        return (
            ret.instance_group[0].count,
            ret.dynamic_batching.max_queue_delay_microseconds,
            rec.parameters["exploration_epsilon"].string_value,
            layout.served_versions(ret),
        )

    # Without a url an export only publishes: production stays 1 throughout.
    assert settings() == (3, 123, "0.2", [1])
    export(_cfg(tiny_run, repo, exporter="legacy"))  # a retrain's export: defaults in config
    assert settings() == (3, 123, "0.2", [1])  # tuning kept
    export(_cfg(tiny_run, repo, exporter="legacy", serving_configs="rewrite"))
    assert settings() == (1, 500, "0.0", [1])  # asked to rewrite: the defaults


def test_a_torn_state_file_keeps_its_last_good_copy_and_is_reported_once(repo_copy):
    repo, _ = repo_copy
    rec = Recommender(repo, check_interval_s=0.0)
    seen: list[tuple[str, str]] = []
    rec.state.on_error.append(lambda path, msg: seen.append((path.name, msg)))
    retrieve = InlineRetrieval(repo)
    users = np.arange(1000, 1006, dtype=np.int64)[:, None]
    good = rec.run([rec.parse(users, None, rec.begin())], retrieve).results[0]
    feats = layout.features_path(repo, 1)
    feats.write_bytes(feats.read_bytes()[:100])  # torn while serving
    routing = layout.routing_path(repo)
    routing.write_text(routing.read_text()[:10])  # truncated JSON
    for _ in range(3):  # several refreshes: every batch is still answered, from memory
        again = rec.run([rec.parse(users, None, rec.begin())], retrieve).results[0]
        np.testing.assert_array_equal(again.item_ids, good.item_ids)
    assert sorted(name for name, _ in seen) == ["features.npz", "routing.json"]  # once each
    assert all(str(repo) in msg for _, msg in seen)  # every message names its file
    assert len(rec.state.problems()) == 2
    # a fresh reader with no good copy gets an error that names the file
    fresh = Recommender(repo, check_interval_s=0.0)
    with pytest.raises(StateFileError, match=r"routing\.json"):
        fresh.begin()
