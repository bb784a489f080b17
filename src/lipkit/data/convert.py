"""What `lipkit data convert` does (the CLI only parses and prints): any source (table, parquet, folder,
shards) to WebDataset shards. Image bytes are copied as they are (formats outside jpg/png/webp/gif/bmp/tif
are re-encoded as PNG), unusable samples are skipped and counted; `lipkit-counts.json` is written beside
the shards."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from lipkit.data.images import classify_failure, empty_source, open_image, try_load_image
from lipkit.data.records import Record, Skip
from lipkit.data.scan_report import Report, run_pass
from lipkit.data.shard_writer import ShardOutput
from lipkit.data.sources.registry import estimate_total, scan
from lipkit.errors import UserError

FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}


def _read_bytes(record: Record) -> bytes | Skip:
    """The encoded image of a record: its inline bytes, or its file's."""
    data = record.data  # read once (a lazy record fetches it on each access)
    if data is not None:
        return data
    try:
        return Path(record.image).read_bytes()
    except OSError as e:
        reason, detail = classify_failure(e, record.image)
        if reason != "missing_file" and reason != "unreadable_file":
            reason, detail = "unreadable_file", str(e)
        return Skip(reason, record.key, detail)


def _as_png(im: Image.Image) -> bytes:
    im.load()
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def image_bytes(record: Record, verify: bool = False, size: int = 32) -> tuple[bytes, str] | Skip:
    """The encoded image of a record and its file extension, or why it cannot be used. Without `verify`
    only the header is read (empty, missing, not an image, too large); with it the image is decoded."""
    if record.frames is not None:
        raise UserError(
            f"Sample '{record.key}' is a clip (a `frames` column); clips are not written to shards or copied "
            "yet: keep them in a table or parquet file (docs/video.md)."
        )
    data = _read_bytes(record)
    if isinstance(data, Skip):
        return data
    if empty_source(data):
        return Skip("empty_file", record.key, "0 bytes")
    try:
        with open_image(data) as im:
            fmt = im.format
            if fmt not in FORMAT_EXT:
                data, fmt = _as_png(im), "PNG"
    except Exception as e:  # noqa: BLE001 - damaged headers raise many types; each is classified
        reason, detail = classify_failure(e, data)
        return Skip(reason, record.key, detail)
    if verify:
        _, reason, detail = try_load_image(data, size)
        if reason:
            return Skip(reason, record.key, detail)
    return data, FORMAT_EXT[fmt]


def convert(
    src: str | Path,
    out: str | Path,
    shard_size: int = 1000,
    image_column: str = "image",
    caption_column: str = "captions",
    image_root: str | Path = "",
    verify: bool = False,
    progress: bool = True,
) -> Report:
    """Write WebDataset shards of `src` into `out`; the report's extra holds shards, pattern and rate."""
    writer = ShardOutput(Path(out), shard_size)

    def work(record: Record) -> Skip | None:
        got = image_bytes(record, verify)
        if isinstance(got, Skip):
            return got
        writer.write(record, *got)
        return None

    items = scan(src, image_column, caption_column, image_root)
    try:
        report = run_pass(items, "convert", estimate_total(src), progress, work, Report())
    finally:
        shards = writer.close()
    report.extra = {
        "shards": len(shards),
        "pattern": writer.pattern(),
        "samples_per_s": round(report.samples / max(1e-9, report.seconds), 1),
    }
    return report
