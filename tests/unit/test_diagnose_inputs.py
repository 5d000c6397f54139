"""`northstar diagnose` on bad input: exit code 2 and one line that names the flag and what
was expected, never a traceback. Run through the CLI entry on a small planted world."""

from __future__ import annotations

from pathlib import Path

import pytest

from diagnose.planted import CURRENT, REFERENCE, generate, write_world
from northstar.cli import main

SMALL = {"n_users": 300, "n_items": 60, "ref_requests": 400, "cur_requests": 300}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    return write_world(generate("none", seed=1, **SMALL), tmp_path_factory.mktemp("world"))


def _run(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(["diagnose", *argv, "--drift-engine", "scipy", "--set", "plots=false"])
    return rc, capsys.readouterr().err.strip()


def _args(world, tmp_path, **over) -> list[str]:
    flags = {
        "labels": str(world["labels"]),
        "log": str(world["log"]),
        "current": CURRENT,
        "reference": REFERENCE,
        "out": str(tmp_path / "report"),
        **over,
    }
    out = []
    for k, v in flags.items():
        if v is not None:
            out += [f"--{k.replace('_', '-')}", v]
    return out


def _fails(capsys, argv: list[str], *expected: str) -> str:
    rc, err = _run(capsys, *argv)
    assert rc == 2, err
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("northstar diagnose: error: "), err
    for part in expected:
        assert part in err, err
    return err


def test_good_input_still_runs(capsys, world, tmp_path):
    rc, err = _run(capsys, *_args(world, tmp_path))
    assert rc == 0, err
    assert (tmp_path / "report" / "report.json").exists()


def test_current_window_after_the_labels(capsys, world, tmp_path):
    argv = _args(world, tmp_path, current="2026-12-01:2026-12-07", reference=None)
    _fails(
        capsys,
        argv,
        "--current 2026-12-01:2026-12-07: no labelled impressions in this window",
        "labels end at 2026-11-07",
        "northstar feedback join",
    )
    assert not (tmp_path / "report").exists()


def test_reference_window_before_the_labels(capsys, world, tmp_path):
    # the default reference (two weeks before current) has no labels at all
    argv = _args(world, tmp_path, current="2026-10-18:2026-10-20", reference=None)
    _fails(
        capsys,
        argv,
        "--reference-weeks 2 (2026-10-04:2026-10-17): no labelled impressions",
        "labels start at 2026-10-18",
    )


def test_missing_event_log(capsys, world, tmp_path):
    missing = tmp_path / "nope.db"
    _fails(capsys, _args(world, tmp_path, log=str(missing)), f"--log {missing}: no such file")
    assert not missing.exists()  # not created as an empty log


def test_event_log_that_is_not_a_log(capsys, world, tmp_path):
    bad = tmp_path / "events.db"
    bad.write_text("not sqlite\n" * 100)
    _fails(capsys, _args(world, tmp_path, log=str(bad)), f"--log {bad}: not a readable event log")


def test_missing_labels_folder(capsys, world, tmp_path):
    missing = tmp_path / "labels"
    _fails(
        capsys,
        _args(world, tmp_path, labels=str(missing)),
        f"--labels {missing}: no such folder",
        "northstar feedback join",
    )


def test_labels_folder_with_no_labels_yet(capsys, world, tmp_path):
    empty = tmp_path / "labels"
    empty.mkdir()
    _fails(capsys, _args(world, tmp_path, labels=str(empty)), f"--labels {empty}: holds no labels")


@pytest.mark.parametrize(
    ("flag", "window", "why"),
    [
        ("current", "2026-13-01:x", "month must be in 1..12"),
        ("current", "11/01/2026", "YYYY-MM-DD:YYYY-MM-DD"),
        ("current", "2026-11-07:2026-11-01", "ends before it starts"),
        ("reference", "2026-10-18:2026-10-18:2026-10-31", "YYYY-MM-DD:YYYY-MM-DD"),
    ],
)
def test_malformed_window(capsys, world, tmp_path, flag, window, why):
    _fails(capsys, _args(world, tmp_path, **{flag: window}), f"--{flag} {window}: expected", why)


def test_reference_after_current(capsys, world, tmp_path):
    _fails(
        capsys,
        _args(world, tmp_path, reference="2026-11-05:2026-11-10"),
        "--reference 2026-11-05:2026-11-10: ends 2026-11-10, after --current",
    )


def test_missing_required_flag_and_side_table(capsys, world, tmp_path):
    _fails(capsys, _args(world, tmp_path, current=None), "--current: required")
    missing = tmp_path / "versions.json"
    _fails(capsys, _args(world, tmp_path, versions=str(missing)), f"--versions {missing}: no such")
    _fails(capsys, _args(world, tmp_path, data=str(tmp_path / "d")), "--data", "no such folder")
    _fails(capsys, [*_args(world, tmp_path), "--reference-weeks", "0"], "--reference-weeks 0")
