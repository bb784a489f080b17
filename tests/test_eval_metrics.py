import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from lipkit.eval.retrieval import recall_at_k, retrieval_chance
from lipkit.eval.zeroshot import class_embeddings, zeroshot_metrics


def test_recall_matches_naive_with_multiple_relevant():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(30, 40, generator=g)
    relevant = torch.rand(30, 40, generator=g) < 0.05
    relevant[0] = False  # a query with nothing relevant never counts as a hit
    got = recall_at_k(scores, relevant, ks=(1, 5, 10))
    for k in (1, 5, 10):
        hits = 0
        for q in range(30):
            ranked = sorted(range(40), key=lambda i: -scores[q, i].item())[:k]
            hits += any(relevant[q, i] for i in ranked)
        assert math.isclose(got[f"R@{k}"], hits / 30)


def test_retrieval_chance_matches_enumeration():
    relevant = torch.zeros(2, 6, dtype=torch.bool)
    relevant[0, 0] = relevant[1, 1] = relevant[1, 2] = True
    chance = retrieval_chance(relevant, ks=(1, 2))
    # text 0: 1 of 6 relevant; text 1: 2 of 6. Enumerate all orderings' first-k sets.
    for k in (1, 2):
        probs = []
        for q in range(2):
            subsets = list(itertools.combinations(range(6), k))
            probs.append(sum(any(relevant[q, i] for i in s) for s in subsets) / len(subsets))
        assert math.isclose(chance[f"text_to_image/R@{k}"], sum(probs) / 2, rel_tol=1e-9)


def test_zeroshot_naive():
    g = torch.Generator().manual_seed(2)
    prompts = F.normalize(torch.randn(4 * 3, 8, generator=g), dim=-1)
    cls = class_embeddings(prompts, 4, 3)
    for c in range(4):
        ref = F.normalize(prompts[3 * c : 3 * c + 3].mean(0), dim=-1)
        assert torch.allclose(cls[c], ref, atol=1e-6)
    img = F.normalize(torch.randn(20, 8, generator=g), dim=-1)
    labels = torch.randint(0, 4, (20,), generator=g)
    m = zeroshot_metrics(img, cls, labels)
    pred = [(img[i] @ cls.t()).argmax().item() for i in range(20)]
    assert math.isclose(m["top1"], sum(p == y for p, y in zip(pred, labels.tolist(), strict=True)) / 20)
    assert m["top5"] == 1.0  # only 4 classes
    recalls = [
        sum(p == c for p, y in zip(pred, labels.tolist(), strict=True) if y == c)
        / sum(y == c for y in labels.tolist())
        for c in set(labels.tolist())
    ]
    assert math.isclose(m["mean_recall"], sum(recalls) / len(recalls), rel_tol=1e-6)


