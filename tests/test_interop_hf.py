"""Hugging Face CLIPModel directories in and out: the peer is built by transformers itself (random
weights, never downloaded), converted both ways and compared on images, texts and logits."""

import json

import pytest
import torch
import typer
from typer.testing import CliRunner

transformers = pytest.importorskip(
    "transformers", reason="Hugging Face parity tests need transformers (pip install 'lipkit[interop]')"
)
from transformers import AutoTokenizer, CLIPConfig, CLIPModel  # noqa: E402

from lipkit.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from lipkit.cli.interop import register  # noqa: E402
from lipkit.errors import UserError  # noqa: E402
from lipkit.interop.hf import from_hf, from_hf_state, to_hf, write_hf  # noqa: E402
from lipkit.models.dual_encoder import DualEncoder  # noqa: E402
from lipkit.models.presets import get_spec  # noqa: E402
from lipkit.text.tokenizer import TextTokenizer  # noqa: E402

TOL = 1e-4
TEXTS = ["a photo of a cat", "two dogs playing in the snow, 東京 😀"]


def clip_vocab():
    pytest.importorskip("open_clip", reason="CLIP's BPE vocabulary ships with open_clip_torch")
    from lipkit.interop.clip_bpe import clip_vocab_and_merges

    return clip_vocab_and_merges()


def write_vocab_files(vocab: dict, merges: list, directory) -> None:
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = "\n".join(" ".join(m) for m in merges)
    (directory / "merges.txt").write_text(f"#version: 0.2\n{lines}\n", encoding="utf-8")


def tiny_config(act: str) -> CLIPConfig:
    return CLIPConfig(
        text_config=dict(
            vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, hidden_act=act,
        ),
        vision_config=dict(
            hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
            image_size=32, patch_size=8, hidden_act=act,
        ),
        projection_dim=32,
    )  # fmt: skip


