"""`lipkit data filter`: keep the best-scored pairs of a scored source (`lipkit data score`'s output, or
any source with a `clip_score` column) — CLIP-score filtering as DataComp's baseline does it (Gadre et
al., 2023: keep the top 30 % of the pool by CLIP score) or as LAION-400M did (a fixed threshold, 0.28
for OpenAI's ViT-B/32), globally or within each cluster of a `lipkit data cluster` folder.

Rules (one of):
  min_score X        keep the pairs with clip_score ≥ X
  keep_fraction F    keep the k = max(1, ⌊F·n + ½⌋) highest-scored pairs (ties: the earlier row)
  + per_cluster DIR  the k kept pairs shared among the clusters in proportion to their sizes (largest
                     remainders, at least one per cluster: the counts of `lipkit data reduce`), the best
                     of each cluster kept. A global cut removes whole concepts whose pairs score low
                     (rare, hard or badly captioned ones); per cluster, every concept keeps its best
                     pairs. Pairs the clustering did not see form one group of their own.

OUT (a folder; the input is never touched):
  filtered.jsonl  the kept rows, every column (scores included), image paths absolute, `key`
  or shards/      for inputs that hold images inline (WebDataset shards written by `lipkit data score`)
  filter.json     the rule, counts, the score range kept and dropped, clusters
  dropped.jsonl   {key, clip_score, caption} of every dropped pair, lowest score first (to look at)
The input is read twice (the scores, then the kept pairs), streamed: shards never sit in memory.

Not done: DataComp's image-based filtering (clustering to ImageNet-like concepts), text filters.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from lipkit.atomic import atomic_write, write_json_atomic
from lipkit.curate.cluster import check_out_dir, load_clusters, lookup
from lipkit.curate.pairs_out import SHARDS, write_pairs
from lipkit.curate.reduce import quotas
from lipkit.data.records import Record
from lipkit.data.sources.registry import estimate_total, scan
from lipkit.errors import UserError
from lipkit.search.embed import progress_bar

TABLE = "filtered.jsonl"
OUR_FILES = (TABLE, SHARDS, "filter.json", "dropped.jsonl")
MANIFESTS = ("score.json", "filter.json")  # folders whose pairs are named by their manifest's "output"


def keep_count(fraction: float, n: int) -> int:
    """max(1, ⌊F·n + ½⌋), never more than n (0 for an empty group): `quotas` of one group."""
    return int(quotas(np.array([n]), fraction)[0])


def keep_mask(
    scores: np.ndarray,
    *,
    min_score: float | None = None,
    keep_fraction: float | None = None,
    groups: np.ndarray | None = None,
) -> np.ndarray:
    """Which pairs to keep (see the module doc): a threshold, or the top fraction of every group (all
    pairs one group when `groups` is None); ties go to the earlier pair."""
    s = np.asarray(scores, dtype=np.float64)
    if min_score is not None:
        return s >= min_score
    assert keep_fraction is not None
    g = np.zeros(len(s), np.int64) if groups is None else np.asarray(groups, dtype=np.int64)
    order = np.lexsort((np.arange(len(s)), -s, g))  # by group, best first, then row
    g_sorted = g[order]
    starts = np.flatnonzero(np.r_[True, g_sorted[1:] != g_sorted[:-1]]) if len(s) else np.zeros(0, int)
    sizes = np.diff(np.r_[starts, len(s)])
    rank = np.arange(len(s)) - np.repeat(starts, sizes)
    quota = np.repeat(quotas(sizes, keep_fraction), sizes)
    keep = np.zeros(len(s), dtype=bool)
    keep[order] = rank < quota
    return keep


def resolve_scored(scored: str | Path) -> str:
    """The pairs of a `lipkit data score` or `filter` folder (named by its manifest), else `scored`."""
    p = Path(str(scored)).expanduser()
    for name in MANIFESTS:
        if p.is_dir() and (p / name).is_file():
            manifest = json.loads((p / name).read_text(encoding="utf-8"))
            if not manifest.get("complete", True) or not manifest.get("output"):
                raise UserError(
                    f"The scores in '{p}' are incomplete; rerun the same `lipkit data score` command to finish them."
                )
            return str(p / manifest["output"])
    return str(scored)


def _score_of(record: Record, src: str) -> float:
    value = record.meta.get("clip_score")
    if not isinstance(value, int | float) or isinstance(value, bool) or value != value:
        raise UserError(
            f"Row '{record.key}' of '{src}' has no clip_score; score the pairs first with "
            "`lipkit data score CHECKPOINT SOURCE OUT` and filter OUT."
        )
    return float(value)


def read_scores(src: str, image_column: str, caption_column: str, progress: bool) -> dict[str, Any]:
    """One streamed pass: every pair's score, key and first caption (and a light record for cluster
    lookup), and the rows that could not be read."""
    scores, stubs, first, unreadable = [], [], [], 0
    with progress_bar(progress) as bar:
        task = bar.add_task("reading scores", total=estimate_total(src))
        for item in scan(src, image_column, caption_column):
            bar.advance(task)
            if not isinstance(item, Record):
                unreadable += item.count
                continue
            scores.append(_score_of(item, src))
            stubs.append(Record(item.image, [], key=item.key))  # no image bytes kept
            first.append(item.captions[0] if item.captions else "")
    if not scores:
        raise UserError(
            f"'{src}' holds no pairs to filter; point SCORED at the output of `lipkit data score`."
        )
    return {"scores": np.asarray(scores), "stubs": stubs, "captions": first, "unreadable": unreadable}


def cluster_groups(stubs: list[Record], clusters_dir: str | Path) -> tuple[np.ndarray, int]:
    """Each pair's cluster (-1: not in the clustering) and how many pairs the clustering did not see."""
    found = lookup(stubs, load_clusters(clusters_dir))
    missing = sum(f is None for f in found)
    if missing == len(stubs):
        raise UserError(
            f"None of the scored pairs is in the clusters of '{clusters_dir}'; cluster the same source with "
            f"`lipkit data cluster CHECKPOINT SOURCE {clusters_dir} --k N` and pass that folder."
        )
    return np.asarray([-1 if f is None else f[0] for f in found], dtype=np.int64), missing


