"""ConceptCLIP's region–concept alignment (objectives/conceptclip.py): the term against a per-pair loop
(values and gradients), concept pooling against character offsets of the caption, the concept table's
refusals, and training on the canvases with the objects' names as concepts."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from lipkit.data.records import Record
from lipkit.errors import UserError
from lipkit.models.dual_encoder import DualEncoder
from lipkit.models.presets import get_spec
from lipkit.objectives import build_objective
from lipkit.objectives.sigmoid import sigmoid_loss
from lipkit.text.tokenizer import TextTokenizer
from lipkit.train.batch_pass import sample_ids
from lipkit.train.concepts import ConceptTable, concept_ids, find_span
from lipkit.train.inputs import objective_inputs, objective_needs
from lipkit.train.views import Views

F64 = torch.float64
CAPTIONS = ["a red heart and a blue star", "the closed book, a flag: maldives", "sun over a tree"]


def naive_concept_loss(img_tok, concepts, valid, scale, bias):
    """−1/B Σ_i Σ_j log σ(z_ij (t s_ij + b)) over captions with a valid concept, one pair at a time."""
    total = img_tok.new_zeros(())
    for i in range(img_tok.shape[0]):
        for j in range(concepts.shape[0]):
            ks = [k for k in range(concepts.shape[1]) if valid[j, k]]
            if not ks:
                continue
            s = sum(max(img_tok[i, p] @ concepts[j, k] for p in range(img_tok.shape[1])) for k in ks) / len(
                ks
            )
            z = 1.0 if i == j else -1.0
            total = total - F.logsigmoid(z * (scale * s + bias))
    return total / img_tok.shape[0]


def test_concept_term_matches_a_per_pair_loop_values_and_gradients():
    g = torch.Generator().manual_seed(5)
    b, n, k, d = 4, 5, 3, 8
    img = F.normalize(torch.randn(b, d, generator=g, dtype=F64), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(b, d, generator=g, dtype=F64), dim=-1).requires_grad_()
    tok = F.normalize(torch.randn(b, n, d, generator=g, dtype=F64), dim=-1).requires_grad_()
    con = F.normalize(torch.randn(b, k, d, generator=g, dtype=F64), dim=-1)
    valid = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)
    con = (con * valid[..., None]).requires_grad_()
    scale, bias = torch.tensor(10.0, dtype=F64), torch.tensor(-10.0, dtype=F64)
    obj = build_objective("conceptclip", concept_weight=0.5).double()
    got = obj(img, txt, scale, bias, tok, con, valid)
    ts, tb = obj.concept_scale(), obj.concept_bias
    want = sigmoid_loss(img, txt, scale, bias) + 0.5 * naive_concept_loss(tok, con, valid, ts, tb)
    assert torch.allclose(got, want, atol=1e-10)
    wrt = (img, txt, tok, con, obj.concept_log_scale, obj.concept_bias)
    g1 = torch.autograd.grad(got, wrt)
    g2 = torch.autograd.grad(want, wrt)
    assert all(torch.allclose(a, c, atol=1e-10) for a, c in zip(g1, g2, strict=True))
    assert math.isclose(float(obj.last_stats["concept_share"]), 0.75)
    zero = build_objective("conceptclip", concept_weight=0).double()
    assert torch.allclose(zero(img, txt, scale, bias, tok, con, valid), sigmoid_loss(img, txt, scale, bias))
    none = obj(img, txt, scale, bias, tok, con, torch.zeros_like(valid))  # no concept at all: SigLIP alone
    assert torch.allclose(none, sigmoid_loss(img, txt, scale, bias))
    with pytest.raises(UserError, match="concept_weight"):
        build_objective("conceptclip", concept_weight=-1)


def test_concept_ids_drop_the_special_tokens_and_spans_are_found_by_ids():
    tok = TextTokenizer.train(CAPTIONS * 3, vocab_size=300, context_length=16)
    (heart,) = concept_ids(["red heart"], tok)
    assert tok.sot_id not in heart and tok.eot_id not in heart and tok.decode(list(heart)) == "red heart"
    caption = tok(CAPTIONS[0])[0].tolist()
    assert find_span(caption, heart) == 2 and find_span(caption, (tok.eot_id, 99999)) == -1
    assert find_span(caption, ()) == -1


def test_concept_features_pool_the_captions_tokens_over_each_concepts_characters():
    from conftest import TINY_MODEL

    tok = TextTokenizer.train(CAPTIONS * 3, vocab_size=300, context_length=16)
    torch.manual_seed(0)
    spec = get_spec("tiny", **TINY_MODEL, vocab_size=tok.vocab_size, eot_id=tok.eot_id, context_length=16)
    model = DualEncoder(dataclasses.replace(spec, logit_bias=True)).eval()
    concepts = [["red heart", "blue star", "green moon"], ["closed book", "flag: maldives"], []]
    keys = ["a", "b", "c"]
    table = ConceptTable(keys, concepts, tok)
    obj = build_objective("conceptclip")
    needs = objective_needs(obj)
    images = torch.rand(3, 3, model.spec.image_size, model.spec.image_size)
    ids = tok(CAPTIONS)
    sample = sample_ids(keys)
    with torch.no_grad():
        got = objective_inputs(
            model, needs, images, ids, 1, Views(), tok.pad_id, keys=sample, labels={"concepts": table}
        )
        _, tokens = model.text(ids, return_tokens=True)
        tokens = F.normalize(tokens, dim=-1)
    assert got["concept_valid"].tolist() == [[True, True, False], [True, True, False], [False, False, False]]
    for i, caption in enumerate(CAPTIONS):
        offsets = tok.tok.encode(caption).offsets  # characters of each token (start/end tokens: (0, 0))
        for k, concept in enumerate(concepts[i]):
            at = caption.find(concept)
            if at < 0:
                assert not got["concept_features"][i, k].any()
                continue
            end = at + len(
                concept
            )  # the tokens overlapping its characters (a token's offsets hold its space)
            inside = [t for t, (s, e) in enumerate(offsets) if e > s and s < end and e > at]
            want = F.normalize(tokens[i, inside].mean(0), dim=-1)
            assert torch.allclose(got["concept_features"][i, k], want, atol=1e-6), (caption, concept)


def test_concept_table_refuses_bad_rows_and_tables_without_concepts():
    tok = TextTokenizer.train(CAPTIONS * 3, vocab_size=300, context_length=16)
    rows = [Record("a.png", [CAPTIONS[0]], {"concepts": ["red heart", "purple"]}, "a")]
    table = ConceptTable.from_records(rows, "concepts", tok, "t.jsonl")
    assert table.concepts == 2 and table.found == 0.5
    bad = Record("b.png", ["x"], {"concepts": "red"}, "b")
    with pytest.raises(UserError, match="list of non-empty phrases"):
        ConceptTable.from_records([bad], "concepts", tok, "t.jsonl")
    with pytest.raises(UserError, match="No row"):
        ConceptTable.from_records([Record("c.png", ["x"], {}, "c")], "concepts", tok, "t.jsonl")
    unspelled = Record("d.png", [CAPTIONS[2]], {"concepts": ["red heart"]}, "d")
    with pytest.raises(UserError, match="occurs in its row's captions"):
        ConceptTable.from_records([unspelled], "concepts", tok, "t.jsonl")


def concept_cfg(table, out):
    from conftest import tiny_run_cfg

    data = {"caption_select": [], "meta_captions": []}
    return tiny_run_cfg(
        table, out, "conceptclip", data, objective_args={"concepts_column": "object_captions"}
    )


def test_conceptclip_trains_on_canvases_with_object_names_as_concepts(canvas_table, table, tmp_path):
    from lipkit.checkpoint import load_checkpoint
    from lipkit.train.launch import run_training

    _, result = run_training(concept_cfg(canvas_table, tmp_path / "run"))
    assert result.steps == 6 and math.isfinite(result.last_loss) and result.faults == 0
    logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    shares = [r["concept_share"] for r in logged if "concept_share" in r]
    assert (
        shares and min(shares) > 0.9 and any(math.isfinite(r.get("concept_loss", math.nan)) for r in logged)
    )
    assert load_checkpoint(tmp_path / "run" / "checkpoint")[0].logit_bias is not None  # SigLIP's bias, made
    with pytest.raises(UserError, match="No row"):
        run_training(concept_cfg(table, tmp_path / "b"))
