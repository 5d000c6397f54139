"""The retrain pipeline without a server: warm start, collect, faults, routing on files.

Integration: it trains real (tiny) runs, exports ONNX and writes an MLflow store.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from canary.decide import OfflineGates
from canary.faults import skew_item_table
from canary.online import EvaluateConfig, rollback, status
from canary.pipeline import RetrainConfig, collect, retrain
from canary.state import CanaryRecord, ProductionRecord, StateStore
from fairness.gates import GateConfig
from feedback.join import LABEL_SCHEMA
from feedback.tiers import TierConfig
from models.towers import TowerConfig
from serving import repository as layout
from serving.publish import ExportConfig, export
from serving.routing import RoutingState
from training.run import load_run
from training.schema import Dataset
from training.split import split
from training.synth import SynthConfig, generate_dataset
from training.train import TrainConfig, train

pytestmark = pytest.mark.integration

TOWER = TowerConfig(id_dim=8, cat_dim=4, hidden_dim=16, out_dim=8, dropout=0.0)
TRAIN = TrainConfig(
    epochs=1, batch_size=256, val_users=500, threads=2, progress=False, tower=TOWER, resume=False
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("canary-pipeline")
    _, ds = generate_dataset(SynthConfig.preset("tiny"), progress=False)
    ds.save(root / "data")
    metrics = train(replace(TRAIN, data=str(root / "data"), out=str(root / "prod")))
    assert "warm_start" not in metrics  # unchanged for runs that do not ask for one
    return root, ds


def _labels(root: Path, ds: Dataset, n: int, t0: float, seed: int = 0) -> Path:
    """A labels folder as feedback.join writes it: n impressions, about a third clicked."""
    rng = np.random.default_rng(seed)
    out = root / "labels"
    part = out / "date=2026-01-01"
    part.mkdir(parents=True, exist_ok=True)
    clicked = rng.random(n) < 0.33
    df = pd.DataFrame(
        {
            "event_id": [f"e{seed}-{i}" for i in range(n)],
            "request_id": [f"r{seed}-{i}" for i in range(n)],
            "user_id": rng.choice(ds.users["user_id"].to_numpy(), n),
            "item_id": rng.choice(ds.items["item_id"].to_numpy(), n),
            "position": np.zeros(n, np.int64),
            "score": np.zeros(n),
            "model_version": np.ones(n, np.int64),
            "propensity": np.ones(n),
            "impression_ts": t0 + np.arange(n, dtype=float),
            "clicked": clicked,
            "liked": np.zeros(n, bool),
            "value": np.where(clicked, 60.0, 0.0),
            "label_ts": t0 + np.arange(n, dtype=float) + 5,
            "event_type": np.where(clicked, "click", None),
            "n_interactions": clicked.astype(np.int64),
        }
    )
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pandas(df, schema=LABEL_SCHEMA), part / f"part-{seed:08d}.parquet")
    return out


def test_warm_start_loads_production_or_says_why(world, tmp_path):
    root, _ = world
    base = replace(TRAIN, data=str(root / "data"), epochs=1, init_from=str(root / "prod"))
    m = train(replace(base, out=str(tmp_path / "warm")))
    assert m["warm_start"]["used"] and "loaded weights" in m["warm_start"]["reason"]
    prod, warm = load_run(root / "prod"), load_run(tmp_path / "warm")
    assert np.array_equal(prod.vocab.user_ids, warm.vocab.user_ids)  # vocabulary kept
    other = replace(TOWER, out_dim=16)
    m = train(replace(base, out=str(tmp_path / "cold"), tower=other))
    assert not m["warm_start"]["used"] and "tower config" in m["warm_start"]["reason"]


def test_collect_counts_new_labels_and_shuffles_only_what_is_learned(world, tmp_path):
    root, ds = world
    labels = _labels(tmp_path, ds, 300, t0=1_800_000_000.0)
    cfg = RetrainConfig(state_dir=str(tmp_path / "st"), labels=str(labels), train=TRAIN)
    got = collect(cfg, tmp_path / "r1", str(root / "data"))
    n_pos = got.positives
    assert n_pos > 50 and got.new_positives == n_pos and got.evidence()["positives"] == n_pos
    extra = pd.read_parquet(got.extra)
    assert list(extra.columns)[:5] == ["user_id", "item_id", "timestamp", "event_type", "value"]
    assert (extra["weight"] == 1.0).all() and extra["final"].all()  # the default: every final
    # the slow schedule learns from strong labels only: these clicks are 60 s watches
    strong = collect(replace(cfg, label_tier="strong"), tmp_path / "rs", str(root / "data"))
    assert strong.positives == 0
    long_enough = replace(cfg, label_tier="strong", tiers=TierConfig(strong_watch_s=30.0))
    assert collect(long_enough, tmp_path / "rl", str(root / "data")).positives == n_pos
    assert got.label_ts == float(extra["timestamp"].max())  # the cursor a retrain consumes
    # only labels after the cursor are new
    cursor = float(extra["timestamp"].median())
    got2 = collect(cfg, tmp_path / "r2", str(root / "data"), since_label_ts=cursor)
    assert 0 < got2.new_positives < n_pos

    bad = collect(
        replace(cfg, fault="shuffle_labels"),
        tmp_path / "r3",
        str(root / "data"),
        since_label_ts=cursor,
    )
    shuffled = Dataset.load(bad.data)
    real = split(ds.interactions, TRAIN.split)
    fake = split(shuffled.interactions, TRAIN.split)
    pd.testing.assert_frame_equal(
        fake.test.reset_index(drop=True), real.test.reset_index(drop=True)
    )  # the evaluation slice is untouched
    same = fake.train.merge(real.train, on=["user_id", "item_id", "timestamp"])
    assert len(same) < 0.2 * len(fake.train)  # users no longer keep their own items
    assert bad.eval_data == root / "data" != bad.data  # evaluated on the real data
    assert bad.eval_extra == tmp_path / "r3" / "extra.parquet" != bad.extra
    assert (
        pd.read_parquet(bad.extra)["item_id"].tolist()
        != pd.read_parquet(bad.eval_extra)["item_id"].tolist()
    )


def test_collect_writes_the_skipped_impressions_when_asked_and_training_reads_them(world, tmp_path):
    root, ds = world
    labels = _labels(tmp_path, ds, 300, t0=1_800_000_000.0)
    cfg = RetrainConfig(state_dir=str(tmp_path / "st"), labels=str(labels), train=TRAIN)
    assert collect(cfg, tmp_path / "off", str(root / "data")).skips is None  # off by default
    got = collect(replace(cfg, skip_weight=5.0), tmp_path / "on", str(root / "data"))
    skips = pd.read_parquet(got.skips)
    lab = pd.read_parquet(labels)
    shown_not_picked = lab[~lab["clicked"]]
    clicked = lab[lab["clicked"]]
    picked = set(zip(clicked["user_id"], clicked["item_id"], strict=True))
    pairs = zip(shown_not_picked["user_id"], shown_not_picked["item_id"], strict=True)
    want = shown_not_picked[[pair not in picked for pair in pairs]]
    assert got.n_skips == len(skips) == len(want) > 100 and got.evidence()["skips"] == len(skips)
    assert list(skips.columns) == ["user_id", "item_id", "timestamp"]
    assert set(skips["timestamp"]) <= set(np.floor(want["impression_ts"]).astype(np.int64))
    m = train(
        replace(
            TRAIN,
            data=str(root / "data"),
            out=str(tmp_path / "run"),
            extra_interactions=str(got.extra),
            skip_negatives=str(got.skips),
            skip_weight=5.0,
        )
    )
    assert m["epochs"] and np.isfinite(m["epochs"][0]["loss"])
    with pytest.raises(ValueError, match="skip_weight"):
        RetrainConfig(skip_weight=-1.0)


def test_skew_item_table_permutes_items_only(world, tmp_path):
    root, _ = world
    out = skew_item_table(root / "prod", tmp_path / "skew", seed="x")
    a = torch.load(root / "prod" / "model.pt", weights_only=True)
    b = torch.load(out / "model.pt", weights_only=True)
    assert not torch.equal(a["item_tower.item_emb.weight"], b["item_tower.item_emb.weight"])
    assert torch.equal(a["user_tower.user_emb.weight"], b["user_tower.user_emb.weight"])
    assert torch.equal(
        a["item_tower.item_emb.weight"].sort(0).values,
        b["item_tower.item_emb.weight"].sort(0).values,
    )


def _plumbing_cfg(tmp_path: Path, repo: Path, labels: Path) -> RetrainConfig:
    return RetrainConfig(
        state_dir=str(tmp_path / "st"),
        repo=str(repo),
        url=None,
        labels=str(labels),
        train=TRAIN,
        exporter="legacy",
        canary_percent=20,
        audit_boot=0,
        # The plumbing is under test here, not the thresholds (tests/unit/test_canary_decide.py):
        # a one-epoch model on random labels must still get through to routing.
        gates=OfflineGates(
            min_metric_ratio=0.0,
            min_lift_over_toppop=0.0,
            min_topk_overlap=0.0,
            max_arp_ratio=100.0,
            max_gini_increase=1.0,
        ),
        fairness=GateConfig(max_gap=None, min_ratio=None, max_group_drop=None),
    )


def test_a_version_that_fails_to_load_is_removed_and_reported_at_load(world, tmp_path, monkeypatch):
    """fault=corrupt_export with Triton's refusal stood in for (the live server's version of
    this is tests/integration/test_canary_scenario.py): the failing step is "load", the
    unrouted version is removed, routing and the state keep production."""
    import canary.pipeline as pipeline

    root, ds = world
    repo = tmp_path / "repo"
    export(
        ExportConfig(run=str(root / "prod"), repo=str(repo), k=10, overfetch=10, exporter="legacy")
    )
    routing_before = layout.routing_path(repo).read_text()
    labels = _labels(tmp_path, ds, 200, t0=1_800_000_000.0)
    seen = {}

    def refusing_switch(repo_, new, *, url=None, progress=None, **kw):
        progress("load")
        graph = layout.version_dir(repo_, new.canary) / layout.ONNX_FILE
        seen["graph"] = graph.read_bytes()
        raise RuntimeError(f"failed to load retrieval version {new.canary}")

    monkeypatch.setattr(pipeline, "switch_routing", refusing_switch)
    cfg = replace(_plumbing_cfg(tmp_path, repo, labels), fault="corrupt_export")
    res = retrain(cfg)
    assert (res.status, res.step, res.version) == ("failed", "load", 2), res.reasons
    assert seen["graph"] == b"not an onnx graph"  # the fault hook ran after the export
    assert not layout.version_dir(repo, 2).exists()
    assert layout.routing_path(repo).read_text() == routing_before
    st = StateStore(cfg.state_dir).load()
    assert st["canary"] is None and st["in_progress"] is None and st["last_retrain"] is None
    last = st["history"][-1]
    assert (last["decision"], last["evidence"]["step"]) == ("failed", "load")
    assert "production untouched" in last["reasons"][-1]


def test_retrain_on_files_routes_a_canary_then_rollback(world, tmp_path, monkeypatch):
    root, ds = world
    # One retrain loads the base dataset once and passes it down: collect, training, the
    # offline comparison and the serving features all use that one copy.
    real_load = Dataset.load.__func__
    loads_here: list[str] = []

    def counting_load(cls, data_dir):
        loads_here.append(str(data_dir))
        return real_load(cls, data_dir)

    monkeypatch.setattr(Dataset, "load", classmethod(counting_load))
    repo = tmp_path / "repo"
    export(
        ExportConfig(run=str(root / "prod"), repo=str(repo), k=10, overfetch=10, exporter="legacy")
    )
    labels = _labels(tmp_path, ds, 400, t0=1_800_000_000.0)
    cfg = _plumbing_cfg(tmp_path, repo, labels)
    res = retrain(cfg)
    assert res.status == "canary", res.reasons
    assert res.version == 2 and res.production == 1
    assert loads_here == [str((root / "data").resolve())]  # production's data dir, once
    routing = RoutingState.load(layout.routing_path(repo))
    assert (routing.production, routing.canary, routing.canary_percent) == (1, 2, 20)
    cfg_versions = layout.served_versions(
        layout.read_config(repo / layout.RETRIEVAL / layout.CONFIG_FILE)
    )
    assert cfg_versions == [1, 2]
    st = status(cfg.state_dir, repo)
    assert st["canary"]["version"] == 2 and st["production"]["version"] == 1
    state = StateStore(cfg.state_dir).load()
    canary = CanaryRecord.from_state(state)
    prod = ProductionRecord.from_state(state)
    assert (canary.percent, canary.retrain_id, canary.msprt_p) == (20, res.id, 1.0)
    assert canary.run == str(Path(res.run_dir) / "run") and canary.mlflow_version
    assert prod.run == str((root / "prod").resolve())
    assert prod.base_data == str((root / "data").resolve())
    assert prod.mlflow_version and state["last_retrain"]["id"] == res.id
    ev = st["history"][-1]["evidence"]
    assert ev["train"]["warm_start"]["used"]
    assert {c["name"] for c in ev["offline"]["verdict"]["checks"]} >= {"topk_overlap", "bias_trend"}
    assert (Path(res.run_dir) / "fairness" / "audit.json").exists()

    # a second retrain waits for the canary's verdict
    again = retrain(cfg)
    assert again.status == "skipped" and "still on trial" in again.reasons[0]

    rollback(EvaluateConfig(state_dir=cfg.state_dir, repo=str(repo), url=None), reasons=["test"])
    routing = RoutingState.load(layout.routing_path(repo))
    assert routing.production == 1 and routing.canary is None
    from canary.tracking import Tracker

    t = Tracker(cfg.state_dir)
    assert t.alias("champion")["tags"]["triton_version"] == "1"
    assert t.alias("challenger") is None
    hist = json.loads((Path(cfg.state_dir) / "state.json").read_text())["history"]
    assert [h["kind"] for h in hist][-1] == "rollback"
