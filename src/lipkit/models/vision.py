"""ViT image tower: patchify → [cls] + learnable positions → pre-norm transformer → cls → projection.

The patchify step is CLIP's single strided convolution (`vision_stem="patch"`), or the convolutional stem
of Xiao et al. (2021, "Early Convolutions Help Transformers See Better"): log2(patch) 3×3 stride-2
convolutions with a normalisation and ReLU, the channels doubling up to the width, then a 1×1 convolution
— the same token grid, with a better-conditioned start that learns faster on small data.

Xiao et al. normalise with batch norm; lipkit's stem uses GroupNorm with one group (`stem_norm="group"`:
each image's feature map normalised over its channels and positions, with a per-channel affine) instead,
which normalises each image on its own: with batch norm an image's embedding
depends on the rest of its batch, so two ranks (each with its own half-batch statistics) do not train
like one process, gradient caching normalises each chunk differently from the whole batch (and moves the
running statistics once per chunk), and a locked tower's statistics move. `stem_norm="batch"` keeps
batch norm for checkpoints saved before the change; the trainer refuses to train those batch
statistics on several ranks or with gradient caching (models.batch_stats).

With `spec.vision_attn_pool` = Q (OpenCLIP's CoCa towers, `attentional_pool: true`), Q learned queries attend
to the transformer's output (`AttentionalPooler`), then ln_post: the first query's output times `proj` is
the pooled feature and the other Q − 1 are the image tokens, unprojected (embed_dim wide), as OpenCLIP's
VisionTransformer pools them. Those tokens are not a patch grid (no region pooling or heatmaps from them)."""

from __future__ import annotations

import torch
from torch import nn

from lipkit.errors import UserError
from lipkit.models.presets import ModelSpec
from lipkit.models.transformer import Transformer

STEM_NORMS = ("group", "batch")


def stem_norm(kind: str, channels: int) -> nn.Module:
    """GroupNorm with one group (per image, over channels and positions; per-channel affine), or
    BatchNorm2d for old checkpoints. One group keeps an image's channel means (its colours) that more
    groups would normalise away: on the fixture (tests/test_cli.py's 8-epoch run, 3 seeds) the training
    loss fell to 0.52–0.70× its start with one group, 0.54–0.83× with gcd(channels, 32) groups and
    0.52–0.68× with batch norm."""
    if kind == "group":
        return nn.GroupNorm(1, channels)
    return nn.BatchNorm2d(channels)


def conv_stem(width: int, patch_size: int, norm: str = "group") -> nn.Sequential:
    """3×3 stride-2 conv + norm + ReLU, log2(patch_size) times (channels width/2^(n-1) … width), then 1×1."""
    n = patch_size.bit_length() - 1
    if patch_size != 2**n or n < 1:
        raise ValueError(f"the conv stem needs a power-of-two patch_size, not {patch_size}")
    layers: list[nn.Module] = []
    c_in = 3
    for i in range(n):
        c_out = max(width >> (n - 1 - i), 16)
        layers += [nn.Conv2d(c_in, c_out, 3, 2, 1, bias=False), stem_norm(norm, c_out), nn.ReLU(inplace=True)]
        c_in = c_out
    layers.append(nn.Conv2d(c_in, width, 1))
    return nn.Sequential(*layers)


class AttentionalPooler(nn.Module):
    """Q learned queries → cross-attention to the (B, N, context_dim) tokens: (B, Q, dim) (OpenCLIP's
    AttentionalPooler and parameter names: `query`, `attn`, `ln_q`, `ln_k`)."""

    def __init__(self, dim: int, context_dim: int, heads: int, queries: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(queries, dim))
        self.attn = nn.MultiheadAttention(dim, heads, kdim=context_dim, vdim=context_dim, batch_first=True)
        self.ln_q = nn.LayerNorm(dim)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_k(x)
        q = self.ln_q(self.query).to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.attn(q, x, x, need_weights=False)[0]


def require_images(images: torch.Tensor) -> None:
    """Refuse anything but a batch of images (B, 3, S, S) in one sentence: clips reach a tower only through
    DualEncoder.image_features / frame_features, which pass it their frames."""
    if images.dim() != 4:
        raise UserError(
            f"The image tower takes images (B, 3, S, S), not a {images.dim()}-D tensor: clips (a `frames` column) "
            "go through the temporal head, which this objective, teacher or command does not use yet "
            "(docs/video.md lists what takes clips)."
        )


class VisionTransformer(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        if spec.image_size % spec.patch_size:
            raise ValueError(
                f"image_size {spec.image_size} is not a multiple of patch_size {spec.patch_size}"
            )
        if spec.stem_norm not in STEM_NORMS:
            raise UserError(
                f"model stem_norm must be 'group' or 'batch', not '{spec.stem_norm}'; use 'group'."
            )
        w = spec.vision_width
        grid = spec.image_size // spec.patch_size
        scale = w**-0.5
        self.image_size = spec.image_size
        if spec.vision_stem == "patch":
            self.conv1 = nn.Conv2d(3, w, kernel_size=spec.patch_size, stride=spec.patch_size, bias=False)
        elif spec.vision_stem == "conv":
            self.conv1 = conv_stem(w, spec.patch_size, spec.stem_norm)
        else:
            raise ValueError(f"vision_stem must be 'patch' or 'conv', not '{spec.vision_stem}'")
        self.class_embedding = nn.Parameter(scale * torch.randn(w))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, w))
        self.ln_pre = nn.LayerNorm(w)
        self.transformer = Transformer(
            w, spec.vision_layers, spec.vision_heads, spec.mlp_ratio, spec.quick_gelu
        )
        pool_dim = w
        if spec.vision_attn_pool:
            heads = spec.vision_attn_pool_heads
            if spec.vision_attn_pool < 2 or heads < 1 or spec.embed_dim % heads:
                raise UserError(
                    f"model vision_attn_pool={spec.vision_attn_pool} needs 2 or more queries (the first is pooled, "
                    f"the rest are the tokens) and vision_attn_pool_heads={spec.vision_attn_pool_heads} must "
                    f"divide embed_dim {spec.embed_dim}; change them."
                )
            pool_dim = spec.embed_dim
            self.attn_pool = AttentionalPooler(
                pool_dim, w, spec.vision_attn_pool_heads, spec.vision_attn_pool
            )
        self.ln_post = nn.LayerNorm(pool_dim)
        self.proj = nn.Parameter(scale * torch.randn(pool_dim, spec.embed_dim))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) → (B, 1 + N, W): the class token and the patch tokens with their positions, after
        ln_pre — the first block's input."""
        x = self.conv1(images).flatten(2).transpose(1, 2)  # B, N, W
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        return self.ln_pre(x)

    def forward(self, images: torch.Tensor, return_tokens: bool = False):
        require_images(images)
        x = self.transformer(self.embed(images))
        if hasattr(self, "attn_pool"):
            x = self.attn_pool(x)
        x = self.ln_post(x)
        pooled = x[:, 0] @ self.proj
        # the patch tokens in the embedding space, or the pooler's other queries as they are
        if return_tokens:
            return pooled, x[:, 1:] if hasattr(self, "attn_pool") else x[:, 1:] @ self.proj
        return pooled

    @property
    def has_token_grid(self) -> bool:
        """Whether the tokens are a patch grid (regions, heat maps): not an attentional pooler's queries."""
        return not hasattr(self, "attn_pool")
