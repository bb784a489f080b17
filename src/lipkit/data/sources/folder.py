"""A folder of images with sidecar captions: `cat.jpg` + `cat.txt` (one caption) or `cat.json` (captions
and metadata), searched recursively in sorted order; hidden files and folders are left out."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lipkit.data.image_policy import IMAGE_EXTS
from lipkit.data.records import Record, Skip, caption_record, parse_json_meta
from lipkit.errors import UserError


def holds_images(folder: Path) -> bool:
    """Any folder that no other kind claims is a folder of images (scan_folder names an empty one)."""
    return True


def iter_images(root: Path) -> Iterator[Path]:
    """Image files under `root`: recursive, hidden paths left out, in file-system order."""
    for f in root.rglob("*"):
        hidden = any(s.startswith(".") for s in f.relative_to(root).parts)
        if f.suffix.lower().lstrip(".") in IMAGE_EXTS and not hidden and f.is_file():
            yield f


def image_files(root: Path, fix: str) -> list[Path]:
    """Every image file under `root` (recursive, sorted, hidden paths left out); none is a UserError
    that ends with `fix`, what the user should point at instead."""
    files = sorted(iter_images(root))
    if not files:
        raise UserError(f"Folder '{root}' holds no images ({', '.join(IMAGE_EXTS)}); {fix}.")
    return files


def scan_folder(
    path: str | Path,
    image_column: str = "image",
    caption_column: str = "captions",
    image_root: str | Path = "",
) -> Iterator[Record | Skip]:
    """Every image under a folder with its sidecar `name.txt` or `name.json` (image_column and
    image_root do not apply: the folder is the table)."""
    root = Path(path).expanduser()
    files = image_files(
        root, "point at a folder of images with captions in name.txt / name.json beside them, or at a table"
    )
    for f in files:
        key = f.relative_to(root).as_posix()
        side_json, side_txt = f.with_suffix(".json"), f.with_suffix(".txt")
        meta: dict[str, Any] = {}
        captions: Any = None
        if side_json.is_file():
            parsed = parse_json_meta(side_json.read_bytes(), caption_column)
            if isinstance(parsed, Skip):
                yield Skip(parsed.reason, key, parsed.detail)
                continue
            captions, meta = parsed
        if captions is None and side_txt.is_file():
            captions = side_txt.read_bytes()
        if captions is None:
            yield Skip("no_caption", key, f"no {side_txt.name} or {side_json.name}")
            continue
        yield caption_record(f, captions, meta, key)


def images_only(path: str | Path) -> list[Record]:
    """Records of every image under a folder, without captions (what `lipkit embed` reads from a folder)."""
    p = Path(path).expanduser()
    files = image_files(p, "point SOURCE at a folder of images or at a CSV/TSV/JSONL table")
    return [Record(f.resolve(), [], {"relpath": str(f.relative_to(p))}) for f in files]
