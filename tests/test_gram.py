"""GRAM (adapt.gram, models.gradient_regulator, adapt.meta_tasks) and Omniview (adapt.omniview): the
regulator against its formula, the first-order meta-gradient against finite differences, the tasks, the
neutral settings against CoOp, and both methods through `lipkit adapt` into checkpoints that load back with
their adapter (eval's reading of coop and clip-adapter checkpoints: tests/test_adapt_methods.py)."""

import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from conftest import TINY_MODEL
from lipkit.adapt.gram import MetaSettings, load_meta, meta_objective, save_meta, task_loss
from lipkit.adapt.meta_tasks import Concepts, Task, sample_pair, spherical_kmeans
from lipkit.adapt.omniview import Views, view_losses
from lipkit.errors import UserError
from lipkit.models.gradient_regulator import GradientRegulator, RegulatedSGD
from lipkit.models.image_adapter import ImageAdapter


def _tiny(table, context_length=32):
    from lipkit.data.sources.registry import read_table
    from lipkit.models.dual_encoder import DualEncoder
    from lipkit.models.presets import get_spec
    from lipkit.text.tokenizer import TextTokenizer

    records = read_table(table)
    tok = TextTokenizer.train([c for r in records for c in r.captions], 400, context_length)
    torch.manual_seed(0)
    spec = get_spec(
        "tiny", **TINY_MODEL, vocab_size=tok.vocab_size, eot_id=tok.eot_id, context_length=context_length
    )
    return records, tok, DualEncoder(spec).eval()


def _saved_base(table, tmp_path):
    """The tiny model and tokenizer, saved as the checkpoint tmp_path/base that the adaptations start from."""
    from lipkit.checkpoint import save_checkpoint

    _, tok, model = _tiny(table)
    save_checkpoint(tmp_path / "base", model, tok)
    return tok, model


def _regulator(size=6, rank=3, seed=1):
    torch.manual_seed(seed)
    reg = GradientRegulator(size, rank).double()
    with torch.no_grad():  # away from the identity start
        reg.up.normal_()
        reg.bias.normal_()
    return reg


def test_regulator_starts_as_the_identity_and_is_its_formula_with_gradients():
    g = torch.randn(2, 3, dtype=torch.float64)
    assert torch.equal(GradientRegulator(6).double()(g), g)
    reg = _regulator()
    got = reg(g)
    flat, norm = g.flatten(), g.norm()
    for p in range(6):  # element by element: g_p · 2σ(Σ_r U_pr Σ_q V_rq g_q/‖g‖ + b_p)
        z = sum(reg.up[p, r] * sum(reg.down[r, q] * flat[q] / norm for q in range(6)) for r in range(3))
        assert abs(got.flatten()[p] - flat[p] * 2 * torch.sigmoid(z + reg.bias[p])).item() < 1e-12

    def psi(up, bias, x):
        return torch.func.functional_call(reg, {"up": up, "bias": bias}, (x,))

    inputs = (reg.up.detach().clone(), reg.bias.detach().clone(), g.clone())
    assert torch.autograd.gradcheck(psi, tuple(t.requires_grad_() for t in inputs))


def test_regulated_sgd_steps_along_the_regulated_gradient():
    reg = _regulator()
    theta = torch.nn.Parameter(torch.randn(2, 3, dtype=torch.float64))
    before = theta.detach().clone()
    theta.grad = torch.randn(2, 3, dtype=torch.float64)
    RegulatedSGD(theta, reg, lr=0.5).step()
    assert torch.allclose(theta.detach(), before - 0.5 * reg(theta.grad))
    assert not torch.allclose(reg(theta.grad), theta.grad)  # the step is not plain SGD's


def test_spherical_kmeans_finds_separated_groups():
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(3, 8, generator=g), dim=-1)
    x = F.normalize(centres.repeat_interleave(10, 0) + 0.05 * torch.randn(30, 8, generator=g), dim=-1)
    assign = spherical_kmeans(x, 3, seed=0)
    groups = {tuple(assign[i * 10 : (i + 1) * 10].tolist()) for i in range(3)}
    assert all(len(set(gr)) == 1 for gr in groups) and len({gr[0] for gr in groups}) == 3


