"""What the HTML report's parts share: escaping, images as data URIs, thumbnails, saved figures."""

from __future__ import annotations

import base64
import html
import io
import re
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from PIL import Image

from lipkit.data.images import open_image, to_rgb


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def html_page(title: str, heading: str, header: str, body: str, css: str) -> str:
    """A self-contained page: `header` the <dl> items under the <h1>, `body` the <main> content."""
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f"<style>{css}</style></head><body><header><h1>{esc(heading)}</h1><dl>{header}</dl></header>"
        f"<main>{body}</main></body></html>\n"
    )


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def load_image(path: str | Path, max_side: int) -> Image.Image | None:
    try:
        with open_image(path) as im:
            img = to_rgb(im)  # alpha on white, any mode to 8-bit RGB
    except Exception:  # noqa: BLE001 - a missing, broken or oversized image gets no thumbnail
        return None
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return img


def save(fig: Figure, path: Path) -> str:
    """Save ``fig`` to ``path`` and return an <img> tag embedding the same PNG."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    path.write_bytes(buf.getvalue())
    return f'<img class="plot" alt="{esc(path.stem)}" src="{png_uri(buf.getvalue())}">'


def mpl(text: Any) -> str:
    """Make text safe for matplotlib (a '$' would otherwise start mathtext)."""
    return str(text).replace("$", r"\$")


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "split"
