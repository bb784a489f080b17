"""LexLIP-style sparse lexicon representations (Luo et al., 2023, "LexLIP: Lexicon-Bottlenecked
Language-Image Pre-Training for Large-Scale Image-Text Sparse Retrieval").

A lexicon head maps the token features h_k (k = 1..N) of either tower to one non-negative weight per
vocabulary entry v, pooled by max over the (unmasked) tokens:

    w_v = max_k log(1 + relu(W h_k + b)_v)

so an image or caption becomes a sparse bag of words that an inverted index can search. Training
contrasts the lexicon vectors directly and keeps them sparse with the FLOPS regulariser (Paria et al.,
2020, "Minimizing FLOPs to Learn Efficient Sparse Representations"), whose weight grows quadratically
over the first T steps as in SPLADE (Formal et al., 2021):

    FLOPS(w) = Σ_v (1/B Σ_b w_bv)²
    λ_t      = λ · min(1, (t / T)²)
    L = InfoNCE(w_img, w_txt; τ) + λ_t · [FLOPS(w_img) + FLOPS(w_txt)] + μ · InfoNCE(x_img, y_txt; s)

InfoNCE(w_img, w_txt; τ) is CLIP's symmetric loss on the raw dot products <w_img_i, w_txt_j> / τ (lexicon
vectors are not normalised: their magnitude is what the index scores). λ = `flops_weight`,
T = `flops_warmup` (steps; 0 = λ from the start), τ = `temperature` (None: the model's learnable CLIP
scale). The last term, μ = `dense_weight` (default 1, as configs/methods/lexlip.yaml), is the ordinary
CLIP loss on the dense embeddings beside the lexical one (LexLIP keeps a dense path too), which gives the
towers a signal while the sparse heads are still finding their terms; μ = 0 turns it off, which
docs/methods.md measured to be degenerate (every image predicted the same class).

LexLIP's first stage, its lexicon-bottlenecked masked language modelling (objectives.lexicon_bottleneck:
L = L_self + L_i2t + L_t2t, the heads' softmaxed logits as continuous bags of words read by a weak
decoder), runs for the first `bottleneck_steps` steps of the same run (0: none, the contrastive stage
only); the contrastive stage follows, its FLOPS warm-up counted from its own first step. The paper runs
the stages as two trainings, each with its own warm-up and schedule; here the learning-rate schedule
spans both. The masked stage needs a bidirectional text tower with a [MASK] token (a pretrained
BERT-style one, as configs/methods/lexlip.yaml's base, the demo recipe, has).
"""

from __future__ import annotations

import torch
from torch import nn

from lipkit.models.lexicon_head import nonzero_terms
from lipkit.objectives.infonce import InfoNCE
from lipkit.objectives.lexicon_bottleneck import LexiconBottleneck


def flops_loss(weights: torch.Tensor) -> torch.Tensor:
    """Σ_v (mean over the batch of w_v)²: the expected cost of a sparse dot product, made differentiable."""
    return weights.mean(dim=0).pow(2).sum()


