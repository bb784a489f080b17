"""The small model shape and the fixed training batch that the Trainer-level tests share (2 ranks against
one process, gradient caching against the plain step, the conv stem's norm)."""

from __future__ import annotations

import torch

WORDS = ["red", "blue", "heart", "face", "flag", "hand", "star", "cat", "dog", "sun", "moon", "tree"]
SPEC = {
    "vision_width": 32,
    "vision_layers": 2,
    "vision_heads": 2,
    "text_width": 32,
    "text_layers": 2,
    "text_heads": 2,
    "embed_dim": 16,
    "image_size": 32,
    "context_length": 12,
}
BATCH = 8


def batch(per_image: int = 1, seed: int = 1) -> tuple[torch.Tensor, list[str]]:
    """BATCH seeded uint8 images and `per_image` captions each, image-major: two distinct texts, then a
    label caption shared by images 0, 3, 6 (across ranks) etc. — the demo's multi-positive shape."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (BATCH, 3, 32, 32), dtype=torch.uint8, generator=g)
    captions = [
        f"{WORDS[(i + c) % 12]} {WORDS[(i * 5 + 3) % 12]}" if c < 2 else f"a {WORDS[i % 3]}"
        for i in range(BATCH)
        for c in range(per_image)
    ]
    return images, captions


def clips(frames: int = 4, seed: int = 1) -> torch.Tensor:
    """BATCH seeded uint8 clips (BATCH, frames, 3, 32, 32), for objectives reading each frame's features."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (BATCH, frames, 3, 32, 32), dtype=torch.uint8, generator=g)
