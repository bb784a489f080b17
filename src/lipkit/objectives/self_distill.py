"""CLIP plus self-distillation between local crops and global views, as RS-M-CLIP trains it (Silva et al.,
2024, "Multilingual Vision-Language Pre-training for the Remote Sensing Domain"), which takes the recipe of
SILC (Naeem et al., 2023, "SILC: Improving Vision Language Pretraining with Self-Distillation"): DINO's
loss (Caron et al., 2021) beside the image–text contrast.

An EMA copy of the model (the teacher; ξ ← m·ξ + (1−m)·θ after every optimiser step, buffers copied)
sees the two global views of each image (the first and a second random augmentation); the trained model
(the student) sees those two and `local_crops` small crops (area fraction in `local_scale`). Each image
embedding goes through a projection head h — a 3-layer MLP (GELU) to a bottleneck, L2-normalised, then a
weight-normalised linear layer to K prototypes (unit rows, DINO's `norm_last_layer`) — the student's h_S
trained, the teacher's h_T its EMA. With L2-normalised student embeddings x_v of every view v, teacher
embeddings x̂_g of the global views g ∈ {1, 2}, a centre c:

    q_g = softmax( (h_T(x̂_g) − c) / τ_t )          p_v = log_softmax( h_S(x_v) / τ_s )
    L_self = mean over the pairs (g, v ≠ g) of  −1/B Σ_i Σ_k q_g,ik p_v,ik
    c ← μ·c + (1 − μ)·mean_{g, i} h_T(x̂_g,i)        (after the optimiser step; μ = `center_momentum`)
    L = ½ [InfoNCE(x_1, y) + InfoNCE(x_2, y)] + λ · L_self          (λ = `distill_weight`)

(each global view is contrasted with the caption, as SILC does so the two objectives do not diverge;
`contrast_both_views: false` keeps only x_1, and then λ = 0 is InfoNCE exactly). The heads, the teacher
and the centre belong to the objective: saved with the training state (exact resume), the same on every
rank (the teacher outputs are gathered before the centre update), not exported.

What is not implemented of the papers:
- The local crops keep the model's input size (SILC / DINO crop them at 96 px against 224 px global views:
  a ViT's position embeddings would need resizing); there are `local_crops` of them (SILC uses 8).
- DINO's teacher-temperature warm-up (0.04 → 0.07), its frozen last layer in the first epoch, its
  momentum schedule (SILC keeps the momentum fixed, as here) and its 65,536-prototype head (K =
  `prototypes`, 1,024 by default, and a smaller MLP). The teacher runs in eval mode: a BatchNorm trunk
  uses the running statistics copied from the student, where DINO's teacher uses batch statistics.
- The heads act on the joint embedding (L2-normalised, after the projection) rather than on the image
  tower's pooled output; RS-M-CLIP's multilingual XLM-R tower and translated data (lipkit's multilingual
  tables and `eval.group_by: langs` give the per-language evaluation).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from lipkit.objectives.infonce import InfoNCE
from lipkit.objectives.momentum import ema_update, momentum_copy


class ProjectionHead(nn.Module):
    """DINO's head: 3-layer MLP → L2 normalisation → weight-normalised (unit-row) linear to K prototypes."""

    def __init__(self, dim: int, hidden: int, bottleneck: int, prototypes: int, seed: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, bottleneck),
        )
        self.prototypes = nn.Parameter(torch.empty(prototypes, bottleneck))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in self.mlp:
                if isinstance(layer, nn.Linear):
                    layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.02)
                    layer.bias.zero_()
            self.prototypes.copy_(torch.randn(prototypes, bottleneck, generator=g) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.mlp(x.to(self.prototypes.dtype)), dim=-1)
        return z @ F.normalize(self.prototypes, dim=-1).t()


