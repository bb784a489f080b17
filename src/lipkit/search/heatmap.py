"""A heat map for a query: where in one image a text matches (eval.heatmaps; docs/localization.md), as
`lipkit serve` answers GET /heatmap. The grid covers the centre square of the image that the model sees
(lipkit's resize and centre crop), token (r, c) of its h × w cells centred at ((c + ½)/w, (r + ½)/h)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lipkit.data.transforms import normalize
from lipkit.eval import heatmaps
from lipkit.models.dual_encoder import DualEncoder
from lipkit.search.encode import inference_precision
from lipkit.text.tokenizer import TextTokenizer


def query_heatmap(
    model: DualEncoder, tokenizer: TextTokenizer, image_u8: torch.Tensor, text: str, kind: str, precision: str
) -> dict[str, Any]:
    """uint8 (3, S, S) at the model's size and a text → {"kind", "grid": h × w scores, "peak": [x, y]}
    (the centre of the highest cell, fractions of the side); `kind`: one of eval.heatmaps.MAP_KINDS."""
    if kind not in heatmaps.MAP_KINDS:
        raise ValueError(f"kind must be one of {heatmaps.MAP_KINDS}, not {kind!r}")
    spec = model.spec
    x = normalize(image_u8[None], spec.image_mean, spec.image_std).to(model.device)
    ids = tokenizer([text]).to(model.device)
    with inference_precision(model, precision):
        if kind == "gradcam":
            with torch.no_grad():
                text_emb = model.encode_text(ids).float()
            maps = heatmaps.gradcam_maps(model, x, text_emb[None])
        else:
            tokens = heatmaps.token_features(model, x)
            with torch.no_grad():
                if kind == "filip":
                    _, words = model.text(ids, return_tokens=True)
                    words = F.normalize(words.float(), dim=-1)
                    maps = heatmaps.filip_maps(tokens, words[None], (ids != spec.pad_id)[None])
                else:
                    maps = heatmaps.similarity_maps(tokens, model.encode_text(ids).float()[None])
    grid = maps[0, 0].float().cpu()
    return {
        "kind": kind,
        "grid": (torch.round(grid * 1e4) / 1e4).tolist(),
        "peak": [round(v, 6) for v in heatmaps.peak_points(grid).tolist()],
    }
