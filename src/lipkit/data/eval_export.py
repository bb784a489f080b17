"""What `lipkit data export-eval` does: write any source as an evaluation set in the layouts the field
keeps them, so that other tools (CLIP_benchmark, torchvision's ImageFolder) and lipkit read the same set:

- `class-folders`: OUT/<class>/<key>.png, one sub-folder per value of a metadata column; class names
  that are not safe folder names get a safe folder and their real name in OUT/classnames.txt;
- `clip-benchmark`: CLIP_benchmark's WebDataset layout (data/sources/benchmark_shards.py) — a
  classification set (`cls` = the class index) with `--classes COLUMN`, else a retrieval set (`txt` =
  the captions, one per line).

Both write `zeroshot_classification_templates.txt` for classification. Images are written as PNG,
decoded the one lipkit way (EXIF orientation applied, transparency on white) at their own size, so
that every reader sees the same RGB pixels whatever it does with alpha or orientation.
`unique_captions` keeps only samples whose written captions no other sample has (retrieval where
relevance is unambiguous: each caption describes one image)."""

from __future__ import annotations

import io
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

from rich.progress import Progress

from lipkit.atomic import write_dir
from lipkit.data.images import classify_failure, open_image, upright_rgb
from lipkit.data.label_sets import CLASSNAMES_FILE, TEMPLATES_FILE
from lipkit.data.records import Record, Skip
from lipkit.data.sources.registry import read_records
from lipkit.errors import UserError

LAYOUTS = ("class-folders", "clip-benchmark")


@dataclass
class ExportReport:
    samples: int = 0
    classes: int = 0
    dropped: Counter[str] = field(default_factory=Counter)  # why samples were left out

    def to_dict(self) -> dict:
        return {"samples": self.samples, "classes": self.classes, "dropped": dict(self.dropped)}


def _png(record: Record) -> bytes | Skip:
    """The record's image as PNG bytes of its upright RGB pixels, or why it cannot be read."""
    src = record.source
    try:
        with open_image(src) as im:
            im.load()
            rgb = upright_rgb(im)
    except Exception as e:  # noqa: BLE001 - PIL raises many types on damaged data; each is classified
        reason, detail = classify_failure(e, src)
        return Skip(reason, record.key, detail)
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    return buf.getvalue()


def _decoded(
    chosen: list[tuple[Record, list[str]]], report: ExportReport
) -> Iterator[tuple[Record, bytes, list[str]]]:
    """(record, PNG, captions) one at a time (never all images in memory), with a progress bar;
    unreadable images are counted in `report.dropped` and `report.samples` counts the rest."""
    with Progress(transient=True) as bar:
        task = bar.add_task("writing the evaluation set", total=len(chosen))
        for r, caps in chosen:
            png = _png(r)
            bar.advance(task)
            if isinstance(png, Skip):
                report.dropped[png.reason] += 1
                continue
            report.samples += 1
            yield r, png, caps


def _select(
    records: list[Record], classes: str, all_captions: bool, unique: bool, report: ExportReport
) -> list[tuple[Record, list[str]]]:
    """(record, captions to write) for every record that has what the layout needs."""
    out = []
    for r in records:
        if classes and r.meta.get(classes) in (None, ""):
            report.dropped[f"no {classes}"] += 1
            continue
        if not classes and not r.captions:
            report.dropped["no caption"] += 1
            continue
        out.append((r, (r.captions if all_captions else r.captions[:1])))
    if unique:
        seen = Counter(c for _, caps in out for c in caps)
        kept = [(r, caps) for r, caps in out if all(seen[c] == 1 for c in caps)]
        report.dropped["caption shared with another sample"] += len(out) - len(kept)
        out = kept
    return out


def _safe_folder(name: str) -> str:
    safe = re.sub(r"[^\w.-]+", "_", name).strip("._") or "class"
    return safe[:100]


