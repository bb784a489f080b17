import pytest

from lipkit.config import load_config
from lipkit.errors import UserError


def test_overrides_and_types(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 1\n  batch_size: 8\n")
    cfg = load_config(
        p, ["train.epochs=2", "train.weight_decay=3e-3", "model.preset=base-32", "data.eval={a: x.jsonl}"]
    )
    assert cfg.train.weight_decay == 0.003
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.epochs == 2 and cfg.model.preset == "base-32" and cfg.data.eval == {"a": "x.jsonl"}


@pytest.mark.parametrize(
    "text, overrides, match",
    [
        ("train:\n  lrr: 1\n", [], "Unknown config key 'train.lrr'; did you mean 'lr'"),
        ("trian:\n  lr: 1\n", [], "did you mean 'train'"),
        ("", ["train.batch_size=abc"], "train.batch_size' must be of type int"),
        ("", ["train.batch_size=1"], "at least 2"),
        ("", ["train.precision=fp8"], "fp32"),
        ("train: 3\n", [], "is a section"),
        ("", ["nonsense"], "section.key=value"),
    ],
)
def test_bad_config_is_one_clear_sentence(tmp_path, text, overrides, match):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(UserError, match=match):
        load_config(p, overrides)


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "none.yaml")


def test_a_dotted_override_sets_one_key_of_a_mapping_field():
    """`--set train.objective_args.x=v` keeps the preset's other options; `={...}` replaces them all."""
    from lipkit.config import load_config

    presets = ["configs/demo.yaml", "configs/methods/nevlp.yaml"]
    c = load_config(presets, ["train.objective_args.multi_positive=true", "data.eval.extra=x.jsonl"])
    assert c.train.objective_args == {
        "strength": 1.0,
        "momentum": 0.5,
        "warmup_steps": 50,
        "refit_every": 10,
        "multi_positive": True,
    }
    assert set(c.data.eval) == {"test-style", "test-novel", "extra"}
    assert load_config(presets, ["train.objective_args={strength: 0.5}"]).train.objective_args == {
        "strength": 0.5
    }


def test_layered_configs_merge_sections_and_replace_keys(tmp_path):
    """A later config's mapping key replaces the earlier one whole, even one named like a section
    (data.eval): `data.eval: {}` turns the recipe's evaluation splits off."""
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("data:\n  eval: {a: x.jsonl, b: y.jsonl}\n  captions_per_image: 2\ntrain:\n  lr: 0.5\n")
    second.write_text("data:\n  eval: {}\ntrain:\n  epochs: 3\n")
    cfg = load_config([first, second])
    assert cfg.data.eval == {} and cfg.data.captions_per_image == 2
    assert cfg.train.lr == 0.5 and cfg.train.epochs == 3
    second.write_text("data:\n  eval: {c: z.jsonl}\n")
    assert load_config([first, second]).data.eval == {"c": "z.jsonl"}
