"""Evaluate a dual encoder on captioned image tables: zero-shot classification over metadata columns,
image↔text retrieval, optionally a linear probe per column, plus the examples and heat map the report shows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from lipkit.config import EvalConfig
from lipkit.data.frames import shown_frames
from lipkit.data.image_store import ImageStore
from lipkit.data.label_sets import INDEX_SUFFIX, LabelSet, fill_template
from lipkit.data.records import Record, describe
from lipkit.errors import UserError
from lipkit.eval import token_similarity
from lipkit.eval.adapted_classes import adapted_class_scores
from lipkit.eval.caption_eval import caption_split
from lipkit.eval.composed_retrieval import composed_metrics
from lipkit.eval.embedding import embed_images, embed_texts
from lipkit.eval.frame_similarity import frame_scores, frame_states
from lipkit.eval.linear_probe import LinearProbe, fit_linear_probe
from lipkit.eval.localization import localization_metrics
from lipkit.eval.multilabel import multilabel_zeroshot
from lipkit.eval.regions import has_regions, region_metrics
from lipkit.eval.rerank import rerank_metrics
from lipkit.eval.retrieval import RetrievalTexts, retrieval_chance, retrieval_scores_metrics
from lipkit.eval.similarity_choice import SIMILARITIES
from lipkit.eval.zeroshot import class_embeddings, zeroshot_chance, zeroshot_scores_metrics
from lipkit.models.dual_encoder import DualEncoder
from lipkit.text.tokenizer import TextTokenizer


def image_style(cfg: EvalConfig) -> str:
    """How evaluation decodes images: OpenCLIP's way under `eval.protocol: clip_benchmark`, else lipkit's."""
    return "open_clip" if cfg.protocol == "clip_benchmark" else "lipkit"


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


def fit_probes(
    model: DualEncoder,
    records: Sequence[Record],
    columns: Sequence[str],
    batch_size: int,
    style: str = "lipkit",
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
            store = ImageStore(records, model.spec.image_size, cache=False, desc="probe table", style=style)
            was_training = model.training
            model.eval()
            feats = embed_images(model, store, batch_size)
            model.train(was_training)
        probes[column] = fit_linear_probe(feats[rows], values)
    return probes


def check_has_images(split: str, store: ImageStore) -> None:
    """A UserError naming the split when none of its images can be used (every one missing or corrupt,
    or no rows at all): evaluation needs at least one."""
    if store.records:
        return
    what = f"The evaluation split '{split}'" if split else "The evaluation table"
    if store.skipped:
        raise UserError(
            f"{what} has no usable image ({describe(store.skipped)}, e.g. '{store.problems[0].key}'); "
            "fix its image paths or drop the split."
        )
    raise UserError(f"{what} has no rows; point it at a table with images or drop the split.")


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
    split: str = "",
    labels: dict[str, LabelSet] | None = None,
    scorer: tuple[DualEncoder, TextTokenizer] | None = None,
) -> dict[str, Any]:
    """Metrics (and chance levels) for one split; with `details`, also retrieval examples and a heat map.
    `similarity`: "dense" (cosine of pooled embeddings), "filip" (token-wise, see eval.token_similarity),
    "lexical" or "frames" (clips, eval.frame_similarity).
    `probes`: linear probes per class column (`fit_probes`) scored as `probe/<column>/...`. `labels`:
    the classes and templates of a set that names them itself (registry.eval_labels), by column; those
    columns are classified too. A model with a caption decoder captions the split (eval.caption_eval;
    `scorer`: the other checkpoint that gives CLIP-score). Retrieval needs captions: a split without any
    has none; rows naming composed queries: eval.composed_retrieval. A split with no usable image (every
    one missing or corrupt, or none at all) is a UserError naming `split`."""
    similarity = _checked_similarity(similarity, model, records)
    was_training = model.training
    model.eval()
    style = image_style(cfg)
    store = store or ImageStore(records, model.spec.image_size, cache=True, desc="evaluation", style=style)
    check_has_images(split, store)
    images = _embed_split(model, store, cfg.batch_size, similarity, probes, cfg)
    metrics: dict[str, float] = {}
    chance: dict[str, float] = {}
    labels = labels or {}
    for column in [*cfg.class_columns, *(c for c in labels if c not in cfg.class_columns)]:
        label_set = labels.get(column)
        _classify(model, tokenizer, records, cfg, images, column, probes, metrics, chance, label_set)
    result: dict[str, Any] = {"similarity": similarity, "n_images": len(records), "n_texts": 0}
    if any(r.captions for r in records):
        texts = RetrievalTexts.of(records, cfg.retrieval_caption, cfg.protocol == "clip_benchmark")
        sims = _retrieve(model, tokenizer, cfg.batch_size, images, texts, metrics, chance)
        if getattr(model, "has_matcher", False) and cfg.rerank_top:  # ONNX models: none
            rerank_metrics(
                model,
                tokenizer,
                store,
                texts.texts,
                texts.relevant,
                sims,
                cfg.rerank_top,
                cfg.batch_size,
                metrics,
                chance,
            )
        if cfg.group_by:
            _retrieve_per_group(model, tokenizer, cfg, records, images, metrics, chance, split)
        result["n_texts"] = len(texts.texts)
        if details:
            result.update(_details(records, texts, sims))
    # boxes with one caption each: region retrieval, pointing, segmentation — for towers with a token grid
    if has_regions(records) and getattr(model.visual, "has_token_grid", True):
        region_metrics(model, tokenizer, store, cfg.batch_size, metrics, chance)
        filip = similarity == "filip"
        drawn = localization_metrics(model, tokenizer, store, cfg.batch_size, metrics, chance, filip)
        if details and drawn:
            result["localization"] = drawn
    shown = composed_metrics(model, tokenizer, store, images.dense, cfg.batch_size, metrics, chance)
    if details and shown:  # rows naming composed queries (reference image + words → target)
        result["composed"] = shown
    if getattr(model, "has_captioner", False) and any(r.captions for r in records):  # ONNX models: none
        shown = caption_split(model, tokenizer, store, cfg, metrics, scorer)
        if details and shown:
            result["captions"] = shown
    result.update(metrics=metrics, chance=chance)
    model.train(was_training)
    return result


def _checked_similarity(similarity: str, model: DualEncoder, records: Sequence[Record]) -> str:
    """`similarity` for this model and split: frames scores clips of a model `lipkit adapt` did not change
    (images, and its class heads or CLIP-Adapter, are scored by the pooled cosine)."""
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, not {similarity!r}")
    if similarity == "lexical" and not model.has_lexicon:
        raise UserError("eval.similarity=lexical needs a model with LexLIP heads (trained with lexlip).")
    adapted = getattr(model.spec, "adapter", None)  # (an ONNX stand-in has no spec.adapter)
    if similarity == "frames" and (adapted or not records or records[0].frames is None):
        return "dense"
    return similarity


@dataclass
class _Images:
    """A split's images under the similarity in use (and dense embeddings for linear probes)."""

    dense: torch.Tensor | None  # (N, D) pooled embeddings
    tokens: Any  # FILIP: token embeddings (eval.token_similarity.image_tokens)
    lexical: torch.Tensor | None  # LexLIP: (N, V) term weights
    frames: torch.Tensor | None = None  # GLSCL: (N, T, D) frame states (eval.frame_similarity)
    temperature: float = 0.0  # of the frames' score (eval.frame_temperature)