class LocalGlobalDistillation(nn.Module):
    def __init__(
        self,
        distill_weight: float = 1.0,
        momentum: float = 0.99,
        local_crops: int = 4,
        local_scale: tuple[float, float] | list[float] = (0.05, 0.4),
        prototypes: int = 1024,
        hidden: int = 512,
        bottleneck: int = 128,
        student_temperature: float = 0.1,
        teacher_temperature: float = 0.04,
        center_momentum: float = 0.9,
        contrast_both_views: bool = True,
        seed: int = 0,
    ) -> None:
        """λ `distill_weight`; m `momentum` of the EMA teacher; `local_crops` per image with area fraction
        in `local_scale`; the head's `prototypes` K, `hidden` and `bottleneck` widths; τ_s, τ_t; μ
        `center_momentum`; `contrast_both_views` (InfoNCE on both global views, else the first only)."""
        super().__init__()
        _check(distill_weight, momentum, local_crops, local_scale, (prototypes, hidden, bottleneck))
        _check_rest(student_temperature, teacher_temperature, center_momentum, contrast_both_views)
        self.distill_weight, self.momentum, self.local_crops = (
            float(distill_weight),
            float(momentum),
            local_crops,
        )
        self.local_scale = [float(local_scale[0]), float(local_scale[1])]
        self.prototypes, self.hidden, self.bottleneck, self.seed = prototypes, hidden, bottleneck, seed
        self.student_temperature, self.teacher_temperature = (
            float(student_temperature),
            float(teacher_temperature),
        )
        self.center_momentum, self.contrast_both_views = float(center_momentum), contrast_both_views
        self.infonce = InfoNCE()
        # what it reads: the second view for its InfoNCE or the distillation; the crops and the teacher's
        # views only with the distillation on (λ = 0 with one view reads, and draws, what InfoNCE does)
        second = ("image_features_2",) if contrast_both_views or self.distill_weight else ()
        distill = ("image_features_local", "momentum_image_features", "momentum_image_features_2")
        self.inputs = (
            "image_features",
            "text_features",
            "logit_scale",
            *second,
            *(distill if self.distill_weight else ()),
        )
        self.momentum_model: nn.Module | None = None
        self.student_head: ProjectionHead | None = None
        self._pending_center: torch.Tensor | None = None

    def _heads(self, dim: int, device: torch.device) -> None:
        """The student head (trained), its EMA copy and the centre, sized to the embedding width."""
        if self.student_head is not None:
            return
        self.student_head = ProjectionHead(dim, self.hidden, self.bottleneck, self.prototypes, self.seed).to(
            device
        )
        self.teacher_head = copy.deepcopy(self.student_head).requires_grad_(False)
        self.register_buffer("center", torch.zeros(self.prototypes, device=device))

    def bind_model(self, model: nn.Module) -> nn.Module | None:
        """The EMA teacher ξ of `model` (frozen, eval mode); the heads sized to its embedding width (none of
        them with the distillation off)."""
        if not self.distill_weight:
            return None
        self.momentum_model = momentum_copy(model)
        self._heads(model.spec.embed_dim, next(model.parameters()).device)
        return self.momentum_model

    def after_step(self, model: nn.Module) -> None:
        """After an optimiser step (never after a skipped, non-finite one): ξ ← m·ξ + (1−m)·θ for the
        model and the head (buffers copied), and the centre moves towards the step's teacher mean."""
        if self.momentum_model is not None and self.student_head is not None:
            ema_update(self.momentum_model, model, self.momentum)
            ema_update(self.teacher_head, self.student_head, self.momentum)
        if self._pending_center is not None:
            self.center.mul_(self.center_momentum).add_(self._pending_center, alpha=1 - self.center_momentum)
            self._pending_center = None

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        image_features_2: torch.Tensor | None = None,
        image_features_local: torch.Tensor | None = None,
        momentum_image_features: torch.Tensor | None = None,
        momentum_image_features_2: torch.Tensor | None = None,
        **_: object,
    ) -> torch.Tensor:
        loss = self.infonce(image_features, text_features, logit_scale)
        if self.contrast_both_views:
            loss = 0.5 * (loss + self.infonce(image_features_2, text_features, logit_scale))
        if not self.distill_weight:
            return loss
        if (
            image_features_local is None
            or momentum_image_features is None
            or momentum_image_features_2 is None
        ):
            raise ValueError("the distillation reads the local crops and the teacher's views: pass them")
        b, dim = image_features.shape
        self._heads(dim, image_features.device)
        with torch.no_grad():
            teacher = [self.teacher_head(x) for x in (momentum_image_features, momentum_image_features_2)]
            targets = [F.softmax((t - self.center) / self.teacher_temperature, dim=-1) for t in teacher]
        local = image_features_local.reshape(b, -1, dim).transpose(0, 1)  # (L, B, D)
        student = [image_features, image_features_2, *local]
        logs = [F.log_softmax(self.student_head(x) / self.student_temperature, dim=-1) for x in student]
        terms = [-(q * p).sum(-1).mean() for g, q in enumerate(targets) for v, p in enumerate(logs) if v != g]
        distill = torch.stack(terms).mean()
        self._pending_center = torch.cat(teacher).mean(0)  # applied by after_step, once the step is taken
        self.last_stats = {"self_distill_loss": distill.detach()}
        return loss + self.distill_weight * distill


def _number(name: str, value: object, lo: float, hi: float, integer: bool = False) -> None:
    kind = int if integer else int | float
    bad = isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value)
    if bad or not lo <= value <= hi:
        raise ValueError(
            f"{name} must be a {'whole number' if integer else 'number'} in [{lo}, {hi}], got {value!r}"
        )


def _check(weight: object, momentum: object, crops: object, scale: object, widths: tuple) -> None:
    _number("distill_weight", weight, 0, 1e6)
    _number("momentum", momentum, 0, 0.999999)
    _number("local_crops", crops, 1, 64, integer=True)
    if not (isinstance(scale, list | tuple) and len(scale) == 2 and 0 < scale[0] < scale[1] <= 1):
        raise ValueError(f"local_scale must be two area fractions 0 < lo < hi ≤ 1, got {scale!r}")
    for name, value in zip(("prototypes", "hidden", "bottleneck"), widths, strict=True):
        _number(name, value, 1, 1_000_000, integer=True)


def _check_rest(student_t: object, teacher_t: object, center: object, both: object) -> None:
    _number("student_temperature", student_t, 1e-6, 1e6)
    _number("teacher_temperature", teacher_t, 1e-6, 1e6)
    _number("center_momentum", center, 0, 1)
    if not isinstance(both, bool):
        raise ValueError(f"contrast_both_views must be true or false, got {both!r}")
