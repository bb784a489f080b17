"""A folder with one sub-folder of images per class, as torchvision's ImageFolder and CLIP_benchmark
read it: `root/<class>/*.jpg`. Class names are the sorted sub-folder names, or the lines of
`root/classnames.txt` in that order; `root/zeroshot_classification_templates.txt` gives the set's
prompts (data/label_sets.py). Each image becomes a record without captions whose metadata column
`class` holds its class name: an evaluation set for zero-shot classification (and a training source
when `data.meta_captions` turns the class into a caption, e.g. "a photo of {class}.").

A folder is of this kind when it holds no image itself, and its sub-folders hold images without
sidecar captions (`cat.jpg` + `cat.txt` is the captioned `folder` kind)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from lipkit.data.image_policy import IMAGE_EXTS
from lipkit.data.label_sets import CLASS_COLUMN, INDEX_SUFFIX, LabelSet, read_label_set
from lipkit.data.records import Record, Skip
from lipkit.data.sources.folder import iter_images
from lipkit.errors import UserError

_SIDECARS = (".txt", ".json")


def _class_dirs(root: Path) -> list[Path]:
    """Sub-folders by name, case-sensitive, as torchvision's ImageFolder numbers its classes."""
    return sorted(
        (d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name
    )


def holds_classes(folder: Path) -> bool:
    """No image directly in `folder`; sub-folders whose images (the first few looked at) have no
    sidecar caption files; at least one sub-folder with an image."""
    with os.scandir(folder) as entries:
        if any(
            e.name.lower().rsplit(".", 1)[-1] in IMAGE_EXTS and e.is_file() for e in entries if "." in e.name
        ):
            return False
    found = False
    for d in _class_dirs(folder):
        for n, p in enumerate(iter_images(d)):
            if any(p.with_suffix(s).is_file() for s in _SIDECARS):
                return False
            found = True
            if n >= 4:
                break
    return found


def _layout(root: Path) -> tuple[tuple[str, ...], LabelSet]:
    """(sub-folder names, LabelSet) of a class folder."""
    dirs = tuple(d.name for d in _class_dirs(root))
    if not dirs:
        raise UserError(
            f"Folder '{root}' has no class sub-folders; put each class's images in root/<class>/."
        )
    return dirs, read_label_set(root, list(dirs), f"the class folder '{root}'")


def label_sets(src: str | Path) -> dict[str, LabelSet]:
    _, labels = _layout(Path(src).expanduser().resolve())
    return {CLASS_COLUMN: labels}


def scan_class_folders(
    path: str | Path,
    image_column: str = "image",
    caption_column: str = "captions",
    image_root: str | Path = "",
) -> Iterator[Record | Skip]:
    """Every image under every class sub-folder (sorted; recursive; hidden paths left out) as a Record
    with no captions and its class name in `meta["class"]` (the columns and image root do not apply)."""
    root = Path(path).expanduser().resolve()
    dirs, labels = _layout(root)
    for i, (name, classname) in enumerate(zip(dirs, labels.classes, strict=True)):
        for f in sorted(iter_images(root / name)):  # a class without images still competes in zero-shot
            meta = {CLASS_COLUMN: classname, CLASS_COLUMN + INDEX_SUFFIX: i}
            yield Record(f, [], meta, key=f.relative_to(root).as_posix())


def images_only(path: str | Path) -> list[Record]:
    """Records of every image of every class, without captions (what `lipkit embed` reads)."""
    root = Path(path).expanduser().resolve()
    return [
        Record(r.image, [], {"relpath": r.key}) for r in scan_class_folders(root) if isinstance(r, Record)
    ]