def _concepts(model, tok, n=8, per=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    captions = [f"thing {i}" for i in range(n)]
    images = F.normalize(torch.randn(n * per, model.spec.embed_dim, generator=g), dim=-1)
    owner = torch.arange(n).repeat_interleave(per)
    return Concepts(captions, tok([f"{c}." for c in captions]), images, owner, torch.arange(n) % 2, 0)


def test_tasks_come_from_two_domains_with_their_own_images(table):
    _, tok, model = _tiny(table)
    concepts = _concepts(model, tok)
    support, query = sample_pair(concepts, ways=3, shots=2, g=torch.Generator().manual_seed(0))
    assert set(concepts.domain[support.concepts].tolist()) != set(concepts.domain[query.concepts].tolist())
    for task in (support, query):
        assert len(set(concepts.domain[task.concepts].tolist())) == 1  # one domain per task
        assert len(task.concepts) == 3 and len(task.images) == 6
        assert torch.equal(concepts.owner[task.images], task.concepts[task.labels])


def test_task_loss_is_the_per_image_cross_entropy(table):
    _, tok, model = _tiny(table)
    concepts = _concepts(model, tok)
    task = Task(torch.tensor([0, 4, 5]), torch.tensor([0, 1]), torch.tensor([0, 1, 1]))
    context = 0.02 * torch.randn(1, 2, model.text.word_width)
    got = task_loss(model, concepts, task, context)
    from lipkit.models.prompt_context import prompted_features

    terms = []
    for i, label in zip(task.images.tolist(), task.labels.tolist(), strict=True):
        text = [
            F.normalize(prompted_features(model.text, concepts.ids[c][None], context)[0], dim=0)
            for c in (0, 1)
        ]
        logits = torch.stack([model.scale() * concepts.images[i] @ t for t in text])
        terms.append(-torch.log_softmax(logits, 0)[label])
    assert abs(got.item() - torch.stack(terms).mean().item()) < 1e-5


def test_first_order_meta_gradient_matches_finite_differences_with_the_support_gradient_held(table):
    """∂L_Q(θ − αψ_φ(g))/∂θ and ∂/∂φ with g = ∇L_S(θ) held, against central differences (float64)."""
    _, tok, model = _tiny(table)
    model.double()
    concepts = _concepts(model, tok)
    concepts.images = concepts.images.double()
    s = MetaSettings(inner_lr=0.7)
    pairs = [sample_pair(concepts, 3, 2, torch.Generator().manual_seed(2))]
    theta = (0.05 * torch.randn(1, 2, model.text.word_width, dtype=torch.float64)).requires_grad_(True)
    reg = _regulator(theta.numel(), 2)
    meta_objective(model, concepts, pairs, theta, reg, s).backward()
    held = theta.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(task_loss(model, concepts, pairs[0][0], held), held)

    def objective():
        with torch.no_grad():
            return task_loss(model, concepts, pairs[0][1], theta - s.inner_lr * reg(grad)).item()

    for tensor, where in ((theta, (0, 1, 3)), (reg.bias, (5,)), (reg.up, (4, 1))):
        eps = 1e-6
        with torch.no_grad():
            tensor[where] += eps
            up = objective()
            tensor[where] -= 2 * eps
            down = objective()
            tensor[where] += eps
        assert abs((up - down) / (2 * eps) - tensor.grad[where].item()) < 1e-6
    assert reg.bias.grad.abs().sum() > 0


def test_meta_file_errors_are_one_sentence(tmp_path):
    with pytest.raises(UserError, match="holds no gram.pt"):
        load_meta(tmp_path, 8)
    save_meta(
        tmp_path,
        torch.zeros(1, 2, 8),
        GradientRegulator(16, 2),
        {"rank": 2, "inner_lr": 1.0, "inner_steps": 1},
    )
    with pytest.raises(UserError, match="16-wide|8-wide"):
        load_meta(tmp_path, 16)
    (tmp_path / "gram.pt").write_text("not a tensor file")
    with pytest.raises(UserError, match="not a GRAM meta-training file"):
        load_meta(tmp_path, 8)


def _adapt(args):
    from lipkit.cli import app

    r = CliRunner().invoke(app, ["adapt", *map(str, args)])
    assert r.exit_code == 0, r.output + repr(r.exception)
    return json.loads(next(line for line in r.output.splitlines() if line.startswith("{")))


def test_gram_meta_then_gram_through_the_cli(table, tmp_path):
    from lipkit.checkpoint import load_checkpoint, save_checkpoint
    from lipkit.cli import app

    tok, model = _saved_base(table, tmp_path)
    meta = _adapt(
        [
            tmp_path / "base",
            tmp_path / "meta",
            "--method",
            "gram-meta",
            "--data",
            table,
            "--steps",
            "6",
            "--ways",
            "4",
            "--shots",
            "2",
            "--domains",
            "2",
            "--context-init",
            "",
            "--context",
            "3",
        ]
    )
    assert meta["concepts"] >= 4 and meta["domains"] == 2 and len(meta["meta_objective"]) == 2
    assert (tmp_path / "meta" / "gram.pt").is_file()
    common = ["--data", table, "--column", "category", "--shots", "2", "--steps", "5", "--classes", "base"]
    info = _adapt(
        [tmp_path / "base", tmp_path / "gram", "--method", "gram", "--meta", tmp_path / "meta", *common]
    )
    assert info["method"] == "gram" and info["regulate"] and info["lr"] == 1.0 and info["context"] == 3
    steps_at = common.index("--steps")
    as_meta = [*common[:steps_at], *common[steps_at + 2 :]]
    inner = _adapt(
        [tmp_path / "base", tmp_path / "g1", "--method", "gram", "--meta", tmp_path / "meta", *as_meta]
    )
    assert inner["steps"] == 1 and inner["lr"] == 1.0  # the meta-training's inner loop by default
    adapted, _, config = load_checkpoint(tmp_path / "gram" / "checkpoint")
    assert config["model"]["adapter"]["method"] == "coop"
    start = torch.load(tmp_path / "meta" / "gram.pt", weights_only=True)["context"]
    assert not torch.equal(adapted.adapter.context.detach(), start)
    r = CliRunner().invoke(
        app, ["adapt", str(tmp_path / "base"), str(tmp_path / "x"), "--method", "gram", *map(str, common)]
    )
    assert r.exit_code != 0 and "--meta DIR" in str(r.exception)
    save_checkpoint(tmp_path / "other", model, tok)  # the same weights elsewhere: another checkpoint
    other = [
        str(tmp_path / "other"),
        str(tmp_path / "y"),
        "--method",
        "gram",
        "--meta",
        str(tmp_path / "meta"),
    ]
    r = CliRunner().invoke(app, ["adapt", *other, *map(str, common)])
    assert r.exit_code != 0 and "was meta-trained on the checkpoint" in str(r.exception)
    assert not (tmp_path / "y").exists()


def test_gram_unregulated_from_a_phrase_is_coop(table, tmp_path):
    """A meta file holding the phrase's own word embeddings, fine-tuned with --no-regulate, is CoOp from that
    phrase at the same steps and learning rate."""
    from lipkit.adapt.learners import CoopLearner
    from lipkit.adapt.run import adapt_checkpoint
    from lipkit.checkpoint import load_checkpoint

    tok, model = _saved_base(table, tmp_path)
    phrase = CoopLearner(model, tok, [], 0, "a", False).context.context.detach()
    save_meta(
        tmp_path / "meta",
        phrase,
        GradientRegulator(phrase.numel(), 2),
        {"rank": 2, "inner_lr": 1.0, "inner_steps": 1},
    )
    common = {"shots": 2, "steps": 4, "lr": 1e-2, "split": "base", "context_init": "a"}
    adapt_checkpoint(tmp_path / "base", table, "category", tmp_path / "coop", method="coop", **common)
    info = adapt_checkpoint(
        tmp_path / "base",
        table,
        "category",
        tmp_path / "gram",
        method="gram",
        meta=str(tmp_path / "meta"),
        regulate=False,
        **common,
    )
    coop, _, _ = load_checkpoint(tmp_path / "coop" / "checkpoint")
    gram, _, _ = load_checkpoint(tmp_path / "gram" / "checkpoint")
    assert (coop.adapter.context - gram.adapter.context).abs().max().item() < 1e-6
    assert not info["regulate"]
    default = adapt_checkpoint(
        tmp_path / "base",
        table,
        "category",
        tmp_path / "g2",
        method="gram",
        shots=1,
        steps=1,
        split="base",
        meta=str(tmp_path / "meta"),
        regulate=False,
    )
    assert default["lr"] == 1e-3


def test_omniview_terms_against_a_loop_over_objects_with_gradients():
    torch.manual_seed(0)
    d = 8
    adapter = ImageAdapter(d, 2, 0.3).double()
    owner = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    views = Views(
        torch.randn(7, d, dtype=torch.float64),
        owner,
        F.normalize(torch.randn(3, d, dtype=torch.float64), dim=-1),
        ["a", "b", "c"],
    )
    objects, scale = torch.tensor([2, 0]), torch.tensor(5.0, dtype=torch.float64)
    caption, worst = view_losses(adapter, views, objects, scale)
    (caption + 2 * worst).backward()
    got = [p.grad.clone() for p in adapter.parameters()]
    adapter.zero_grad()
    ce, far = [], []
    for position, o in enumerate(objects.tolist()):
        v = [F.normalize(adapter(views.raw[i]), dim=0) for i in range(7) if owner[i] == o]
        anchor = F.normalize(torch.stack(v).sum(0), dim=0)
        far.append(max(1 - x @ anchor for x in v))
        for x in v:
            logits = torch.stack([scale * x @ views.text[p] for p in objects.tolist()])
            ce.append(-torch.log_softmax(logits, 0)[position])
    ref_caption, ref_worst = torch.stack(ce).mean(), torch.stack(far).mean()
    assert abs(caption.item() - ref_caption.item()) < 1e-12 and abs(worst.item() - ref_worst.item()) < 1e-12
    (ref_caption + 2 * ref_worst).backward()
    assert all(torch.allclose(a, p.grad, atol=1e-12) for a, p in zip(got, adapter.parameters(), strict=True))


def test_omniview_adapts_into_a_clip_adapter_checkpoint(table, tmp_path):
    from lipkit.checkpoint import load_checkpoint

    tok, model = _saved_base(table, tmp_path)
    info = _adapt(
        [
            tmp_path / "base",
            tmp_path / "ov",
            "--method",
            "omniview",
            "--data",
            table,
            "--column",
            "concept",
            "--steps",
            "20",
            "--lr",
            "1e-2",
            "--view-weight",
            "4",
        ]
    )
    assert info["method"] == "omniview" and info["objects"] >= 2 and info["views"] > info["objects"]
    assert info["worst_view_distance"][1] < info["worst_view_distance"][0]
    adapted, _, config = load_checkpoint(tmp_path / "ov" / "checkpoint")
    assert config["model"]["adapter"]["method"] == "clip-adapter" and adapted.image_adapter is not None
    from lipkit.adapt.run import adapt_checkpoint

    rows = [json.loads(line) for line in table.read_text().splitlines()[:6]]
    single = tmp_path / "single.jsonl"  # every object shown once: no views to align
    single.write_text(
        "".join(
            json.dumps({**r, "image": str(table.parent / r["image"]), "obj": i}) + "\n"
            for i, r in enumerate(rows)
        )
    )
    with pytest.raises(UserError, match="fewer than 2 objects with 2 or more rows"):
        adapt_checkpoint(tmp_path / "base", single, "obj", tmp_path / "bad", method="omniview")
    with pytest.raises(UserError, match="e.g. concept"):
        adapt_checkpoint(tmp_path / "base", single, None, tmp_path / "bad", method="omniview")


def test_concepts_are_the_distinct_first_captions_with_their_own_images(table):
    """Each concept's images are exactly its rows' (embedded in row order), every kept caption fits beside
    the context, and the rows left out are counted."""
    from lipkit.adapt.meta_tasks import concepts_of
    from lipkit.data.image_store import ImageStore
    from lipkit.eval.embedding import embed_images

    records, tok, model = _tiny(table, context_length=12)
    records = records[:60]
    concepts = concepts_of(model, tok, list(records), context=4, domains=3, seed=0)
    kept = [r for r in records if r.captions and r.captions[0] in set(concepts.captions)]
    assert concepts.dropped == len(records) - len(kept) and len(set(concepts.captions)) == len(
        concepts.captions
    )
    assert all(int((row == tok.eot_id).nonzero()[0]) + 1 <= 12 - 4 for row in concepts.ids)
    expected = embed_images(model, ImageStore(kept, model.spec.image_size, cache=True), 64).float()
    assert torch.allclose(concepts.images, expected, atol=1e-6)
    assert [concepts.captions[o] for o in concepts.owner.tolist()] == [r.captions[0] for r in kept]
    assert int(concepts.domain.max()) < 3
