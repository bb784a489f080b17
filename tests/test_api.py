"""The Python API (`lipkit.load`, `zero_shot_classifier`, `fit`, `evaluate`): the same pixels,
embeddings and class embeddings as `lipkit embed` and `lipkit eval`, a cheap `import lipkit`, and the
README's Python snippet run as written."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lipkit
from conftest import TINY_MODEL, tiny_eval_setup
from lipkit.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, **kwargs)


def test_import_lipkit_loads_no_torch_pil_or_numpy():
    code = (
        "import sys, lipkit\n"
        "assert lipkit.__version__ and 'load' in dir(lipkit) and 'fit' in lipkit.__all__\n"
        "heavy = sorted({'torch', 'PIL', 'numpy'} & set(sys.modules))\n"
        "assert not heavy, heavy\n"
        "assert callable(lipkit.load) and 'torch' in sys.modules  # the API loads on first use\n"
    )
    r = run_python(code)
    assert r.returncode == 0, r.stderr[-2000:]


def test_unknown_names_are_attribute_errors_and_the_train_package_is_callable():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = lipkit.nope
    assert not hasattr(lipkit, "load_model")
    from lipkit import api
    from lipkit.train import launch  # sets the package `lipkit.train` as an attribute of lipkit

    assert lipkit.load is api.load and lipkit.fit is api.fit
    assert lipkit.train.launch is launch  # `lipkit.train` is the package, and callable (lipkit.train(cfg))
    assert callable(lipkit.train) and "train" in dir(lipkit)


@pytest.fixture(scope="module")
def run_dir(table, tmp_path_factory) -> Path:
    """A run directory holding checkpoint/: the seeded tiny model and its tokenizer."""
    from lipkit.checkpoint import save_checkpoint

    _, tok, model = tiny_eval_setup(table)
    run = tmp_path_factory.mktemp("api-run")
    save_checkpoint(run / "checkpoint", model, tok)
    return run


@pytest.fixture(scope="module")
def images(table, tmp_path_factory) -> Path:
    """A folder of images: four of the fixture's, a rotated JPEG (EXIF orientation 6) and PNGs with
    transparency (RGBA and a palette with a transparent index) — the cases load_image treats specially."""
    folder = tmp_path_factory.mktemp("api-images")
    for i, path in enumerate(sorted((table.parent / "images" / "facebook").glob("*.png"))[:4]):
        shutil.copy(path, folder / f"{i}-{path.name}")
    g = torch.Generator().manual_seed(0)
    rgb = torch.randint(0, 256, (30, 50, 3), generator=g, dtype=torch.uint8).numpy()
    exif = Image.Image().getexif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(folder / "rotated.jpg", exif=exif)
    rgba = np.concatenate([rgb, rgb[..., :1]], axis=-1)
    Image.fromarray(rgba, "RGBA").save(folder / "alpha.png")
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.save(folder / "palette.png", transparency=3)
    return folder


def test_preprocess_and_encode_image_give_what_lipkit_embed_gives(run_dir, images, tmp_path):
    from lipkit.data.images import load_image
    from lipkit.data.transforms import normalize
    from lipkit.search.embed import run_embed

    run_embed(run_dir / "checkpoint", images, tmp_path / "emb", device="cpu")
    expected = np.load(tmp_path / "emb" / "image_emb.npy")
    paths = [Path(item["path"]) for item in json.loads((tmp_path / "emb" / "ids.json").read_text())]
    assert len(paths) == 7

    model, preprocess, _ = lipkit.load(run_dir)  # the run directory: its checkpoint/
    size = model.spec.image_size
    for p in paths:  # the pixels are load_image's exactly, from a PIL image as from the file
        with Image.open(p) as im:
            x = preprocess(im)
        assert torch.equal(x, preprocess(p))
        assert torch.equal(
            x, normalize(load_image(p, size)[None], model.spec.image_mean, model.spec.image_std)[0]
        )
    with torch.no_grad():
        ours = model.encode_image(torch.stack([preprocess(p) for p in paths]))
    assert ours.dtype == torch.float32 and torch.allclose(ours.norm(dim=-1), torch.ones(len(paths)))
    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-5)


def test_tokenizer_feeds_encode_text_like_eval(run_dir, table):
    from lipkit.eval.evaluate import embed_texts

    model, _, tokenizer = lipkit.load(run_dir / "checkpoint")
    texts = ["a red circle", "ein blauer Stern", "🟥"]
    ids = tokenizer(texts)
    assert ids.dtype == torch.long and ids.shape == (3, tokenizer.context_length)
    assert torch.equal(tokenizer("a red circle"), ids[:1])  # one string is one row, not one per character
    with torch.no_grad():
        assert torch.allclose(model.encode_text(ids), embed_texts(model, tokenizer, texts, 2), atol=1e-6)


def test_zero_shot_classifier_is_evals_class_embeddings_and_predicts_like_eval(run_dir, table):
    from lipkit.config import EvalConfig
    from lipkit.data.sources.registry import read_table
    from lipkit.eval.evaluate import embed_texts, evaluate_records
    from lipkit.eval.zeroshot import class_embeddings, zeroshot_scores_metrics

    model, preprocess, tokenizer = lipkit.load(run_dir)
    records = read_table(table)[:16]
    classes = sorted({r.meta["subcategory"] for r in records})
    cfg = EvalConfig(class_columns=["subcategory"])
    with torch.no_grad():
        image_emb = model.encode_image(torch.stack([preprocess(r.image) for r in records]))
        classifier = lipkit.zero_shot_classifier(model, tokenizer, classes)
        named = lipkit.zero_shot_classifier(
            model, tokenizer, classes, [t.replace("{}", "{c}") for t in cfg.templates]
        )
    prompts = [t.format(c) for c in classes for t in cfg.templates]  # eval's class embeddings
    evals = class_embeddings(embed_texts(model, tokenizer, prompts, 7), len(classes), len(cfg.templates))
    assert classifier.shape == (len(classes), model.spec.embed_dim)
    assert torch.allclose(classifier.norm(dim=-1), torch.ones(len(classes)))
    assert torch.allclose(classifier, evals, atol=1e-6) and torch.allclose(named, classifier)

    labels = torch.tensor([classes.index(r.meta["subcategory"]) for r in records])
    ours = zeroshot_scores_metrics(image_emb @ classifier.T, labels)
    metrics = evaluate_records(model, tokenizer, records, cfg, details=False)["metrics"]
    assert ours == pytest.approx({k: metrics[f"zeroshot/subcategory/{k}"] for k in ours})

    one = lipkit.zero_shot_classifier(model, tokenizer, ["circle"], ["a {} emoji"])
    with torch.no_grad():
        assert torch.allclose(one[0], model.encode_text(tokenizer(["a circle emoji"]))[0], atol=1e-6)
    with pytest.raises(UserError, match="Prompt template 'a {shape}'"):
        lipkit.zero_shot_classifier(model, tokenizer, classes, ["a {shape}"])


def test_load_names_the_problem(run_dir, tmp_path):
    with pytest.raises(UserError, match="does not exist; pass a checkpoint directory"):
        lipkit.load(tmp_path / "missing")
    with pytest.raises(UserError, match="is not a lipkit checkpoint"):
        lipkit.load(tmp_path)
    with pytest.raises(UserError, match="precision must be one of fp32, bf16"):
        lipkit.load(run_dir, precision="fp16")
    _, preprocess, _ = lipkit.load(run_dir)
    with pytest.raises(UserError, match="Cannot use image '.*none.png': the image file does not exist"):
        preprocess(tmp_path / "none.png")
    with pytest.raises(UserError, match="Cannot use these image bytes: the file is not an image"):
        preprocess(b"not an image")


def test_bf16_load_returns_float32_embeddings_close_to_fp32(run_dir, images):
    model32, preprocess, tokenizer = lipkit.load(run_dir)
    model16, _, _ = lipkit.load(run_dir, precision="bf16")
    x = torch.stack([preprocess(p) for p in sorted(images.iterdir())])
    ids = tokenizer(["a red circle", "a blue star"])
    with torch.no_grad():
        for a, b in (
            (model32.encode_image(x), model16.encode_image(x)),
            (model32.encode_text(ids), model16.encode_text(ids)),
        ):
            assert b.dtype == torch.float32
            assert (a * b).sum(-1).min() > 0.99  # cosine of the fp32 and bf16 embeddings


def tiny_overrides(data: Path, output: Path) -> dict:
    return {
        "data.train": data,
        "data.eval": {},
        "model.preset": "tiny",
        "model.overrides": TINY_MODEL,
        "tokenizer.vocab_size": 300,
        "tokenizer.context_length": 16,
        "train.batch_size": 16,
        "train.epochs": 1,
        "train.warmup_steps": 1,
        "train.precision": "fp32",
        "train.output": output,
    }


def test_train_trains_from_a_yaml_path_a_config_or_a_packaged_name(table, tmp_path):
    from lipkit.api import _config
    from lipkit.config import Config

    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("train:\n  objective: siglip\n  lr: 0.002\n")
    checkpoint = lipkit.train(yaml_file, **tiny_overrides(table, tmp_path / "run"))  # = lipkit.fit
    assert checkpoint == tmp_path / "run" / "checkpoint"
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["train"]["objective"] == "siglip" and saved["train"]["lr"] == 0.002
    assert saved["model"]["overrides"] == TINY_MODEL and saved["data"]["train"] == str(table)
    model, preprocess, tokenizer = lipkit.load(checkpoint)
    assert model.spec.image_size == 32 and preprocess.image_size == 32 and not model.training

    cfg = _config(Config(), {"train.epochs": 2.5, "eval.templates": ["{} é"], "train.lr": 1e-5})
    assert (cfg.train.epochs, cfg.eval.templates, cfg.train.lr) == (2.5, ["{} é"], 1e-5)
    assert _config("demo", {}).train.objective == "multi_positive"
    layered = _config(["scratch", "methods/siglip"], {"train.epochs": 1})
    assert layered.train.objective == "siglip" and layered.train.epochs == 1
    with pytest.raises(UserError, match="neither a YAML file nor a packaged config.*demo"):
        _config("demoo", {})
    with pytest.raises(UserError, match="Unknown config key 'train.epoch'"):
        lipkit.fit(Config(), **{"train.epoch": 1})


def test_evaluate_is_lipkit_eval(run_dir, table, tmp_path):
    from lipkit.config import Config
    from lipkit.eval.suite import run_eval

    split = {"fixture": table.parent / "test-style.jsonl"}
    results = lipkit.evaluate(run_dir, split, **{"eval.max_images": 8, "eval.class_columns": ["category"]})
    assert (run_dir / "eval" / "results.json").is_file()
    cfg = Config()
    cfg.eval.max_images, cfg.eval.class_columns = 8, ["category"]
    expected = run_eval(run_dir / "checkpoint", {"fixture": str(split["fixture"])}, cfg, tmp_path / "r.json")
    assert results["splits"]["fixture"]["metrics"] == expected["splits"]["fixture"]["metrics"]
    with pytest.raises(UserError, match="Nothing to evaluate on"):
        lipkit.evaluate(run_dir)


def readme_python_snippet() -> str:
    """The one ```python block of the README's "## Python" section."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Python\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```python\n(.*?)^```$", section, re.M | re.S)
    assert len(blocks) == 1, "the README's Python section holds one ```python snippet"
    return blocks[0]


