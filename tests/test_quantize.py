"""`lipkit quantize`: int8 ONNX towers kept only when the measured quality check allows it, the runtime
that reads them (search.onnx_encoder) and `lipkit embed --int8`."""

import json
import sys

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

onnx = pytest.importorskip("onnx", reason="quantisation tests need onnx (pip install 'lipkit[interop]')")
pytest.importorskip(
    "onnxruntime", reason="quantisation tests need onnxruntime (pip install 'lipkit[interop]')"
)
pytest.importorskip(
    "onnxscript", reason="torch's ONNX exporter needs onnxscript (pip install 'lipkit[interop]')"
)
pytest.importorskip("timm", reason="needs timm (a lipkit dependency)")

from lipkit.checkpoint import save_checkpoint  # noqa: E402
from lipkit.cli.interop import register as register_interop  # noqa: E402
from lipkit.cli.search import register as register_search  # noqa: E402
from lipkit.data.image_store import ImageStore  # noqa: E402
from lipkit.data.sources.registry import read_table  # noqa: E402
from lipkit.errors import UserError  # noqa: E402
from lipkit.interop.quantize import QuantOptions, quantize_checkpoint  # noqa: E402
from lipkit.models.dual_encoder import DualEncoder  # noqa: E402
from lipkit.models.presets import get_spec  # noqa: E402
from lipkit.search.embed import run_embed  # noqa: E402
from lipkit.search.onnx_encoder import OnnxEncoder  # noqa: E402
from lipkit.text.tokenizer import TextTokenizer  # noqa: E402

INT8_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger"}
# a small convolutional image tower (timm's test_efficientnet: statically quantised) and a transformer
# text tower (dynamically quantised)
SPEC = dict(vision_tower="timm", timm_model_name="test_efficientnet", image_size=32, embed_dim=32)
TEXT = dict(text_width=64, text_layers=2, text_heads=2, context_length=16)


@pytest.fixture(scope="module")
def setup(table, tmp_path_factory):
    """(model, tokenizer, checkpoint inside a run folder whose config names the splits, eval table)."""
    root = tmp_path_factory.mktemp("quantize")
    records = read_table(table)
    tok = TextTokenizer.train([c for r in records for c in r.captions], vocab_size=400, context_length=16)
    torch.manual_seed(0)
    spec = get_spec("tiny", **SPEC, **TEXT, vocab_size=tok.vocab_size, eot_id=tok.eot_id)
    model = DualEncoder(spec).eval()
    ckpt = save_checkpoint(root / "run" / "checkpoint", model, tok, {"preset": "tiny"})
    test = table.parent / "test-style.jsonl"
    run_cfg = {"data": {"train": str(table), "eval": {"test-style": str(test)}}, "model": {"preset": "tiny"}}
    (root / "run" / "config.json").write_text(json.dumps(run_cfg))
    return model, tok, ckpt, test


@pytest.fixture(scope="module")
def kept(setup, tmp_path_factory):
    """`lipkit quantize` through the CLI with a tolerance every int8 tower meets: splits from the run
    config."""
    _, _, ckpt, _ = setup
    out = tmp_path_factory.mktemp("q") / "int8"
    app = typer.Typer()
    register_interop(app)
    args = [
        "quantize",
        str(ckpt),
        str(out),
        "--tolerance",
        "100",
        "--threads",
        "1",
        "--calibration-images",
        "64",
    ]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "int8 check on 65 images" in r.output and "t→i R@1" in r.output
    return out


