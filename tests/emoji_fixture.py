"""Fake npm tarballs with the layout of the emoji packages, for offline tests of the emoji dataset.

``make_fixture_packages(dir)`` writes ``emoji-datasource-{google,twitter,facebook}-0.0.0.tgz`` and
``emojibase-data-0.0.0.tgz``. Each concept is a colored shape ("red circle"): the color and the shape
are what the captions say, the subcategory is the shape and the category groups two shapes, so a model
can learn it. The three "artists" draw the same shape differently (plain, outlined, shadowed), every
fifth concept has five skin-tone variants (a skin-colored dot), and a few entries exercise the edge
cases: a ``-FE0F`` suffix only in emoji.json, a concept missing from emojibase (label falls back to
the name), one missing from the facebook style and one skin variant missing from twitter.
"""

from __future__ import annotations

import io
import json
import math
import random
import tarfile
from pathlib import Path

from PIL import Image, ImageDraw

from lipkit.data.emoji import DEFAULT_LANGUAGES, STYLES

VERSION = "0.0.0"
CATEGORIES = {
    "Round Things": ("circle", "ring"),
    "Boxes & Gems": ("square", "diamond"),
    "Pointy Things": ("triangle", "star"),
    "Marks & Lines": ("cross", "bar"),
}
SHAPES = [(shape, cat) for cat, shapes in CATEGORIES.items() for shape in shapes]
COLORS = {
    "red": (220, 40, 40),
    "blue": (40, 80, 220),
    "green": (40, 170, 60),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "black": (30, 30, 30),
    "pink": (240, 120, 180),
}
TONES = {
    "1F3FB": ("light skin tone", (247, 222, 206)),
    "1F3FC": ("medium-light skin tone", (243, 210, 162)),
    "1F3FD": ("medium skin tone", (213, 171, 136)),
    "1F3FE": ("medium-dark skin tone", (175, 126, 87)),
    "1F3FF": ("dark skin tone", (124, 83, 62)),
}
_WORD_KEYS = [*COLORS, *(shape for shape, _ in SHAPES)]
WORDS = {  # word-by-word "translations"; other languages get the English label tagged with the code
    "de": dict(
        zip(
            _WORD_KEYS,
            [
                "rot",
                "blau",
                "grün",
                "gelb",
                "lila",
                "orange",
                "schwarz",
                "rosa",
                "Kreis",
                "Ring",
                "Quadrat",
                "Raute",
                "Dreieck",
                "Stern",
                "Kreuz",
                "Balken",
            ],
            strict=True,
        )
    ),
    "ja": dict(
        zip(
            _WORD_KEYS,
            [
                "赤い",
                "青い",
                "緑の",
                "黄色い",
                "紫の",
                "橙色の",
                "黒い",
                "桃色の",
                "円",
                "輪",
                "四角",
                "菱形",
                "三角",
                "星",
                "十字",
                "棒",
            ],
            strict=True,
        )
    ),
}
_STAR = [(math.sin(k * math.pi / 5), -math.cos(k * math.pi / 5)) for k in range(10)]


def _draw(
    shape: str, color: tuple[int, int, int], style: str, skin: tuple[int, int, int] | None, rng: random.Random
) -> bytes:
    img = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    dx, dy = rng.randint(-2, 2), rng.randint(-2, 2)
    outline = (20, 20, 20) if style == "twitter" else None
    width = 3 if style == "twitter" else 1

    def box(m: int, ox: int = 0, oy: int = 0) -> tuple[int, int, int, int]:
        return (m + dx + ox, m + dy + oy, 63 - m + dx + ox, 63 - m + dy + oy)

    def paint(fill: tuple[int, ...], ox: int = 0, oy: int = 0, line: tuple[int, ...] | None = None) -> None:
        x0, y0, x1, y1 = box(10, ox, oy)
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        if shape == "circle":
            d.ellipse((x0, y0, x1, y1), fill=fill, outline=line, width=width)
        elif shape == "ring":
            d.ellipse((x0, y0, x1, y1), outline=fill, width=9)
        elif shape == "square":
            d.rectangle((x0, y0, x1, y1), fill=fill, outline=line, width=width)
        elif shape == "diamond":
            d.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill, outline=line, width=width)
        elif shape == "triangle":
            d.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill, outline=line, width=width)
        elif shape == "star":
            pts = [
                (cx + (22 if k % 2 == 0 else 9) * c, cy + (22 if k % 2 == 0 else 9) * s)
                for k, (c, s) in enumerate(_STAR)
            ]
            d.polygon(pts, fill=fill, outline=line, width=width)
        elif shape == "cross":
            d.rectangle((cx - 7, y0, cx + 7, y1), fill=fill)
            d.rectangle((x0, cy - 7, x1, cy + 7), fill=fill)
        else:  # bar
            d.rectangle((x0, cy - 8, x1, cy + 8), fill=fill, outline=line, width=width)

    if style == "facebook":
        paint((90, 90, 90, 140), 3, 3)  # drop shadow
    paint((*color, 255), line=outline)
    if skin is not None:
        d.ellipse((26 + dx, 26 + dy, 38 + dx, 38 + dy), fill=(*skin, 255))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _label_entry(lang: str, hexcode: str, label: str, skins: list, category: str, order: int) -> dict:
    """One emojibase compact.json entry; other languages translate word by word or tag the label."""
    words = WORDS.get(lang)
    local = " ".join(words.get(w, w) for w in label.split()) if words else f"{label} ({lang})"
    local = label if lang == "en" else local
    entry: dict = {"hexcode": hexcode, "label": local, "order": order, "group": 0}
    entry["skins"] = [{"hexcode": h, "label": f"{local}: {lab.split(': ')[1]}"} for _, h, lab, _ in skins]
    if lang == "en":
        shape = label.split()[1]
        entry["tags"] = [label.split()[0], shape, "shape", category.split()[0].lower()]
    return entry


