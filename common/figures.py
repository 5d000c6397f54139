"""Plots inside self-contained HTML reports: a figure as a base64 PNG and its <img> tag."""

from __future__ import annotations

import base64
import html
import io


def png_base64(fig, *, dpi: int = 110) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def img_tag(b64: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'
