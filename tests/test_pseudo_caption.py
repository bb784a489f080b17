"""`lipkit data pseudo-caption`: captions from zero-shot attribute predictions, against a naive loop over
the checkpoint's own embeddings; the agreement with a source column; clear refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from conftest import tiny_eval_setup
from lipkit.cli import app
from lipkit.curate.pseudo_caption import check_template, parse_attributes, run_pseudo_caption
from lipkit.data.sources.registry import read_table
from lipkit.errors import UserError


@pytest.fixture(scope="module")
def ckpt(table, tmp_path_factory) -> Path:
    from lipkit.checkpoint import save_checkpoint

    _, tok, model = tiny_eval_setup(table, n=40)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint", model, tok)


def test_predictions_are_the_naive_prompt_ensemble_argmax(ckpt, table, tmp_path):
    from lipkit.checkpoint import load_checkpoint
    from lipkit.data.image_store import ImageStore
    from lipkit.eval.evaluate import embed_images, embed_texts

    records = read_table(table)
    categories = sorted({r.meta["category"] for r in records})
    attributes = {"category": categories, "mood": ["happy", "sad", "calm"]}
    prompts = ["{}", "an emoji of {}"]
    s = run_pseudo_caption(
        ckpt,
        table,
        tmp_path / "out",
        attributes,
        "a {mood} {category} emoji",
        prompts=prompts,
        progress=False,
    )
    rows = [json.loads(x) for x in (tmp_path / "out" / "pseudo.jsonl").read_text().splitlines()]
    assert s["written"] == len(rows) == len(records)
    model, tok, _ = load_checkpoint(ckpt)
    img = embed_images(model, ImageStore(records, model.spec.image_size, cache=True), 16)
    for name, values in attributes.items():
        classes = []
        for v in values:  # the normalised sum of the normalised prompt embeddings
            e = F.normalize(embed_texts(model, tok, [p.replace("{}", v) for p in prompts], 16), dim=-1)
            classes.append(F.normalize(e.sum(0), dim=0))
        sims = F.normalize(img, dim=-1) @ torch.stack(classes).t()
        for i, row in enumerate(rows):
            want = values[int(sims[i].argmax())]
            assert row["pseudo_attributes"][name] == want, (i, name)
            assert abs(row["pseudo_scores"][name] - float(sims[i].max())) < 1e-4
    for row in rows:
        a = row["pseudo_attributes"]
        assert row["captions_pseudo"] == [f"a {a['mood']} {a['category']} emoji"]
        assert row["captions"]  # the row's own captions stay
    agree = s["agreement_with_source_columns"]  # the table has a category column, not a mood one
    want = sum(r["pseudo_attributes"]["category"] == r["category"] for r in rows) / len(rows)
    assert set(agree) == {"category"} and agree["category"] == pytest.approx(want)
    assert sum(s["chosen"]["mood"].values()) == len(rows)


def test_the_cli_and_its_refusals(ckpt, table, tmp_path):
    runner = CliRunner()
    args = ["data", "pseudo-caption", str(ckpt), str(table), str(tmp_path / "o")]
    result = runner.invoke(app, [*args, "-a", "tone=light,dark", "-t", "a {tone} emoji"])
    assert result.exit_code == 0, result.output
    assert "pseudo-captioned" in result.output
    (tmp_path / "values.txt").write_text("red\ngreen\n\nred\n")
    assert parse_attributes([f"colour=@{tmp_path / 'values.txt'}"]) == {"colour": ["red", "green"]}
    for bad, match in [
        (["colour"], "not NAME=V1,V2"),
        (["colour=red"], "1 value"),
        (["colour=red,blue", "colour=a,b"], "given twice"),
        (["colour=@/nope.txt"], "does not exist"),
        ([], "at least one --attribute"),
    ]:
        with pytest.raises(UserError, match=match):
            parse_attributes(bad)
    with pytest.raises(UserError, match="names 'size'; use \\{colour\\}"):
        check_template("a {size} thing", {"colour": ["a", "b"]})
    for bad in ("a {colour!r} thing", "a {colour:>5} thing"):
        with pytest.raises(UserError, match="write plain"):
            check_template(bad, {"colour": ["a", "b"]})
    result = runner.invoke(
        app, [*args, "-a", "tone=light,dark", "-t", "a {tone} emoji", "--prompt", "no slot"]
    )
    assert isinstance(result.exception, UserError) and "needs a {}" in str(result.exception)
