"""Hugging Face VisionTextDualEncoderModel folders for a timm image tower + a Hugging Face text tower
(interop.hf_dual): the demo-shaped model (tests/demo_shaped.py) exported, loaded offline by transformers
both documented ways, compared with lipkit (features before normalisation, float32, eval), imported back."""

import json
import os
import shutil
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
import typer
from safetensors.torch import load_file
from typer.testing import CliRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip(
    "transformers", reason="Hugging Face parity tests need transformers (pip install 'lipkit[interop]')"
)
pytest.importorskip("timm", reason="the demo's image tower is a timm network")
from transformers import (  # noqa: E402
    AutoModel,
    AutoProcessor,
    AutoTokenizer,
    VisionTextDualEncoderModel,
    VisionTextDualEncoderProcessor,
    dynamic_module_utils,
)

from demo_shaped import demo_shaped  # noqa: E402
from lipkit.checkpoint import save_checkpoint  # noqa: E402
from lipkit.cli.interop import register  # noqa: E402
from lipkit.errors import UserError  # noqa: E402
from lipkit.interop.hf import from_hf, write_hf  # noqa: E402
from lipkit.interop.hf_dual import check_dual_exportable, spec_from_dual, state_from_dual  # noqa: E402
from lipkit.interop.peer_weights import build_model  # noqa: E402

TOL = 1e-4
TEXTS = ["a photo of a cat", "two dogs playing in the snow, 東京 😀", "a very long caption " * 12]


@pytest.fixture(scope="module")
def demo():
    return demo_shaped()


@pytest.fixture(scope="module")
def checkpoint(demo, tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("demo") / "checkpoint", *demo)


@pytest.fixture(scope="module")
def cls_model(demo):
    """The demo's weights with first-token text pooling (lipkit's text_pool 'cls')."""
    model = demo[0]
    return build_model(replace(model.spec, text_pool="cls"), model.state_dict(), "the demo model", "no fix")


@pytest.fixture(scope="module")
def exported(demo, tmp_path_factory):
    return write_hf(*demo, tmp_path_factory.mktemp("dual") / "hf")


@pytest.fixture(autouse=True)
def modules_cache(monkeypatch, tmp_path):
    """trust_remote_code copies modeling_lipkit_dual.py into transformers' modules cache: a temporary one."""
    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))


