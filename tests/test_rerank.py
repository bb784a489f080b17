"""Re-ranking with the image–text matching head (eval/rerank.py, search/rerank.py): the re-ranked order
against a per-pair loop, `lipkit search --rerank` and `/search` on a collection, the refusals, and an itm
run whose `lipkit eval` reports re-ranked recall, beside a head trained alone on a frozen checkpoint."""

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lipkit.checkpoint import load_checkpoint, save_checkpoint
from lipkit.data.images import load_image
from lipkit.eval.rerank import rerank_text_to_image
from lipkit.eval.token_similarity import pooled_and_tokens
from lipkit.search.embed import run_embed
from lipkit.search.encode import encode_text_tokens
from test_search_index import image_collection, search_cli, tiny_checkpoint


def test_reranked_scores_order_the_shortlist_by_the_head_and_keep_the_rest(head_checkpoint):
    model, _, _ = load_checkpoint(head_checkpoint)
    g = torch.Generator().manual_seed(1)
    img = torch.nn.functional.normalize(torch.randn(9, 5, 16, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(3, 6, 16, generator=g), dim=-1)
    mask = torch.arange(6)[None] < torch.tensor([[3], [6], [2]])
    for dense in (
        torch.randn(3, 9, generator=g),
        50 * torch.rand(3, 9, generator=g),
    ):  # cosines, or unbounded
        ranked = rerank_text_to_image(model, lambda idx: img[idx], txt, mask, dense, top=4)
        for q in range(3):
            first = dense[q].argsort(descending=True, stable=True).tolist()
            with torch.no_grad():
                n = int(mask[q].sum())
                head = {
                    i: float(model.matcher(img[i : i + 1], txt[q : q + 1, :n], mask[q : q + 1, :n]))
                    for i in first[:4]
                }
            want = sorted(first[:4], key=lambda i: -head[i]) + first[4:]
            assert ranked[q].argsort(descending=True, stable=True).tolist() == want


@pytest.fixture(scope="module")
def head_checkpoint(tmp_path_factory):
    """A random-weight tiny checkpoint with a one-layer matching head, recorded as trained with itm."""
    root = tmp_path_factory.mktemp("head")
    model, tok, _ = load_checkpoint(tiny_checkpoint(root / "plain"))
    torch.manual_seed(3)
    model.add_matcher(1, heads=2)
    return save_checkpoint(
        root / "head", model.eval(), tok, {"preset": "tiny", "train": {"objective": "itm"}}
    )


@pytest.fixture(scope="module")
def headed_collection(tmp_path_factory, head_checkpoint):
    root = tmp_path_factory.mktemp("rerank")
    table = image_collection(root, n=14)
    ckpt = head_checkpoint
    run_embed(ckpt, table, root / "emb", batch_size=8, progress=False)
    built = CliRunner().invoke(search_cli(), ["index", "build", str(root / "emb"), str(root / "ix")])
    assert built.exit_code == 0, built.output
    return root, ckpt


def _search(root, ckpt, *args):
    out = CliRunner().invoke(search_cli(), ["search", str(ckpt), str(root / "ix"), *args, "--json"])
    assert out.exit_code == 0, out.output
    return json.loads(out.output)["results"]


def test_lipkit_search_reranks_a_text_querys_first_hits(headed_collection):
    root, ckpt = headed_collection
    plain = _search(root, ckpt, "a red star", "-k", "8", "--rerank", "0")
    got = _search(root, ckpt, "a red star", "-k", "8", "--rerank", "5")
    assert all("match" not in h for h in plain) and [h["id"] for h in got[5:]] == [h["id"] for h in plain[5:]]
    model, tok, _ = load_checkpoint(ckpt)
    size = model.spec.image_size
    with torch.no_grad():
        query = torch.from_numpy(encode_text_tokens(model, tok, ["a red star"]))
        n = int((query.abs().sum(-1) > 0).sum())
        scores = {}
        for h in plain[:5]:
            tokens = pooled_and_tokens(model, load_image(h["path"], size)[None])[1]
            scores[h["id"]] = float(model.matcher(tokens, query[:, :n], torch.ones(1, n, dtype=torch.bool)))
    assert [h["id"] for h in got[:5]] == sorted(scores, key=lambda i: -scores[i])
    assert all(math.isclose(h["match"], scores[h["id"]], abs_tol=1e-4) for h in got[:5])
    default = _search(root, ckpt, "a red star", "-k", "8")  # 20 re-ranked: all 14 items, the best 8 shown
    assert all("match" in h for h in default) and default == _search(
        root, ckpt, "a red star", "-k", "8", "--rerank", "20"
    )
    assert [h["match"] for h in default] == sorted((h["match"] for h in default), reverse=True)


def test_hits_whose_image_cannot_be_read_keep_their_places(headed_collection, tmp_path):
    import copy

    from lipkit.search.query import Searcher
    from lipkit.search.rerank import rerank_hits

    root, ckpt = headed_collection
    s = Searcher(ckpt, root / "ix")
    hits = s.search(s.text_query("a red star"), 8)
    items = copy.deepcopy(s.index.items)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    items[hits[1]["id"]] = {"path": str(tmp_path / "missing.png")}
    items[hits[3]["id"]] = {"path": str(tmp_path / "bad.png")}
    out = rerank_hits(s.model, s.tokenizer, items, "a red star", hits, top=5)
    assert out[1] == hits[1] and out[3] == hits[3] and out[5:] == hits[5:]  # unreadable, or after the top 5
    moved = [out[n] for n in (0, 2, 4)]
    assert {h["id"] for h in moved} == {hits[n]["id"] for n in (0, 2, 4)}
    assert [h["match"] for h in moved] == sorted((h["match"] for h in moved), reverse=True)


def test_rerank_refusals_name_the_fix(headed_collection, tmp_path):
    root, ckpt = headed_collection
    plain = tiny_checkpoint(tmp_path / "plain")
    cli = search_cli()
    no_head = CliRunner().invoke(cli, ["search", str(plain), str(root / "ix"), "a red star", "--rerank", "3"])
    assert no_head.exit_code != 0 and "train.objective=itm" in str(no_head.exception or no_head.output)
    image = next((root / "images").rglob("*.png"))
    by_image = CliRunner().invoke(
        cli, ["search", str(ckpt), str(root / "ix"), "--image", str(image), "--rerank", "3"]
    )
    assert by_image.exit_code != 0 and "text query" in str(by_image.exception or by_image.output)
    assert CliRunner().invoke(cli, ["search", str(plain), str(root / "ix"), "a red star"]).exit_code == 0


def test_the_server_reranks_text_searches(headed_collection):
    pytest.importorskip("fastapi", reason="fastapi is not installed (pip install 'lipkit[serve]')")
    from fastapi.testclient import TestClient

    from lipkit.search.query import Searcher
    from lipkit.search.request_guards import Limits
    from lipkit.search.server import create_app

    root, ckpt = headed_collection
    want = _search(root, ckpt, "a blue square", "-k", "6", "--rerank", "4")
    searcher = Searcher(ckpt, root / "ix", rerank=4)
    with TestClient(create_app(searcher, Limits())) as client:
        got = client.get("/search", params={"q": "a blue square", "k": 6}).json()["results"]
        posted = client.post("/search", data={"q": "a blue square", "k": 6}).json()["results"]
    assert [h["id"] for h in got] == [h["id"] for h in posted] == [h["id"] for h in want]
    assert all("match" in h for h in got[:4]) and all("match" not in h for h in got[4:])
    assert np.allclose([h["match"] for h in got[:4]], [h["match"] for h in want[:4]], atol=1e-5)


def itm_cfg(table, out, **train):
    from conftest import tiny_run_cfg

    return tiny_run_cfg(table, out, **{"objective": "itm", **train})


def test_itm_trains_and_eval_reports_reranked_recall(table, tmp_path):
    from lipkit.config import config_from_dict
    from lipkit.eval.suite import run_eval
    from lipkit.train.launch import run_training

    _, result = run_training(itm_cfg(table, tmp_path / "run"))
    assert result.steps > 0 and math.isfinite(result.last_loss) and result.faults == 0
    logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(math.isfinite(r.get("match_loss", math.nan)) for r in logged)
    assert load_checkpoint(tmp_path / "run" / "checkpoint")[0].has_matcher
    cfg = config_from_dict({"eval": {"class_columns": ["category"], "rerank_top": 5}})
    res = run_eval(tmp_path / "run" / "checkpoint", {"train": str(table)}, cfg, tmp_path / "res.json")
    m = res["splits"]["train"]["metrics"]
    assert 0 <= m["retrieval/reranked/text_to_image/R@1"] <= m["retrieval/reranked/text_to_image/R@5"] <= 1
    assert m["retrieval/reranked/text_to_image/R@5"] == pytest.approx(m["retrieval/text_to_image/R@5"])
    assert m["retrieval/reranked/text_to_image/R@10"] == pytest.approx(m["retrieval/text_to_image/R@10"])


def test_a_head_trains_alone_on_a_frozen_checkpoint(table, tmp_path):
    from lipkit.train.launch import run_training

    base = tmp_path / "base"
    run_training(itm_cfg(table, base, objective="infonce"))
    heads = []
    for epochs in (1, 2):  # the same seeded head, trained for more steps: it moved
        cfg = itm_cfg(
            table,
            tmp_path / f"head{epochs}",
            epochs=epochs,
            lock_image="all",
            lock_text="all",
            objective_args={"contrastive_weight": 0.0},
        )
        cfg.model.init_from = str(base / "checkpoint")
        run_training(cfg)
        before = load_checkpoint(base / "checkpoint")[0].state_dict()
        after = load_checkpoint(tmp_path / f"head{epochs}" / "checkpoint")[0].state_dict()
        towers = [k for k in before if k.startswith(("visual.", "text."))]
        assert towers and all(torch.equal(before[k], after[k]) for k in towers)
        heads.append({k: v for k, v in after.items() if k.startswith("matcher.")})
    assert heads[0] and any(not torch.equal(heads[0][k], heads[1][k]) for k in heads[0])
