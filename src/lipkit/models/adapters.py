"""What `lipkit adapt` adds beside a model's towers, built from `ModelSpec.adapter` so a checkpoint restores
it: CoOp's prompt context (models.prompt_context), CLIP-Adapter's image adapter (models.image_adapter),
Tip-Adapter's cache (models.tip_cache), PTUnifier's pseudo-token pools (models.pseudo_tokens; the
matching head they feed is the model's own) or Pic2Word's mapping network for composed queries (models.pseudo_word;
`rtd` is the same network beside a text tower RTD tuned). LoRA is not here: it is merged into the towers'
weights."""

from __future__ import annotations

from typing import Any

from torch import nn

from lipkit.errors import UserError
from lipkit.models.image_adapter import ImageAdapter
from lipkit.models.prompt_context import PromptContext
from lipkit.models.pseudo_tokens import PseudoTokenPools
from lipkit.models.pseudo_word import PseudoWord
from lipkit.models.tip_cache import TipCache

METHODS = ("coop", "clip-adapter", "tip", "pic2word", "rtd", "ptunifier")
COMPOSERS = ("pic2word", "rtd")  # adapters that build composed queries


def adapter_of(settings: dict[str, Any], embed_dim: int, text: nn.Module) -> nn.Module:
    """The adapter module `settings` (a spec's `adapter`) describes, freshly initialised."""
    method = settings.get("method")
    try:
        if method == "coop":
            classes = settings.get("classes") or None
            return PromptContext(text.word_width, int(settings["context"]), classes)
        if method == "clip-adapter":
            return ImageAdapter(embed_dim, int(settings["reduction"]), float(settings["ratio"]))
        if method == "tip":
            labels = [0] * int(settings["keys"])  # the values are a buffer: the checkpoint restores them
            return TipCache(
                embed_dim, labels, settings["classes"], float(settings["alpha"]), float(settings["beta"])
            )
        if method == "ptunifier":
            sizes = (int(settings["pool"]), int(settings["image_tokens"]), int(settings["text_tokens"]))
            try:
                return PseudoTokenPools(embed_dim, *sizes)
            except ValueError as e:
                raise UserError(
                    f"model adapter {settings!r} does not fit ({e}); re-run `lipkit adapt`."
                ) from e
        if method in COMPOSERS:
            return PseudoWord(embed_dim, text.word_width, int(settings["hidden"]), float(settings["dropout"]))
    except KeyError as e:
        raise UserError(f"model adapter {settings!r} lacks the setting {e}; re-run `lipkit adapt`.") from e
    raise UserError(f"model adapter method must be one of {', '.join(METHODS)}, not {method!r}.")


def applies_to(settings: dict[str, Any] | None, column: str) -> bool:
    """Whether a class head (CoOp's context, Tip-Adapter's cache) scores the classes of `column`."""
    return bool(settings) and settings.get("method") in ("coop", "tip") and settings.get("column") == column
