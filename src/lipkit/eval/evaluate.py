"""Evaluate a dual encoder on captioned image tables: zero-shot classification over metadata columns,
image↔text retrieval, optionally a linear probe per column, plus the examples and similarity heat map
the report shows."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from rich.progress import Progress

from lipkit.config import EvalConfig
from lipkit.data.records import Record
from lipkit.data.table_batches import ImageStore
from lipkit.errors import UserError
from lipkit.eval import token_similarity
from lipkit.eval.linear_probe import LinearProbe, fit_linear_probe
from lipkit.eval.retrieval import retrieval_chance, retrieval_scores_metrics
from lipkit.eval.zeroshot import class_embeddings, zeroshot_chance, zeroshot_scores_metrics
from lipkit.models.dual_encoder import DualEncoder
from lipkit.text.tokenizer import TextTokenizer


@torch.no_grad()
def embed_images(model: DualEncoder, store: ImageStore, batch_size: int) -> torch.Tensor:
    n = len(store.records)
    out = []
    with Progress(transient=True) as bar:
        task = bar.add_task("embedding images", total=n)
        for s in range(0, n, batch_size):
            out.append(model.embed_images_u8(store.get(range(s, min(n, s + batch_size)))))
            bar.advance(task, out[-1].shape[0])
    return torch.cat(out)


@torch.no_grad()
def embed_texts(
    model: DualEncoder,
    tokenizer: TextTokenizer,
    texts: Sequence[str],
    batch_size: int,
    encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Texts in batches through `encode` (default: the model's normalised text embedding) → float32 CPU."""
    encode = encode or model.encode_text
    dev = model.device
    return torch.cat(
        [
            encode(tokenizer(texts[s : s + batch_size]).to(dev)).float().cpu()
            for s in range(0, len(texts), batch_size)
        ]
    )


SIMILARITIES = ("dense", "filip", "lexical")


@torch.no_grad()
def lexical_images(model: DualEncoder, store: ImageStore, batch_size: int) -> torch.Tensor:
    """(N, V) LexLIP term weights of every image (the model's image lexicon head)."""
    n = len(store.records)
    return torch.cat(
        [
            model.lexical_images_u8(store.get(range(s, min(n, s + batch_size))))
            for s in range(0, n, batch_size)
        ]
    )


def lexical_texts(
    model: DualEncoder, tokenizer: TextTokenizer, texts: Sequence[str], batch_size: int
) -> torch.Tensor:
    """(T, V) LexLIP term weights of texts (the model's text lexicon head)."""
    return embed_texts(model, tokenizer, texts, batch_size, encode=model.encode_text_lexical)


def resolve_similarity(setting: str, objective: str | None) -> str:
    """eval.similarity → "dense", "filip" or "lexical" ("auto": filip for a model trained with the filip
    objective, lexical — sparse dot products of the LexLIP heads — for lexlip, dense otherwise)."""
    if setting == "auto":
        return {"filip": "filip", "lexlip": "lexical"}.get(objective or "", "dense")
    if setting not in SIMILARITIES:
        raise UserError(f"eval.similarity is '{setting}'; use auto, {', '.join(SIMILARITIES)}.")
    return setting


def fit_probes(
    model: DualEncoder, records: Sequence[Record], columns: Sequence[str], batch_size: int
) -> dict[str, LinearProbe]:
    """One linear probe per class column, fit on the image embeddings of the `records` labelled in that
    column (see eval.linear_probe); a column with fewer than 2 classes there is left out."""
    feats = None
    probes: dict[str, LinearProbe] = {}
    for column in columns:
        rows = [i for i, r in enumerate(records) if r.meta.get(column) not in (None, "")]
        values = [str(records[i].meta[column]) for i in rows]
        if len(set(values)) < 2:
            continue
        if feats is None:
            store = ImageStore(records, model.spec.image_size, cache=False, desc="probe table")
            was_training = model.training
            model.eval()
            feats = embed_images(model, store, batch_size)
            model.train(was_training)
        probes[column] = fit_linear_probe(feats[rows], values)
    return probes


def _spread(n: int, k: int) -> list[int]:
    return sorted({round(i * (n - 1) / max(1, k - 1)) for i in range(min(n, k))})


