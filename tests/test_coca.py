"""CoCa's caption decoder and objective (models/caption_decoder.py, objectives/coca.py) and `lipkit caption`
(eval/captioning.py): causality, the captioning loss against a per-token loop (values and gradients),
beam search against brute force, training from scratch and on a frozen checkpoint, the CLI."""

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from lipkit.errors import UserError
from lipkit.eval.captioning import beam_search
from lipkit.models.caption_decoder import CaptionDecoder, caption_nll
from lipkit.objectives import build_objective
from lipkit.objectives.infonce import InfoNCE

F64 = torch.float64


def decoder(vocab=7, context=6, seed=0) -> CaptionDecoder:
    torch.manual_seed(seed)
    return (
        CaptionDecoder(vocab, width=16, layers=2, heads=2, context_length=context, image_dim=8)
        .double()
        .eval()
    )


def test_the_decoder_is_causal_and_reads_the_image():
    dec = decoder()
    image = torch.randn(2, 5, 8, dtype=F64)
    ids = torch.tensor([[1, 3, 4, 5, 2], [1, 4, 4, 3, 2]])
    out = dec(ids, image)
    changed = ids.clone()
    changed[:, 3:] = 6
    again = dec(changed, image)
    assert torch.allclose(out[:, :3], again[:, :3]) and not torch.allclose(out[:, 3:], again[:, 3:])
    assert not torch.allclose(dec(ids, image.flip(0))[0], out[0])


def test_caption_nll_matches_a_per_token_loop_values_and_gradients():
    dec = decoder()
    image = torch.randn(2, 5, 8, dtype=F64, requires_grad=True)
    ids = torch.tensor([[1, 3, 4, 2, 0, 0, 0], [1, 5, 5, 6, 4, 2, 0]])  # pad id 0; the last column trimmed
    nll, count = caption_nll(dec, ids, image, pad_id=0)
    want_nll, want_count = [], []
    for b in range(2):
        total, n = image.new_zeros(()), 0
        for t in range(1, 7):
            if ids[b, t] == 0:
                continue
            logits = dec(ids[b : b + 1, :t], image[b : b + 1])[0, -1]
            total = total - torch.log_softmax(logits, -1)[ids[b, t]]
            n += 1
        want_nll.append(total)
        want_count.append(n)
    assert count.tolist() == want_count == [3, 5]
    assert torch.allclose(nll, torch.stack(want_nll), atol=1e-10)
    g1 = torch.autograd.grad(nll.sum(), image)[0]
    g2 = torch.autograd.grad(torch.stack(want_nll).sum(), image)[0]
    assert torch.allclose(g1, g2, atol=1e-10)


def test_objective_weighs_the_token_mean_against_infonce():
    g = torch.Generator().manual_seed(2)
    img = F.normalize(torch.randn(4, 8, generator=g, dtype=F64), dim=-1)
    txt = F.normalize(torch.randn(4, 8, generator=g, dtype=F64), dim=-1)
    nll, count = torch.tensor([3.0, 1.0, 2.0, 6.0], dtype=F64), torch.tensor([2, 1, 3, 4])
    scale = torch.tensor(10.0, dtype=F64)
    got = build_objective("coca", caption_weight=2.0, contrastive_weight=0.5)(img, txt, scale, nll, count)
    assert math.isclose(float(got), float(0.5 * InfoNCE()(img, txt, scale) + 2.0 * 12.0 / 10), rel_tol=1e-12)
    alone = build_objective("coca", contrastive_weight=0)(img, txt, scale, nll, count)
    assert math.isclose(float(alone), 2.0 * 1.2, rel_tol=1e-12)
    with pytest.raises(UserError, match="caption_weight"):
        build_objective("coca", caption_weight=-1)


class _Model:
    def __init__(self, dec):
        self.captioner = self.caption_reader = dec


class _LateEnd(torch.nn.Module):
    """A decoder whose end token is 8 nats less likely before the second word: the best caption has words."""

    def __init__(self, dec):
        super().__init__()
        self.dec = dec

    def forward(self, ids, image):
        out = self.dec(ids, image).clone()
        out[:, :2, 2] -= 8.0
        return out

    def last_logits(self, ids, image):
        out = self.dec.last_logits(ids, image).clone()
        if ids.shape[1] <= 2:  # the last position is 0 or 1
            out[:, 2] -= 8.0
        return out


