"""`northstar diagnose` end to end on a generated log: log -> real join -> CLI -> report."""

from __future__ import annotations

import json

import pytest

from diagnose.planted import CURRENT, REFERENCE, generate, write_world

pytestmark = pytest.mark.integration


def test_cli_writes_the_report(tmp_path):
    import argparse

    from diagnose.cli import register

    paths = write_world(
        generate("worse_model", seed=5, n_users=2500, ref_requests=5000, cur_requests=3500),
        tmp_path,
    )
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    out = tmp_path / "report"
    args = parser.parse_args(
        [
            "diagnose",
            "--log", str(paths["log"]),
            "--labels", str(paths["labels"]),
            "--current", CURRENT,
            "--reference", REFERENCE,
            "--data", str(paths["data"]),
            "--versions", str(paths["versions"]),
            "--served-features", str(paths["served_features"]),
            "--previous-recs", str(paths["previous_recs"]),
            "--out", str(out),
            "--set", "min_segment_impressions=100",
        ]
    )  # fmt: skip
    assert args.func(args) == 0
    body = json.loads((out / "report.json").read_text())
    assert body["summary"]["top_cause"] == "model_regression"
    assert body["input_drift"]["engine"] == "evidently"
    assert body["plan"][0]["cause"] == "model_regression"
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4
    assert "model_regression" in (out / "report.md").read_text()
