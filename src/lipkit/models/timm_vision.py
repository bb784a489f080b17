"""An image tower from timm (the library OpenCLIP takes its non-ViT towers from), shaped like OpenCLIP's
`TimmModel` so its checkpoints map one to one: `trunk` is the timm network without its classifier,
pooled by `timm_pool`; `head` projects into the shared space (`timm_proj`: "linear" — `head.proj`,
"mlp" — `head.mlp` (fc1 → GELU → fc2, as timm's `Mlp`), or "none" — the trunk's pooled features as they
are, which then must have `embed_dim` channels).

`forward(images, return_tokens=True)` also returns a token grid like the ViT's: the trunk's last feature
map (B, C, H, W) flattened to (B, H·W, C) (a timm ViT's patch tokens without its prefix tokens), each
token through the same head — so token-wise objectives (FILIP, LexLIP) work on a CNN tower.

When the trunk is locked (every parameter frozen: `lock_image: backbone|all`) it runs in eval mode, and
with `cache_features` on (the trainer turns it on when augmentation is off) the trunk's pooled features
of each distinct input image are computed once and kept — what the projection trains on is the same
either way (tests/test_timm_tower.py)."""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch
from torch import nn

from lipkit.errors import UserError
from lipkit.models.presets import ModelSpec

POOLS = ("avg", "max", "avgmax", "")
PROJECTIONS = ("linear", "mlp", "none")
MAX_CACHE = 200_000  # cached pooled features of a locked trunk (~1 GB at 1280-d)


def _timm():
    try:
        import timm
    except ImportError as e:
        raise UserError(
            "A timm image tower needs timm, a lipkit dependency missing here; reinstall lipkit or "
            "`pip install timm`."
        ) from e
    return timm


def create_trunk(name: str, pool: str = "avg") -> nn.Module:
    """The timm network `name`, untrained, without its classifier, pooling with `pool`."""
    timm = _timm()
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[-1]}*")[:5]
        raise UserError(
            f"timm has no model '{name}'; set model.overrides.timm_model_name to one of timm.list_models()"
            f"{f' (e.g. {close})' if close else ''}."
        )
    trunk = timm.create_model(name, pretrained=False)
    trunk.reset_classifier(0, global_pool=pool)
    return trunk


def timm_pretrained_cfg(name: str) -> dict:
    """timm's pretraining settings of `name` (input size, mean, std) — what a pretrained tower expects."""
    timm = _timm()
    if not timm.is_model(name):
        raise UserError(
            f"timm has no model '{name}'; set model.overrides.timm_model_name to a timm model name."
        )
    return dict(timm.models.get_pretrained_cfg(name).to_dict())


class TimmTower(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        if spec.timm_pool not in POOLS or spec.timm_proj not in PROJECTIONS:
            raise UserError(
                f"model timm_pool must be one of {POOLS} and timm_proj one of {PROJECTIONS}, not "
                f"'{spec.timm_pool}' / '{spec.timm_proj}'."
            )
        if not spec.timm_model_name:
            raise UserError("model vision_tower 'timm' needs timm_model_name, e.g. tf_efficientnet_lite0.")
        self.image_size = spec.image_size
        self.trunk = create_trunk(spec.timm_model_name, spec.timm_pool)
        width = self.trunk.num_features
        self.num_prefix_tokens = getattr(self.trunk, "num_prefix_tokens", 0)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        if spec.timm_proj == "linear":
            layers["drop"] = nn.Dropout(0.0)
            layers["proj"] = nn.Linear(width, spec.embed_dim, bias=spec.timm_proj_bias)
        elif spec.timm_proj == "mlp":
            layers["mlp"] = _Mlp(width, 2 * spec.embed_dim, spec.embed_dim, spec.timm_proj_bias)
        elif width != spec.embed_dim:
            raise UserError(
                f"model timm_proj 'none' needs embed_dim equal to the trunk's {width} features; set "
                f"embed_dim={width} or timm_proj='linear'."
            )
        self.head = nn.Sequential(layers)
        self.cache_features = False
        self._cache: dict[bytes, torch.Tensor] = {}
        # new trunk weights make the cached features stale
        self.register_load_state_dict_post_hook(lambda module, _keys: module._cache.clear())

    @property
    def locked(self) -> bool:
        return not any(p.requires_grad for p in self.trunk.parameters())

    def projection_names(self) -> list[str]:
        return [f"head.{n}" for n, _ in self.head.named_parameters()]

    def block_groups(self) -> list[list[str]]:
        """The trunk's parameter names in timm's layer groups (`group_matcher`, as OpenCLIP's
        `lock(unlocked_groups)` counts them), input side first."""
        from timm.models import group_parameters

        groups = group_parameters(self.trunk, self.trunk.group_matcher())
        return [[f"trunk.{n}" for n in groups[k]] for k in sorted(groups)]

    def set_checkpointing(self, on: bool) -> None:
        self.trunk.set_grad_checkpointing(on)

    def _pooled(self, images: torch.Tensor) -> torch.Tensor:
        if not (self.cache_features and self.training and self.locked):
            return self.trunk.forward_head(self.trunk.forward_features(images), pre_logits=True)
        rows = images.detach().float().cpu().numpy()  # one transfer per batch (a GPU syncs once)
        keys = [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in rows]
        todo = sorted({k: i for i, k in enumerate(keys) if k not in self._cache}.values())
        fresh: dict[bytes, torch.Tensor] = {}
        if todo:
            with torch.no_grad():
                x = images[todo]
                pooled = self.trunk.forward_head(self.trunk.forward_features(x), pre_logits=True)
            fresh = {keys[i]: vec for i, vec in zip(todo, pooled.float(), strict=True)}
            if len(self._cache) < MAX_CACHE:
                self._cache.update(fresh)
        return torch.stack([self._cache.get(k, fresh.get(k)) for k in keys]).to(images.device)

    def forward(self, images: torch.Tensor, return_tokens: bool = False):
        if not return_tokens:
            pooled = self._pooled(images)
            return self.head(pooled.to(images.dtype))
        grid = self.trunk.forward_features(images)
        pooled = self.head(self.trunk.forward_head(grid, pre_logits=True))
        # a CNN's (B, C, H, W) → (B, H·W, C); a timm ViT's (B, prefix + N, C) without its prefix tokens
        tokens = grid.flatten(2).transpose(1, 2) if grid.ndim == 4 else grid[:, self.num_prefix_tokens :]
        return pooled, self.head(tokens)


class _Mlp(nn.Module):
    """timm's `Mlp` (fc1 → GELU → fc2) under OpenCLIP's names, so `timm_proj: mlp` heads map one to one."""

    def __init__(self, width: int, hidden: int, out: int, bias: bool) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))
