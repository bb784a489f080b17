"""Adversarial evaluation (lipkit.attack): PGD's projections and budgets, its losses against loops and their
gradients against finite differences on a tiny model, ε = 0 reproducing eval's clean metrics exactly, and
`lipkit attack` end to end."""

import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from lipkit.attack.pgd import pgd, project, retrieval_loss, toward, zeroshot_loss
from lipkit.errors import UserError


def _tiny(table):
    from conftest import tiny_eval_setup

    records, tok, model = tiny_eval_setup(table, n=12)
    return records, tok, model.double().requires_grad_(False)


def test_projection_keeps_each_image_inside_its_ball():
    torch.manual_seed(0)
    delta = torch.randn(3, 3, 4, 4)
    assert project(delta, 0.1, "linf").abs().max() <= 0.1
    norms = project(delta, 0.5, "l2").flatten(1).norm(dim=1)
    assert torch.allclose(norms, torch.full((3,), 0.5))
    small = delta * 1e-3
    assert torch.equal(project(small, 0.5, "l2"), small)  # inside: unchanged


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_stays_within_budget_and_image_range_and_raises_the_loss(norm):
    torch.manual_seed(1)
    w = torch.randn(3 * 4 * 4, dtype=torch.float64)
    loss = lambda x: (x.flatten(1) @ w).sin() + (x.flatten(1) @ w)  # noqa: E731  a smooth loss to ascend
    x = torch.rand(5, 3, 4, 4, dtype=torch.float64)
    eps = 8 / 255 if norm == "linf" else 0.5
    adv = pgd(loss, x, eps, 10, eps / 4, norm, torch.Generator().manual_seed(0))
    delta = (adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-12).all() and adv.min() >= 0 and adv.max() <= 1
    assert (loss(adv) > loss(x)).all()
    again = pgd(loss, x, eps, 10, eps / 4, norm, torch.Generator().manual_seed(0))
    assert torch.equal(adv, again)  # one seed, one attack
    assert torch.equal(pgd(loss, x, 0.0, 10, 0.1, norm, torch.Generator()), x)


def test_8_bit_images_never_move_a_pixel_further_than_pgd_did():
    torch.manual_seed(2)
    clean = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    x = clean.double() / 255
    for eps in (2 / 255, 1.5 / 255, 0.0123):  # whole levels or not
        adv = (x + (torch.rand_like(x) * 2 - 1) * eps).clamp(0, 1)
        moved = toward(clean, adv).double() / 255 - x
        slack = 1e-3 / 255  # a level short by float error counts as the level
        assert (moved.abs() <= (adv - x).abs() + slack).all() and (moved.abs() <= eps + slack).all()
        assert (moved * (adv - x) >= 0).all()  # the same direction as PGD's change
    assert torch.equal(toward(clean, x), clean)
    short = x + 0.9999999 / 255  # PGD at a whole level, one float ulp short of it: the level, not nothing
    assert torch.equal(toward(clean, short.clamp(0, 1)).int() - clean.int(), (clean < 255).int())


def test_losses_are_their_per_image_formulas_with_finite_difference_gradients(table):
    records, tok, model = _tiny(table)
    torch.manual_seed(3)
    x = torch.rand(3, 3, model.spec.image_size, model.spec.image_size, dtype=torch.float64)
    classes = F.normalize(torch.randn(4, model.spec.embed_dim, dtype=torch.float64), dim=-1)
    labels = torch.tensor([0, 2, 3])
    texts = F.normalize(torch.randn(5, model.spec.embed_dim, dtype=torch.float64), dim=-1)
    own = [[0], [1, 4], [2]]
    zs, rt = zeroshot_loss(model, classes, labels), retrieval_loss(model, texts, own)
    mean = torch.tensor(model.spec.image_mean, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(model.spec.image_std, dtype=torch.float64).view(3, 1, 1)
    t = model.scale()
    for i in range(3):  # one image at a time
        f = F.normalize(model.visual(((x[i] - mean) / std)[None]), dim=-1)[0]
        z = t * classes @ f
        assert torch.allclose(zs(x)[i], -torch.log_softmax(z, 0)[labels[i]], atol=1e-10)
        p = torch.softmax(t * texts @ f, 0)
        assert torch.allclose(rt(x)[i], -p[own[i]].sum().log(), atol=1e-10)
    for loss in (zs, rt):
        xg = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss(xg).sum(), xg)
        gen = torch.Generator().manual_seed(4)
        for _ in range(3):  # directional derivatives along random directions
            v = torch.randn(x.shape, generator=gen, dtype=torch.float64)
            h = 1e-5
            numeric = (loss(x + h * v).sum() - loss(x - h * v).sum()) / (2 * h)
            assert torch.allclose((grad * v).sum(), numeric, rtol=1e-5, atol=1e-8)


