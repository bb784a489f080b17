"""Layers that normalise with the statistics of their batch while the model trains (BatchNorm).

Two kinds of model have them: a timm image tower whose trunk has BatchNorm layers that train (most CNNs,
e.g. EfficientNet-Lite, with `lock_image` none or a top-N that reaches one), and a ViT checkpoint saved
before the conv stem used GroupNorm (`stem_norm="batch"`; new ViTs have none). Their statistics are those of
whatever batch a forward sees: each rank's slice under DDP/FSDP, each chunk under gradient caching, so
neither trains like one process on the whole batch — the trainer refuses them there. A locked layer stays in
eval mode (frozen running statistics, DualEncoder.train), so it is no batch statistic and is allowed.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lipkit.errors import UserError


def batch_statistics_modules(model: nn.Module) -> list[str]:
    """Names of the BatchNorm layers that use their batch's statistics when `model` is put in train mode
    (the model's own `train`, so locked towers stay frozen); the model's modes are left as they were."""
    modes = [(m, m.training) for m in model.modules()]
    model.train()
    try:
        return [
            name
            for name, m in model.named_modules()
            if isinstance(m, _BatchNorm) and (m.training or not m.track_running_stats)
        ]
    finally:
        for m, mode in modes:
            m.training = mode


def check_batch_statistics(model: nn.Module, ranks: int, grad_cache_chunk: int, local_batch: int) -> None:
    """Refuse batch statistics where a step's forwards see only part of the batch: several ranks, or
    gradient caching (a `grad_cache_chunk` below the local batch)."""
    if ranks <= 1 and not 0 < grad_cache_chunk < local_batch:
        return
    names = batch_statistics_modules(model)
    where = f"{ranks} ranks" if ranks > 1 else f"train.grad_cache_chunk={grad_cache_chunk}"
    trunk = [n for n in names if n.startswith("visual.trunk.")]
    if trunk:
        raise UserError(
            f"The timm image trunk's unlocked BatchNorm layers ({', '.join(trunk[:3])}"
            f"{', …' if len(trunk) > 3 else ''}) normalise with the statistics of their part of the batch "
            f"under {where}; set train.freeze_bn_stats=true (their pretrained statistics, kept), "
            "lock_image backbone, or train in one process without train.grad_cache_chunk."
        )
    if names:
        raise UserError(
            f"This model normalises with batch statistics (BatchNorm in {', '.join(names[:3])}: stem_norm "
            f"'batch', as in checkpoints from before the GroupNorm conv stem), which {where} would compute "
            "per part of the batch; train "
            "it in one process without train.grad_cache_chunk, lock its image tower (train.lock_image), or "
            "start a new model."
        )
