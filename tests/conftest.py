"""Shared fixtures: the offline emoji fixture dataset and the smallest model shape that still trains."""

from pathlib import Path

import pytest

from lipkit.data.emoji import build_emoji
from lipkit.data.emoji_fixture import make_fixture_packages

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


@pytest.fixture(scope="session")
def table(tmp_path_factory) -> Path:
    """The training table of the emoji dataset built offline from generated fake npm packages."""
    root = tmp_path_factory.mktemp("emoji-fixture")
    make_fixture_packages(root / "packages", n_concepts=40)
    build_emoji(root / "emoji", cache_dir=root, progress=False)
    return root / "emoji" / "train.jsonl"
