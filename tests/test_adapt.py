"""Few-shot adaptation (lipkit.adapt): the shots drawn, LoRA against the weights it stands for (start at
identity, merged = unmerged, gradients through every read of a weight), and `lipkit adapt` end to end."""

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_eval_setup
from lipkit.adapt.lora import add_lora, lora_targets, merge
from lipkit.data.few_shot import class_split, few_shot
from lipkit.data.records import Record
from lipkit.errors import UserError
from lipkit.models.dual_encoder import DualEncoder


def records(n_classes: int = 5, per_class: int = 7) -> list[Record]:
    return [
        Record(image=f"{c}-{i}.png", captions=["x"], meta={"kind": f"c{c}"})
        for c in range(n_classes)
        for i in range(per_class)
    ] + [Record(image="none.png", captions=["x"], meta={})]


def test_shots_are_k_per_class_seeded_and_nested():
    rows = records()
    chosen, labels = few_shot(rows, "kind", 3, seed=1)
    assert len(chosen) == 15 and all(labels.count(f"c{c}") == 3 for c in range(5))
    assert all(r.meta["kind"] == y for r, y in zip(chosen, labels, strict=True))
    assert [r.key for r in few_shot(rows, "kind", 3, seed=1)[0]] == [r.key for r in chosen]
    assert [r.key for r in few_shot(rows, "kind", 3, seed=2)[0]] != [r.key for r in chosen]
    five = [r.key for r in few_shot(rows, "kind", 5, seed=1)[0]]
    assert all(r.key in five for r in chosen)  # K shots are among the K' > K shots of the same seed
    assert len(few_shot(rows, "kind", 50, seed=0)[0]) == 35  # a class with fewer keeps all it has
    one = few_shot(rows, "kind", 2, seed=1, classes=["c3"])[0]
    assert [r.key for r in one] == [r.key for r in chosen if r.meta["kind"] == "c3"][:2]
    assert class_split(["b", "a", "c", "b", "d", "e"], "base") == ["a", "b", "c"]
    assert class_split(["b", "a", "c", "d", "e"], "novel") == ["d", "e"]
    with pytest.raises(UserError, match="shots per class"):
        few_shot(rows, "kind", 0, seed=0)
    with pytest.raises(UserError, match="column 'nope'"):
        few_shot(rows, "nope", 1, seed=0)


def _model(table) -> tuple[DualEncoder, torch.Tensor, torch.Tensor]:
    _, tok, model = tiny_eval_setup(table)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return model, images, tok(["a red heart", "two cats", "x"])


def _outputs(model, images, ids):
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(ids)


def test_lora_starts_at_the_checkpoint_and_merges_to_what_it_computes(table):
    model, images, ids = _model(table)
    before = _outputs(model, images, ids)
    towers = [model.visual, model.text]
    n_targets = sum(len(lora_targets(t)) for t in towers)
    params = add_lora(towers, rank=2, alpha=4.0)
    assert len(params) == 2 * n_targets and all(p.requires_grad for p in params)
    frozen = [p for n, p in model.named_parameters() if n.startswith(("visual.", "text.")) and ".A" not in n]
    assert frozen and not any(p.requires_grad for p in frozen if not any(p is q for q in params))
    start = _outputs(model, images, ids)
    assert all(torch.equal(a, b) for a, b in zip(before, start, strict=True))  # B = 0: the same function
    with torch.no_grad():
        for p in params[1::2]:  # every B: a branch that changes the function
            p.normal_(std=0.05)
    unmerged = _outputs(model, images, ids)
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(before, unmerged, strict=True))
    assert merge(towers) == n_targets
    merged = _outputs(model, images, ids)
    assert all((a - b).abs().max() <= 1e-6 for a, b in zip(unmerged, merged, strict=True))
    fresh = DualEncoder(model.spec).eval()  # the merged state dict is an ordinary model's
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(merged, _outputs(fresh, images, ids), strict=True))


