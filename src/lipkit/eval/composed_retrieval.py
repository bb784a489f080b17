"""Composed image retrieval in `lipkit eval`: a reference image plus modifying words must find the target
image among the split's images (data.composed: the split is the gallery and names the queries).

Each query is scored four ways, with the reference itself left out of its ranking (CIRR's protocol):

    image        v̂_r                                the reference alone
    text         t̂ = g(words)/‖·‖                   the words alone
    sum          (v̂_r + t̂)/‖v̂_r + t̂‖               the average of the two embeddings
    pic2word|rtd g("a photo of [φ(v̂_r)] that {words}") normalised — a checkpoint with a mapping network
                 (models.pseudo_word), named by the adapter (`rtd` when RTD tuned its text tower)

and reported as `composed/<way>/R@K` (K = 1, 5, 10, 50): the share of queries whose target is among the
K nearest gallery images (cosine), chance K/(N−1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lipkit.data.composed import has_composed, triplets
from lipkit.eval.embedding import embed_images, embed_texts
from lipkit.eval.retrieval import recall_at_k
from lipkit.models.pseudo_word import PROMPT, composed_features

KS = (1, 5, 10, 50)
SHOWN = 4  # queries shown in the report, spread over the split


@torch.no_grad()
def composed_queries(model, tokenizer, references: torch.Tensor, texts: Sequence[str], batch_size: int):
    """(Q, D) normalised composed queries of the model's mapping network (`references`: (Q, D) normalised
    reference embeddings), in batches."""
    prompt = (model.spec.adapter or {}).get("prompt", PROMPT)
    out = []
    for s in range(0, len(texts), batch_size):
        v = references[s : s + batch_size].to(model.device)
        q = composed_features(model.text, model.pseudo_word, tokenizer, v, texts[s : s + batch_size], prompt)
        out.append(F.normalize(q.float(), dim=-1).cpu())
    return torch.cat(out) if out else references.new_zeros(0, references.shape[1])


def model_queries(model, tokenizer, references: torch.Tensor, texts: Sequence[str], batch_size: int):
    """(Q, D) the checkpoint's own composed queries: its mapping network's when it has one, else the
    normalised sum of each reference and its words' embedding."""
    if model.pseudo_word is not None:
        return composed_queries(model, tokenizer, references, texts, batch_size)
    return F.normalize(references + embed_texts(model, tokenizer, texts, batch_size), dim=-1)


def composed_metrics(
    model, tokenizer, store, images: torch.Tensor | None, batch_size: int, metrics: dict, chance: dict
) -> dict | None:
    """Fill `metrics`/`chance` with composed/<way>/R@K for the queries of the split in `store` (`images`:
    its (N, D) normalised embeddings, or None to embed them); return what the report shows (counts and a
    few queries' top hits), or None when no row names a query."""
    records = store.records
    if not has_composed(records):
        return None
    found, missing = triplets(records)
    if not found:
        return {"queries": 0, "missing_reference": missing}
    images = embed_images(model, store, batch_size) if images is None else images
    ref = torch.tensor([t.reference for t in found])
    words = [t.text for t in found]
    v = images[ref]
    t = embed_texts(model, tokenizer, words, batch_size)
    ways = {"image": v, "text": t, "sum": F.normalize(v + t, dim=-1)}
    if getattr(model, "pseudo_word", None) is not None:  # ONNX models (quantize's check): none
        ways[model.spec.adapter["method"]] = composed_queries(model, tokenizer, v, words, batch_size)
    n = images.shape[0]
    # a table may hold an image in several rows: every row of the target's image is an answer, and no
    # row of the reference's image is
    path = [str(r.image) for r in records]
    rows_of: dict[str, list[int]] = {}
    for i, p in enumerate(path):
        rows_of.setdefault(p, []).append(i)
    relevant = torch.zeros(len(found), n, dtype=torch.bool)
    excluded = torch.zeros(len(found), n, dtype=torch.bool)
    for q, f in enumerate(found):
        relevant[q, rows_of[path[f.target]]] = True
        excluded[q, rows_of[path[f.reference]]] = True
    picked = torch.linspace(0, len(found) - 1, min(SHOWN, len(found))).round().long().unique()
    shown: dict = {}
    for way, q in ways.items():
        scores = q @ images.t()
        scores = scores.masked_fill(excluded, float("-inf"))  # the reference is not an answer
        for k, v_k in recall_at_k(scores, relevant, KS).items():
            metrics[f"composed/{way}/{k}"] = v_k
            chance[f"composed/{way}/{k}"] = min(1.0, int(k[2:]) / max(1, n - 1))
        shown[way] = scores[picked].topk(min(5, n - 1), dim=1).indices.tolist()
    examples = [
        {
            "reference": str(records[f.reference].image),
            "text": f.text,
            "target": str(records[f.target].image),
            "top": {way: [str(records[i].image) for i in tops[j]] for way, tops in shown.items()},
        }
        for j, f in enumerate(found[i] for i in picked.tolist())
    ]
    return {"queries": len(found), "missing_reference": missing, "examples": examples}
