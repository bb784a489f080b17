"""The README's objective lines run as written: each `lipkit train` line of "Methods of the literature"
builds a config whose objective gets what it needs (alip/tcl: two captions per image), plain
`train.objective=lexlip` is the preset (not the degenerate dense_weight=0), and alip without a second
caption refuses with the fix."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from lipkit.config import load_config
from lipkit.errors import UserError
from lipkit.objectives import build_objective
from lipkit.objectives.lexlip import LexiconContrast
from lipkit.train.inputs import check_inputs, objective_needs, requires

ROOT = Path(__file__).resolve().parents[1]


def readme_train_lines() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Methods of the literature", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.startswith("lipkit train")]


def parse(line: str) -> tuple[list[Path], list[str]]:
    words = shlex.split(line)[2:]  # after `lipkit train`
    configs, sets = [], []
    for flag, value in zip(words[::2], words[1::2], strict=True):
        assert flag in ("-c", "--config", "--set", "-s"), line
        if flag in ("-c", "--config"):
            configs.append(ROOT / value)
        else:
            sets.append(value)
    return configs, sets


def test_readme_lists_every_method_it_promises():
    objectives = {load_config(*parse(line)).train.objective for line in readme_train_lines()}
    assert {"siglip", "multi_positive", "filip", "alip", "lexlip"} <= objectives
    alip = next(x for x in (ROOT / "README.md").read_text().splitlines() if "train.objective=alip" in x)
    assert alip.endswith("# also: tcl")  # tcl: the same line with train.objective=tcl


@pytest.mark.parametrize("line", readme_train_lines())
def test_readme_train_line_gives_the_objective_what_it_needs(line):
    configs, sets = parse(line)
    objectives = [load_config(configs, sets).train.objective]
    if objectives == ["alip"]:  # the line says "also: tcl"
        objectives.append("tcl")
    for name in objectives:
        cfg = load_config(configs, [*sets, f"train.objective={name}"])
        objective = build_objective(name, **cfg.train.objective_args)
        needs = objective_needs(objective)
        # the model gets a logit bias (siglip), lexicon heads (lexlip), a caption decoder (coca, capdec) and a
        # matching head (itm) from the
        # trainer itself, and the per-sample labels from data.cluster_labels (mlcd) or the table's columns
        # (plip, cloc, conceptclip) from launch
        labels = {"clusters"} if cfg.data.cluster_labels else set()
        labels |= {"columns"} if getattr(objective, "label_columns", ()) else set()
        labels |= {"regions"} if getattr(objective, "region_columns", ()) else set()
        labels |= {"concepts"} if getattr(objective, "concepts_column", None) else set()
        captioner = "embedding" if requires(needs, "text_captioner") else "tokens"
        captioner = "prefix" if requires(needs, "prefix_captioner") else captioner
        check_inputs(
            needs,
            cfg.data.captions_per_image,
            True,
            name,
            False,
            True,
            labels,
            captioner=captioner,
            matcher=True,
        )


def test_alip_without_a_second_caption_names_the_fix():
    cfg = load_config([ROOT / "configs" / "scratch.yaml"], ["train.objective=alip"])
    needs = objective_needs(build_objective("alip", **cfg.train.objective_args))
    with pytest.raises(UserError, match=r"set data\.captions_per_image=2"):
        check_inputs(needs, cfg.data.captions_per_image, True, "alip")


def test_plain_lexlip_is_its_preset_without_the_masked_stage():
    """The preset adds LexLIP's masked-language stage (30 steps) to plain train.objective=lexlip, whose other
    defaults it spells out; plain lexlip runs on any text tower, the preset needs a bidirectional one."""
    preset = yaml.safe_load((ROOT / "configs" / "methods" / "lexlip.yaml").read_text())["train"]
    plain = LexiconContrast()
    for key, value in preset["objective_args"].items():
        if key != "bottleneck_steps":
            assert getattr(plain, key) == value, key
    assert plain.bottleneck_steps == 0 < preset["objective_args"]["bottleneck_steps"]
    assert plain.dense_weight > 0  # dense_weight=0 is the degenerate setting (docs/methods.md)
    assert {"image_features", "text_features"} <= set(plain.inputs)


def test_methods_doc_cites_tests_that_exist_and_say_what_they_claim():
    doc = (ROOT / "docs" / "methods.md").read_text(encoding="utf-8")
    intro = doc.split("| objective |", 1)[0]
    assert "2e-15" not in intro and "1e-10" in intro
    assert "TOL = 1e-10" in (ROOT / "tests" / "test_objectives.py").read_text()
    for cited in {w.strip("`(),;.") for w in intro.split() if w.strip("`(),;.").startswith("tests/")}:
        assert (ROOT / cited).is_file(), cited
    refine_file = intro.split("clip_refine", 1)[1].split("`tests/", 1)[1].split("`", 1)[0]
    assert "clip_refine" in (ROOT / "tests" / refine_file).read_text()
