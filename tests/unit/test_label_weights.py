"""Per-example weights (weak vs strong labels, feedback.tiers) reach the loss: equal weights
change nothing, a near-zero weight removes an example, bad weights are refused."""

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from models.features import FeatureVocab
from models.loss import in_batch_softmax_loss
from training.data import TrainingExamples


def _inputs(seed=0, b=6, d=4):
    g = torch.Generator().manual_seed(seed)
    return {
        "user_emb": torch.randn(b, d, generator=g),
        "item_emb": torch.randn(b, d, generator=g),
        "item_ids": torch.arange(b),
        "log_q": torch.full((b,), -2.0),
        "temperature": 0.5,
    }


def test_weights_reach_the_loss():
    x = _inputs()
    plain = in_batch_softmax_loss(**x)
    assert torch.allclose(in_batch_softmax_loss(**x, weight=torch.full((6,), 3.0)), plain)
    w = torch.tensor([1.0, 1e-9, 1e-9, 1e-9, 1e-9, 1e-9])
    logits = x["user_emb"] @ x["item_emb"].T / 0.5 + 2.0
    first_only = F.cross_entropy(logits[:1], torch.tensor([0]))
    assert torch.allclose(in_batch_softmax_loss(**x, weight=w), first_only, atol=1e-6)


def _tables():
    users = pd.DataFrame(
        {
            "user_id": [1, 2],
            "gender": ["F", "M"],
            "age_bucket": ["18-24"] * 2,
            "activity": ["low"] * 2,
            "occupation": ["unknown"] * 2,
        }
    )
    items = pd.DataFrame({"item_id": [10, 20, 30], "genre": ["a"] * 3, "provider": ["x"] * 3})
    train = pd.DataFrame({"user_id": [1, 1, 2], "item_id": [10, 20, 30], "timestamp": [1, 2, 3]})
    vocab = FeatureVocab.fit(users, items, train, n_hash_buckets=2, history_len=2)
    return users, train, vocab


def test_examples_carry_weights_and_default_missing_ones_to_one():
    users, train, vocab = _tables()
    assert TrainingExamples.build(vocab, users, train).weight is None
    weighted = train.assign(weight=[0.5, np.nan, 2.0])  # NaN: a base-log row, weight 1
    ex = TrainingExamples.build(vocab, users, weighted)
    assert sorted(ex.weight.tolist()) == [0.5, 1.0, 2.0]
    batch = ex.batch(np.arange(3))
    assert batch["weight"].dtype == torch.float32 and len(batch["weight"]) == 3


def test_bad_weights_are_refused():
    users, train, vocab = _tables()
    with pytest.raises(ValueError, match="weight: expected finite values > 0"):
        TrainingExamples.build(vocab, users, train.assign(weight=[1.0, 0.0, 1.0]))
