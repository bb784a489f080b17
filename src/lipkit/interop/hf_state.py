"""Hugging Face `CLIPModel` ↔ lipkit state-dict names (see interop.hf for the whole mapping): HF keeps
attention's q/k/v as three Linear layers where lipkit concatenates them into `in_proj_weight/bias`,
`layer_norm1/2` are `ln_1/2`, `mlp.fc1/fc2` are `mlp.c_fc/c_proj`, the vision tower's
`pre_layrnorm/post_layernorm` are `ln_pre/ln_post`, and the bias-free projection Linear layers hold the
transpose of lipkit's `proj`/`text_projection`."""

from __future__ import annotations

import torch

from lipkit.errors import UserError
from lipkit.models.presets import ModelSpec


def _block_names(hf: str, ours: str) -> list[tuple[str, str]]:
    pairs = [
        ("layer_norm1", "ln_1"),
        ("layer_norm2", "ln_2"),
        ("mlp.fc1", "mlp.c_fc"),
        ("mlp.fc2", "mlp.c_proj"),
    ]
    pairs.append(("self_attn.out_proj", "attn.out_proj"))
    return [(f"{hf}{a}.{p}", f"{ours}{b}.{p}") for a, b in pairs for p in ("weight", "bias")]


def _renames(spec: ModelSpec) -> list[tuple[str, str]]:
    """(HF name, lipkit name) of every tensor that is a plain copy; q/k/v and projections are handled apart."""
    names = [
        ("vision_model.embeddings.class_embedding", "visual.class_embedding"),
        ("vision_model.embeddings.patch_embedding.weight", "visual.conv1.weight"),
        ("vision_model.embeddings.position_embedding.weight", "visual.positional_embedding"),
        ("text_model.embeddings.token_embedding.weight", "text.token_embedding.weight"),
        ("text_model.embeddings.position_embedding.weight", "text.positional_embedding"),
        ("logit_scale", "logit_scale"),
    ]
    for hf, ours in (
        ("vision_model.pre_layrnorm", "visual.ln_pre"),
        ("vision_model.post_layernorm", "visual.ln_post"),
        ("text_model.final_layer_norm", "text.ln_final"),
    ):
        names += [(f"{hf}.{p}", f"{ours}.{p}") for p in ("weight", "bias")]
    for tower, ours, layers in (
        ("vision_model", "visual", spec.vision_layers),
        ("text_model", "text", spec.text_layers),
    ):
        for i in range(layers):
            names += _block_names(f"{tower}.encoder.layers.{i}.", f"{ours}.transformer.resblocks.{i}.")
    return names


def _attn_names(spec: ModelSpec) -> list[tuple[str, str]]:
    """(HF self_attn prefix, lipkit attn prefix) of every attention layer."""
    return [
        (f"{tower}.encoder.layers.{i}.self_attn.", f"{ours}.transformer.resblocks.{i}.attn.")
        for tower, ours, layers in (
            ("vision_model", "visual", spec.vision_layers),
            ("text_model", "text", spec.text_layers),
        )
        for i in range(layers)
    ]


def state_from_hf(state: dict[str, torch.Tensor], spec: ModelSpec, source: str) -> dict[str, torch.Tensor]:
    """Rename (and, for attention, concatenate) a CLIPModel state dict to lipkit's names."""
    rest = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    out: dict[str, torch.Tensor] = {}

    def take(key: str) -> torch.Tensor:
        if key not in rest:
            raise UserError(
                f"The weights of {source} lack '{key}'; the config does not match the weights, "
                "re-save the model with CLIPModel.save_pretrained."
            )
        return rest.pop(key)

    for hf, ours in _renames(spec):
        out[ours] = take(hf)
    for hf, ours in _attn_names(spec):
        for p, name in (("weight", "in_proj_weight"), ("bias", "in_proj_bias")):
            out[ours + name] = torch.cat([take(f"{hf}{x}_proj.{p}") for x in "qkv"], dim=0)
    out["visual.proj"] = take("visual_projection.weight").t()
    out["text.text_projection"] = take("text_projection.weight").t()
    out["logit_scale"] = out["logit_scale"].reshape(())
    out.update(rest)  # anything left over is reported by build_model as not used
    return out


def state_to_hf(state: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """A lipkit state dict under CLIPModel's names."""
    out = {hf: state[ours] for hf, ours in _renames(spec)}
    for hf, ours in _attn_names(spec):
        for p, name in (("weight", "in_proj_weight"), ("bias", "in_proj_bias")):
            for x, part in zip("qkv", state[ours + name].chunk(3, dim=0), strict=True):
                out[f"{hf}{x}_proj.{p}"] = part
    out["visual_projection.weight"] = state["visual.proj"].t()
    out["text_projection.weight"] = state["text.text_projection"].t()
    return {k: v.detach().contiguous().cpu().clone() for k, v in out.items()}
