"""Multi-frame samples — video clips, stacks of slices — and their one decode path.

A record's `frames` (`Frames`) is either a list of images (paths or encoded bytes, in time or depth order)
or one video file (a path or bytes, decoded with PyAV, `pip install 'lipkit[video]'`). Decoding gives
uint8 (T, 3, S, S): T frames (`data.num_frames`) chosen by `data.frame_sampling`:
- `uniform`: the frame nearest the centre of each of T equal segments of the n frames (TSN's test-time
  sampling; T > n repeats frames), ties going to the frame nearer the clip's middle: a list and its reverse
  decode to exactly reversed tensors (`frame_indices`) — for any n and T but an odd T over an even n, whose
  middle segment's centre falls between two frames.
- `random`: one frame drawn uniformly inside each segment, from a generator seeded by the record's key: a
  fixed draw (the same frames every epoch, on every rank), so decoded clips can be cached like images (a
  clip and its reverse, having other keys, draw other frames).

A video that cannot be opened or decoded, has no video stream, or holds fewer frames than its header
declares (a truncated file; a shortfall of up to 5 % is allowed for edit lists) is skipped as `broken_video`; a frame list whose image cannot be used is skipped
with that image's reason. Either way the sample is counted like any unusable image (data/records.py).
"""

from __future__ import annotations

import io
import math
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from lipkit.data.image_policy import IMAGE_EXTS, MAX_PIXELS
from lipkit.data.images import image_pixels, try_load_image
from lipkit.errors import UserError

FRAMES = "frames"  # the table / parquet column that holds a sample's frames
DEFAULT_FRAMES = 8
SAMPLINGS = ("uniform", "random")
VIDEO_EXTS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v")  # a .gif is an image (its first frame)
MAX_VIDEO_FRAMES = 100_000  # frames decoded from one video before it is refused (a runaway stream)
VIDEO_MEMBERS = tuple(e[1:] for e in VIDEO_EXTS)  # a WebDataset sample's video member: key.mp4, key.webm, …


@dataclass(frozen=True)
class Frames:
    """A sample's frames: `items` (images, paths or bytes) or `video` (a file path or bytes); `count`
    frames are decoded with `sampling`."""

    items: tuple[Path | bytes, ...] = ()
    video: Path | bytes | None = None
    count: int = DEFAULT_FRAMES
    sampling: str = "uniform"


def frames_of(value: Any, root: Path) -> Frames | None:
    """A `frames` cell as Frames: a list of image paths (relative to `root`) or bytes, a video path, video
    bytes, or (from a JSON string) a list; None when the cell is empty or none of those."""
    if isinstance(value, str) and value.strip().startswith("["):
        import json

        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    if isinstance(value, bytes | bytearray):
        return Frames(video=bytes(value))
    if isinstance(value, str) and value.strip():
        return Frames(video=root / value.strip())
    if isinstance(value, list | tuple):
        if not value:
            return None
        items: list[Path | bytes] = []
        for v in value:
            if isinstance(v, dict):  # Hugging Face datasets' Image feature
                v = v.get("bytes") or v.get("path")
            if isinstance(v, bytes | bytearray):
                items.append(bytes(v))
            elif isinstance(v, str) and v.strip():
                items.append(root / v.strip())
            else:
                return None
        return Frames(items=tuple(items))
    return None


def shard_frames(sample: dict[str, Any]) -> Frames | str | None:
    """A WebDataset sample's clip: its video member (`key.mp4`, `.webm`, …; it wins over frame members) or its
    numbered frame members (`key.0000.jpg`, `key.1.png`, … in the numbers' order); None for a sample of one
    image; a sentence when two frame members share a number."""
    for ext in VIDEO_MEMBERS:
        if ext in sample:
            return Frames(video=bytes(sample[ext]))
    numbered: dict[int, tuple[str, bytes]] = {}
    for name, data in sample.items():
        number, _, ext = str(name).partition(".")
        if number.isascii() and number.isdigit() and ext.lower() in IMAGE_EXTS:
            if int(number) in numbered:
                return f"frame members {numbered[int(number)][0]} and {name} share the number {int(number)}"
            numbered[int(number)] = (str(name), bytes(data))
    return Frames(items=tuple(numbered[n][1] for n in sorted(numbered))) if numbered else None


def video_member(video: Path | bytes, data: bytes) -> str | None:
    """The member extension a video is written under in a shard (its file's, else by its first bytes); None
    when its first bytes are not those of a container a shard member can name (MP4/MOV, Matroska/WebM, AVI)."""
    if not sniff_video(data[:16]):
        return None
    if isinstance(video, Path) and video.suffix.lower() in VIDEO_EXTS:
        return video.suffix.lower()[1:]
    return "mp4" if data[4:8] == b"ftyp" else "avi" if data[:4] == b"RIFF" else "mkv"


def mixed_kinds(key: str, clip: bool, where: str) -> UserError:
    """The one sentence for a dataset that mixes clips and single images (sample `key` is a clip or not)."""
    kind, other = ("a clip", "single images") if clip else ("a single image", "clips")
    return UserError(
        f"{where} mix clips and single images: sample '{key}' is {kind} among {other}; keep clips and images in "
        "separate datasets (docs/video.md)."
    )


def check_frame_settings(count: int, sampling: str) -> None:
    """data.num_frames and data.frame_sampling, or one sentence saying what to set."""
    if count < 1:
        raise UserError(f"data.num_frames must be 1 or more, not {count}.")
    if sampling not in SAMPLINGS:
        raise UserError(f"data.frame_sampling must be one of {', '.join(SAMPLINGS)}, not {sampling!r}.")


