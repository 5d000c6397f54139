"""The stability term: zero when the candidate is production, positive once it moves, its
gradient reaches only the candidate, and it pulls a drifting candidate back."""

import copy

import pytest
import torch

from models.task import StabilityTerm, TwoTowerTrainTask

from .test_models import SPEC, _model, _user_batch


def _batch(b=8):
    uid, cats, hist = _user_batch(b)
    return {"user_index": uid, "user_cats": cats, "history": hist, "item_index": torch.arange(b)}


def _user(model, batch):
    return model.user_embed(batch["user_index"], batch["user_cats"], batch["history"])


def test_zero_for_production_itself_and_positive_after_a_change():
    torch.manual_seed(1)
    teacher = _model()
    term = StabilityTerm(copy.deepcopy(teacher), weight=1.0, k=10, temperature=0.05)
    student = copy.deepcopy(teacher).eval()
    batch = _batch()
    assert term(student, batch, _user(student, batch)).item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.3 * torch.randn_like(p))
    assert term(student, batch, _user(student, batch)).item() > 1e-3


def test_gradients_reach_the_candidate_only():
    teacher, student = _model(), _model()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.3 * torch.randn_like(p))
    term = StabilityTerm(teacher, weight=1.0, k=10, temperature=0.05)
    task = TwoTowerTrainTask(student, temperature=0.05, stability=term)
    batch = _batch()
    loss = task(batch, torch.zeros(len(batch["item_index"])))
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_it_pulls_a_drifting_candidate_back():
    torch.manual_seed(2)
    teacher = _model().eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.3 * torch.randn_like(p))
    term = StabilityTerm(teacher, weight=1.0, k=10, temperature=0.05)
    opt = torch.optim.Adam(student.parameters(), lr=0.01)
    batch = _batch(16)
    before = term(student, batch, _user(student, batch)).item()
    for _ in range(50):
        opt.zero_grad()
        term(student, batch, _user(student, batch)).backward()
        opt.step()
    assert term(student, batch, _user(student, batch)).item() < 0.5 * before


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="expected weight > 0, k >= 2"):
        StabilityTerm(_model(), weight=0.0, k=10, temperature=0.05)
    assert StabilityTerm(_model(), weight=1.0, k=10**6, temperature=0.05).k == SPEC.n_items
