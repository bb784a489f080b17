"""OUT/report.html of `lipkit attack`: the metrics clean and under attack side by side, the universal
perturbation when there is one, and a gallery of clean/adversarial pairs — each with what the model
answered, and the change amplified so that it can be seen (mid-grey is no change; ±ε is black/white for
ℓ∞, the pair's largest change for ℓ2).
The page is self-contained (images as data URIs), in the style of `lipkit report`."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from lipkit.eval.report import CSS
from lipkit.eval.report_figures import esc, html_page, png_uri

SHOWN_SIDE = 96  # pixels each thumbnail is drawn at


def _uri(image: torch.Tensor) -> str:
    """A (3, H, W) uint8 tensor as a PNG data URI."""
    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(buf, format="PNG")
    return png_uri(buf.getvalue())


def amplified(change: torch.Tensor, eps: float) -> torch.Tensor:
    """A change in [−ε, ε] (float, pixel units) as a uint8 image: 128 + 127·change/ε."""
    scale = 127 / max(eps, 1e-12)
    return (128 + change * scale).round().clamp(0, 255).to(torch.uint8)


def chosen(right: dict[str, torch.Tensor], k: int) -> list[int]:
    """Up to k images spread over the split: those the attack fooled first, then any others."""
    fooled = (right["clean"] & ~right["attacked"]).nonzero()[:, 0].tolist()
    taken = set(fooled)
    rest = [i for i in range(len(right["clean"])) if i not in taken]
    picked = [fooled[j * len(fooled) // k] for j in range(min(k, len(fooled)))] if fooled else []
    return picked + rest[: k - len(picked)]


def _figure(image: torch.Tensor, caption: str, ok: bool | None) -> str:
    kind = "" if ok is None else (' class="ok"' if ok else ' class="bad"')
    return (
        f'<figure{kind}><img src="{_uri(image)}" style="width:{SHOWN_SIDE}px;height:{SHOWN_SIDE}px" '
        f'alt=""><figcaption>{esc(caption)}</figcaption></figure>'
    )


def _metrics_table(result: dict[str, Any], names: list[str]) -> str:
    head = "".join(f"<th>{esc(n)}</th>" for n in names)
    rows = []
    for key, value in result["clean"].items():
        if isinstance(value, (int, float)):
            cells = "".join(f"<td>{100 * result[n].get(key, float('nan')):.1f}</td>" for n in names)
            rows.append(f"<tr><td>{esc(key)}</td>{cells}</tr>")
    return f"<table><thead><tr><th>metric (%)</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _transfer_table(result: dict[str, Any]) -> str:
    """One row per transfer target: its success rate and each metric clean → attacked."""
    keys = [k for k, v in result["clean"].items() if isinstance(v, (int, float))]
    head = "".join(f"<th>{esc(k)}</th>" for k in keys)
    rows = []
    for t in result["transfer"]:
        rate = "—" if t["success_rate"] is None else f"{100 * t['success_rate']:.1f}"
        cells = "".join(f"<td>{100 * t['clean'][k]:.1f} → {100 * t['attacked'][k]:.1f}</td>" for k in keys)
        rows.append(f"<tr><td>{esc(t['checkpoint'])}</td><td>{rate}</td>{cells}</tr>")
    return (
        "<section><h2>Transfer: the same images on other checkpoints</h2><table><thead><tr><th>checkpoint</th>"
        f"<th>success (%)</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></section>"
    )


def write_report(
    out: Path,
    result: dict[str, Any],
    stores: dict[str, Any],
    best: dict[str, torch.Tensor],
    right: dict[str, torch.Tensor],
    labels: list[str],
    universal: torch.Tensor | None = None,
) -> Path:
    """Write OUT/report.html (module docstring) and return its path."""
    s = result["settings"]
    names = [n for n in ("clean", "attacked", "random") if n in stores]
    rates = (
        [f"success rate {100 * result['success_rate']:.1f} %"] if result["success_rate"] is not None else []
    )
    if result.get("random_success_rate") is not None:
        rates.append(f"random noise of the same ε: {100 * result['random_success_rate']:.1f} %")
    parts = [
        f"<section><h2>Metrics</h2><p>{esc(' · '.join(rates))}</p>{_metrics_table(result, names)}</section>"
    ]
    if result.get("transfer"):
        parts.append(_transfer_table(result))
    if universal is not None:
        picture = _figure(amplified(universal, s["eps"]), "δ (amplified)", None)
        parts.append(f"<section><h2>The universal perturbation</h2>{picture}</section>")
    rows = []
    for i in chosen(right, s["gallery"]):
        clean, adv = stores["clean"].cache[i], stores["attacked"].cache[i]
        moved = (adv.float() - clean.float()) / 255
        # ℓ∞: ±ε is black/white; ℓ2 (ε is the image's radius): the pair's largest pixel change is
        change = amplified(moved, s["eps"] if s["norm"] == "linf" else float(moved.abs().max()))
        rows.append(
            '<div class="query">'
            + _figure(clean, f"clean: {labels[best['clean'][i]]}", bool(right["clean"][i]))
            + _figure(adv, f"attacked: {labels[best['attacked'][i]]}", bool(right["attacked"][i]))
            + _figure(change, "change (amplified)", None)
            + "</div>"
        )
    if rows:
        parts.append(f"<section><h2>Clean and adversarial pairs</h2>{''.join(rows)}</section>")
    return _page(out, result, parts)


def _page(out: Path, result: dict[str, Any], parts: list[str]) -> Path:
    s = result["settings"]
    budget = (
        ("words", f"{s['words']} per caption, {s['candidates']} candidates")
        if s["method"] == "words"
        else ("ε", f"{s['eps'] * 255:.3g}/255 ({s['norm']})")
    )
    header = "".join(
        f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>"
        for k, v in (
            ("checkpoint", result["checkpoint"]),
            ("source", result["source"]),
            ("images", result["images"]),
            ("method", s["method"]),
            ("task", s["task"]),
            budget,
            ("steps", s["steps"]),
        )
    )
    page = html_page(f"lipkit attack — {out.name}", "lipkit attack", header, "".join(parts), CSS)
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def write_caption_report(out: Path, result: dict[str, Any], pairs: list[dict[str, Any]], k: int = 50) -> Path:
    """OUT/report.html of the word-substitution attack: the metrics and up to k changed captions."""
    rate = result["success_rate"]
    summary = f"{result['changed_captions']} of {result['captions']} captions changed" + (
        "" if rate is None else f" · success rate {100 * rate:.1f} %"
    )
    rows = "".join(
        f"<tr><td>{esc(p['caption'])}</td><td>{esc(p['adversarial'])}</td>"
        f"<td>{'right' if p['right'] else 'wrong'} → {'right' if p['right_attacked'] else 'wrong'}</td></tr>"
        for p in pairs[:k]
    )
    parts = [
        f"<section><h2>Metrics</h2><p>{esc(summary)}</p>{_metrics_table(result, ['clean', 'attacked'])}</section>",
        "<section><h2>Changed captions</h2><table><thead><tr><th>caption</th><th>adversarial</th>"
        f"<th>top-1 image</th></tr></thead><tbody>{rows}</tbody></table></section>",
    ]
    return _page(out, result, parts)
