"""ONNX export: two graphs with a dynamic batch whose onnxruntime outputs match PyTorch."""

import json
import sys

import pytest
import torch
import typer
from typer.testing import CliRunner

onnx = pytest.importorskip("onnx", reason="ONNX export tests need onnx (pip install 'lipkit[interop]')")
ort = pytest.importorskip(
    "onnxruntime", reason="ONNX export tests need onnxruntime (pip install 'lipkit[interop]')"
)
pytest.importorskip(
    "onnxscript", reason="torch's ONNX exporter needs onnxscript (pip install 'lipkit[interop]')"
)

from lipkit.checkpoint import save_checkpoint  # noqa: E402
from lipkit.cli.interop import register  # noqa: E402
from lipkit.errors import UserError  # noqa: E402
from lipkit.interop.onnx import export_onnx  # noqa: E402
from lipkit.models.dual_encoder import DualEncoder  # noqa: E402
from lipkit.models.presets import get_spec  # noqa: E402
from lipkit.text.tokenizer import TextTokenizer  # noqa: E402

TOL = 1e-4
SMALL = dict(vision_width=48, vision_layers=2, vision_heads=3, text_width=48, text_layers=2, text_heads=3)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    tok = TextTokenizer.train(
        ["a red heart", "a nerd face", "egypt flag"] * 5, vocab_size=300, context_length=16
    )
    spec = get_spec(
        "tiny",
        **SMALL,
        embed_dim=32,
        image_size=32,
        context_length=16,
        vocab_size=tok.vocab_size,
        eot_id=tok.eot_id,
    )
    torch.manual_seed(0)
    model = DualEncoder(spec).eval()
    save_checkpoint(root / "ck", model, tok)
    app = typer.Typer()
    register(app)
    r = CliRunner().invoke(app, ["export", "onnx", str(root / "ck"), str(root / "onnx")])
    assert r.exit_code == 0, r.output
    assert "max |onnxruntime - torch|" in r.output
    return model, tok, root / "onnx"


@pytest.mark.parametrize("batch", [1, 5])
def test_onnxruntime_matches_torch(exported, batch):
    model, tok, out = exported
    images = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
    texts = ["a red heart", "nerd", "egypt flag and a nerd face", "", "heart heart heart heart heart heart"][
        :batch
    ]
    ids = tok(texts)
    image = ort.InferenceSession(str(out / "image.onnx"), providers=["CPUExecutionProvider"])
    text = ort.InferenceSession(str(out / "text.onnx"), providers=["CPUExecutionProvider"])
    got_i = torch.from_numpy(image.run(None, {"pixel_values": images.numpy()})[0])
    got_t = torch.from_numpy(text.run(None, {"input_ids": ids.numpy()})[0])
    with torch.no_grad():
        d_i = (got_i - model.encode_image(images)).abs().max().item()
        d_t = (got_t - model.encode_text(ids)).abs().max().item()
    print(f"onnx batch {batch}: image {d_i:.2e}, text {d_t:.2e}")
    assert got_i.shape == (batch, 32) and got_t.shape == (batch, 32)
    assert d_i <= TOL and d_t <= TOL
    assert torch.allclose(got_i.norm(dim=-1), torch.ones(batch), atol=1e-5)  # normalised embeddings
    cut = int((ids != tok.pad_id).sum(1).max())  # the text length is dynamic too: drop the padding
    got_cut = torch.from_numpy(text.run(None, {"input_ids": ids[:, :cut].numpy()})[0])
    assert (got_cut - got_t).abs().max().item() <= TOL


def test_graphs_have_dynamic_batch_and_opset(exported):
    _, tok, out = exported
    for name, inp in (("image.onnx", "pixel_values"), ("text.onnx", "input_ids")):
        graph = onnx.load(str(out / name))
        assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 17
        (first,) = [i for i in graph.graph.input if i.name == inp]
        dims = first.type.tensor_type.shape.dim
        assert dims[0].dim_param  # symbolic batch, not a fixed size
        assert bool(dims[1].dim_param) == (inp == "input_ids")  # and text length
    cfg = json.loads((out / "onnx_config.json").read_text())
    assert cfg["context_length"] == 16 and cfg["image_size"] == 32
    assert TextTokenizer.load(out / "tokenizer.json", 16)(["nerd"]).tolist() == tok(["nerd"]).tolist()


def test_user_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="not a lipkit checkpoint"):
        export_onnx(tmp_path / "missing", tmp_path / "out")
    tok = TextTokenizer.train(["a b c"] * 3, vocab_size=270, context_length=8)
    spec = get_spec("tiny", **SMALL, embed_dim=8, image_size=16, context_length=8, vocab_size=tok.vocab_size)
    save_checkpoint(tmp_path / "ck", DualEncoder(spec), tok)
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if it were not installed
    with pytest.raises(UserError, match=r"pip install 'lipkit\[interop\]'"):
        export_onnx(tmp_path / "ck", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written
