"""An image–text matching head for the objectives that train one (objectives.itm): its settings on a new
model and a fresh one on a starting checkpoint (`model.init_from`) that has none."""

from __future__ import annotations

from typing import Any

from lipkit.models.dual_encoder import DualEncoder
from lipkit.train.inputs import requires

MATCH_LAYERS = 2  # the fusion depth when an objective needs a matching head and the config names none


def matcher_settings(needs: set[str], overrides: dict[str, Any]) -> dict[str, Any]:
    """The ModelSpec settings a new model gets for the objective's matching head (none when it trains none)."""
    if not requires(needs, "matcher") or overrides.get("match_layers"):
        return {}
    return {"match_layers": MATCH_LAYERS}


def attach_matcher(model: DualEncoder, needs: set[str], overrides: dict[str, Any]) -> None:
    """A fresh matching head on a starting model that has none."""
    if requires(needs, "matcher") and not model.has_matcher:
        model.add_matcher(
            overrides.get("match_layers") or MATCH_LAYERS,
            overrides.get("match_width", 0),
            overrides.get("match_heads", 4),
        )