def with_frame_count(records: list, count: int, sampling: str = "uniform") -> list:
    """`records` with every clip set to decode `count` frames by `sampling` (data.num_frames,
    data.frame_sampling); records without frames are returned as they are."""
    check_frame_settings(count, sampling)
    for r in records:
        if r.frames is not None:
            r.frames = replace(r.frames, count=count, sampling=sampling)
    return records


def shown_frames(record: Any, n: int = 4) -> list[str]:
    """Up to `n` frame files of a clip spread over it (a report's strip); [] for images and video files."""
    frames = record.frames
    if frames is None or not frames.items or not all(isinstance(f, Path) for f in frames.items):
        return []
    return [
        str(frames.items[i])
        for i in frame_indices(len(frames.items), min(n, len(frames.items)), "uniform", "")
    ]


def frame_indices(n: int, count: int, sampling: str, key: str) -> list[int]:
    """The `count` frame indices of `n` frames (see the module docstring). Uniform sampling takes the frame
    nearest each segment's centre c_i = (i + ½)·n/T − ½, a tie going to the frame nearer the clip's middle, so
    the indices are symmetric: a list and its reverse give exactly reversed frames (unless T is odd and n even:
    then the middle segment's centre lies between two frames)."""
    if sampling == "random":
        g = torch.Generator().manual_seed(zlib.crc32(key.encode("utf-8", "surrogatepass")))
        draws = torch.rand(count, generator=g).tolist()
        return [min(n - 1, int((i + u) * n / count)) for i, u in enumerate(draws)]
    mid, out = (n - 1) / 2, []
    for i in range(count):
        c = (i + 0.5) * n / count - 0.5
        out.append(min(n - 1, max(0, math.floor(c + 0.5) if c <= mid else math.ceil(c - 0.5))))
    return out


# ISO base media files that hold still images (AVIF, HEIF), not video
_STILL_BRANDS = (b"avif", b"avis", b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1")


def sniff_video(head: bytes) -> bool:
    """Whether encoded bytes start like a video container lipkit decodes (MP4/MOV, Matroska/WebM, AVI)."""
    if head[4:8] == b"ftyp":
        return head[8:12] not in _STILL_BRANDS
    return head.startswith(b"\x1aE\xdf\xa3") or (head[:4] == b"RIFF" and head[8:12] == b"AVI ")


def try_load_frames(
    frames: Frames,
    key: str,
    size: int,
    style: str = "lipkit",
    *,
    max_pixels: int = MAX_PIXELS,
    max_frames: int = MAX_VIDEO_FRAMES,
) -> tuple[torch.Tensor | None, str, str]:
    """uint8 (T, 3, size, size), "", "" — or None, reason, detail (never raises on bad data). A video
    frame over `max_pixels` or a video over `max_frames` frames is refused (`too_large`, `too_long_video`)."""
    if frames.video is not None:
        return _video(frames, key, size, style, max_pixels, max_frames)
    if not frames.items:
        return None, "no_frames", "empty frame list"
    out = []
    for i in frame_indices(len(frames.items), frames.count, frames.sampling, key):
        x, reason, detail = try_load_image(frames.items[i], size, max_pixels, style=style)
        if x is None:
            return None, reason, f"frame {i}: {detail}"
        out.append(x)
    return torch.stack(out), "", ""


def _video(
    frames: Frames, key: str, size: int, style: str, max_pixels: int, max_frames: int
) -> tuple[torch.Tensor | None, str, str]:
    """Two passes: the frames counted from the demuxed packets (nothing decoded), then decoded in order with
    only the chosen ones converted to pixels — memory for T frames, whatever the video's length."""
    try:
        import av
    except ImportError as e:
        raise UserError(
            "Decoding video files needs PyAV; install it with `pip install 'lipkit[video]'`."
        ) from e
    src = frames.video
    if isinstance(src, Path) and not src.is_file():
        return None, "missing_file", f"{src} does not exist"

    def opened() -> Any:
        return av.open(io.BytesIO(src) if isinstance(src, bytes) else str(src))

    try:
        with opened() as container:
            if not container.streams.video:
                return None, "broken_video", "no video stream"
            stream = container.streams.video[0]
            w, h = stream.codec_context.width, stream.codec_context.height
            if w * h > max_pixels:
                return None, "too_large", f"{w}x{h} frames exceed the limit of {max_pixels} pixels"
            declared = stream.frames
            n = sum(1 for packet in container.demux(stream) if packet.size)
        if n > max_frames:
            return None, "too_long_video", f"{n} frames, over the limit of {max_frames}"
        if not n or (declared > 0 and n < 0.95 * declared - 1):  # edit lists may drop a frame or two
            return None, "broken_video", f"{n} of the {declared} frames its header declares (truncated)"
        want = frame_indices(n, frames.count, frames.sampling, key)
        with opened() as container:
            picked = _decode_chosen(container, container.streams.video[0], set(want), size, style, max_frames)
    except (av.error.FFmpegError, OSError, ValueError, EOFError) as e:
        return None, "broken_video", f"{type(e).__name__}: {e}"
    if any(i not in picked for i in want):
        return None, "broken_video", f"{len(picked)} of the {len(want)} chosen frames decode"
    return torch.stack([picked[i] for i in want]), "", ""


def _decode_chosen(
    container: Any, stream: Any, chosen: set[int], size: int, style: str, max_frames: int
) -> dict[int, torch.Tensor]:
    """{index: uint8 (3, size, size)} of the `chosen` frames, decoding in order (stopping after the last)."""
    picked: dict[int, torch.Tensor] = {}
    last = max(chosen)
    for n, frame in enumerate(container.decode(stream)):
        if n in chosen:
            picked[n] = image_pixels(frame.to_image(), size, style)
        if n >= last or n >= max_frames:
            break
    return picked
