"""The connector recipe and VPGTrans (objectives/vpgtrans.py, models/prefix_decoder.py): the prefix decoder's
construction (causal, prompts first, a plain language model without an image), the teacher-forced loss
against a per-token loop (values and gradients, through the connector), the word converter and merged
projector against their definitions, and the stages end to end: text_lm trains only the language model,
connector only the connector, a transferred connector starts as the source's VPG and merged projector
(the VPG locked in the warm-up), and `lipkit caption` captions with it."""

import json

import pytest
import torch
from typer.testing import CliRunner

from lipkit.models.caption_decoder import caption_nll
from lipkit.models.prefix_decoder import PrefixDecoder
from lipkit.objectives import build_objective
from lipkit.objectives.vpgtrans import transferred_projector, word_converter

F64 = torch.float64


def prefix_decoder(width: int = 16, seed: int = 0) -> PrefixDecoder:
    torch.manual_seed(seed)
    dec = PrefixDecoder(7, width, layers=2, heads=2, context_length=6, image_dim=8, queries=3)
    return dec.double().eval()


def test_prompts_come_first_the_caption_is_causal_and_no_image_is_a_plain_language_model():
    dec = prefix_decoder()
    image = torch.randn(2, 5, 8, dtype=F64)
    ids = torch.tensor([[1, 3, 4, 5, 2], [1, 4, 4, 3, 2]])
    out = dec(ids, image)
    changed = ids.clone()
    changed[:, 3:] = 6
    again = dec(changed, image)
    assert torch.allclose(out[:, :3], again[:, :3]) and not torch.allclose(out[:, 3:], again[:, 3:])
    assert not torch.allclose(dec(ids, image.flip(0))[0], out[0])  # every position reads the image
    # the prompts are the connector's output placed before the caption, which keeps positions 0..L-1
    prompts = dec.connector(image)
    x = torch.cat([prompts, dec.token_embedding(ids) + dec.positional_embedding[:5]], dim=1)
    for block in dec.resblocks:
        x = block(x, causal=True)
    assert torch.allclose(out, dec.text_projection(dec.ln_final(x[:, 3:])), atol=1e-12)
    # without an image the connector plays no part: the language model alone
    text_only = dec(ids)
    with torch.no_grad():
        for p in dec.connector.parameters():
            p.add_(1.0)
    assert torch.equal(dec(ids), text_only) and not torch.allclose(dec(ids, image), out)
    assert {n for n, _ in dec.named_parameters()} - {
        n for n, p in dec.named_parameters() if any(p is q for q in dec.language_model_parameters())
    } == {n for n, _ in dec.named_parameters() if n.startswith("connector.")}


def test_caption_nll_matches_a_per_token_loop_through_the_connector():
    dec = prefix_decoder()
    image = torch.randn(2, 5, 8, dtype=F64, requires_grad=True)
    ids = torch.tensor([[1, 3, 4, 2, 0, 0], [1, 5, 5, 6, 4, 2]])  # pad id 0
    for img in (image, None):
        nll, count = caption_nll(dec, ids, img, pad_id=0)
        want = []
        for b in range(2):
            total = torch.zeros((), dtype=F64)
            for t in range(1, 6):
                if ids[b, t] != 0:
                    logits = dec(ids[b : b + 1, :t], None if img is None else img[b : b + 1])[0, -1]
                    total = total - torch.log_softmax(logits, -1)[ids[b, t]]
            want.append(total)
        assert count.tolist() == [3, 5] and torch.allclose(nll, torch.stack(want), atol=1e-10)
        params = [dec.connector.projector.weight, dec.connector.vpg.queries, dec.token_embedding.weight]
        g1 = torch.autograd.grad(nll.sum(), params, allow_unused=True)
        g2 = torch.autograd.grad(torch.stack(want).sum(), params, allow_unused=True)
        for a, b in zip(g1, g2, strict=True):
            assert (a is None and b is None) or torch.allclose(a, b, atol=1e-10)
        assert (g1[0] is None) == (img is None)  # the connector learns only from captions with an image


