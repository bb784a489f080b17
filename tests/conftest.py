"""Shared fixtures: the offline emoji fixture dataset and the smallest model shape that still trains."""

import atexit
import socket
from pathlib import Path

import pytest

from emoji_fixture import make_fixture_packages
from lipkit.data.emoji import build_emoji

# Model overrides for end-to-end tests: one layer per tower, 32 wide, 32 px images.
TINY_MODEL = {
    "vision_width": 32,
    "vision_layers": 1,
    "vision_heads": 2,
    "text_width": 32,
    "text_layers": 1,
    "text_heads": 2,
    "embed_dim": 32,
    "image_size": 32,
}


def tiny_run_cfg(table, out, objective: str, data=None, augment=None, **train):
    """A 2-epoch fp32 run of `objective` on `table` with TINY_MODEL (batch 8, a log line a step), into
    `out`; `data` / `augment` / `train` add to or replace those sections' keys."""
    from lipkit.config import config_from_dict

    return config_from_dict(
        {
            "data": {"train": str(table), **(data or {})},
            "model": {"overrides": TINY_MODEL},
            "tokenizer": {"vocab_size": 400},
            "augment": augment or {},
            "train": {
                "output": str(out),
                "batch_size": 8,
                "epochs": 2,
                "warmup_steps": 2,
                "log_every": 1,
                "precision": "fp32",
                "objective": objective,
                **train,
            },
        }
    )


_RESERVED: list[socket.socket] = []
atexit.register(lambda: [s.close() for s in _RESERVED])


def free_port() -> int:
    """A loopback port for a server the test starts (TCPStore, torchrun's rendezvous, uvicorn), reserved
    until the session ends: the socket that found it stays bound (SO_REUSEADDR, never listening), so the
    kernel hands it to no other bind(0) or outgoing connection meanwhile (bind-then-close raced them),
    while the server, which sets SO_REUSEADDR too, still binds and listens on it."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    _RESERVED.append(s)
    return s.getsockname()[1]


@pytest.fixture(scope="session")
def table(tmp_path_factory) -> Path:
    """The training table of the emoji dataset built offline from generated fake npm packages."""
    root = tmp_path_factory.mktemp("emoji-fixture")
    make_fixture_packages(root / "packages", n_concepts=40)
    build_emoji(root / "emoji", cache_dir=root, progress=False)
    return root / "emoji" / "train.jsonl"


@pytest.fixture(scope="session")
def canvas_table(table, tmp_path_factory) -> Path:
    """A small canvases build (64 px, 24 training and 4 test canvases) from the fixture tables; its
    training table (test.jsonl beside it)."""
    from lipkit.data.builtin.canvases import CanvasOptions, build_canvases

    out = tmp_path_factory.mktemp("regions") / "canvases"
    options = CanvasOptions(size=64, train_canvases=24, test_canvases=4)
    build_canvases(out, {"train": table, "test": table.parent / "test-style.jsonl"}, options, progress=False)
    return out / "train.jsonl"


def tiny_eval_setup(table: Path, n: int = 12, **spec_overrides):
    """(records, tokenizer, model in eval mode): the first `n` rows of the fixture table, a BPE tokenizer
    trained on their captions and a seeded TINY_MODEL dual encoder (extra spec keys in `spec_overrides`;
    `lexicon_vocab=True` sizes LexLIP heads to the vocabulary)."""
    import torch

    from lipkit.data.sources.registry import read_table
    from lipkit.models.dual_encoder import DualEncoder
    from lipkit.models.presets import get_spec
    from lipkit.text.tokenizer import TextTokenizer

    records = read_table(table)[:n]
    tok = TextTokenizer.train([c for r in records for c in r.captions], vocab_size=300, context_length=16)
    if spec_overrides.get("lexicon_vocab") is True:
        spec_overrides["lexicon_vocab"] = tok.vocab_size
    torch.manual_seed(0)
    spec = get_spec(
        "tiny",
        **TINY_MODEL,
        vocab_size=tok.vocab_size,
        eot_id=tok.eot_id,
        context_length=16,
        **spec_overrides,
    )
    return records, tok, DualEncoder(spec).eval()
