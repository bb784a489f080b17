"""An image tower from timm (the library OpenCLIP takes its non-ViT towers from), shaped like OpenCLIP's
`TimmModel` so its checkpoints map one to one: `trunk` is the timm network without its classifier,
pooled by `timm_pool`; `head` projects into the shared space (`timm_proj`: "linear" — `head.proj`,
"mlp" — `head.mlp` (fc1 → GELU → fc2, as timm's `Mlp`), or "none" — the trunk's pooled features as they
are, which then must have `embed_dim` channels).

The trunk is built for `image_size` px where its constructor takes an input size (`img_size`: ViTs, Swin
and other networks with position embeddings or fixed windows); a network without one works at any size
(CNNs) or, built for one size only, is refused in one sentence.

`forward(images, return_tokens=True)` also returns a token grid like the ViT's: the trunk's last feature
map (B, C, H, W), or (B, H, W, C) for a channels-last trunk (timm's `output_fmt` "NHWC": Swin, MambaOut),
flattened to (B, H·W, C) (a timm ViT's patch tokens without its prefix tokens), each token through the
same head — so token-wise objectives (FILIP, LexLIP) work on a CNN tower. A trunk whose pooled features
come out of a layer of its own after the pool (MobileNetV3's conv_head, MambaOut's MLP: timm's
`head_hidden_size` above `num_features`) has tokens outside the head's space; they are refused.

When the trunk is locked (every parameter frozen: `lock_image: backbone|all`) it runs in eval mode, and
with `cache_features` on (the trainer turns it on when augmentation is off) the trunk's pooled features
of each distinct input image are computed once and kept, in the forwards of a training step — what the
projection trains on is the same either way (tests/test_timm_tower.py). Eval and embedding (eval mode,
no gradients) never fill the cache."""

from __future__ import annotations

import hashlib
import inspect
from collections import OrderedDict

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lipkit.errors import UserError
from lipkit.models.presets import ModelSpec
from lipkit.models.vision import require_images

POOLS = ("avg", "max", "avgmax")  # not "": OpenCLIP reads it two ways (the network's own pool, or none)
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


def create_trunk(name: str, pool: str = "avg", image_size: int | None = None) -> nn.Module:
    """The timm network `name`, untrained, without its classifier, pooling with `pool`, built for
    `image_size` px inputs where that takes a constructor argument (see `size_args`)."""
    timm = _timm()
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[-1]}*")[:5]
        raise UserError(
            f"timm has no model '{name}'; set model.overrides.timm_model_name to one of timm.list_models()"
            f"{f' (e.g. {close})' if close else ''}."
        )
    trunk = timm.create_model(name, pretrained=False)
    size = size_args(trunk, name, image_size)
    if size:  # built again for the size: its position embeddings / windows depend on it
        trunk = timm.create_model(name, pretrained=False, **size)
    trunk.reset_classifier(0, global_pool=pool)
    return trunk


