"""Tests for lipkit.eval.report: the self-contained HTML run report."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from PIL import Image

from lipkit.eval.report import write_report

SPLITS = ("test-style", "test-novel")
METRICS = ("zeroshot/subcategory/top1", "zeroshot/subcategory/top5", "retrieval/text_to_image/R@1")


def _image(path: Path, color: tuple[int, int, int]) -> str:
    img = Image.new("RGB", (32, 32), color)
    for i in range(32):
        img.putpixel((i, i), (255, 255, 255))
    img.save(path)
    return str(path)


def _write_metrics(run: Path, n: int = 40) -> None:
    lines: list[dict[str, Any]] = []
    for step in range(0, n * 10, 10):
        loss = 4.0 * math.exp(-step / 150) + 0.5
        lines.append(
            {
                "kind": "train",
                "step": step,
                "epoch": step / 100,
                "loss": loss,
                "lr": 5e-4 * min(1.0, (step + 10) / 60),
                "logit_scale": 14.3 + step / 40,
                "samples_per_s": 300.0,
                "time_s": step / 3,
            }
        )
        if step % 100 == 0:
            for k, split in enumerate(SPLITS):
                vals = {m: (0.1 + 0.5 * step / (n * 10)) / (j + 1 + k) for j, m in enumerate(METRICS)}
                lines.append({"kind": "eval", "step": step, "split": split, "metrics": vals})
    text = "\n".join(json.dumps(x) for x in lines)
    (run / "metrics.jsonl").write_text(text + "\nnot json\n", encoding="utf-8")


def make_results(run: Path, missing_image: bool = False) -> dict[str, Any]:
    img_dir = run / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    paths = [_image(img_dir / f"im{i}.png", (30 * i, 200 - 20 * i, 90)) for i in range(8)]
    if missing_image:
        paths[3] = str(img_dir / "does_not_exist.png")
    queries = [
        "nerd face",
        "red heart",
        "<script>alert(1)</script>",
        "thumbs up",
        "smiling cat",
        "rocket $5 {x}_",
        "pizza slice",
        "grinning face with sweat",
    ]
    splits = {}
    for k, name in enumerate(SPLITS):
        examples = [
            {
                "query": q,
                "results": [
                    {
                        "image": paths[(qi + r) % 8],
                        "score": 0.35 - 0.03 * r,
                        "correct": r == 0 and qi % 3 != 1,
                    }
                    for r in range(5)
                ],
            }
            for qi, q in enumerate(queries)
        ]
        sim = [
            [0.3 if i == j else 0.05 + 0.01 * ((i * 7 + j * 3 + k) % 10) for j in range(8)] for i in range(8)
        ]
        splits[name] = {
            "n_images": 1700 - 300 * k,
            "n_texts": 1700 - 300 * k,
            "metrics": {
                "zeroshot/subcategory/top1": 0.4123 - 0.1 * k,
                "zeroshot/subcategory/top5": 0.7,
                "retrieval/text_to_image/R@1": 0.12,
            },
            "chance": {
                "zeroshot/subcategory/top1": 0.0101,
                "zeroshot/subcategory/top5": 0.0505,
                "retrieval/text_to_image/R@1": 0.0006,
            },
            "examples": examples,
            "heatmap": {"texts": queries, "images": paths, "sim": sim},
        }
    return {
        "checkpoint": str(run / "ckpt" / "last.pt"),
        "model": {"preset": "tiny", "params": 5_300_000},
        "splits": splits,
    }


def test_full_report(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    _write_metrics(run)
    index = write_report(run, make_results(run))
    assert index == run / "report" / "index.html"
    page = index.read_text(encoding="utf-8")
    for metric in METRICS:
        assert metric in page
    assert "41.2%" in page and "(chance 1.0%)" in page
    assert "test-style" in page and "test-novel" in page and "tiny" in page and "5.3M" in page
    assert page.count("data:image/png;base64,") >= 4 + 8  # curves + heat maps + thumbnails
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "http://" not in page and "https://" not in page  # no external assets
    pngs = {p.name for p in (run / "report").glob("*.png")}
    assert {"training.png", "eval_curves.png", "heatmap_test-style.png", "heatmap_test-novel.png"} <= pngs
    assert all(p.stat().st_size > 1000 for p in (run / "report").glob("*.png"))


def test_results_read_from_run_dir_and_custom_out_dir(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    _write_metrics(run)
    (run / "eval" / "results.json").write_text(json.dumps(make_results(run)), encoding="utf-8")
    index = write_report(run, out_dir=tmp_path / "out")
    assert index == tmp_path / "out" / "index.html"
    assert "zeroshot/subcategory/top5" in index.read_text(encoding="utf-8")


def test_missing_metrics_file(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    page = write_report(run, make_results(run)).read_text(encoding="utf-8")
    assert "metrics.jsonl is missing" in page
    assert "41.2%" in page
    assert not (run / "report" / "training.png").exists()


def test_missing_image_and_no_results(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    page = write_report(run, make_results(run, missing_image=True)).read_text(encoding="utf-8")
    assert 'class="ph"' in page and "does_not_exist.png" in page
    empty = write_report(tmp_path / "empty").read_text(encoding="utf-8")  # no metrics, no results
    assert "No evaluation results" in empty
