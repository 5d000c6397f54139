"""The closed-loop simulator: users from a synthetic world's ground truth use the live server.

It is a client of both `serving` (slates over gRPC/HTTP, interactions to the `feedback`
model) and `feedback` (the join's rules, to know each event's expected status), so it
sits above both. Modules: `config` (what to run, what was seen), `behaviour` (how users
click), `driver` (the loop against a server), `doubles` (in-process stand-ins),
`reconcile` (checks against the event log), `cli` (`northstar simulate`).
"""

from simulator.behaviour import ClickMemory
from simulator.config import SimReport, SimulateConfig
from simulator.driver import simulate
from simulator.reconcile import reconcile, reconcile_many

__all__ = [
    "ClickMemory",
    "SimReport",
    "SimulateConfig",
    "reconcile",
    "reconcile_many",
    "simulate",
]
