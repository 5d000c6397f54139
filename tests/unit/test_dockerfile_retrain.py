"""Dockerfile.retrain, checked statically (no docker engine on these machines)."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TEXT = (ROOT / "Dockerfile.retrain").read_text()
JOINED = TEXT.replace("\\\n", " ")
LINES = [ln.strip() for ln in JOINED.splitlines() if ln.strip() and not ln.strip().startswith("#")]
PYPROJECT = (ROOT / "pyproject.toml").read_text()


def _pin(name: str) -> str:
    m = re.search(rf'"{re.escape(name)}[^"]*==([^",]+)"', PYPROJECT)
    assert m, f"pyproject.toml does not pin {name}"
    return m.group(1)


def test_base_image_is_pinned():
    bases = [ln.split()[1] for ln in LINES if ln.startswith("FROM ")]
    assert bases, "no FROM"
    for base in bases:
        assert re.fullmatch(r"python:3\.1[0-2]\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base), (
            f"base image {base} must name an exact Python patch release"
        )


def test_runs_as_a_non_root_user():
    users = [ln.split()[1] for ln in LINES if ln.startswith("USER ")]
    assert users, "no USER: the image would run as root"
    assert users[-1].split(":")[0] not in ("root", "0")
    # Numeric, so Kubernetes' runAsNonRoot can check it; the uid the manifests run as.
    assert users[-1] == "1000"


def test_entrypoint_is_the_northstar_cli():
    (entry,) = [ln for ln in LINES if ln.startswith("ENTRYPOINT ")]
    assert json.loads(entry.removeprefix("ENTRYPOINT ")) == ["northstar"]
    assert re.search(r'^northstar = "northstar\.cli:main"$', PYPROJECT, re.M)


def test_installs_the_project_with_its_pins():
    assert re.search(r"pip install \.(\s|$)", JOINED), "install the project itself: pip install ."
    assert "pip check" in JOINED
    # torch from the CPU index at pyproject's exact pin; everything else from pyproject.
    torch = _pin("torch")
    assert re.search(
        rf"--index-url https://download\.pytorch\.org/whl/cpu\s+\"?torch=={re.escape(torch)}\"?",
        JOINED,
    ), f"torch=={torch} from the CPU index"
    for line in LINES:
        if line.startswith("RUN") and "pip install" in line:
            for spec in re.findall(r'"([A-Za-z0-9_.\-\[\]]+[<>=!~][^"]*)"', line):
                assert "==" in spec, f"unpinned requirement {spec}"


def test_copies_every_package_the_project_installs():
    m = re.search(r"^include = \[(.*)\]$", PYPROJECT, re.M)
    assert m
    packages = {p.strip().strip('"').rstrip("*") for p in m.group(1).split(",")}
    copied = set()
    for line in LINES:
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
                copied.add(src.rstrip("/"))
    assert packages <= copied, f"not copied: {sorted(packages - copied)}"
    assert {"pyproject.toml", "README.md"} <= copied


def test_no_secret_baked_in():
    for line in LINES:
        if line.startswith(("ENV ", "ARG ", "LABEL ")):
            assert not re.search(r"(KEY|SECRET|PASSWORD|TOKEN)\w*=", line, re.I), line
