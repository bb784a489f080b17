"""The built-in dataset: emoji images by three artists, captioned in several languages.

Sources are four npm packages fetched with ``npm pack`` (once; later builds are offline):
``emoji-datasource-{google,twitter,facebook}`` ship ``package/emoji.json`` (name, category,
subcategory, skin variations) and the 64 px PNGs in ``package/img/<style>/64/``; ``emojibase-data``
ships ``package/<locale>/compact.json`` with labels and tags in ~30 languages.

Every emoji (and, with ``skin_tones``, every skin-tone variant) that has an image in all three styles
becomes one image per style. Its captions are, in order: the English label ("nerd face"), the English
tags as a phrase ("brainy, clever, geek, glasses, nerd"), "label (subcategory, category)", then the
label in each other language. A *concept* is a base emoji together with its skin variants.

Splits: ``train`` = google + twitter on the non-novel concepts; ``test-style`` = facebook on the same
concepts (style shift); ``test-novel`` = all three styles on ``novel_fraction`` of the concepts, held
out of training entirely. Layout of ``out_dir``::

    images/<style>/<file>.png      byte copies of the shipped PNGs
    train.jsonl  test-style.jsonl  test-novel.jsonl
        {"image": "images/google/1f913.png", "captions": [...], "langs": [...], "concept": "1F913",
         "label": ..., "category": ..., "subcategory": ..., "style": "google"}
    summary.json                   written last; its presence marks a complete build
"""

from __future__ import annotations

import gzip
import json
import os
import random
import re
import shutil
import subprocess
import tarfile
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path
from typing import Any, BinaryIO

from platformdirs import user_cache_dir
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from lipkit.atomic import atomic_write, write_json_atomic
from lipkit.errors import UserError

STYLES = ("google", "twitter", "facebook")
TRAIN_STYLES = ("google", "twitter")
TEST_STYLE = "facebook"
LABEL_PACKAGE = "emojibase-data"
PACKAGES = (*(f"emoji-datasource-{s}" for s in STYLES), LABEL_PACKAGE)
DEFAULT_LANGUAGES = ("de", "es", "fr", "it", "ja", "pt", "ru", "zh")
SPLITS = ("train", "test-style", "test-novel")


def default_root() -> Path:
    """Where the dataset is built when no ``out_dir`` is given."""
    return Path(user_cache_dir("lipkit")) / "datasets" / "emoji"


def packages_dir(cache_dir: Path | None = None) -> Path:
    """Where the npm tarballs live: ``cache_dir/packages``, by default the user cache's ``npm``."""
    return Path(cache_dir) / "packages" if cache_dir is not None else Path(user_cache_dir("lipkit")) / "npm"


def _norm(code: str) -> str:
    """Normalize a code-point sequence ("2764-FE0F" -> "2764") so both sources agree."""
    return "-".join(p for p in code.upper().split("-") if p and p != "FE0F")


def _find_tarball(folder: Path, name: str) -> Path | None:
    pattern = re.compile(rf"{re.escape(name)}-(\d[\w.+-]*)\.tgz")
    found = [(m.group(1), p) for p in folder.glob(f"{name}-*.tgz") if (m := pattern.fullmatch(p.name))]
    key = lambda item: [int(x) if x.isdigit() else -1 for x in re.split(r"[.+-]", item[0])]  # noqa: E731
    return max(found, key=key)[1] if found else None


