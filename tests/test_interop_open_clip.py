"""OpenCLIP checkpoints in and out: the peer model is built by open_clip itself (random weights, never
downloaded), converted, and compared on images, texts and logits; token ids against OpenCLIP's and
Hugging Face's CLIP tokenizers."""

import json
import random
import sys

import pytest
import torch
import typer
from typer.testing import CliRunner

open_clip = pytest.importorskip(
    "open_clip", reason="OpenCLIP parity tests need open_clip_torch (pip install 'lipkit[interop]')"
)

from lipkit.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from lipkit.cli.interop import register  # noqa: E402
from lipkit.errors import UserError  # noqa: E402
from lipkit.interop.clip_bpe import clip_tokenizer, clip_vocab_and_merges  # noqa: E402
from lipkit.interop.open_clip import from_open_clip, read_arch, to_open_clip  # noqa: E402
from lipkit.interop.open_clip_spec import spec_from_open_clip  # noqa: E402
from lipkit.interop.peer_weights import read_state_dict  # noqa: E402
from lipkit.text.tokenizer import TextTokenizer  # noqa: E402

TOL = 1e-4
TINY_NAME = "lipkit-test-tiny"
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
FRAGMENTS = [
    "a photo of a cat", "A Photo Of Two DOGS", "the café on Rue de l'Église", "naïve façade, Zürich",
    "São Paulo à noite", "Ångström and Øresund", "straße", "İstanbul'da ışık", "ΟΔΟΣ ΣΤΗΝ ΑΘΗΝΑ", "ΣΑΣ σας",
    "улыбающееся лицо", "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "สวัสดีชาวโลก",
    "一只猫坐在桌子上，看着窗外。", "東京タワーの夜景", "ｶﾀｶﾅ ﾃｽﾄ", "한국어 캡션입니다", "ｆｕｌｌｗｉｄｔｈ\u3000ｔｅｘｔ！",
    "😀 grinning face", "👍🏽 thumbs up: medium skin tone", "👨‍👩‍👧‍👦 family", "🇪🇬 flag: Egypt",
    "🏴\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f scotland", "❤️ red heart", "it's", "don't stop",
    "we'll see, they've gone, I'm here, you're right, he'd go", "rock'n'roll", "“curly quotes” and ‘single’",
    "ﬁne ﬂowers", "AT&amp;T and &lt;b&gt;", "fish &amp; chips", "price: $1,234.56", "3.14159 is π",
    "#hashtag @mention https://example.com/a?b=c", "!!!???...", "tabs\tand\nnewlines  and   spaces",
    "   leading and trailing   ", "MiXeD CaSe WoRdS", "under_score-dash/slash", "emoji🙂inside🙃words",
    "¿Qué pasa? ¡Nada!", "x²+y²=z²", "e\u0301 decomposed accent", "Ⅻ roman", "\u00a0non\u00a0breaking",
    "zero\u200bwidth", "", "a", "1", "12345678901234567890",
]  # fmt: skip


def captions(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = list(FRAGMENTS)
    while len(out) < n - 10:
        out.append(" ".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 4))))
    out += [" ".join(rng.choice(FRAGMENTS) for _ in range(20 + i)) for i in range(10)]  # > 77 tokens
    return out


CAPTIONS = captions()
TEXTS = ["a photo of a cat", "ﬁne “dogs” in 東京 😀"]


@pytest.fixture(scope="module")
def tiny_arch(tmp_path_factory):
    path = tmp_path_factory.mktemp("arch") / f"{TINY_NAME}.json"
    path.write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(path)
    return path


