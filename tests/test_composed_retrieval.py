"""Composed image retrieval: the queries a table names, the benchmark builder's rules, the pseudo-word
path at its neutral value (a real word's vector gives that word's sentence), eval's recall against a
per-query loop, RTD's loss against its formula written out, and pic2word → rtd end to end."""

import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from conftest import tiny_eval_setup
from lipkit.checkpoint import load_checkpoint, save_checkpoint
from lipkit.data.composed import COMPOSED, triplets
from lipkit.data.sources.registry import read_table
from lipkit.errors import UserError


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_tables_composed_queries_become_index_triplets(table, tmp_path):
    """References are found like images (relative to the table), one that is not a row is counted, and a
    malformed cell is refused by sentence."""
    rows = [json.loads(x) for x in table.read_text().splitlines()[:4]]
    rel = [str(table.parent / r["image"]) for r in rows]
    rows[2][COMPOSED] = [{"reference": rel[0], "text": "but blue"}, {"reference": "nope.png", "text": "x"}]
    rows[3][COMPOSED] = json.dumps([{"reference": rel[1], "text": "in red"}])  # as a CSV cell holds it
    for r, path in zip(rows, rel, strict=True):
        r["image"] = path
    records = read_table(_write(tmp_path / "t.jsonl", rows))
    found, missing = triplets(records)
    assert [(t.reference, t.text, t.target) for t in found] == [(0, "but blue", 2), (1, "in red", 3)]
    assert missing == 1
    rows[1][COMPOSED] = [{"ref": "a.png"}]
    with pytest.raises(UserError, match="must be a list of"):
        read_table(_write(tmp_path / "bad.jsonl", rows))


def test_builder_relates_variants_of_one_concept_by_one_attribute():
    from lipkit.data.builtin.composed import modification, queries, variant

    assert variant("waving hand: dark skin tone") == ("waving hand", frozenset({"dark skin tone"}))
    assert variant("flag: France") is None and variant("cat") == ("cat", frozenset())
    light, dark = frozenset({"light skin tone"}), frozenset({"dark skin tone"})
    assert modification(frozenset(), dark) == "with dark skin tone"  # added
    assert modification(light, dark) == "with dark skin tone"  # replaced by one of its kind
    assert modification(light | {"curly hair"}, dark) is None  # two steps
    assert modification(light, frozenset({"bald"})) is None  # a hair for a skin tone
    assert modification(light, light | {"bald"}) == "bald"
    rows = [
        {"captions": ["hand"], "style": "a"},
        {"captions": ["hand: dark skin tone"], "style": "a"},
        {"captions": ["hand: light skin tone"], "style": "b"},  # another drawing style: not related
        {"captions": ["flag: France"], "style": "a"},
    ]
    assert dict(queries(rows)) == {1: [(0, "with dark skin tone")]}


def test_build_composed_on_the_fixture_and_eval_recall_against_a_loop(table, tmp_path):
    """The built test table's queries, scored four ways by eval, equal a per-query ranking written out
    (the reference left out); chance is K/(N−1)."""
    from lipkit.config_eval import EvalConfig
    from lipkit.data.builtin.composed import build_composed
    from lipkit.eval.evaluate import evaluate_records

    summary = build_composed(tmp_path / "cir", root=table.parent)
    assert summary["splits"]["test"]["queries"] > 0
    assert build_composed(tmp_path / "cir", root=table.parent) == summary  # reused
    records = read_table(tmp_path / "cir" / "test.jsonl")
    _, tok, model = tiny_eval_setup(table)
    result = evaluate_records(model, tok, records, EvalConfig(class_columns=[]))
    m, found = result["metrics"], triplets(records)[0]
    assert result["composed"]["queries"] == len(found)
    with torch.no_grad():
        from lipkit.data.image_store import ImageStore

        store = ImageStore(records, model.spec.image_size, cache=True)
        g = model.embed_images_u8(store.get(range(len(records))))
        for way in ("image", "text", "sum"):
            hits = {1: 0, 5: 0}
            for t in found:
                v = g[t.reference]
                w = F.normalize(model.text(tok([t.text])).float(), dim=-1)[0]
                q = {"image": v, "text": w, "sum": F.normalize(v + w, dim=0)}[way]
                scores = {i: float(q @ g[i]) for i in range(len(records)) if i != t.reference}
                ranked = sorted(scores, key=lambda i: -scores[i])
                for k in hits:
                    hits[k] += t.target in ranked[:k]
            for k, h in hits.items():
                assert m[f"composed/{way}/R@{k}"] == pytest.approx(h / len(found), abs=1e-9)
    assert result["chance"]["composed/sum/R@5"] == pytest.approx(5 / (len(records) - 1))
    from lipkit.eval.report import write_report

    html = write_report(tmp_path / "run", {"splits": {"test": result}}).read_text()
    shown = result["composed"]["examples"]
    assert "Composed queries" in html and html.count('<span class="muted">sum</span>') == len(shown) > 0


@pytest.mark.parametrize("tower", ["transformer", "hf"])
def test_pseudo_word_of_a_real_words_vector_is_that_words_sentence(tower, table):
    """composed_features with the word vector of a token in the placeholder's place gives exactly the
    text features of the sentence spelling that token — the neutral check of the prompted path."""
    from lipkit.models.pseudo_word import composed_features, prompt_ids
    from test_adapt_methods import _parts

    tok, model = _parts(tower, table)
    mods = ["red", "heart"]
    ids, at = prompt_ids(tok, "a photo of * that {}", mods)
    vocab = [t[1:] for t in tok.tok.get_vocab() if t.startswith("Ġ") and t[1:].isalpha()]  # byte-level BPE
    for word in ("red", "heart", "face", "cat", *sorted(vocab)):  # one the tokenizer spells in one token
        spelled = tok([f"a photo of {word} that {m}" for m in mods])
        if all((spelled[i] != ids[i]).sum() == 1 for i in range(len(mods))):
            break
    else:
        pytest.fail("no candidate word is one token")
    wid = spelled[0, at[0]]
    with torch.no_grad():
        vec = model.text.word_embedding(wid.view(1, 1))[0, 0].expand(len(mods), -1)
        got = composed_features(model.text, None, tok, vec, mods, "a photo of * that {}")
        expected = model.text(spelled)
    assert (got - expected).abs().max() < 2e-5