def images(size: int = 96, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def features(peer, pixels, batch) -> tuple[torch.Tensor | None, torch.Tensor]:
    """transformers' get_image_features / get_text_features (projected, not normalised)."""
    with torch.no_grad():
        image = None if pixels is None else peer.get_image_features(pixel_values=pixels).pooler_output
        return image, peer.get_text_features(**batch).pooler_output


def ours(model, pixels, ids) -> tuple[torch.Tensor | None, torch.Tensor]:
    """lipkit's encode_image / encode_text, not normalised."""
    with torch.no_grad():
        image = None if pixels is None else model.encode_image(pixels, normalize=False)
        return image, model.encode_text(ids, normalize=False)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def hf_batch(folder, tok):
    hf_tok = AutoTokenizer.from_pretrained(folder)
    batch = hf_tok(
        TEXTS, padding="max_length", max_length=tok.context_length, truncation=True, return_tensors="pt"
    )
    return dict(batch)


def report(label: str, d: dict[str, float]) -> None:
    print(f"{label}:", {k: f"{v:.1e}" for k, v in d.items()})
    assert max(d.values()) <= TOL, (label, d)


def test_both_loaders(demo, cls_model, exported):
    model, tok = demo
    ids, batch = tok(TEXTS), hf_batch(exported, tok)
    assert torch.equal(batch["input_ids"], ids), "the folder's tokenizer gives lipkit's ids"
    pixels = images()
    image, text = ours(model, pixels, ids)
    _, cls_text = ours(cls_model, None, ids)

    custom, info = AutoModel.from_pretrained(exported, trust_remote_code=True, output_loading_info=True)
    assert type(custom).__name__ == "LipkitDualEncoderModel"
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    c_image, c_text = features(custom.eval(), pixels, batch)
    with torch.no_grad():
        out = custom(pixel_values=pixels[:1], **batch)
        no_mask = custom.get_text_features(input_ids=ids).pooler_output  # padding = the pad id, as lipkit
    logits = model.scale() * F.normalize(image[:1], dim=-1) @ F.normalize(text, dim=-1).T
    d = {"image": max_diff(c_image, image), "text": max_diff(c_text, text)}
    d |= {"logits": max_diff(out.logits_per_image, logits), "text, no mask": max_diff(no_mask, text)}
    report("AutoModel(trust_remote_code=True) vs lipkit", d)

    stock, info = VisionTextDualEncoderModel.from_pretrained(exported, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert type(AutoModel.from_pretrained(exported)) is VisionTextDualEncoderModel  # no trust: stock class
    s_image, s_text = features(stock.eval(), pixels, batch)
    report("VisionTextDualEncoderModel vs lipkit", {"image": max_diff(s_image, image)})
    report("VisionTextDualEncoderModel vs lipkit text_pool cls", {"text": max_diff(s_text, cls_text)})
    assert (
        max_diff(s_text, text) > 100 * TOL
    )  # mean-pooled model: the stock class's text side is not lipkit's


def test_cls_model_with_both_loaders(demo, cls_model, tmp_path):
    tok = demo[1]
    folder = write_hf(cls_model, tok, tmp_path / "hf")
    config, pre = (json.loads((folder / f).read_text()) for f in ("config.json", "preprocessor_config.json"))
    assert config["lipkit_text_pool"] == "cls"
    assert spec_from_dual(config, pre, tok, "the folder") == cls_model.spec
    batch = hf_batch(folder, tok)
    _, text = ours(cls_model, None, tok(TEXTS))  # the image side does not depend on text_pool
    for name, peer in (
        ("VisionTextDualEncoderModel", VisionTextDualEncoderModel.from_pretrained(folder)),
        ("AutoModel(trust_remote_code=True)", AutoModel.from_pretrained(folder, trust_remote_code=True)),
    ):
        _, p_text = features(peer.eval(), None, batch)
        report(f"{name} vs lipkit (text_pool cls)", {"text": max_diff(p_text, text)})


def test_processor_files(demo, exported):
    model, _ = demo
    processor = AutoProcessor.from_pretrained(exported)
    assert isinstance(processor, VisionTextDualEncoderProcessor)
    ip = processor.image_processor
    assert ip.crop_size["height"] == ip.crop_size["width"] == model.spec.image_size
    assert tuple(ip.image_mean) == model.spec.image_mean and tuple(ip.image_std) == model.spec.image_std


def test_the_modeling_file_is_package_data_not_a_lipkit_module(exported):
    """lipkit ships it as modeling_lipkit_dual.py.txt (importing lipkit must not import transformers) and
    writes it into the folder as the .py that config.json's auto_map names."""
    from importlib import resources
    from importlib.util import find_spec

    shipped = resources.files("lipkit.interop").joinpath("modeling_lipkit_dual.py.txt").read_bytes()
    assert (exported / "modeling_lipkit_dual.py").read_bytes() == shipped
    assert json.loads((exported / "config.json").read_text())["auto_map"]["AutoModel"].startswith(
        "modeling_lipkit_dual."
    )
    assert find_spec("lipkit.interop.modeling_lipkit_dual") is None


def test_import_round_trip_is_exact(demo, exported):
    model, tok = demo
    again, tok2 = from_hf(exported)
    assert again.spec == model.spec
    a, b = model.state_dict(), again.state_dict()
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    assert torch.equal(tok2(TEXTS), tok(TEXTS))
    pixels = images(n=1)
    for x, y in zip(ours(model, pixels, tok(TEXTS)), ours(again, pixels, tok(TEXTS)), strict=True):
        assert torch.equal(x, y)


def test_cli_both_ways(checkpoint, exported, tmp_path):
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    r = runner.invoke(app, ["checkpoint", "convert", "--to", "hf", str(checkpoint), str(tmp_path / "hf")])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "trust_remote_code=True) gives lipkit's embeddings" in text and "first-token ([CLS])" in text
    r = runner.invoke(app, ["checkpoint", "convert", "--from", "hf", str(exported), str(tmp_path / "ck")])
    assert r.exit_code == 0, r.output
    a, b = (
        load_file(str(checkpoint / "model.safetensors")),
        load_file(str(tmp_path / "ck" / "model.safetensors")),
    )
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_folders(exported, tmp_path):
    config = json.loads((exported / "config.json").read_text())
    bad = tmp_path / "vit"
    bad.mkdir()
    vit = {**config, "vision_config": {"model_type": "vit", "hidden_size": 768}}
    (bad / "config.json").write_text(json.dumps(vit))
    with pytest.raises(UserError, match="'vit' vision model.*timm_wrapper"):
        from_hf(bad)
    token = {**config, "vision_config": {**config["vision_config"], "model_args": {"global_pool": "token"}}}
    (bad / "config.json").write_text(json.dumps(token))
    with pytest.raises(UserError, match="global_pool='token'.*avg, max or avgmax"):
        from_hf(bad)
    stock = tmp_path / "stock"
    shutil.copytree(exported, stock, ignore=shutil.ignore_patterns("*.safetensors"))
    (stock / "config.json").write_text(
        json.dumps({k: v for k, v in config.items() if k != "lipkit_text_pool"})
    )
    with pytest.raises(UserError, match="no lipkit_text_pool.*tanh pooler"):
        from_hf(stock)
    (stock / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="no model.safetensors.*lipkit checkpoint convert --to hf"):
        from_hf(stock)
    with pytest.raises(UserError, match="lack 'text_model.pooler.dense.weight'"):
        state_from_dual({"text_projection.weight": torch.zeros(2, 2)}, "the folder")


def test_refuses_what_it_cannot_write(demo):
    spec = demo[0].spec
    with pytest.raises(UserError, match="image tower is lipkit's ViT.*`--to open_clip`.*lipkit export onnx"):
        check_dual_exportable(replace(spec, vision_tower="vit"))
    with pytest.raises(
        UserError, match="text tower is lipkit's own transformer.*`--to open_clip`.*lipkit export onnx"
    ):
        check_dual_exportable(replace(spec, text_tower="transformer"))
    with pytest.raises(UserError, match="timm_proj='mlp'"):
        check_dual_exportable(replace(spec, timm_proj="mlp"))
    with pytest.raises(UserError, match="logit bias"):
        check_dual_exportable(replace(spec, logit_bias=True))