def _kept_pairs(src: str, keep: np.ndarray, cols: tuple[str, str], bar: Any) -> Iterator[tuple[Record, dict]]:
    task = bar.add_task("writing kept pairs", total=int(keep.sum()))
    i = 0
    for item in scan(src, *cols):
        if isinstance(item, Record):
            if i < len(keep) and keep[i]:
                bar.advance(task)
                yield item, {}
            i += 1
    if i != len(keep):
        raise UserError(f"'{src}' changed while it was being filtered; run the command again.")


def _write_dropped(out: Path, read: dict[str, Any], keep: np.ndarray) -> None:
    dropped = np.flatnonzero(~keep)
    dropped = dropped[np.argsort(read["scores"][dropped], kind="stable")]

    def write(f: Any) -> None:
        for i in dropped.tolist():
            row = {
                "key": read["stubs"][i].key,
                "clip_score": read["scores"][i],
                "caption": read["captions"][i],
            }
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

    atomic_write(out / "dropped.jsonl", write, text=True)


def run_filter(
    scored: str | Path,
    out: str | Path,
    *,
    min_score: float | None = None,
    keep_fraction: float | None = None,
    per_cluster: str | Path | None = None,
    image_column: str = "image",
    caption_column: str = "captions",
    progress: bool = True,
) -> dict[str, Any]:
    """`lipkit data filter`: write the kept pairs of SCORED into OUT (module doc); the summary."""
    if (min_score is None) == (keep_fraction is None):
        raise UserError("Pass exactly one rule: --min-score X or --keep-fraction F.")
    if keep_fraction is not None and not 0 < keep_fraction <= 1:
        raise UserError(f"--keep-fraction must be in (0, 1], got {keep_fraction}.")
    if per_cluster is not None and keep_fraction is None:
        raise UserError("--per-cluster goes with --keep-fraction (the top fraction of every cluster).")
    out = Path(out).expanduser()
    src = resolve_scored(scored)
    check_out_dir(out, OUR_FILES, [scored, src])
    read = read_scores(src, image_column, caption_column, progress)
    groups, unclustered = (None, 0) if per_cluster is None else cluster_groups(read["stubs"], per_cluster)
    s = read["scores"]
    keep = keep_mask(s, min_score=min_score, keep_fraction=keep_fraction, groups=groups)
    if not keep.any():
        raise UserError(
            f"No pair scores {min_score} or more (the best scores {s.max():.4f}); lower --min-score."
        )
    (out / "filter.json").unlink(missing_ok=True)  # a run killed while writing leaves no stale summary
    with progress_bar(progress) as bar:
        pairs = _kept_pairs(src, keep, (image_column, caption_column), bar)
        name, written, lost = write_pairs(out, TABLE, pairs, image_column, caption_column)
    _write_dropped(out, read, keep)
    rule = {"min_score": min_score} if min_score is not None else {"keep_fraction": keep_fraction}
    summary = {
        "format": "lipkit-filter",
        "input": src,
        "rule": {**rule, "per_cluster": str(per_cluster) if per_cluster else None},
        "pairs": len(s),
        "kept": int(keep.sum()),
        "dropped": int((~keep).sum()),
        "written": written,
        "unreadable": read["unreadable"] + len(lost),
        "kept_scores": _range(s[keep]),
        "dropped_scores": _range(s[~keep]),
        "output": name,
        "complete": True,
    }
    if groups is not None:
        n_clusters = len(set(groups.tolist()) - {-1})
        summary["clusters"] = {"clusters": n_clusters, "unclustered_pairs": unclustered}
    write_json_atomic(out / "filter.json", summary)
    return summary


def _range(v: np.ndarray) -> dict[str, float] | None:
    if not len(v):
        return None
    return {
        "min": round(float(v.min()), 4),
        "mean": round(float(v.mean()), 4),
        "max": round(float(v.max()), 4),
    }
