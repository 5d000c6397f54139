"""`northstar monitor`: the metrics it computes from a planted world, and its HTTP server
for real (a free port, no mocks): /metrics, an Alertmanager webhook that runs a diagnosis
in the background, and the report it serves."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import pytest

from diagnose.config import parse_window
from diagnose.exporter import MonitorServer
from diagnose.monitor import METRICS, MonitorConfig, compute
from diagnose.planted import generate, write_world
from northstar.cli import main

SMALL = {"n_users": 400, "n_items": 80, "ref_requests": 600, "cur_requests": 400}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("world")
    paths = write_world(generate("delayed_labels", seed=2, **SMALL), folder)
    canary = folder / "canary"
    canary.mkdir()
    history = [
        {"kind": "evaluate", "decision": "continue", "reasons": ["too few"], "canary": 3},
        {
            "kind": "evaluate",
            "decision": "rollback",
            "reasons": ["guardrail: fallbacks 12% > 1%"],
            "canary": 3,
        },
        {"kind": "rollback", "decision": "rollback", "reasons": ["x"], "version": 3},
    ]
    (canary / "state.json").write_text(json.dumps({"history": history}))
    paths["canary"] = canary
    return paths


def _cfg(world, tmp_path, **kw) -> MonitorConfig:
    return MonitorConfig(
        labels=str(world["labels"]),
        log=str(world["log"]),
        data=str(world["data"]),
        canary_state=str(world["canary"]),
        reports=str(tmp_path / "reports"),
        **kw,
    )


def test_snapshot_has_the_north_star_baseline_lag_drift_and_canary(world, tmp_path):
    snap = compute(_cfg(world, tmp_path, window_hours=7 * 24, baseline_hours=14 * 24))
    names = {n for n, _, _ in snap.samples}
    assert names <= set(METRICS)
    cur = snap.value("northstar_monitor_ctr", version="all", dimension="all")
    base = snap.value("northstar_monitor_ctr_baseline", version="all", dimension="all")
    assert cur is not None and base is not None
    # the planted fault sends most clicks late: the fresh window looks worse
    assert cur < base
    assert snap.value("northstar_monitor_ctr", version="1", dimension="activity", group="low")
    assert snap.value("northstar_monitor_engaged_value", version="all", dimension="all") >= 0
    feats = {lab["feature"] for n, lab, _ in snap.samples if n == "northstar_monitor_feature_psi"}
    assert {"gender", "age_bucket", "activity"} <= feats
    assert snap.value("northstar_monitor_label_pending_share") == 0.0  # every window closed
    assert snap.value("northstar_monitor_label_watermark_lag_seconds") is not None
    assert snap.value("northstar_monitor_canary_guardrail_breaches_total", version="3") == 1
    assert snap.value("northstar_monitor_canary_rollbacks_total") == 1


def test_bad_flags_are_named(world, tmp_path, capsys):
    with pytest.raises(ValueError, match="--window-hours"):
        _cfg(world, tmp_path, window_hours=0)
    rc = main(["monitor", "--labels", str(tmp_path / "nope"), "--once"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("northstar monitor: error: --labels"), err


def _get(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("Content-Type", "")


def _wait_for(cond, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("condition not met in time")


def test_server_exports_and_an_alert_links_its_diagnosis(world, tmp_path):
    cfg = _cfg(world, tmp_path, port=0, window_hours=7 * 24, baseline_hours=7 * 24, interval=3600)
    with MonitorServer(cfg) as server:
        code, body, ctype = _get(server.url + "/metrics")
        assert code == 200 and ctype.startswith("text/plain")
        text = body.decode()
        exported = set(re.findall(r"^# TYPE (\S+) (\w+)", text, flags=re.MULTILINE))
        for name, (kind, _) in METRICS.items():
            if (name, kind) in exported or (name.removesuffix("_total"), kind) in exported:
                continue
            assert kind == "gauge" and name not in text, name  # a gauge may be absent
        assert 'northstar_monitor_ctr{dimension="all",group="all",version="all"}' in text
        assert "northstar_monitor_canary_guardrail_breaches_total" in text

        payload = {
            "version": "4",
            "status": "firing",
            "receiver": "northstar-diagnose",
            "alerts": [
                {
                    "status": "firing",
                    "labels": {"alertname": "NorthstarNorthStarDrop", "severity": "page"},
                    "annotations": {"summary": "CTR below its baseline"},
                    "startsAt": "2026-11-07T23:00:00Z",
                    "endsAt": "0001-01-01T00:00:00Z",
                },
                {"status": "resolved", "labels": {"alertname": "Old"}},
            ],
        }
        req = urllib.request.Request(
            server.url + "/alerts",
            data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 202
            jobs = json.loads(r.read())["reports"]
        assert len(jobs) == 1  # the resolved alert runs nothing
        job = jobs[0]
        assert job["url"].endswith(f"/reports/{job['id']}/report.html")

        def finished():
            _, body, _ = _get(f"{server.url}/reports/{job['id']}")
            status = json.loads(body)
            return status if status["status"] in ("done", "error") else None

        status = _wait_for(finished)
        assert status["status"] == "done", status
        # the monitor's window ending at the alert (or the data's clock, if earlier),
        # against the trailing baseline before it
        c0, c1 = parse_window(status["current"])
        r0, r1 = parse_window(status["reference"])
        assert c1 - c0 == 7 * 86_400 and r1 == c0 and r1 - r0 == 7 * 86_400
        assert c1 <= datetime(2026, 11, 7, 23, 0, 1, tzinfo=timezone.utc).timestamp()
        assert status["top_cause"] == "label_delay"
        code, html, ctype = _get(job["url"])
        assert code == 200 and ctype.startswith("text/html")
        assert b"North-star diagnosis" in html or b"<html" in html.lower()
        for link in ("/reports/latest", "/reports/alert/NorthstarNorthStarDrop/report.html"):
            code, again, _ = _get(server.url + link)
            assert code == 200 and again == html
        code, body, _ = _get(server.url + "/reports/..%2F..%2Fetc/report.html")
        assert code == 404
        bad = urllib.request.Request(server.url + "/alerts", data=b"{}", method="POST")
        code = 0
        try:
            urllib.request.urlopen(bad, timeout=30)
        except urllib.error.HTTPError as e:
            code = e.code
        assert code == 400
        code, body, _ = _get(server.url + "/metrics")
        assert 'northstar_monitor_diagnoses_total{status="done"} 1.0' in body.decode()