def test_the_readme_python_snippet_runs_as_written(run_dir, table, tmp_path):
    """In a working directory whose runs/demo/checkpoint is the tiny checkpoint, with HOME a folder whose
    ~/.cache/lipkit/datasets/emoji is the fixture dataset (as tests/test_docs_commands.py does)."""
    code = readme_python_snippet()
    assert 'lipkit.load("runs/demo/checkpoint")' in code and "~/.cache/lipkit/datasets/emoji" in code
    home = tmp_path / "home"
    (home / ".cache" / "lipkit" / "datasets").mkdir(parents=True)
    (home / ".cache" / "lipkit" / "datasets" / "emoji").symlink_to(table.parent)
    shutil.copytree(run_dir / "checkpoint", tmp_path / "work" / "runs" / "demo" / "checkpoint")
    r = run_python(code, cwd=tmp_path / "work", env={**os.environ, "HOME": str(home)})
    assert r.returncode == 0, r.stderr[-3000:]
    first = json.loads((table.parent / "test-style.jsonl").read_text().splitlines()[0])
    assert f"{first['subcategory']} → predicted " in r.stdout
    assert "cosine with 'a red heart', with its label:" in r.stdout


def test_heat_maps_and_regions_from_python(run_dir, images):
    from lipkit.eval import heatmaps

    model, preprocess, tokenizer = lipkit.load(run_dir)
    path = sorted(images.glob("*.png"))[0]
    got = lipkit.heatmap(model, tokenizer, path, "a red heart", kind="gradcam")
    x = preprocess(path)[None]
    with torch.no_grad():
        text = model.encode_text(tokenizer(["a red heart"]))[None]
    assert torch.allclose(torch.tensor(got["grid"]), heatmaps.gradcam_maps(model, x, text)[0, 0], atol=2e-4)
    assert got["kind"] == "gradcam" and len(got["peak"]) == 2
    with pytest.raises(UserError, match="kind must be one of similarity, gradcam, filip, not 'cam'"):
        lipkit.heatmap(model, tokenizer, path, "a red heart", kind="cam")
    fast, _, _ = lipkit.load(run_dir, precision="bf16")
    with torch.no_grad():
        regions = fast.encode_region(x, [[[0.0, 0.0, 0.5, 0.5], [0.25, 0.25, 1.0, 1.0]]])
        full = model.encode_region(x, [[[0.0, 0.0, 0.5, 0.5], [0.25, 0.25, 1.0, 1.0]]])
    assert regions.dtype == torch.float32 and torch.allclose(regions, full, atol=0.05)
    assert lipkit.heatmap(fast, tokenizer, Image.open(path), "a red heart")["kind"] == "similarity"
