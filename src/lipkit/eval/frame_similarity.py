"""Evaluation of clips with GLSCL's global score instead of the pooled embedding (`eval.similarity: frames`,
the `auto` choice for checkpoints trained with the glscl objective; objectives/glscl.py): each text pools a
clip's frame states (what the temporal head pools, models/temporal.py) by its own weights,

    S_ab = cos(t_a, Σ_t softmax_t(cos(t_a, s_bt) / τ_g) s_bt)

with τ_g `eval.frame_temperature` (0: the run's own pool_temperature). A zero-shot class is the mean of its
prompts' normalised embeddings, as under the dense cosine. The index and the server score by the pooled
embedding (S with τ_g → ∞): this score depends on the text, so it cannot be indexed ahead of the query.
"""

from __future__ import annotations

import torch

from lipkit.data.image_store import ImageStore
from lipkit.data.transforms import normalize
from lipkit.errors import UserError
from lipkit.models.dual_encoder import DualEncoder
from lipkit.objectives.glscl import global_scores

TEXTS_AT_ONCE = 64  # texts scored together: a (texts, clips, D) pooled tensor at a time


@torch.no_grad()
def frame_states(model: DualEncoder, store: ImageStore, batch_size: int) -> torch.Tensor:
    """(N, T, D) the temporal head's state of every frame of every clip, float32 on the CPU."""
    n, out = len(store.records), []
    for s in range(0, n, batch_size):
        clips = store.get(range(s, min(n, s + batch_size)))
        if clips.dim() != 5:
            raise UserError(
                "eval.similarity=frames scores clips (a `frames` column, or shards of clips); this split holds "
                "images: set eval.similarity=dense."
            )
        x = normalize(clips, model.spec.image_mean, model.spec.image_std).to(model.device)
        out.append(model.frame_states(x).float().cpu())
    return torch.cat(out)


def frame_scores(texts: torch.Tensor, frames: torch.Tensor, temperature: float) -> torch.Tensor:
    """(N_texts, N_clips) scores of (N_texts, D) text embeddings against (N_clips, T, D) frame states."""
    if not len(texts):
        return torch.zeros(0, frames.shape[0])
    return torch.cat(
        [
            global_scores(texts[s : s + TEXTS_AT_ONCE].float(), frames, temperature)
            for s in range(0, len(texts), TEXTS_AT_ONCE)
        ]
    )
