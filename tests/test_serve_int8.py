"""`lipkit serve` / `lipkit search` with `--int8 DIR`: the quantized folder's ONNX towers answer the
queries (text and uploaded images), /health says so, and the answers match the PyTorch towers'."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="fastapi is not installed (pip install 'lipkit[serve]')")
pytest.importorskip("faiss", reason="faiss-cpu is not installed (pip install 'lipkit[search]')")
pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install 'lipkit[interop]')")

from test_quantize import kept, setup  # noqa: E402, F401 - the quantized tiny checkpoint's fixtures


def test_serve_answers_with_the_int8_towers(kept, setup, tmp_path):  # noqa: F811
    from fastapi.testclient import TestClient
    from PIL import Image

    from lipkit.errors import UserError
    from lipkit.search.embed import run_embed
    from lipkit.search.index import build_index
    from lipkit.search.query import Searcher
    from lipkit.search.server import create_app

    _, _, ckpt, test = setup
    run_embed(ckpt, test, tmp_path / "emb", batch_size=32, progress=False)
    items = json.loads((tmp_path / "emb" / "ids.json").read_text())
    build_index(np.load(tmp_path / "emb" / "image_emb.npy"), "flat", items).save(tmp_path / "index")
    torch_side = Searcher(ckpt, tmp_path / "index")
    onnx_side = Searcher(ckpt, tmp_path / "index", onnx=kept)
    caption = items[0]["caption"]
    a, b = torch_side.text_query(caption)[0], onnx_side.text_query(caption)[0]
    assert float(a @ b) > 0.95
    buf = io.BytesIO()
    Image.open(items[1]["path"]).convert("RGB").save(buf, "PNG")
    with TestClient(create_app(onnx_side)) as c:
        runtime = c.get("/health").json()["model"]["runtime"]
        assert runtime == {t: f"onnx {p}" for t, p in onnx_side.onnx.precision.items()}
        assert "int8" in " ".join(runtime.values())
        hits = c.get("/search", params={"q": caption, "k": 5}).json()["results"]
        up = c.post("/search", content=buf.getvalue(), headers={"content-type": "image/png"}).json()
    assert len(hits) == 5 and 1 in [h["id"] for h in up["results"]]  # an indexed image finds itself
    image = torch_side.image_file(items[1]["path"])
    assert float(torch_side.image_query(image)[0] @ onnx_side.image_query(image)[0]) > 0.95
    import torch

    from lipkit.checkpoint import load_checkpoint, save_checkpoint

    model, tok, _ = load_checkpoint(ckpt)
    with torch.no_grad():
        model.logit_scale.add_(1.0)
    other_ckpt = save_checkpoint(tmp_path / "other-ckpt", model, tok, {"preset": "tiny"})
    with pytest.raises(UserError, match="quantised from another checkpoint"):
        Searcher(other_ckpt, tmp_path / "index", onnx=kept)
    with pytest.raises(UserError, match="quantize this checkpoint"):
        other = kept.parent / "other"
        other.mkdir()
        for f in kept.iterdir():
            (other / f.name).write_bytes(f.read_bytes())
        cfg = json.loads((other / "onnx_config.json").read_text())
        (other / "onnx_config.json").write_text(json.dumps({**cfg, "embed_dim": cfg["embed_dim"] + 1}))
        Searcher(ckpt, tmp_path / "index", onnx=other)
