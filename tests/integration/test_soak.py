"""The 60-second soak (`make soak` runs 10 minutes): traffic from the simulator and Locust,
one retrain -> canary -> the online verdict applied under it, memory sampled, and the result.

It fails on the soak's own thresholds: any acknowledged event lost, an error rate above
0.1%, RSS growth above 25% across the cycle, or a cycle that did not reach promote (the
verdict the healthy canary must earn on the soak's gates).
"""

from __future__ import annotations

import json

import pytest

from loadtest.soak import SoakConfig, run_soak, write_reports

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_sixty_second_soak_passes_and_reports(tmp_path):
    cfg = SoakConfig(out=str(tmp_path / "soak"), duration_s=60.0, tail_s=15.0)
    rep = run_soak(cfg)
    paths = write_reports(rep, cfg.out)
    print(json.dumps({c["name"]: c["text"] for c in rep.checks}, indent=1))
    assert rep.ok, rep.checks

    # Everything the verdict rests on was really measured.
    assert rep.requests["locust"] > 0 and rep.requests["simulator"] > 0
    assert rep.events["acknowledged"] > 0 and rep.events["impressions_logged"] > 0
    assert rep.cycle["retrain"]["status"] == "canary"
    assert rep.cycle["decision"] == "promote" and rep.cycle["promoted"] == 2, rep.cycle["looks"]
    assert rep.minutes and all(m["p99_ms"] >= m["p50_ms"] > 0 for m in rep.minutes)
    assert len(rep.rss_samples) >= 10 and rep.rss["total_mb"]["before_mb"] > 0
    html = paths["html"].read_text()
    assert "data:image/png;base64," in html and "PASS" in html
    assert json.loads(paths["json"].read_text())["ok"] is True