@pytest.mark.parametrize("keep", [0, 3])
def test_filip_evaluation_scores_pairs_token_wise(table, keep):
    """eval.similarity=filip: recall and zero-shot come from the token-wise scores of every pair,
    computed here by a naive per-pair loop over the model's own normalised tokens (with
    eval.image_tokens_kept, Wukong's: over each image's `keep` tokens most aligned with its mean token)."""
    from conftest import tiny_eval_setup
    from lipkit.config import EvalConfig
    from lipkit.eval.evaluate import evaluate_records
    from lipkit.eval.similarity_choice import resolve_similarity

    records, tok, model = tiny_eval_setup(table)
    spec = model.spec
    cfg = EvalConfig(class_columns=["category"], templates=["{}", "an emoji of {}."], image_tokens_kept=keep)
    got = evaluate_records(model, tok, records, cfg, details=False, similarity="filip")["metrics"]
    from lipkit.data.images import load_image
    from lipkit.data.transforms import normalize

    with torch.no_grad():
        x = normalize(
            torch.stack([load_image(r.image, 32) for r in records]), spec.image_mean, spec.image_std
        )
        img_tok = F.normalize(model.visual(x, return_tokens=True)[1], dim=-1)
        if keep:  # each image's `keep` tokens of highest <token, mean token>, in token order
            ranked = [
                sorted(range(t.shape[0]), key=lambda k, t=t: -float(t[k] @ t.mean(0)))[:keep] for t in img_tok
            ]
            img_tok = torch.stack([t[sorted(r)] for t, r in zip(img_tok, ranked, strict=True)])

        def words(text):
            ids = tok([text])
            t = F.normalize(model.text(ids, return_tokens=True)[1], dim=-1)[0]
            return t[ids[0] != spec.pad_id]

        def s_image(i, w):  # mean over patches of the best word
            return (img_tok[i] @ w.t()).max(1).values.mean().item()

        def s_text(i, w):  # mean over words of the best patch
            return (img_tok[i] @ w.t()).max(0).values.mean().item()

        texts = sorted({r.captions[0] for r in records})
        ws = [words(t) for t in texts]
        rel = torch.tensor([[r.captions[0] == t for r in records] for t in texts])
        t2i = torch.tensor([[s_text(i, w) for i in range(len(records))] for w in ws])
        i2t = torch.tensor([[s_image(i, w) for w in ws] for i in range(len(records))])
        assert math.isclose(got["retrieval/text_to_image/R@1"], recall_at_k(t2i, rel, ks=(1,))["R@1"])
        assert math.isclose(got["retrieval/image_to_text/R@1"], recall_at_k(i2t, rel.t(), ks=(1,))["R@1"])
        classes = sorted({r.meta["category"] for r in records})
        cls_w = [[words(t.format(c)) for t in cfg.templates] for c in classes]
        scores = torch.tensor(
            [[sum(s_image(i, w) for w in cw) / 2 for cw in cls_w] for i in range(len(records))]
        )
        labels = torch.tensor([classes.index(r.meta["category"]) for r in records])
        assert math.isclose(
            got["zeroshot/category/top1"], (scores.argmax(1) == labels).double().mean().item()
        )
    assert resolve_similarity("auto", "filip") == "filip" and resolve_similarity("auto", "infonce") == "dense"
    assert resolve_similarity("auto", "wukong") == "filip"


def test_wukong_models_are_scored_with_their_own_token_count():
    from lipkit.config import EvalConfig
    from lipkit.errors import UserError
    from lipkit.eval.similarity_choice import resolve_trained_settings

    auto = EvalConfig()
    assert resolve_trained_settings(auto, "wukong", {"image_tokens_kept": 5}).image_tokens_kept == 5
    assert resolve_trained_settings(auto, "wukong", {}).image_tokens_kept == 12  # the objective's default
    assert resolve_trained_settings(auto, "wukong", {"image_tokens_kept": None}).image_tokens_kept == 0  # all
    assert resolve_trained_settings(auto, "filip", {}).image_tokens_kept == 0
    assert resolve_trained_settings(EvalConfig(image_tokens_kept=7), "wukong", {}).image_tokens_kept == 7
    with pytest.raises(UserError, match="image_tokens_kept"):
        resolve_trained_settings(EvalConfig(image_tokens_kept=-1), "filip", {})


