"""Self-contained HTML report for a lipkit training / evaluation run.

``write_report(run_dir)`` reads ``run_dir/metrics.jsonl`` (train and eval log lines) and the evaluation
results (``run_dir/eval/results.json`` unless passed in), renders the plots with matplotlib's Agg canvas
(no pyplot, no global backend switch), saves them as PNGs in the output folder and writes ``index.html``
with every plot and image thumbnail embedded as a base64 data URI, so the page works on its own.
"""

from __future__ import annotations

import io
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.offsetbox import AnnotationBbox, OffsetImage
from PIL import Image

from lipkit.eval.report_figures import esc, html_page, load_image, mpl, png_uri, save, slug
from lipkit.eval.report_maps import localization_figure

__all__ = ["write_report"]

_THUMB_MAX = 128  # longest side of embedded thumbnails (pixels); CSS upscales them for display
_HEAT_THUMB = 48  # thumbnail side in the heat-map figure (pixels, before matplotlib zoom)
CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f5f6f8;
color:#1d2330}
main{max-width:1150px;margin:0 auto;padding:24px}
header{background:#1d2330;color:#fff;padding:20px 24px}header h1{margin:0 0 6px;font-size:22px}
header dl{display:flex;flex-wrap:wrap;gap:4px 24px;margin:0;font-size:13px;opacity:.9}
header dt{font-weight:600}header dd{margin:0 0 0 4px;word-break:break-all}
section{background:#fff;border-radius:8px;box-shadow:0 1px 3px #0002;padding:16px 20px;margin:0 0 20px}
h2{margin:0 0 12px;font-size:18px}h3{margin:16px 0 8px;font-size:15px}
table{border-collapse:collapse;width:100%}
th,td{padding:5px 10px;border-bottom:1px solid #e3e6eb;text-align:right}
th:first-child,td:first-child{text-align:left;font-family:ui-monospace,monospace;font-size:12.5px}
thead th{background:#eef0f4}.chance{color:#8a93a3;font-size:12px}.muted{color:#8a93a3}
.plot{max-width:100%;display:block;margin:8px 0}
.query{display:flex;align-items:center;gap:10px;padding:6px 0;border-bottom:1px solid #eef0f4}
.qtext{width:200px;flex:none;font-weight:600}
figure{margin:0;text-align:center;font-size:11.5px}
figure img,.ph{width:80px;height:80px;image-rendering:pixelated;border:3px solid #b8bec9;border-radius:4px}
.strip{display:flex;gap:2px}.strip img,.strip .ph{width:48px;height:48px;border-width:2px}
figure.ok img,figure.ok .ph{border-color:#23a559}figure.bad img,figure.bad .ph{border-color:#d9534f}
.ph{display:flex;align-items:center;justify-content:center;background:#e3e6eb;color:#8a93a3;box-sizing:border-box}
"""


def _read_metrics(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Return (train rows, eval rows) from a metrics.jsonl file; malformed lines are skipped."""
    train: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    if not path.is_file():
        return train, evals
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "step" in row:
            (evals if row.get("kind") == "eval" else train).append(row)
    return train, evals


class _Thumbs:
    """Cache of base64 PNG thumbnails keyed by image path (None for unreadable / missing files)."""

    def __init__(self) -> None:
        self._cache: dict[str, str | None] = {}

    def uri(self, path: str) -> str | None:
        if path not in self._cache:
            img = load_image(path, _THUMB_MAX)
            if img is None:
                self._cache[path] = None
            else:
                buf = io.BytesIO()
                img.save(buf, format="PNG")
                self._cache[path] = png_uri(buf.getvalue())
        return self._cache[path]


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    pts = [(float(r["step"]), float(r[key])) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _curves(train: list[dict[str, Any]], evals: list[dict[str, Any]], out_dir: Path) -> str:
    parts: list[str] = []
    if train:
        fig = Figure(figsize=(11, 3.6), layout="constrained")
        ax_loss, ax_scale = fig.subplots(1, 2)
        steps, loss = _series(train, "loss")
        ax_loss.plot(steps, loss, color="#4c72b0", alpha=0.35, lw=1, label="loss")
        win = max(3, len(loss) // 25)
        if len(loss) > 2 * win:  # centred moving average: smooth without lagging behind the raw curve
            smooth = np.convolve(loss, np.ones(win) / win, mode="valid")
            mid = steps[win // 2 :][: len(smooth)]
            ax_loss.plot(mid, smooth, color="#4c72b0", lw=2, label=f"moving mean ({win})")
        ax_loss.set(title="Training loss", xlabel="step", ylabel="loss")
        ax_loss.legend(loc="upper right")
        steps, scale = _series(train, "logit_scale")
        ax_scale.plot(steps, scale, color="#dd8452", lw=2)
        ax_scale.set(title="Logit scale and learning rate", xlabel="step")
        ax_scale.set_ylabel("logit scale", color="#dd8452")
        ax_lr = ax_scale.twinx()
        ax_lr.plot(*_series(train, "lr"), color="#55a868", lw=1.5, ls="--")
        ax_lr.set_ylabel("learning rate", color="#55a868")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        for ax in (ax_loss, ax_scale):
            ax.grid(alpha=0.3)
        parts.append(save(fig, out_dir / "training.png"))
    by_split: dict[str, list[dict[str, Any]]] = {}
    for row in evals:
        by_split.setdefault(str(row.get("split", "eval")), []).append(row)
    if by_split:
        fig = Figure(figsize=(5.5 * len(by_split), 3.8), layout="constrained")
        axes = np.atleast_1d(fig.subplots(1, len(by_split), squeeze=False)[0])
        for ax, (split, rows) in zip(axes, by_split.items(), strict=True):
            flat = [{"step": r["step"], **r.get("metrics", {})} for r in rows]
            keys = sorted({k for r in flat for k in r if k != "step"})
            headline = [k for k in keys if k.endswith(("/top1", "/R@1"))] or keys
            for key in headline:
                steps, vals = _series(flat, key)
                ax.plot(steps, [100 * v for v in vals], marker="o", ms=3, label=mpl(key))
            ax.set(title=mpl(f"Eval: {split}"), xlabel="step", ylabel="%")
            ax.grid(alpha=0.3)
            if headline:
                ax.legend(fontsize=7, loc="best")
        parts.append(save(fig, out_dir / "eval_curves.png"))
    if not parts:
        return '<p class="muted">No training metrics found (metrics.jsonl is missing or empty).</p>'
    return "\n".join(parts)


def _pct(value: Any) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, (int, float)) else "–"


def _metrics_table(splits: dict[str, dict[str, Any]]) -> str:
    names = list(splits)
    keys = sorted({k for s in splits.values() for k in s.get("metrics", {})})
    head = "".join(f"<th>{esc(n)}</th>" for n in names)
    sizes = "".join(
        f'<td class="muted">{esc(s.get("n_images", "?"))} img / {esc(s.get("n_texts", "?"))} txt</td>'
        for s in splits.values()
    )
    rows = [f"<tr><td>size</td>{sizes}</tr>"]
    for key in keys:
        cells = []
        for s in splits.values():
            val, chance = s.get("metrics", {}).get(key), s.get("chance", {}).get(key)
            extra = f' <span class="chance">(chance {_pct(chance)})</span>' if chance is not None else ""
            shown = _pct(val) if chance is not None or val is None else f"{val:.1f}"  # counts stay counts
            cells.append(f"<td>{shown}{extra}</td>")
        rows.append(f"<tr><td>{esc(key)}</td>{''.join(cells)}</tr>")
    return f"<table><thead><tr><th>metric</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _heat_thumb(path: str) -> np.ndarray:
    img = load_image(path, 4 * _HEAT_THUMB)
    if img is None:  # grey placeholder with a darker cross
        arr = np.full((_HEAT_THUMB, _HEAT_THUMB, 3), 210, dtype=np.uint8)
        idx = np.arange(_HEAT_THUMB)
        arr[idx, idx] = arr[idx, idx[::-1]] = 150
        return arr
    return np.asarray(img.resize((_HEAT_THUMB, _HEAT_THUMB), Image.Resampling.NEAREST))


def _heatmap(split: str, heat: dict[str, Any], out_dir: Path) -> str:
    sim = np.asarray(heat.get("sim", []), dtype=float)
    texts, images = list(heat.get("texts", [])), list(heat.get("images", []))
    if sim.ndim != 2 or sim.size == 0:
        return '<p class="muted">No similarity matrix.</p>'
    n_t, n_i = sim.shape
    fig = Figure(figsize=(1.0 * n_i + 3.5, 0.62 * n_t + 1.6), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(sim, cmap="viridis", aspect="auto")
    fig.colorbar(im, ax=ax, label="cosine similarity", shrink=0.85)
    thresh = (sim.max() + sim.min()) / 2
    for (r, c), v in np.ndenumerate(sim):
        ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=8, color="k" if v > thresh else "w")
    labels = [mpl(t if len(t) <= 38 else t[:36] + "…") for t in map(str, texts)]
    ax.set_yticks(range(n_t), labels + [""] * (n_t - len(labels)))
    ax.set_xticks(range(n_i), [""] * n_i)
    ax.tick_params(axis="x", length=0)
    ax.set_title(mpl(f"Text–image similarity: {split}"))
    for c, path in enumerate(images[:n_i]):
        box = OffsetImage(_heat_thumb(str(path)), zoom=0.8, resample=False)
        ax.add_artist(
            AnnotationBbox(
                box,
                (c, 0),
                xycoords=("data", "axes fraction"),
                xybox=(0, -4),
                boxcoords="offset points",
                box_alignment=(0.5, 1),
                frameon=False,
            )
        )
    return save(fig, out_dir / f"heatmap_{slug(split)}.png")


def _picture(path: str, thumbs: _Thumbs) -> str:
    uri = thumbs.uri(path)
    if uri:
        return f'<img src="{uri}" alt="{esc(Path(path).name)}" title="{esc(path)}">'
    return f'<div class="ph" title="{esc(path)}">missing</div>'


def _examples(examples: list[dict[str, Any]], thumbs: _Thumbs) -> str:
    if not examples:
        return '<p class="muted">No retrieval examples.</p>'
    rows = []
    for ex in examples:
        figs = []
        for hit in ex.get("results", [])[:5]:
            path = str(hit.get("image", ""))
            correct = hit.get("correct")
            cls = "ok" if correct is True else "bad" if correct is False else ""
            frames = hit.get("frames") or []  # a clip: a strip of its frames
            pic = "".join(_picture(p, thumbs) for p in frames) if frames else _picture(path, thumbs)
            pic = f'<div class="strip">{pic}</div>' if frames else pic
            score = hit.get("score")
            cap = f"{score:.3f}" if isinstance(score, (int, float)) else ""
            figs.append(f'<figure class="{cls}">{pic}<figcaption>{cap}</figcaption></figure>')
        query = esc(ex.get("query", ""))
        rows.append(f'<div class="query"><div class="qtext">{query}</div>{"".join(figs)}</div>')
    return "\n".join(rows)


def _captions(shown: list[dict[str, Any]], thumbs: _Thumbs) -> str:
    """The caption decoder's captions of a few images, beside the image's own captions."""
    if not shown:
        return ""
    rows = []
    for ex in shown:
        path = str(ex.get("image", ""))
        uri = thumbs.uri(path)
        pic = f'<img src="{uri}" alt="{esc(Path(path).name)}">' if uri else '<div class="ph">missing</div>'
        refs = " · ".join(esc(r) for r in ex.get("references", [])[:4])
        score = ex.get("cider_d")
        cider = f" (CIDEr-D {100 * score:.0f})" if isinstance(score, (int, float)) else ""
        rows.append(
            f'<div class="query"><figure>{pic}</figure><div class="qtext"><b>{esc(ex.get("caption", ""))}'
            f'</b>{cider}<br><span class="muted">references: {refs}</span></div></div>'
        )
    return "<h3>Captions (the decoder's, beam search)</h3>" + "\n".join(rows)


def _composed(shown: dict[str, Any] | None, thumbs: _Thumbs) -> str:
    """A few composed queries: the reference and the words, then each way's top 5 (green: the target)."""
    if not shown or not shown.get("examples"):
        return ""

    def fig(path: str, cls: str = "") -> str:
        uri = thumbs.uri(path)
        pic = f'<img src="{uri}" alt="{esc(Path(path).name)}">' if uri else '<div class="ph">missing</div>'
        return f'<figure class="{cls}">{pic}</figure>'

    rows = []
    for ex in shown["examples"]:
        for way, top in ex["top"].items():
            hits = "".join(fig(p, "ok" if p == ex["target"] else "") for p in top)
            words = f'+ “{esc(ex["text"])}”<br><span class="muted">{esc(way)}</span>'
            rows.append(
                f'<div class="query">{fig(ex["reference"])}<div class="qtext">{words}</div>{hits}</div>'
            )
    n = shown.get("queries", 0)
    return (
        f"<h3>Composed queries (reference + words → top 5; green = the target; {n} queries)</h3>"
        + "\n".join(rows)
    )


def _params(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return str(n)
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def write_report(run_dir: Path, results: dict | None = None, out_dir: Path | None = None) -> Path:
    """Render the report for ``run_dir`` into ``out_dir`` (default ``run_dir/report``); return index.html."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    if results is None:
        res_path = run_dir / "eval" / "results.json"
        results = json.loads(res_path.read_text(encoding="utf-8")) if res_path.is_file() else {}
    model = results.get("model") or {}
    splits: dict[str, dict[str, Any]] = results.get("splits") or {}
    train, evals = _read_metrics(run_dir / "metrics.jsonl")
    thumbs = _Thumbs()

    meta = {
        "run": str(run_dir),
        "checkpoint": results.get("checkpoint", "–"),
        "model": f"{model.get('preset', '?')} ({_params(model.get('params', '?'))} params)" if model else "–",
        "generated": datetime.now().strftime("%Y-%m-%d %H:%M"),
    }
    header = "".join(f"<div><dt>{esc(k)}</dt><dd>{esc(v)}</dd></div>" for k, v in meta.items())
    body = [
        f"<section><h2>Metrics</h2>{_metrics_table(splits)}</section>"
        if splits
        else '<section><h2>Metrics</h2><p class="muted">No evaluation results.</p></section>',
        f"<section><h2>Training curves</h2>{_curves(train, evals, out_dir)}</section>",
    ]
    for name, split in splits.items():
        heat = _heatmap(name, split["heatmap"], out_dir) if split.get("heatmap") else ""
        heat += localization_figure(name, split.get("localization") or [], out_dir)
        body.append(
            f"<section><h2>Split: {esc(name)}</h2>{heat}"
            f"<h3>Text → image retrieval (top 5; green = correct)</h3>"
            f"{_examples(split.get('examples') or [], thumbs)}"
            f"{_captions(split.get('captions') or [], thumbs)}{_composed(split.get('composed'), thumbs)}</section>"
        )
    page = html_page(f"lipkit report: {run_dir.name}", "lipkit run report", header, "".join(body), CSS)
    index = out_dir / "index.html"
    index.write_text(page, encoding="utf-8")
    return index