def _write_tgz(path: Path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))


def make_fixture_packages(packages_dir: Path, n_concepts: int = 40, seed: int = 0) -> None:
    """Write the four fake package tarballs into ``packages_dir`` (created if needed)."""
    rng = random.Random(seed)
    packages_dir = Path(packages_dir)
    packages_dir.mkdir(parents=True, exist_ok=True)
    emoji_json: list[dict] = []
    images: dict[str, dict[str, bytes]] = {s: {} for s in STYLES}
    compact: dict[str, list[dict]] = {lang: [] for lang in ("en", *DEFAULT_LANGUAGES)}
    colors = list(COLORS)
    for i in range(n_concepts):
        shape, category = SHAPES[i % len(SHAPES)]
        color = colors[(i // len(SHAPES)) % len(colors)]
        rounds = i // (len(SHAPES) * len(colors))
        label = f"{color} {shape}" + (f" {rounds + 1}" if rounds else "")
        hexcode = f"1F{0x900 + i:03X}"
        unified = hexcode + ("-FE0F" if i % 10 == 3 else "")
        tones = TONES if i % 5 == 0 else {}
        variants = [(unified, hexcode, label, None)]
        variants += [(f"{unified}-{t}", f"{hexcode}-{t}", f"{label}: {n}", c) for t, (n, c) in tones.items()]
        for code, _, _, skin in variants:
            for style in STYLES:
                if style == "facebook" and i == 7 or style == "twitter" and i == 0 and code.endswith("1F3FF"):
                    continue  # not drawn by every artist: left out of the dataset
                images[style][f"{code.lower()}.png"] = _draw(shape, COLORS[color], style, skin, rng)
        emoji_json.append({
            "name": label.upper(), "unified": unified, "image": f"{unified.lower()}.png",
            "short_name": label.replace(" ", "_"), "short_names": [label.replace(" ", "_")],
            "category": category, "subcategory": f"{shape}-shape", "sort_order": i,
            **{f"has_img_{s}": True for s in STYLES},
            "skin_variations": {t: {"unified": c, "image": f"{c.lower()}.png"}
                                for t, (c, *_) in zip(tones, variants[1:], strict=True)},
        })  # fmt: skip
        if i == 1:
            continue  # not in emojibase: the builder falls back to emoji.json's name
        for lang, entries in compact.items():
            if lang == "it" and i % 7 == 2:
                continue  # a label missing in one language
            entries.append(_label_entry(lang, hexcode, label, variants[1:], category, i))

    for style in STYLES:
        first_name, first = next(iter(images[style].items()))
        files = {
            "package/package.json": json.dumps({"name": f"emoji-datasource-{style}"}).encode(),
            "package/emoji.json": json.dumps(emoji_json).encode(),
            f"package/img/{style}/sheets/64.png": first,  # must not be taken for an emoji
            f"package/img/{style}/32/{first_name}": first,
        }
        files.update({f"package/img/{style}/64/{name}": data for name, data in images[style].items()})
        _write_tgz(packages_dir / f"emoji-datasource-{style}-{VERSION}.tgz", files)
    files = {
        f"package/{lang}/compact.json": json.dumps(e, ensure_ascii=False).encode()
        for lang, e in compact.items()
    }
    files["package/meta/groups.json"] = b"{}"
    _write_tgz(packages_dir / f"emojibase-data-{VERSION}.tgz", files)
