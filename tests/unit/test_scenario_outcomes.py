"""How the canary scenario names each act's end (the demo and the scenario test check it)."""

from __future__ import annotations

from loadtest.scenario import EXPECTED, outcome, unexpected


def _act(status: str, decision: str | None = None) -> dict:
    act = {"retrain": {"status": status}, "looks": []}
    if decision is not None:
        act["decision"] = decision
    return act


def test_outcome_is_the_online_decision_of_a_canary_else_the_retrain_status():
    assert outcome(_act("canary", "promote")) == "promote"
    assert outcome(_act("canary")) == "continue"  # looks ran out without a decision
    assert outcome(_act("rejected")) == "rejected"
    assert outcome(_act("skipped")) == "skipped"


def test_unexpected_names_every_act_that_did_not_end_as_it_must():
    good = {
        "a": _act("canary", "promote"),
        "b": _act("rejected"),
        "c": _act("canary", "rollback"),
    }
    assert unexpected(good) == {}
    # the run: act (c) rejected offline by the bias-trend gate, never on canary
    bad = {**good, "c": _act("rejected")}
    assert unexpected(bad) == {"c": "rejected"}
    assert unexpected({**good, "a": _act("canary")}) == {"a": "continue"}
    assert EXPECTED["d"] == "rollback"
