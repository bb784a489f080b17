"""One batch's forward passes for train.inputs' registry (`BatchPass`: each tower run at most once, only
for what the objective reads), and the keys it makes: caption keys from token ids, sample ids from the
records' keys.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

from lipkit.errors import UserError
from lipkit.models.caption_decoder import caption_nll
from lipkit.models.dual_encoder import DualEncoder
from lipkit.models.regions import region_pool, require_patch_grid
from lipkit.objectives.capdec import sample_noise
from lipkit.train.views import Views


@functools.cache
def _hash_coefficients(length: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0x11F)
    return torch.randint(-(2**62), 2**62, (length,), generator=gen, dtype=torch.int64)


def caption_keys(ids: torch.Tensor) -> torch.Tensor:
    """(T, L) token ids → (T,) int64 keys, equal for identical token sequences (a fixed random linear
    hash, wrapping in int64; the same on every rank, so keys gathered across ranks compare)."""
    return (ids.long() * _hash_coefficients(ids.shape[1]).to(ids.device)).sum(1)


def sample_ids(keys: Iterable[str], device: torch.device | str = "cpu") -> torch.Tensor:
    """The records' keys (strings, stable across epochs, resumes and ranks) → (B,) int64 sample ids: the
    first 8 bytes of each key's BLAKE2b digest (a noise-robust objective keeps per-sample state by them)."""
    ids = [
        int.from_bytes(
            hashlib.blake2b(k.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little", signed=True
        )
        for k in keys
    ]
    return torch.tensor(ids, dtype=torch.int64, device=device)


class BatchPass:
    """One batch's forward passes, each run at most once and only when an input asks for it.
    needs: the input names the objective reads; entries: their train.inputs.Input entries (which passes they
    need: tower tokens, every caption, per-caption text features).
    images: (B, 3, H, W); ids: (B·k, L), the k captions of each image, image-major; keys: (B,) sample
    ids (sample_ids) or None where the caller has none."""

    def __init__(
        self,
        model: DualEncoder,
        needs: set[str],
        entries: list[Any],
        images: torch.Tensor,
        ids: torch.Tensor,
        k: int,
        views: Views,
        pad_id: int,
        teacher: DualEncoder | None,
        keys: torch.Tensor | None = None,
        labels: Any = None,
        step: int = 0,
    ) -> None:
        self.model, self.images, self.ids, self.k, self.keys = model, images, ids, k, keys
        self.step = step  # the optimiser step (seeds per-sample noise: objectives.capdec)
        self.needs = needs
        self.labels = (
            labels or {}
        )  # "clusters"/"columns" → SampleLabels; "regions" → RegionTable; "concepts" → ConceptTable
        self.views, self.pad_id, self.teacher = views, pad_id, teacher
        self.image_tokens = any(e.tokens == "image" for e in entries)  # a tower's tokens only when read
        self.text_tokens = any(e.tokens == "text" for e in entries)
        encode_all = any(e.every_caption for e in entries)
        self.text_ids = ids if encode_all else ids[::k]
        self.first = slice(None, None, k) if encode_all else slice(None)  # the first caption of each image
        # text features of every caption (image-major) or of the first caption of each image
        self.text_rows = slice(None) if any(e.per_caption for e in entries) else self.first

    def key_ids(self) -> torch.Tensor:
        """The batch's sample ids; a programming error when the caller passed none."""
        if self.keys is None:  # the trainer passes every batch's record keys
            raise ValueError(
                "this objective reads the samples' keys: pass the batch's record keys to Trainer.step"
            )
        return self.keys

    @functools.cached_property
    def image_out(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The image tower's pooled features and (when asked for) token features, not normalised."""
        if self.images.dim() == 5 and not self.image_tokens:  # clips: their frames' states once, then pooled
            return self.model.temporal.pool(self.frames), None
        return self.model.image_features(
            self.images, return_tokens=self.image_tokens
        )  # refuses clips' tokens

    @functools.cached_property
    def frames(self) -> torch.Tensor:
        """(B, T, D) the temporal head's states of each frame of the clips — what it pools —, not normalised
        (EZ-CLIP's motion loss, VDI's dynamics)."""
        if self.images.dim() != 5:
            raise UserError(
                "This objective reads each frame's features; train it on clips (a `frames` column, or shards of clips)."
            )
        return self.model.frame_states(self.images)

    @functools.cached_property
    def image(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalised pooled features and (when asked for) token features of the images."""
        img, tok = self.image_out
        return F.normalize(img, dim=-1), None if tok is None else F.normalize(tok, dim=-1)

    @functools.cached_property
    def regions(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each image's regions (train.regions.RegionTable, padded to R): normalised region features pooled
        from the image tokens (models.regions) and normalised features of their captions, (B, R, D) each,
        zero where a region is padding; the (B, R) validity and (B, R) caption keys."""
        assert "regions" in self.labels, "check_inputs refuses a regions input without regions"
        require_patch_grid(self.model.spec, "Training on regions")
        boxes, ids, valid = self.labels["regions"].lookup(self.key_ids())
        (b, r), flat = valid.shape, valid.reshape(-1)
        image_of = torch.arange(b, device=boxes.device).repeat_interleave(r)
        rois = torch.cat([image_of[:, None].to(boxes.dtype), boxes.reshape(-1, 4)], dim=1)[flat]
        tokens = self.image_out[1]
        assert tokens is not None, "region inputs ask for the image tokens"
        region = F.normalize(region_pool(tokens, rois), dim=-1)
        ids = ids.reshape(b * r, -1)
        text = F.normalize(self.model.text(ids[flat]), dim=-1) if flat.any() else region  # none: (0, D)
        out = []
        for feats in (region, text):
            full = feats.new_zeros(b * r, feats.shape[1])
            out.append(full.index_put((flat,), feats).reshape(b, r, -1))
        return out[0], out[1], valid, caption_keys(ids).reshape(b, r)

    @functools.cached_property
    def concepts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each image's concepts (train.concepts.ConceptTable, padded to K): normalised features pooled from
        its first caption's normalised token features over the tokens spelling each concept, (B, K, D) and
        zero where the caption does not spell it; the (B, K) validity."""
        assert "concepts" in self.labels, "check_inputs refuses a concepts input without concepts"
        weights, valid = self.labels["concepts"].pooling(self.key_ids(), self.text_ids[self.first])
        tokens = self.text[1]
        assert tokens is not None, "concept inputs ask for the text tokens"
        pooled = F.normalize(weights.to(tokens.dtype) @ tokens, dim=-1)
        return pooled * valid[..., None].to(pooled.dtype), valid

    @functools.cached_property
    def caption(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The caption decoder's teacher-forced (B,) summed NLL of each first caption given its image's
        normalised tokens (unnormalised for OpenCLIP's CoCa layout, `caption_input: text`), and (B,) its
        predicted-token counts (models.caption_decoder.caption_nll)."""
        tokens = self.image_out[1] if self.model.spec.caption_input == "text" else self.image[1]
        assert tokens is not None, "caption inputs ask for the image tokens"
        return caption_nll(self.model.caption_reader, self.text_ids[self.first], tokens, self.pad_id)

    @functools.cached_property
    def language_model(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A prefix decoder's (models.prefix_decoder) teacher-forced (B,) summed NLL of each first caption
        with no image, and (B,) counts: its language model alone (objectives.vpgtrans text_lm)."""
        return caption_nll(self.model.captioner, self.text_ids[self.first], None, self.pad_id)

    @functools.cached_property
    def text_caption(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A text-only decoder's (objectives.capdec) teacher-forced (B,) summed NLL of each first caption
        given its own normalised text embedding (detached) plus noise of the decoder's σ, and (B,) counts."""
        decoder = self.model.captioner
        feats = self.text[0][self.first].detach()
        noise = sample_noise(self.key_ids(), self.step, feats.shape[1]).to(feats.device, feats.dtype)
        cond = feats + decoder.noise_std.clamp(min=0).to(feats.dtype) * noise
        return caption_nll(decoder, self.text_ids[self.first], cond[:, None, :], self.pad_id)

    @functools.cached_property
    def text(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalised pooled features of every encoded caption and the first captions' token features."""
        if self.text_tokens:
            txt, tok = self.model.text(self.text_ids, return_tokens=True)
            return F.normalize(txt, dim=-1), F.normalize(tok[self.first], dim=-1)
        return F.normalize(self.model.text(self.text_ids), dim=-1), None

    @functools.cached_property
    def text_mask(self) -> torch.Tensor:
        return (self.text_ids != self.pad_id)[self.first]

    @functools.cached_property
    def frozen(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The frozen teacher's (image features, first captions' features, logit scale), without a graph;
        cached per caption and (augmentation off) per image (train.teacher.FrozenTeacher)."""
        assert self.teacher is not None, "check_inputs refuses a teacher input without a teacher"
        ids = self.text_ids[self.first]
        return self.teacher.features(self.images, ids, caption_keys(ids))  # train.teacher

    @functools.cached_property
    def momentum_image(self) -> torch.Tensor:
        """The momentum (EMA) model's normalised features of the first view, without a graph; the objective
        keeps that model (TCL's, RS-M-CLIP's teacher)."""
        assert self.teacher is not None, "the objective binds its momentum model before training"
        with torch.no_grad():
            return F.normalize(self.teacher.visual(self.images), dim=-1)

    @functools.cached_property
    def momentum_image_2(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The momentum model's normalised features and (when read) tokens of the second view, no graph."""
        assert self.teacher is not None, "the objective binds its momentum model before training"
        with torch.no_grad():
            if "momentum_image_tokens_2" not in self.needs:
                return F.normalize(self.teacher.visual(self.views.second), dim=-1), None
            img, tok = self.teacher.visual(self.views.second, return_tokens=True)
            return F.normalize(img, dim=-1), F.normalize(tok, dim=-1)

    @functools.cached_property
    def momentum_text(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The momentum model's normalised features and (when read) tokens of the first captions, no graph."""
        assert self.teacher is not None, "the objective binds its momentum model before training"
        with torch.no_grad():
            ids = self.text_ids[self.first]
            if "momentum_text_tokens" not in self.needs:
                return F.normalize(self.teacher.text(ids), dim=-1), None
            txt, tok = self.teacher.text(ids, return_tokens=True)
            return F.normalize(txt, dim=-1), F.normalize(tok, dim=-1)
