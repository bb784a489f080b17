"""The report's heat maps: for a few images of a split with boxes, each box's caption and where each kind
of map (eval.heatmaps) puts it — the map over the image, the box drawn, the map's peak marked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from lipkit.data.images import image_pixels
from lipkit.eval.report_figures import esc, load_image, mpl, save, slug

_SIDE = 160  # pixels each panel's image is drawn at


def _overlay(ax, image: np.ndarray, grid: np.ndarray, box: list[float], title: str) -> None:
    """One panel: the image, its map upsampled to the image (bilinear), the box and the map's peak."""
    side = image.shape[0]
    lo, hi = float(grid.min()), float(grid.max())
    norm = (grid - lo) / (hi - lo) if hi > lo else np.zeros_like(grid)
    up = np.asarray(Image.fromarray(norm.astype(np.float32)).resize((side, side), Image.Resampling.BILINEAR))
    ax.imshow(image)
    ax.imshow(up, cmap="inferno", alpha=0.55, vmin=0, vmax=1)
    x0, y0, x1, y1 = (v * side for v in box)
    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="#39ff14", linewidth=1.5))
    r, c = np.unravel_index(int(np.argmax(grid)), grid.shape)
    h, w = grid.shape
    ax.plot([(c + 0.5) / w * side], [(r + 0.5) / h * side], marker="x", color="white", markersize=8, mew=2)
    ax.set_title(mpl(title if len(title) <= 24 else title[:22] + "…"), fontsize=8)
    ax.set_axis_off()


def localization_figure(split: str, examples: list[dict[str, Any]], out_dir: Path) -> str:
    """HTML for the split's heat maps (one row per image and kind of map, one panel per box)."""
    rows = []
    for ex in examples:
        img = load_image(str(ex.get("image", "")), 4 * _SIDE)  # the centre square, as the model saw it
        pixels = (
            image_pixels(img, _SIDE).permute(1, 2, 0).numpy()
            if img is not None
            else np.full((_SIDE, _SIDE, 3), 210, np.uint8)
        )
        for kind, maps in (ex.get("maps") or {}).items():
            rows.append((pixels, kind, maps, ex.get("boxes") or [], ex.get("captions") or []))
    if not rows:
        return ""
    cols = max(len(r[2]) for r in rows)
    fig = Figure(figsize=(1.9 * cols + 0.4, 2.0 * len(rows)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(rows), cols, squeeze=False))
    for (pixels, kind, maps, boxes, captions), line in zip(rows, axes, strict=True):
        for k, ax in enumerate(line):
            if k < min(len(maps), len(boxes), len(captions)):
                _overlay(ax, pixels, np.asarray(maps[k], dtype=float), boxes[k], f"{kind}: {captions[k]}")
            else:
                ax.set_axis_off()
    fig.suptitle(mpl(f"Where each box's caption matches: {split}"), fontsize=10)
    return (
        f"<h3>Heat maps (green: the box; ×: the map's peak — a pointing-game hit when inside)</h3>"
        f"{save(fig, out_dir / f'localization_{slug(split)}.png')}"
        f'<p class="muted">{esc(len(examples))} images; maps min–max scaled per panel.</p>'
    )
