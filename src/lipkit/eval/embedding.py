"""A split's images and texts through the model, in batches: the embeddings evaluation, region scoring and
the API read."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from rich.progress import Progress

from lipkit.data.image_store import ImageStore
from lipkit.models.dual_encoder import DualEncoder
from lipkit.text.tokenizer import TextTokenizer


@torch.no_grad()
def embed_images(model: DualEncoder, store: ImageStore, batch_size: int) -> torch.Tensor:
    n = len(store.records)
    out = []
    with Progress(transient=True) as bar:
        task = bar.add_task("embedding images", total=n)
        for s in range(0, n, batch_size):
            out.append(model.embed_images_u8(store.get(range(s, min(n, s + batch_size)))))
            bar.advance(task, out[-1].shape[0])
    return torch.cat(out)


@torch.no_grad()
def embed_texts(
    model: DualEncoder,
    tokenizer: TextTokenizer,
    texts: Sequence[str],
    batch_size: int,
    encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Texts in batches through `encode` (default: the model's normalised text embedding) → float32 CPU."""
    encode = encode or model.encode_text
    dev = model.device
    return torch.cat(
        [
            encode(tokenizer(texts[s : s + batch_size]).to(dev)).float().cpu()
            for s in range(0, len(texts), batch_size)
        ]
    )
