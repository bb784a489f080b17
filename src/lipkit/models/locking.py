"""What `train.lock_image` / `train.lock_text` freeze in a tower (LiT and its partial forms).

- "none": nothing; "all": every parameter; "backbone": all but the projection into the shared space;
- "top-N": all but the projection and the top N layer groups. Groups are a timm trunk's own
  (`group_matcher`, the groups OpenCLIP's `lock(unlocked_groups=N)` counts), and for transformer towers
  the embeddings first, then one group per block (the final norm goes with the last block).

A frozen module stays in eval mode (DualEncoder.train): a locked BatchNorm normalises with its saved
statistics and never updates them.
"""

from __future__ import annotations

import re

from torch import nn

from lipkit.config import valid_lock
from lipkit.errors import UserError

_BLOCK = re.compile(r"(?:^|\.)(?:resblocks|layer|blocks)\.(\d+)\.")


def projection_names(tower: nn.Module) -> list[str]:
    if hasattr(tower, "projection_names"):
        return tower.projection_names()
    return [n for n, _ in tower.named_parameters() if n in ("proj", "text_projection")]


def block_groups(tower: nn.Module) -> list[list[str]]:
    """The tower's backbone parameters in layer groups, input side first."""
    if hasattr(tower, "block_groups"):
        return tower.block_groups()
    skip = set(projection_names(tower))
    names = [n for n, _ in tower.named_parameters() if n not in skip]
    blocks = sorted({int(m.group(1)) for n in names if (m := _BLOCK.search(n))})
    groups: list[list[str]] = [[] for _ in range(len(blocks) + 1)]
    seen_block = False
    for n in names:
        m = _BLOCK.search(n)
        if m:
            seen_block = True
            groups[blocks.index(int(m.group(1))) + 1].append(n)
        else:  # embeddings before the blocks; a final norm after them joins the last block
            groups[-1 if seen_block and blocks else 0].append(n)
    return [g for g in groups if g]


def lock_tower(tower: nn.Module, mode: str, label: str = "tower") -> None:
    """Freeze the parameters `mode` names (see the module docstring)."""
    if not valid_lock(mode):
        raise UserError(f"lock_{label} must be none, all, backbone or top-N (e.g. top-2), not '{mode}'.")
    if mode == "none":
        return
    keep = set() if mode == "all" else set(projection_names(tower))
    if mode.startswith("top-"):
        n = int(mode[4:])
        groups = block_groups(tower)
        if n >= len(groups):
            raise UserError(
                f"lock_{label} '{mode}' leaves every layer group of this {label} tower unlocked (it has "
                f"{len(groups)}); use a smaller N or 'none'."
            )
        keep |= {name for group in groups[len(groups) - n :] for name in group}
    for name, p in tower.named_parameters():
        if name not in keep:
            p.requires_grad_(False)