def fetch_packages(folder: Path, progress: bool = False) -> dict[str, Path]:
    """Return the tarball of each package, running ``npm pack`` for those not yet in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    missing = [n for n in PACKAGES if _find_tarball(folder, n) is None]
    if missing:
        hint = f"or put the {', '.join(missing)} .tgz files (from `npm pack`) into {folder}"
        npm = shutil.which("npm")
        if npm is None:
            raise UserError(f"npm was not found on PATH; install Node.js (which brings npm), {hint}.")
        status = Console().status(f"npm pack {' '.join(missing)}") if progress else nullcontext()
        with status, tempfile.TemporaryDirectory(dir=folder, prefix=".npm-pack-") as tmp:
            try:
                res = subprocess.run([npm, "pack", *missing], cwd=tmp, capture_output=True, text=True)
            except OSError as e:
                raise UserError(f"running npm failed ({e}); check the Node.js install, {hint}.") from e
            if res.returncode != 0:
                lines = [ln for ln in (res.stderr or res.stdout).splitlines() if ln.strip()]
                why = lines[-1].strip() if lines else f"exit status {res.returncode}"
                raise UserError(f"`npm pack` failed ({why}); check the network connection, {hint}.")
            for tgz in Path(tmp).glob("*.tgz"):
                os.replace(tgz, folder / tgz.name)
    found = {n: _find_tarball(folder, n) for n in PACKAGES}
    if lost := [n for n, p in found.items() if p is None]:
        raise UserError(f"`npm pack` did not produce {', '.join(lost)}; put those .tgz files into {folder}.")
    return {n: p for n, p in found.items() if p is not None}


@contextmanager
def _open(path: Path, fileobj: BinaryIO | None = None) -> Iterator[tarfile.TarFile]:
    """Open a .tgz as a stream (members in order, nothing unpacked to disk); corrupt ones are UserErrors."""
    try:
        with tarfile.open(path, "r|gz", fileobj=fileobj) as tar:
            yield tar
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not a readable npm tarball ({e}); delete it to fetch it again.") from e


def _read_labels(path: Path, languages: Sequence[str]) -> tuple[dict[str, dict[str, str]], dict[str, list]]:
    """Labels per language and English tags, keyed by normalized hexcode (skins inherit base tags)."""
    wanted = {f"package/{lang}/compact.json": lang for lang in ("en", *languages)}
    labels: dict[str, dict[str, str]] = {}
    tags: dict[str, list] = {}
    with _open(path) as tar:
        for member in tar:
            if (lang := wanted.get(member.name)) is None:
                continue
            table = labels.setdefault(lang, {})
            for e in json.load(tar.extractfile(member)):  # type: ignore[arg-type]
                for item in [e, *e.get("skins", [])]:
                    table[_norm(item["hexcode"])] = item.get("label", "")
                    if lang == "en":
                        tags[_norm(item["hexcode"])] = e.get("tags", [])
    if absent := [lang for lang in wanted.values() if lang not in labels]:
        raise UserError(
            f"{path.name} has no labels for language(s) {', '.join(absent)}; pick other languages."
        )
    return labels, tags


def _extract_style(path: Path, style: str, dest: Path, progress: Progress) -> tuple[set[str], list | None]:
    """Copy every 64 px PNG of ``style`` into ``dest``; return the file names and the parsed emoji.json."""
    prefix, names, emoji_json = f"package/img/{style}/64/", set(), None
    task = progress.add_task(f"extracting {style}", total=path.stat().st_size)
    dest.mkdir(parents=True, exist_ok=True)
    with path.open("rb") as raw, _open(path, raw) as tar:
        for member in tar:
            name = member.name[len(prefix) :] if member.name.startswith(prefix) else ""
            if member.isfile() and name.endswith(".png") and "/" not in name:
                (dest / name).write_bytes(tar.extractfile(member).read())  # type: ignore[union-attr]
                names.add(name)
            elif member.name == "package/emoji.json":
                emoji_json = json.load(tar.extractfile(member))  # type: ignore[arg-type]
            progress.update(task, completed=raw.tell())
        progress.update(task, completed=path.stat().st_size)
    return names, emoji_json


def _record(
    e: dict[str, Any],
    v: dict[str, Any],
    labels: dict[str, dict[str, str]],
    tags: dict[str, list],
    langs: list[str],
) -> dict[str, Any]:
    """The table row (without style) of variant ``v`` of emoji.json entry ``e``."""
    category, subcategory = e["category"], e["subcategory"].replace("-", " ")
    key = _norm(v["unified"])
    label = labels["en"].get(key) or e["name"].lower()
    phrase = ", ".join(tags.get(key) or [s.replace("_", " ") for s in e.get("short_names", [])])
    pairs = [("en", label), ("en", phrase), ("en", f"{label} ({subcategory}, {category})")]
    pairs += [(lang, labels[lang].get(key, "")) for lang in langs]
    pairs = [(lang, c.strip()) for lang, c in pairs if c and c.strip()]
    return {
        "image": v["image"],
        "captions": [c for _, c in pairs],
        "langs": [lang for lang, _ in pairs],
        "concept": e["unified"].upper(),
        "label": label,
        "category": category,
        "subcategory": subcategory,
    }


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in rows]
    atomic_write(path, lambda f: f.writelines(lines), text=True)


def _reuse(summary_path: Path, options: dict[str, Any]) -> dict[str, Any] | None:
    """The summary of a complete earlier build with the same options, or None."""
    if summary_path.is_file():
        with suppress(ValueError):  # an unreadable summary just means: build again
            if (old := json.loads(summary_path.read_text(encoding="utf-8"))).get("options") == options:
                return old
    return None


def _extract_images(tarballs: dict[str, Path], images: Path, progress: bool) -> tuple[set[str], list]:
    """Copy every style's PNGs under ``images/<style>``; return the file names present in all three
    styles and the emoji.json entries."""
    available: dict[str, set[str]] = {}
    entries: list | None = None
    with Progress(disable=not progress) as bar:
        for style in STYLES:
            available[style], emoji_json = _extract_style(
                tarballs[f"emoji-datasource-{style}"], style, images / style, bar
            )
            entries = entries or emoji_json
    if not entries:
        raise UserError(
            f"{tarballs['emoji-datasource-google']} has no package/emoji.json; delete it to refetch."
        )
    return set.intersection(*available.values()), entries


def _records(
    entries: list,
    in_all: set[str],
    labels: dict[str, dict[str, str]],
    tags: dict[str, list],
    languages: list[str],
    skin_tones: bool,
) -> list[dict[str, Any]]:
    """One row (without style) per emoji variant that has an image in all three styles, in sort order."""
    records: list[dict[str, Any]] = []
    for e in sorted(entries, key=lambda e: (e.get("sort_order", 0), e["unified"])):
        variants = [e, *(e.get("skin_variations") or {}).values()] if skin_tones else [e]
        records += [_record(e, v, labels, tags, languages) for v in variants if v["image"] in in_all]
    return records


def _drop_stray_images(images: Path, kept: set[str]) -> None:
    """Delete images not in all three styles (and stale ones from earlier builds)."""
    for style in STYLES:
        for stray in {p.name for p in (images / style).iterdir()} - kept:
            (images / style / stray).unlink()


def _split_tables(records: list[dict[str, Any]], novel: set[str]) -> dict[str, list[dict[str, Any]]]:
    """The rows of every split, one per record and style of that split."""
    plan = {
        "train": (False, TRAIN_STYLES),
        "test-style": (False, (TEST_STYLE,)),
        "test-novel": (True, STYLES),
    }
    return {
        split: [
            {**r, "image": f"images/{style}/{r['image']}", "style": style}
            for r in records
            if (r["concept"] in novel) == is_novel
            for style in styles
        ]
        for split, (is_novel, styles) in plan.items()
    }


def _summary(
    records: list[dict[str, Any]],
    tables: dict[str, list[dict[str, Any]]],
    concepts: int,
    novel: int,
    tarballs: dict[str, Path],
    options: dict[str, Any],
) -> dict[str, Any]:
    rows = [r for t in tables.values() for r in t]
    return {
        "dataset": "emoji",
        "splits": {s: f"{s}.jsonl" for s in SPLITS},
        "images": {s: len(t) for s, t in tables.items()},
        "captions": sum(len(r["captions"]) for r in rows),
        "concepts": {"train": concepts - novel, "novel": novel},
        "categories": sorted({r["category"] for r in records}),
        "subcategories": sorted({r["subcategory"] for r in records}),
        "languages": ["en", *options["languages"]],
        "styles": {"train": list(TRAIN_STYLES), "test-style": [TEST_STYLE], "test-novel": list(STYLES)},
        "packages": {n: p.name for n, p in tarballs.items()},
        "options": options,
    }


def build_emoji(
    out_dir: Path | None = None,
    *,
    cache_dir: Path | None = None,
    languages: Sequence[str] = DEFAULT_LANGUAGES,
    skin_tones: bool = True,
    novel_fraction: float = 0.1,
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Build (or reuse) the emoji dataset in ``out_dir`` and return its summary (see module doc).

    A complete earlier build with the same options is reused unless ``force``.
    """
    if not 0.0 <= novel_fraction < 1.0:
        raise UserError(f"novel_fraction must be in [0, 1), got {novel_fraction}; pass e.g. 0.1.")
    out = Path(out_dir) if out_dir is not None else default_root()
    languages = [lang for lang in dict.fromkeys(languages) if lang != "en"]
    options = {
        "languages": languages,
        "skin_tones": skin_tones,
        "novel_fraction": novel_fraction,
        "seed": seed,
    }
    summary_path = out / "summary.json"
    if not force and (old := _reuse(summary_path, options)) is not None:
        return old
    tarballs = fetch_packages(packages_dir(cache_dir), progress)
    out.mkdir(parents=True, exist_ok=True)
    summary_path.unlink(missing_ok=True)  # the build is incomplete until the summary is back

    labels, tags = _read_labels(tarballs[LABEL_PACKAGE], languages)
    in_all, entries = _extract_images(tarballs, out / "images", progress)
    records = _records(entries, in_all, labels, tags, languages, skin_tones)
    _drop_stray_images(out / "images", {r["image"] for r in records})

    concepts = sorted({r["concept"] for r in records})
    random.Random(seed).shuffle(concepts)
    novel = set(concepts[: round(novel_fraction * len(concepts))])
    tables = _split_tables(records, novel)
    for split, rows in tables.items():
        _write_jsonl(out / f"{split}.jsonl", rows)
    summary = _summary(records, tables, len(concepts), len(novel), tarballs, options)
    write_json_atomic(summary_path, summary)  # last: its presence marks a complete build
    if progress:
        _print_summary(summary, out)
    return summary


def _print_summary(summary: dict[str, Any], out: Path) -> None:
    table = Table(title=f"emoji dataset in {out}", show_header=False)
    for split, n in summary["images"].items():
        table.add_row(f"images {split}", f"{n:,}")
    table.add_row("captions", f"{summary['captions']:,}")
    table.add_row(
        "concepts train / novel", f"{summary['concepts']['train']:,} / {summary['concepts']['novel']:,}"
    )
    table.add_row(
        "categories / subcategories", f"{len(summary['categories'])} / {len(summary['subcategories'])}"
    )
    table.add_row("languages", " ".join(summary["languages"]))
    Console().print(table)
