"""`lipkit data build canvases`: a localisation benchmark composed from tables of cut-out drawings.

Each canvas is a square of one pale background colour with several objects pasted at random positions
and scales. An object is one row of a source table: its image (transparency kept), its first caption
(the object's name) and its other text columns. With one seeded `random.Random` per split:

- n objects, n uniform in [min_objects, max_objects], drawn from rows whose first captions differ
  (whitespace collapsed, case folded), so that every object of a canvas has its own name;
- each object is resized (aspect kept) so that its longer side is a fraction s of the canvas side, s
  uniform in [min_scale, max_scale], and placed uniformly where it fits whole; a place whose box covers
  more than `max_overlap` of an earlier box (or is covered that much) is drawn again (up to 100 times,
  then the whole canvas is drawn again);
- later objects are drawn over earlier ones.

Per canvas: the image (RGB PNG), a mask (PNG, mode L: 0 background, k the k-th object, from the alpha
channel — pixels with alpha ≥ 128 — and what later objects cover), each object's box (the tight box of
its opaque pixels, x0 y0 x1 y1 as fractions of the side), one caption naming every object ("a, b and
c", or "a; b; c" where a name holds a comma or an "and") and one caption per object (its name). Every
text column of the source rows comes along as a list with one entry per object (a label column becomes a
multi-label column); a `langs` column (the language of each caption) becomes the one language of the
objects' names when they share it.

Splits: `train` from the training table, `test` from the test table (by default the emoji training
artists and the third, held-out artist). At the default 256 px and scales 0.25–0.45 an object spans
64–115 px: 4–7 patches of a 16-px ViT, 2–3.6 cells of a stride-32 CNN.

OUT (written whole, atomically)::

    train.jsonl, test.jsonl   {"key", "image", "mask", "captions": [all objects], "boxes": [[x0,y0,x1,y1]],
                               "object_captions": [...], "object_keys": [...], <text column>: [...],
                               "langs"?: [one language]}
    images/<split>/<key>.png, masks/<split>/<key>.png
    summary.json              options, counts, sources and their fingerprints; written last

Not modelled: backgrounds with texture or clutter, partial objects at the border, rotations, overlaps
beyond `max_overlap`, sources without transparency (their objects fill their whole box).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from platformdirs import user_cache_dir
from rich.progress import Progress

from lipkit.data.builtin.common import finish_build, object_name, start_build
from lipkit.data.images import open_image
from lipkit.data.records import Record
from lipkit.errors import UserError

FORMAT = "lipkit-canvases"
CAPTION_LANGS = "langs"  # a per-caption list of languages: it describes captions, not objects
# the builder's own fields, and a per-caption list: never copied from the objects' rows
SKIPPED_COLUMNS = {
    "key",
    "image",
    "mask",
    "captions",
    "boxes",
    "object_captions",
    "object_keys",
    CAPTION_LANGS,
}
VERSION = 2  # of the row layout: a build of another version is made again
CANVAS_TRIES = 200
ALPHA_OPAQUE = 128
PLACE_TRIES = 100


@dataclass(frozen=True)
class CanvasOptions:
    size: int = 256
    min_objects: int = 2
    max_objects: int = 4
    min_scale: float = 0.25
    max_scale: float = 0.45
    max_overlap: float = 0.2
    train_canvases: int = 4000
    test_canvases: int = 1000
    seed: int = 0

    def check(self) -> None:
        if not 32 <= self.size <= 2048:
            raise UserError(f"--size must be in 32..2048 pixels, got {self.size}; pass e.g. 256.")
        if not 1 <= self.min_objects <= self.max_objects <= 16:
            raise UserError(
                f"--objects must be MIN-MAX with 1 ≤ MIN ≤ MAX ≤ 16, got {self.min_objects}-{self.max_objects}; "
                "pass e.g. 2-4."
            )
        if not 0.05 <= self.min_scale <= self.max_scale <= 1.0:
            raise UserError(
                f"--scale must be MIN-MAX with 0.05 ≤ MIN ≤ MAX ≤ 1, got {self.min_scale}-{self.max_scale}; "
                "pass e.g. 0.25-0.45."
            )
        if not 0.0 <= self.max_overlap <= 1.0:
            raise UserError(
                f"--max-overlap must be a fraction in [0, 1], got {self.max_overlap}; pass e.g. 0.2."
            )
        if self.train_canvases < 1 or self.test_canvases < 1:
            raise UserError(
                "--train-canvases and --test-canvases must be at least 1; pass e.g. 4000 and 1000."
            )


def default_out() -> Path:
    return Path(user_cache_dir("lipkit")) / "datasets" / "canvases"


def parse_range(text: str, what: str, kind: type = int) -> tuple[Any, Any]:
    """'2-4' → (2, 4); '3' → (3, 3)."""
    parts = text.split("-")
    try:
        lo, hi = (kind(parts[0]), kind(parts[-1])) if len(parts) <= 2 else (None, None)
    except ValueError:
        lo = hi = None
    if lo is None:
        raise UserError(f"{what} must be MIN-MAX (e.g. 2-4), got '{text}'.")
    return lo, hi


def join_names(names: Sequence[str]) -> str:
    """'a', 'a and b', 'a, b and c' — or 'a; b; c' when a name holds a comma or an 'and' itself."""
    if any("," in n or " and " in n for n in names):
        return "; ".join(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def cutout(record: Record) -> Image.Image:
    """The object's image as RGBA, cropped to its opaque pixels (an image without alpha is opaque)."""
    with open_image(record.source) as im:
        im.load()
        rgba = im.convert("RGBA")
    box = _opaque_box(rgba)
    return rgba.crop(box) if box else rgba


