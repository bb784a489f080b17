"""Batches for training and evaluation.

The training order is a function of (seed, epoch) only: epoch e visits `randperm(N, seed + e)` in
batches, and caption i of a row is drawn from a generator seeded with (seed, epoch, row). The data
position saved in a checkpoint is therefore just (epoch, batch index).
Small datasets are decoded once into one uint8 tensor (`data.cache_images`); large ones are decoded
per batch in DataLoader worker processes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from rich.progress import Progress
from torch.utils.data import DataLoader, Dataset

from lipkit.data.sources import Record
from lipkit.data.transforms import load_image
from lipkit.errors import UserError


def _decode(record: Record, size: int) -> torch.Tensor:
    try:
        return load_image(record.image, size)
    except FileNotFoundError as e:
        raise UserError(
            f"Image '{record.image}' does not exist; fix the path in the table or data.image_root."
        ) from e
    except OSError as e:
        raise UserError(f"Image '{record.image}' cannot be decoded ({e}); replace or remove it.") from e


class _Images(Dataset):
    def __init__(self, records: Sequence[Record], size: int) -> None:
        self.records, self.size = records, size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> torch.Tensor:
        return _decode(self.records[i], self.size)


class ImageStore:
    """uint8 images by index: decoded once into memory, or read from disk in worker processes."""

    def __init__(
        self, records: Sequence[Record], size: int, cache: bool, workers: int = 0, desc: str = ""
    ) -> None:
        self.records, self.size, self.workers = records, size, workers
        self.cache: torch.Tensor | None = None
        if cache:
            self.cache = torch.empty(len(records), 3, size, size, dtype=torch.uint8)
            with Progress(transient=True) as bar:
                task = bar.add_task(f"decoding {desc} images", total=len(records))
                for i, x in enumerate(self._read(range(len(records)))):
                    self.cache[i] = x
                    bar.advance(task)

    def _read(self, indices: Sequence[int]) -> Iterator[torch.Tensor]:
        ds = torch.utils.data.Subset(_Images(self.records, self.size), list(indices))
        yield from DataLoader(ds, batch_size=None, num_workers=self.workers)

    def get(self, indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
        if self.cache is not None:
            return self.cache[torch.as_tensor(indices, dtype=torch.long)]
        return torch.stack(list(self._read([int(i) for i in indices])))


class TrainBatches:
    """Deterministic, resumable epochs of (uint8 images, captions) batches; the last partial batch is dropped."""

    def __init__(
        self,
        records: Sequence[Record],
        size: int,
        batch_size: int,
        seed: int,
        caption_policy: str = "random",
        captions_per_image: int = 1,
        cache: bool = True,
        workers: int = 0,
    ) -> None:
        if len(records) < batch_size:
            raise UserError(
                f"The training table has {len(records)} usable rows, fewer than train.batch_size="
                f"{batch_size}; lower the batch size or add data."
            )
        self.records, self.batch_size, self.seed, self.policy = records, batch_size, seed, caption_policy
        self.per_image = captions_per_image
        self.store = ImageStore(records, size, cache, workers, desc="training")

    def __len__(self) -> int:
        return len(self.records) // self.batch_size

    def order(self, epoch: int) -> torch.Tensor:
        return torch.randperm(
            len(self.records), generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        )

    def captions(self, row: int, epoch: int) -> list[str]:
        """`captions_per_image` captions of a row: the first ones, or a seeded random choice without
        replacement (cycling when the row has fewer captions than asked for)."""
        caps, k = self.records[row].captions, self.per_image
        if self.policy == "first" or len(caps) == 1:
            return [caps[i % len(caps)] for i in range(k)]
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + row)
        order = torch.randperm(len(caps), generator=g).tolist()
        return [caps[order[i % len(caps)]] for i in range(k)]

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, list[str], list[str]]]:
        """Batches of `epoch` from batch `start_batch` on: (uint8 images (B, 3, H, W), captions (B·k,
        image-major: the k captions of image 0, then of image 1 ...), keys = image paths (B))."""
        order = self.order(epoch)
        for b in range(start_batch, len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size].tolist()
            keys = [str(self.records[i].image) for i in idx]
            yield self.store.get(idx), [c for i in idx for c in self.captions(i, epoch)], keys
