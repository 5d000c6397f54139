"""Self-contained HTML reports from jinja2 templates.

Each report module keeps its page in `templates/` beside it and renders it with
`render(__file__, "name.html.j2", **context)`. Autoescape is on, so every value is
HTML-escaped unless it is `Markup`; undefined names raise (a typo fails the test, it does
not print an empty cell). Plots go in as base64 PNGs (common.figures.png_base64) through
the `img` filter, `{{ png | img("alt text") }}`, so a page needs no other file and no
network to read.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

from common.figures import img_tag

TEMPLATES_DIR = "templates"


def render(module_file: str | Path, name: str, /, **context: Any) -> str:
    """Render `templates/<name>` from the folder of `module_file` (pass `__file__`)."""
    folder = Path(module_file).resolve().parent / TEMPLATES_DIR
    return environment(str(folder)).get_template(name).render(**context)


@functools.cache
def environment(folder: str) -> jinja2.Environment:
    """The (cached) environment for one templates folder."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(folder),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["img"] = img
    return env


def img(b64: str | None, alt: str) -> Markup:
    """An inline <img> for a base64 PNG; nothing for None (a plot with no data)."""
    return Markup(img_tag(b64, alt)) if b64 else Markup("")
