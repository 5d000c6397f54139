"""Plots inside self-contained HTML reports: a figure as a base64 PNG and its <img> tag."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path


def save_png(fig, path, *, dpi: int = 110) -> Path:
    """Lay out `fig`, write it to `path` (folders made); returns the path.

    `fig` is a `matplotlib.figure.Figure` made without pyplot, so there is nothing to close.
    """
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def png_base64(fig, *, dpi: int = 110) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def img_tag(b64: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'
