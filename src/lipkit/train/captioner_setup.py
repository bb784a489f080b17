"""A caption decoder for the objectives that train one (objectives.coca reads image tokens,
objectives.capdec one embedding, objectives.vpgtrans soft prompts): its settings on a new model, a fresh
one on a starting checkpoint (`model.init_from`), and a text-only decoder's noise level measured from the
modality gap (the prefix decoder's stages: train.connector_setup)."""

from __future__ import annotations

import os
from typing import Any

import rich
import torch

from lipkit.data.image_store import ImageStore
from lipkit.data.records import spread_subset
from lipkit.errors import UserError
from lipkit.eval.embedding import embed_images, embed_texts
from lipkit.models.dual_encoder import DualEncoder
from lipkit.text.tokenizer import TextTokenizer
from lipkit.train.inputs import requires

CAPTION_LAYERS = 2  # the caption decoder's depth when an objective needs one and the config names none
GAP_PAIRS = 1024  # training pairs the modality gap is measured on


def caption_reads(needs: set[str], overrides: dict[str, Any]) -> str:
    """What the decoder the objective trains reads: "tokens" (or, asked for, OpenCLIP CoCa's "text"),
    "embedding", "prefix", or "" (no decoder)."""
    if requires(needs, "text_captioner"):
        return "embedding"
    if requires(needs, "prefix_captioner"):
        return "prefix"
    if not requires(needs, "captioner"):
        return ""
    return "text" if overrides.get("caption_input") == "text" else "tokens"


def new_model_settings(needs: set[str], overrides: dict[str, Any]) -> dict[str, Any]:
    """The ModelSpec settings a new model gets for the objective's decoder (none when it trains none)."""
    reads = caption_reads(needs, overrides)
    if not reads:
        return {}
    fixed: dict[str, Any] = {"caption_input": reads}
    if not overrides.get("caption_layers"):
        fixed["caption_layers"] = CAPTION_LAYERS
    return fixed


def attach_captioner(model: DualEncoder, needs: set[str], overrides: dict[str, Any]) -> bool:
    """A fresh decoder on a starting model that has none (its towers typically locked); whether it added one."""
    reads = caption_reads(needs, overrides)
    if not reads or model.has_captioner:
        return False
    model.add_captioner(
        overrides.get("caption_layers") or CAPTION_LAYERS,
        overrides.get("caption_width", 0),
        overrides.get("caption_heads", 4),
        reads,
        overrides.get("caption_queries", 8),
    )
    return True


@torch.no_grad()
def modality_gap_std(model: DualEncoder, tokenizer: TextTokenizer, records: list) -> float:
    """√(mean_i ‖x_i − t_i‖² / D) over up to GAP_PAIRS records spread over `records`: x the normalised image
    embedding, t the normalised embedding of the record's first caption."""
    chosen = [r for r in spread_subset(records, GAP_PAIRS) if r.captions]
    if not chosen:
        raise UserError("The training data has no captions to measure the modality gap on.")
    was_training = model.training
    model.eval()
    store = ImageStore(chosen, model.spec.image_size, cache=True, desc="modality-gap")
    img = embed_images(model, store, 64)
    txt = embed_texts(model, tokenizer, [r.captions[0] for r in store.records], 256)
    model.train(was_training)
    return ((img - txt) ** 2).sum(1).mean().div(img.shape[1]).sqrt().item()


def prepare_text_only(
    model: DualEncoder, objective: Any, tokenizer: TextTokenizer, data: Any, cfg: Any, resume: Any
) -> None:
    """A text-only decoder's run (objectives.capdec): a trained starting model is required, both towers
    are locked whole, and the noise σ is the number given or, for "gap", measured from the modality gap
    on the training records (rank 0's value on every rank). A resumed run keeps its checkpoint's σ."""
    if not model.has_captioner or model.spec.caption_input != "embedding":
        return
    if not cfg.model.init_from:
        raise UserError(
            f"Objective '{cfg.train.objective}' trains a decoder on a trained model's text embeddings; set "
            "model.init_from to a checkpoint (e.g. runs/demo/checkpoint after `make demo`)."
        )
    if (cfg.train.lock_image, cfg.train.lock_text) != ("all", "all"):
        _note("capdec: both towers locked whole (train.lock_image=all, train.lock_text=all)")
    model.lock("image", "all")
    model.lock("text", "all")
    if resume is not None:
        return
    std = getattr(objective, "noise_std", "gap")
    if std == "gap":
        records = getattr(data, "records", None)
        if not records:
            raise UserError(
                "noise_std: gap measures the modality gap on the training table's pairs, and this source "
                "streams shards; set train.objective_args.noise_std to a number (e.g. 0.1)."
            )
        std = modality_gap_std(model, tokenizer, records)
    value = torch.tensor(float(std))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_backend() == "nccl":
            value = value.to(model.device if model.device.type == "cuda" else "cuda")
        torch.distributed.broadcast(value, src=0)  # every rank rank 0's σ, bit for bit
    model.captioner.noise_std.fill_(value.item())
    if getattr(objective, "noise_std", "gap") == "gap":
        _note(f"capdec: the modality gap gives noise σ = {value.item():.4f}")


def _note(text: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        rich.get_console().print(f"[yellow]{text}[/]", highlight=False)
