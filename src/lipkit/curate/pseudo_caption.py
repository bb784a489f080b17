"""`lipkit data pseudo-caption`: a caption for every image composed from zero-shot attribute predictions —
the pseudo-captions of PLIP (Zuo et al., 2023, "PLIP: Language-Image Pre-training for Person
Representation Learning"), whose captions are built from attribute words, made here with a CLIP checkpoint
instead of annotations.

For each attribute a with values V_a and prompt templates T (`--prompt`, "{}" by default), the value's
text embedding is CLIP's prompt ensemble c_{a,v} = normalise(Σ_t normalise(text(t(v)))) (prompts written as
for evaluation: {} or {c} for the value); with unit-norm image embeddings x_i, image i's value is
v̂_a(i) = argmax_v <x_i, c_{a,v}> (ties to the earlier value), and its pseudo-caption is TEMPLATE with each
{a} replaced by v̂_a(i):

    --attribute colour=red,green,blue --attribute animal=cat,dog --template "a {colour} {animal}"

OUT (a folder; the inputs are never touched):
  pseudo.jsonl    SOURCE's rows (every column, absolute image paths, `key`) + `captions_pseudo` ([the
  or shards/      caption]), `pseudo_attributes` ({a: v̂}) and `pseudo_scores` ({a: <x_i, c_{a,v̂}>}); train
                  on it with `data.caption_mix` (e.g. {captions: 0.7, captions_pseudo: 0.3}) or as the caption
                  column (`data.caption_column=captions_pseudo`)
  pseudo.json     the attributes, template, prompts, counts, how often each value was chosen, and — where
                  SOURCE has a column named like an attribute — how often the prediction equals it
  embeddings/     SOURCE's image embeddings (`lipkit embed`'s format, resumable), unless `embeddings` names
                  a finished `lipkit embed` folder of SOURCE and CHECKPOINT
Rows whose images cannot be decoded get no embedding and are left out (counted).

Not implemented of PLIP: its attribute annotations and learned attribute classifiers (the predictions here
are zero-shot), its caption templates and its image synthesis.
"""

from __future__ import annotations

import string
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lipkit.atomic import write_json_atomic
from lipkit.curate.associate import embed_texts
from lipkit.curate.cluster import check_out_dir, image_embeddings
from lipkit.curate.pairs_out import write_pairs
from lipkit.data.label_sets import fill_template
from lipkit.errors import UserError
from lipkit.search.embed import progress_bar

TABLE = "pseudo.jsonl"
OUR_FILES = (TABLE, "shards", "pseudo.json", "embeddings")


def parse_attributes(specs: Sequence[str]) -> dict[str, list[str]]:
    """["colour=red,green", "animal=@animals.txt"] → {colour: [red, green], animal: [lines of the file]}."""
    out: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, values = spec.partition("=")
        name = name.strip()
        if not sep or not name.isidentifier():
            raise UserError(f"--attribute '{spec}' is not NAME=V1,V2,... (or NAME=@FILE); write it so.")
        if values.startswith("@"):
            path = Path(values[1:]).expanduser()
            if not path.is_file():
                raise UserError(
                    f"--attribute {name}: the file '{path}' does not exist; give a text file, one value a line."
                )
            items = path.read_text(encoding="utf-8").splitlines()
        else:
            items = values.split(",")
        items = list(dict.fromkeys(v.strip() for v in items if v.strip()))
        if len(items) < 2:
            raise UserError(
                f"--attribute {name} has {len(items)} value(s); give two or more to choose between."
            )
        if name in out:
            raise UserError(f"--attribute {name} is given twice; give each attribute once.")
        out[name] = items
    if not out:
        raise UserError("Give at least one --attribute NAME=V1,V2,... to predict.")
    return out


def check_template(template: str, attributes: dict[str, list[str]]) -> None:
    """The template names only known attributes, each as a plain {name}."""
    try:
        parsed = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise UserError(
            f"--template '{template}' is not a valid template ({e}); write fields as {{name}}."
        ) from e
    if any(spec or conv for _, spec, conv in parsed):
        raise UserError(
            f"--template '{template}' formats a field ({{name:...}} or {{name!...}}); write plain {{name}}."
        )
    fields = [f for f, _, _ in parsed]
    unknown = sorted(set(fields) - set(attributes))
    if unknown or not fields:
        raise UserError(
            f"--template '{template}' names {', '.join(map(repr, unknown)) or 'no attribute'}; use "
            f"{', '.join('{' + a + '}' for a in attributes)}."
        )


