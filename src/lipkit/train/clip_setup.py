"""What a run on clips sets up before training (data/frames.py, models/temporal.py): a temporal head on a
starting checkpoint (`model.overrides.temporal`), the frame count the model is trained on (kept in its spec,
so evaluation, embedding and search decode clips alike), and the data settings script ordering needs."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from lipkit.errors import UserError
from lipkit.models.dual_encoder import DualEncoder
from lipkit.train.inputs import objective_needs, requires


def prepare_clips(model: DualEncoder, objective: Any, data: Any, cfg: Any) -> None:
    attach_temporal(model, cfg.model.overrides)
    if trains_on_clips(data):
        model.spec = replace(model.spec, clip_frames=cfg.data.num_frames)
    check_change_phrases(cfg.data, getattr(objective, "needs_change_phrases", False), cfg.train.objective)
    if requires(objective_needs(objective), "script"):
        check_script_data(cfg.data, getattr(objective, "sentences", 0), cfg.train.objective)


def trains_on_clips(data: Any) -> bool:
    """Whether the training source holds clips: a table's first record, or (shards) the first shard's first
    sample, as data.shard_batches.open_shards read it."""
    records = getattr(data, "records", None)
    if records:
        return records[0].frames is not None
    return getattr(data, "clip", None) is not None


def attach_temporal(model: DualEncoder, overrides: dict[str, Any]) -> None:
    """A fresh temporal head (model.overrides.temporal) on a starting checkpoint that has another or none;
    a head it already has keeps the settings it was trained with."""
    kind, spec = overrides.get("temporal", ""), model.spec
    settings = {
        k: overrides[k] for k in ("temporal_layers", "temporal_heads", "temporal_frames") if k in overrides
    }
    if kind and kind != (spec.temporal or "mean"):
        model.add_temporal(
            kind,
            settings.get("temporal_layers", 1),
            settings.get("temporal_heads", 4),
            settings.get("temporal_frames", 64),
        )
    elif any(getattr(spec, k) != v for k, v in settings.items()):
        raise UserError(
            f"model.init_from already has a {spec.temporal or 'mean'} temporal head, whose settings "
            f"({', '.join(sorted(settings))}) stay as it was trained; drop those overrides, or start a new head "
            "of another kind."
        )


def check_script_data(d: Any, sentences: int, objective: str) -> None:
    """Script ordering reads each clip's captions in their order: the first caption, then `sentences`."""
    if d.caption_policy != "first" or d.text_augment or d.split_sentences:
        raise UserError(
            f"Objective '{objective}' reads each clip's script in order; set data.caption_policy=first and leave "
            "data.text_augment and data.split_sentences off."
        )
    if d.captions_per_image != sentences + 1:
        raise UserError(
            f"Objective '{objective}' orders {sentences} sentences after each caption but data.captions_per_image "
            f"is {d.captions_per_image}; set it to {sentences + 1} (or train.objective_args.sentences to "
            f"{d.captions_per_image - 1})."
        )


def check_change_phrases(d: Any, needed: bool, objective: str) -> None:
    """VDI reads each clip's change phrase as its second caption: data.change_phrases on, nothing that reorders,
    edits or replaces captions; and data.change_phrases only for an objective that reads the phrases."""
    if d.change_phrases and not needed:
        raise UserError(
            f"data.change_phrases puts a phrase among each row's captions, which objective '{objective}' would "
            "train on as a caption; set it only for the vdi objective."
        )
    if needed and not (
        d.change_phrases
        and d.caption_policy == "first"
        and d.captions_per_image >= 2
        and not (d.text_augment or d.split_sentences or d.caption_mix)
    ):
        raise UserError(
            f"Objective '{objective}' reads each clip's change phrase as its second caption; set "
            "data.change_phrases=true, data.caption_policy=first, data.captions_per_image=2, and leave "
            "data.text_augment, data.split_sentences and data.caption_mix off."
        )
