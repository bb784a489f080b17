"""GLSCL (Zhang et al., 2024, "Text-Video Retrieval with Global-Local Semantic Consistent Learning"; read
against the authors' code, github zchoi/GLSCL, tvr/models/modeling.py, and its MSR-VTT recipe): a clip is
scored against a caption globally, by a parameter-free text-conditioned pooling of its frames, and locally,
by K learnable queries that one shared decoder runs over the frames and, alike, over the words.

With t_a the caption's embedding, s_{b,t} the temporal head's state of frame t of clip b (models/temporal.py;
frame_features), w_{a,r} the caption's word features (text_tokens) and x̂ = x/‖x‖:

    global (GIM):  α_{abt} = softmax_t(t̂_a·ŝ_{bt} / τ_g),   S^g_ab = cos(t_a, Σ_t α_{abt} s_{bt})
    local (LIM):   V_b = norm(Dec(Q, ŝ_b)),  W_a = norm(Dec(Q, ŵ_a)),  S^l_ab = 1/K Σ_k W_ak·V_bk
                   (Q: K queries and Dec: a post-norm transformer decoder — both shared by the modalities)
    S = S^g + λ S^l,   L_c = ½ [CE_rows(τ S) + CE_cols(τ S)]          (τ the model's logit scale)
    IDL (diversity of one clip's concepts): D = mean_b V_b V_bᵀ (K × K),
        L_div = Σ_{i≠j} [max(0, m + D_ij − D_ii) + max(0, m + D_ij − D_jj)] / (K(K − 1))
    ICL (consistency of the modalities' concepts): L_con = MSE(mean_b V_b, mean_b W_b)
        + β Σ_k (mean_b V_bk·W_bk − μ)²
    L = L_c + α L_div + L_con

Defaults are the recipe's (train_msrvtt.sh): K = 8 queries, 3 decoder layers, τ_g = 3 over CLIP's unnormalised
features (norms near 10), here 0.03 over cosines; λ = 0.5, α = 1e-4, β = 0.02, m = 0.1, μ = 0.75.

Differences from the code: the pooling weights come from cosines (the code's from raw dot products, so a
frame of larger norm weighs more there); every clip has T frames, so no frame is masked (a clip shorter than T
repeats frames, which then count twice; the code masks padded frames); the decoder has no dropout (a step is
exact across ranks and resumes), its feed-forward is 4·D wide (the code's 2048, the same at D = 512), it masks
the captions' padding (the code attends to it) and reads normalised frame states and words; the diagonal term
takes the batch mean of V_bk·W_bk (the code divides the batch's sum by K). The diversity term covers the
clips' queries only, as the code's loss does. GLSCL's inference uses the global score alone, and so does
`lipkit eval` for a glscl run (eval/frame_similarity.py); the index and the server score a clip by its temporal
head's pooled embedding, as a text-dependent score cannot be indexed (for the mean and transformer heads that is
S^g with τ_g → ∞; slice pooling weighs the frames by its own query).
Not implemented: the code's per-chunk ("center") variant of the global score.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lipkit.objectives.infonce import WidthBound


def global_scores(text: torch.Tensor, frames: torch.Tensor, temperature: float) -> torch.Tensor:
    """(N_t, N_v) S^g: each caption (N_t, D) against each clip's text-conditioned pooling of its (N_v, T, D)
    frame states (the module docstring). The pooled vectors p_ab are never built: t̂_a·p_ab = Σ_t α_abt t̂_a·s_bt
    and ‖p_ab‖² = Σ_tu α_abt α_abu s_bt·s_bu, so memory is N_t·N_v·T, not N_t·N_v·D."""
    t = F.normalize(text, dim=-1)
    dots = torch.einsum("ad,btd->abt", t, frames)  # t̂_a · s_bt
    weights = (dots / frames.norm(dim=-1).clamp(min=1e-12) / temperature).softmax(-1)  # cosines / τ_g
    gram = frames @ frames.transpose(1, 2)  # (N_v, T, T)
    square = torch.einsum("abt,btu,abu->ab", weights, gram, weights)
    return (weights * dots).sum(-1) / square.clamp(min=0).sqrt().clamp(min=1e-12)


def diversity_loss(concepts: torch.Tensor, margin: float) -> torch.Tensor:
    """L_div of (B, K, D) normalised query outputs: each query's mean cosine to another query at least
    `margin` below its own, both ways."""
    sims = torch.einsum("bid,bjd->ij", concepts, concepts) / concepts.shape[0]
    diag = sims.diagonal()
    k = sims.shape[0]
    off = ~torch.eye(k, dtype=torch.bool, device=sims.device)
    cost = (margin + sims - diag[:, None]).clamp(min=0) + (margin + sims - diag[None, :]).clamp(min=0)
    return cost[off].sum() / max(1, k * (k - 1))


def consistency_loss(clips: torch.Tensor, words: torch.Tensor, beta: float, target: float) -> torch.Tensor:
    """L_con of the (B, K, D) normalised query outputs of clips and of their captions."""
    paired = (clips * words).sum(-1).mean(0)  # (K,) mean cosine of each query's two outputs
    return F.mse_loss(clips.mean(0), words.mean(0)) + beta * (paired - target).pow(2).sum()


class SharedQueries(nn.Module):
    """K learnable queries read out of a sequence by one transformer decoder, the same for frames and words."""

    def __init__(self, width: int, queries: int, layers: int, heads: int) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.rand(queries, width))  # uniform in [0, 1), as the code
        layer = nn.TransformerDecoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True)
        self.decoder = nn.TransformerDecoder(layer, layers)

    def forward(self, memory: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, D) sequence (and its (B, L) padding, true where padded) → (B, K, D) normalised outputs."""
        memory = F.normalize(memory.to(self.queries.dtype), dim=-1)
        q = self.queries.expand(memory.shape[0], -1, -1)
        return F.normalize(self.decoder(q, memory, memory_key_padding_mask=padding), dim=-1)


