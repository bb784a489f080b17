"""Function-preserving growth of lipkit's transformer towers, in width and in depth (`train.grow`).

Width (×2): every feature of a grown tower is duplicated — the residual stream x becomes [x, x], each
attention head gets a copy (heads ×2, head width unchanged), each MLP hidden unit a copy, each conv-stem
channel a copy. A layer *reading* duplicated features splits its weight into two halves that sum to the
old one, W' = [W/2 + E, W/2 − E] along its input dimension (E: Gaussian noise of `noise` × the weight's
std, a fresh draw for every copy, so the copies drift apart under training — with E = 0 they would get
identical gradients forever); a layer *producing* duplicated features repeats its rows. LayerNorm (and
the stem's one-group GroupNorm) of [x, x] is [LN(x), LN(x)] with the affine parameters repeated, so every
activation of the grown tower is the old one duplicated and its projection, which reads the last stream
with split weights, gives the old embedding: W'[x; x] = (W/2 + E)x + (W/2 − E)x = Wx (exactly in real
arithmetic; to rounding in floating point).

Depth (+N blocks): each new pre-norm residual block is a copy of the block below it (parameter
inheritance, as StackBERT-style stacking) with its two residual outputs — the attention's out-projection
and the MLP's c_proj, weights and biases — set to zero, so the block adds 0 to the stream: x + 0 + 0 = x.
New blocks are spread evenly through the stack.

Optimizer moments are carried with the parameters (train/growth.py): at the growth point, with E = 0,
each copy of a parameter whose output is duplicated receives exactly half the old gradient (its reader
splits the weight) and a parameter reading a duplicated input with an unduplicated output (the
projections) the old gradient in each half — so the first moment is repeated and scaled by ½ or 1 and
the second by ¼ or 1 (tests/test_growth.py checks the gradients). Inserted blocks start with no moments.

Parameter inheriting with momentum (GrowCLIP's PIM, Deng et al., 2023, which inherits the old weights
only in part to keep the grown model out of the old one's local minimum; as lipkit reads it): with
`momentum` λ < 1, every parameter of a grown tower becomes θ = λ·θ_inherited + (1 − λ)·θ_init, θ_init the
grown architecture's own fresh initialisation (seeded like the noise). λ = 1 (the default) is the
function-preserving growth above; λ < 1 gives up function preservation by design, and the carried
optimizer moments are those of the inherited part.

Not implemented: GrowCLIP's data-aware search of what to grow (the criterion and its growth space are not
available offline here, and it trains candidate architectures — growth here is the schedule the user
writes) and its shared encoder; growth of timm or Hugging Face towers, of a BatchNorm stem, of locked
towers, and width factors other than 2.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from lipkit.errors import UserError
from lipkit.models.presets import ModelSpec

TOWERS = ("image", "text", "both")


@dataclass(frozen=True)
class Growth:
    """One growth: which towers, the width factor (1 or 2), blocks added to each grown tower."""

    towers: str = "both"
    width: int = 1
    depth: int = 0
    noise: float = 0.01  # std of E relative to each split weight's std
    momentum: float = 1.0  # PIM's λ: the share of the inherited weights (1: function-preserving)

    def grows(self, tower: str) -> bool:
        return self.towers in (tower, "both")


@dataclass(frozen=True)
class Source:
    """Where a grown parameter comes from: the old name, its input dims (split) and output dims
    (repeated), `zero` (a residual output of an inserted block) and `fresh` (any parameter of an inserted
    block: it starts with no moments)."""

    old: str
    inputs: tuple[int, ...] = ()
    outputs: tuple[int, ...] = ()
    qkv: bool = False  # in_proj weight/bias: q, k and v grow one by one
    zero: bool = False
    fresh: bool = False


def grown_spec(spec: ModelSpec, g: Growth) -> ModelSpec:
    check_growable(spec, g)
    out = spec
    if g.grows("image"):
        out = replace(
            out,
            vision_width=spec.vision_width * g.width,
            vision_heads=spec.vision_heads * g.width,
            vision_layers=spec.vision_layers + g.depth,
        )
    if g.grows("text"):
        out = replace(
            out,
            text_width=spec.text_width * g.width,
            text_heads=spec.text_heads * g.width,
            text_layers=spec.text_layers + g.depth,
        )
    return out


def check_growable(spec: ModelSpec, g: Growth) -> None:
    """One sentence naming what cannot grow and the fix."""
    if g.towers not in TOWERS or g.width not in (1, 2) or g.depth < 0 or (g.width == 1 and not g.depth):
        raise UserError(
            "Each train.grow entry needs towers image|text|both, width 1 or 2 and depth ≥ 0 (not both "
            "neutral), e.g. {at_step: 100, towers: both, width: 2, depth: 2}."
        )
    if g.grows("image") and spec.vision_tower != "vit":
        raise UserError(
            "Only lipkit's own ViT image tower grows, not a timm one; set train.grow's towers to text or train "
            "without model.image_pretrained."
        )
    if (g.grows("image") and spec.vision_attn_pool) or (g.grows("text") and spec.caption_input == "text"):
        raise UserError(
            "OpenCLIP CoCa's towers (an attentional pooler on the image tower, a decoder reading the text "
            "tower's states) do not grow; leave that tower out of train.grow's towers."
        )
    if g.grows("image") and spec.vision_stem == "conv":
        check_conv_stem(spec, g)
    if g.grows("text") and spec.text_tower != "transformer":
        raise UserError(
            "Only lipkit's own text transformer grows, not a pretrained Hugging Face one; set train.grow's "
            "towers to image or train without model.text_pretrained."
        )
    widths = [w for tower, w in (("image", spec.vision_width), ("text", spec.text_width)) if g.grows(tower)]
    if g.width == 2 and any((spec.mlp_ratio * w) % 1 for w in widths):
        raise UserError(
            "Width growth needs mlp_ratio × width to be whole numbers; set model.overrides.mlp_ratio to 4."
        )


def check_conv_stem(spec: ModelSpec, g: Growth) -> None:
    """Every conv-stem layer's channels (max(width / 2^k, 16), vision.conv_stem) must stay or double."""
    if spec.stem_norm != "group":
        raise UserError(
            "A conv stem with batch norm (a checkpoint saved before the GroupNorm stem) does not grow; leave "
            "the image tower out of train.grow's towers."
        )
    n = spec.patch_size.bit_length() - 1
    for k in range(n):
        old, new = max(spec.vision_width >> k, 16), max((spec.vision_width * g.width) >> k, 16)
        if new not in (old, 2 * old):
            raise UserError(
                f"The conv stem's {old}-channel layer would grow to {new}, not double; use a vision_width of "
                "16·2^k (e.g. 128, 256) or model.overrides.vision_stem=patch."
            )