def _embed_split(
    model: DualEncoder,
    store: ImageStore,
    batch_size: int,
    similarity: str,
    probes: dict[str, LinearProbe] | None,
    cfg: EvalConfig,
) -> _Images:
    filip, kept = similarity == "filip", cfg.image_tokens_kept or None
    return _Images(
        embed_images(model, store, batch_size) if similarity == "dense" or probes else None,
        token_similarity.image_tokens(model, store, batch_size, kept) if filip else None,
        lexical_images(model, store, batch_size) if similarity == "lexical" else None,
        frame_states(model, store, batch_size) if similarity == "frames" else None,
        cfg.frame_temperature,
    )


def _class_scores(
    model: DualEncoder,
    tokenizer: TextTokenizer,
    batch_size: int,
    images: _Images,
    classes: list,
    templates: list[str],
    column: str = "",
) -> torch.Tensor:
    """(N, C) zero-shot scores of the images against each class's prompts (`templates`, with `{}` or
    `{c}` for the class name), or the class head `lipkit adapt` trained for `column`."""
    prompts = [fill_template(t, str(c)) for c in classes for t in templates]
    if images.tokens is not None:
        tok, mask = token_similarity.text_tokens(model, tokenizer, prompts, batch_size)
        return token_similarity.class_scores(images.tokens, tok, mask, len(templates))
    if images.lexical is not None:  # a class is the mean of its prompts' term weights
        lex = lexical_texts(model, tokenizer, prompts, batch_size)
        return images.lexical @ lex.view(len(classes), len(templates), -1).mean(1).t()
    cls = class_embeddings(embed_texts(model, tokenizer, prompts, batch_size), len(classes), len(templates))
    if images.frames is not None:
        return frame_scores(cls, images.frames, images.temperature).t()
    adapted = adapted_class_scores(model, tokenizer, images.dense, classes, column, cls, batch_size)
    return images.dense @ cls.t() if adapted is None else adapted  # a class head from `lipkit adapt`, or not