def ops(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_int8_towers_are_kept_and_described(kept, setup):
    info = json.loads((kept / "quant.json").read_text())
    assert {f.name for f in kept.iterdir()} >= {"image.onnx", "text.onnx", "tokenizer.json", "quant.json"}
    image, text = info["towers"]["image"], info["towers"]["text"]
    assert image["method"] == "static" and text["method"] == "dynamic"  # "auto": by the graph's weights
    assert image["precision"] == text["precision"] == "int8" and image["kept_int8"]
    assert image["calibration_inputs"] == 64
    assert info["gated"] == [
        "zeroshot/category/top1",
        "zeroshot/subcategory/top1",
        "retrieval/text_to_image/R@1",
    ]
    for t in (image, text):
        assert set(t["metrics"]["fp32"]) == set(t["metrics"]["int8"]) == set(info["gated"])
        assert t["throughput"]["fp32"] > 0 and t["throughput"]["int8"] > 0
        assert t["bytes"]["int8"] < t["bytes"]["fp32"]
        lost = {k: 100 * (t["metrics"]["fp32"][k] - t["metrics"]["int8"][k]) for k in info["gated"]}
        assert lost == pytest.approx(t["points_lost"], abs=1e-3)
    assert info["eval_source"].endswith("test-style.jsonl") and info["calibration_source"].endswith(
        "train.jsonl"
    )
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops(kept / "image.onnx")  # static QDQ
    assert "MatMulInteger" in ops(kept / "text.onnx")  # dynamic


def test_int8_embeddings_are_close_to_fp32(kept, setup):
    model, tok, _, test = setup
    enc = OnnxEncoder(kept, threads=1)
    assert (enc.image_size, enc.dim) == (32, 32) and enc.precision == {"image": "int8", "text": "int8"}
    records = read_table(test)[:24]
    images = ImageStore(records, 32, cache=True).cache
    texts = [r.captions[0] for r in records]
    with torch.no_grad():
        ref_i = model.embed_images_u8(images).numpy()
        ref_t = model.encode_text(tok(texts)).numpy()
    got_i, got_t = enc.images(images), enc.texts(texts)
    assert got_i.dtype == got_t.dtype == np.float32 and got_i.shape == got_t.shape == (24, 32)
    np.testing.assert_allclose(np.linalg.norm(got_i, axis=1), 1, atol=1e-4)
    cos_i, cos_t = (got_i * ref_i).sum(1), (got_t * ref_t).sum(1)
    print(f"int8 vs fp32 cosine: image min {cos_i.min():.4f}, text min {cos_t.min():.4f}")
    assert cos_i.min() > 0.98 and cos_t.min() > 0.98
    assert enc.images(images[:0]).shape == (0, 32) and enc.texts([]).shape == (0, 32)


def test_impossible_tolerance_keeps_fp32(setup, tmp_path):
    """A tolerance no tower can meet (int8 would have to gain 100 points): both towers stay fp32, and the
    folder's embeddings are the PyTorch ones."""
    model, tok, ckpt, test = setup
    opts = QuantOptions(eval_source=test, tolerance=-100, threads=1, calibration_images=32)
    info = quantize_checkpoint(ckpt, tmp_path / "q", opts)
    assert [t["precision"] for t in info["towers"].values()] == ["fp32", "fp32"]
    assert not any(t["kept_int8"] for t in info["towers"].values())
    assert info["chosen"] == info["fp32"]
    saved = json.loads((tmp_path / "q" / "quant.json").read_text())
    assert saved["towers"]["image"]["points_lost"] == info["towers"]["image"]["points_lost"]
    for name in ("image.onnx", "text.onnx"):
        assert not ops(tmp_path / "q" / name) & INT8_OPS
    enc = OnnxEncoder(tmp_path / "q")
    records = read_table(test)[:5]
    images = ImageStore(records, 32, cache=True).cache
    with torch.no_grad():
        np.testing.assert_allclose(enc.images(images), model.embed_images_u8(images).numpy(), atol=1e-4)
        ids = tok(["red ring", "a much longer caption about a blue square"])
        np.testing.assert_allclose(
            enc.texts(["red ring", "a much longer caption about a blue square"]),
            model.encode_text(ids).numpy(),
            atol=1e-4,
        )


def test_embed_int8_writes_close_embeddings(kept, setup, tmp_path):
    _, _, ckpt, test = setup
    app = typer.Typer()
    register_search(app)
    r = CliRunner().invoke(app, ["embed", str(ckpt), str(test), str(tmp_path / "e8"), "--int8", str(kept)])
    assert r.exit_code == 0, r.output
    run_embed(ckpt, test, tmp_path / "e32", progress=False)
    manifest = json.loads((tmp_path / "e8" / "manifest.json").read_text())
    assert manifest["encoder"] == {
        "runtime": "onnxruntime",
        "folder": str(kept.resolve()),
        "image": "int8",
        "text": "int8",
    }
    assert "onnx" in manifest["fingerprint"]
    assert json.loads((tmp_path / "e32" / "manifest.json").read_text())["encoder"] == {"runtime": "torch"}
    for name in ("image_emb.npy", "text_emb.npy"):
        a, b = np.load(tmp_path / "e8" / name), np.load(tmp_path / "e32" / name)
        assert a.shape == b.shape == (65, 32)
        assert (a * b).sum(1).min() > 0.98, name
    # the int8 embeddings are no resume of the fp32 ones
    with pytest.raises(UserError, match="another source, checkpoint"):
        run_embed(ckpt, test, tmp_path / "e32", int8=kept, progress=False)


def test_user_errors(setup, kept, tmp_path, monkeypatch):
    model, tok, ckpt, test = setup
    with pytest.raises(UserError, match="not an ONNX folder.*lipkit quantize"):
        OnnxEncoder(tmp_path)
    with pytest.raises(UserError, match="not a lipkit checkpoint"):
        quantize_checkpoint(tmp_path / "missing", tmp_path / "out")
    lone = save_checkpoint(tmp_path / "lone", model, tok)  # no run config beside it
    with pytest.raises(UserError, match="--eval-source"):
        quantize_checkpoint(lone, tmp_path / "out")
    with pytest.raises(UserError, match="--image-method 'fast' is unknown"):
        quantize_checkpoint(ckpt, tmp_path / "out", QuantOptions(eval_source=test, image_method="fast"))
    with pytest.raises(UserError, match="already exists.*--overwrite"):
        quantize_checkpoint(ckpt, kept, QuantOptions(eval_source=test))
    with pytest.raises(UserError, match="needs calibration data.*--calibration-source"):
        quantize_checkpoint(lone, tmp_path / "out", QuantOptions(eval_source=test, image_method="static"))
    other = DualEncoder(model.spec).eval()
    with pytest.raises(UserError, match="quantised from another checkpoint"):
        run_embed(save_checkpoint(tmp_path / "other", other, tok), test, tmp_path / "e", int8=kept)
    assert not (tmp_path / "out").exists()  # nothing half-written
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    with pytest.raises(UserError, match=r"pip install 'lipkit\[interop\]'"):
        quantize_checkpoint(ckpt, tmp_path / "out", QuantOptions(eval_source=test))
    with pytest.raises(UserError, match=r"pip install 'lipkit\[interop\]'"):
        OnnxEncoder(kept)


def test_a_pair_that_loses_too_much_together_keeps_one_tower_fp32():
    """Each int8 tower alone is within the tolerance, both together are not: the one that lost more alone
    goes back to fp32 (the pair is what embed and serve run)."""
    from lipkit.interop.quantize import _check_pair

    keys = ["zeroshot/category/top1", "retrieval/text_to_image/R@1"]
    full = dict.fromkeys(keys, 0.5)

    class Scores:  # image int8 loses 0.6 points, text int8 0.8, together 1.4
        def metrics(self, image, text):
            lost = 0.006 * (image == "image int8") + 0.008 * (text == "text int8")
            return {k: v - lost for k, v in full.items()}

    memo = {(t, p): f"{t} {p}" for t in ("image", "text") for p in ("fp32", "int8")}
    towers = {
        t: {"precision": "int8", "kept_int8": True, "points_lost": dict.fromkeys(keys, d)}
        for t, d in (("image", 0.6), ("text", 0.8))
    }
    report = {"fp32": full, "gated": keys, "towers": towers}
    _check_pair(report, Scores(), memo, 1.0, lambda _: None)
    assert towers["image"]["precision"] == "int8" and towers["text"]["precision"] == "fp32"
    assert not towers["text"]["kept_int8"]
    assert report["chosen_points_lost"] == pytest.approx(dict.fromkeys(keys, 0.6))
    towers["text"].update(precision="int8", kept_int8=True)
    _check_pair(report, Scores(), memo, 1.5, lambda _: None)  # within 1.5 points together
    assert [t["precision"] for t in towers.values()] == ["int8", "int8"]
