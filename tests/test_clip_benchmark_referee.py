"""CLIP_benchmark (PyPI `clip-benchmark`) as an independent referee: its own command, on an OpenCLIP
export of a lipkit checkpoint and on sets `lipkit data export-eval` wrote, agrees with `lipkit eval` in
`eval.protocol: clip_benchmark` within 0.1 point (bench/referee_clip_benchmark.py on a tiny model; the
demo checkpoint's numbers are in the issue note)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("clip_benchmark", reason="the referee needs clip-benchmark (pip install 'lipkit[dev]')")
open_clip = pytest.importorskip("open_clip")

BENCH = Path(__file__).resolve().parents[1] / "bench" / "referee_clip_benchmark.py"
ARCH = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


def _referee():
    spec = importlib.util.spec_from_file_location("referee_clip_benchmark", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A lipkit checkpoint converted from a seeded random OpenCLIP ViT (its CLIP BPE tokenizer is one
    OpenCLIP's own tokenizer reproduces)."""
    from lipkit.checkpoint import save_checkpoint
    from lipkit.interop.open_clip import from_open_clip

    root = tmp_path_factory.mktemp("referee")
    arch = root / "referee-tiny.json"
    arch.write_text(json.dumps(ARCH))
    open_clip.add_model_config(arch)
    torch.manual_seed(0)
    peer = open_clip.create_model("referee-tiny", pretrained=None)
    model, tok = from_open_clip(str(arch), peer.state_dict())
    return save_checkpoint(root / "checkpoint", model, tok)


def test_clip_benchmark_agrees_with_lipkit_eval_in_the_compatible_mode(checkpoint, table, tmp_path):
    rows = _referee().referee(checkpoint, table.parent / "test-style.jsonl", "subcategory", tmp_path, 64)
    assert len(rows) == 9
    for r in rows:
        assert abs(r["peer"] - r["clip_benchmark"]) <= 0.1, r
    assert any(r["peer"] > 0 for r in rows)