class GlobalLocalConsistency(WidthBound):
    local_form: ClassVar[str | None] = None
    inputs: ClassVar[tuple[str, ...]] = (
        "text_features",
        "logit_scale",
        "frame_features",
        "text_tokens",
        "text_mask",
    )

    def __init__(
        self,
        queries: int = 8,
        layers: int = 3,
        heads: int = 8,
        pool_temperature: float = 0.03,
        local_weight: float = 0.5,
        diversity_weight: float = 1e-4,
        consistency_beta: float = 0.02,
        margin: float = 0.1,
        consistency_target: float = 0.75,
    ) -> None:
        super().__init__()
        if queries < 1 or layers < 1 or heads < 1:
            raise ValueError("queries, layers and heads must be 1 or more")
        if pool_temperature <= 0 or min(local_weight, diversity_weight, consistency_beta, margin) < 0:
            raise ValueError("pool_temperature must be above 0 and the weights and margin 0 or more")
        self.queries, self.layers, self.heads = queries, layers, heads
        self.pool_temperature, self.local_weight = pool_temperature, local_weight
        self.diversity_weight, self.margin = diversity_weight, margin
        self.consistency_beta, self.consistency_target = consistency_beta, consistency_target
        self.local: SharedQueries | None = None  # sized to the embeddings by bind_model / bind_width

    def bind_width(self, dim: int) -> None:
        if dim % self.heads:
            raise ValueError(
                f"the embedding width {dim} must divide into heads={self.heads}; set objective_args.heads"
            )
        self.local = SharedQueries(dim, self.queries, self.layers, self.heads)

    def concepts(
        self, frames: torch.Tensor, words: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(clips' V (B_v, K, D), captions' W (B_t, K, D)) from frame states and word features."""
        if self.local is None:
            raise ValueError("bind_model(model) sizes the shared queries before the first batch")
        return self.local(frames), self.local(words, ~mask.bool())

    def forward(
        self,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        frame_features: torch.Tensor,
        text_tokens: torch.Tensor,
        text_mask: torch.Tensor,
        **_: object,
    ) -> torch.Tensor:
        clips, words = self.concepts(frame_features, text_tokens, text_mask)
        dtype = torch.promote_types(clips.dtype, torch.float32)
        scores = global_scores(text_features.to(dtype), frame_features.to(dtype), self.pool_temperature)
        local = torch.einsum("akd,bkd->ab", words.to(dtype), clips.to(dtype)) / clips.shape[1]
        scores = scores + self.local_weight * local
        logits = logit_scale * scores
        labels = torch.arange(logits.shape[0], device=logits.device)
        contrast = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
        div = diversity_loss(clips.to(dtype), self.margin)
        con = consistency_loss(
            clips.to(dtype), words.to(dtype), self.consistency_beta, self.consistency_target
        )
        return contrast + self.diversity_weight * div + con
