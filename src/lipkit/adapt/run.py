"""`lipkit adapt`: few-shot adaptation of a trained checkpoint to a labelled column of a table.

The classes are the column's values (or its base or novel half, data.few_shot); K images per class
(`shots`, drawn with `seed`) are the training set. Each method (adapt.learners) gives logits over the classes
for each shot, with the checkpoint's own logit scale t; the zero-shot classifier they start from has each
class c the mean of its prompts' normalised text embeddings over the templates, re-normalised (eval.zeroshot).
What trains minimises

    L = −1/N Σ_i log softmax_c(logits_i)_{y_i}

over the N = K·C shots — CoOp's objective (Zhou et al., 2022) — by full-batch AdamW for `steps` steps (GRAM's
regulated steps: the learner's own optimiser)
(Tip-Adapter trains nothing). A tower that does not train runs once. The result is saved as an ordinary
checkpoint in OUT/checkpoint: LoRA merged into the weights, or the method's module beside the towers
(ModelSpec.adapter: CoOp's context and Tip-Adapter's cache, which eval's zero-shot of the adapted column
reads; CLIP-Adapter's MLP, which every pooled image embedding passes through). Its config.json keeps the source's training record (so eval scores it as the source is scored) plus
`adapted` (method, column, classes, shots, seed, steps, the method's settings, trainable parameters, the
shots' loss and top-1 before and after). Checkpoints scored token-wise or lexically (FILIP, Wukong, LexLIP)
are refused: these methods train the pooled similarity.

Four methods differ: `gram-meta` (adapt.gram) trains no checkpoint but GRAM's meta-learned context and
gradient regulator on any image-text table, into OUT/gram.pt; `gram` is CoOp started from it (regulated
steps, adapt.learners); `omniview` (adapt.omniview) trains CLIP-Adapter's MLP on the views of objects
grouped by --column, not on shots of classes; `ptunifier` (adapt.ptunifier) trains PTUnifier's pseudo-token
pools and the matching head they feed on the table's image–caption pairs (any checkpoint: it leaves the
towers and their similarity as they are).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.progress import track

from lipkit.adapt.composed import DEFAULTS, ComposeSettings, train_composer
from lipkit.adapt.gram import MetaSettings, load_meta, run_meta
from lipkit.adapt.learners import (
    TOWERS,
    ClipAdapterLearner,
    CoopLearner,
    GramLearner,
    LoraLearner,
    Shots,
    TipLearner,
    template_class_features,
)
from lipkit.adapt.omniview import ViewSettings, train_views
from lipkit.adapt.ptunifier import UnifySettings, train_unifier
from lipkit.checkpoint import load_checkpoint, save_checkpoint
from lipkit.config_eval import EvalConfig
from lipkit.data.few_shot import class_split, few_shot
from lipkit.data.image_store import ImageStore
from lipkit.data.sources.registry import read_table
from lipkit.data.transforms import normalize
from lipkit.errors import UserError
from lipkit.models.adapters import COMPOSERS
from lipkit.models.dual_encoder import DualEncoder
from lipkit.models.pseudo_tokens import IMAGE_TOKENS, POOL_SIZE, TEXT_TOKENS
from lipkit.models.pseudo_word import PROMPT

METHODS = (
    *("lora", "coop", "clip-adapter", "tip", "tip-f", "gram-meta", "gram", "omniview", "ptunifier"),
    *COMPOSERS,
)
PROMPTED = ("coop", "gram-meta", "gram", *COMPOSERS)  # methods that put learned word vectors in prompts
# steps and learning rates beside composed's; gram's (None) are the learner's: regulated, the meta-training's
# inner loop (its inner_steps at α, as MAML adapts at test time), else 100 AdamW steps at 1e-3
OWN_DEFAULTS = {
    "gram-meta": {"steps": 200, "lr": 1e-3},
    "gram": {"steps": None, "lr": None},
    "omniview": {"steps": 200, "lr": 1e-3},
    "ptunifier": {"steps": 300, "lr": 1e-4},
}
TOKEN_SCORED = {"filip": "token-wise", "wukong": "token-wise", "lexlip": "lexically"}
# config.json keys save_checkpoint writes itself (the rest of the source's config is carried over)
SAVED_BY_CHECKPOINT = ("lipkit_version", "model", "max_logit_scale", "context_length", "adapted")


@dataclass
class AdaptSettings:
    """What `lipkit adapt` does; each method reads its own group (docs/adapt.md)."""

    method: str = "lora"
    shots: int = 16
    seed: int = 0
    split: str = "all"  # all | base | novel (CoOp's split of the sorted classes)
    steps: int | None = None  # None: the method's default (100; pic2word 300, rtd 200)
    lr: float | None = None  # None: the method's default (1e-3; pic2word 1e-4, rtd 1e-5)
    templates: list[str] = field(default_factory=lambda: list(EvalConfig().templates))
    towers: str = "text"  # lora: text | image | both
    rank: int = 4
    alpha: float = 8.0
    context: int = 0  # coop: context vectors (0: as many as --context-init has tokens)
    context_init: str = "a photo of a"  # coop: "" draws them from N(0, 0.02²)
    class_specific: bool = False  # coop: one context per class (CSC)
    reduction: int = 4  # clip-adapter
    ratio: float = 0.2
    tip_alpha: float = 1.0  # tip, tip-f
    tip_beta: float = 1.0
    batch_size: int | None = (
        None  # pic2word: images per step; rtd: text triplets per step (256); ptunifier 64
    )
    prompt: str = PROMPT  # pic2word, rtd: the composed query's wording
    noise: float = 0.5  # rtd: ε of the noised reference caption
    tau: float = 0.07  # rtd: temperature
    meta: str = ""  # gram: the gram-meta run directory
    regulate: bool = True  # gram: step with the meta-trained gradient regulator
    inner_lr: float = 1.0  # gram-meta: α
    inner_steps: int = 1  # gram-meta
    tasks: int = 4  # gram-meta: task pairs per meta-step
    ways: int = 16  # gram-meta: concepts per task (its shots are --shots)
    domains: int = 8  # gram-meta
    view_weight: float = 1.0  # omniview: λ
    pool: int = POOL_SIZE  # ptunifier: vectors per pool
    pseudo_image: int = IMAGE_TOKENS  # ptunifier: k_v
    pseudo_text: int = TEXT_TOKENS  # ptunifier: k_t
    mask_ratio: float = 0.75  # ptunifier: r of the image-only term
    freeze_pools: bool = False  # ptunifier: the reference code's untrained pools

    def __post_init__(self) -> None:
        defaults = {**DEFAULTS, **OWN_DEFAULTS}.get(self.method, {"steps": 100, "lr": 1e-3})
        self.steps = defaults["steps"] if self.steps is None else self.steps
        self.lr = defaults["lr"] if self.lr is None else self.lr
        if self.batch_size is None:
            self.batch_size = 64 if self.method == "ptunifier" else 256


def _check(
    checkpoint: Path, out: Path, overwrite: bool, s: AdaptSettings, model: DualEncoder, info: dict
) -> None:
    """Refuse, in one sentence each, what this adaptation cannot do."""
    if out.exists() and not out.is_dir():
        raise UserError(f"Output '{out}' is a file; choose a directory path.")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"Output '{out}' already exists; choose a new path or pass --overwrite.")
    if (out / "checkpoint").resolve() == checkpoint.resolve():
        raise UserError(f"Output '{out}' would overwrite the checkpoint being adapted; choose another path.")
    if s.method not in METHODS:
        raise UserError(
            f"Adaptation method '{s.method}' is not one of {', '.join(METHODS)}; pick one of them."
        )
    if s.towers not in TOWERS:
        raise UserError(f"The towers to adapt must be one of {', '.join(TOWERS)}, not '{s.towers}'.")
    if s.method == "lora" and "visual" in TOWERS[s.towers] and model.spec.vision_tower != "vit":
        raise UserError(
            "LoRA on a timm image tower is not supported yet; adapt the text tower (--towers text)."
        )
    if s.method in PROMPTED and model.spec.text_embed_cls:
        raise UserError(
            f"--method {s.method} puts learned word vectors in prompts, which needs a text tower pooled at its end "
            "token; this one is OpenCLIP CoCa's [cls] tower (model text_embed_cls): adapt it with --method lora."
        )
    held = (model.spec.adapter or {}).get("method")
    if held and (s.method, held) != ("rtd", "pic2word"):  # RTD tunes the text tower of a Pic2Word checkpoint
        raise UserError(
            f"'{checkpoint}' already holds a {held} adapter; adapt the checkpoint it "
            "was adapted from (its config.json `adapted.from`)."
        )
    if s.method == "gram" and (s.class_specific or not s.meta):
        raise UserError(
            "--method gram fine-tunes GRAM's class-shared meta-learned context: pass --meta DIR (a gram-meta run) "
            "and leave out --class-specific."
        )
    if s.method == "gram":  # before any image is read: a wrong --meta fails at once
        load_meta(s.meta, model.text.word_width, checkpoint)
    objective = (info.get("train") or {}).get("objective", "")
    if objective in TOKEN_SCORED and s.method != "ptunifier":
        raise UserError(
            f"This checkpoint is scored {TOKEN_SCORED[objective]} (train.objective {objective}) and adapt trains "
            "the pooled similarity; adapt a checkpoint trained with a pooled objective (e.g. infonce, siglip)."
        )


def _classes(records, column: str, split: str) -> list[str]:
    values = [r.meta.get(column) for r in records if r.meta.get(column) not in (None, "")]
    if any(isinstance(v, list) for v in values):
        raise UserError(
            f"Column '{column}' holds several labels per image, and adapting learns one class per image; pass a "
            "single-label --column."
        )
    classes = class_split([str(v) for v in values], split) if values else []
    if len(classes) < 2:
        raise UserError(
            f"Column '{column}' has {len(classes)} class(es) in the '{split}' split of the table; adapting needs "
            "2 or more: pass another --column, or --classes all."
        )
    return classes


def _shots(model, tokenizer, store: ImageStore, column: str, classes, s: AdaptSettings) -> Shots:
    """The shots' pixels, labels, and the features of every tower that does not train, computed once."""
    if not len(store.records):
        raise UserError("None of the shots' images can be read; check the table's image paths.")
    # (the store drops unreadable images from its records: the labels follow what is left)
    labels = torch.tensor([classes.index(str(r.meta[column])) for r in store.records], device=model.device)
    trains = TOWERS[s.towers] if s.method == "lora" else ()
    mean, std, dev = model.spec.image_mean, model.spec.image_std, model.device
    pixels = None
    if "visual" in trains:  # the tower trains: all shots at once, every step
        pixels = normalize(store.get(range(len(store.records))), mean, std).to(dev)
    with torch.no_grad():
        raw = None
        if pixels is None:  # once, in chunks
            chunks = [range(i, min(i + 256, len(store.records))) for i in range(0, len(store.records), 256)]
            raw = torch.cat([model.visual(normalize(store.get(c), mean, std).to(dev)) for c in chunks])
        text = None if "text" in trains else template_class_features(model, tokenizer, classes, s.templates)
    return Shots(model, tokenizer, classes, raw, text, labels, pixels, s.templates)