def _classify(
    model: DualEncoder,
    tokenizer: TextTokenizer,
    records: Sequence[Record],
    cfg: EvalConfig,
    images: _Images,
    column: str,
    probes: dict[str, LinearProbe] | None,
    metrics: dict[str, float],
    chance: dict[str, float],
    label_set: LabelSet | None = None,
) -> None:
    """Zero-shot classification over one metadata column (and its linear probe) into `metrics` and
    `chance`; a table without labels in that column is left out. The classes are the column's values,
    sorted, with `eval.templates` — or those of `label_set`, when the set names its own."""
    values = [r.meta.get(column) for r in records]
    if all(isinstance(v, list) for v in values):  # several labels per image (eval.multilabel)
        scores = lambda cs: _class_scores(model, tokenizer, cfg.batch_size, images, cs, cfg.templates)  # noqa: E731
        return multilabel_zeroshot(scores, values, column, metrics, chance)
    if any(v in (None, "") or isinstance(v, list) for v in values):
        return  # this table has no such labels: nothing to classify
    classes = label_set.classes if label_set else sorted(set(values))
    templates = (label_set.templates if label_set else None) or cfg.templates
    indices = [r.meta.get(column + INDEX_SUFFIX) for r in records] if label_set else [None]
    if any(i is None for i in indices):  # by name (a set that names its classes stores their index too)
        index = {c: i for i, c in enumerate(classes)}
        indices = [index[v] for v in values]
    labels = torch.tensor(indices)
    scores = _class_scores(model, tokenizer, cfg.batch_size, images, classes, templates, column)
    for name, v in zeroshot_scores_metrics(scores, labels).items():
        metrics[f"zeroshot/{column}/{name}"] = v
    for name, v in zeroshot_chance(labels, len(classes)).items():
        chance[f"zeroshot/{column}/{name}"] = v
    if probes and column in probes:
        p_scores, p_labels, _ = probes[column].classify(images.dense, [str(v) for v in values])
        for name, v in zeroshot_scores_metrics(p_scores, p_labels).items():
            metrics[f"probe/{column}/{name}"] = v
        for name in ("top1", "top5", "mean_recall"):  # the same classes: the same chance
            chance[f"probe/{column}/{name}"] = chance[f"zeroshot/{column}/{name}"]


