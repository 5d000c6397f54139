"""The serving Dockerfile, checked statically (no docker engine runs here).

It copies every project module the Triton Python models import, transitively: the check
that a new import in `recommend` or `feedback` does not break the image at model-load
time. And it builds either target (`--build-arg TARGET=cpu|gpu`), refusing a repository
exported for the other one: its shell checks are run here against generated configs.
"""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROJECT = {
    "common",
    "online",
    "diagnose",
    "models",
    "training",
    "feedback",
    "fairness",
    "serving",
    "simulator",
    "canary",
    "loadtest",
    "studies",
    "northstar",
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.split(".")[0] in PROJECT}


def _module_file(name: str) -> Path | None:
    parts = name.split(".")
    f = ROOT.joinpath(*parts).with_suffix(".py")
    if f.exists():
        return f
    pkg = ROOT.joinpath(*parts, "__init__.py")
    return pkg if pkg.exists() else None


def test_dockerfile_copies_what_python_models_import():
    copied = set()
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    for line in text.splitlines():
        if line.startswith("COPY") and "model_repository" not in line:
            copied.update(re.findall(r"(\S+\.py)", line))
    todo = [p for p in (ROOT / "model_repository").glob("*/**/model.py")]
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        for mod in _imports(path):
            f = _module_file(mod)
            if f is None or f in seen:
                continue
            seen.add(f)
            todo.append(f)
            # Importing a.b runs a/__init__.py too.
            for i in range(1, len(f.relative_to(ROOT).parts)):
                init = ROOT.joinpath(*f.relative_to(ROOT).parts[:i], "__init__.py")
                if init.exists() and init not in seen:
                    seen.add(init)
                    todo.append(init)
    missing = sorted(
        str(f.relative_to(ROOT)) for f in seen if str(f.relative_to(ROOT)) not in copied
    )
    assert not missing, f"Dockerfile does not COPY modules the Python models import: {missing}"


# ----------------------------------------------------------------------------- both targets

DOCKERFILE = (ROOT / "Dockerfile").read_text()
JOINED = DOCKERFILE.replace("\\\n", " ")
INSTRUCTIONS = [
    ln.strip() for ln in JOINED.splitlines() if ln.strip() and not ln.strip().startswith("#")
]
TARGETS = ("cpu", "gpu")


def _runs() -> list[str]:
    return [ln.removeprefix("RUN ") for ln in INSTRUCTIONS if ln.startswith("RUN ")]


def _sh(script: str, target: str, **replace: str) -> int:
    """Run one RUN instruction's shell here (sh -c, as docker does) with TARGET set."""
    import shutil
    import subprocess

    sh = shutil.which("sh")
    assert sh, "no sh"
    for old, new in replace.items():
        script = script.replace(old, new)
    env = {"PATH": "/usr/bin:/bin", "TARGET": target}
    return subprocess.run([sh, "-c", script], env=env, capture_output=True, timeout=30).returncode


def test_dockerfile_takes_the_target_as_a_build_arg():
    """`ARG TARGET=gpu` before FROM (the default) and again after it (in scope), checked."""
    (from_i,) = [i for i, ln in enumerate(INSTRUCTIONS) if ln.startswith("FROM ")]
    before = [ln for ln in INSTRUCTIONS[:from_i] if ln.startswith("ARG ")]
    after = [ln for ln in INSTRUCTIONS[from_i:] if ln.startswith("ARG ")]
    assert before == ["ARG TARGET=gpu"], before
    assert "ARG TARGET" in after
    (check,) = [r for r in _runs() if "expected cpu or gpu" in r]
    for target in TARGETS:
        assert _sh(check, target) == 0, target
    for bad in ("", "tpu", "CPU"):
        assert _sh(check, bad) != 0, f"TARGET={bad!r} must fail the build"


@pytest.mark.parametrize("target", TARGETS)
def test_the_build_refuses_a_repository_exported_for_the_other_target(target, tmp_path):
    """The RUN that checks /models runs against each target's generated retrieval config
    (serving.repository, what `northstar export --target` writes): it passes only for the
    image's own target, the same rule as serving.repository.config_target."""
    from serving.repository import (
        EXAMPLE_DIMS,
        RetrievalServing,
        config_target,
        retrieval_config,
        to_pbtxt,
    )

    (check,) = [r for r in _runs() if "/models/retrieval/config.pbtxt" in r]
    for exported in TARGETS:
        serving = RetrievalServing(tensorrt_fp16=exported == "gpu")
        cfg = retrieval_config(EXAMPLE_DIMS, target=exported, versions=[1], serving=serving)
        assert config_target(cfg) == exported
        repo = tmp_path / exported
        (repo / "retrieval").mkdir(parents=True)
        (repo / "retrieval" / "config.pbtxt").write_text(to_pbtxt(cfg))
        rc = _sh(check, target, **{"/models/": f"{repo}/"})
        assert (rc == 0) == (exported == target), (
            f"TARGET={target} with a repository exported for {exported}: rc {rc}"
        )


def test_only_the_cpu_target_adds_onnxruntime_pinned():
    (install,) = [r for r in _runs() if "onnxruntime==" in r]
    assert re.search(r'"onnxruntime==\d+\.\d+\.\d+"', install), "pin onnxruntime exactly"
    assert re.match(r'if \[ "\$TARGET" = cpu \]; then', install), install
    assert not [ln for ln in INSTRUCTIONS if "onnxruntime-gpu" in ln], (
        "the gpu target runs Triton's own onnxruntime backend"
    )
    # The cpu image imports the inline path (recommend runs model.onnx itself) at build time.
    assert any(
        re.match(r'if \[ "\$TARGET" = cpu \]', r) and "import onnxruntime" in r for r in _runs()
    )
    labels = [ln for ln in INSTRUCTIONS if ln.startswith("LABEL ")]
    assert any("$TARGET" in ln for ln in labels), "label the image with its target"
