"""The canary scenario on a live Triton under simulated traffic (the scenario test, the demo,
the soak and the freshness study drive it).

    (a) retrain on feedback -> offline gates pass -> canary -> online test -> promote
    (b) a broken candidate (item ids shuffled across its training interactions, trained
        from scratch) -> the offline gates reject it -> nothing exported, Triton loads nothing
    (c) a candidate that is fine offline but serves a permuted item table (a training/
        serving skew: `fault="serving_skew"`) -> canary -> it loses online -> rolled back
    (d) optional: a canary whose online features are torn (`fault="broken_features"`):
        Triton loads it, `recommend` answers its users from production, and the serving
        guardrails (fallbacks count against the canary) roll it back

Traffic never stops: a background thread runs the closed-loop simulator (the `simulator` package)
in small batches while versions load, routing changes, versions are promoted, rolled back
and unloaded; every batch must see zero failed requests. Labels are joined between batches
(the traffic pauses for the join only, so every click of a joined impression is in).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

from canary.online import EvaluateConfig, evaluate_canary
from canary.pipeline import RetrainConfig, RetrainResult, retrain
from feedback.join import JoinConfig, run_join
from simulator import simulate

log = logging.getLogger(__name__)


class Traffic:
    """Background closed-loop traffic: simulate() batches until stopped."""

    def __init__(self, sim_cfg, *, pause_s: float = 0.0):
        self.sim_cfg = sim_cfg
        # Seconds between batches. The scenario slows the traffic down (never stops it)
        # while a candidate trains, so the two share the CPU, and speeds it up for looks.
        self.pause_s = pause_s
        self.lock = threading.Lock()  # held for one whole batch (requests + clicks sent)
        self.reports: list = []
        # One memory for the whole run: a user who clicked an item rarely clicks it again.
        from simulator import ClickMemory

        self.memory = ClickMemory()
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="traffic", daemon=True)

    def _loop(self) -> None:

        i = 0
        while not self._stop.is_set():
            with self.lock:
                try:
                    cfg = replace(self.sim_cfg, seed=self.sim_cfg.seed + i)
                    rep = simulate(cfg, memory=self.memory)
                    self.reports.append(rep)
                except Exception as exc:  # reported, and the scenario fails on it
                    self.errors.append(f"{type(exc).__name__}: {exc}")
            i += 1
            time.sleep(self.pause_s)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=120)

    @property
    def requests(self) -> int:
        return sum(r.requests for r in self.reports)

    @property
    def failed(self) -> int:
        return sum(r.requests_failed for r in self.reports) + len(self.errors)

    @property
    def retries(self) -> int:
        return sum(r.retries for r in self.reports)

    def wait_requests(self, n: int, timeout_s: float = 600.0) -> None:
        """Block until `n` more requests were sent. Past the deadline the traffic is stuck
        (a failing batch is counted in `errors` and the loop goes on): raise, never carry on
        as if the traffic had come."""
        target = self.requests + n
        deadline = time.monotonic() + timeout_s
        while self.requests < target:
            if not self._thread.is_alive():
                raise RuntimeError("the traffic thread stopped")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.requests}/{target} requests after {timeout_s:.0f} s: traffic is stuck"
                )
            time.sleep(0.2)


# How each act must end: the online decision of a canary, or the retrain's own status.
EXPECTED = {"a": "promote", "b": "rejected", "c": "rollback", "d": "rollback"}


def outcome(act: dict[str, Any]) -> str:
    """An act's end: "promote" / "rollback" / "continue" for a canary, else the retrain's
    status ("rejected", "skipped", "failed", ...)."""
    if act["retrain"]["status"] == "canary":
        return act.get("decision") or "continue"
    return act["retrain"]["status"]


def unexpected(acts: dict[str, dict[str, Any]]) -> dict[str, str]:
    """act -> what it ended in, for every act that did not end as EXPECTED says."""
    return {n: outcome(a) for n, a in acts.items() if outcome(a) != EXPECTED.get(n)}


@dataclass
class ScenarioReport:
    acts: dict[str, Any] = field(default_factory=dict)
    requests: int = 0
    failed: int = 0
    retries: int = 0
    seconds: float = 0.0


def _join(labels: str, event_log: str, window_s: float) -> None:

    run_join(JoinConfig(log=event_log, out=labels, window_s=window_s, as_of=float("inf")))


def run_act(
    name: str,
    traffic: Traffic,
    retrain_cfg: RetrainConfig,
    eval_cfg: EvaluateConfig,
    *,
    max_looks: int = 20,
    requests_per_look: int = 300,
    retrain_pause_s: float = 1.0,
) -> dict[str, Any]:
    """retrain (traffic flowing) -> while the canary is on trial: more traffic, join (paused),
    evaluate with auto (traffic flowing while the decision is applied)."""
    t0 = time.perf_counter()
    with traffic.lock:
        _join(retrain_cfg.labels, retrain_cfg.event_log, retrain_cfg.join_window_s)
    rcfg = replace(retrain_cfg, event_log=None)
    traffic.pause_s = retrain_pause_s
    try:
        res: RetrainResult = retrain(rcfg)
    finally:
        traffic.pause_s = 0.0
    act: dict[str, Any] = {
        "fault": retrain_cfg.fault,
        "retrain": {
            "status": res.status,
            "step": res.step,
            "version": res.version,
            "reasons": res.reasons,
            "offline": (res.evidence.get("offline") or {}).get("verdict"),
        },
        "looks": [],
    }
    log.info("act %s: retrain %s %s", name, res.status, res.reasons)
    if res.status == "canary":
        ecfg = replace(eval_cfg, event_log=None, auto=True)
        for _ in range(max_looks):
            traffic.wait_requests(requests_per_look)
            with traffic.lock:
                _join(eval_cfg.labels, retrain_cfg.event_log, eval_cfg.join_window_s)
            ev = evaluate_canary(ecfg)
            look = {
                "action": ev.action,
                "reasons": list(ev.verdict.reasons),
                "production": ev.evidence.get("production"),
                "canary": ev.evidence.get("canary"),
                "ctr_test": ev.evidence.get("ctr_test"),
                "sequential": ev.evidence.get("sequential"),
                "srm": ev.evidence.get("srm"),
                "serving": ev.evidence.get("serving"),
                "checks": (ev.evidence.get("verdict") or {}).get("checks"),
            }
            act["looks"].append(look)
            log.info("act %s: look %d -> %s", name, len(act["looks"]), ev.action)
            if ev.action != "continue":
                act["decision"] = ev.action
                break
    act["seconds"] = round(time.perf_counter() - t0, 1)
    return act


def run_scenario(
    *,
    sim_cfg,
    retrain_cfg: RetrainConfig,
    eval_cfg: EvaluateConfig,
    requests_per_look: int = 300,
    retrain_pause_s: float = 1.0,
    with_broken_canary: bool = False,
) -> ScenarioReport:
    t0 = time.perf_counter()
    rep = ScenarioReport()
    with Traffic(sim_cfg) as traffic:
        traffic.wait_requests(requests_per_look)  # production-only feedback to learn from
        kw = {"requests_per_look": requests_per_look, "retrain_pause_s": retrain_pause_s}
        rep.acts["a"] = run_act("a", traffic, retrain_cfg, eval_cfg, **kw)
        rep.acts["b"] = run_act(
            "b", traffic, replace(retrain_cfg, fault="shuffle_labels"), eval_cfg, **kw
        )
        rep.acts["c"] = run_act(
            "c", traffic, replace(retrain_cfg, fault="serving_skew"), eval_cfg, **kw
        )
        if with_broken_canary:
            rep.acts["d"] = run_act(
                "d", traffic, replace(retrain_cfg, fault="broken_features"), eval_cfg, **kw
            )
        traffic.wait_requests(20)  # a little traffic after the last rollback
    rep.requests, rep.failed, rep.retries = traffic.requests, traffic.failed, traffic.retries
    rep.seconds = round(time.perf_counter() - t0, 1)
    return rep
