"""diagnose/alerts.yaml and deploy/monitoring/grafana-dashboard.json read only metrics the
project exports: every metric name in every PromQL expression is checked against names
collected from the code (serving/metrics.py, feedback/lag.py, diagnose/monitor.py) and
Triton's documented set."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml

from diagnose.monitor import METRICS as MONITOR_METRICS
from feedback.lag import lag_metrics
from serving.metrics import ERRORS, LATENCY, REASONS, REQUESTS, STATE_ERRORS

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "diagnose" / "alerts.yaml"
DASHBOARD = ROOT / "deploy" / "monitoring" / "grafana-dashboard.json"
ADAPTER = ROOT / "deploy" / "monitoring" / "prometheus-adapter-values.yaml"
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")


def _triton_metrics() -> set[str]:
    """Triton's nv_inference_* names: the set tests/unit/test_deploy_manifests.py holds
    (Triton 2.51's docs; the binary builds them at run time), which must cover the ones the
    autoscaler's adapter rule reads."""
    spec = importlib.util.spec_from_file_location(
        "_deploy_manifests", ROOT / "tests" / "unit" / "test_deploy_manifests.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    names = set(module.TRITON_METRICS)
    adapter = set(re.findall(r"\bnv_inference_[a-z_]+\b", ADAPTER.read_text()))
    assert adapter and adapter <= names, sorted(adapter - names)
    return names


def _exported() -> set[str]:
    lag = set(re.findall(r"^# TYPE (\S+) ", lag_metrics([]), flags=re.MULTILINE))
    assert lag, "feedback.lag exports no metric"
    serving = {REQUESTS, ERRORS, STATE_ERRORS} | {LATENCY + s for s in HISTOGRAM_SERIES}
    # diagnose.monitor's families, as its collector exposes them (counters with _total)
    monitor = set(MONITOR_METRICS)
    return serving | lag | monitor | _triton_metrics()


EXPORTED = _exported()

# Words of PromQL that are neither functions (followed by "(") nor metric names.
_KEYWORDS = {"offset", "bool", "and", "or", "unless", "inf", "nan", "by", "without", "on"}
_KEYWORDS |= {"ignoring", "group_left", "group_right", "atan2"}


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers outside strings, label matchers and
    ranges, not called like a function, not keywords, not Grafana `$variables`."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)
    text = re.sub(r"\[[^\[\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", text)
    names = set()
    for m in re.finditer(r"(?<![\w.$])[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        rest = text[m.end() :].lstrip()
        if rest.startswith("(") or m.group(0).lower() in _KEYWORDS:
            continue
        names.add(m.group(0))
    return names


def reasons(expr: str) -> set[str]:
    """The `reason` values an expression selects (`reason="x"` or `reason=~"a|b"`)."""
    out = set()
    for value in re.findall(r'reason=~?"([^"]*)"', expr):
        out |= set(value.split("|"))
    return out


def test_metric_names_parser():
    expr = (
        'sum by (version, le) (rate(northstar_recommend_latency_ms_bucket{version=~"$v", '
        'reason="x"}[$__rate_interval] offset 1w)) / clamp_min(up, 1e-9) > bool 2'
    )
    assert metric_names(expr) == {"northstar_recommend_latency_ms_bucket", "up"}
    assert reasons('x{reason=~"failed|fallback"} + y{reason="degraded"}') == {
        "failed",
        "fallback",
        "degraded",
    }


def test_exported_names_come_from_the_code():
    assert {REQUESTS, ERRORS, LATENCY + "_bucket", STATE_ERRORS} <= EXPORTED
    assert "northstar_stream_oldest_unacked_age_seconds" in EXPORTED
    assert "nv_inference_queue_duration_us" in EXPORTED
    assert "northstar_monitor_ctr" in EXPORTED


def test_the_monitor_alerts_link_their_report():
    """Each alert on the monitor's families carries a link to the diagnosis the monitor
    runs for it (GET /reports/alert/<alertname>/report.html)."""
    monitor_rules = [r for r in _rules() if metric_names(r["expr"]) & set(MONITOR_METRICS)]
    names = {r["alert"] for r in monitor_rules}
    assert {
        "NorthstarNorthStarDrop",
        "NorthstarInputDrift",
        "NorthstarLabelLag",
        "NorthstarCanaryGuardrailBreach",
    } <= names
    for r in monitor_rules:
        if r["alert"] == "NorthstarMonitorStale":
            continue
        link = r["annotations"].get("report", "")
        assert link.endswith(f"/reports/alert/{r['alert']}/report.html"), r["alert"]


def _rules() -> list[dict]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [r for g in doc["spec"]["groups"] for r in g["rules"]]


def _readme_anchors() -> set[str]:
    text = (ROOT / "diagnose" / "README.md").read_text()
    heads = re.findall(r"^#+\s+(.+)$", text, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in heads}


@pytest.mark.parametrize("rule", _rules(), ids=lambda r: r["alert"])
def test_alert_rule_reads_exported_metrics_and_is_complete(rule):
    names = metric_names(rule["expr"])
    assert names, f"{rule['alert']}: no metric in its expr"
    assert names <= EXPORTED, f"{rule['alert']}: not exported: {sorted(names - EXPORTED)}"
    assert reasons(rule["expr"]) <= set(REASONS), rule["expr"]
    assert re.fullmatch(r"\d+[smhdw]", str(rule.get("for", ""))), f"{rule['alert']}: no `for`"
    assert rule.get("labels", {}).get("severity") in ("page", "ticket"), rule["alert"]
    annotations = rule.get("annotations", {})
    assert annotations.get("summary"), f"{rule['alert']}: no annotations.summary"
    links = [v for v in annotations.values() if isinstance(v, str) and "diagnose/README.md#" in v]
    assert links, f"{rule['alert']}: no annotation links the diagnose runbook"
    for link in links:
        anchor = link.split("diagnose/README.md#", 1)[1].split()[0]
        assert anchor in _readme_anchors(), f"{rule['alert']}: no heading #{anchor}"


def test_alert_names_are_unique():
    names = [r["alert"] for r in _rules()]
    assert len(names) == len(set(names))


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _targets(dash: dict) -> list[tuple[str, str]]:
    """(panel title, expr) for every PromQL target, rows' nested panels included."""
    out = []
    for panel in dash["panels"]:
        for p in [panel, *panel.get("panels", [])]:
            out += [(p["title"], t["expr"]) for t in p.get("targets", [])]
    return out


def test_dashboard_targets_read_exported_metrics():
    dash = _dashboard()
    targets = _targets(dash)
    assert targets
    for title, expr in targets:
        names = metric_names(expr)
        assert names, f"{title}: no metric in {expr}"
        assert names <= EXPORTED, f"{title}: not exported: {sorted(names - EXPORTED)}"
        assert reasons(expr) <= set(REASONS), f"{title}: {expr}"
    for var in dash["templating"]["list"]:
        query = var.get("definition", "")
        for name in re.findall(r"label_values\(\s*([a-zA-Z_:][\w:]*)\s*,", query):
            assert name in EXPORTED, f"variable {var['name']}: {name} is not exported"


def test_dashboard_has_the_panels_the_diagnosis_needs():
    dash = _dashboard()
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in panels:
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        assert {"x", "y", "w", "h"} <= set(p["gridPos"]), p["title"]
    exprs = [e for _, e in _targets(dash)]

    def uses(*names: str, where=lambda e: True) -> bool:
        return any(set(names) <= metric_names(e) and where(e) for e in exprs)

    assert uses(REQUESTS, where=lambda e: "by (version)" in e)  # request rate per version
    assert uses(ERRORS, where=lambda e: "by (version, reason)" in e)  # errors by reason
    assert uses(LATENCY + "_bucket", where=lambda e: "histogram_quantile(0.99" in e)  # p99
    assert uses(ERRORS, REQUESTS, where=lambda e: reasons(e) == {"degraded"})  # degraded share
    assert uses("northstar_stream_oldest_unacked_age_seconds")  # consumer lag
    assert uses("nv_inference_queue_duration_us", "nv_inference_exec_count")  # queue / exec
    assert uses("northstar_monitor_ctr", "northstar_monitor_ctr_baseline") or (
        uses("northstar_monitor_ctr") and uses("northstar_monitor_ctr_baseline")
    )  # the north star against its trailing baseline
    assert uses("northstar_monitor_feature_psi")  # drift
    assert uses("northstar_monitor_label_watermark_lag_seconds")  # label lag
    assert uses("northstar_monitor_canary_guardrail_breaches_total")  # canary guardrails