def test_objectives_are_the_token_mean_and_check_their_options():
    nll, tokens = torch.tensor([3.0, 5.0], dtype=F64), torch.tensor([2, 3])
    assert build_objective("text_lm")(lm_nll=nll, lm_tokens=tokens).item() == pytest.approx(8 / 5)
    got = build_objective("connector")(prefix_caption_nll=nll, prefix_caption_tokens=tokens)
    assert got.item() == pytest.approx(8 / 5)
    for bad in ({"train_vpg": "no"}, {"transfer_from": 3}):
        with pytest.raises(Exception, match="must be"):
            build_objective("connector", **bad)


def test_word_converter_is_the_least_squares_affine_map_and_the_projector_merges_it():
    g = torch.Generator().manual_seed(0)
    source = torch.randn(40, 6, generator=g, dtype=F64)
    c_true, shift = torch.randn(6, 5, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64)
    c_w, c = word_converter(source, source @ c_true + shift)  # an exact affine relation is recovered
    assert torch.allclose(c_w, c_true, atol=1e-10) and torch.allclose(c, shift, atol=1e-10)
    noisy = source @ c_true + shift + 0.3 * torch.randn(40, 5, generator=g, dtype=F64)
    a = torch.cat([source, torch.ones(40, 1, dtype=F64)], 1)
    normal = torch.linalg.solve(a.t() @ a, a.t() @ noisy)  # the normal equations, written out
    c_w, c = word_converter(source, noisy)
    assert torch.allclose(torch.cat([c_w, c[None]]), normal, atol=1e-10)
    few = source[:4]  # fewer words than dimensions + 1: the minimum-norm fit, as the pseudo-inverse gives
    c_w4, c4 = word_converter(few, noisy[:4])
    pinv = torch.linalg.pinv(torch.cat([few, torch.ones(4, 1, dtype=F64)], 1)) @ noisy[:4]
    assert torch.allclose(torch.cat([c_w4, c4[None]]), pinv, atol=1e-10)
    weight, bias = torch.randn(6, 8, generator=g, dtype=F64), torch.randn(6, generator=g, dtype=F64)
    new_w, new_b = transferred_projector(weight, bias, (c_w, c))
    x = torch.randn(3, 8, generator=g, dtype=F64)
    assert torch.allclose(x @ new_w.t() + new_b, (x @ weight.t() + bias) @ c_w + c, atol=1e-10)


def _cfg(table, out, objective, init_from=None, width=0, **args):
    from conftest import TINY_MODEL, tiny_run_cfg

    cfg = tiny_run_cfg(table, out, objective, objective_args=args, lock_image="all", lock_text="all")
    cfg.model.overrides = {**TINY_MODEL, "caption_width": width} if width else dict(TINY_MODEL)
    cfg.model.init_from = str(init_from) if init_from else None
    return cfg