def layer_sources(old_layers: int, add: int) -> list[tuple[int, bool]]:
    """For each block of the deeper stack: (the old block it copies, whether it is inserted). The new
    blocks go after evenly spread old ones (after block ⌈(k+1)·L/(add+1)⌉ − 1 for the k-th)."""
    after = [min(old_layers - 1, -(-(k + 1) * old_layers // (add + 1)) - 1) for k in range(add)]
    out: list[tuple[int, bool]] = []
    for i in range(old_layers):
        out.append((i, False))
        out += [(i, True) for a in after if a == i]
    return out


def _roles(name: str, ndim: int) -> tuple[tuple[int, ...], bool]:
    """(input dims of a tower parameter `name`, whether it is q/k/v packed)."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("proj", "text_projection"):
        return (0,), False
    if leaf == "in_proj_weight":
        return (1,), True
    if leaf == "in_proj_bias":
        return (), True
    if ndim >= 2 and "embedding" not in name:  # Linear / Conv weights: (out, in, ...)
        return (1,), False
    return (), False


def tower_sources(
    prefix: str, old: dict[str, torch.Tensor], new: dict[str, torch.Tensor], layers: int, add: int
) -> dict[str, Source]:
    """New parameter name → its Source, for one tower (`prefix` "visual." or "text.")."""
    blocks, marker, out = layer_sources(layers, add), ".transformer.resblocks.", {}
    for name, t in new.items():
        old_name, inserted, leaf = name, False, name
        if marker in name:
            head, rest = name.split(marker)
            index, leaf = rest.split(".", 1)
            src, inserted = blocks[int(index)]
            old_name = f"{head}{marker}{src}.{leaf}"
        o = old[old_name]
        grown = tuple(d for d in range(t.ndim) if t.shape[d] != o.shape[d])
        if any(t.shape[d] != 2 * o.shape[d] for d in grown):
            raise ValueError(f"{name}: {tuple(o.shape)} does not double to {tuple(t.shape)}")
        inputs, qkv = _roles(name, t.ndim)
        zero = inserted and leaf.startswith(("attn.out_proj.", "mlp.c_proj."))
        ins, outs = tuple(d for d in grown if d in inputs), tuple(d for d in grown if d not in inputs)
        out[name] = Source(old_name, ins, outs, qkv, zero, inserted)
    return out


def _grow(x: torch.Tensor, src: Source, split, repeat=None) -> torch.Tensor:
    """Repeat `x` along the source's output dims, then `split` it along its input dims."""
    shape = x.shape
    if src.qkv:  # (3·w, ...) → (3, w, ...): q, k and v each repeated in place
        x = x.reshape(3, shape[0] // 3, *shape[1:])
    shift = 1 if src.qkv else 0
    for d in src.outputs:
        x = torch.cat([x, x], dim=d + shift)
    for d in src.inputs:
        x = split(x, d + shift)
    return x.reshape(-1, *x.shape[2:]) if src.qkv else x


def grow_weight(old: torch.Tensor, src: Source, gen: torch.Generator, noise: float) -> torch.Tensor:
    """The grown parameter: outputs repeated, inputs split into W/2 ± E (E fresh for every copy)."""
    std = float(old.float().std()) if old.numel() > 1 else 0.0

    def split(x: torch.Tensor, d: int) -> torch.Tensor:
        e = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.dtype).to(x.device) * (noise * std)
        return torch.cat([x / 2 + e, x / 2 - e], dim=d)

    grown = _grow(old, src, split)
    return torch.zeros_like(grown) if src.zero else grown


def grow_moment(old: torch.Tensor, src: Source, power: int) -> torch.Tensor:
    """An AdamW moment (power 1: exp_avg, 2: exp_avg_sq) of the grown parameter: repeated along every
    grown dim, × (½)^power when the parameter's output is duplicated (each copy gets half the gradient)."""
    grown = _grow(old, src, lambda x, d: torch.cat([x, x], dim=d))
    return grown * (0.5**power) if src.outputs else grown


def grow_model(model: nn.Module, g: Growth, seed: int) -> dict[str, Source]:
    """Grow `model` (a DualEncoder) in place; returns each new parameter's Source (train/growth.py carries
    the optimizer moments with it)."""
    from lipkit.models.text import TextTransformer  # the towers import this package's presets
    from lipkit.models.vision import VisionTransformer

    spec = grown_spec(model.spec, g)
    gen = torch.Generator().manual_seed(seed)
    sources: dict[str, Source] = {}
    for prefix, attr, build, layers in (
        ("visual.", "visual", VisionTransformer, model.spec.vision_layers),
        ("text.", "text", TextTransformer, model.spec.text_layers),
    ):
        tower = getattr(model, attr)
        if not g.grows(attr if attr == "text" else "image"):
            sources.update({prefix + n: Source(prefix + n) for n, _ in tower.named_parameters()})
            continue
        tower_name = "image" if attr == "visual" else "text"
        if any(not p.requires_grad for p in tower.parameters()) or list(tower.buffers()):
            raise UserError(
                f"The {tower_name} tower is locked and a locked tower does not grow; unlock it "
                f"(train.lock_{tower_name}=none) or leave it out of train.grow's towers."
            )
        ref = next(tower.parameters())
        with torch.random.fork_rng(
            devices=[]
        ):  # the fresh initialisation PIM blends in: seeded, every rank alike
            torch.manual_seed(seed)
            fresh = build(spec).to(device=ref.device, dtype=ref.dtype)
        old = {prefix + n: p.detach() for n, p in tower.named_parameters()}
        new = {prefix + n: p for n, p in fresh.named_parameters()}
        mine = tower_sources(prefix, old, new, layers, g.depth)
        with torch.no_grad():
            for name, src in mine.items():
                inherited = grow_weight(old[src.old], src, gen, g.noise)
                new[name].copy_(
                    inherited if g.momentum == 1 else g.momentum * inherited + (1 - g.momentum) * new[name]
                )
        fresh.transformer.checkpointing = tower.transformer.checkpointing
        fresh.train(tower.training)
        setattr(model, attr, fresh)
        sources.update(mine)
    sources.update({n: Source(n) for n, _ in model.named_parameters() if n not in sources})
    model.spec = spec
    return sources
