"""The studies' commands keep their command lines (`northstar simulate replay`, ...) now that
they live in studies/, and building the CLI loads no study until one runs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from northstar.cli import build_parser
from studies import cli

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("argv", "handler"),
    [
        (["simulate", "freshness", "--users", "50"], cli._freshness),
        (["simulate", "depth", "--dir", "d"], cli._depth),
        (["simulate", "replay", "--set", "world=w", "run=r"], cli._replay),
        (["simulate", "tiers", "--seed", "3"], cli._tiers),
        (["freshness-cycles", "--cycles", "2"], cli._cycles),
        (["stability-study", "--preset", "tiny"], cli._stability),
    ],
)
def test_each_study_command_reaches_its_handler(argv, handler):
    args = build_parser().parse_args(argv)
    assert args.func is handler


def test_simulate_without_a_study_is_still_the_closed_loop():
    from simulator.cli import _simulate

    args = build_parser().parse_args(["simulate", "--world", "w"])
    assert args.func is _simulate and args.simulate_command is None


def test_building_the_cli_loads_no_study_and_no_torch():
    code = (
        "import json, sys; from northstar.cli import build_parser; build_parser(); "
        "print(json.dumps(sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('studies', 'torch'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,  # `python -c` puts the working folder first on sys.path
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    assert json.loads(out.stdout) == ["studies", "studies.cli", "studies.config"]
