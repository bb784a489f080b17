"""The image views of one step: the first augmentation every objective sees, a second one (TCL, the
improved baselines' SimCLR / Barlow Twins / SimSiam / BYOL terms, RS-M-CLIP's second global view), and
small local crops (RS-M-CLIP / SILC's self-distillation).

Every view is drawn from the trainer's generator with this rank's window of the global batch's draws
(data.transforms.augment's `rows`), in a fixed order — first, second, then the local crops one after the
other — so two ranks draw exactly what one process draws, and a resume (which restores the generator)
draws what the uninterrupted run drew.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lipkit.config import AugmentConfig
from lipkit.data.transforms import augment, normalize
from lipkit.errors import UserError
from lipkit.models.presets import ModelSpec


def view_plan(second: bool, local: bool, objective: object) -> tuple[bool, int, tuple[float, float]]:
    """What `ViewMaker.views` draws each step: the second view, and the objective's `local_crops` crops of
    area fraction `local_scale` when an input reads local crops (an objective reading them must say how
    many)."""
    crops = getattr(objective, "local_crops", 0) if local else 0
    if local and not crops:
        raise ValueError(f"{type(objective).__name__} reads local crops: give it a `local_crops` count ≥ 1")
    return second, crops, tuple(getattr(objective, "local_scale", (0.0, 1.0)))


@dataclass(frozen=True)
class Views:
    """The views besides the first: `second` (B, 3, H, W) and `local` (B, L, 3, H, W), or None."""

    second: torch.Tensor | None = None
    local: torch.Tensor | None = None

    def __getitem__(self, rows: slice) -> Views:
        """The views of the images `rows` (gradient caching embeds a batch chunk by chunk)."""
        return Views(*(None if v is None else v[rows] for v in (self.second, self.local)))


class ViewMaker:
    """Augmented, normalised views of this rank's uint8 images on the device. `rows`: (first row, global
    batch) when the images are a rank's share of a larger global batch, else None."""

    def __init__(
        self,
        spec: ModelSpec,
        aug: AugmentConfig,
        gen: torch.Generator,
        device: torch.device,
        rows: tuple[int, int] | None,
    ) -> None:
        self.spec, self.aug, self.gen, self.device, self.rows = spec, aug, gen, device, rows
        a = aug
        self.no_augmentation = a.scale_min >= 1 and not (a.rotate_deg or a.hflip or a.blur_p or a.colour)

    def view(self, images_u8: torch.Tensor, scale: tuple[float, float] | None = None) -> torch.Tensor:
        """One random augmentation (crop area fraction in `scale`, default [augment.scale_min, 1])."""
        spec, a = self.spec, self.aug
        if self.no_augmentation and scale is None:
            return normalize(images_u8, spec.image_mean, spec.image_std).to(self.device)
        lo, hi = scale if scale is not None else (a.scale_min, 1.0)
        # one draw per clip: its frames stacked as channels take the same crop and colour
        clips = images_u8.dim() == 5
        if clips and a.hflip:
            raise UserError(
                "Clips train without mirroring (a mirrored clip moving right moves left); set augment.hflip=false."
            )
        x = (images_u8.flatten(1, 2) if clips else images_u8).float() / 255.0
        x = augment(x, self.gen, lo, a.rotate_deg, a.hflip, a.blur_p, a.colour, self.rows, hi)
        x = x.unflatten(1, (images_u8.shape[1], 3)) if clips else x
        return normalize(x * 255.0, spec.image_mean, spec.image_std).to(self.device)

    def views(
        self, images_u8: torch.Tensor, second: bool, local_crops: int, local_scale: tuple[float, float]
    ) -> Views:
        """The second view when asked for, then `local_crops` crops of area fraction in `local_scale`."""
        view2 = self.view(images_u8) if second else None
        if not local_crops:
            return Views(view2)
        crops = [self.view(images_u8, local_scale) for _ in range(local_crops)]
        return Views(view2, torch.stack(crops, dim=1))
