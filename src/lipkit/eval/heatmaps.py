"""Heat maps: where in an image a text matches, as one score per token of the image tower's h × w grid
(token (r, c) centred at ((c + ½)/w, (r + ½)/h) of the image the model sees, as models.regions reads it).

- `similarity`: the cosine of each projected token with the text embedding, <v_n/‖v_n‖, t>, what MaskCLIP
  and DenseCLIP read dense predictions from. For a CNN tower whose embedding is the mean of its projected
  tokens (the demo's EfficientNet) the tokens share the image embedding's space; for lipkit's ViT, which
  pools its class token, they do only once a region or token loss (CLOC, FILIP) has trained them.
- `gradcam`: Grad-CAM (Selvaraju et al., 2017) of s = <e(I), t>, the cosine of the pooled image embedding
  with the text: with A (N × C) the activations the pooled embedding is computed from and
  α_c = 1/N Σ_n ∂s/∂A_nc, the map is ReLU(Σ_c α_c A_nc). It needs no trained tokens, in the spirit of
  GroundVLP's gradient-weighted maps (GroundVLP weights ALBEF's cross-attention maps by their gradients; a
  dual encoder has no cross-attention, so the tower's own activations stand in). A: a timm tower's last
  feature map; lipkit's ViT: the patch tokens entering its last block (the class token reads them by
  attention there). A timm ViT that pools its class token has no gradient on its last feature map: its
  maps are flat (all zero), and the pointing game counts flat maps as misses.
- `filip`: FILIP's word–patch alignment (Yao et al., 2021) — each image token's best match among the
  text's real tokens, max_r <x_n, y_r> (normalised token features): the patch's share of FILIP's s^I.

The map functions take normalised image tokens (`token_features`) or, for Grad-CAM, normalised pixels
(B, 3, S, S), with per-image text features padded to K texts, and return (B, K, h, w); entries of padded
texts are meaningless and left to the caller.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lipkit.models.dual_encoder import DualEncoder
from lipkit.models.regions import grid_side, require_patch_grid
from lipkit.models.timm_vision import TimmTower

MAP_KINDS = ("similarity", "gradcam", "filip")


def _as_grid(per_token: torch.Tensor) -> torch.Tensor:
    """(B, K, N) → (B, K, h, w) with h = w = √N."""
    side = grid_side(per_token.transpose(1, 2))
    return per_token.reshape(*per_token.shape[:2], side, side)


@torch.no_grad()
def token_features(model: DualEncoder, images: torch.Tensor) -> torch.Tensor:
    """Images → (B, N, D) L2-normalised projected image tokens, float32."""
    require_patch_grid(model.spec, "A heat map")
    _, tokens = model.visual(images, return_tokens=True)
    return F.normalize(tokens.float(), dim=-1)


def similarity_maps(tokens: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """(B, N, D) normalised tokens and (B, K, D) normalised text embeddings → (B, K, h, w) cosines."""
    return _as_grid(torch.einsum("bnd,bkd->bkn", tokens, text_emb.to(tokens)))


def _pooled_and_activations(model: DualEncoder, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The pooled image features and the activations they are computed from (a leaf that receives
    gradients; see the module doc for which activations each tower gives). Everything before the leaf runs
    without autograd; nothing is attached to the model, so concurrent calls do not interfere."""
    visual = model.visual
    require_patch_grid(model.spec, "A Grad-CAM map")
    if isinstance(visual, TimmTower):
        with torch.no_grad():
            grid = visual.trunk.forward_features(images)
        leaf = grid.detach().float().requires_grad_(True)
        return visual.head(visual.trunk.forward_head(leaf.to(grid.dtype), pre_logits=True)), leaf
    with torch.no_grad():
        x = visual.embed(images)
        for block in visual.transformer.resblocks[:-1]:
            x = block(x)
    leaf = x.detach().float().requires_grad_(True)
    out = visual.ln_post(visual.transformer.resblocks[-1](leaf.to(x.dtype)))
    return out[:, 0] @ visual.proj, leaf


def gradcam_maps(model: DualEncoder, images: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """Images and (B, K, D) normalised text embeddings → (B, K, h, w) Grad-CAM maps (see the module doc);
    the model's parameters get no gradient."""
    with torch.enable_grad():
        pooled, acts = _pooled_and_activations(model, images)
        scores = torch.einsum(
            "bd,bkd->bk", F.normalize(pooled.float(), dim=-1), text_emb.to(pooled.device).float()
        )
        grads = [
            torch.autograd.grad(scores[:, k].sum(), acts, retain_graph=k + 1 < scores.shape[1])[0]
            for k in range(scores.shape[1])
        ]
    if isinstance(model.visual, TimmTower):
        tokens = model.visual.tokens
        acts, grads = tokens(acts.detach()), [tokens(g) for g in grads]
    else:
        acts, grads = acts.detach()[:, 1:], [g[:, 1:] for g in grads]  # the patch tokens, not the class token
    maps = [F.relu((acts * g.mean(1, keepdim=True)).sum(-1)) for g in grads]
    return _as_grid(torch.stack(maps, dim=1))


def filip_maps(tokens: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    """(B, N, D) normalised image tokens, (B, K, L, D) normalised text token features and their (B, K, L)
    real-token mask → (B, K, h, w): each image token's best cosine with a real token of the text."""
    sims = torch.einsum("bnd,bkld->bknl", tokens, text_tokens.to(tokens))
    sims = sims.masked_fill(~text_mask.to(sims.device)[:, :, None, :], float("-inf"))
    return _as_grid(sims.amax(-1))


def context_prompted(
    tokens: torch.Tensor, text_emb: torch.Tensor, scale: float, gamma: float
) -> torch.Tensor:
    """DenseCLIP's vision-to-language prompting without its learned decoder: each text embedding moves
    toward the image tokens it attends to, t' = normalize(t + γ Σ_n softmax_n(scale·<t, v_n>) v_n), per
    image; (B, N, D) tokens and (B, K, D) texts → (B, K, D)."""
    attn = torch.softmax(scale * torch.einsum("bkd,bnd->bkn", text_emb.to(tokens), tokens), dim=-1)
    return F.normalize(text_emb.to(tokens) + gamma * attn @ tokens, dim=-1)


def peak_points(maps: torch.Tensor) -> torch.Tensor:
    """(..., h, w) maps → (..., 2) the centre (x, y), in fractions of the side, of each map's highest token
    (the first in row-major order on ties)."""
    h, w = maps.shape[-2:]
    flat = maps.flatten(-2).argmax(-1)
    return torch.stack([(flat % w + 0.5) / w, (flat // w + 0.5) / h], dim=-1)


def upsample(maps: torch.Tensor, size: int) -> torch.Tensor:
    """(B, K, h, w) → (B, K, size, size), bilinear between token centres (align_corners=False, which
    puts token (r, c) at its centre as above)."""
    return F.interpolate(maps.float(), size=(size, size), mode="bilinear", align_corners=False)
