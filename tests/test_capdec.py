"""Text-only captioning (objectives/capdec.py): the loss, the per-sample noise (the same rows however a
batch is split), the decoder's input against a naive construction (noised, detached text embeddings), the
modality gap against a per-pair loop, and training from a checkpoint then captioning images."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from lipkit.models.caption_decoder import caption_nll
from lipkit.objectives import build_objective
from lipkit.objectives.capdec import sample_noise
from test_coca import coca_cfg


def test_only_a_text_only_decoder_keeps_a_noise_level():
    model, _ = _text_only_model(0.1)
    assert "captioner.noise_std" in model.state_dict()
    from lipkit.models.caption_decoder import CaptionDecoder

    assert "noise_std" not in CaptionDecoder(9, 8, 1, 2, 6, 8).state_dict()  # CoCa's checkpoints unchanged


def test_loss_is_the_token_mean_and_options_are_checked():
    obj = build_objective("capdec")
    nll = torch.tensor([3.0, 5.0, 1.0], dtype=torch.float64, requires_grad=True)
    loss = obj(text_caption_nll=nll, text_caption_tokens=torch.tensor([2, 3, 1]))
    assert math.isclose(loss.item(), 9.0 / 6.0, rel_tol=1e-15)
    for bad in (-0.1, "wide", True):
        with pytest.raises(Exception, match="noise_std"):
            build_objective("capdec", noise_std=bad)


def test_noise_rows_depend_on_the_sample_and_step_only():
    keys = torch.tensor([11, -7, 2**40, 5])
    whole = sample_noise(keys, step=3, dim=16)
    parts = torch.cat([sample_noise(keys[2:], 3, 16), sample_noise(keys[:2], 3, 16)])
    assert torch.equal(whole, parts[[2, 3, 0, 1]])  # any split or order of the batch
    assert not torch.equal(whole, sample_noise(keys, step=4, dim=16))  # a new draw each step
    many = sample_noise(torch.arange(2000), step=0, dim=8)
    assert abs(many.mean().item()) < 0.05 and abs(many.std().item() - 1) < 0.05


def _text_only_model(noise: float):
    from lipkit.models.dual_encoder import DualEncoder
    from lipkit.models.presets import get_spec
    from lipkit.text.tokenizer import TextTokenizer

    torch.manual_seed(0)
    tok = TextTokenizer.train(["a red circle", "blue square", "green star shape"] * 5, 300, 10)
    spec = get_spec(
        "tiny",
        vocab_size=tok.vocab_size,
        eot_id=tok.eot_id,
        caption_layers=1,
        caption_input="embedding",
        image_size=32,
    )
    model = DualEncoder(spec).double()
    model.captioner.noise_std.fill_(noise)
    return model, tok


@pytest.mark.parametrize("noise", [0.0, 0.25])
def test_decoder_input_is_the_noised_detached_text_embedding(noise):
    from lipkit.train.inputs import objective_inputs
    from lipkit.train.views import Views

    model, tok = _text_only_model(noise)
    ids = tok(["a red circle", "blue square", "green star shape"])
    keys = torch.tensor([4, 9, -2])
    images = torch.zeros(3, 3, 32, 32, dtype=torch.float64)
    needs = set(build_objective("capdec").inputs)
    out = objective_inputs(model, needs, images, ids, 1, Views(), tok.pad_id, keys=keys, step=7)
    text = F.normalize(model.text(ids), dim=-1).detach()
    cond = text + noise * sample_noise(keys, 7, text.shape[1]).double()
    want, count = caption_nll(model.captioner, ids, cond[:, None, :], tok.pad_id)
    assert torch.allclose(out["text_caption_nll"], want, atol=1e-12)
    assert torch.equal(out["text_caption_tokens"], count)
    out["text_caption_nll"].sum().backward()
    assert all(p.grad is None for p in model.text.parameters())  # the towers do not learn from it
    assert all(p.grad is None for p in model.visual.parameters())  # nor is the image tower run
    assert model.captioner.token_embedding.weight.grad is not None


def test_modality_gap_matches_a_per_pair_loop(table):
    from lipkit.data.image_store import ImageStore
    from lipkit.data.sources.registry import read_table
    from lipkit.models.dual_encoder import DualEncoder
    from lipkit.models.presets import get_spec
    from lipkit.text.tokenizer import TextTokenizer
    from lipkit.train.captioner_setup import modality_gap_std

    records = read_table(table)[:20]
    tok = TextTokenizer.train([c for r in records for c in r.captions], 300, 16)
    torch.manual_seed(0)
    model = DualEncoder(get_spec("tiny", vocab_size=tok.vocab_size, eot_id=tok.eot_id, image_size=32)).eval()
    got = modality_gap_std(model, tok, records)
    store = ImageStore(records, 32, cache=True)
    total = 0.0
    with torch.no_grad():
        for i, r in enumerate(records):
            x = model.embed_images_u8(store.get([i]))[0]
            t = F.normalize(model.text(tok([r.captions[0]])), dim=-1)[0]
            total += float(((x - t) ** 2).sum())
    assert math.isclose(got, math.sqrt(total / len(records) / x.shape[0]), rel_tol=1e-5)


def test_trains_on_a_checkpoint_with_the_measured_gap_and_captions_images(table, tmp_path):
    from lipkit.checkpoint import load_checkpoint
    from lipkit.cli import app
    from lipkit.data.sources.registry import read_table
    from lipkit.train.captioner_setup import modality_gap_std
    from lipkit.train.launch import run_training

    base = tmp_path / "base"
    run_training(coca_cfg(table, base, objective="infonce"))
    cfg = coca_cfg(table, tmp_path / "text-only", objective="capdec", lock_image="all", lock_text="all")
    cfg.model.init_from = str(base / "checkpoint")
    run_training(cfg)
    start, tok, _ = load_checkpoint(base / "checkpoint")
    model = load_checkpoint(tmp_path / "text-only" / "checkpoint")[0]
    assert model.spec.caption_input == "embedding"
    want = modality_gap_std(start, tok, read_table(table))
    assert math.isclose(float(model.captioner.noise_std), want, rel_tol=1e-5)
    before, after = start.state_dict(), model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("visual.", "text.")))
    image = str(read_table(table)[0].image)
    run = CliRunner().invoke(app, ["caption", str(tmp_path / "text-only" / "checkpoint"), image, "--json"])
    assert run.exit_code == 0, run.output
    row = json.loads(run.output.splitlines()[0])
    assert row["path"] == image
    # it captions from the normalised image embedding, in place of the text embedding it trained on
    from lipkit.data.images import load_image
    from lipkit.eval.captioning import beam_search
    from lipkit.eval.token_similarity import pooled_and_tokens

    with torch.no_grad():
        pooled, _ = pooled_and_tokens(model.eval(), load_image(image, model.spec.image_size)[None])
    ids, logp = beam_search(model, pooled[0, None], tok.sot_id, tok.eot_id, 3, model.spec.context_length - 1)
    assert row["caption"] == tok.decode(ids) and math.isclose(row["log_prob"], round(logp, 4), abs_tol=1e-4)
    # without a starting checkpoint there are no trained embeddings to learn from: refused
    cfg = coca_cfg(table, tmp_path / "scratch", objective="capdec")
    with pytest.raises(Exception, match="model.init_from"):
        run_training(cfg)
    # a token-reading objective refuses the text-only decoder
    cfg = coca_cfg(table, tmp_path / "coca", objective="coca")
    cfg.model.init_from = str(tmp_path / "text-only" / "checkpoint")
    with pytest.raises(Exception, match="reading image tokens"):
        run_training(cfg)


def test_maccap_sampling_keeps_the_candidate_the_towers_match_best():
    from lipkit.errors import UserError
    from lipkit.eval.captioning import beam_search, caption_images
    from lipkit.eval.token_similarity import pooled_and_tokens

    model, tok = _text_only_model(0.5)
    model = model.float().eval()
    images = torch.randint(
        0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(4)
    )
    got = caption_images(model, tok, images, beam=2, max_tokens=5, samples=4, seed=7)
    assert got == caption_images(model, tok, images, beam=2, max_tokens=5, samples=4, seed=7)  # deterministic
    alone = caption_images(model, tok, images[1:2], beam=2, max_tokens=5, samples=4, seed=7)
    assert alone[0] == got[1]  # the same noise for every image: the batch does not matter
    pooled, _ = pooled_and_tokens(model, images)
    noise = 0.5 * torch.randn(4, 1, pooled.shape[1], generator=torch.Generator().manual_seed(7))
    chosen_somewhere_else = False
    with torch.no_grad():
        for b in range(3):  # by hand: decode e and its 4 noised copies, keep the best cosine with e
            inputs = [pooled[b, None]] + [pooled[b, None] + n for n in noise]
            caps = [tok.decode(beam_search(model, x, tok.sot_id, tok.eot_id, 2, 5)[0]) for x in inputs]
            sims = [float(model.encode_text(tok([c]))[0] @ pooled[b]) for c in caps]
            best = max(range(5), key=lambda i: (sims[i], -i))
            assert got[b]["caption"] == caps[best]
            chosen_somewhere_else |= best > 0
    plain = caption_images(model, tok, images, beam=2, max_tokens=5)
    assert (
        chosen_somewhere_else and plain != got
    )  # a noised candidate won somewhere: sampling changed a caption
    with pytest.raises(UserError, match="without noise"):
        caption_images(_text_only_model(0.0)[0].float(), tok, images, samples=2)