def _retrieve_per_group(
    model: DualEncoder,
    tokenizer: TextTokenizer,
    cfg: EvalConfig,
    records: Sequence[Record],
    images: _Images,
    metrics: dict[str, float],
    chance: dict[str, float],
    split: str = "",
) -> None:
    """eval.group_by (e.g. langs): for each value v of the column, retrieval between the images that have
    a caption of value v and their first such caption, as `retrieval/<column>=<v>/...` metrics (a split
    without the column has none; empty or non-text values count as missing)."""
    column = cfg.group_by
    groups: dict[str, list[tuple[int, str]]] = {}
    for i, r in enumerate(records):
        values = r.meta.get(column)
        if values is None or not r.captions:
            continue
        if not isinstance(values, list) or len(values) != len(r.captions):
            raise UserError(
                f"eval.group_by={column}: in split '{split}', row {r.key} has no '{column}' list parallel to "
                f"its {len(r.captions)} captions; fix the column or unset eval.group_by."
            )
        seen: set[str] = set()  # a row's first caption of each value
        for value, caption in zip(values, r.captions, strict=True):
            if isinstance(value, str) and value and value not in seen:
                seen.add(value)
                groups.setdefault(value, []).append((i, caption))
    for value, members in groups.items():
        index = torch.tensor([i for i, _ in members])
        subset = [replace(records[i], captions=[c]) for i, c in members]
        kept = _Images(
            *(
                None if x is None else x[index]
                for x in (images.dense, images.tokens, images.lexical, images.frames)
            ),
            images.temperature,
        )
        m: dict[str, float] = {}
        c: dict[str, float] = {}
        _retrieve(model, tokenizer, cfg.batch_size, kept, RetrievalTexts.of(subset, 0), m, c)
        prefix = f"retrieval/{column}={value}/"
        metrics.update(
            {prefix + k.removeprefix("retrieval/"): v for k, v in m.items() if k.startswith("retrieval/")}
        )
        chance.update({prefix + k.removeprefix("retrieval/"): v for k, v in c.items()})


def _retrieve(
    model: DualEncoder,
    tokenizer: TextTokenizer,
    batch_size: int,
    images: _Images,
    texts: RetrievalTexts,
    metrics: dict[str, float],
    chance: dict[str, float],
) -> torch.Tensor:
    """Image↔text retrieval recall into `metrics` and `chance`; returns the (T, N) text→image scores."""
    if images.tokens is not None:
        s_image, s_text = token_similarity.pair_scores(
            images.tokens, *token_similarity.text_tokens(model, tokenizer, texts.texts, batch_size)
        )
        sims, image_to_text = s_text.t(), s_image  # (T, N) and (N, T)
    elif images.lexical is not None:
        txt_lex = lexical_texts(model, tokenizer, texts.texts, batch_size)
        sims = txt_lex @ images.lexical.t()
        image_to_text = sims.t()
        metrics["lexicon/image_nonzero_terms"] = (images.lexical > 0).sum(1).double().mean().item()
        metrics["lexicon/text_nonzero_terms"] = (txt_lex > 0).sum(1).double().mean().item()
    elif images.frames is not None:
        sims = frame_scores(
            embed_texts(model, tokenizer, texts.texts, batch_size), images.frames, images.temperature
        )
        image_to_text = sims.t()
    else:
        sims = embed_texts(model, tokenizer, texts.texts, batch_size) @ images.dense.t()
        image_to_text = sims.t()
    recall = retrieval_scores_metrics(sims, image_to_text, texts.relevant)
    metrics.update({f"retrieval/{k}": v for k, v in recall.items()})
    chance.update({f"retrieval/{k}": v for k, v in retrieval_chance(texts.relevant).items()})
    return sims


def _details(records: Sequence[Record], texts: RetrievalTexts, sims: torch.Tensor) -> dict[str, Any]:
    """What the report shows: the top 5 images of 8 text queries, a heat map of 8 images × their captions."""
    examples = []
    for t in _spread(len(texts.texts), 8):
        top = sims[t].topk(min(5, len(records)))
        examples.append(
            {
                "query": texts.texts[t],
                "results": [
                    {
                        "image": str(records[i].image),
                        "score": round(s, 4),
                        "correct": bool(texts.relevant[t, i]),
                        "frames": shown_frames(records[i]),  # a clip's strip ([] for an image)
                    }
                    for s, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
                ],
            }
        )
    rows = _spread(len(records), 8)
    cols = [texts.index[texts.captions[i]] for i in rows]
    heatmap = {
        "texts": [texts.texts[c] for c in cols],
        "images": [str(records[i].image) for i in rows],
        "sim": sims[cols][:, rows].tolist(),
    }
    return {"examples": examples, "heatmap": heatmap}
