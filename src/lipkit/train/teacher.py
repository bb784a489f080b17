"""The frozen teacher an objective learns from: a distillation teacher (`train.teacher`, `lipkit distill`)
or CLIP-Refine's starting model. It sees the student's very images — the same augmented view, moved into
its own pixel space (un-normalised with the student's mean/std, resized to its image size, normalised with
its own) — and the student's token ids (a run with a teacher uses the teacher's tokenizer). Images are
decoded at the student's size: a teacher with a larger input sees them upsampled.

Its features are cached when that cannot change them: each caption's by its token ids (always: a text
augmentation changes the ids), each image's by a hash of its pixels when augmentation is off
(`ViewMaker.no_augmentation`: the first view is then the decoded image itself). A cached row is the row
computed the first time, so a cached run equals a recomputing one up to how a batched forward rounds
(tests/test_distill.py).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Hashable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lipkit.checkpoint import load_checkpoint
from lipkit.errors import UserError
from lipkit.models.dual_encoder import DualEncoder
from lipkit.models.presets import ModelSpec
from lipkit.text.tokenizer import TextTokenizer
from lipkit.train.inputs import requires

MAX_CACHED_ROWS = 200_000  # per modality: past this, new rows are computed every time (bounded memory)


class RowCache:
    """Feature rows by key (bytes or int), filled up to `limit` rows."""

    def __init__(self, limit: int = MAX_CACHED_ROWS) -> None:
        self.rows: dict[Hashable, torch.Tensor] = {}
        self.limit = limit

    def features(self, keys: list[Hashable], compute: Callable[[list[int]], torch.Tensor]) -> torch.Tensor:
        """The rows of `keys`; those not cached computed once per distinct key by `compute(indices)`, then
        kept while the cache has room (past it, computed every time)."""
        todo = sorted({k: i for i, k in enumerate(keys) if k not in self.rows}.values())
        fresh: dict[Hashable, torch.Tensor] = {}
        if todo:
            fresh = dict(zip((keys[i] for i in todo), compute(todo), strict=True))
            if len(self.rows) + len(fresh) <= self.limit:
                self.rows.update(fresh)
        return torch.stack([self.rows[k] if k in self.rows else fresh[k] for k in keys])


def pixel_keys(images: torch.Tensor) -> list[bytes]:
    """A BLAKE2b digest of each image's pixels (one transfer per batch): equal images, equal keys."""
    rows = images.detach().float().cpu().numpy()
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in rows]


def same_pixels(a: ModelSpec, b: ModelSpec) -> bool:
    return a.image_size == b.image_size and a.image_mean == b.image_mean and a.image_std == b.image_std


class FrozenTeacher(nn.Module):
    """A frozen DualEncoder fed the student's normalised images and token ids (see the module docstring)."""

    def __init__(self, model: DualEncoder, student: ModelSpec) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.student = student
        self.cache_images = False  # the trainer turns it on when augmentation is off
        self.image_rows, self.text_rows = RowCache(), RowCache()
        self.eval()

    def train(self, mode: bool = True) -> FrozenTeacher:  # always in eval mode (BatchNorm, dropout)
        return super().train(False)

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Student-normalised (B, 3, H, W) images → the teacher's input (its size, mean and std)."""
        s, t = self.student, self.model.spec
        if same_pixels(s, t):
            return images
        mean_s, std_s, mean_t, std_t = (
            torch.tensor(v, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
            for v in (s.image_mean, s.image_std, t.image_mean, t.image_std)
        )
        x = images * std_s + mean_s  # [0, 1] pixels
        if t.image_size != images.shape[-1]:
            x = F.interpolate(x, size=(t.image_size, t.image_size), mode="bilinear", antialias=True)
        return (x - mean_t) / std_t

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        def compute(rows: list[int] | slice = slice(None)) -> torch.Tensor:
            return F.normalize(self.model.visual(self.pixels(images[rows])), dim=-1)

        return self.image_rows.features(pixel_keys(images), compute) if self.cache_images else compute()

    def text_features(self, ids: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        def compute(rows: list[int]) -> torch.Tensor:
            return F.normalize(self.model.text(ids[rows]), dim=-1)

        return self.text_rows.features(keys.tolist(), compute)

    @torch.no_grad()
    def features(
        self, images: torch.Tensor, ids: torch.Tensor, text_keys: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(normalised image features, normalised text features, logit scale), without a graph; `text_keys`
        are train.inputs.caption_keys of `ids`."""
        return self.image_features(images), self.text_features(ids, text_keys), self.model.scale()


def bound_teacher(objective: nn.Module, model: DualEncoder, teacher: DualEncoder | None) -> nn.Module | None:
    """What the inputs' teacher passes run: the objective's own momentum (EMA) copy of the model (TCL,
    RS-M-CLIP: `bind_model`), or the frozen teacher fed the student's inputs (the objective's teacher-sized
    parameters bound first: `bind_teacher`, before the optimizer is built), or None."""
    if hasattr(objective, "bind_model"):
        if teacher is not None:
            raise UserError(
                f"{type(objective).__name__} keeps its own momentum model and takes no frozen teacher; "
                "unset train.teacher."
            )
        return objective.bind_model(model)
    if teacher is None:
        return None
    if hasattr(objective, "bind_teacher"):  # e.g. the feature-distillation projections
        objective.bind_teacher(model.spec.embed_dim, teacher.spec.embed_dim)
    return FrozenTeacher(teacher, model.spec)


def load_teacher(
    path: str, objective: str, needs: set[str], context_length: int
) -> tuple[DualEncoder, TextTokenizer]:
    """`train.teacher`: the frozen model and its tokenizer (the student's, at the run's context length)."""
    if not requires(needs, "teacher"):
        raise UserError(
            f"Objective '{objective}' learns from no teacher; set train.objective=distill (as `lipkit distill` "
            "does) or unset train.teacher."
        )
    model, _, _ = load_checkpoint(path)
    limit = model.spec.context_length
    if model.spec.text_tower == "transformer" and context_length > limit:
        raise UserError(
            f"The teacher '{path}' reads at most {limit} tokens per caption; set tokenizer.context_length={limit}."
        )
    return model, TextTokenizer.load(Path(path).expanduser() / "tokenizer.json", context_length)


def check_same_tokenizer(teacher: TextTokenizer, other: TextTokenizer, what: str) -> None:
    """A student shares its teacher's token ids: refuse a starting model or text tower that tokenises
    differently (the tokenizers compared without their padding and truncation: context lengths may differ)."""

    def core(tok: TextTokenizer) -> dict:
        spec = json.loads(tok.tok.to_str())
        return {k: v for k, v in spec.items() if k not in ("padding", "truncation")}

    if core(teacher) != core(other):
        raise UserError(
            f"The teacher's tokenizer differs from the one of {what}; a student reads its teacher's token ids: "
            f"unset {what} or pick a teacher with the same tokenizer."
        )
