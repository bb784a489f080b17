"""GRAM's meta-training tasks from an image–text table (adapt.gram).

GRAM meta-trains on image–text pairs without class labels: each distinct caption is a "concept", its
images the examples, and a task is a `ways`-way classification among concepts with `shots` images each.
To make the meta-objective about generalising *across* domains, the concepts are grouped into domains by
spherical k-means over their joint embedding [v̄_c ; t_c]/√2 (v̄_c the normalised mean of the concept's
normalised image embeddings, t_c its caption's normalised text embedding), and each meta-step pairs a
support task from one domain with a query task from another (GRAM's cross-domain task sampling).

A concept's caption is the first caption of its rows; rows without a caption, whose caption plus the prompt
context would not fit the text tower's positions, or whose image cannot be read are left out and counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lipkit.data.image_store import ImageStore
from lipkit.data.records import Record
from lipkit.errors import UserError
from lipkit.eval.adapted_classes import (
    PROMPT,
)  # a concept's prompt around its caption, as CoOp's around a class
from lipkit.eval.embedding import embed_images, embed_texts


@dataclass
class Concepts:
    captions: list[str]  # (C,) one per concept
    ids: torch.Tensor  # (C, L) the tokenised prompts "{caption}."
    images: torch.Tensor  # (N, D) normalised image embeddings
    owner: torch.Tensor  # (N,) each image's concept
    domain: torch.Tensor  # (C,) each concept's domain
    dropped: int  # rows left out: no caption, a caption that does not fit, or an unreadable image


@dataclass
class Task:
    images: torch.Tensor  # (n,) rows of Concepts.images
    concepts: torch.Tensor  # (w,) the task's concepts
    labels: torch.Tensor  # (n,) each image's position in `concepts`


def spherical_kmeans(x: torch.Tensor, k: int, seed: int, iters: int = 25) -> torch.Tensor:
    """(N,) the cluster of each row of the unit-norm `x` after Lloyd's iterations on the sphere (centres
    re-normalised means), started farthest-first from a row drawn with `seed` (each next centre the row
    least similar to its nearest centre so far); an emptied cluster keeps its centre."""
    first = int(torch.randint(len(x), (1,), generator=torch.Generator().manual_seed(seed)))
    chosen = [first]
    nearest = x @ x[first]
    for _ in range(1, k):
        chosen.append(int(nearest.argmin()))
        nearest = torch.maximum(nearest, x @ x[chosen[-1]])
    centres = x[chosen].clone()
    assign = torch.zeros(len(x), dtype=torch.long)
    for _ in range(iters):
        assign = (x @ centres.t()).argmax(1)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        filled = sums.norm(dim=1) > 0
        centres[filled] = F.normalize(sums[filled], dim=-1)
    return assign


def _fits(tokenizer, captions: list[str], room: int) -> tuple[torch.Tensor, list[bool]]:
    """The tokenised prompts and whether each fits in `room` positions (its end token kept: not cut off)."""
    ids = tokenizer([PROMPT.format(c) for c in captions])
    ends = [(row == tokenizer.eot_id).nonzero() for row in ids]
    return ids, [bool(e.numel()) and int(e[0]) + 1 <= room for e in ends]


@torch.no_grad()
def concepts_of(model, tokenizer, records: list[Record], context: int, domains: int, seed: int) -> Concepts:
    """The concepts of `records`, their images embedded once and their domains clustered (module doc)."""
    first = [r.captions[0] if r.captions else "" for r in records]
    names = sorted({c for c in first if c})
    _, fits = _fits(tokenizer, names, model.text.max_positions - context)
    fitting = {n for n, ok in zip(names, fits, strict=True) if ok}
    rows = [r for r, c in zip(records, first, strict=True) if c in fitting]
    store = ImageStore(rows, model.spec.image_size, cache=True, desc="meta-training images")
    captions = sorted({r.captions[0] for r in store.records})  # those with a readable image
    if len(captions) < 4:
        raise UserError(
            f"The table has {len(captions)} distinct captions with a readable image that fit the text tower "
            "beside the context; GRAM's meta-training needs 4 or more: use a bigger table or a shorter --context."
        )
    images = embed_images(model, store, 128).float().cpu()
    index = {c: i for i, c in enumerate(captions)}
    owner = torch.tensor([index[r.captions[0]] for r in store.records])
    ids, _ = _fits(tokenizer, captions, 0)
    text = embed_texts(model, tokenizer, captions, 256)
    mean = F.normalize(torch.zeros(len(captions), images.shape[1]).index_add_(0, owner, images), dim=-1)
    joint = torch.cat([mean, text], dim=1) / 2**0.5
    domain = spherical_kmeans(joint, min(domains, len(captions)), seed)
    return Concepts(captions, ids, images, owner, domain, len(records) - len(store.records))


def sample_task(concepts: Concepts, domain: int, ways: int, shots: int, g: torch.Generator) -> Task:
    """Up to `ways` concepts of `domain`, each with up to `shots` of its images, drawn with `g`."""
    members = (concepts.domain == domain).nonzero().flatten()
    chosen = members[torch.randperm(len(members), generator=g)[:ways]]
    images, labels = [], []
    for position, c in enumerate(chosen.tolist()):
        own = (concepts.owner == c).nonzero().flatten()
        picked = own[torch.randperm(len(own), generator=g)[:shots]]
        images.append(picked)
        labels.append(torch.full((len(picked),), position))
    return Task(torch.cat(images), chosen, torch.cat(labels))


def sample_pair(concepts: Concepts, ways: int, shots: int, g: torch.Generator) -> tuple[Task, Task]:
    """(support, query) tasks from two different domains, each with 2 or more concepts."""
    counts = torch.bincount(concepts.domain)
    usable = (counts >= 2).nonzero().flatten()
    if len(usable) < 2:
        raise UserError(
            "GRAM's meta-training needs 2 or more domains of 2 or more concepts each; pass a smaller --domains "
            "or a bigger table."
        )
    a, b = usable[torch.randperm(len(usable), generator=g)[:2]].tolist()
    return sample_task(concepts, a, ways, shots, g), sample_task(concepts, b, ways, shots, g)
