"""The image copies every project module the Triton Python models import, transitively.

No docker engine runs here, so this is the check that a new import in `recommend` or
`feedback` does not break the production image at model-load time.
"""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROJECT = {
    "common",
    "models",
    "training",
    "feedback",
    "fairness",
    "serving",
    "simulator",
    "canary",
    "loadtest",
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
