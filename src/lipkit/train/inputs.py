"""What an objective reads, computed from one batch: the trainer asks the objective for its `inputs`
and runs only the forward passes those need (token features for FILIP/LexLIP, a second image view for
TCL, every caption for multi-positive, the second caption for ALIP, the bias for SigLIP, the frozen
teacher for distillation and CLIP-Refine).

`INPUTS` is the one registry of those inputs: for each name, how it is computed from a batch, how it
is made global across ranks (train.distributed.gather_inputs), how gradient caching handles it
(train.grad_cache) and what the run must provide for it (`check_inputs`). Nothing else lists them.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from lipkit.errors import UserError
from lipkit.models.dual_encoder import DualEncoder
from lipkit.models.regions import region_pool
from lipkit.train.views import Views

DEFAULT_INPUTS = ("image_features", "text_features", "logit_scale")  # an objective without `inputs`


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
    images: (B, 3, H, W); ids: (B·k, L), the k captions of each image, image-major; keys: (B,) sample
    ids (train.inputs.sample_ids) or None where the caller has none."""

    def __init__(
        self,
        model: DualEncoder,
        needs: set[str],
        images: torch.Tensor,
        ids: torch.Tensor,
        k: int,
        views: Views,
        pad_id: int,
        teacher: DualEncoder | None,
        keys: torch.Tensor | None = None,
        labels: Any = None,
    ) -> None:
        self.model, self.images, self.ids, self.k, self.keys = model, images, ids, k, keys
        self.needs = needs
        self.labels = labels or {}  # kind ("clusters", "columns") → SampleLabels; "regions" → RegionTable
        self.views, self.pad_id, self.teacher = views, pad_id, teacher
        entries = [INPUTS[name] for name in needs]
        self.image_tokens = any(e.tokens == "image" for e in entries)  # a tower's tokens only when read
        self.text_tokens = any(e.tokens == "text" for e in entries)
        encode_all = any(e.every_caption for e in entries)
        self.text_ids = ids if encode_all else ids[::k]
        self.first = slice(None, None, k) if encode_all else slice(None)  # the first caption of each image
        # text features of every caption (image-major) or of the first caption of each image
        self.text_rows = slice(None) if any(e.per_caption for e in entries) else self.first

    @functools.cached_property
    def image_out(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The image tower's pooled features and (when asked for) token features, not normalised."""
        if self.image_tokens:
            return self.model.visual(self.images, return_tokens=True)
        return self.model.visual(self.images), None

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
        boxes, ids, valid = self.labels["regions"].lookup(_keys(self))
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


Gather = Literal["grad", "plain", "owner"]
Cache = Literal["chunk", "batch"]


@dataclass(frozen=True)
class Input:
    """One per-batch tensor an objective may read.

    compute: the tensor, from the batch's forward passes.
    gather: how ranks make it global (None: the same on every rank, e.g. the logit scale) — "grad":
        all-gathered with gradient (features); "plain": all-gathered without (ints, bools, frozen
        features); "owner": image indices, offset by rank·local batch, then gathered plainly.
    cache: how gradient caching handles it (None: it cannot) — "chunk": embedded chunk by chunk with its
        gradient cached (a float tensor with one or more rows per image, image-major); "batch": computed
        once for the whole batch (parameters, token ids, the frozen teacher).
    tokens / every_caption / per_caption: it needs that tower's token outputs / every caption encoded /
        `text_features` to hold every caption instead of the first of each image.
    view: the extra image view it needs: "second" (a second random augmentation of the images) or "local"
        (small random crops, as many per image as the objective's `local_crops`; train.views).
    requires: what the run must provide (a key of `_REQUIREMENTS`).
    """

    compute: Callable[[BatchPass], torch.Tensor]
    gather: Gather | None
    cache: Cache | None
    tokens: Literal["image", "text"] | None = None
    every_caption: bool = False
    per_caption: bool = False
    requires: str | None = None
    view: Literal["second", "local"] | None = None


def _keys(p: BatchPass) -> torch.Tensor:
    if p.keys is None:  # a programming error: the trainer passes every batch's record keys
        raise ValueError(
            "this objective reads the samples' keys: pass the batch's record keys to Trainer.step"
        )
    return p.keys


def _labels(kind: str) -> Callable[[BatchPass], torch.Tensor]:
    def compute(p: BatchPass) -> torch.Tensor:
        assert kind in p.labels, "check_inputs refuses a labels input without those labels"
        return p.labels[kind].lookup(_keys(p))

    return compute


def _owners(p: BatchPass) -> torch.Tensor:
    return torch.arange(p.images.shape[0], device=p.ids.device).repeat_interleave(p.k)


INPUTS: dict[str, Input] = {
    "image_features": Input(lambda p: p.image[0], "grad", "chunk"),
    "text_features": Input(lambda p: p.text[0][p.text_rows], "grad", "chunk"),
    "logit_scale": Input(lambda p: p.model.scale(), None, "batch"),
    "logit_bias": Input(lambda p: p.model.logit_bias, None, "batch", requires="bias"),
    "caption_owner": Input(
        _owners, "owner", "batch", every_caption=True, per_caption=True, requires="captions"
    ),
    "caption_key": Input(
        lambda p: caption_keys(p.ids),
        "plain",
        "batch",
        every_caption=True,
        per_caption=True,
        requires="captions",
    ),
    # the key of each text_features row's token ids: identical captions have equal keys (UniME's mask)
    "text_key": Input(lambda p: caption_keys(p.text_ids[p.text_rows]), "plain", "batch"),
    "synth_features": Input(
        lambda p: p.text[0][1 :: p.k], "grad", "chunk", every_caption=True, requires="two"
    ),
    "text_features_2": Input(
        lambda p: p.text[0][1 :: p.k], "grad", "chunk", every_caption=True, requires="two"
    ),
    "image_features_2": Input(
        lambda p: F.normalize(p.model.visual(p.views.second), dim=-1), "grad", "chunk", view="second"
    ),
    # the local crops' features (B·L, D), image-major: image i's L crops are rows i·L … i·L + L − 1
    "image_features_local": Input(
        lambda p: F.normalize(p.model.visual(p.views.local.flatten(0, 1)), dim=-1),
        "grad",
        "chunk",
        view="local",
    ),
    "image_tokens": Input(lambda p: p.image[1], "grad", "chunk", tokens="image"),
    "text_tokens": Input(lambda p: p.text[1], "grad", "chunk", tokens="text"),
    "text_mask": Input(lambda p: p.text_mask, "plain", "batch"),
    # the model's own LexLIP heads (see DualEncoder.encode_*_lexical)
    "image_lexicon": Input(
        lambda p: p.model.image_lexicon(p.image[1]), "grad", "chunk", tokens="image", requires="lexicon"
    ),
    "text_lexicon": Input(
        lambda p: p.model.text_lexicon(p.text[1], p.text_mask),
        "grad",
        "chunk",
        tokens="text",
        requires="lexicon",
    ),
    # the frozen teacher (train.teacher; CLIP-Refine's starting model): no gradient, so gathered plainly and
    # computed once
    "teacher_image_features": Input(lambda p: p.frozen[0], "plain", "batch", requires="teacher"),
    "teacher_text_features": Input(lambda p: p.frozen[1], "plain", "batch", requires="teacher"),
    "teacher_logit_scale": Input(lambda p: p.frozen[2], None, "batch", requires="teacher"),
    # the objective's momentum (EMA) model (TCL, RS-M-CLIP): the image views' features (and the second's
    # tokens), the first captions' features and tokens; no gradient, so gathered plainly and computed once
    "momentum_image_features": Input(lambda p: p.momentum_image, "plain", "batch"),
    "momentum_image_features_2": Input(lambda p: p.momentum_image_2[0], "plain", "batch", view="second"),
    "momentum_image_tokens_2": Input(lambda p: p.momentum_image_2[1], "plain", "batch", view="second"),
    "momentum_text_features": Input(lambda p: p.momentum_text[0], "plain", "batch"),
    "momentum_text_tokens": Input(lambda p: p.momentum_text[1], "plain", "batch"),
    "momentum_text_mask": Input(lambda p: p.text_mask, "plain", "batch"),  # = text_mask
    # each image's regions (train.regions, from two list columns of the table): region and region-caption
    # features (B, R, D; zero rows are padding), their validity and caption keys (B, R)
    "region_features": Input(lambda p: p.regions[0], "grad", None, tokens="image", requires="regions"),
    "region_text_features": Input(lambda p: p.regions[1], "grad", None, tokens="image", requires="regions"),
    "region_valid": Input(lambda p: p.regions[2], "plain", "batch", requires="regions"),
    "region_text_key": Input(lambda p: p.regions[3], "plain", "batch", requires="regions"),
    # each image's stable sample id (from its record key): per-sample state such as NEVLP's loss history
    "sample_key": Input(lambda p: _keys(p), "plain", "batch"),
    # each image's cluster labels (B, L; −1: none) from data.cluster_labels (train.sample_labels)
    "cluster_labels": Input(_labels("clusters"), "plain", "batch", requires="clusters"),
    # each image's class index in each table column the objective names (B, C; −1: none): PLIP's identity and
    # attributes (train.sample_labels.SampleLabels.from_records)
    "column_labels": Input(_labels("columns"), "plain", "batch", requires="columns"),
}

KEYED = {
    "sample_key",
    "cluster_labels",
    "column_labels",
    "region_features",
    "region_text_features",
    "region_valid",
    "region_text_key",
}  # the inputs made from the records' keys (Trainer.step passes them)
SECOND_VIEW = {name for name, entry in INPUTS.items() if entry.view == "second"}  # train.views
LOCAL_VIEW = {name for name, entry in INPUTS.items() if entry.view == "local"}


def keyed_ids(keys: list[str] | None, needs: set[str], device: torch.device) -> torch.Tensor | None:
    """The batch's sample ids (`sample_ids`) when one of `needs` is made from them, else None."""
    return sample_ids(keys, device) if keys is not None and needs & KEYED else None


# what the run must provide, checked in this order: (is it there?, the rest of the one-sentence refusal)
_REQUIREMENTS: dict[str, tuple[Callable[[dict[str, Any]], bool], str]] = {
    "two": (lambda s: s["captions"] >= 2, "needs two captions per image; set data.captions_per_image=2."),
    "captions": (
        lambda s: s["captions"] >= 2,
        "contrasts several captions per image; set data.captions_per_image to 2 or more.",
    ),
    "teacher": (
        lambda s: s["teacher"],
        "learns from a frozen teacher; set train.teacher to a checkpoint (`lipkit distill TEACHER`), or "
        "model.init_from to distil from the starting model (`lipkit refine CHECKPOINT`).",
    ),
    "lexicon": (
        lambda s: s["lexicon"],
        "trains lexicon heads and this model has none; start from a model without model.init_from, or set "
        "model.overrides.lexicon_vocab (e.g. the tokenizer's vocabulary size).",
    ),
    "bias": (lambda s: s["bias"], "needs a logit bias; set model.overrides.logit_bias=true."),
    "clusters": (
        lambda s: "clusters" in s["labels"],
        "needs cluster labels; set data.cluster_labels to a folder of `lipkit data cluster --labels L`.",
    ),
    "regions": (
        lambda s: "regions" in s["labels"],
        "aligns regions with text; train on a table with box and region-caption columns "
        "(`lipkit data build canvases` writes boxes and object_captions).",
    ),
    "columns": (
        lambda s: "columns" in s["labels"],
        "reads table columns per sample; train on a table (JSONL, CSV, parquet) that has them.",
    ),
}


def objective_needs(objective: Any) -> set[str]:
    """The inputs `objective` reads (its `inputs` attribute), each one registered in `INPUTS`."""
    needs = set(getattr(objective, "inputs", DEFAULT_INPUTS))
    unknown = needs - INPUTS.keys()
    if unknown:  # a programming error in an objective, not the user's
        raise ValueError(f"{type(objective).__name__} reads unregistered inputs {sorted(unknown)}")
    return needs


def requires(needs: Iterable[str], what: str) -> bool:
    """Whether any of `needs` requires `what` (a key of `_REQUIREMENTS`: "teacher", "bias", ...)."""
    return any(INPUTS[name].requires == what for name in needs)


def check_inputs(
    needs: set[str],
    captions_per_image: int,
    has_bias: bool,
    objective: str,
    has_teacher: bool = False,
    has_lexicon: bool = False,
    labels: Iterable[str] = (),
) -> None:
    setup = {"captions": captions_per_image, "bias": has_bias, "teacher": has_teacher, "lexicon": has_lexicon}
    setup["labels"] = set(labels)  # the kinds of per-sample labels the run has
    for what, (present, fix) in _REQUIREMENTS.items():
        if requires(needs, what) and not present(setup):
            raise UserError(f"Objective '{objective}' {fix}")


def objective_inputs(
    model: DualEncoder,
    needs: set[str],
    images: torch.Tensor,
    ids: torch.Tensor,
    captions_per_image: int,
    views: Views,
    pad_id: int,
    teacher: DualEncoder | None = None,
    only: set[str] | None = None,
    keys: torch.Tensor | None = None,
    labels: Any = None,
) -> dict[str, torch.Tensor]:
    """images: (B, 3, H, W); ids: (B·k, L) image-major; keys: (B,) sample ids. Returns the named tensors the objective reads
    (`needs`; or only the names `only` of them, laid out as for all of `needs`), in registry order."""
    p = BatchPass(model, needs, images, ids, captions_per_image, views, pad_id, teacher, keys, labels)
    wanted = needs if only is None else only
    return {name: entry.compute(p) for name, entry in INPUTS.items() if name in wanted}
