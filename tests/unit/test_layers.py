"""The layering in pyproject.toml ([tool.importlinter]) is a checked contract: a package that
imports one above it fails CI like any other regression."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import tomllib

ROOT = Path(__file__).resolve().parents[2]


def test_import_contracts_are_kept():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    r = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_no_two_modules_import_each_other():
    """A pair of modules that import each other (at the top or inside a function) is one
    module in two files: the shared piece belongs in a module below both."""
    packages = _pyproject()["tool"]["importlinter"]["root_packages"]
    graph = grimp.build_graph(*packages, cache_dir=None)
    pairs = sorted(
        {
            tuple(sorted((a, b)))
            for a in graph.modules
            for b in graph.find_modules_directly_imported_by(a)
            if a in graph.find_modules_directly_imported_by(b)
        }
    )
    assert len(graph.modules) > 100  # the graph holds the project, not an empty selection
    assert not pairs, f"modules that import each other: {pairs}"


def _imports(path: Path) -> set[str]:
    """Absolute imports of one file: `import a.b` gives a.b; `from a.b import c` gives a.b
    and a.b.c (c may be a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def test_the_torch_contract_covers_every_triton_python_model():
    """model_repository/*/model.py files are not a package import-linter can read: they
    import no torch themselves, and every project module they import is a source of the
    "never import torch" contract, so the contract covers what the stub loads."""
    cfg = _pyproject()["tool"]["importlinter"]
    (contract,) = [
        c for c in cfg["contracts"] if c["name"] == "the Triton Python models never import torch"
    ]
    assert contract["forbidden_modules"] == ["torch"] and not contract["allow_indirect_imports"]
    models = sorted((ROOT / "model_repository").glob("**/model.py"))
    assert len(models) >= 3  # recommend, retrieval, feedback
    project = set(cfg["root_packages"])
    modules = set()
    for path in models:
        found = _imports(path)
        assert not {m for m in found if m.split(".")[0] == "torch"}, path
        modules |= {
            m
            for m in found
            if m.split(".")[0] in project
            and ((ROOT / m.replace(".", "/")).with_suffix(".py").exists())
        }
    assert modules == set(contract["source_modules"])