def _opaque_box(rgba: Image.Image) -> tuple[int, int, int, int] | None:
    return rgba.getchannel("A").point(lambda a: 255 if a >= ALPHA_OPAQUE else 0).getbbox()


def resized(im: Image.Image, side: int) -> Image.Image:
    w, h = im.size
    f = side / max(w, h)
    size = (max(1, round(w * f)), max(1, round(h * f)))
    # premultiplied alpha: no dark fringes where transparent pixels meet opaque ones
    return im.convert("RGBa").resize(size, Image.Resampling.LANCZOS).convert("RGBA")


def _overlap(a: Sequence[int], b: Sequence[int]) -> float:
    """The intersection of two boxes as a fraction of the smaller one."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / smaller


def _place(rng: random.Random, wh: tuple[int, int], boxes: list, opt: CanvasOptions) -> list[int] | None:
    w, h = wh
    for _ in range(PLACE_TRIES):
        x, y = rng.randint(0, opt.size - w), rng.randint(0, opt.size - h)
        box = [x, y, x + w, y + h]
        if all(_overlap(box, b) <= opt.max_overlap for b in boxes):
            return box
    return None


@dataclass
class Placed:
    row: int
    box: list[int]  # pixels, where the resized cut-out is pasted (tight: cut-outs are cropped)
    image: Image.Image


def plan_canvas(rng: random.Random, names: Sequence[str], cutouts: Any, opt: CanvasOptions) -> list[Placed]:
    """The objects of one canvas: distinct names, sizes and non-overlapping places (see the module doc)."""
    for _ in range(CANVAS_TRIES):
        n = rng.randint(opt.min_objects, opt.max_objects)
        rows: list[int] = []
        while len(rows) < n:
            r = rng.randrange(len(names))
            if all(names[r] != names[q] for q in rows):
                rows.append(r)
        placed: list[Placed] = []
        for r in rows:
            im = resized(cutouts(r), round(rng.uniform(opt.min_scale, opt.max_scale) * opt.size))
            im = im.crop(_opaque_box(im) or (0, 0, *im.size))  # tight after resampling too
            box = _place(rng, im.size, [p.box for p in placed], opt)
            if box is None:
                break
            placed.append(Placed(r, box, im))
        if len(placed) == n:
            return placed
    raise UserError(
        f"{opt.max_objects} objects of scale {opt.min_scale}-{opt.max_scale} do not fit on a canvas with "
        f"--max-overlap {opt.max_overlap}; lower --objects or --scale, or raise --max-overlap."
    )


def render(placed: Sequence[Placed], rng: random.Random, size: int) -> tuple[Image.Image, Image.Image]:
    """The canvas (RGB) and its mask (L: 0 background, k the k-th object)."""
    colour = tuple(rng.randint(170, 255) for _ in range(3))
    canvas = Image.new("RGB", (size, size), colour)
    mask = Image.new("L", (size, size), 0)
    for k, p in enumerate(placed, start=1):
        alpha = p.image.getchannel("A")
        canvas.paste(p.image.convert("RGB"), (p.box[0], p.box[1]), alpha)
        opaque = alpha.point(lambda a: 255 if a >= ALPHA_OPAQUE else 0)
        mask.paste(k, (p.box[0], p.box[1], p.box[2], p.box[3]), opaque)
    return canvas, mask


def text_columns(records: Sequence[Record]) -> list[str]:
    """The source columns every row holds as a string (they become per-object lists)."""
    if not records:
        return []
    keys = [k for k, v in records[0].meta.items() if isinstance(v, str) and k not in SKIPPED_COLUMNS]
    return [k for k in keys if all(isinstance(r.meta.get(k), str) for r in records)]


def canvas_row(key: str, split: str, placed: Sequence[Placed], records: Sequence[Record], size: int) -> dict:
    objs = [records[p.row] for p in placed]
    names = [object_name(r) for r in objs]
    row: dict[str, Any] = {
        "key": key,
        "image": f"images/{split}/{key}.png",
        "mask": f"masks/{split}/{key}.png",
        "captions": [join_names(names)],
        "boxes": [[round(v / size, 6) for v in p.box] for p in placed],
        "object_captions": names,
        "object_keys": [r.key for r in objs],
    }
    for col in text_columns(records):
        row[col] = [r.meta[col] for r in objs]
    listed = [r.meta.get(CAPTION_LANGS) for r in objs]
    langs = {str(x[0]) for x in listed if isinstance(x, list) and x}
    if len(langs) == 1 and all(isinstance(x, list) and x for x in listed):
        row[CAPTION_LANGS] = [langs.pop()]  # the names' one language (data.caption_langs reads it)
    return row


def write_split(
    tmp: Path, split: str, records: Sequence[Record], count: int, opt: CanvasOptions, bar
) -> list:
    """`count` canvases of one split into tmp/images/<split>, tmp/masks/<split>; their rows."""
    rng = random.Random(f"lipkit-canvases\0{opt.seed}\0{split}")
    names = [object_name(r).casefold() for r in records]
    cache: dict[int, Image.Image] = {}

    def cutouts(r: int) -> Image.Image:
        if r not in cache:
            cache[r] = cutout(records[r])
        return cache[r]

    for sub in ("images", "masks"):
        (tmp / sub / split).mkdir(parents=True)
    task = bar.add_task(f"canvases ({split})", total=count)
    rows = []
    for i in range(count):
        placed = plan_canvas(rng, names, cutouts, opt)
        canvas, mask = render(placed, rng, opt.size)
        key = f"{split}-{i:06d}"
        canvas.save(tmp / "images" / split / f"{key}.png")
        mask.save(tmp / "masks" / split / f"{key}.png")
        rows.append(canvas_row(key, split, placed, records, opt.size))
        bar.advance(task)
    (tmp / f"{split}.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8"
    )
    return rows


def build_canvases(
    out: str | Path | None = None,
    sources: dict[str, str | Path] | None = None,
    options: CanvasOptions | None = None,
    *,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Build (or reuse) the canvases in `out` (see the module doc); its summary."""
    opt = options or CanvasOptions()
    opt.check()
    build = start_build(out, sources, default_out(), FORMAT, "canvases build", (asdict(opt), VERSION), force)
    if build.previous is not None:
        return build.previous
    for split, recs in build.records.items():
        distinct = len({object_name(r).casefold() for r in recs})
        if distinct < opt.max_objects:
            raise UserError(
                f"The {split} source '{build.sources[split]}' has {distinct} distinct object names; a canvas of "
                f"{opt.max_objects} objects needs that many — lower --objects or use a larger table."
            )
    counts = {"train": opt.train_canvases, "test": opt.test_canvases}

    def write(tmp: Path) -> dict[str, Any]:
        objects = {}
        with Progress(disable=not progress) as bar:
            for split, recs in build.records.items():
                rows = write_split(tmp, split, recs, counts[split], opt, bar)
                objects[split] = sum(len(r["boxes"]) for r in rows)
        return {"canvases": counts, "objects": objects}

    return finish_build(build, FORMAT, write)