def perturbed(model: torch.nn.Module, seed: int, max_numel: int = 1_000_000) -> torch.nn.Module:
    """New random values for every tensor up to `max_numel` (OpenCLIP starts biases at 0 and norms at 1,
    which would hide mix-ups; the big matrices are random already and left alone to stay fast)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() <= max_numel:
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model.eval()


def embed(lip, images, ids) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return lip.encode_image(images), lip.encode_text(ids), lip.scale()


def diffs(lip, peer, images, ids) -> dict[str, float]:
    """Max abs differences of image/text embeddings and logits; `lip` is a model or its `embed` output."""
    a_i, a_t, scale = lip if isinstance(lip, tuple) else embed(lip, images, ids)
    with torch.no_grad():
        b_i, b_t = peer.encode_image(images, normalize=True), peer.encode_text(ids, normalize=True)
        logits = peer.logit_scale.exp() * b_i @ b_t.T  # CLIP.get_logits, without a second forward
    return {
        "image": (a_i - b_i).abs().max().item(),
        "text": (a_t - b_t).abs().max().item(),
        "logits": (scale * a_i @ a_t.T - logits).abs().max().item(),
    }


def assert_close(d: dict[str, float], label: str) -> None:
    print(f"{label}: " + ", ".join(f"{k} {v:.2e}" for k, v in d.items()))
    assert max(d.values()) <= TOL, (label, d)


def images_for(spec, n=2, seed=0):
    return torch.randn(n, 3, spec.image_size, spec.image_size, generator=torch.Generator().manual_seed(seed))


def test_tokenizer_matches_open_clip():
    ours = TextTokenizer(clip_tokenizer(), 77)(CAPTIONS)
    ref = open_clip.get_tokenizer("ViT-B-32")(CAPTIONS)
    mismatched = [c for c, a, b in zip(CAPTIONS, ours, ref, strict=True) if not torch.equal(a, b)]
    assert not mismatched, mismatched[:5]
    truncated = ref[:, -1] == 49407
    assert truncated.sum() >= 10  # the long captions are cut to 77 tokens, ending in the end token


def test_tokenizer_matches_hf_where_hf_matches_open_clip(tmp_path):
    transformers = pytest.importorskip(
        "transformers", reason="needs transformers (pip install 'lipkit[interop]')"
    )
    vocab, merges = clip_vocab_and_merges()
    (tmp_path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = "\n".join(" ".join(m) for m in merges)
    (tmp_path / "merges.txt").write_text(f"#version: 0.2\n{lines}\n", encoding="utf-8")
    hf = transformers.CLIPTokenizer.from_pretrained(tmp_path)  # CLIPTokenizer(Fast) in transformers 4 and 5
    ref = open_clip.get_tokenizer("ViT-B-32")(CAPTIONS).tolist()
    ours = TextTokenizer(clip_tokenizer(), 77)(CAPTIONS).tolist()
    agree = 0
    for text, o, r in zip(CAPTIONS, ours, ref, strict=True):
        h = hf(text, truncation=True, max_length=77)["input_ids"]
        if h == r[: len(h)] and not any(r[len(h) :]):
            agree += 1
            assert o[: len(h)] == h, text
    # HF's fast tokenizer skips ftfy (curly quotes, full-width forms, ligatures, HTML entities)
    print(f"HF CLIPTokenizer == OpenCLIP on {agree}/{len(CAPTIONS)} captions; lipkit equal on all of them")
    assert agree >= 150, agree


@pytest.mark.parametrize("arch", [TINY_NAME, "ViT-B-32", "ViT-B-32-quickgelu"])
def test_parity_both_ways(arch, tiny_arch):
    peer = perturbed(open_clip.create_model(arch, pretrained=None), seed=1)
    model, tok = from_open_clip(arch, peer.state_dict())
    assert model.spec.quick_gelu == arch.endswith("quickgelu")
    ids = tok(TEXTS)
    assert torch.equal(ids, open_clip.get_tokenizer(arch)(TEXTS))
    images = images_for(model.spec)
    ours = embed(model, images, ids)
    assert_close(diffs(ours, peer, images, ids), f"open_clip->lipkit {arch}")

    cfg, _, state = to_open_clip(model)  # lipkit -> OpenCLIP
    ref = open_clip.get_model_config(arch)
    for tower in ("vision_cfg", "text_cfg"):  # the written config describes the same architecture
        assert {k: v for k, v in cfg[tower].items() if k in ref[tower]} == ref[tower]
    assert cfg.get("quick_gelu", False) == ref.get("quick_gelu", False)
    # tiny: a model built from the written config; ViT-B: reuse the peer (fast), its weights no longer lipkit's
    target = open_clip.CLIP(**cfg) if arch == TINY_NAME else perturbed(peer, seed=2)
    target.load_state_dict(state, strict=True)
    assert_close(diffs(ours, target.eval(), images, ids), f"lipkit->open_clip {arch}")


def test_cli_round_trip_through_files(tmp_path, tiny_arch):
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    peer = perturbed(open_clip.create_model(TINY_NAME, pretrained=None), seed=3)
    torch.save(peer.state_dict(), tmp_path / "peer.pt")
    r = runner.invoke(
        app,
        [
            "checkpoint",
            "convert",
            "--from",
            "open_clip",
            str(tiny_arch),
            str(tmp_path / "peer.pt"),
            str(tmp_path / "ck"),
        ],
    )
    assert r.exit_code == 0, r.output
    model, tok, info = load_checkpoint(tmp_path / "ck")
    assert info["converted_from"]["format"] == "open_clip"
    images, ids = images_for(model.spec), tok(TEXTS)
    assert_close(diffs(model, peer, images, ids), "open_clip .pt -> lipkit checkpoint (CLI)")

    r = runner.invoke(
        app, ["checkpoint", "convert", "--to", "open_clip", str(tmp_path / "ck"), str(tmp_path / "oc")]
    )
    assert r.exit_code == 0, r.output
    assert {"open_clip_config.json", "open_clip_model.safetensors", "oc.json"} <= {
        p.name for p in (tmp_path / "oc").iterdir()
    }
    back = open_clip.create_model(f"local-dir:{tmp_path / 'oc'}").eval()
    assert_close(diffs(model, back, images, ids), "lipkit checkpoint -> open_clip local-dir (CLI)")
    open_clip.add_model_config(tmp_path / "oc" / "oc.json")  # the bare config registers a name too
    named = open_clip.create_model("oc", pretrained=str(tmp_path / "oc" / "open_clip_model.safetensors"))
    assert_close(diffs(model, named.eval(), images, ids), "lipkit -> open_clip named config")

    r = runner.invoke(
        app, ["checkpoint", "convert", "--to", "open_clip", str(tmp_path / "ck"), str(tmp_path / "oc")]
    )
    assert isinstance(r.exception, UserError) and "--overwrite" in str(r.exception)  # never clobbers


def test_lipkit_tokenizer_model_round_trip(tmp_path):
    """A model trained with lipkit's own tokenizer (end token id 2) pools at that token in OpenCLIP too, and a
    learned logit bias (sigmoid loss) survives as OpenCLIP's logit_bias."""
    from lipkit.models.dual_encoder import DualEncoder
    from lipkit.models.presets import get_spec

    tok = TextTokenizer.train(
        ["a red heart", "a nerd face", "egypt flag"] * 5, vocab_size=300, context_length=12
    )
    small = dict(vision_width=32, vision_layers=1, vision_heads=2, text_width=32, text_layers=1, text_heads=2)
    spec = get_spec(
        "tiny", **small, embed_dim=16, image_size=32, context_length=12, vocab_size=tok.vocab_size,
        eot_id=tok.eot_id, logit_bias=True,
    )  # fmt: skip
    model = perturbed(DualEncoder(spec), seed=4)
    save_checkpoint(tmp_path / "ck", model, tok)
    app = typer.Typer()
    register(app)
    r = CliRunner().invoke(
        app, ["checkpoint", "convert", "--to", "open_clip", str(tmp_path / "ck"), str(tmp_path / "oc")]
    )
    assert r.exit_code == 0, r.output
    peer = open_clip.create_model(f"local-dir:{tmp_path / 'oc'}").eval()
    ids, images = tok(["a nerd face", "flag"]), images_for(spec)
    assert_close(diffs(model, peer, images, ids), "lipkit tokenizer -> open_clip")
    with torch.no_grad():
        ours = model.scale() * model.encode_image(images) @ model.encode_text(ids).T + model.logit_bias
        assert_close(
            {"logits+bias": (ours - peer.get_logits(images, ids)[0]).abs().max().item()}, "logit bias"
        )
    again, tok2 = from_open_clip(str(tmp_path / "oc"), tmp_path / "oc" / "open_clip_model.safetensors")
    assert torch.equal(tok2(["a nerd face"]), tok(["a nerd face"]))
    assert again.spec.logit_bias and torch.equal(again.logit_bias, model.logit_bias)
    assert_close(diffs(again, peer, images, ids), "open_clip -> lipkit (lipkit tokenizer)")


