"""The classes of an evaluation set that names them itself, as CLIP_benchmark's sets do: a folder with
one sub-folder per class (sources/class_folders.py) or CLIP_benchmark's WebDataset eval shards
(sources/benchmark_shards.py). Their records carry the class name in the metadata column `class`;
a `LabelSet` keeps every class in order (also those without an image: they still compete in zero-shot
classification, as in CLIP_benchmark) and the set's own prompt templates.

Class names may repeat (CLIP_benchmark's ImageNet list names "missile" twice): records also carry the
class index, in `class_index`, and evaluation classifies by index.

Files beside the set, in CLIP_benchmark's names and format:
- `classnames.txt`: one class name per line, in class-index order (for a class folder: the order of
  the sorted sub-folder names, as torchvision's ImageFolder numbers them);
- `zeroshot_classification_templates.txt`: one prompt template per line; `{c}` (CLIP_benchmark) or
  `{}` (lipkit) stands for the class name. Without it, evaluation uses `eval.templates`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lipkit.errors import UserError

CLASS_COLUMN = "class"  # the metadata column that holds the class name of such a set's records
INDEX_SUFFIX = (
    "_index"  # ... and `class_index` its class index (names may repeat: ImageNet has two "missile")
)
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"


@dataclass(frozen=True)
class LabelSet:
    classes: list[str]  # every class name, in class-index order
    templates: list[str] = field(default_factory=list)  # the set's own prompts ([]: eval.templates)


def read_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file, stripped, as CLIP_benchmark reads them: a blank line inside the
    file stays (it keeps the indices of the lines after it), blank lines at the end do not."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"'{path}' is not UTF-8 text ({e.reason}); save it as UTF-8.") from e
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def fill_template(template: str, classname: str) -> str:
    """A prompt: `{}` (lipkit) or `{c}` (CLIP_benchmark) replaced by the class name."""
    try:
        return template.format(classname, c=classname)
    except (IndexError, KeyError, ValueError) as e:
        raise UserError(
            f"Prompt template {template!r} is not a format string with {{}} or {{c}} ({e}); fix its braces."
        ) from e


def read_label_set(root: Path, default_classes: list[str], what: str) -> LabelSet:
    """The LabelSet of a set stored at `root`: `classnames.txt` when present (it must name as many
    classes as the set has, `len(default_classes)`), else `default_classes`; and the templates file."""
    classes = default_classes
    names = root / CLASSNAMES_FILE
    if names.is_file():
        classes = read_lines(names)
        if default_classes and len(classes) != len(default_classes):
            raise UserError(
                f"'{names}' names {len(classes)} classes but {what} has {len(default_classes)}; "
                "give one class name per line, in class-index order."
            )
    templates_file = root / TEMPLATES_FILE
    templates = read_lines(templates_file) if templates_file.is_file() else []
    for t in templates:
        fill_template(t, "x")  # a bad template fails here, before any model time
    return LabelSet(list(classes), templates)
