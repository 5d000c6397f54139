"""A run directory: everything a trained model is, readable without the training code path.

RUN_DIR/
  run.json       tower config, feature spec, data dir, train config, popularity prior
  vocab.npz/json raw-id and category vocabularies
  model.pt       state_dict only (loaded with weights_only=True: no pickle)
  features.npz   the online feature snapshot serving starts from
  metrics.json   offline evaluation, model beside the baselines, the prior's beta curve
  prior_curve.png  NDCG@10 against ARP and exposure Gini for each beta (when a grid ran)
  checkpoint.pt  the last resumable training state (while a grid of logit adjustments
                 trains: checkpoint-adj<value>.pt per candidate; the winner's becomes this)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from common.files import atomic_path, atomic_write_text
from models.features import FeatureSpec, FeatureVocab
from models.prior import PopularityPrior
from models.towers import TowerConfig, TwoTower

RUN_FILE = "run.json"
MODEL_FILE = "model.pt"
VOCAB_FILE = "vocab"
FEATURES_FILE = "features.npz"
METRICS_FILE = "metrics.json"
CHECKPOINT_FILE = "checkpoint.pt"


@dataclass(frozen=True)
class Run:
    path: Path
    model: TwoTower
    vocab: FeatureVocab
    tower: TowerConfig
    meta: dict[str, Any]

    @property
    def features_path(self) -> Path:
        return self.path / FEATURES_FILE


def save_run(path: Path, model: TwoTower, vocab: FeatureVocab, meta: dict[str, Any]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    vocab.save(path / VOCAB_FILE)
    with atomic_path(path / MODEL_FILE) as tmp:
        torch.save(model.state_dict(), tmp)
    prior = model.prior.to_dict() if model.prior is not None else None
    body = {"tower": asdict(model.cfg), "spec": asdict(model.spec), "popularity_prior": prior}
    body.update(meta)
    atomic_write_text(path / RUN_FILE, json.dumps(body, indent=1, default=str))


def load_run(path: str | Path) -> Run:
    path = Path(path)
    if not (path / RUN_FILE).exists():
        raise FileNotFoundError(
            f"{path}: not a run directory (no {RUN_FILE}); run `northstar train`"
        )
    meta = json.loads((path / RUN_FILE).read_text())
    tower = TowerConfig(**meta["tower"])
    spec_d = meta["spec"]
    spec = FeatureSpec(
        **{
            **spec_d,
            "user_cat_cardinalities": tuple(spec_d["user_cat_cardinalities"]),
            "item_cat_cardinalities": tuple(spec_d["item_cat_cardinalities"]),
        }
    )
    state = torch.load(path / MODEL_FILE, map_location="cpu", weights_only=True)
    model = TwoTower(spec, tower, item_cats=state["item_cats"])
    model.load_state_dict(state)
    if meta.get("popularity_prior"):  # the bias itself is in model.pt (item_bias)
        model.prior = PopularityPrior(**meta["popularity_prior"])
    model.eval()
    return Run(path, model, FeatureVocab.load(path / VOCAB_FILE), tower, meta)