def evaluate_records(
    model: DualEncoder,
    tokenizer: TextTokenizer,
    records: Sequence[Record],
    cfg: EvalConfig,
    store: ImageStore | None = None,
    details: bool = True,
    similarity: str = "dense",
    probes: dict[str, LinearProbe] | None = None,
) -> dict[str, Any]:
    """Metrics (and chance levels) for one split; with `details`, also retrieval examples and a heat map.
    `similarity`: "dense" (cosine of pooled embeddings) or "filip" (token-wise, see eval.token_similarity).
    `probes`: linear probes per class column (`fit_probes`) scored as `probe/<column>/...`."""
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, not {similarity!r}")
    if similarity == "lexical" and not model.has_lexicon:
        raise UserError("eval.similarity=lexical needs a model with LexLIP heads (trained with lexlip).")
    was_training = model.training
    model.eval()
    store = store or ImageStore(records, model.spec.image_size, cache=True, desc="evaluation")
    filip = similarity == "filip"
    img = embed_images(model, store, cfg.batch_size) if similarity == "dense" or probes else None
    img_tok = token_similarity.image_tokens(model, store, cfg.batch_size) if filip else None
    img_lex = lexical_images(model, store, cfg.batch_size) if similarity == "lexical" else None
    metrics: dict[str, float] = {}
    chance: dict[str, float] = {}
    for column in cfg.class_columns:
        values = [r.meta.get(column) for r in records]
        if any(v in (None, "") for v in values):
            continue  # this table has no such labels: nothing to classify
        classes = sorted(set(values))
        labels = torch.tensor([classes.index(v) for v in values])
        prompts = [t.format(c) for c in classes for t in cfg.templates]
        if img_tok is not None:
            tok, mask = token_similarity.text_tokens(model, tokenizer, prompts, cfg.batch_size)
            scores = token_similarity.class_scores(img_tok, tok, mask, len(cfg.templates))
        elif img_lex is not None:  # a class is the mean of its prompts' term weights
            lex = lexical_texts(model, tokenizer, prompts, cfg.batch_size)
            scores = img_lex @ lex.view(len(classes), len(cfg.templates), -1).mean(1).t()
        else:
            cls = class_embeddings(
                embed_texts(model, tokenizer, prompts, cfg.batch_size), len(classes), len(cfg.templates)
            )
            scores = img @ cls.t()
        for name, v in zeroshot_scores_metrics(scores, labels).items():
            metrics[f"zeroshot/{column}/{name}"] = v
        for name, v in zeroshot_chance(labels, len(classes)).items():
            chance[f"zeroshot/{column}/{name}"] = v
        if probes and column in probes:
            p_scores, p_labels, _ = probes[column].classify(img, [str(v) for v in values])
            for name, v in zeroshot_scores_metrics(p_scores, p_labels).items():
                metrics[f"probe/{column}/{name}"] = v
            for name in ("top1", "top5", "mean_recall"):  # the same classes: the same chance
                chance[f"probe/{column}/{name}"] = chance[f"zeroshot/{column}/{name}"]
    captions = [r.captions[min(cfg.retrieval_caption, len(r.captions) - 1)] for r in records]
    texts = sorted(set(captions))
    index = {t: i for i, t in enumerate(texts)}
    relevant = torch.zeros(len(texts), len(records), dtype=torch.bool)
    relevant[torch.tensor([index[c] for c in captions]), torch.arange(len(records))] = True
    if img_tok is not None:
        s_image, s_text = token_similarity.pair_scores(
            img_tok, *token_similarity.text_tokens(model, tokenizer, texts, cfg.batch_size)
        )
        sims, image_to_text = s_text.t(), s_image  # (T, N) and (N, T)
    elif img_lex is not None:
        txt_lex = lexical_texts(model, tokenizer, texts, cfg.batch_size)
        sims = txt_lex @ img_lex.t()
        image_to_text = sims.t()
        metrics["lexicon/image_nonzero_terms"] = (img_lex > 0).sum(1).double().mean().item()
        metrics["lexicon/text_nonzero_terms"] = (txt_lex > 0).sum(1).double().mean().item()
    else:
        sims = embed_texts(model, tokenizer, texts, cfg.batch_size) @ img.t()
        image_to_text = sims.t()
    metrics.update(
        {f"retrieval/{k}": v for k, v in retrieval_scores_metrics(sims, image_to_text, relevant).items()}
    )
    chance.update({f"retrieval/{k}": v for k, v in retrieval_chance(relevant).items()})
    result: dict[str, Any] = {
        "similarity": similarity,
        "n_images": len(records),
        "n_texts": len(texts),
        "metrics": metrics,
        "chance": chance,
    }
    if details:
        examples = []
        for t in _spread(len(texts), 8):
            top = sims[t].topk(min(5, len(records)))
            examples.append(
                {
                    "query": texts[t],
                    "results": [
                        {
                            "image": str(records[i].image),
                            "score": round(s, 4),
                            "correct": bool(relevant[t, i]),
                        }
                        for s, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
                    ],
                }
            )
        rows = _spread(len(records), 8)
        cols = [index[captions[i]] for i in rows]
        result["examples"] = examples
        result["heatmap"] = {
            "texts": [texts[c] for c in cols],
            "images": [str(records[i].image) for i in rows],
            "sim": sims[cols][:, rows].tolist(),
        }
    model.train(was_training)
    return result