def value_embeddings(
    checkpoint: str | Path, values: list[str], prompts: list[str], device: str, batch_size: int, bar: Any
) -> np.ndarray:
    """(V, D) unit-norm prompt ensembles: the normalised sum of each value's normalised prompt embeddings."""
    texts = [fill_template(p, v) for v in values for p in prompts]
    emb = embed_texts(checkpoint, texts, device, batch_size, bar).reshape(len(values), len(prompts), -1)
    mean = emb.sum(1)
    return mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)


def predict(x: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's argmax class (ties to the earlier) and its similarity."""
    sims = x @ classes.T
    best = sims.argmax(1)
    return best, sims[np.arange(len(x)), best]


def _agreement(
    rows: list, attributes: dict[str, list[str]], chosen: dict[str, np.ndarray]
) -> dict[str, float]:
    """Per attribute named like a column of SOURCE: the share of the rows with a value there that it predicts."""
    out = {}
    for a in attributes:
        hits = [
            str(r.meta[a]) == attributes[a][int(chosen[a][i])]
            for i, r in enumerate(rows)
            if r.meta.get(a) not in (None, "")
        ]
        if hits:
            out[a] = float(np.mean(hits))
    return out


def run_pseudo_caption(
    checkpoint: str | Path,
    source: str | Path,
    out: str | Path,
    attributes: dict[str, list[str]],
    template: str,
    *,
    prompts: Sequence[str] = ("{}",),
    embeddings: str | Path | None = None,
    image_column: str = "image",
    caption_column: str = "captions",
    device: str = "auto",
    batch_size: int = 256,
    progress: bool = True,
) -> dict[str, Any]:
    """`lipkit data pseudo-caption` (module doc); the summary written to pseudo.json."""
    check_template(template, attributes)
    if not prompts or any(fill_template(p, "\x00") == fill_template(p, "\x01") for p in prompts):
        raise UserError("Every --prompt needs a {} (or {c}) where the value goes, e.g. 'a photo of {}'.")
    out = Path(out).expanduser()
    check_out_dir(out, OUR_FILES, [source])
    emb = image_embeddings(
        checkpoint,
        source,
        embeddings or out / "embeddings",
        image_column=image_column,
        caption_column=caption_column,
        device=device,
        batch_size=batch_size,
        progress=progress,
    )
    x = np.asarray(emb.x, dtype=np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    chosen: dict[str, np.ndarray] = {}
    scores: dict[str, np.ndarray] = {}
    with progress_bar(progress) as bar:  # every attribute's values in one pass: the text tower loads once
        every = value_embeddings(
            checkpoint, [v for vs in attributes.values() for v in vs], list(prompts), device, batch_size, bar
        )
    start = 0
    for name, values in attributes.items():
        chosen[name], scores[name] = predict(x, every[start : start + len(values)])
        start += len(values)
    rows = [emb.records[r] for r in emb.rows]

    def fields(i: int) -> dict[str, Any]:
        picked = {a: attributes[a][int(chosen[a][i])] for a in attributes}
        return {
            "captions_pseudo": [template.format(**picked)],
            "pseudo_attributes": picked,
            "pseudo_scores": {a: round(float(scores[a][i]), 6) for a in attributes},
        }

    (out / "pseudo.json").unlink(missing_ok=True)
    name, n, skipped = write_pairs(
        out, TABLE, ((r, fields(i)) for i, r in enumerate(rows)), image_column, caption_column
    )
    summary = {
        "source": str(source),
        "attributes": attributes,
        "template": template,
        "prompts": list(prompts),
        "rows": len(emb.records),
        "not_embedded": len(emb.records) - len(emb.rows),
        "written": n,
        "unreadable": len(skipped),
        "chosen": {
            a: dict(Counter(attributes[a][int(c)] for c in chosen[a]).most_common()) for a in attributes
        },
        "agreement_with_source_columns": _agreement(rows, attributes, chosen),
        "embeddings": str(emb.path),
        "table": name,
    }
    write_json_atomic(out / "pseudo.json", summary)
    return summary