def _attack(args):
    from lipkit.cli import app

    return CliRunner().invoke(app, ["attack", *map(str, args)])


@pytest.mark.parametrize("task", ["zeroshot", "retrieval"])
def test_eps_zero_reproduces_evals_clean_metrics_exactly(table, tmp_path, task):
    from lipkit.attack.run import attack_split
    from lipkit.checkpoint import save_checkpoint
    from lipkit.config_eval import EvalConfig
    from lipkit.data.records import spread_subset
    from lipkit.data.sources.registry import read_table
    from lipkit.eval.evaluate import evaluate_records

    _, tok, model = _tiny(table)
    save_checkpoint(tmp_path / "ckpt", model.float(), tok)
    clean = attack_split(tmp_path / "ckpt", table, tmp_path / "a", task=task, eps=0.0, limit=24, batch_size=8)
    assert clean["attacked"] == clean["clean"] and clean["success_rate"] in (0.0, None)
    assert clean["largest_perturbation"] == 0.0
    cfg = EvalConfig(  # eval's function on its own store of the same rows: the same numbers
        class_columns=["subcategory"] if task == "zeroshot" else [],
        linear_probe="",
        rerank_top=0,
        batch_size=8,
    )
    own = evaluate_records(model.float(), tok, spread_subset(read_table(table), 24), cfg, details=False)
    assert clean["clean"] == own["metrics"]
    attacked = attack_split(
        tmp_path / "ckpt", table, tmp_path / "b", task=task, eps=32 / 255, steps=5, limit=24, batch_size=8
    )
    assert attacked["clean"] == clean["clean"]
    assert attacked["largest_perturbation"] <= 32 / 255 + 1e-6
    key = "zeroshot/subcategory/top1" if task == "zeroshot" else "retrieval/image_to_text/R@1"
    assert attacked["attacked"][key] < attacked["clean"][key] and attacked["success_rate"] > 0


def test_the_cli_reports_clean_and_attacked_and_refuses_in_one_sentence(table, tmp_path):
    from lipkit.checkpoint import save_checkpoint

    _, tok, model = _tiny(table)
    save_checkpoint(tmp_path / "ckpt", model.float(), tok)
    r = _attack(
        [tmp_path / "ckpt", table, tmp_path / "out", "--eps", "4/255", "--steps", "2", "--limit", "16"]
    )
    assert r.exit_code == 0, r.output + repr(r.exception)
    shown = json.loads(next(line for line in r.output.splitlines() if line.startswith("{")))
    assert set(shown) >= {"images", "success_rate", "zeroshot/subcategory/top1"}
    saved = json.loads((tmp_path / "out" / "attack.json").read_text())
    assert saved["settings"]["eps"] == pytest.approx(4 / 255) and saved["images"] == 16
    for args, needle in (
        (["--eps", "two"], "--eps must be a number"),
        (["--norm", "l3"], "--norm must be one of"),
        (["--column", "nope"], "Column 'nope'"),
        (["--step-size", "-1/255"], "--step-size must be more than 0"),
    ):
        r = _attack([tmp_path / "ckpt", table, tmp_path / "x", "--limit", "4", *args])
        assert r.exit_code != 0 and isinstance(r.exception, UserError), r.output
        assert needle in str(r.exception)


