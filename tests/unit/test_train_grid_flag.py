"""`northstar train` trains one model; `--grid` opts into the logit-adjustment grid."""

from __future__ import annotations

import training.train as train_mod
from northstar.cli import main


def _config_of(monkeypatch, argv: list[str]):
    seen = []
    monkeypatch.setattr(train_mod, "train", lambda cfg: seen.append(cfg))  # no training
    assert main(argv) == 0
    return seen[0]


def test_train_is_one_model_unless_grid_is_asked(monkeypatch):
    plain = _config_of(monkeypatch, ["train", "--data", "d", "--out", "o"])
    assert plain.logit_adjustments == () and train_mod.TrainConfig().logit_adjustments == ()
    grid = _config_of(monkeypatch, ["train", "--data", "d", "--out", "o", "--grid"])
    assert grid.logit_adjustments == train_mod.LOGIT_ADJUSTMENT_GRID
    assert len(set(grid.logit_adjustments)) >= 2  # a grid: more than one training
    given = _config_of(
        monkeypatch,
        ["train", "--data", "d", "--out", "o", "--grid", "--set", "logit_adjustments=0,1"],
    )
    assert given.logit_adjustments == (0.0, 1.0)  # --set still wins