def test_lora_gradients_reach_every_branch_through_the_fused_paths(table):
    """The packed attention projection and the MLP's fused activation-projection read the adapted weights
    too: after one backward (B moved off zero, so A gets a gradient as well), every A and B has one."""
    model, images, ids = _model(table)
    model.train()
    params = add_lora([model.visual, model.text], rank=2, alpha=4.0)
    with torch.no_grad():
        for p in params[1::2]:
            p.normal_(std=0.05)
    (model.encode_image(images).sum() + model.encode_text(ids).sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_lipkit_adapt_trains_merges_and_writes_a_checkpoint_eval_reads(table, tmp_path):
    from lipkit.checkpoint import load_checkpoint, save_checkpoint
    from lipkit.cli import app
    from lipkit.data.sources.registry import read_table
    from lipkit.eval.embedding import embed_images, embed_texts

    _, tok, model = tiny_eval_setup(table)
    save_checkpoint(tmp_path / "base", model, tok)
    args = [
        "adapt",
        str(tmp_path / "base"),
        str(tmp_path / "out"),
        "--data",
        str(table),
        "--column",
        "category",
    ]
    args += ["--shots", "2", "--steps", "25", "--lr", "1e-2", "--classes", "base"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    adapted, tok2, info = load_checkpoint(tmp_path / "out" / "checkpoint")
    meta = info["adapted"]
    assert meta["method"] == "lora" and meta["split"] == "base" and meta["trainable_parameters"] > 0
    assert meta["shot_loss"][1] < meta["shot_loss"][0]
    # the merged checkpoint classifies its shots as training last saw them
    rows = read_table(table)
    classes = class_split([r.meta["category"] for r in rows if r.meta.get("category")], "base")
    assert meta["classes"] == len(classes)
    shots, labels = few_shot(rows, "category", 2, 0, classes)
    from lipkit.data.image_store import ImageStore

    img = embed_images(adapted, ImageStore(shots, adapted.spec.image_size, cache=True), 64)
    from lipkit.config_eval import EvalConfig

    templates = EvalConfig().templates
    text = embed_texts(adapted, tok2, [t.format(c) for c in classes for t in templates], 64)
    cls = torch.nn.functional.normalize(text.view(len(classes), len(templates), -1).mean(1), dim=-1)
    acc = ((img @ cls.t()).argmax(1) == torch.tensor([classes.index(y) for y in labels])).float().mean()
    assert abs(acc.item() - meta["shot_top1"][1]) < 1e-6
    again = CliRunner().invoke(app, args)
    assert again.exit_code != 0 and "--overwrite" in str(again.exception)
    bad = CliRunner().invoke(app, [*args[:-2], "--classes", "all", "--towers", "neither", "--overwrite"])
    assert bad.exit_code != 0 and "towers to adapt" in str(bad.exception)
    assert json.loads(json.dumps(meta)) == meta


def test_adapting_the_image_tower_keeps_the_source_record_and_refuses_what_it_cannot_do(table, tmp_path):
    """--towers image (lipkit's ViT; the class features computed once), the source's training record kept
    in the adapted config, and the refusals, each one sentence."""
    from lipkit.adapt.run import adapt_checkpoint
    from lipkit.checkpoint import load_checkpoint, save_checkpoint

    _, tok, model = tiny_eval_setup(table)
    save_checkpoint(tmp_path / "base", model, tok, {"train": {"objective": "siglip"}, "preset": "tiny"})
    info = adapt_checkpoint(
        tmp_path / "base", table, "category", tmp_path / "img", shots=2, towers="image", steps=5
    )
    adapted, _, config = load_checkpoint(tmp_path / "img" / "checkpoint")
    assert info["towers"] == "image" and info["shot_loss"][1] < info["shot_loss"][0]
    assert (
        config["train"] == {"objective": "siglip"}
        and config["preset"] == "tiny"
        and config["adapted"] == info
    )

    def same(x, y):
        return all(
            torch.equal(p, q) for p, q in zip(x.state_dict().values(), y.state_dict().values(), strict=True)
        )

    # the text tower untouched; the ViT's linear weights moved, its projection (a parameter, no layer) did not
    assert same(adapted.text, model.text) and not same(adapted.visual, model.visual)
    assert torch.equal(adapted.visual.proj, model.visual.proj)
    save_checkpoint(tmp_path / "filip", model, tok, {"train": {"objective": "filip"}})
    refusals = {
        "scored token-wise": dict(checkpoint=tmp_path / "filip"),
        "would overwrite the checkpoint": dict(
            out=tmp_path, overwrite=True, checkpoint=tmp_path / "checkpoint"
        ),
        "class\\(es\\)": dict(column="nope"),
    }
    save_checkpoint(tmp_path / "checkpoint", model, tok)
    for message, change in refusals.items():
        kwargs = {"checkpoint": tmp_path / "base", "data": table, "column": "category", "out": tmp_path / "x"}
        with pytest.raises(UserError, match=message):
            adapt_checkpoint(**{**kwargs, **change}, steps=1)
