"""OpenCLIP's CoCa in and out (interop/open_clip_coca.py): the peer is built by open_clip itself (random
weights, never downloaded) and compared with the converted model on image and text embeddings, the
decoder's teacher-forced logits, the caption loss and its gradients, and decoding's next-token logits; a
converted CoCa fine-tunes with lipkit's coca objective and goes back to OpenCLIP with parity."""

import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

open_clip = pytest.importorskip(
    "open_clip", reason="OpenCLIP parity tests need open_clip_torch (pip install 'lipkit[interop]')"
)

from lipkit.errors import UserError  # noqa: E402
from lipkit.interop.open_clip import from_open_clip, to_open_clip  # noqa: E402
from lipkit.models.caption_decoder import caption_nll  # noqa: E402

TOL = 1e-4
COCA_CFG = {
    "embed_dim": 32,
    "vision_cfg": {
        "image_size": 32,
        "layers": 2,
        "width": 48,
        "head_width": 16,
        "patch_size": 8,
        "attentional_pool": True,
        "attn_pooler_queries": 6,
        "attn_pooler_heads": 4,
        "output_tokens": True,
    },
    "text_cfg": {
        "context_length": 12,
        "vocab_size": 49408,
        "width": 32,
        "heads": 4,
        "layers": 2,
        "embed_cls": True,
        "output_tokens": True,
    },
    "multimodal_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
    "custom_text": True,
}
# the short caption leaves padding; the long one fills the 12-token context (its [cls] key is visible)
TEXTS = ["a red apple", "two cats on a very long mat with many words in it", ""]


@pytest.fixture(scope="module")
def arches(tmp_path_factory):
    """The tiny CoCa config registered with OpenCLIP under two names: GELU and QuickGELU."""
    root = tmp_path_factory.mktemp("coca")
    for name, extra in (("lipkit-coca", {}), ("lipkit-coca-quickgelu", {"quick_gelu": True})):
        (root / f"{name}.json").write_text(json.dumps({**COCA_CFG, **extra}))
        open_clip.add_model_config(root / f"{name}.json")
    return root


def peer_model(name: str, seed: int) -> torch.nn.Module:
    """A random OpenCLIP CoCa with every tensor moved off its init (zero biases and unit norms would hide
    mix-ups). OpenCLIP 3.3 leaves the decoder's vocabulary projection uninitialised (torch.empty; its
    MultimodalTransformer.init_parameters is never called): it is drawn here."""
    torch.manual_seed(seed)
    peer = open_clip.create_model(name, pretrained=None)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        proj = peer.text_decoder.text_projection
        proj.copy_(torch.randn(proj.shape, generator=g) * proj.shape[0] ** -0.5)
        for p in peer.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return peer.eval()


def compare(model, peer, images, ids) -> dict[str, float]:
    """Max abs differences: embeddings, teacher-forced logits, next-token logits of a 3-token prefix."""
    with torch.no_grad():
        out = peer(images, ids)
        prefix = peer(images, ids[:, :3], output_labels=False)["logits"][:, -1]
        _, tokens = model.visual(images, return_tokens=True)
        reader = model.caption_reader
        logits = reader.text_projection(reader.hidden(ids[:, :-1], tokens))
        return {
            "image": (model.encode_image(images) - out["image_features"]).abs().max().item(),
            "text": (model.encode_text(ids) - out["text_features"]).abs().max().item(),
            "logits": (logits - out["logits"]).abs().max().item(),
            "next": (reader.last_logits(ids[:, :3], tokens) - prefix).abs().max().item(),
        }


def assert_close(d: dict[str, float], label: str) -> None:
    print(f"{label}: " + ", ".join(f"{k} {v:.2e}" for k, v in d.items()))
    assert max(d.values()) <= TOL, (label, d)


@pytest.mark.parametrize("name", ["lipkit-coca", "lipkit-coca-quickgelu"])
def test_coca_parity_both_ways(name, arches):
    peer = peer_model(name, seed=1)
    model, tok = from_open_clip(name, peer.state_dict())
    spec = model.spec
    assert (spec.caption_input, spec.vision_attn_pool, spec.text_embed_cls) == ("text", 6, True)
    assert spec.quick_gelu == name.endswith("quickgelu")
    ids = tok(TEXTS)
    assert torch.equal(ids, open_clip.get_tokenizer(name)(TEXTS)) and bool((ids[1] != 0).all())
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model.eval()
    assert_close(compare(model, peer, images, ids), f"open_clip->lipkit {name}")

    cfg, _, state = to_open_clip(model)  # lipkit -> OpenCLIP: the same config and an equal model
    for part in ("vision_cfg", "text_cfg", "multimodal_cfg"):
        assert {k: v for k, v in cfg[part].items() if k in COCA_CFG[part]} == COCA_CFG[part]
    assert cfg.get("quick_gelu", False) == name.endswith("quickgelu") and cfg["custom_text"]
    back = open_clip.CoCa(**{k: v for k, v in cfg.items() if k != "custom_text"})
    back.load_state_dict(state, strict=True)
    assert_close(compare(model, back.eval(), images, ids), f"lipkit->open_clip {name}")