def _params(path, prefix):
    from lipkit.checkpoint import load_checkpoint

    return {k: v for k, v in load_checkpoint(path)[0].state_dict().items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def stages(table, tmp_path_factory):
    """A base, two language models on it (widths 32 and 48) and a connector trained on the first."""
    from lipkit.train.launch import run_training

    tmp = tmp_path_factory.mktemp("vpgtrans")
    run_training(_cfg(table, tmp / "base", "infonce"))
    base = tmp / "base" / "checkpoint"
    for name, width in (("lm", 0), ("lm-wide", 48)):
        run_training(_cfg(table, tmp / name, "text_lm", base, width))
    run_training(_cfg(table, tmp / "conn", "connector", tmp / "lm" / "checkpoint"))
    return {name: tmp / name / "checkpoint" for name in ("base", "lm", "lm-wide", "conn")}


def test_stages_train_what_they_say_and_a_transferred_connector_captions(table, stages, tmp_path):
    from lipkit.checkpoint import load_checkpoint
    from lipkit.cli import app
    from lipkit.data.sources.registry import read_table
    from lipkit.errors import UserError
    from lipkit.train.connector_setup import transfer_connector
    from lipkit.train.launch import run_training

    base, lm, wide, conn = (stages[k] for k in ("base", "lm", "lm-wide", "conn"))
    towers = _params(base, ("visual.", "text."))
    assert all(torch.equal(towers[k], v) for k, v in _params(conn, ("visual.", "text.")).items())
    assert _params(wide, "captioner.token_embedding")["captioner.token_embedding.weight"].shape[1] == 48
    before, after = _params(lm, "captioner."), _params(conn, "captioner.")
    assert all(torch.equal(before[k], after[k]) == (not k.startswith("captioner.connector.")) for k in before)
    # VPGTrans's warm-up on the wider language model: the source's VPG (locked), a merged projector trained
    run_training(_cfg(table, tmp_path / "warm", "connector", wide, transfer_from=str(conn), train_vpg=False))
    warm = tmp_path / "warm" / "checkpoint"
    source, got = _params(conn, "captioner.connector."), _params(warm, "captioner.connector.")
    assert all(torch.equal(source[k], got[k]) for k in source if ".vpg." in k)
    assert got["captioner.connector.projector.weight"].shape == (48, 32)
    lm_wide = _params(wide, "captioner.")
    assert all(
        torch.equal(v, lm_wide[k]) for k, v in _params(warm, "captioner.").items() if ".connector." not in k
    )
    merged = load_checkpoint(wide)[0]  # the warm-up's start: the merged projector, which then trained
    transfer_connector(
        merged, conn, load_checkpoint(wide)[1], type("Data", (), {"records": read_table(table)})()
    )
    start = merged.captioner.connector.projector.weight
    assert start.shape == (48, 32) and not torch.equal(start, got["captioner.connector.projector.weight"])
    # VPGTrans's stage 2 from the warm-up's checkpoint: the whole connector trains
    run_training(_cfg(table, tmp_path / "tuned", "connector", warm))
    tuned = _params(tmp_path / "tuned" / "checkpoint", "captioner.connector.vpg.")
    assert all(not torch.equal(v, got[k]) for k, v in tuned.items() if k.endswith("queries"))
    image = str(read_table(table)[0].image)
    runs = [CliRunner().invoke(app, ["caption", str(warm), image, "--json"]) for _ in range(2)]
    assert runs[0].exit_code == 0, runs[0].output
    assert runs[0].output == runs[1].output and "caption" in json.loads(runs[0].output.splitlines()[0])
    # refused: a connector without a pre-trained language model, a transfer from a checkpoint without one
    with pytest.raises(UserError, match="text_lm objective"):
        run_training(_cfg(table, tmp_path / "no-lm", "connector", base))
    with pytest.raises(UserError, match="has no connector"):
        run_training(_cfg(table, tmp_path / "bad", "connector", wide, transfer_from=str(base)))
    with pytest.raises(UserError, match="trains on a trained model's towers; set model.init_from"):
        run_training(_cfg(table, tmp_path / "scratch", "text_lm"))
    with pytest.raises(UserError, match="reading image tokens and this model has none or another kind"):
        run_training(_cfg(table, tmp_path / "coca", "coca", conn))


def test_the_transferred_projector_is_the_source_merged_with_the_fitted_converter(table, stages):
    from lipkit.checkpoint import load_checkpoint
    from lipkit.data.sources.registry import read_table
    from lipkit.train.connector_setup import caption_token_ids, transfer_connector

    src = load_checkpoint(stages["conn"])[0].captioner
    model, tok, _ = load_checkpoint(stages["lm-wide"])
    data = type("Data", (), {"records": read_table(table)})()
    transfer_connector(model, stages["conn"], tok, data)
    ids = caption_token_ids(tok, data)
    assert tok.pad_id not in ids.tolist() and len(ids) > 10
    e_src, e_tgt = (
        src.token_embedding.weight[ids].double(),
        model.captioner.token_embedding.weight[ids].double(),
    )
    a = torch.cat([e_src, torch.ones(len(ids), 1, dtype=F64)], 1)
    conv = torch.linalg.pinv(a) @ e_tgt  # the minimum-norm least-squares fit (fewer tokens than W + 1 here)
    got = model.captioner.connector.projector
    want = (src.connector.projector.weight.double().t() @ conv[:-1]).t()
    assert torch.allclose(got.weight.double(), want, atol=1e-5)
    want_b = src.connector.projector.bias.double() @ conv[:-1] + conv[-1]
    assert torch.allclose(got.bias.double(), want_b, atol=1e-5)
    source_vpg, vpg = src.connector.vpg.state_dict(), model.captioner.connector.vpg.state_dict()
    assert source_vpg.keys() == vpg.keys() and all(torch.equal(source_vpg[k], vpg[k]) for k in vpg)
