"""lipkit's causal text tower at inference drops the columns after the batch's last end token: the same
embeddings as the full context, fewer FLOPs for short queries; training and token outputs keep every column."""

from __future__ import annotations

import torch

from lipkit.models.presets import get_spec
from lipkit.models.text import TextTransformer, trim_after_end


def test_trim_after_end_keeps_every_end_token():
    ids = torch.tensor([[1, 5, 9, 2, 0, 0], [1, 9, 2, 0, 0, 0]])
    assert trim_after_end(ids, 2).tolist() == [[1, 5, 9, 2], [1, 9, 2, 0]]
    no_end = torch.tensor([[1, 5, 9, 7, 7, 7], [1, 9, 2, 0, 0, 0]])
    assert trim_after_end(no_end, 2).shape == (2, 6)  # a row without an end token: nothing dropped


def test_eval_forward_equals_the_full_context():
    spec = get_spec(
        "tiny", vocab_size=50, eot_id=2, context_length=16, text_width=32, text_heads=2, embed_dim=8
    )
    torch.manual_seed(0)
    tower = TextTransformer(spec)
    ids = torch.zeros(3, 16, dtype=torch.long)
    for r, n in enumerate((4, 7, 3)):
        ids[r, :n] = torch.randint(3, 50, (n,))
        ids[r, n] = 2
    tower.train()
    with torch.no_grad():
        full = tower(ids)
        _, tokens = tower.eval()(ids, return_tokens=True)
        trimmed = tower(ids)
    assert tokens.shape[1] == 16
    assert torch.allclose(trimmed, full, atol=1e-5)
