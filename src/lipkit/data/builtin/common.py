"""What the built-in benchmark builders share: the usable rows of a source, its fingerprint, the check that an
output folder is new, empty or an earlier build of the same kind, and the skeleton of a build from a training
and a test table of named objects (`start_build` … `finish_build`: canvases, motion clips)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lipkit.atomic import write_dir, write_json_atomic
from lipkit.data.convert import image_bytes
from lipkit.data.emoji import default_root
from lipkit.data.records import Record
from lipkit.data.sources.registry import read_records
from lipkit.errors import UserError


def usable_records(
    source: Path, image_column: str = "image", caption_column: str = "captions"
) -> tuple[list[Record], dict[str, int]]:
    """The source's rows whose image bytes can be read (what the table can show), and the skipped counts."""
    records, skipped = read_records(source, image_column, caption_column)
    usable = []
    for r in records:
        got = image_bytes(r)
        if isinstance(got, tuple):
            usable.append(r)
        else:
            skipped[got.reason] += 1
    return usable, dict(skipped)


def fingerprint(records: Sequence[Record]) -> str:
    """A hash of the rows' keys and captions: a changed source is built again."""
    h = hashlib.sha256()
    for r in records:
        h.update(f"{r.key}\0{json.dumps(r.captions, ensure_ascii=False)}\0".encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:32]


def check_build_out(out: Path, sources: Sequence[Path], fmt: str, what: str) -> dict[str, Any] | None:
    """The summary of the `fmt` build already in `out` (None for a new or empty folder); refuse a folder
    that holds a source or anything else."""
    dest = out.resolve()
    for source in sources:
        src = source.resolve()
        if dest == src.parent or dest in src.parents:
            raise UserError(f"--out '{out}' holds the source table '{source}'; choose a new folder.")
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    with suppress(OSError, ValueError):
        old = json.loads((out / "summary.json").read_text(encoding="utf-8"))
        if isinstance(old, dict) and old.get("format") == fmt:
            return old
    raise UserError(f"--out '{out}' exists and is not a {what}; choose a new or empty folder.")


def default_sources() -> dict[str, Path]:
    """The emoji tables in the user cache (`lipkit data build emoji`): training artists, held-out artist."""
    return {"train": default_root() / "train.jsonl", "test": default_root() / "test-style.jsonl"}


def object_name(record: Record) -> str:
    return " ".join(record.captions[0].split())


def named_records(got: tuple[list[Record], dict[str, int]]) -> tuple[list[Record], dict[str, int]]:
    """The usable rows that name their object (a first caption that is not blank); the others counted."""
    records, skipped = got
    named = [r for r in records if r.captions and r.captions[0].strip()]
    if len(named) < len(records):
        skipped = {**skipped, "no_caption": skipped.get("no_caption", 0) + len(records) - len(named)}
    return named, skipped


def checked_sources(sources: dict[str, str | Path] | None) -> dict[str, Path]:
    defaults = default_sources()
    got = {k: Path(v).expanduser() for k, v in (sources or {}).items() if v is not None}
    for split, path in defaults.items():
        if split not in got and not path.is_file():
            raise UserError(
                f"The default {split} source '{path}' does not exist; build it with `lipkit data build emoji` "
                f"or pass {'--source' if split == 'train' else '--test-source'} TABLE."
            )
        got.setdefault(split, path)
    return got


@dataclass
class Build:
    """A build under way: where it goes, its sources and their usable named rows, or the finished build in
    `dest` to reuse (`previous`: same format, options, version and source rows, and no --force)."""

    dest: Path
    sources: dict[str, Path]
    records: dict[str, list[Record]]
    skipped: dict[str, dict[str, int]]
    fingerprints: dict[str, str]
    previous: dict[str, Any] | None
    settings: tuple[dict[str, Any], int]  # the build's options and row-layout version


def start_build(
    out: str | Path | None,
    sources: dict[str, str | Path] | None,
    default_out: Path,
    fmt: str,
    what: str,
    settings: tuple[dict[str, Any], int],
    force: bool,
) -> Build:
    """The sources checked and read, `out` checked (`settings`: the build's options and row-layout version)."""
    srcs = checked_sources(sources)
    dest = Path(out).expanduser() if out is not None else default_out
    old = check_build_out(dest, list(srcs.values()), fmt, what)
    read = {split: named_records(usable_records(path)) for split, path in srcs.items()}
    fps = {split: fingerprint(recs) for split, (recs, _) in read.items()}
    options, version = settings
    same = old is not None and old.get("options") == options and old.get("version") == version
    previous = old if same and not force and old.get("source_fingerprints") == fps else None
    records = {split: recs for split, (recs, _) in read.items()}
    skipped = {k: s for k, (_, s) in read.items() if s}
    return Build(dest, srcs, records, skipped, fps, previous, settings)


def finish_build(build: Build, fmt: str, write: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """Write the build whole into `build.dest` (atomically): `write(tmp)` writes the splits and returns their
    counts, then summary.json (the counts, options, sources and their fingerprints) last; the summary."""

    def written(tmp: Path) -> dict[str, Any]:
        counts = write(tmp)
        options, version = build.settings
        summary = {
            "format": fmt,
            "version": version,
            "sources": {k: str(v.resolve()) for k, v in build.sources.items()},
            "source_fingerprints": build.fingerprints,
            "options": options,
            **counts,
            "skipped_source_rows": build.skipped,
            "files": {"train": "train.jsonl", "test": "test.jsonl"},
        }
        write_json_atomic(tmp / "summary.json", summary)
        return summary

    result: dict[str, Any] = {}
    write_dir(build.dest, lambda tmp: result.update(written(tmp)))
    return result
