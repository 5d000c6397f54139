"""Imports sit at the top of a module, so its header shows what it depends on.

An import inside a function is allowed only with its reason, in a comment on the import's
line or on the line above it: a CLI handler (`northstar --help` stays fast), a heavy or
optional dependency (torch in a module also used without it, Ray, MLflow, Evidently), a
module the serving image's Python models import while the image lacks the package, redis
after `ensure_ssl()`. Imports that follow an explained one in the same block (blank lines
between them allowed) share its comment. The Triton model files (model_repository/) are
not project packages and are not walked.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]

_NOQA = re.compile(r"\bnoqa\b(:\s*[\w, ]+)?|\btype:\s*ignore\b(\[[\w, -]+\])?")


def _packages() -> list[str]:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return cfg["tool"]["importlinter"]["root_packages"]


def project_files() -> list[Path]:
    return sorted(p for pkg in _packages() for p in (ROOT / pkg).rglob("*.py"))


def _comments(source: str) -> dict[int, str]:
    """line number -> the text of the comment on it, lint pragmas (noqa) left out."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = _NOQA.sub("", tok.string.lstrip("#")).strip(" ()")
            if text:
                out[tok.start[0]] = text
    return out


def _bodies(node: ast.AST):
    """The statement lists directly under `node` (body, orelse, handlers, match cases...)."""
    for _, value in ast.iter_fields(node):
        if isinstance(value, list) and value and isinstance(value[0], ast.stmt):
            yield value
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, (ast.excepthandler, ast.match_case)):
                    yield item.body


def unexplained_imports(source: str) -> list[tuple[int, str]]:
    """(line, statement) for each import inside a function with no reason beside or above it."""
    lines = source.splitlines()
    comments = _comments(source)

    def comment_only(n: int) -> bool:
        return n in comments and lines[n - 1].lstrip().startswith("#")

    found: list[tuple[int, str]] = []

    def walk(node: ast.AST, in_function: bool) -> None:
        for body in _bodies(node):
            prev_explained: ast.stmt | None = None  # the explained import just before
            for stmt in body:
                if in_function and isinstance(stmt, (ast.Import, ast.ImportFrom)):
                    own = any(n in comments for n in range(stmt.lineno, stmt.end_lineno + 1))
                    above = comment_only(stmt.lineno - 1)
                    joined = prev_explained is not None and all(
                        not lines[n - 1].strip()
                        for n in range(prev_explained.end_lineno + 1, stmt.lineno)
                    )
                    if own or above or joined:
                        prev_explained = stmt
                    else:
                        prev_explained = None
                        found.append((stmt.lineno, ast.unparse(stmt)))
                    continue
                prev_explained = None
                inner = in_function or isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef))
                walk(stmt, inner)

    walk(ast.parse(source), False)
    return found


def test_every_function_level_import_says_why():
    bad = []
    for path in project_files():
        rel = path.relative_to(ROOT).as_posix()
        for line, stmt in unexplained_imports(path.read_text()):
            bad.append(f"{rel}:{line}: {stmt}")
    assert not bad, (
        "imports inside functions without a reason: move them to the module top, or say why "
        "in a comment on the line or the line above:\n" + "\n".join(bad)
    )


@pytest.mark.parametrize(
    ("source", "lines"),
    [
        ("import os\n\ndef f():\n    return os\n", []),
        ("def f():\n    import os\n\n    return os\n", [2]),
        ("def f():\n    import os  # lazy: a reason\n    return os\n", []),
        ("def f():\n    # lazy: a reason\n    import os\n    return os\n", []),
        # a block shares the comment above its first import, across isort's blank lines
        (
            "def f():\n    # lazy: a reason\n    import os\n\n    import sys\n    return os, sys\n",
            [],
        ),
        # ...but not past a statement
        ("def f():\n    # lazy: a reason\n    import os\n    x = 1\n    import sys\n", [5]),
        # a lint pragma is not a reason
        ("def f():\n    import os  # noqa: F401\n", [2]),
        # nested functions, methods and branches inside functions are walked
        ("class A:\n    def m(self):\n        if x:\n            import os\n", [4]),
        ("def f():\n    def g():\n        from a import b\n", [3]),
        ("def f():\n    try:\n        import a\n    except ImportError:\n        pass\n", [3]),
        # module-level conditional imports are at the top
        ("try:\n    import a\nexcept ImportError:\n    a = None\n", []),
    ],
)
def test_the_rule(source, lines):
    assert [n for n, _ in unexplained_imports(source)] == lines