def test_the_caption_loss_and_its_gradients_match_open_clip(arches):
    """CoCa's captioning loss (OpenCLIP's CoCaLoss caption term: token cross-entropy, padding ignored) and
    its gradients in all three towers, lipkit's caption_nll against OpenCLIP's forward."""
    peer = peer_model("lipkit-coca", seed=2)
    model, tok = from_open_clip("lipkit-coca", peer.state_dict())
    peer.train(), model.train()
    ids, images = tok(TEXTS), torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out = peer(images, ids)
    ref = F.cross_entropy(out["logits"].permute(0, 2, 1), out["labels"], ignore_index=0)
    _, tokens = model.visual(images, return_tokens=True)
    nll, count = caption_nll(model.caption_reader, ids, tokens, model.spec.pad_id)
    ours = nll.sum() / count.sum()
    assert abs(ours.item() - ref.item()) < 1e-5, (ours.item(), ref.item())
    ref.backward(), ours.backward()
    grads = dict(peer.named_parameters())
    pairs = {  # lipkit name → OpenCLIP name (the vocabulary projection is transposed)
        "captioner.cross_attn.1.attn.in_proj_weight": "text_decoder.cross_attn.1.attn.in_proj_weight",
        "text.transformer.resblocks.0.attn.in_proj_weight": "text.transformer.resblocks.0.attn.in_proj_weight",
        "visual.attn_pool.query": "visual.attn_pool.query",
        "visual.attn_pool.attn.k_proj_weight": "visual.attn_pool.attn.k_proj_weight",
        "visual.conv1.weight": "visual.conv1.weight",
    }
    for ours_name, ref_name in pairs.items():
        g = dict(model.named_parameters())[ours_name].grad
        assert g is not None and torch.allclose(g, grads[ref_name].grad, atol=1e-6, rtol=1e-4), ours_name
    assert model.text.cls_emb.grad is None  # the [cls] token takes no part in the caption loss
    proj = model.captioner.text_projection.weight.grad
    assert torch.allclose(proj, grads["text_decoder.text_projection"].grad.t(), atol=1e-6, rtol=1e-4)


def test_a_converted_coca_captions_fine_tunes_and_goes_back(arches, table, tmp_path):
    """CLI: convert an OpenCLIP CoCa file, caption with it, fine-tune it with the coca objective (both
    losses), convert the result back: OpenCLIP loads it and computes what lipkit computes."""
    from conftest import tiny_run_cfg
    from lipkit.checkpoint import load_checkpoint
    from lipkit.cli import app
    from lipkit.data.sources.registry import read_table
    from lipkit.train.launch import run_training

    peer = peer_model("lipkit-coca", seed=3)
    torch.save(peer.state_dict(), tmp_path / "peer.pt")
    arch = str(arches / "lipkit-coca.json")
    r = CliRunner().invoke(
        app,
        [
            "checkpoint",
            "convert",
            "--from",
            "open_clip",
            arch,
            str(tmp_path / "peer.pt"),
            str(tmp_path / "ck"),
        ],
    )
    assert r.exit_code == 0, r.output
    image = str(read_table(table)[0].image)
    r = CliRunner().invoke(
        app, ["caption", str(tmp_path / "ck"), image, "--beam", "2", "--max-tokens", "4", "--json"]
    )
    assert r.exit_code == 0, r.output
    assert 0 < json.loads(r.output)["tokens"] <= 4

    cfg = tiny_run_cfg(table, tmp_path / "run", objective="coca", data={"eval": {}}, epochs=0.2)
    cfg.model.init_from, cfg.model.overrides = str(tmp_path / "ck"), {}
    _, result = run_training(cfg)
    assert result.steps >= 1 and result.faults == 0
    tuned, tok, _ = load_checkpoint(tmp_path / "run" / "checkpoint")
    start = load_checkpoint(tmp_path / "ck")[0]
    assert not torch.equal(tuned.captioner.text_projection.weight, start.captioner.text_projection.weight)
    assert not torch.equal(tuned.visual.attn_pool.query, start.visual.attn_pool.query)

    r = CliRunner().invoke(
        app,
        [
            "checkpoint",
            "convert",
            "--to",
            "open_clip",
            str(tmp_path / "run" / "checkpoint"),
            str(tmp_path / "oc"),
        ],
    )
    assert r.exit_code == 0, r.output
    back = open_clip.create_model(f"local-dir:{tmp_path / 'oc'}").eval()
    assert type(back).__name__ == "CoCa"
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    assert_close(compare(tuned.eval(), back, images, tok(TEXTS)), "fine-tuned lipkit -> open_clip (CLI)")


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"vision_cfg": {**COCA_CFG["vision_cfg"], "attentional_pool": False}}, "attentional_pool=true"),
        (
            {"vision_cfg": {**COCA_CFG["vision_cfg"], "attentional_pool": "parallel"}},
            "attentional_pool='parallel'",
        ),
        ({"text_cfg": {**COCA_CFG["text_cfg"], "embed_cls": False}}, "embed_cls=true"),
        ({"multimodal_cfg": {**COCA_CFG["multimodal_cfg"], "width": 64}}, "64 wide"),
        ({"multimodal_cfg": {**COCA_CFG["multimodal_cfg"], "ls_init_value": 0.1}}, "ls_init_value"),
    ],
)
def test_coca_configs_lipkit_cannot_hold_are_refused_by_name(change, named, tmp_path):
    path = tmp_path / "arch.json"
    path.write_text(json.dumps({**COCA_CFG, **change}))
    with pytest.raises(UserError, match=named.replace("(", r"\(")):
        from_open_clip(str(path), {})


