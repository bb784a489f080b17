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
from lipkit.models.prefix_decoder import PrefixDecoder
from lipkit.objectives.vpgtrans import transferred_projector, word_converter
from lipkit.text.tokenizer import TextTokenizer
from lipkit.train.inputs import objective_needs


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
    if not model.has_captioner or model.spec.caption_input != "prefix":
        return
    name = cfg.train.objective
    if not cfg.model.init_from:
        raise UserError(
            f"Objective '{name}' trains on a trained model's towers; set model.init_from to a checkpoint "
            "(e.g. runs/demo/checkpoint after `make demo`)."
        )
    lm_stage = "lm_nll" in objective_needs(objective)
    if fresh and not lm_stage:
        raise UserError(
            f"Objective '{name}' trains a connector into a pre-trained language model and {cfg.model.init_from} "
            "has none; pre-train one with the text_lm objective (configs/methods/text-lm.yaml) and set "
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
        transfer_connector(decoder, Path(objective.transfer_from), tokenizer, data)


@torch.no_grad()
def transfer_connector(decoder: PrefixDecoder, source: Path, tokenizer: TextTokenizer, data: Any) -> None:
    """VPGTrans's start (objectives.vpgtrans): the source checkpoint's VPG, and its projector merged with the
    word converter fitted from the source language model's word embeddings to this one's, over the tokens
    of the training captions."""
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
            f"transfer_from {source}'s connector reads another image width or makes another number of prompts "
            "(model caption_queries, caption_heads); transfer between decoders on the same image tower."
        ) from e
    ids = caption_token_ids(tokenizer, data)
    target = decoder.token_embedding.weight
    converter = word_converter(src.token_embedding.weight[ids].cpu(), target[ids].cpu())
    weight, bias = transferred_projector(
        src.connector.projector.weight.cpu(), src.connector.projector.bias.cpu(), converter
    )
    decoder.connector.projector.weight.copy_(weight)
    decoder.connector.projector.bias.copy_(bias)
    _note(
        f"connector: the VPG of {source}, its projector through a word converter fitted on {len(ids)} tokens "
        f"(R² {fit_r2(src.token_embedding.weight[ids].cpu(), target[ids].cpu(), converter):.3f})"
    )


def caption_token_ids(tokenizer: TextTokenizer, data: Any) -> torch.Tensor:
    """The distinct token ids (padding excluded) of every caption of the training table's records."""
    records = getattr(data, "records", None)
    if not records:
        raise UserError(
            "transfer_from fits its word converter on the training table's captions, and this source streams "
            "shards; train the transferred connector on a table (JSONL, CSV, parquet)."
        )
    captions = sorted({c for r in records for c in r.captions})
    ids = torch.cat([tokenizer(captions[i : i + 4096]).flatten() for i in range(0, len(captions), 4096)])
    ids = ids.unique()
    return ids[ids != tokenizer.pad_id]


def fit_r2(source: torch.Tensor, target: torch.Tensor, converter: tuple[torch.Tensor, torch.Tensor]) -> float:
    """1 − the converter's residual over the target embeddings' variance (1: a perfect map)."""
    c_w, c = converter
    residual = target.double() - (source.double() @ c_w + c)
    spread = target.double() - target.double().mean(0)
    return 1 - float(residual.pow(2).sum() / spread.pow(2).sum().clamp(min=1e-30))


def _note(text: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        rich.get_console().print(f"[yellow]{text}[/]", highlight=False)
