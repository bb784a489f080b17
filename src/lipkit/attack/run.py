"""`lipkit attack CHECKPOINT SOURCE OUT --method pgd`: a split's metrics under white-box PGD (attack.pgd),
beside the clean ones, computed by `lipkit eval`'s own function on the same images.

Every image of the split (or `limit` of them, spread over it) is perturbed once, for one task:
`zeroshot` ascends the zero-shot cross-entropy of `column` (its classes and eval's templates, as `lipkit
eval` builds the classifier), `retrieval` pushes each image away from its own captions. The adversarial
8-bit images then take the clean images' place in an ImageStore and eval.evaluate.evaluate_records scores
both stores with one EvalConfig (fp32, no linear probe, no re-ranking): ε = 0 gives the clean metrics
exactly. The attack success rate is the share of the images the model got right clean (zero-shot top-1;
retrieval: the image's top caption is one of its own) that it gets wrong under attack. Deterministic for a
seed (the random starts), the model in eval mode.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from rich.progress import track

from lipkit.attack.pgd import NORMS, Loss, pgd, retrieval_loss, toward, zeroshot_loss
from lipkit.attack.report import write_report
from lipkit.attack.universal import UniversalSettings, learn_universal, random_perturbation
from lipkit.checkpoint import load_checkpoint
from lipkit.config_eval import EvalConfig
from lipkit.data.image_store import ImageStore
from lipkit.data.label_sets import INDEX_SUFFIX, fill_template
from lipkit.data.records import spread_subset
from lipkit.data.sources.registry import eval_labels, read_table
from lipkit.device import pick_device
from lipkit.errors import UserError
from lipkit.eval.embedding import embed_images, embed_texts
from lipkit.eval.evaluate import RetrievalTexts, check_has_images, evaluate_records
from lipkit.eval.similarity_choice import resolve_similarity
from lipkit.eval.zeroshot import class_embeddings
from lipkit.models.adapters import applies_to

TASKS = ("zeroshot", "retrieval")
METHODS = ("pgd", "uap")
DEFAULT_STEPS = {"pgd": 10, "uap": 200}


class Targets(NamedTuple):
    """What the task scores an image against: embeddings (K, D), the truth (N,) labels or (N, K) own-caption
    mask, and the K names (classes or captions) for the report."""

    emb: torch.Tensor
    truth: torch.Tensor
    names: list[str]


@dataclass
class AttackSettings:
    method: str = "pgd"
    task: str = "zeroshot"
    column: str = "subcategory"  # zeroshot: the class column
    eps: float = 2 / 255
    norm: str = "linf"
    steps: int | None = None  # None: DEFAULT_STEPS of the method
    step_size: float | None = None  # None: pgd ε/4 (at least 1/255 for ℓ∞ at ε > 0); uap ε/8
    limit: int = 0  # 0: every image
    batch_size: int = 64
    seed: int = 0
    train: str = ""  # uap: the table δ is learned on
    gallery: int = 12  # clean/adversarial pairs shown in OUT/report.html
    templates: list[str] = field(default_factory=lambda: list(EvalConfig().templates))

    def __post_init__(self) -> None:
        if self.steps is None:
            self.steps = DEFAULT_STEPS.get(self.method, 10)
        if self.step_size is None and self.method == "uap":
            self.step_size = self.eps / 8
        if self.step_size is None:
            self.step_size = max(self.eps / 4, 1 / 255 if self.norm == "linf" and self.eps else 0.0)


def _check(s: AttackSettings) -> None:
    """Refuse, in one sentence each, settings this attack cannot use."""
    choices = (("method", s.method, METHODS), ("task", s.task, TASKS), ("norm", s.norm, NORMS))
    for name, value, allowed in choices:
        if value not in allowed:
            raise UserError(f"--{name} must be one of {', '.join(allowed)}, not '{value}'.")
    if s.eps < 0 or (s.norm == "linf" and s.eps > 1):
        raise UserError(f"--eps must be 0 or more (for linf at most 1, e.g. 2/255), got {s.eps}.")
    if s.eps and s.steps and not (s.step_size or 0) > 0:
        raise UserError(f"--step-size must be more than 0, got {s.step_size}.")
    if s.steps < 0 or s.batch_size < 1 or s.limit < 0 or s.gallery < 0:
        raise UserError("--steps, --limit and --gallery must be 0 or more and --batch-size at least 1.")
    if s.method == "uap" and (not s.train or s.norm != "linf"):
        raise UserError(
            "--method uap learns one ℓ∞ perturbation on a table: pass --train TABLE (and --norm linf)."
        )


def check_model(model, info: dict, s: AttackSettings) -> None:
    """Refuse checkpoints whose reported score is not the pooled cosine the attack ascends."""
    objective = (info.get("train") or {}).get("objective")
    scored = resolve_similarity("auto", objective)
    if scored != "dense":
        how = "token-wise" if scored == "filip" else "lexically"
        raise UserError(
            f"This checkpoint is scored {how} (train.objective {objective}) and the attack ascends the pooled "
            "similarity; attack a checkpoint scored by pooled embeddings."
        )
    if s.task == "zeroshot" and applies_to(model.spec.adapter, s.column):
        raise UserError(
            f"This checkpoint classifies '{s.column}' with a class head from `lipkit adapt`, which the attack "
            "does not ascend; attack the checkpoint it was adapted from, or another --column."
        )


def task_targets(model, tokenizer, records, s: AttackSettings, cfg: EvalConfig, sets: dict) -> Targets:
    """What the task scores each image against (Targets): the classes, templates and labels as eval's
    zero-shot takes them (a source's own label set when it names one), or the split's retrieval captions."""
    if s.task == "zeroshot":
        values = [r.meta.get(s.column) for r in records]
        if any(v in (None, "") or isinstance(v, list) for v in values):
            raise UserError(
                f"Column '{s.column}' does not give every image one label; pass a single-label --column "
                "(e.g. subcategory) or --task retrieval."
            )
        label_set = sets.get(s.column)
        classes = label_set.classes if label_set else sorted(set(values))
        templates = (label_set.templates if label_set else None) or cfg.templates
        indices = [r.meta.get(s.column + INDEX_SUFFIX) for r in records] if label_set else [None]
        if any(i is None for i in indices):
            index = {c: i for i, c in enumerate(classes)}
            indices = [index[v] for v in values]
        prompts = [fill_template(t, str(c)) for c in classes for t in templates]
        texts = embed_texts(model, tokenizer, prompts, cfg.batch_size)
        emb = class_embeddings(texts, len(classes), len(templates))
        return Targets(emb, torch.tensor(indices), [str(c) for c in classes])
    if not all(r.captions for r in records):
        raise UserError("--task retrieval needs a caption for every image of SOURCE; give each row one.")
    texts = RetrievalTexts.of(records, cfg.retrieval_caption)
    emb = embed_texts(model, tokenizer, texts.texts, cfg.batch_size)
    return Targets(emb, texts.relevant.t(), texts.texts)  # truth (N, T): image i's own captions


def _loss(model, s: AttackSettings, targets: Targets, rows: range) -> Loss:
    emb, truth, _ = targets
    device = model.device
    if s.task == "zeroshot":
        return zeroshot_loss(model, emb.to(device), truth[list(rows)].to(device))
    return retrieval_loss(model, emb.to(device), [truth[i].nonzero()[:, 0].tolist() for i in rows])


def predict(model, store: ImageStore, targets: Targets, batch: int) -> torch.Tensor:
    """(N,) each image's best class / caption (its row of targets.emb)."""
    return (embed_images(model, store, batch) @ targets.emb.t()).argmax(1)


def is_right(targets: Targets, best: torch.Tensor) -> torch.Tensor:
    """(N,) bool: the zero-shot top-1 is the label / the nearest caption is one of the image's own."""
    if targets.truth.dim() == 2:
        return targets.truth[torch.arange(len(best)), best]
    return best == targets.truth


def perturb(
    model, store: ImageStore, targets: Targets, s: AttackSettings, delta: torch.Tensor | None = None
) -> tuple[torch.Tensor, float]:
    """The adversarial 8-bit images of the whole store — PGD's, or x + `delta` (one perturbation for all) —
    and the largest realised ‖δ‖ (in the norm)."""
    gen = torch.Generator().manual_seed(s.seed)
    n, out, largest = len(store.records), [], 0.0
    for start in track(range(0, n, s.batch_size), description=f"{s.method} ε={s.eps:.4g}"):
        rows = range(start, min(start + s.batch_size, n))
        clean_u8 = store.get(rows).to(model.device)
        clean = clean_u8.float() / 255.0
        if delta is not None:
            found = (clean + delta.to(clean)).clamp(0, 1)
        else:
            found = pgd(_loss(model, s, targets, rows), clean, s.eps, s.steps, s.step_size, s.norm, gen)
        adv = toward(clean_u8, found)
        change = (adv.float() / 255.0 - clean).flatten(1)
        size = change.abs().amax(1) if s.norm == "linf" else change.norm(dim=1)
        largest = max(largest, float(size.max()))
        out.append(adv.cpu())
    return torch.cat(out), largest


def _universal(model, tokenizer, s: AttackSettings, out: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """uap: δ learned on --train (attack.universal) and the random δ of the same ε; δ saved to OUT."""
    train = ImageStore(
        spread_subset(read_table(s.train), s.steps * s.batch_size),
        model.spec.image_size,
        cache=True,
        desc="uap train",
    )
    check_has_images("", train)
    settings = UniversalSettings(s.eps, s.steps, s.batch_size, s.step_size, seed=s.seed)
    delta, losses = learn_universal(model, tokenizer, train, settings)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(delta, out / "perturbation.pt")
    learned = {"train_images": len(train.records), "loss": [round(losses[0], 4), round(losses[-1], 4)]}
    return {"attacked": delta, "random": random_perturbation(tuple(delta.shape), s.eps, s.seed + 1)}, learned


def attack_split(
    checkpoint: str | Path, source: str | Path, out: str | Path, **settings: Any
) -> dict[str, Any]:
    """Attack SOURCE's images (module docstring); write OUT/attack.json and return it."""
    s = AttackSettings(**settings)
    _check(s)
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"Output '{out}' is a file; choose a directory path.")
    model, tokenizer, info = load_checkpoint(Path(checkpoint).expanduser())
    check_model(model, info, s)
    model.to(pick_device("auto")).eval().requires_grad_(False)
    cfg = EvalConfig(
        class_columns=[s.column] if s.task == "zeroshot" else [],
        templates=s.templates,
        linear_probe="",
        rerank_top=0,
        precision="fp32",
        batch_size=s.batch_size,
    )
    sets = eval_labels(source)
    store = ImageStore(
        spread_subset(read_table(source), s.limit), model.spec.image_size, cache=True, desc="attack"
    )
    check_has_images("", store)
    records = store.records  # the readable ones
    targets = task_targets(model, tokenizer, records, s, cfg, sets)
    deltas, learned = _universal(model, tokenizer, s, out) if s.method == "uap" else ({"attacked": None}, {})
    stores, largest = {"clean": store}, {}
    for name, delta in deltas.items():
        stores[name] = copy.copy(store)
        stores[name].cache, largest[name] = perturb(model, store, targets, s, delta)
    best = {name: predict(model, st, targets, s.batch_size) for name, st in stores.items()}
    right = {name: is_right(targets, b) for name, b in best.items()}
    success = {
        name: float((right["clean"] & ~right[name]).sum()) / int(right["clean"].sum())
        if right["clean"].any()
        else None
        for name in deltas
    }
    scores = {
        name: evaluate_records(model, tokenizer, records, cfg, store=st, details=False, labels=sets)[
            "metrics"
        ]
        for name, st in stores.items()
    }
    result = {
        "checkpoint": str(Path(checkpoint).resolve()),
        "source": str(source),
        "images": len(records),
        "settings": asdict(s),
        "largest_perturbation": largest["attacked"],
        "success_rate": success["attacked"],
        **({"random_success_rate": success["random"], "universal": learned} if learned else {}),
        **scores,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "attack.json").write_text(json.dumps(result, indent=1))
    write_report(out, result, stores, best, right, targets.names, deltas.get("attacked"))
    return result
