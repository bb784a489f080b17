"""What `lipkit data convert` does (the CLI only parses and prints): any source (table, parquet, folder,
shards) to WebDataset shards. Image bytes are copied as they are (formats outside jpg/png/webp/gif/bmp/tif
are re-encoded as PNG), and so are a clip's video file or frame images; unusable samples are skipped and
counted; `lipkit-counts.json` is written beside the shards."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

from PIL import Image

from lipkit.data.frames import mixed_kinds, try_load_frames, video_member
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
    return data if data is not None else _file_bytes(Path(record.image), record.key)


def _file_bytes(path: Path, key: str) -> bytes | Skip:
    try:
        return path.read_bytes()
    except OSError as e:
        reason, detail = classify_failure(e, str(path))
        if reason != "missing_file" and reason != "unreadable_file":
            reason, detail = "unreadable_file", str(e)
        return Skip(reason, key, detail)


def clip_members(record: Record, verify: bool = False, size: int = 32) -> dict[str, bytes] | Skip:
    """A clip's shard members (data/sources/shards.py): `{ext: video bytes}`, or `{"0000.jpg": frame bytes,
    …}` with each frame as image_bytes gives it; or why it cannot be used (`verify`: every frame of a list
    decoded, a video's frames as training samples them by default)."""
    frames = record.frames
    assert frames is not None
    every = replace(frames, count=len(frames.items), sampling="uniform") if frames.items else frames
    if verify and (reason := try_load_frames(every, record.key, size)[1:])[0]:
        return Skip(reason[0], record.key, reason[1])
    if frames.video is not None:
        video = frames.video
        data = video if isinstance(video, bytes) else _file_bytes(video, record.key)
        if isinstance(data, Skip):
            return data
        ext = video_member(video, data)
        why = "not an MP4, MOV, WebM, MKV or AVI file (convert it to one of those)"
        return {ext: data} if ext else Skip("broken_video", record.key, why)
    members: dict[str, bytes] = {}
    for i, item in enumerate(frames.items):
        one = (
            Record(item, [], key=record.key)
            if isinstance(item, Path)
            else Record(Path(""), [], key=record.key, data=item)
        )
        got = image_bytes(one)
        if isinstance(got, Skip):
            return Skip(got.reason, record.key, f"frame {i}: {got.detail}")
        members[f"{i:04d}.{got[1]}"] = got[0]
    return members


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
            f"Sample '{record.key}' is a clip, and only single images are copied here; keep clips in their "
            "table, parquet file or shards (docs/video.md)."
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
    kinds: set[bool] = set()  # clips or images: the shards hold one kind (data/shard_streams.py)

    def work(record: Record) -> Skip | None:
        kinds.add(record.frames is not None)
        if len(kinds) > 1:
            raise mixed_kinds(record.key, record.frames is not None, f"The samples of '{src}'")
        got = clip_members(record, verify) if record.frames is not None else image_bytes(record, verify)
        if isinstance(got, Skip):
            return got
        writer.write_members(record, got if isinstance(got, dict) else {got[1]: got[0]})
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
