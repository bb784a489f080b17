"""What an objective reads, computed from one batch: the trainer asks the objective for its `inputs`
and runs only the forward passes those need (token features for FILIP/LexLIP, a second image view for
TCL, every caption for multi-positive, the second caption for ALIP, the bias for SigLIP, the frozen
teacher for distillation and CLIP-Refine).

`INPUTS` is the one registry of those inputs: for each name, how it is computed from a batch, how it
is made global across ranks (train.distributed.gather_inputs), how gradient caching handles it
(train.grad_cache) and what the run must provide for it (`check_inputs`). Nothing else lists them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from lipkit.errors import UserError
from lipkit.models.dual_encoder import DualEncoder
from lipkit.models.matching_head import trim_text
from lipkit.train.batch_pass import BatchPass, caption_keys, sample_ids
from lipkit.train.views import Views

DEFAULT_INPUTS = ("image_features", "text_features", "logit_scale")  # an objective without `inputs`


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


def _labels(kind: str) -> Callable[[BatchPass], torch.Tensor]:
    def compute(p: BatchPass) -> torch.Tensor:
        assert kind in p.labels, "check_inputs refuses a labels input without those labels"
        return p.labels[kind].lookup(p.key_ids())

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
    # each image's captions after its first, (B, k − 1, D): a clip's script sentences in time order
    "script_features": Input(
        lambda p: p.text[0].unflatten(0, (-1, p.k))[:, 1:],
        "grad",
        None,
        every_caption=True,
        requires="script",
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
    # each frame's state in the temporal head of clips (B, T, D), not normalised (EZ-CLIP's motion loss, VDI)
    "frame_features": Input(lambda p: p.frames, "grad", None),
    "image_tokens": Input(lambda p: p.image[1], "grad", "chunk", tokens="image"),
    "text_tokens": Input(lambda p: p.text[1], "grad", "chunk", tokens="text"),
    "text_mask": Input(lambda p: p.text_mask, "plain", "batch"),
    # the model's own LexLIP heads (see DualEncoder.encode_*_lexical)
    "image_lexicon": Input(
        lambda p: p.model.image_lexicon(p.image[1]), "grad", "chunk", tokens="image", requires="lexicon"
    ),
    "text_lexicon": Input(  # padding columns after the longest caption dropped first: exact, ~2.5× less work
        lambda p: p.model.text_lexicon(*trim_text(p.text[1], p.text_mask)),
        "grad",
        "chunk",
        tokens="text",
        requires="lexicon",
    ),
    # the first captions' token ids, and the model itself: the masked-language objectives (LexLIP's stage,
    # objectives.lexicon_bottleneck; UNITER's MLM in objectives.itm) re-encode masked copies of the global
    # batch's captions on every rank and read its heads; the same module everywhere, not gathered or cached
    "text_ids": Input(lambda p: p.text_ids[p.first], "plain", "batch"),
    "model": Input(lambda p: p.model, None, None),
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
    # each image's concepts (train.concepts, from a list column of phrases of the caption): features pooled from
    # the first caption's token features over each concept's tokens (B, K, D; zero rows invalid) and validity
    "concept_features": Input(lambda p: p.concepts[0], "grad", None, tokens="text", requires="concepts"),
    "concept_valid": Input(lambda p: p.concepts[1], "plain", "batch", tokens="text", requires="concepts"),
    # the caption decoder's teacher-forced loss of each first caption (summed NLL, (B,)) and its token count
    "caption_nll": Input(lambda p: p.caption[0], "grad", None, tokens="image", requires="captioner"),
    "caption_tokens": Input(lambda p: p.caption[1], "plain", "batch", tokens="image", requires="captioner"),
    # a text-only decoder's loss on each first caption's noised text embedding (objectives.capdec), its count
    "text_caption_nll": Input(lambda p: p.text_caption[0], "grad", None, requires="text_captioner"),
    "text_caption_tokens": Input(lambda p: p.text_caption[1], "plain", "batch", requires="text_captioner"),
    # a prefix decoder's (models.prefix_decoder) loss on each first caption: alone, no image (objectives.vpgtrans
    # text_lm pre-trains its language model), and given its image's soft prompts (the connector trains); counts
    "lm_nll": Input(lambda p: p.language_model[0], "grad", None, requires="prefix_captioner"),
    "lm_tokens": Input(lambda p: p.language_model[1], "plain", "batch", requires="prefix_captioner"),
    "prefix_caption_nll": Input(
        lambda p: p.caption[0], "grad", None, tokens="image", requires="prefix_captioner"
    ),
    "prefix_caption_tokens": Input(
        lambda p: p.caption[1], "plain", "batch", tokens="image", requires="prefix_captioner"
    ),
    # the model's image–text matching head itself (objectives.itm fuses the pairs it mines from the global
    # batch's tokens): the same module on every rank, not gathered; gradient caching cannot chunk it
    "match_head": Input(lambda p: p.model.matcher, None, None, requires="matcher"),
    # each image's stable sample id (from its record key): per-sample state such as NEVLP's loss history
    "sample_key": Input(lambda p: p.key_ids(), "plain", "batch"),
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
    "concept_features",
    "concept_valid",
    "text_caption_nll",  # its noise is drawn per sample key (objectives.capdec)
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
    "script": (
        lambda s: s["captions"] >= 3,
        "orders each clip's script (its caption, then 2 or more sentences in time order); set data.caption_column "
        "to the script column and data.captions_per_image to 1 + its sentences (e.g. 4).",
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
    "captioner": (
        lambda s: s["captioner"] in ("tokens", "text"),
        "trains a caption decoder reading image tokens and this model has none or another kind; with "
        "model.init_from, name a checkpoint without a decoder (lipkit train adds one).",
    ),
    "text_captioner": (
        lambda s: s["captioner"] == "embedding",
        "trains a text-only caption decoder and this model has none or one reading image tokens; set "
        "model.init_from to a trained checkpoint without a decoder (not a CoCa one).",
    ),
    "prefix_captioner": (
        lambda s: s["captioner"] == "prefix",
        "trains a language model that reads images as soft prompts and this model has another decoder; set "
        "model.init_from to a trained checkpoint without one (text_lm) or to a text_lm run's (connector).",
    ),
    "matcher": (
        lambda s: s["matcher"],
        "trains an image–text matching head and this model has none; with model.init_from, lipkit train adds "
        "one to the starting checkpoint.",
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
    "concepts": (
        lambda s: "concepts" in s["labels"],
        "aligns image patches with the concepts of each caption; train on a table with a column of caption "
        "phrases per row (the objective's concepts_column).",
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
    captioner: str = "",
    matcher: bool = False,
) -> None:
    """Refuse an objective whose inputs this run cannot give. captioner: what the model's caption decoder
    reads ("tokens", "embedding", "prefix"; "": none); matcher: whether it has an image–text matching head."""
    setup = {"captions": captions_per_image, "bias": has_bias, "teacher": has_teacher, "lexicon": has_lexicon}
    setup["captioner"], setup["matcher"] = captioner, matcher
    setup["labels"] = set(labels)  # the kinds of per-sample labels the run has
    for what, (present, fix) in _REQUIREMENTS.items():
        if requires(needs, what) and not present(setup):
            raise UserError(f"Objective '{objective}' {fix}")


def check_patch_tokens(needs: set[str], has_grid: bool, objective: str) -> None:
    """Refuse an objective reading the image tower's tokens as patches when they are an attentional pooler's
    queries (OpenCLIP's CoCa towers): only a caption decoder reads those."""
    readers = sorted(n for n in needs if INPUTS[n].tokens == "image" and "caption" not in n)
    if readers and not has_grid:
        raise UserError(
            f"Objective '{objective}' reads the image tower's patch tokens ({', '.join(readers)}), and this model's "
            "tower ends in an attentional pooler (model vision_attn_pool, OpenCLIP's CoCa) whose tokens are "
            "queries; use another objective or a model without the pooler."
        )


def check_not_adapted(model: DualEncoder | None, setting: str) -> None:
    """Refuse to train from (or distil from) a checkpoint holding a `lipkit adapt` adapter: training runs
    the towers alone and would silently drop it."""
    if model is not None and model.spec.adapter:
        raise UserError(
            f"{setting} holds a {model.spec.adapter.get('method')} adapter from `lipkit adapt`, which training "
            "would drop; name the checkpoint it was adapted from (its config.json `adapted.from`) instead."
        )


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
    step: int = 0,
) -> dict[str, torch.Tensor]:
    """images: (B, 3, H, W); ids: (B·k, L) image-major; keys: (B,) sample ids. Returns the named tensors the objective reads
    (`needs`; or only the names `only` of them, laid out as for all of `needs`), in registry order."""
    p = BatchPass(
        model,
        needs,
        [INPUTS[n] for n in needs],
        images,
        ids,
        captions_per_image,
        views,
        pad_id,
        teacher,
        keys,
        labels,
        step,
    )
    wanted = needs if only is None else only
    return {name: entry.compute(p) for name, entry in INPUTS.items() if name in wanted}
