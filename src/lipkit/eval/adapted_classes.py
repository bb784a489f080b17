"""Zero-shot scores of a checkpoint that `lipkit adapt` gave a class head: CoOp's learned prompt context
(models.prompt_context) or Tip-Adapter's cache (models.tip_cache), on the column it was adapted to."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lipkit.models.adapters import applies_to
from lipkit.models.dual_encoder import DualEncoder
from lipkit.models.prompt_context import PromptContext
from lipkit.text.tokenizer import TextTokenizer

PROMPT = "{}."  # CoOp's prompt around the class name: [SOS] [V]_1 … [V]_M name . [EOS]


def prompt_class_features(
    model: DualEncoder, tokenizer: TextTokenizer, classes: list, context: PromptContext, batch_size: int = 0
) -> tuple[torch.Tensor, list[int]]:
    """(C′, D) normalised class embeddings from the learned context for the C′ classes that have one (all
    of them with a class-shared context), and their indices in `classes`. With the graph when the context
    trains; `batch_size` > 0 encodes that many prompts at a time (evaluation)."""
    rows = context.rows([str(c) for c in classes])
    have = [i for i, r in enumerate(rows) if r is not None]
    ids = tokenizer([PROMPT.format(classes[i]) for i in have]).to(model.device)
    step = batch_size or max(1, len(have))
    feats = [
        context.features(model.text, ids[s : s + step], [rows[i] for i in have[s : s + step]])
        for s in range(0, len(have), step)
    ]
    out = torch.cat(feats) if feats else ids.new_zeros((0, model.spec.embed_dim), dtype=torch.float)
    return F.normalize(out.float(), dim=-1), have


@torch.no_grad()
def adapted_class_scores(
    model: DualEncoder,
    tokenizer: TextTokenizer,
    images: torch.Tensor,
    classes: list,
    column: str,
    template_classes: torch.Tensor,
    batch_size: int,
) -> torch.Tensor | None:
    """(N, C) scores of the normalised `images` against `classes` through the model's class head, or None
    when it has none for `column`. `template_classes` (C, D) is the zero-shot classifier of eval's
    templates: CoOp's class-specific context replaces the rows of the classes it holds, Tip-Adapter adds
    its cache to those logits (divided by the logit scale: the same ranking, on the cosine's scale)."""
    if not applies_to(
        getattr(getattr(model, "spec", None), "adapter", None), column
    ):  # (an ONNX stand-in has no spec.adapter)
        return None
    adapter = model.adapter
    if isinstance(adapter, PromptContext):
        learned, have = prompt_class_features(model, tokenizer, classes, adapter, batch_size)
        cls = template_classes.clone()
        cls[have] = learned.to(cls.device, cls.dtype)
        return images @ cls.t()
    dev, scale = model.device, model.scale().detach().float()
    logits = adapter.logits(images.to(dev).float(), template_classes.to(dev).float(), scale, classes)
    return (logits / scale).to(images.device)
