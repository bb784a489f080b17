import pytest
import torch

from lipkit.checkpoint import load_checkpoint, save_checkpoint
from lipkit.errors import UserError
from lipkit.models.dual_encoder import DualEncoder
from lipkit.models.presets import get_spec
from lipkit.text.tokenizer import TextTokenizer

SMALL = dict(
    vision_width=32,
    vision_layers=2,
    vision_heads=2,
    text_width=32,
    text_layers=2,
    text_heads=2,
    embed_dim=16,
    image_size=32,
    patch_size=8,
    context_length=12,
)


@pytest.fixture(scope="module")
def tok():
    return TextTokenizer.train(
        ["a red heart", "a nerd face", "egypt flag"] * 5, vocab_size=300, context_length=12
    )


@pytest.mark.parametrize("stem", ["patch", "conv"])
def test_save_load_gives_identical_embeddings(tmp_path, tok, stem):
    torch.manual_seed(0)
    spec = get_spec("tiny", **SMALL, vocab_size=tok.vocab_size, eot_id=tok.eot_id, vision_stem=stem)
    model = DualEncoder(spec)
    model.train()(torch.randn(4, 3, 32, 32), tok(["a", "b", "c", "d"]))  # batch-norm statistics move
    model.eval()
    images, ids = torch.randn(3, 3, 32, 32), tok(["a red heart", "nerd", "flag"])
    save_checkpoint(tmp_path / "ckpt", model, tok, {"preset": "tiny"})
    save_checkpoint(tmp_path / "ckpt", model, tok, {"preset": "tiny"})  # overwriting is atomic and fine
    again, tok2, info = load_checkpoint(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), again.encode_image(images))
        assert torch.equal(model.encode_text(ids), again.encode_text(tok2(["a red heart", "nerd", "flag"])))
    assert info["preset"] == "tiny"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary leftovers


def test_padding_does_not_change_text_features(tok):
    model = DualEncoder(get_spec("tiny", **SMALL, vocab_size=tok.vocab_size, eot_id=tok.eot_id)).eval()
    ids = tok(["a nerd face"])
    short = ids[:, : int((ids != 0).sum())]
    with torch.no_grad():
        assert torch.allclose(model.encode_text(ids), model.encode_text(short), atol=1e-6)


def test_conv_stem_keeps_the_token_grid_and_rejects_odd_patches():
    from lipkit.models.vision import VisionTransformer

    vit = VisionTransformer(get_spec("tiny", **SMALL, vision_stem="conv"))
    pooled, tokens = vit(torch.randn(2, 3, 32, 32), return_tokens=True)
    assert pooled.shape == (2, 16) and tokens.shape == (2, 16, 16)  # (32/8)² tokens
    with pytest.raises(ValueError, match="power-of-two"):
        VisionTransformer(
            get_spec("tiny", **{**SMALL, "patch_size": 6, "image_size": 36}, vision_stem="conv")
        )


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(UserError, match="not a lipkit checkpoint"):
        load_checkpoint(tmp_path)


def test_base32_has_clip_b32_shape():
    spec = get_spec("base-32")
    model = DualEncoder(spec)
    n = sum(p.numel() for p in model.visual.parameters())
    assert 87e6 < n < 89e6  # OpenAI ViT-B/32 image tower: 87.8M parameters
    assert model.visual.positional_embedding.shape == (50, 768)


def _small_model(tok):
    torch.manual_seed(0)
    return DualEncoder(
        get_spec("tiny", vocab_size=tok.vocab_size, eot_id=tok.eot_id, pad_id=tok.pad_id, **SMALL)
    )


def _grads(model, images, ids):
    model.zero_grad(set_to_none=True)
    img, txt = model.encode_image(images), model.encode_text(ids)
    (img @ txt.t()).logsumexp(dim=1).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("towers", [(True, False), (False, True), (True, True)])
def test_activation_checkpointing_gives_the_same_gradients(tok, towers):
    model = _small_model(tok)
    images = torch.randn(4, 3, 32, 32)
    ids = tok(["a red heart", "nerd", "egypt flag", "a heart"])
    with torch.no_grad():  # the reference: plain inference before any checkpointing
        reference = model.encode_image(images), model.encode_text(ids)
    calls = {"image": 0, "text": 0}
    for tower, name in ((model.visual, "image"), (model.text, "text")):
        mlp = tower.transformer.resblocks[0].mlp  # count real calls (hooks do not see the recomputation)
        mlp.forward = lambda x, n=name, f=mlp.forward: (calls.__setitem__(n, calls[n] + 1), f(x))[1]
    plain = _grads(model, images, ids)
    assert calls == {"image": 1, "text": 1}
    model.set_checkpointing(*towers)
    checked = _grads(model, images, ids)
    # a checkpointed tower runs its blocks again in the backward
    assert calls == {"image": 2 + towers[0], "text": 2 + towers[1]}
    assert plain.keys() == checked.keys()
    for name, g in plain.items():
        torch.testing.assert_close(checked[name], g, rtol=1e-5, atol=1e-6, msg=name)
    with torch.no_grad():  # inference never recomputes anything and gives the plain features
        inferred = model.encode_image(images), model.encode_text(ids)
    assert calls == {"image": 3 + towers[0], "text": 3 + towers[1]}
    for got, want in zip(inferred, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_compiled_towers_match_eager_and_keep_parameter_names(tok):
    model = _small_model(tok).eval()  # eval: the eager text tower trims padding, as `fresh` below does
    images, ids = torch.randn(2, 3, 32, 32), tok(["a red heart", "egypt flag"])
    names = list(model.state_dict())
    with torch.no_grad():
        eager = model.encode_image(images), model.encode_text(ids)
    traced = []  # whether each tower's forward ran under torch.compile (public API, read while tracing)
    for tower in (model.visual, model.text):
        tower.register_forward_pre_hook(lambda *_: traced.append(torch.compiler.is_compiling()))
    with torch.no_grad():
        model.encode_image(images), model.encode_text(ids)
    assert traced == [False, False]
    traced.clear()
    model.compile_towers()
    assert list(model.state_dict()) == names
    with torch.no_grad():
        compiled = model.encode_image(images), model.encode_text(ids)
    assert traced and all(traced), traced  # both towers now run the compiled graph
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    fresh = DualEncoder(model.spec)  # checkpoints written from a compiled model load into an eager one
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        reloaded = fresh.eval().encode_image(images), fresh.encode_text(ids)
    for a, b in zip(eager, reloaded, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