def test_the_contrastive_loss_and_the_farthest_captions_are_their_loops():
    from lipkit.attack.universal import contrastive_loss, farthest

    torch.manual_seed(5)
    adv = F.normalize(torch.randn(3, 8, dtype=torch.float64), dim=-1)
    texts = F.normalize(torch.randn(6, 8, dtype=torch.float64), dim=-1)
    relevant = torch.tensor(
        [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 0], [0, 0, 0, 1], [0, 1, 0, 1]]
    )
    relevant = relevant.bool()  # (T, N): which pool image each caption describes
    far_rows = farthest(adv, texts, relevant)
    for i in range(3):
        means = [
            float(sum(adv[i] @ texts[j] for j in range(6) if relevant[j, n]) / relevant[:, n].sum())
            for n in range(4)
        ]
        assert int(far_rows[i]) == min(range(4), key=means.__getitem__)
    own, far = relevant[:, [0, 2, 3]].t(), relevant[:, far_rows].t()
    got = contrastive_loss(adv, texts, own, far, 0.1)
    for i in range(3):
        e = [torch.exp(adv[i] @ texts[j] / 0.1) for j in range(6)]
        g = sum(e[j] for j in range(6) if far[i, j])
        p = sum(e[j] for j in range(6) if own[i, j])
        assert torch.allclose(got[i], -torch.log(g / (g + p)), atol=1e-10)


def test_the_learned_universal_perturbation_beats_random_noise_on_its_own_objective(table):
    from lipkit.attack.pgd import embeddings
    from lipkit.attack.universal import (
        UniversalSettings,
        contrastive_loss,
        farthest,
        learn_universal,
        random_perturbation,
    )
    from lipkit.data.image_store import ImageStore
    from lipkit.eval.embedding import embed_texts
    from lipkit.eval.evaluate import RetrievalTexts

    records, tok, model = _tiny(table)
    model = model.float()
    store = ImageStore(records, model.spec.image_size, cache=True, desc="test")
    s = UniversalSettings(eps=16 / 255, steps=30, batch_size=6)
    delta, losses = learn_universal(model, tok, store, s)
    again, _ = learn_universal(model, tok, store, s)
    assert torch.equal(delta, again) and delta.abs().max() <= s.eps + 1e-7 and len(losses) == 30
    pool = RetrievalTexts.of(store.records, 0)
    texts = embed_texts(model, tok, pool.texts, 64).float()
    x = store.get(range(len(records))).float() / 255

    def objective(d):  # C-PGC's loss over every image, without the noise augmentation
        with torch.no_grad():
            clean = F.normalize(embeddings(model, x), dim=-1)
            adv = F.normalize(embeddings(model, (x + d).clamp(0, 1)), dim=-1)
            far = pool.relevant[:, farthest(clean, texts, pool.relevant)].t()
            cl = contrastive_loss(adv, texts, pool.relevant.t(), far, s.tau)
            return (cl - (adv - clean).pow(2).sum(1)).mean()

    assert objective(delta) < objective(random_perturbation(tuple(delta.shape), s.eps, 1)) - 0.05


