"""Writing WebDataset shards (`lipkit data convert`): samples in the layout data/sources/shards.py
reads, then the sample counts beside them."""

from __future__ import annotations

import json
import time
from pathlib import Path

from lipkit.data.records import Record
from lipkit.data.sources.shards import file_stat, save_counts, webdataset_module
from lipkit.errors import UserError


class ShardOutput:
    """Write samples into `out/00000.tar`, `00001.tar` ... (`shard_size` samples each) with
    webdataset's ShardWriter, then `lipkit-counts.json`. Each sample: `NNNNNNNNN.<ext>` (the image
    bytes as they were; a clip's `.mp4`, or its frames `.0000.jpg`, `.0001.jpg`, …), `.txt` (the first
    caption, for img2dataset readers) and `.json` (all captions, the source key and the metadata)."""

    def __init__(self, out: Path, shard_size: int) -> None:
        if shard_size < 1:
            raise UserError("--shard-size must be at least 1.")
        self.out, self.shard_size = Path(out).expanduser(), shard_size
        self.out.mkdir(parents=True, exist_ok=True)
        stale = [f.name for f in self.out.iterdir() if f.name.endswith(".tar")]
        if stale:
            raise UserError(
                f"Output folder '{self.out}' already holds shards ({stale[0]} ...); choose an empty folder."
            )
        wds = webdataset_module()
        self.writer = wds.ShardWriter(  # a whole-second mtime keeps members in plain ustar headers
            str(self.out / "%05d.tar"),
            maxcount=shard_size,
            maxsize=float("inf"),
            verbose=0,
            mtime=int(time.time()),
        )
        self.n = 0

    def write(self, record: Record, image: bytes, ext: str) -> None:
        self.write_members(record, {ext: image})

    def write_members(self, record: Record, members: dict[str, bytes]) -> None:
        """One sample: `members` (extension → bytes: the image, or a clip's video or numbered frames)."""
        body = {**record.meta, "key": record.key, "captions": record.captions}  # the record's own win
        sample: dict[str, object] = {"__key__": f"{self.n:09d}", **members}
        if record.captions:  # an image without captions (a classification set) has no .txt
            sample["txt"] = record.captions[0]
        sample["json"] = json.dumps(body, ensure_ascii=False, default=str).encode("utf-8")
        self.writer.write(sample)
        self.n += 1

    def close(self) -> list[Path]:
        self.writer.close()
        shards = sorted(self.out.glob("*.tar"))
        counts: dict[str, dict[str, int]] = {}
        for i, path in enumerate(shards):
            n = min(self.shard_size, self.n - i * self.shard_size)
            counts[path.name] = {"samples": n, **file_stat(path)}
        save_counts(self.out, counts)
        return shards

    def pattern(self) -> str:
        n = max(1, -(-self.n // self.shard_size))
        return str(self.out / (f"{{00000..{n - 1:05d}}}.tar" if n > 1 else "00000.tar"))
