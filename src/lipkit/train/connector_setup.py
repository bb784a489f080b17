"""A prefix decoder's stages (objectives.vpgtrans, models.prefix_decoder): what each trains and locks,
and VPGTrans's start of a connector from one trained on another language model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import rich
import torch

from lipkit.checkpoint import load_checkpoint
from lipkit.errors import UserError
from lipkit.models.dual_encoder import DualEncoder
from lipkit.objectives.vpgtrans import transferred_projector, word_converter
from lipkit.text.tokenizer import TextTokenizer
from lipkit.train.inputs import objective_needs, requires


def prepare_prefix(
    model: DualEncoder,
    objective: Any,
    tokenizer: TextTokenizer,
    data: Any,
    cfg: Any,
    resume: Any,
    fresh: bool,
) -> None:
    """text_lm: the language model trains, the towers and the connector are locked; connector: the connector
    (or, `train_vpg: false`, its projector alone) trains on a language model pre-trained by text_lm, which
    stays locked with the towers. Both start from a trained checkpoint (`model.init_from`: its image tower
    feeds the connector). `fresh`: this run added the decoder (the starting checkpoint had none)."""
    needs = objective_needs(objective)
    if not requires(needs, "prefix_captioner") or not model.has_captioner:
        return  # another objective on such a checkpoint: check_inputs refuses it in one sentence
    if model.spec.caption_input != "prefix":
        return
    name = cfg.train.objective
    if not cfg.model.init_from:
        raise UserError(
            f"Objective '{name}' trains on a trained model's towers; set model.init_from to a checkpoint "
            "(e.g. runs/demo/checkpoint after `make demo`)."
        )
    lm_stage = "lm_nll" in needs
    if fresh and not lm_stage:
        raise UserError(
            f"Objective '{name}' trains a connector into a pre-trained language model and {cfg.model.init_from} "
            "has none; pre-train one with the text_lm objective (configs/methods/text_lm.yaml) and set "
            "model.init_from to its checkpoint."
        )
    model.lock("image", "all")
    model.lock("text", "all")
    decoder = model.captioner
    if lm_stage:
        decoder.connector.requires_grad_(False)
        _note(f"{name}: the towers and the connector locked; the language model trains")
        return
    for p in decoder.language_model_parameters():
        p.requires_grad_(False)
    decoder.connector.vpg.requires_grad_(objective.train_vpg)
    trains = "connector" if objective.train_vpg else "connector's projector (the VPG locked)"
    _note(f"{name}: the towers and the language model locked; the {trains} trains")
    if objective.transfer_from and resume is None:  # a resumed run has its own connector already
        first_only = cfg.data.caption_policy == "first" and cfg.data.captions_per_image == 1
        transfer_connector(model, Path(objective.transfer_from), tokenizer, data, first_only)


@torch.no_grad()
def transfer_connector(
    model: DualEncoder, source: Path, tokenizer: TextTokenizer, data: Any, first_only: bool = True
) -> None:
    """VPGTrans's start (objectives.vpgtrans): the source checkpoint's VPG, and its projector merged with the
    word converter fitted from the source language model's word embeddings to this one's, over the tokens
    of the training captions (`first_only`: each record's first caption, the one the language models
    learned). Computed on rank 0 and sent to every rank."""
    decoder = model.captioner
    if not source.expanduser().is_dir():
        raise UserError(
            f"transfer_from {source} does not exist; name the checkpoint of a connector run on another "
            "language model (e.g. runs/connector/checkpoint)."
        )
    other, other_tokenizer, _ = load_checkpoint(source)
    if not other.has_captioner or other.spec.caption_input != "prefix":
        raise UserError(
            f"transfer_from {source} has no connector; name the checkpoint of a run of the connector objective."
        )
    src = other.captioner
    own, theirs = model.visual.state_dict(), other.visual.state_dict()
    if own.keys() != theirs.keys() or any(not torch.equal(own[k], theirs[k].to(own[k])) for k in own):
        raise UserError(
            f"transfer_from {source} reads another image tower than this model; transfer a connector between "
            "language models started from the same checkpoint (model.init_from of both text_lm runs)."
        )
    if src.token_embedding.weight.shape[0] != decoder.token_embedding.weight.shape[0] or (
        other_tokenizer.tok.get_vocab() != tokenizer.tok.get_vocab()
    ):
        raise UserError(
            f"transfer_from {source} uses another tokenizer; its words cannot be mapped to this language "
            "model's — train both language models from checkpoints of one tokenizer."
        )
    try:
        decoder.connector.vpg.load_state_dict(src.connector.vpg.state_dict())
    except RuntimeError as e:
        raise UserError(
            f"transfer_from {source}'s connector makes another number of prompts than this model's; set "
            f"model.overrides.caption_queries={other.spec.caption_queries} for the language model's text_lm run."
        ) from e
    ids = caption_token_ids(tokenizer, data, first_only)
    source_rows, target_rows = (
        src.token_embedding.weight[ids].cpu(),
        decoder.token_embedding.weight[ids].cpu(),
    )
    converter = word_converter(source_rows, target_rows)
    weight, bias = transferred_projector(
        src.connector.projector.weight.cpu(), src.connector.projector.bias.cpu(), converter
    )
    projector = decoder.connector.projector
    projector.weight.copy_(weight)
    projector.bias.copy_(bias)
    _from_rank_0([projector.weight, projector.bias])
    _note(
        f"connector: the VPG of {source}, its projector through a word converter fitted on {len(ids)} tokens "
        f"(R² {fit_r2(source_rows, target_rows, converter):.3f})"
    )


def caption_token_ids(tokenizer: TextTokenizer, data: Any, first_only: bool = True) -> torch.Tensor:
    """The distinct token ids (padding excluded) of the training table's captions: each record's first
    caption (`first_only`) or all of them."""
    records = getattr(data, "records", None)
    if not records:
        raise UserError(
            "transfer_from fits its word converter on the training table's captions, and this source streams "
            "shards; train the transferred connector on a table (JSONL, CSV, parquet)."
        )
    captions = sorted({c for r in records for c in (r.captions[:1] if first_only else r.captions)})
    ids = torch.cat([tokenizer(captions[i : i + 4096]).flatten() for i in range(0, len(captions), 4096)])
    ids = ids.unique()
    return ids[ids != tokenizer.pad_id]


def fit_r2(source: torch.Tensor, target: torch.Tensor, converter: tuple[torch.Tensor, torch.Tensor]) -> float:
    """1 − the converter's residual over the target embeddings' variance (1: a perfect map)."""
    c_w, c = converter
    residual = target.double() - (source.double() @ c_w + c)
    spread = target.double() - target.double().mean(0)
    return 1 - float(residual.pow(2).sum() / spread.pow(2).sum().clamp(min=1e-30))


def _from_rank_0(tensors: list[torch.Tensor]) -> None:
    """Every rank gets rank 0's values, bit for bit (a least-squares fit may round otherwise elsewhere)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return
    for t in tensors:
        on_gpu = dist.get_backend() == "nccl" and t.device.type != "cuda"
        buffer = t.data.to("cuda") if on_gpu else t.data
        dist.broadcast(buffer, src=0)
        if on_gpu:
            t.data.copy_(buffer.to(t.device))


def _note(text: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        rich.get_console().print(f"[yellow]{text}[/]", highlight=False)
