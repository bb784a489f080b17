"""The server's query kinds for `MicroBatcher`: texts (cached by their exact text) and decoded images
(never cached) and composed (a reference image and words, never cached), each encoded as one batch by the
searcher's model; clips (uploaded videos) are a kind of their own. A new kind is one more class with `name`, `encode(items)`
and `cache_key(item)`."""

from __future__ import annotations

from collections.abc import Hashable

import numpy as np
import torch

from lipkit.search.query import Searcher


class TextQueries:
    name = "text"

    def __init__(self, searcher: Searcher) -> None:
        self.searcher = searcher

    def encode(self, items: list[str]) -> np.ndarray:
        return self.searcher.text_queries(items)

    def cache_key(self, item: str) -> Hashable | None:
        # sparse (vocabulary-sized) and token-wise (context × dim) queries are large: not kept
        return None if self.searcher.sparse or self.searcher.token_wise else item


class ImageQueries:
    """uint8 (3,S,S) images, already decoded and resized to the model's size."""

    name = "image"

    def __init__(self, searcher: Searcher) -> None:
        self.searcher = searcher

    def encode(self, items: list[torch.Tensor]) -> np.ndarray:
        return self.searcher.image_queries(torch.stack(items))

    def cache_key(self, item: torch.Tensor) -> Hashable | None:
        return None


class VideoQueries(ImageQueries):
    """uint8 (T,3,S,S) clips, decoded and resized (every upload has the same T): one (B,T,3,S,S) batch."""

    name = "video"


class ComposedQueries:
    """(uint8 (3,S,S) reference image, words) pairs: the image changed by the words (Searcher.composed_queries)."""

    name = "composed"

    def __init__(self, searcher: Searcher) -> None:
        self.searcher = searcher

    def encode(self, items: list[tuple[torch.Tensor, str]]) -> np.ndarray:
        return self.searcher.composed_queries(torch.stack([i for i, _ in items]), [t for _, t in items])

    def cache_key(self, item: tuple[torch.Tensor, str]) -> Hashable | None:
        return None


def query_kinds(searcher: Searcher) -> list[TextQueries | ImageQueries | ComposedQueries]:
    return [TextQueries(searcher), ImageQueries(searcher), VideoQueries(searcher), ComposedQueries(searcher)]