def size_args(trunk: nn.Module, name: str, image_size: int | None) -> dict[str, int]:
    """`{"img_size": image_size}` when `trunk` (timm's `name` as built by default) was built for another
    input size and its constructor takes one; {} when it was built for `image_size` or takes none (a CNN
    works at any size). A network that takes only its own size (timm's `fixed_input_size`) is refused."""
    native = int(trunk.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    if image_size is None or image_size == native:
        return {}
    if "img_size" in inspect.signature(type(trunk).__init__).parameters:
        return {"img_size": image_size}
    if trunk.pretrained_cfg.get("fixed_input_size"):
        raise UserError(
            f"timm '{name}' takes {native} px images only, not model image_size {image_size}; set "
            f"model.overrides.image_size={native}."
        )
    return {}


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
                f"model timm_pool must be one of {', '.join(POOLS)} and timm_proj one of "
                f"{', '.join(PROJECTIONS)}, not '{spec.timm_pool}' / '{spec.timm_proj}'."
            )
        if not spec.timm_model_name:
            raise UserError("model vision_tower 'timm' needs timm_model_name, e.g. tf_efficientnet_lite0.")
        self.name, self.image_size = spec.timm_model_name, spec.image_size
        self.trunk = create_trunk(spec.timm_model_name, spec.timm_pool, spec.image_size)
        # the image size given to the trunk's constructor (None: its own size); OpenCLIP gives none
        self.built_size = spec.image_size if size_args(self.trunk, self.name, spec.image_size) else None
        # pooled features (what the head projects) can be wider than the feature map: a pre-logits
        # layer of the network's own after its pool (MobileNetV3's conv_head, MambaOut's MLP)
        self.width = width = getattr(self.trunk, "head_hidden_size", None) or self.trunk.num_features
        self.num_prefix_tokens = getattr(self.trunk, "num_prefix_tokens", 0)
        fmt = getattr(self.trunk, "output_fmt", "NCHW")  # a string or timm's Format enum
        self.channels_last = getattr(fmt, "value", fmt) == "NHWC"
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
        # train.freeze_bn_stats: every BatchNorm of the trunk normalises with its saved statistics, also in
        # trainable groups (then a per-channel affine: no batch dependence, so ranks and gradient-caching
        # chunks compute what one process does); a locked group's BatchNorm is frozen either way
        self.frozen_bn_stats = False
        self._cache: dict[bytes, torch.Tensor] = {}
        # new trunk weights make the cached features stale
        self.register_load_state_dict_post_hook(lambda module, _keys: module._cache.clear())

    def train(self, mode: bool = True) -> TimmTower:
        super().train(mode)
        if mode and self.frozen_bn_stats:
            for module in self.trunk.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()
        return self

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
        if not on and not hasattr(self.trunk, "set_grad_checkpointing"):
            return
        try:
            self.trunk.set_grad_checkpointing(on)
        except (AssertionError, AttributeError) as e:  # timm's networks without it assert `not enable`
            raise UserError(
                f"timm '{self.name}' has no gradient checkpointing; set train.grad_checkpointing to text "
                "or none."
            ) from e

    def _caching(self) -> bool:
        """Whether this forward reads and fills the feature cache: on, the trunk locked (so in eval mode),
        and a training step's forward — the tower in train mode (lock_image backbone, top-N) or, for a
        tower locked whole (lock_image all: in eval mode while the model trains), with gradients on.
        Eval and embedding run in eval mode without gradients: never."""
        if not (self.cache_features and self.locked) or self.trunk.training:
            return False
        return self.training or torch.is_grad_enabled()

    def _pooled(self, images: torch.Tensor) -> torch.Tensor:
        if not self._caching():
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
        require_images(images)
        if not return_tokens:
            pooled = self._pooled(images)
            return self.head(pooled.to(images.dtype))
        grid = self.trunk.forward_features(images)
        pooled = self.head(self.trunk.forward_head(grid, pre_logits=True))
        return pooled, self.head(self.tokens(grid))

    @property
    def has_token_grid(self) -> bool:
        """Whether its tokens are in the projection's space (see `tokens`)."""
        return self.trunk.num_features == self.width

    def tokens(self, grid: torch.Tensor) -> torch.Tensor:
        """The trunk's last feature map as (B, N, C) tokens: a CNN's (B, C, H, W) or a channels-last
        trunk's (B, H, W, C) → (B, H·W, C); a timm ViT's (B, prefix + N, C) without its prefix tokens."""
        if grid.ndim == 3:
            tokens = grid[:, self.num_prefix_tokens :]
        else:
            tokens = grid.flatten(1, 2) if self.channels_last else grid.flatten(2).transpose(1, 2)
        if tokens.shape[-1] != self.width:
            raise UserError(
                f"timm '{self.name}' pools its {tokens.shape[-1]}-channel feature map through a layer of its "
                f"own into {self.width} features, so its tokens are not in the projection's space; what reads "
                "image tokens (FILIP, Wukong, LexLIP, DreamLIP, TCL's local terms, CLOC, region embeddings, heat "
                "maps) needs another timm_model_name."
            )
        return tokens


class _Mlp(nn.Module):
    """timm's `Mlp` (fc1 → GELU → fc2) under OpenCLIP's names, so `timm_proj: mlp` heads map one to one."""

    def __init__(self, width: int, hidden: int, out: int, bias: bool) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))