@torch.no_grad()
def test_beam_search_finds_what_brute_force_finds():
    dec = _LateEnd(decoder(vocab=5, context=5, seed=3))  # 0 pad, 1 start, 2 end, 3 and 4 words
    image = torch.randn(4, 8, dtype=F64, generator=torch.Generator().manual_seed(5))
    best, best_logp = None, -math.inf
    for k in range(0, 4):  # every caption of 0–3 words, then the end token (the context holds 5)
        for words in itertools.product([0, 1, 3, 4], repeat=k):
            seq = [1, *words, 2]
            logp = torch.log_softmax(dec(torch.tensor([seq[:-1]]), image[None])[0], -1)
            total = float(sum(logp[t, seq[t + 1]] for t in range(len(seq) - 1)))
            if total > best_logp:
                best, best_logp = list(words), total
    assert len(best) >= 2
    got, logp = beam_search(_Model(dec), image, sot=1, eot=2, beam=200, max_tokens=4)
    assert got == best and math.isclose(logp, best_logp, rel_tol=1e-12)
    seq, total = [1], 0.0  # greedy: the argmax chain, token by token, to the end token
    while len(seq) < 5 and (len(seq) == 1 or seq[-1] != 2):
        logp = torch.log_softmax(dec(torch.tensor([seq]), image[None])[0, -1], -1)
        seq.append(int(logp.argmax()))
        total += float(logp.max())
    words = seq[1:-1] if seq[-1] == 2 else seq[1:]
    got, logp = beam_search(_Model(dec), image, sot=1, eot=2, beam=1, max_tokens=4)
    assert got == words and math.isclose(logp, total, rel_tol=1e-12)


def coca_cfg(table, out, **train):
    from conftest import tiny_run_cfg

    return tiny_run_cfg(table, out, **{"objective": "coca", **train})


def test_coca_trains_and_lipkit_caption_captions_deterministically(table, tmp_path):
    from lipkit.checkpoint import load_checkpoint
    from lipkit.cli import app
    from lipkit.data.sources.registry import read_table
    from lipkit.train.launch import run_training

    _, result = run_training(coca_cfg(table, tmp_path / "run"))
    assert result.steps > 0 and math.isfinite(result.last_loss) and result.faults == 0
    logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(math.isfinite(r.get("caption_loss", math.nan)) for r in logged)
    assert load_checkpoint(tmp_path / "run" / "checkpoint")[0].has_captioner
    image = str(read_table(table)[0].image)
    args = ["caption", str(tmp_path / "run" / "checkpoint"), image, image, "--beam", "2", "--json"]
    runs = [CliRunner().invoke(app, args) for _ in range(2)]
    assert all(r.exit_code == 0 for r in runs), runs[0].output
    rows = [json.loads(x) for x in runs[0].output.splitlines()]
    assert len(rows) == 2 and rows[0]["caption"] == rows[1]["caption"] and runs[0].output == runs[1].output
    refused = CliRunner().invoke(app, ["caption", str(tmp_path / "run" / "checkpoint"), "missing.png"])
    assert refused.exit_code != 0 and "does not exist" in str(refused.exception or refused.output)


def test_a_decoder_trains_on_a_frozen_checkpoint(table, tmp_path):
    from lipkit.checkpoint import load_checkpoint
    from lipkit.train.launch import run_training

    base = tmp_path / "base"
    run_training(coca_cfg(table, base, objective="infonce"))
    assert not load_checkpoint(base / "checkpoint")[0].has_captioner
    cfg = coca_cfg(
        table,
        tmp_path / "cap",
        lock_image="all",
        lock_text="all",
        objective_args={"contrastive_weight": 0.0},
    )
    cfg.model.init_from = str(base / "checkpoint")
    run_training(cfg)
    before = load_checkpoint(base / "checkpoint")[0].state_dict()
    after = load_checkpoint(tmp_path / "cap" / "checkpoint")[0].state_dict()
    towers = [k for k in before if k.startswith(("visual.", "text."))]
    assert towers and all(torch.equal(before[k], after[k]) for k in towers)
    assert any(k.startswith("captioner.") for k in after)
    evaluated_with_another_checkpoints_clip_score(
        table, judge_of(base / "checkpoint", tmp_path), tmp_path / "cap"
    )


