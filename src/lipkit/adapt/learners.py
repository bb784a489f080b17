"""What each `lipkit adapt --method` trains and how it scores the shots; the loss is the same for all
(run.py): the cross-entropy of the logits over the shots. The formulas are in the modules' docstrings.

    lora          LoRA branches in the chosen towers (adapt.lora), merged afterwards
    coop          CoOp's prompt context (models.prompt_context), class-shared or class-specific
    gram          CoOp's class-shared context started from GRAM's meta-learned one (adapt.gram) and, with
                  --regulate, stepped by θ ← θ − lr·ψ(∇θ L) with the meta-learned regulator ψ
                  (models.gradient_regulator; by default the meta-training's inner loop: its inner steps
                  at its α), else AdamW (100 steps at 1e-3 by default)
    clip-adapter  CLIP-Adapter's residual MLP on the image features (models.image_adapter)
    tip, tip-f    Tip-Adapter's cache of the shots (models.tip_cache); tip-f trains its keys

A learner sees `Shots`: the shots' image features before normalisation (`raw`, computed once unless LoRA
adapts the image tower), the zero-shot classifier of eval's templates (`classes`, once unless LoRA adapts
the text tower), the labels and the checkpoint's logit scale t.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lipkit.adapt.gram import load_meta
from lipkit.adapt.lora import add_lora, merge
from lipkit.errors import UserError
from lipkit.eval.adapted_classes import prompt_class_features
from lipkit.eval.zeroshot import class_embeddings
from lipkit.models.dual_encoder import DualEncoder
from lipkit.models.gradient_regulator import RegulatedSGD
from lipkit.models.image_adapter import ImageAdapter
from lipkit.models.prompt_context import PromptContext
from lipkit.models.tip_cache import TipCache
from lipkit.text.tokenizer import TextTokenizer

TOWERS = {"text": ("text",), "image": ("visual",), "both": ("visual", "text")}


def template_class_features(
    model: DualEncoder, tokenizer: TextTokenizer, classes: list[str], templates: list[str]
) -> torch.Tensor:
    """(C, D) normalised class embeddings: each class's prompt embeddings averaged (with the graph when
    the text tower trains)."""
    ids = tokenizer([t.format(c) for c in classes for t in templates]).to(model.device)
    return class_embeddings(F.normalize(model.text(ids), dim=-1), len(classes), len(templates))


@dataclass
class Shots:
    model: DualEncoder
    tokenizer: TextTokenizer
    names: list[str]  # the class names, in label order
    raw: torch.Tensor | None  # (N, D) image features before normalisation (None: the image tower trains)
    classes: torch.Tensor | None  # (C, D) template class embeddings (None: the text tower trains)
    labels: torch.Tensor
    pixels: torch.Tensor | None  # (N, 3, S, S) normalised shots, when the image tower trains
    templates: list[str]

    def template_classes(self) -> torch.Tensor:
        """(C, D) the zero-shot classifier of the templates (kept, or computed when the text tower trains)."""
        if self.classes is not None:
            return self.classes
        return template_class_features(self.model, self.tokenizer, self.names, self.templates)

    @property
    def scale(self) -> torch.Tensor:
        return self.model.scale().detach()

    def images(self) -> torch.Tensor:
        raw = self.raw if self.raw is not None else self.model.visual(self.pixels)
        return F.normalize(raw, dim=-1)


class LoraLearner:
    method = "lora"

    def __init__(self, model: DualEncoder, towers: str, rank: int, alpha: float) -> None:
        self.towers, self.rank, self.alpha = towers, rank, alpha
        self.adapted = [getattr(model, name) for name in TOWERS[towers]]
        self.params = add_lora(self.adapted, rank, alpha)

    def logits(self, shots: Shots) -> torch.Tensor:
        return shots.scale * shots.images() @ shots.template_classes().t()

    def finish(self, model: DualEncoder, column: str) -> dict[str, Any]:
        merged = merge(self.adapted)
        return {"towers": self.towers, "rank": self.rank, "alpha": self.alpha, "weights_adapted": merged}


class CoopLearner:
    method = "coop"

    def __init__(self, model, tokenizer, names: list[str], length: int, init: str, class_specific: bool):
        words = tokenizer(init).to(model.device)[0] if init else None
        if words is not None:  # the phrase's own word pieces, without its start and end tokens
            ends = (words == tokenizer.eot_id).nonzero()
            pieces = words[1 : int(ends[0]) if ends.numel() else len(words)]
            if length and length != len(pieces):
                raise UserError(
                    f"--context {length} does not match the {len(pieces)} tokens of --context-init {init!r}; "
                    "pass one of them (the phrase sets the length), or an empty --context-init for random vectors."
                )
            length = len(pieces)
        if not length:
            raise UserError("CoOp needs --context N (random vectors) or a --context-init phrase.")
        self.context = PromptContext(model.text.word_width, length, names if class_specific else None)
        self.context.to(model.device)
        if words is not None:
            with torch.no_grad():
                self.context.context.copy_(
                    model.text.word_embedding(pieces[None]).expand_as(self.context.context)
                )
        self.init, self.params = init, list(self.context.parameters())

    def logits(self, shots: Shots) -> torch.Tensor:
        cls, _ = prompt_class_features(shots.model, shots.tokenizer, shots.names, self.context)
        return shots.scale * shots.images() @ cls.t()

    def finish(self, model: DualEncoder, column: str) -> dict[str, Any]:
        settings = {
            "method": "coop",
            "column": column,
            "context": self.context.context.shape[1],
            "classes": self.context.classes,
        }
        model.add_adapter(settings, self.context)
        return {
            "context": settings["context"],
            "context_init": self.init,
            "class_specific": bool(settings["classes"]),
        }


class GramLearner(CoopLearner):
    method = "gram"

    def __init__(self, model: DualEncoder, meta: str, regulate: bool, checkpoint=None) -> None:
        context, regulator, info = load_meta(meta, model.text.word_width, checkpoint)
        self.context = PromptContext(model.text.word_width, context.shape[1]).to(model.device)
        with torch.no_grad():
            self.context.context.copy_(context)
        self.regulator = regulator.to(model.device) if regulate else None
        self.meta, self.init, self.params = str(meta), "", list(self.context.parameters())
        self.meta_from = info.get("from")
        # regulated: the meta-training's inner loop (MAML adapts at test time as it meta-trained)
        self.default_lr = info["inner_lr"] if regulate else 1e-3
        self.default_steps = info["inner_steps"] if regulate else 100

    def optimizer(self, lr: float) -> torch.optim.Optimizer | None:
        """Regulated SGD; None (unregulated): the AdamW every learner gets (adapt.run)."""
        return None if self.regulator is None else RegulatedSGD(self.context.context, self.regulator, lr)

    def finish(self, model: DualEncoder, column: str) -> dict[str, Any]:
        extra = super().finish(model, column)
        return {
            "context": extra["context"],
            "meta": self.meta,
            "meta_from": self.meta_from,
            "regulate": self.regulator is not None,
        }


class ClipAdapterLearner:
    method = "clip-adapter"

    def __init__(self, model: DualEncoder, reduction: int, ratio: float) -> None:
        self.adapter = ImageAdapter(model.spec.embed_dim, reduction, ratio).to(model.device)
        self.reduction, self.params = reduction, list(self.adapter.parameters())

    def logits(self, shots: Shots) -> torch.Tensor:
        return shots.scale * F.normalize(self.adapter(shots.raw), dim=-1) @ shots.template_classes().t()

    def finish(self, model: DualEncoder, column: str) -> dict[str, Any]:
        model.add_adapter(
            {"method": "clip-adapter", "reduction": self.reduction, "ratio": self.adapter.ratio}, self.adapter
        )
        return {"reduction": self.reduction, "ratio": self.adapter.ratio}


class TipLearner:
    def __init__(self, model: DualEncoder, shots: Shots, alpha: float, beta: float, fine_tune: bool) -> None:
        self.method = "tip-f" if fine_tune else "tip"
        labels = shots.labels.tolist()
        self.cache = TipCache(model.spec.embed_dim, labels, shots.names, alpha, beta).to(model.device)
        with torch.no_grad():
            self.cache.keys.copy_(shots.images())
        self.cache.keys.requires_grad_(fine_tune)
        self.params = [self.cache.keys] if fine_tune else []

    def logits(self, shots: Shots) -> torch.Tensor:
        return self.cache.logits(shots.images(), shots.template_classes(), shots.scale, shots.names)

    def finish(self, model: DualEncoder, column: str) -> dict[str, Any]:
        c = self.cache
        settings = {
            "method": "tip",
            "column": column,
            "classes": c.classes,
            "keys": c.keys.shape[0],
            "alpha": c.alpha,
            "beta": c.beta,
        }
        model.add_adapter(settings, c)
        return {"alpha": c.alpha, "beta": c.beta, "keys": settings["keys"]}
