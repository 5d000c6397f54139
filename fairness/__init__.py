"""Fairness audits: consumer-side quality by user group, provider-side exposure, gates.

Public API (imported lazily, so `northstar --help` does not pay for Fairlearn):

    run_audit(AuditConfig(run=..., data=...)) -> AuditResult   # a trained run, test period
    audit(AuditInput, AuditConfig) -> AuditResult              # ranked lists from anywhere
    make_audit_input(...) -> AuditInput
    check_gates(result, GateConfig, baseline=None) -> GateResult
    compare(result, baseline) -> dict
    online_by_group(feedback=..., users=...) -> dict           # CTR / value by group, version
    write_report(out, result, gates, comparison) -> paths      # audit.json, report.html, ...
    load_audit(path) -> AuditResult
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AuditConfig": "fairness.audit",
    "AuditResult": "fairness.audit",
    "audit": "fairness.audit",
    "run_audit": "fairness.audit",
    "load_audit": "fairness.audit",
    "AuditInput": "fairness.inputs",
    "make_audit_input": "fairness.inputs",
    "GateConfig": "fairness.gates",
    "GateResult": "fairness.gates",
    "check_gates": "fairness.gates",
    "compare": "fairness.gates",
    "online_by_group": "fairness.online",
    "write_report": "fairness.report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fairness' has no attribute {name!r}")
