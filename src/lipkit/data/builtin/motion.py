"""`lipkit data build motion`: short clips of cut-out drawings that move — a benchmark for video–text models.

A clip is T frames (default 8) of a square canvas (default 128 px) of one pale colour with one object on it:
a row of a source table (its image, transparency kept; its first caption is the object's name), doing one of

    moving right / moving left           crossing the canvas horizontally (its row drawn at random)
    moving down / moving up              crossing it vertically (its column drawn at random)
    growing / shrinking                  its longer side from 0.25 to 0.6 of the canvas, centred
    turning counterclockwise / turning clockwise   0° → 90° about its centre
    A turning into B / B turning into A  a cross-fade from one object to another

Moving objects are 0.4 of the canvas. Each pair is drawn once: the second motion is the first's frames in
reverse order — the same files, listed backwards — so an order-blind model (mean pooling) embeds the two
clips of a pair identically and cannot tell them apart (docs/video.md).

Captions: "{name} {motion}" ("cat moving left"), "{A} turning into {B}". Columns: `key`, `frames` (T paths),
`captions`, `motion` (the class: one of the eight phrases above, or "turning into another"), `label` (the
object's name; A's for a cross-fade), `pair` (horizontal, vertical, size, rotation, morph), `script` (the
caption, then what the clip shows at its start, middle and end — "cat at the left", "cat in the middle",
"cat at the right" — reversed for the time-reversed clip; the script-ordering objective reads it as
`data.caption_column`), and every text column of the source row.

Splits: `train.jsonl` from the training table — `train_pairs` pairs, each a random row and a random kind;
`test.jsonl` from the test table — `test_objects` rows, each with all five pairs (ten clips whose captions
differ only in the motion). By default the emoji training artists and the held-out third artist.

OUT (written whole, atomically): train.jsonl, test.jsonl, frames/<split>/<clip>/<t>.png, summary.json.
Not modelled: camera motion, several objects, occlusion, speed changes, backgrounds with texture.
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

from lipkit.data.builtin.canvases import cutout, resized, text_columns
from lipkit.data.builtin.common import finish_build, object_name, start_build
from lipkit.data.records import Record
from lipkit.errors import UserError

FORMAT = "lipkit-motion"
VERSION = 2
# pair → (the drawn motion, its time reverse)
PAIRS = {
    "horizontal": ("moving right", "moving left"),
    "vertical": ("moving down", "moving up"),
    "size": ("growing", "shrinking"),
    "rotation": ("turning counterclockwise", "turning clockwise"),
    "morph": ("turning into", "turning into"),
}
MORPH_CLASS = "turning into another"
# what a clip shows at its start, middle and end, for the first motion of each pair (the script column)
STATES = {
    "horizontal": ("{} at the left", "{} in the middle", "{} at the right"),
    "vertical": ("{} at the top", "{} in the middle", "{} at the bottom"),
    "size": ("a small {}", "a medium {}", "a large {}"),
    "rotation": ("{} upright", "{} tilted", "{} on its side"),
}
MOVING_SCALE, GROW_FROM, GROW_TO, TURN_DEG = 0.4, 0.25, 0.6, 90.0


@dataclass(frozen=True)
class MotionOptions:
    frames: int = 8
    size: int = 128
    train_pairs: int = 1600
    test_objects: int = 100
    seed: int = 0

    def check(self) -> None:
        if not 2 <= self.frames <= 64:
            raise UserError(f"--frames must be in 2..64, got {self.frames}; pass e.g. 8.")
        if not 32 <= self.size <= 1024:
            raise UserError(f"--size must be in 32..1024 pixels, got {self.size}; pass e.g. 128.")
        if self.train_pairs < 1 or self.test_objects < 1:
            raise UserError("--train-pairs and --test-objects must be at least 1; pass e.g. 1600 and 100.")


def default_out() -> Path:
    return Path(user_cache_dir("lipkit")) / "datasets" / "motion"


def _frame(bg: tuple[int, ...], size: int, obj: Image.Image, centre: tuple[float, float]) -> Image.Image:
    canvas = Image.new("RGB", (size, size), bg)
    x, y = round(centre[0] - obj.width / 2), round(centre[1] - obj.height / 2)
    canvas.paste(obj.convert("RGB"), (x, y), obj.getchannel("A"))
    return canvas


def _turned(obj: Image.Image, degrees: float) -> Image.Image:
    """Rotated counterclockwise about its centre, the canvas grown to hold it (premultiplied alpha)."""
    return obj.convert("RGBa").rotate(degrees, Image.Resampling.BICUBIC, expand=True).convert("RGBA")


def draw_pair(
    pair: str, objs: Sequence[Image.Image], rng: random.Random, opt: MotionOptions
) -> list[Image.Image]:
    """The frames of the first motion of `pair` (the second is the same frames reversed)."""
    size, n = opt.size, opt.frames
    bg = tuple(rng.randint(170, 255) for _ in range(3))
    steps = [t / (n - 1) for t in range(n)]
    if pair == "size":
        return [
            _frame(
                bg,
                size,
                resized(objs[0], round(size * (GROW_FROM + (GROW_TO - GROW_FROM) * s))),
                (size / 2,) * 2,
            )
            for s in steps
        ]
    moving = resized(objs[0], round(size * MOVING_SCALE))
    half = max(moving.size) / 2
    if pair == "rotation":
        return [_frame(bg, size, _turned(moving, TURN_DEG * s), (size / 2,) * 2) for s in steps]
    if pair == "morph":
        other = resized(objs[1], round(size * MOVING_SCALE))
        a, b = _frame(bg, size, moving, (size / 2,) * 2), _frame(bg, size, other, (size / 2,) * 2)
        return [Image.blend(a, b, s) for s in steps]
    lo, hi = half + 0.04 * size, size - half - 0.04 * size
    across = rng.uniform(lo, hi)  # the fixed coordinate
    path = [lo + (hi - lo) * s for s in steps]
    centres = [(p, across) for p in path] if pair == "horizontal" else [(across, p) for p in path]
    return [_frame(bg, size, moving, c) for c in centres]


def clip_rows(
    key: str, pair: str, frames: list[str], rows: Sequence[Record], columns: Sequence[str]
) -> list[dict[str, Any]]:
    """The two table rows of a drawn pair: the motion, and its time reverse (the frames listed backwards)."""
    names = [object_name(r) for r in rows]
    out = []
    for i, (motion, listed) in enumerate(zip(PAIRS[pair], (frames, frames[::-1]), strict=True)):
        if pair == "morph":
            first, second = (names[0], names[1]) if i == 0 else (names[1], names[0])
            caption, label, cls = f"{first} turning into {second}", first, MORPH_CLASS
        else:
            caption, label, cls = f"{names[0]} {motion}", names[0], motion
        states = (
            [f"{names[0]}", f"{names[0]} and {names[1]} blended", f"{names[1]}"]
            if pair == "morph"
            else [state.format(names[0]) for state in STATES[pair]]
        )
        script = [caption, *(states if i == 0 else states[::-1])]
        row: dict[str, Any] = {"key": f"{key}-{i}", "frames": listed, "captions": [caption], "script": script}
        row.update(motion=cls, label=label, pair=pair)
        source = rows[0] if pair != "morph" or i == 0 else rows[1]
        row.update({c: source.meta[c] for c in columns if c not in row})
        out.append(row)
    return out


def _plan(split: str, records: Sequence[Record], opt: MotionOptions, rng: random.Random) -> list[tuple]:
    """(row indices, pair) of every pair of a split."""
    if split == "train":
        return [
            ((rng.randrange(len(records)), rng.randrange(len(records))), rng.choice(list(PAIRS)))
            for _ in range(opt.train_pairs)
        ]
    chosen = rng.sample(range(len(records)), min(opt.test_objects, len(records)))
    return [((r, rng.choice([q for q in chosen if q != r] or [r])), pair) for r in chosen for pair in PAIRS]


def write_split(tmp: Path, split: str, records: Sequence[Record], opt: MotionOptions, bar: Progress) -> int:
    """The clips of one split into tmp/frames/<split>/ and tmp/<split>.jsonl; the number of clips."""
    rng = random.Random(f"lipkit-motion\0{opt.seed}\0{split}")
    names = [object_name(r).casefold() for r in records]
    cache: dict[int, Image.Image] = {}

    def cut(r: int) -> Image.Image:
        if r not in cache:
            cache[r] = cutout(records[r])
        return cache[r]

    columns = [
        c for c in text_columns(records) if c not in ("key", "frames", "captions", "motion", "label", "pair")
    ]
    plan = _plan(split, records, opt, rng)
    task = bar.add_task(f"motion clips ({split})", total=len(plan))
    rows: list[dict[str, Any]] = []
    for i, ((a, b), pair) in enumerate(plan):
        if pair == "morph" and names[a] == names[b]:
            b = next((q for q in range(len(records)) if names[q] != names[a]), b)
        key = f"{split}-{i:05d}"
        folder = tmp / "frames" / split / key
        folder.mkdir(parents=True)
        frames = []
        for t, im in enumerate(draw_pair(pair, [cut(a), cut(b)], rng, opt)):
            im.save(folder / f"{t}.png")
            frames.append(f"frames/{split}/{key}/{t}.png")
        rows.extend(clip_rows(key, pair, frames, [records[a], records[b]], columns))
        bar.advance(task)
    (tmp / f"{split}.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8"
    )
    return len(rows)


def build_motion(
    out: str | Path | None = None,
    sources: dict[str, str | Path] | None = None,
    options: MotionOptions | None = None,
    *,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Build (or reuse) the motion clips in `out` (see the module doc); its summary."""
    opt = options or MotionOptions()
    opt.check()
    build = start_build(out, sources, default_out(), FORMAT, "motion build", (asdict(opt), VERSION), force)
    if build.previous is not None:
        return build.previous
    for split, recs in build.records.items():
        if len({object_name(r).casefold() for r in recs}) < 2:
            raise UserError(
                f"The {split} source '{build.sources[split]}' needs at least 2 distinct object names."
            )

    def write(tmp: Path) -> dict[str, Any]:
        with Progress(disable=not progress) as bar:
            return {
                "clips": {
                    split: write_split(tmp, split, recs, opt, bar) for split, recs in build.records.items()
                }
            }

    return finish_build(build, FORMAT, write)