def test_uap_writes_the_random_baseline_the_perturbation_and_a_gallery(table, tmp_path):
    from lipkit.checkpoint import save_checkpoint

    _, tok, model = _tiny(table)
    save_checkpoint(tmp_path / "ckpt", model.float(), tok)
    args = [tmp_path / "ckpt", table, tmp_path / "u", "--method", "uap", "--train", table, "--eps", "8/255"]
    r = _attack([*args, "--steps", "3", "--batch-size", "8", "--limit", "16", "--gallery", "4"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    saved = json.loads((tmp_path / "u" / "attack.json").read_text())
    assert set(saved) >= {"clean", "attacked", "random", "success_rate", "random_success_rate", "universal"}
    assert saved["largest_perturbation"] <= 8 / 255 + 1e-6
    assert torch.load(tmp_path / "u" / "perturbation.pt").shape == (
        3,
        model.spec.image_size,
        model.spec.image_size,
    )
    page = (tmp_path / "u" / "report.html").read_text()
    assert page.count("<figure") == 1 + 3 * 4 and "random noise of the same" in page
    r = _attack([tmp_path / "ckpt", table, tmp_path / "v", "--method", "uap", "--limit", "4"])
    assert isinstance(r.exception, UserError) and "--train TABLE" in str(r.exception)


def test_sga_loss_is_the_set_sum_over_scales_with_finite_difference_gradients(table):
    from lipkit.attack.sga import padded, scaled_copies, set_loss

    _, _, model = _tiny(table)
    size = model.spec.image_size
    torch.manual_seed(6)
    x = torch.rand(2, 3, size, size, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    assert torch.allclose(scaled_copies(x, [1.0], gen, noise=0.0)[2:], x, atol=1e-12)  # scale 1: itself
    sets = [F.normalize(torch.randn(k, model.spec.embed_dim, dtype=torch.float64), dim=-1) for k in (3, 1)]
    guide, mask = padded(sets)
    assert mask.tolist() == [[True, True, True], [True, False, False]]
    scales = (0.5, 1.5)
    loss = set_loss(model, guide, mask, gen, scales, noise=0.0)
    mean = torch.tensor(model.spec.image_mean, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(model.spec.image_std, dtype=torch.float64).view(3, 1, 1)
    for i in range(2):  # one image, one scale, one text at a time
        views = [x[i : i + 1]]
        for s in scales:
            small = F.interpolate(views[0], size=(round(size * s),) * 2, mode="bicubic", antialias=s < 1)
            views.append(F.interpolate(small.clamp(0, 1), size=(size, size), mode="bicubic", antialias=s > 1))
        want = 0.0
        for v in views:
            f = F.normalize(model.visual((v - mean) / std), dim=-1)[0]
            want = want - sum(float(f @ t) for t in sets[i])
        assert abs(float(loss(x)[i]) - want) < 1e-10
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(xg).sum(), xg)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    numeric = (loss(x + 1e-5 * v).sum() - loss(x - 1e-5 * v).sum()) / 2e-5
    assert torch.allclose((grad * v).sum(), numeric, rtol=1e-5, atol=1e-8)


def test_transfer_to_itself_is_the_white_box_result_and_saved_images_score_the_same(table, tmp_path):
    from lipkit.attack.run import attack_split
    from lipkit.checkpoint import save_checkpoint
    from lipkit.config_eval import EvalConfig
    from lipkit.data.sources.registry import read_table
    from lipkit.eval.evaluate import evaluate_records

    _, tok, model = _tiny(table)
    save_checkpoint(tmp_path / "ckpt", model.float(), tok)
    for method in ("sga", "pgd"):
        r = attack_split(
            tmp_path / "ckpt",
            table,
            tmp_path / method,
            method=method,
            eps=16 / 255,
            steps=3,
            limit=16,
            batch_size=8,
            transfer=[str(tmp_path / "ckpt")],
            save_images=True,
        )
        assert r["largest_perturbation"] <= 16 / 255 + 1e-6
        (same,) = r["transfer"]
        assert same["clean"] == r["clean"] and same["attacked"] == r["attacked"]
        assert same["success_rate"] == r["success_rate"]
        saved = read_table(tmp_path / method / "adversarial.jsonl")  # the split as a table any tool reads
        assert len(saved) == 16 and all(x.image.parent.name == "adversarial" for x in saved)
        cfg = EvalConfig(class_columns=["subcategory"], linear_probe="", rerank_top=0, batch_size=8)
        again = evaluate_records(model.float(), tok, saved, cfg, details=False)["metrics"]
        assert again == r["attacked"]
    page = (tmp_path / "pgd" / "report.html").read_text()
    assert "Transfer: the same images on other checkpoints" in page
    r = _attack([tmp_path / "ckpt", table, tmp_path / "y", "--method", "sga", "--norm", "l2", "--limit", "4"])
    assert isinstance(r.exception, UserError) and "--norm linf" in str(r.exception)


def test_stores_are_resized_for_a_target_of_another_image_size(table):
    from lipkit.attack.scoring import resized
    from lipkit.data.image_store import ImageStore
    from lipkit.data.sources.registry import read_table

    store = ImageStore(read_table(table)[:3], 32, cache=True, desc="test")
    assert resized(store, 32) is store
    before = store.cache.clone()
    small = resized(store, 16)
    want = F.interpolate(before.float(), size=(16, 16), mode="bilinear", antialias=True).round().clamp(0, 255)
    assert small.cache.dtype == torch.uint8 and torch.equal(small.cache, want.to(torch.uint8))
    assert torch.equal(store.cache, before) and small.size == 16 and store.size == 32


def test_word_substitution_keeps_to_its_budget_and_never_lowers_the_loss(table):
    from lipkit.attack.words import Vocabulary, WordSettings, caption_losses, substitute
    from lipkit.data.image_store import ImageStore
    from lipkit.eval.embedding import embed_images, embed_texts

    records, tok, model = _tiny(table)
    model = model.float()
    store = ImageStore(records, model.spec.image_size, cache=True, desc="test")
    images = embed_images(model, store, 8)
    vocab = Vocabulary(model, tok)
    assert vocab.words and all(w.isalpha() and len(w) > 1 for w in vocab.words)
    assert all(
        vocab.tok.encode(w, add_special_tokens=False).ids == [int(i)]
        for w, i in zip(vocab.words, vocab.ids, strict=True)
    )
    near = vocab.nearest(vocab.words[0], 5)
    assert len(near) == 5 and vocab.words[0] not in near
    captions = [r.captions[0] for r in records[:6]]
    own = torch.eye(len(records), dtype=torch.bool)[:6]
    got = caption_losses(model, tok, captions, own, images, 8)
    emb = embed_texts(model, tok, captions, 8).float()
    for j in range(6):  # the retrieval loss of each caption as a query, one at a time
        p = torch.softmax(model.scale().float() * images @ emb[j], 0)
        assert torch.allclose(got[j], -p[j].log(), atol=1e-5)
    s = WordSettings(words=1, candidates=4)
    for j, caption in enumerate(captions):
        adv = substitute(model, tok, vocab, caption, own[j], images, s)
        before, after = caption.split(), adv.split()
        assert len(after) == len(before) and sum(a != b for a, b in zip(before, after, strict=True)) <= 1
        losses = caption_losses(model, tok, [caption, adv], own[j].expand(2, -1), images, 8)
        assert losses[1] >= losses[0] - 1e-6
        if adv != caption:  # the kept word is the best of its word's candidates
            i = next(k for k, (a, b) in enumerate(zip(before, after, strict=True)) if a != b)
            options = vocab.nearest(before[i], 4)
            tried = [" ".join(before[:i] + [w] + before[i + 1 :]) for w in options]
            all_losses = caption_losses(model, tok, tried, own[j].expand(len(tried), -1), images, 8)
            assert after[i] == options[int(all_losses.argmax())]


def test_the_words_attack_scores_the_split_with_its_adversarial_captions(table, tmp_path):
    from lipkit.checkpoint import save_checkpoint

    _, tok, model = _tiny(table)
    save_checkpoint(tmp_path / "ckpt", model.float(), tok)
    r = _attack(
        [
            tmp_path / "ckpt",
            table,
            tmp_path / "w",
            "--method",
            "words",
            "--task",
            "retrieval",
            "--limit",
            "16",
        ]
    )
    assert r.exit_code == 0, r.output + repr(r.exception)
    saved = json.loads((tmp_path / "w" / "attack.json").read_text())
    for sub in saved["substitutions"]:  # one word changed, the others as they were
        before, after = sub["caption"].split(), sub["adversarial"].split()
        assert len(before) == len(after) and sum(a != b for a, b in zip(before, after, strict=True)) == 1
    from lipkit.data.records import spread_subset
    from lipkit.data.sources.registry import read_table

    clean = {r.captions[0] for r in spread_subset(read_table(table), 16)}  # the split attacked
    produced = [p["adversarial"] for p in saved["substitutions"]]
    assert len(set(produced)) == len(produced) and not set(produced) & clean  # no query merged or borrowed
    assert "Changed captions" in (tmp_path / "w" / "report.html").read_text()
    for args, needle in (
        (["--method", "words", "--limit", "4"], "--task retrieval"),
        (["--method", "words", "--task", "retrieval", "--save-images"], "drop --transfer and --save-images"),
        (["--transfer", tmp_path / "nowhere"], "nowhere"),
        (["--method", "uap", "--train", table, "--steps", "0"], "--steps ≥ 1"),
    ):
        r = _attack([tmp_path / "ckpt", table, tmp_path / "z", "--limit", "4", *args])
        assert isinstance(r.exception, UserError) and needle in str(r.exception), (args, r.output)
    assert not (tmp_path / "z" / "attack.json").exists()
    bare = tmp_path / "bare.jsonl"  # a --train table without captions
    rows = [json.loads(line) for line in table.read_text().splitlines()[:8]]
    bare.write_text(
        "".join(
            json.dumps({**row, "image": str(table.parent / row["image"]), "captions": []}) + "\n"
            for row in rows
        )
    )
    r = _attack(
        [
            tmp_path / "ckpt",
            table,
            tmp_path / "b",
            "--limit",
            "4",
            "--method",
            "uap",
            "--train",
            bare,
            "--steps",
            "1",
        ]
    )
    assert isinstance(r.exception, UserError) and "has no usable rows" in str(r.exception), r.output