def test_rtd_loss_is_its_formula_written_out():
    """nt_xent against RTD's contrastive loss as its code writes it (numerator over the pair, denominator
    over every other vector of the joint set), values and gradients, in float64."""
    from lipkit.adapt.composed import nt_xent

    torch.manual_seed(0)
    a = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    q = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    tau = 0.07
    got = nt_xent(a, q, tau)
    v1, v2 = F.normalize(a, dim=1), F.normalize(q, dim=1)
    num = torch.exp((v1 * v2).sum(1) / tau)
    num = torch.cat([num, num])
    z = torch.cat([v1, v2])
    terms = []
    for i in range(10):
        den = sum(torch.exp(z[i] @ z[j] / tau) for j in range(10) if j != i)
        terms.append(torch.log(num[i] / den))
    expected = -torch.stack(terms).mean()
    assert abs(got.item() - expected.item()) < 1e-10
    ga = torch.autograd.grad(got, (a, q))
    gb = torch.autograd.grad(expected, (a, q))
    assert all((x - y).abs().max() < 1e-10 for x, y in zip(ga, gb, strict=True))
    # captions repeated in the batch: distinct ids change nothing; a shared id leaves the vectors paired
    # with that caption out of each other's denominators
    assert abs(nt_xent(a, q, tau, torch.arange(5)).item() - expected.item()) < 1e-10
    ids = torch.tensor([0, 1, 0, 2, 1])
    group = torch.cat([ids, ids])
    terms = []
    for i in range(10):
        p = (i + 5) % 10
        den = sum(
            torch.exp(z[i] @ z[j] / tau) for j in range(10) if j != i and (j == p or group[j] != group[i])
        )
        terms.append(torch.log(torch.exp(z[i] @ z[p] / tau) / den))
    assert abs(nt_xent(a, q, tau, ids).item() + torch.stack(terms).mean().item()) < 1e-10


def test_pic2word_then_rtd_end_to_end(table, tmp_path):
    """pic2word trains φ alone (towers unchanged) and eval scores its composed queries; rtd needs a
    pic2word checkpoint, tunes the text tower and keeps φ; few-shot methods need --column."""
    from lipkit.cli import app
    from lipkit.config_eval import EvalConfig
    from lipkit.data.builtin.composed import build_composed
    from lipkit.eval.evaluate import evaluate_records
    from test_adapt_methods import _tiny

    build_composed(tmp_path / "cir", root=table.parent)
    tok, model = _tiny(table)
    base = tmp_path / "base"
    save_checkpoint(base, model, tok, {"train": {"objective": "infonce"}, "preset": "tiny"})
    run = CliRunner()
    common = ["--steps", "3", "--batch-size", "8", "--lr", "1e-3"]
    r = run.invoke(
        app, ["adapt", str(base), str(tmp_path / "p"), "--data", str(table), "--method", "pic2word", *common]
    )
    assert r.exit_code == 0, r.output
    p2w, _, cfg = load_checkpoint(tmp_path / "p" / "checkpoint")
    assert cfg["adapted"]["method"] == "pic2word" and cfg["adapted"]["loss"][1] < cfg["adapted"]["loss"][0]
    assert p2w.pseudo_word is not None
    assert all(
        torch.equal(x, y)
        for x, y in zip(p2w.text.state_dict().values(), model.text.state_dict().values(), strict=True)
    )
    records = read_table(tmp_path / "cir" / "test.jsonl")
    metrics = evaluate_records(p2w, tok, records, EvalConfig(class_columns=[]), details=False)["metrics"]
    assert "composed/pic2word/R@1" in metrics
    r = run.invoke(
        app,
        [
            "adapt",
            str(base),
            str(tmp_path / "r0"),
            "--data",
            str(tmp_path / "cir" / "train.jsonl"),
            "--method",
            "rtd",
        ],
    )
    assert r.exit_code == 1 and "--method pic2word` first" in str(r.exception)
    cir_train = str(tmp_path / "cir" / "train.jsonl")
    r = run.invoke(
        app,
        [
            "adapt",
            str(tmp_path / "p" / "checkpoint"),
            str(tmp_path / "r"),
            "--data",
            cir_train,
            "--method",
            "rtd",
            *common,
        ],
    )
    assert r.exit_code == 0, r.output
    tuned, _, cfg = load_checkpoint(tmp_path / "r" / "checkpoint")
    assert tuned.spec.adapter["method"] == "rtd"
    assert all(
        torch.equal(x, y)
        for x, y in zip(
            tuned.pseudo_word.state_dict().values(), p2w.pseudo_word.state_dict().values(), strict=True
        )
    )
    assert any(
        not torch.equal(x, y)
        for x, y in zip(tuned.text.state_dict().values(), p2w.text.state_dict().values(), strict=True)
    )
    r = run.invoke(app, ["adapt", str(base), str(tmp_path / "l"), "--data", str(table), "--method", "lora"])
    assert r.exit_code == 1 and "--column" in str(r.exception)