def judge_of(base, tmp_path):
    """A checkpoint other than the captioner, at another image size: the base's shape at 16 px more, its
    tokenizer, weights drawn afresh."""
    import dataclasses

    from lipkit.checkpoint import load_checkpoint, save_checkpoint
    from lipkit.models.dual_encoder import DualEncoder

    model, tokenizer, _ = load_checkpoint(base)
    torch.manual_seed(1)
    judge = DualEncoder(dataclasses.replace(model.spec, image_size=model.spec.image_size + 16))
    return save_checkpoint(tmp_path / "judge", judge, tokenizer)


def evaluated_with_another_checkpoints_clip_score(table, scorer_dir, run):
    """`lipkit eval` on a captioning checkpoint: BLEU-4 / CIDEr-D of its captions against the English
    references, CLIP-score by the other checkpoint (recomputed by hand), examples in the report."""
    from lipkit.checkpoint import load_checkpoint
    from lipkit.config import config_from_dict
    from lipkit.data.image_store import ImageStore
    from lipkit.data.sources.registry import read_table
    from lipkit.eval.caption_metrics import bleu, cider_d
    from lipkit.eval.report import write_report
    from lipkit.eval.report_figures import esc
    from lipkit.eval.suite import run_eval

    ev = {"caption_max_images": 5, "caption_langs": ["en"], "caption_scorer": str(scorer_dir)}
    cfg = config_from_dict({"eval": {**ev, "class_columns": ["category"], "caption_beam": 2}})
    res = run_eval(run / "checkpoint", {"train": str(table)}, cfg, run / "eval" / "results.json")
    split = res["splits"]["train"]
    shown, m = split["captions"], split["metrics"]
    records = read_table(table)
    by_path = {str(r.image): r for r in records}
    assert len(shown) == 5 and res["caption_scorer"] == str(scorer_dir.resolve())
    for s in shown:  # each image's own English captions, in order
        r = by_path[s["image"]]
        assert s["references"] == [c for c, g in zip(r.captions, r.meta["langs"], strict=True) if g == "en"]
    caps, refs = [s["caption"] for s in shown], [s["references"] for s in shown]
    assert m["captions/BLEU-4"] == pytest.approx(100 * bleu(caps, refs, smooth=True), abs=1e-10)
    assert m["captions/CIDEr-D"] == pytest.approx(100 * cider_d(caps, refs)[0], abs=1e-10)
    scorer, tok, _ = load_checkpoint(scorer_dir)
    captioner = load_checkpoint(run / "checkpoint")[0]
    assert scorer.spec.image_size != captioner.spec.image_size  # decoded at the judge's own size
    store = ImageStore([by_path[s["image"]] for s in shown], scorer.spec.image_size, cache=True)
    with torch.no_grad():
        cos = (scorer.embed_images_u8(store.get(range(5))) * scorer.encode_text(tok(caps))).sum(1)
        mine = ImageStore(store.records, captioner.spec.image_size, cache=True).get(range(5))
        own = (captioner.embed_images_u8(mine) * captioner.encode_text(tok(caps))).sum(1)
    assert m["captions/CLIP-score"] == pytest.approx(250 * cos.clamp(min=0).mean().item(), abs=1e-3)
    assert abs(250 * own.clamp(min=0).mean().item() - m["captions/CLIP-score"]) > 1e-2  # not the captioner's
    page = write_report(run, res).read_text(encoding="utf-8")
    assert "Captions (the decoder" in page and esc(shown[0]["caption"] or "references") in page


@pytest.mark.parametrize(
    "settings, named",
    [
        ({"caption_layers": 1, "caption_width": 30}, "caption_heads=4"),  # CoCa's decoder
        ({"caption_layers": 1, "caption_width": 30, "caption_input": "prefix"}, "caption_heads=4"),
        ({"match_layers": 1, "match_width": 30}, "match_heads=4"),
    ],
)
def test_a_head_count_that_does_not_divide_the_width_is_one_sentence(settings, named):
    from lipkit.errors import UserError
    from lipkit.models.dual_encoder import DualEncoder
    from lipkit.models.presets import get_spec

    with pytest.raises(UserError, match=f"width 30 must divide into model {named} heads"):
        DualEncoder(get_spec("tiny", image_size=32, **settings))