def _learner(model, tokenizer, shots: Shots, s: AdaptSettings, checkpoint: Path):
    if s.method == "lora":
        return LoraLearner(model, s.towers, s.rank, s.alpha)
    if s.method == "coop":
        return CoopLearner(model, tokenizer, shots.names, s.context, s.context_init, s.class_specific)
    if s.method == "clip-adapter":
        return ClipAdapterLearner(model, s.reduction, s.ratio)
    if s.method == "gram":
        return GramLearner(model, s.meta, s.regulate, checkpoint)
    return TipLearner(model, shots, s.tip_alpha, s.tip_beta, fine_tune=s.method == "tip-f")


def _fit(shots: Shots, learner, steps: int, lr: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """Full-batch steps on the learner's parameters (AdamW, or the learner's `optimizer`); the shots'
    (loss, top-1) before and after."""

    def measure() -> tuple[torch.Tensor, float]:
        logits = learner.logits(shots)
        return F.cross_entropy(logits, shots.labels), (logits.argmax(1) == shots.labels).float().mean().item()

    with torch.no_grad():
        start = measure()
    if learner.params and steps:
        opt = learner.optimizer(lr) if hasattr(learner, "optimizer") else None
        opt = opt or torch.optim.AdamW(learner.params, lr=lr, weight_decay=0.0)
        for _ in track(range(steps), description=f"adapt ({learner.method})"):
            loss, _ = measure()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        end = measure()
    return (start[0].item(), start[1]), (end[0].item(), end[1])


def adapt_checkpoint(
    checkpoint: str | Path,
    data: str | Path,
    column: str,
    out: str | Path,
    overwrite: bool = False,
    **settings,
) -> dict[str, Any]:
    """Adapt `checkpoint` to `column` of the table `data` (module docstring; `settings` are AdaptSettings'
    fields); write the adapted checkpoint to `out`/checkpoint (a run directory: `lipkit eval` then writes
    `out`/eval) and return what its config.json records under `adapted`."""
    s = AdaptSettings(**settings)
    checkpoint, out = Path(checkpoint).expanduser(), Path(out).expanduser()
    model, tokenizer, source = load_checkpoint(checkpoint)
    _check(checkpoint, out, overwrite, s, model, source)
    if s.method in COMPOSERS:
        return _compose(checkpoint, Path(data), out, s, (model, tokenizer, source))
    if s.method == "gram-meta":
        return _meta(checkpoint, Path(data), out, s, (model, tokenizer))
    if s.method == "ptunifier":
        return _unify(checkpoint, read_table(data), out, s, (model, tokenizer, source))
    if not column:
        hint = "the column naming the object each row is a view of (e.g. concept)"
        raise UserError(
            f"--method {s.method} needs a column; name it with --column: "
            + (hint if s.method == "omniview" else "the class column (e.g. subcategory).")
        )
    records = read_table(data)
    if s.method == "omniview":
        return _views(checkpoint, records, column, out, s, (model, tokenizer, source))
    classes = _classes(records, column, s.split)
    shot_records, _ = few_shot(records, column, s.shots, s.seed, classes)
    model.requires_grad_(False)  # only the method's parameters train
    model.eval()  # no dropout; frozen statistics
    store = ImageStore(shot_records, model.spec.image_size, cache=True, desc="shots")
    shots = _shots(model, tokenizer, store, column, classes, s)
    torch.manual_seed(s.seed)
    learner = _learner(model, tokenizer, shots, s, checkpoint)
    steps = 0 if s.method == "tip" else s.steps  # Tip-Adapter is training-free
    steps = steps if steps is not None else learner.default_steps
    lr = s.lr if s.lr is not None else learner.default_lr
    (start_loss, start_acc), (end_loss, end_acc) = _fit(shots, learner, steps, lr)
    trainable = sum(p.numel() for p in learner.params)
    extra = learner.finish(model, column)
    model.requires_grad_(True)
    info = {
        "method": s.method,
        "from": str(checkpoint.resolve()),
        "column": column,
        "split": s.split,
        "classes": len(classes),
        "shots": s.shots,
        "seed": s.seed,
        **extra,
        "steps": steps,
        "lr": lr,
        "trainable_parameters": trainable,
        "shot_loss": [round(start_loss, 4), round(end_loss, 4)],
        "shot_top1": [round(start_acc, 4), round(end_acc, 4)],
    }
    _save(out, (model, tokenizer, source), info)
    return info


def _save(out: Path, loaded: tuple, info: dict[str, Any]) -> None:
    """OUT/checkpoint: the model as adapted, the source's config kept, `adapted` = info."""
    model, tokenizer, source = loaded
    kept = {k: v for k, v in source.items() if k not in SAVED_BY_CHECKPOINT}
    save_checkpoint(out / "checkpoint", model, tokenizer, {**kept, "adapted": info})


def _meta(checkpoint: Path, data: Path, out: Path, s: AdaptSettings, loaded: tuple) -> dict[str, Any]:
    """gram-meta (adapt.gram): meta-train a context from --context / --context-init and a regulator."""
    model, tokenizer = loaded
    model.requires_grad_(False)
    model.eval()
    torch.manual_seed(s.seed)  # a random start context (--context-init "") is drawn with the seed
    start = CoopLearner(model, tokenizer, [], s.context, s.context_init, False).context.context
    names = ("steps", "lr", "inner_lr", "inner_steps", "tasks", "ways", "shots", "domains", "seed")
    settings = MetaSettings(**{k: getattr(s, k) for k in names})
    source = str(checkpoint.resolve())
    return run_meta(model, tokenizer, data, out, start.detach().clone(), settings, source, s.context_init)


def _views(checkpoint: Path, records, column: str, out: Path, s: AdaptSettings, loaded: tuple) -> dict:
    """omniview (adapt.omniview): train the image adapter across views, save it as CLIP-Adapter's."""
    model, tokenizer, _ = loaded
    model.requires_grad_(False)
    model.eval()
    names = ("steps", "lr", "batch_size", "view_weight", "reduction", "ratio", "seed")
    adapter, trained = train_views(
        model, tokenizer, records, column, ViewSettings(**{k: getattr(s, k) for k in names})
    )
    model.add_adapter({"method": "clip-adapter", "reduction": s.reduction, "ratio": s.ratio}, adapter)
    model.requires_grad_(True)
    info = {"method": "omniview", "from": str(checkpoint.resolve()), "seed": s.seed, **trained}
    _save(out, loaded, info)
    return info


def _unify(checkpoint: Path, records, out: Path, s: AdaptSettings, loaded: tuple) -> dict[str, Any]:
    """ptunifier (adapt.ptunifier): pools and matching head on the frozen towers, saved with them."""
    model, tokenizer, _ = loaded
    model.requires_grad_(False)
    model.eval()
    names = (
        *("steps", "lr", "batch_size", "pool", "pseudo_image", "pseudo_text", "mask_ratio", "freeze_pools"),
        "seed",
    )
    torch.manual_seed(s.seed)  # the pools' and a fresh head's initialisation
    trained = train_unifier(model, tokenizer, records, UnifySettings(**{k: getattr(s, k) for k in names}))
    model.requires_grad_(True)
    info = {"method": "ptunifier", "from": str(checkpoint.resolve()), "seed": s.seed, **trained}
    _save(out, loaded, info)
    return info


def _compose(checkpoint: Path, data: Path, out: Path, s: AdaptSettings, loaded: tuple) -> dict[str, Any]:
    """pic2word / rtd (adapt.composed): train, attach the mapping network, save like any adaptation."""
    model, tokenizer, source = loaded
    model.requires_grad_(False)
    model.eval()
    names = ("method", "steps", "lr", "batch_size", "seed", "prompt", "noise", "tau")
    settings, word, trained = train_composer(
        model, tokenizer, data, ComposeSettings(**{k: getattr(s, k) for k in names})
    )
    model.add_adapter(settings, word)
    model.requires_grad_(True)
    info = {
        "method": s.method,
        "from": str(checkpoint.resolve()),
        "data": str(data),
        "seed": s.seed,
        **trained,
    }
    _save(out, loaded, info)
    return info