class LexiconContrast(nn.Module):
    """InfoNCE on lexicon dot products plus λ_t · FLOPS on both sides (plus μ · dense InfoNCE).

    The lexicon vectors (`image_lexicon`, `text_lexicon`, each (B, V)) come from the model's own lexicon
    heads (`model.overrides.lexicon_vocab`; the trainer turns them on for this objective), so they are
    exported with the checkpoint and usable by `lipkit index build --kind sparse`. The number of training
    steps seen (for the FLOPS warm-up) is a buffer, so it is checkpointed and resumed with the run.
    `last_stats` holds the last step's mean non-zero terms per image and per caption (in the masked stage:
    its three losses), which the trainer logs.
    With `bottleneck_steps` > 0 the first steps are LexLIP's masked stage (`bottleneck`, bound to the run's
    tokenizer and model before training: `bind_tokenizer`, `bind_model`); it re-encodes masked captions, so
    it reads the model itself and the first captions' token ids beside the image tokens.
    """

    def __init__(
        self,
        flops_weight: float = 1e-3,
        temperature: float | None = 1.0,
        flops_warmup: int = 50,
        dense_weight: float = 1.0,
        bottleneck_steps: int = 0,
        encoder_mask: float = 0.3,
        decoder_mask: float = 0.5,
        decoder_layers: int = 2,
    ) -> None:
        super().__init__()
        if (
            isinstance(bottleneck_steps, bool)
            or not isinstance(bottleneck_steps, int)
            or bottleneck_steps < 0
        ):
            raise ValueError(
                f"bottleneck_steps must be a whole number of steps ≥ 0, got {bottleneck_steps!r}"
            )
        self.flops_weight, self.temperature = flops_weight, temperature
        self.flops_warmup, self.dense_weight = flops_warmup, dense_weight
        self.bottleneck_steps = bottleneck_steps
        self.encoder_mask, self.decoder_mask, self.decoder_layers = encoder_mask, decoder_mask, decoder_layers
        self.inputs = ("image_lexicon", "text_lexicon", "logit_scale") + (
            ("image_features", "text_features") if dense_weight else ()
        )
        # the masked stage's options are checked even when it does not run
        stage = LexiconBottleneck(encoder_mask, decoder_mask, decoder_layers)
        self.bottleneck = stage if bottleneck_steps else None
        if bottleneck_steps:
            self.inputs += ("model", "text_ids", "image_tokens")
        self.infonce = InfoNCE()
        self.register_buffer("steps_seen", torch.zeros((), dtype=torch.long))
        self.last_stats: dict[str, torch.Tensor] = {}

    def bind_tokenizer(self, tokenizer: object) -> None:
        if self.bottleneck is not None:
            self.bottleneck.bind_tokenizer(tokenizer)

    def bind_model(self, model: nn.Module) -> None:
        """The masked stage's decoder, sized to the text tower (none without the stage). No momentum model."""
        if self.bottleneck is not None and getattr(model, "has_lexicon", False):
            self.bottleneck.bind_model(model)  # without heads the trainer's input check refuses the run

    def in_bottleneck_stage(self) -> bool:
        return int(self.steps_seen) < self.bottleneck_steps

    def flops_factor(self) -> float:
        """λ_t / λ: (t / T)² during the warm-up (t counted from the contrastive stage's first step), then 1."""
        if self.flops_warmup <= 0:
            return 1.0
        t = max(0, int(self.steps_seen) - self.bottleneck_steps)
        return min(1.0, (t / self.flops_warmup) ** 2)

    def forward(
        self,
        logit_scale: torch.Tensor,
        image_lexicon: torch.Tensor,
        text_lexicon: torch.Tensor,
        image_features: torch.Tensor | None = None,
        text_features: torch.Tensor | None = None,
        model: nn.Module | None = None,
        text_ids: torch.Tensor | None = None,
        image_tokens: torch.Tensor | None = None,
        **_: object,
    ) -> torch.Tensor:
        if self.bottleneck is not None and self.in_bottleneck_stage():
            assert model is not None and text_ids is not None and image_tokens is not None
            loss = self.bottleneck(model, image_tokens, text_ids, int(self.steps_seen))
            if torch.is_grad_enabled():
                self.steps_seen += 1
                self.last_stats = dict(self.bottleneck.last_stats)
            return loss
        scale = logit_scale
        if self.temperature is not None:
            scale = torch.tensor(
                1.0 / self.temperature, dtype=image_lexicon.dtype, device=image_lexicon.device
            )
        loss = self.infonce(image_lexicon, text_lexicon, scale)
        weight = self.flops_weight * self.flops_factor()
        if weight:
            loss = loss + weight * (flops_loss(image_lexicon) + flops_loss(text_lexicon))
        if self.dense_weight and image_features is not None and text_features is not None:
            loss = loss + self.dense_weight * self.infonce(image_features, text_features, logit_scale)
        if torch.is_grad_enabled():  # a training step: advance the warm-up, keep the numbers to log
            self.steps_seen += 1
            self.last_stats = {
                "lexicon/image_nonzero_terms": nonzero_terms(image_lexicon.detach()),
                "lexicon/text_nonzero_terms": nonzero_terms(text_lexicon.detach()),
            }
        return loss