def test_a_lipkit_decoder_reading_its_own_embeddings_is_still_refused_on_export(arches):
    model, _ = from_open_clip("lipkit-coca", peer_model("lipkit-coca", seed=4).state_dict())
    model.spec = model.spec.__class__(**{**model.spec.to_dict(), "caption_input": "tokens"})
    with pytest.raises(UserError, match="caption decoder"):
        to_open_clip(model)


def test_hugging_face_export_and_patch_grid_readers_refuse_coca_towers(arches):
    from lipkit.interop.hf import to_hf

    model, tok = from_open_clip("lipkit-coca", peer_model("lipkit-coca", seed=5).state_dict())
    with pytest.raises(UserError, match="--to open_clip"):
        to_hf(model, tok)
    with pytest.raises(UserError, match="attentional pooler"):
        model.encode_region(torch.zeros(1, 3, 32, 32), [[[0.0, 0.0, 0.5, 0.5]]])


def test_a_new_model_gets_the_openclip_layout_only_when_asked_and_when_it_can_hold_it():
    from dataclasses import replace

    from lipkit.models.dual_encoder import DualEncoder
    from lipkit.models.presets import PRESETS
    from lipkit.train.captioner_setup import new_model_settings

    needs = {"caption_nll", "caption_tokens"}
    assert new_model_settings(needs, {})["caption_input"] == "tokens"
    assert new_model_settings(needs, {"caption_input": "text"})["caption_input"] == "text"
    spec = replace(PRESETS["tiny"], caption_layers=1, caption_input="text", text_width=256, text_heads=4)
    with pytest.raises(UserError, match="text_embed_cls=true"):
        DualEncoder(spec)
    with pytest.raises(UserError, match="caption_width, text_width and embed_dim equal"):
        DualEncoder(replace(spec, text_embed_cls=True, text_width=192, text_heads=3))
    model = DualEncoder(replace(spec, text_embed_cls=True, vision_attn_pool=5, vision_attn_pool_heads=4))
    pooled, tokens = model.visual(torch.zeros(2, 3, 64, 64), return_tokens=True)
    assert pooled.shape == (2, 256) and tokens.shape == (2, 4, 256)


def test_coca_towers_export_to_onnx_and_refuse_growth_and_patch_readers(arches, tmp_path):
    """ONNX keeps the [cls] tower's text length dynamic (onnxruntime = PyTorch on full-context and on
    5-token inputs); growth and objectives reading patch tokens are refused by name."""
    ort = pytest.importorskip("onnxruntime")
    from lipkit.interop.onnx import write_onnx
    from lipkit.models.growth import Growth, check_growable
    from lipkit.train.inputs import check_patch_tokens

    model, tok = from_open_clip("lipkit-coca", peer_model("lipkit-coca", seed=6).state_dict())
    _, diffs = write_onnx(model.eval(), tok, tmp_path / "onnx")
    assert diffs is not None and max(diffs.values()) < 1e-4, diffs
    short = tok(TEXTS)[:, :5]
    got = ort.InferenceSession(str(tmp_path / "onnx" / "text.onnx")).run(None, {"input_ids": short.numpy()})[
        0
    ]
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(got), model.encode_text(short), atol=1e-5)
    assert not model.visual.has_token_grid
    for towers in ("image", "text"):
        with pytest.raises(UserError, match="do not grow"):
            check_growable(model.spec, Growth(towers=towers, width=2))
    with pytest.raises(UserError, match=r"patch tokens \(image_tokens\)"):
        check_patch_tokens({"image_tokens", "text_tokens"}, False, "filip")
    check_patch_tokens({"caption_nll", "caption_tokens", "image_features"}, False, "coca")