def test_user_errors(tmp_path, tiny_arch, monkeypatch):
    with pytest.raises(UserError, match="Unknown OpenCLIP architecture 'ViT-Q-99'"):
        read_arch("ViT-Q-99")
    with pytest.raises(UserError, match="does not exist"):
        from_open_clip(str(tiny_arch), tmp_path / "missing.safetensors")
    with pytest.raises(UserError, match="does not exist"):
        read_arch(str(tmp_path / "nope.json"))
    peer = open_clip.create_model(TINY_NAME, pretrained=None)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**TINY_CFG, "embed_dim": 48}))
    with pytest.raises(UserError, match=r"do not fit \(text.text_projection has shape"):
        from_open_clip(str(other), peer.state_dict())
    cut = {k: v for k, v in peer.state_dict().items() if k != "ln_final.weight"}
    with pytest.raises(UserError, match="missing"):
        from_open_clip(str(tiny_arch), cut)
    with pytest.raises(UserError, match="ls_init_value"):
        spec_from_open_clip({**TINY_CFG, "vision_cfg": {**TINY_CFG["vision_cfg"], "ls_init_value": 1e-5}})
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="weights-only state dict"):
        read_state_dict(bad)
    monkeypatch.setitem(sys.modules, "open_clip", None)  # as if open_clip_torch were not installed
    with pytest.raises(UserError, match=r"pip install 'lipkit\[interop\]'"):
        read_arch("ViT-B-32")


def test_cli_usage_errors(tmp_path):
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    r = runner.invoke(app, ["checkpoint", "convert", "--from", "hf", "--to", "open_clip", "a", "b"])
    assert isinstance(r.exception, UserError) and "exactly one" in str(r.exception)
    r = runner.invoke(app, ["checkpoint", "convert", "--from", "open_clip", "ViT-B-32", "out"])
    assert isinstance(r.exception, UserError) and "takes 3 arguments" in str(r.exception)
    r = runner.invoke(app, ["checkpoint", "convert", "--from", "timm", "a", "b"])
    assert isinstance(r.exception, UserError) and "Unknown format 'timm'" in str(r.exception)