def perturbed(model: torch.nn.Module, seed: int, max_numel: int = 1_000_000) -> torch.nn.Module:
    """New random values for every tensor up to `max_numel` (biases start at 0 and norms at 1, which would
    hide mix-ups; the big matrices are random already and left alone to stay fast)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() <= max_numel:
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model.eval()


def embed(lip, images, ids) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return lip.encode_image(images), lip.encode_text(ids), lip.scale()


def diffs(lip, peer: CLIPModel, images, ids, peer_ids=None) -> dict[str, float]:
    """Max abs differences of image/text embeddings and logits; `lip` is a model or its `embed` output."""
    a_i, a_t, scale = lip if isinstance(lip, tuple) else embed(lip, images, ids)
    with torch.no_grad():
        out = peer(input_ids=ids if peer_ids is None else peer_ids, pixel_values=images)
    return {
        "image": (a_i - out.image_embeds).abs().max().item(),
        "text": (a_t - out.text_embeds).abs().max().item(),
        "logits": (scale * a_i @ a_t.T - out.logits_per_image).abs().max().item(),
    }


def assert_close(d: dict[str, float], label: str) -> None:
    print(f"{label}: " + ", ".join(f"{k} {v:.2e}" for k, v in d.items()))
    assert max(d.values()) <= TOL, (label, d)


def images_for(size: int, n: int = 2):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def cli():
    app = typer.Typer()
    register(app)
    return app, CliRunner()


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_hf_directory_to_lipkit_and_back(tmp_path, act):
    vocab, merges = clip_vocab()
    peer = perturbed(CLIPModel(tiny_config(act)), seed=1)
    peer.save_pretrained(tmp_path / "hf")
    write_vocab_files(vocab, merges, tmp_path / "hf")  # what CLIPTokenizer.save_pretrained writes
    app, runner = cli()
    r = runner.invoke(
        app, ["checkpoint", "convert", "--from", "hf", str(tmp_path / "hf"), str(tmp_path / "ck")]
    )
    assert r.exit_code == 0, r.output
    model, tok, _ = load_checkpoint(tmp_path / "ck")
    assert model.spec.quick_gelu == (act == "quick_gelu")
    images, ids = images_for(32), tok(TEXTS)
    assert_close(diffs(model, peer, images, ids), f"hf->lipkit tiny {act}")

    perturbed(model, seed=2)
    save_checkpoint(tmp_path / "ck", model, tok)
    r = runner.invoke(
        app, ["checkpoint", "convert", "--to", "hf", str(tmp_path / "ck"), str(tmp_path / "hf2")]
    )
    assert r.exit_code == 0, r.output
    back = CLIPModel.from_pretrained(tmp_path / "hf2").eval()
    assert_close(diffs(model, back, images, ids), f"lipkit->hf tiny {act}")
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf2")
    hf_ids = hf_tok(TEXTS, padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
    assert_close(
        diffs(model, back, images, ids, peer_ids=hf_ids), f"lipkit->hf tiny {act}, HF's own tokenizer"
    )
    processor = transformers.CLIPImageProcessor.from_pretrained(tmp_path / "hf2")
    assert processor.crop_size["height"] == 32 and list(processor.image_mean) == list(model.spec.image_mean)


def test_vit_b32_both_ways():
    clip_vocab()
    config = CLIPConfig()  # the ViT-B/32 shape, QuickGELU (OpenAI's); GELU is covered by the tiny model
    act = config.text_config.hidden_act
    peer = perturbed(CLIPModel(config), seed=3)
    model, tok = from_hf_state(config.to_dict(), peer.state_dict())
    assert (model.spec.vision_width, model.spec.patch_size, model.spec.text_width) == (768, 32, 512)
    images, ids = images_for(224), tok(TEXTS)
    ours = embed(model, images, ids)
    assert_close(diffs(ours, peer, images, ids), f"hf->lipkit ViT-B/32 {act}")

    cfg, state, _ = to_hf(model, tok)
    written = CLIPConfig.from_dict(cfg)
    for part in ("text_config", "vision_config"):
        for key in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "hidden_act",
        ):
            assert getattr(getattr(written, part), key) == getattr(getattr(config, part), key), (part, key)
    target = perturbed(peer, seed=4)  # same shape: reuse the peer, its weights no longer lipkit's
    missing, unexpected = target.load_state_dict(state, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    assert_close(diffs(ours, target, images, ids), f"lipkit->hf ViT-B/32 {act}")


def test_lipkit_tokenizer_model_to_hf_and_back(tmp_path):
    """lipkit's own tokenizer ends texts with id 2, which HF reads as 'pool at the largest id': the export
    moves the end token to the last id so HF and lipkit still pool at the same place."""
    tok = TextTokenizer.train(
        ["a red heart", "a nerd face", "egypt flag"] * 5, vocab_size=300, context_length=16
    )
    small = dict(vision_width=32, vision_layers=1, vision_heads=2, text_width=32, text_layers=2, text_heads=2)
    spec = get_spec(
        "tiny",
        **small,
        embed_dim=16,
        image_size=32,
        context_length=16,
        vocab_size=tok.vocab_size,
        eot_id=tok.eot_id,
    )
    model = perturbed(DualEncoder(spec), seed=5)
    texts = ["a nerd face", "red flag", "heart"]
    images, ids = images_for(32, 3), tok(texts)
    write_hf(model, tok, tmp_path / "hf")
    peer = CLIPModel.from_pretrained(tmp_path / "hf").eval()
    assert peer.config.text_config.eos_token_id == tok.vocab_size - 1
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    peer_ids = hf_tok(texts, padding="max_length", max_length=16, return_tensors="pt")["input_ids"]
    assert_close(diffs(model, peer, images, ids, peer_ids=peer_ids), "lipkit (own tokenizer)->hf")
    again, tok2 = from_hf(tmp_path / "hf")
    assert torch.equal(tok2(texts), peer_ids)
    with torch.no_grad():
        d = (again.encode_text(tok2(texts)) - model.encode_text(ids)).abs().max().item()
    assert_close({"text": d}, "hf->lipkit (own tokenizer, end token moved)")


def test_user_errors(tmp_path):
    with pytest.raises(UserError, match="needs config.json"):
        from_hf(tmp_path)
    cfg = tiny_config("gelu")
    (tmp_path / "config.json").write_text(json.dumps({**cfg.to_dict(), "model_type": "siglip"}))
    with pytest.raises(UserError, match="'siglip' model"):
        from_hf(tmp_path)
    cfg.text_config.hidden_act = "relu"
    with pytest.raises(UserError, match="activations"):
        from_hf_state(cfg.to_dict(), {})
    peer = CLIPModel(tiny_config("gelu"))
    state = {k: v for k, v in peer.state_dict().items() if "layers.1.mlp.fc1" not in k}
    clip_vocab()
    with pytest.raises(UserError, match="lack 'vision_model.encoder.layers.1.mlp.fc1.weight'"):
        from_hf_state(tiny_config("gelu").to_dict(), state)
    wider = tiny_config("gelu")
    wider.projection_dim = 48
    with pytest.raises(UserError, match="do not fit"):
        from_hf_state(wider.to_dict(), peer.state_dict())


def test_refuses_what_clipmodel_cannot_hold(tmp_path):
    from dataclasses import replace

    from lipkit.interop.open_clip import check_exportable

    tok = TextTokenizer.train(["a b c"] * 3, vocab_size=270, context_length=8)
    small = dict(vision_width=16, vision_layers=1, vision_heads=2, text_width=16, text_layers=1, text_heads=2)
    spec = get_spec("tiny", **small, embed_dim=8, image_size=16, context_length=8, vocab_size=tok.vocab_size)
    with pytest.raises(UserError, match="logit bias.*--to open_clip"):
        write_hf(DualEncoder(replace(spec, logit_bias=True)), tok, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    with pytest.raises(UserError, match="text_tower='hf'"):
        check_exportable(replace(spec, text_tower="hf"), "CLIPModel")
    with pytest.raises(UserError, match="convolutional stem"):
        check_exportable(replace(spec, vision_stem="conv"), "CLIPModel")
    with pytest.raises(UserError, match="LexLIP lexicon heads"):
        check_exportable(replace(spec, lexicon_vocab=tok.vocab_size), "CLIPModel")
