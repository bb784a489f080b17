"""Contrastive objectives, one file per method, chosen by name in `train.objective`."""

from torch import nn

from lipkit.errors import UserError
from lipkit.objectives.infonce import InfoNCE

OBJECTIVES: dict[str, type[nn.Module]] = {"infonce": InfoNCE}


def build_objective(name: str) -> nn.Module:
    if name not in OBJECTIVES:
        raise UserError(f"Unknown objective '{name}'; choose one of {', '.join(OBJECTIVES)}.")
    return OBJECTIVES[name]()