def _write_class_folders(
    tmp: Path, rows: Iterator[tuple[Record, bytes, list[str]]], classes: str, names: list[str]
) -> None:
    folders: dict[str, str] = {}
    for name in names:
        folder = _safe_folder(name)
        while folder in folders.values():
            folder += "_"
        folders[name] = folder
    order = sorted(names, key=lambda n: folders[n])  # ImageFolder numbers classes by sorted folder name
    for name in order:
        (tmp / folders[name]).mkdir()
    for i, (r, png, _) in enumerate(rows):
        (tmp / folders[str(r.meta[classes])] / f"{i:07d}.png").write_bytes(png)
    if any(folders[n] != n for n in names):
        (tmp / CLASSNAMES_FILE).write_text("".join(f"{n}\n" for n in order), encoding="utf-8")


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def _write_benchmark_shards(
    tmp: Path,
    rows: Iterator[tuple[Record, bytes, list[str]]],
    classes: str,
    names: list[str],
    shard_size: int,
) -> None:
    split = tmp / "test"
    split.mkdir()
    index = {n: i for i, n in enumerate(names)}
    shards, i = 0, 0
    while chunk := list(islice(rows, shard_size)):  # one shard's images in memory at a time
        with tarfile.open(split / f"{shards}.tar", "w") as tar:
            for r, png, caps in chunk:
                _add(tar, f"s{i:07d}.png", png)
                if classes:
                    _add(tar, f"s{i:07d}.cls", str(index[str(r.meta[classes])]).encode())
                else:  # one caption per line: a line break inside a caption becomes a space
                    _add(tar, f"s{i:07d}.txt", "\n".join(" ".join(c.splitlines()) for c in caps).encode())
                i += 1
        shards += 1
    (split / "nshards.txt").write_text(f"{shards}\n", encoding="utf-8")
    (tmp / "dataset_type.txt").write_text("classification\n" if classes else "retrieval\n", encoding="utf-8")
    if classes:
        (tmp / CLASSNAMES_FILE).write_text("".join(f"{n}\n" for n in names), encoding="utf-8")


def export_eval_set(
    src: str | Path,
    out: str | Path,
    layout: str,
    classes: str = "",
    templates: list[str] | None = None,
    all_captions: bool = True,
    unique_captions: bool = False,
    shard_size: int = 1000,
    read: Callable[[str | Path], tuple[list[Record], Counter[str]]] = read_records,
) -> ExportReport:
    """Write `src` (any source kind) to `out` (which must not exist) in `layout`; see the module docstring."""
    if layout not in LAYOUTS:
        raise UserError(f"--layout '{layout}' is not one of {', '.join(LAYOUTS)}; pick one of them.")
    if layout == "class-folders" and not classes:
        raise UserError(
            "--layout class-folders needs --classes COLUMN, the metadata column that names each class."
        )
    out = Path(out).expanduser()
    if out.exists():
        raise UserError(f"'{out}' already exists; choose a new folder for the evaluation set.")
    records, skipped = read(src)
    report = ExportReport(dropped=Counter(skipped))
    chosen = _select(records, classes, all_captions, unique_captions, report)
    names = sorted({str(r.meta[classes]) for r, _ in chosen}) if classes else []
    report.classes = len(names)

    def write(tmp: Path) -> None:
        rows = _decoded(chosen, report)
        if layout == "class-folders":
            _write_class_folders(tmp, rows, classes, names)
        else:
            _write_benchmark_shards(tmp, rows, classes, names, shard_size)
        if not report.samples:
            raise UserError(
                f"No sample of '{src}' can be written ({dict(report.dropped)}); check --classes and the source."
            )
        if classes and templates:
            # CLIP_benchmark fills `{c}` only: lipkit's `{}` is written as `{c}` (lipkit reads both)
            lines = "".join(t.replace("{}", "{c}") + "\n" for t in templates)
            (tmp / TEMPLATES_FILE).write_text(lines, encoding="utf-8")

    write_dir(out, write)
    return report
