"""What an objective reads, computed from one batch: the trainer asks the objective for its `inputs`
and runs only the forward passes those need (token features for FILIP/LexLIP, a second image view for
TCL, every caption for multi-positive, the second caption for ALIP, the bias for SigLIP)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lipkit.errors import UserError
from lipkit.models.dual_encoder import DualEncoder

TOKENS = {"image_tokens", "text_tokens", "text_mask", "image_lexicon", "text_lexicon"}
NEEDS_SECOND_CAPTION = {"synth_features", "text_features_2"}


@functools.cache
def _hash_coefficients(length: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0x11F)
    return torch.randint(-(2**62), 2**62, (length,), generator=gen, dtype=torch.int64)


def caption_keys(ids: torch.Tensor) -> torch.Tensor:
    """(T, L) token ids → (T,) int64 keys, equal for identical token sequences (a fixed random linear
    hash, wrapping in int64; the same on every rank, so keys gathered across ranks compare)."""
    return (ids.long() * _hash_coefficients(ids.shape[1]).to(ids.device)).sum(1)


def caption_inputs(needs: set[str], n_images: int, ids: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """What a multi-caption objective reads besides features: `caption_owner` (the k captions of each
    image, image-major) and, when asked for, `caption_key` of every caption's token ids."""
    out: dict[str, torch.Tensor] = {}
    if "caption_owner" in needs:
        out["caption_owner"] = torch.arange(n_images, device=ids.device).repeat_interleave(k)
        if "caption_key" in needs:
            out["caption_key"] = caption_keys(ids)
    return out


def check_inputs(
    needs: set[str],
    captions_per_image: int,
    has_bias: bool,
    objective: str,
    has_teacher: bool = False,
    has_lexicon: bool = False,
) -> None:
    if needs & NEEDS_SECOND_CAPTION and captions_per_image < 2:
        raise UserError(
            f"Objective '{objective}' needs two captions per image; set data.captions_per_image=2."
        )
    if "caption_owner" in needs and captions_per_image < 2:
        raise UserError(
            f"Objective '{objective}' contrasts several captions per image; set "
            "data.captions_per_image to 2 or more."
        )
    if "teacher_image_features" in needs and not has_teacher:
        raise UserError(
            f"Objective '{objective}' distils from the starting model; set model.init_from to a "
            "checkpoint (or use `lipkit refine CHECKPOINT`)."
        )
    if "image_lexicon" in needs and not has_lexicon:
        raise UserError(
            f"Objective '{objective}' trains lexicon heads and this model has none; start from a model "
            "without model.init_from, or set model.overrides.lexicon_vocab (e.g. the tokenizer's vocabulary size)."
        )
    if "logit_bias" in needs and not has_bias:
        raise UserError(f"Objective '{objective}' needs a logit bias; set model.overrides.logit_bias=true.")


def objective_inputs(
    model: DualEncoder,
    needs: set[str],
    images: torch.Tensor,
    ids: torch.Tensor,
    captions_per_image: int,
    second_view: Callable[[], torch.Tensor],
    pad_id: int,
    teacher: DualEncoder | None = None,
) -> dict[str, torch.Tensor]:
    """images: (B, 3, H, W); ids: (B·k, L) image-major. Returns the named tensors the objective reads."""
    k = captions_per_image
    out: dict[str, torch.Tensor] = {"logit_scale": model.scale()}
    all_captions = "caption_owner" in needs or bool(needs & NEEDS_SECOND_CAPTION)
    text_ids = ids if all_captions else ids[::k]
    first = slice(None, None, k) if all_captions else slice(None)  # the first caption of each image
    if needs & TOKENS:
        img, img_tok = model.visual(images, return_tokens=True)
        txt, txt_tok = model.text(text_ids, return_tokens=True)
        out["image_tokens"] = F.normalize(img_tok, dim=-1)
        out["text_tokens"] = F.normalize(txt_tok[first], dim=-1)
        out["text_mask"] = (text_ids != pad_id)[first]
        if "image_lexicon" in needs:  # the model's own LexLIP heads (see DualEncoder.encode_*_lexical)
            out["image_lexicon"] = model.image_lexicon(out["image_tokens"])
            out["text_lexicon"] = model.text_lexicon(out["text_tokens"], out["text_mask"])
    else:
        img, txt = model.visual(images), model.text(text_ids)
    out["image_features"] = F.normalize(img, dim=-1)
    txt = F.normalize(txt, dim=-1)
    if "caption_owner" in needs:
        out["text_features"] = txt
        out.update(caption_inputs(needs, images.shape[0], ids, k))
    else:
        out["text_features"] = txt[first]
    if needs & NEEDS_SECOND_CAPTION:
        out["synth_features"] = out["text_features_2"] = txt[1::k]
    if "image_features_2" in needs:
        out["image_features_2"] = F.normalize(model.visual(second_view()), dim=-1)
    if "logit_bias" in needs:
        out["logit_bias"] = model.logit_bias
    if teacher is not None and "teacher_image_features" in needs:
        with torch.no_grad():
            out["teacher_image_features"] = F.normalize(teacher.visual(images), dim=-1)
            out["teacher_text_features"] = F.normalize(teacher.text(text_ids[first]), dim=-1)
            out["teacher_logit_scale"] = teacher.scale()
    return {name: value for name, value in out.items() if name in needs}