def test_lexical_evaluation_uses_the_lexicon_heads(table):
    """eval.similarity=lexical (LexLIP models): scores are sparse dot products of the heads' term
    weights; the mean number of non-zero terms is reported; a model without heads is refused."""
    import pytest

    from conftest import TINY_MODEL, tiny_eval_setup
    from lipkit.config import EvalConfig
    from lipkit.data.images import load_image
    from lipkit.data.transforms import normalize
    from lipkit.errors import UserError
    from lipkit.eval.evaluate import evaluate_records
    from lipkit.eval.similarity_choice import resolve_similarity
    from lipkit.models.dual_encoder import DualEncoder
    from lipkit.models.presets import get_spec

    records, tok, model = tiny_eval_setup(table, lexicon_vocab=True)
    spec = model.spec
    cfg = EvalConfig(class_columns=["category"], templates=["{}", "an emoji of {}."])
    got = evaluate_records(model, tok, records, cfg, details=False, similarity="lexical")["metrics"]
    with torch.no_grad():
        x = normalize(
            torch.stack([load_image(r.image, 32) for r in records]), spec.image_mean, spec.image_std
        )
        img = model.encode_image_lexical(x)
        texts = sorted({r.captions[0] for r in records})
        txt = model.encode_text_lexical(tok(texts))
    rel = torch.tensor([[r.captions[0] == t for r in records] for t in texts])
    assert math.isclose(got["retrieval/text_to_image/R@1"], recall_at_k(txt @ img.t(), rel, ks=(1,))["R@1"])
    assert math.isclose(got["lexicon/image_nonzero_terms"], (img > 0).sum(1).double().mean().item())
    assert resolve_similarity("auto", "lexlip") == "lexical"
    plain = DualEncoder(get_spec("tiny", **TINY_MODEL, vocab_size=tok.vocab_size, eot_id=tok.eot_id)).eval()
    with pytest.raises(UserError, match="LexLIP heads"):
        evaluate_records(plain, tok, records, cfg, details=False, similarity="lexical")


def test_retrieval_per_language_is_retrieval_among_each_languages_captions(table):
    """eval.group_by=langs: for each language, the images with a caption in it against their first such
    caption — the same numbers as an evaluation of that sub-table alone, by a naive loop over its rows."""
    from dataclasses import replace

    from conftest import tiny_eval_setup
    from lipkit.config import EvalConfig
    from lipkit.errors import UserError
    from lipkit.eval.evaluate import embed_images, embed_texts, evaluate_records

    records, tok, model = tiny_eval_setup(table, n=10)
    langs = [["en", "de"] if i % 3 else ["de", "en"] for i in range(len(records))]
    rows = [
        replace(
            r, captions=[f"{r.captions[0]}", f"ein {r.captions[0]}"][: len(ls)], meta={**r.meta, "langs": ls}
        )
        for r, ls in zip(records, langs, strict=True)
    ]
    rows[4] = replace(rows[4], captions=rows[4].captions[:1], meta={**rows[4].meta, "langs": ["fr"]})
    cfg = EvalConfig(class_columns=[], group_by="langs")
    got = evaluate_records(model, tok, rows, cfg, details=False)["metrics"]
    from lipkit.data.image_store import ImageStore

    img = embed_images(model, ImageStore(rows, model.spec.image_size, cache=True), 8)
    for lang in ("en", "de", "fr"):
        keep = [i for i, r in enumerate(rows) if lang in r.meta["langs"]]
        caps = [rows[i].captions[rows[i].meta["langs"].index(lang)] for i in keep]
        texts = sorted(set(caps))
        rel = torch.tensor([[c == t for c in caps] for t in texts])
        sims = embed_texts(model, tok, texts, 8) @ img[keep].t()
        want = recall_at_k(sims, rel)
        for k, v in want.items():
            assert math.isclose(got[f"retrieval/langs={lang}/text_to_image/{k}"], v), (lang, k)
        assert math.isclose(
            got[f"retrieval/langs={lang}/image_to_text/R@1"], recall_at_k(sims.t(), rel.t())["R@1"]
        )
    bare = [replace(r, meta={k: v for k, v in r.meta.items() if k != "langs"}) for r in rows]
    assert not any(
        k.startswith("retrieval/langs=")
        for k in evaluate_records(model, tok, bare, cfg, details=False)["metrics"]
    )  # a split without the column has no groups
    rows[0] = replace(rows[0], meta={**rows[0].meta, "langs": ["en"]})  # 1 value for 2 captions
    with pytest.raises(
        UserError, match="eval.group_by=langs: in split 'x', row .* has no 'langs' list parallel"
    ):
        evaluate_records(model, tok, rows, cfg, details=False, split="x")
