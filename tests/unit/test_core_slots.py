"""recommend instances borrow idle cores (serving/core_slots.py) without ever oversubscribing."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from models.snapshot import FeatureSnapshot
from serving import repository as layout
from serving.core_slots import CoreSlots
from serving.inline import InlineRetrieval
from serving.testing import tiny_export


def test_each_instance_claims_its_own_slot(tmp_path):
    a, b = CoreSlots.claim(tmp_path, 2), CoreSlots.claim(tmp_path, 2)
    assert {a.mine, b.mine} == {0, 1}
    assert CoreSlots.claim(tmp_path / "one", 1) is None  # alone: nothing to borrow


def test_an_instance_past_the_slots_runs_narrow_until_one_is_freed(tmp_path):
    now = [0.0]
    a, b = CoreSlots.claim(tmp_path, 2), CoreSlots.claim(tmp_path, 2)
    late = CoreSlots(tmp_path, 2, retry_s=1.0, clock=lambda: now[0])  # a reload's overlap
    assert late.mine is None
    with late.hold(widen=True) as wide:
        assert not wide
    a.close()  # the old instance goes
    with late.hold(widen=True) as wide:
        assert not wide and late.mine is None  # no retry within the second
    now[0] = 1.5
    with b.hold(widen=False), late.hold(widen=True) as wide:  # claims a's slot, b is busy
        assert late.mine == 0 and not wide
    with late.hold(widen=True) as wide:
        assert wide


def test_a_run_widens_only_while_every_peer_is_idle(tmp_path):
    a, b = CoreSlots.claim(tmp_path, 2), CoreSlots.claim(tmp_path, 2)
    with a.hold(widen=True) as wide:
        assert wide
    with a.hold(widen=False) as wide:
        assert not wide
    # b runs the graph on its own core, so a keeps to its share.
    with b.hold(widen=False), a.hold(widen=True) as wide:
        assert not wide
    with a.hold(widen=True) as wide:  # b done: a may borrow again
        assert wide


def test_a_peer_waits_for_its_core_to_come_back(tmp_path):
    a, b = CoreSlots.claim(tmp_path, 2), CoreSlots.claim(tmp_path, 2)
    order: list[str] = []
    started = threading.Event()

    def b_runs():
        started.set()
        with b.hold(widen=False):
            order.append("b runs")

    with a.hold(widen=True) as wide:
        assert wide
        t = threading.Thread(target=b_runs)
        t.start()
        started.wait()
        t.join(timeout=0.2)  # b is blocked on its slot for as long as a runs wide
        assert t.is_alive() and order == []
        order.append("a done")
    t.join()
    assert order == ["a done", "b runs"]


@pytest.fixture
def repo(tmp_path):
    return tiny_export(tmp_path / "repo", k=10, overfetch=10)[1]


def test_a_lone_row_widens_and_answers_what_the_narrow_session_does(repo, tmp_path):
    snap = FeatureSnapshot.load(layout.features_path(repo, 1))
    folder = tmp_path / "slots"
    inline = InlineRetrieval(
        repo, intra_op_threads=1, solo_threads=2, slots_folder=folder, instances=2
    )
    peer = CoreSlots.claim(folder, 2)
    for user in (*snap.user_ids[:5], 10**12):  # known users and a cold one, one at a time
        feats = snap.lookup(np.asarray([user]))
        before = inline.wide_runs
        ids, scores = inline(1, feats)
        assert inline.wide_runs == before + 1
        with peer.hold(widen=False):  # the peer is busy: the narrow session answers
            narrow_ids, narrow_scores = inline(1, feats)
        assert inline.wide_runs == before + 1
        np.testing.assert_array_equal(ids, narrow_ids)
        np.testing.assert_allclose(scores, narrow_scores, rtol=0, atol=1e-6)
    inline(1, snap.lookup(snap.user_ids[:4]))  # a batch of rows keeps to the packed kernel
    assert inline.wide_runs == 6
    # One version's single row in a batch of several users (a canary's share) stays narrow,
    # like the other version's rows of that batch.
    with inline.batch(5):
        inline(1, snap.lookup(snap.user_ids[:1]))
    assert inline.wide_runs == 6
    # The wide session serves lone rows: the plain kernel, not the one prepacked for GEMM.
    opts = inline.wide_runner(1).session.get_session_options()
    assert opts.get_session_config_entry("session.disable_prepacking") == "1"


def test_no_second_session_without_slots_or_spare_threads(repo, tmp_path):
    folder = tmp_path / "slots"
    for inline in (
        InlineRetrieval(repo, intra_op_threads=1, solo_threads=2),  # no slots
        InlineRetrieval(  # no spare threads
            repo, intra_op_threads=2, solo_threads=2, slots_folder=folder, instances=2
        ),
    ):
        snap = FeatureSnapshot.load(layout.features_path(repo, 1))
        inline(1, snap.lookup(snap.user_ids[:3]))
        assert inline.wide_runner(1) is None and inline.wide_runs == 0


def test_recommend_config_carries_solo_threads():
    cfg = layout.recommend_config(layout.RecommendServing(solo_threads=3))
    assert cfg.parameters["solo_threads"].string_value == "3"
