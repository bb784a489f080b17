"""The connector recipe of the LLaVA / visual-prompt-generator line at small scale, and VPGTrans's transfer
of a connector to another language model (Zhang et al., 2023, "Transfer Visual Prompt Generator across
LLMs"; the recipe is LLaVA's first stage, BLIP-2's second, generative one).

Two objectives train a prefix decoder (models.prefix_decoder: a causal language model reading an image as
Q soft prompts made by a connector = a visual prompt generator (VPG) + a linear projector), with NLL_i the
summed negative log-likelihood of first caption i's tokens after the start token and T_i their count, over
the global batch:

- `text_lm` pre-trains the language model on the captions alone (no image, no prompts) — the small
  stand-in for a pre-trained LLM:          L = Σ_i NLL(w_i) / Σ_i T_i
- `connector` trains the connector with the language model and both towers frozen, so the LM learns
  nothing and the connector learns to say the image in the LM's input space:
                                           L = Σ_i NLL(w_i | P(image_i)) / Σ_i T_i

VPGTrans (`connector` with `transfer_from`: a connector trained on another language model of the same
tokenizer, of another width): the target's VPG starts as the source's, and its projector as the source's
projector merged with a word converter — the affine map that takes the source LM's word embeddings to the
target LM's, fitted by least squares over the tokens of the training captions:

    [E_src, 1] · C ≈ E_tgt  (C = argmin ‖[E_src, 1] C − E_tgt‖²)
    W_tgt = C_Wᵀ W_src,  b_tgt = C_Wᵀ b_src + c       (C = [C_W; c])

so a prompt the source LM read as a mix of its words reaches the target LM as the same mix of its words.
The paper's stage 1, projector warm-up (the VPG frozen, the projector trained at 5× the learning rate), is
`train_vpg: false` with the learning rate raised (configs/methods/vpgtrans.yaml); its stage 2, vanilla
fine-tuning, is a second run from the first's checkpoint with `train_vpg: true` (docs/captioning.md). The
transfer is computed on rank 0 and sent to every rank; a resumed run keeps its own connector.

What is not implemented: the paper's language models are pre-trained LLMs (OPT 125M–6.7B, FlanT5) and its
VPG BLIP-2's Q-Former; here both LMs are small transformers pre-trained on the training captions and the
VPG one layer. The paper trains its converter by gradient descent on a cosine loss over the whole
vocabulary; lipkit fits it in closed form over the tokens of the captions the language models learned
(each record's first caption when they learn one; the rest of a small LM's vocabulary never left its
random initialisation). Its transfer across LLM types (OPT → FlanT5) is
not reproduced: both LMs here are the same architecture in two sizes.
"""

from __future__ import annotations

import torch
from torch import nn


def _mean_nll(nll: torch.Tensor | None, tokens: torch.Tensor | None, what: str) -> torch.Tensor:
    if nll is None or tokens is None:
        raise ValueError(f"the {what} loss reads its summed NLL and token counts")
    return nll.sum() / tokens.sum().clamp(min=1).to(nll.dtype)


class TextLanguageModel(nn.Module):
    """The mean next-token NLL of the first captions, no image: pre-trains a prefix decoder's language model."""

    inputs = ("lm_nll", "lm_tokens")

    def forward(
        self, lm_nll: torch.Tensor | None = None, lm_tokens: torch.Tensor | None = None, **_: object
    ) -> torch.Tensor:
        return _mean_nll(lm_nll, lm_tokens, "language-model")


class ConnectorCaption(nn.Module):
    """The mean next-token NLL of the first captions given their images' soft prompts (the connector trains)."""

    inputs = ("prefix_caption_nll", "prefix_caption_tokens")

    def __init__(self, transfer_from: str | None = None, train_vpg: bool = True) -> None:
        """transfer_from: a checkpoint whose connector (trained on another language model) starts this one;
        train_vpg: false trains the projector alone (VPGTrans's warm-up)."""
        super().__init__()
        if transfer_from is not None and not isinstance(transfer_from, str):
            raise ValueError(
                f"transfer_from must be a checkpoint directory (e.g. runs/connector/checkpoint), got {transfer_from!r}"
            )
        if not isinstance(train_vpg, bool):
            raise ValueError(
                f"train_vpg must be true or false (false: the projector alone), got {train_vpg!r}"
            )
        self.transfer_from, self.train_vpg = transfer_from or None, train_vpg

    def forward(
        self,
        prefix_caption_nll: torch.Tensor | None = None,
        prefix_caption_tokens: torch.Tensor | None = None,
        **_: object,
    ) -> torch.Tensor:
        return _mean_nll(prefix_caption_nll, prefix_caption_tokens, "connector captioning")


def word_converter(source: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(C_W (W_src, W_tgt), c (W_tgt,)): the least-squares affine map [source, 1] · [C_W; c] ≈ target over
    paired word-embedding rows (float64; the minimum-norm solution when rows are fewer than W_src + 1)."""
    a = torch.cat([source.double(), source.new_ones(source.shape[0], 1, dtype=torch.float64)], dim=1)
    solution = torch.linalg.lstsq(a, target.double(), driver="gelsd").solution  # (W_src + 1, W_tgt)
    return solution[:-1], solution[-1]


def transferred_projector(
    weight: torch.Tensor, bias: torch.Tensor, converter: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The source projector (weight (W_src, D), bias (W_src,)) followed by the converter, as one linear map:
    (weight (W_tgt, D), bias (W_tgt,)) in the source's dtype."""
    c_w, c = converter
    new_weight = c_w.t() @ weight.double()
    new_bias = c_w.t() @ bias.double() + c
    return new_weight.to(weight.dtype), new_bias.to(bias.dtype)
