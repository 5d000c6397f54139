"""The demo's loop page: its numbers, and that it renders with its figures in headless
Chromium (Debian's `chromium`, installed by `make sysdeps`)."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from northstar.loop_page import north_star_series, routing_events, write_loop_page

CHROMIUM = shutil.which("chromium")
# matplotlib's first colour (tab:blue): on the page only the figures draw with it.
TAB_BLUE = np.array([31, 119, 180])


def _labels(seed: int = 0) -> pd.DataFrame:
    """Two versions over 600 s: v1 at CTR 0.10 throughout, v2 (from 300 s) at 0.05."""
    rng = np.random.default_rng(seed)
    n = 20_000
    ts = 1_000.0 + np.sort(rng.uniform(0, 600, n))
    version = np.where((ts > 1_300.0) & (rng.random(n) < 0.5), 2, 1)
    p = np.where(version == 2, 0.05, 0.10)
    return pd.DataFrame(
        {
            "impression_ts": ts,
            "model_version": version,
            "clicked": rng.random(n) < p,
            "user_id": rng.integers(0, 500, n),
        }
    )


def _look(diff: float, action: str) -> dict:
    return {
        "action": action,
        "reasons": [f"{action}: made up"],
        "production": {"ctr": 0.10, "impressions": 3000},
        "canary": {"ctr": 0.10 + diff, "impressions": 3000},
        "ctr_test": {"diff": diff, "ci_low": diff - 0.01, "ci_high": diff + 0.01},
        "sequential": {"p_value": 0.01, "ci_low": diff - 0.02, "ci_high": diff + 0.02},
    }


def _demo_folder(root) -> None:
    check = {"name": "metric_vs_production", "value": 1.1, "threshold": 0.9, "passed": True}
    acts = {
        "a": {
            "fault": "none",
            "retrain": {
                "status": "canary",
                "version": 2,
                "offline": {"action": "pass", "checks": [{**check, "reason": "ok"}]},
            },
            "looks": [_look(0.01, "continue"), _look(0.03, "promote")],
            "decision": "promote",
            "seconds": 10.0,
        },
        "b": {
            "fault": "shuffle_labels",
            "retrain": {
                "status": "rejected",
                "version": None,
                "offline": {
                    "action": "reject",
                    "checks": [{**check, "value": 0.3, "passed": False, "reason": "bad"}],
                },
            },
            "looks": [],
            "seconds": 5.0,
        },
        "c": {
            "fault": "serving_skew",
            "retrain": {"status": "canary", "version": 3, "offline": None},
            "looks": [_look(-0.05, "rollback")],
            "decision": "rollback",
            "seconds": 8.0,
        },
    }
    (root / "canary_scenario.json").write_text(
        json.dumps({"acts": acts, "requests": 100, "failed": 0, "retries": 0, "seconds": 23})
    )
    (root / "canary").mkdir()
    history = [
        {"kind": "retrain", "decision": "canary", "version": 2, "ts": 1_100.0},
        {"kind": "promote", "decision": "promote", "canary": 2, "ts": 1_200.0},
        {"kind": "retrain", "decision": "rejected", "version": None, "ts": 1_250.0},
        {"kind": "retrain", "decision": "canary", "version": 3, "ts": 1_300.0},
        {"kind": "rollback", "decision": "rollback", "canary": 3, "ts": 1_600.0},
    ]
    (root / "canary" / "state.json").write_text(json.dumps({"history": history}))


def test_north_star_series_has_an_interval_around_each_bin():
    s = north_star_series(_labels(), n_bins=10)
    assert set(s["version"]) == {1, 2}
    assert (s["lo"] <= s["ctr"]).all() and (s["ctr"] <= s["hi"]).all()
    assert (s["impressions"] >= 30).all()
    v1, v2 = s[s["version"] == 1], s[s["version"] == 2]
    assert v2["t"].min() >= 300 - 60  # v2 appears only after its canary started
    # the made-up rates lie inside most bins' 95% intervals
    assert ((v1["lo"] <= 0.10) & (v1["hi"] >= 0.10)).mean() > 0.7
    assert ((v2["lo"] <= 0.05) & (v2["hi"] >= 0.05)).mean() > 0.7


def test_routing_events_are_seconds_since_the_first_impression():
    history = [
        {"kind": "retrain", "decision": "canary", "version": 2, "ts": 110.0},
        {"kind": "evaluate", "decision": "continue", "ts": 120.0},
        {"kind": "rollback", "decision": "rollback", "canary": 2, "ts": 150.0},
    ]
    assert routing_events(history, 100.0) == [
        {"t": 10.0, "what": "canary", "version": 2},
        {"t": 50.0, "what": "rollback", "version": 2},
    ]


@pytest.mark.integration
def test_loop_page_renders_with_its_figures_in_headless_chromium(tmp_path):
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (make sysdeps installs it)")
    _demo_folder(tmp_path)
    page = write_loop_page(tmp_path, steps={"1. world": 1.0}, labels=_labels())
    html = page.read_text()
    assert "http://" not in html and "https://" not in html  # self-contained
    flags = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ]
    dom = subprocess.run(
        [*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=180
    ).stdout
    # Both figures are in the DOM Chromium built, each a PNG that decodes to a real image.
    srcs = re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,([^"]+)"', dom)
    assert len(srcs) == 2, dom[:2000]
    for alt, b64 in srcs:
        with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
            assert im.width > 300 and im.height > 200, alt
    assert "act (c)" in dom.lower() or "(c)" in dom
    shot = tmp_path / "page.png"
    subprocess.run(
        [
            *flags,
            "--hide-scrollbars",
            "--window-size=1200,2400",
            f"--screenshot={shot}",
            page.as_uri(),
        ],
        capture_output=True,
        timeout=180,
        check=True,
    )
    # What Chromium painted has the figures' lines in it, not only text on white.
    with Image.open(shot) as im:
        px = np.asarray(im.convert("RGB")).reshape(-1, 3).astype(int)
    blue = (np.abs(px - TAB_BLUE).sum(axis=1) < 40).sum()
    assert blue > 500, blue
