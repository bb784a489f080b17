"""`lipkit attack CHECKPOINT SOURCE OUT`: a split's metrics under adversarial images, beside the clean ones,
computed by `lipkit eval`'s own function on the same images — for the checkpoint attacked and for each
checkpoint the images are transferred to.

Every image of the split (or `limit` of them, spread over it) is perturbed once. `pgd` (attack.pgd) ascends,
per image, the task's loss: `zeroshot` the zero-shot cross-entropy of `column` (its classes and eval's
templates, as `lipkit eval` builds the classifier), `retrieval` −log of the softmax mass on the image's own
captions. `sga` (attack.sga) ascends SGA's set-level loss at several scales. `uap` (attack.universal) adds
one perturbation learned on `train` to every image, and a random one of the same ε beside it. The
adversarial 8-bit images take the clean images' place in an ImageStore and eval.evaluate.evaluate_records
scores every store with one EvalConfig (fp32, no linear probe, no re-ranking): ε = 0 gives the clean metrics
exactly. The success rate is the share of the images the model got right clean (zero-shot top-1; retrieval:
the image's top caption is one of its own) that it gets wrong under attack. Transfer targets (`transfer`)
score the same 8-bit images (resized bilinearly when their image size differs) with their own text tower.
Deterministic for a seed, the models in eval mode. OUT gets attack.json, report.html (attack.report) and,
with `save_images`, the adversarial split as PNGs and a table (adversarial.jsonl) any tool can read.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from rich.progress import track

from lipkit.attack.pgd import NORMS, Loss, pgd, retrieval_loss, toward, zeroshot_loss
from lipkit.attack.report import write_caption_report, write_report
from lipkit.attack.scoring import Targets, check_model, guidance_sets, resized, score_stores, task_targets
from lipkit.attack.sga import STEP, set_loss
from lipkit.attack.universal import UniversalSettings, learn_universal, random_perturbation
from lipkit.attack.words import WordSettings, words_attack
from lipkit.checkpoint import load_checkpoint
from lipkit.config_eval import EvalConfig
from lipkit.data.image_store import ImageStore
from lipkit.data.records import spread_subset
from lipkit.data.sources.registry import eval_labels, read_table
from lipkit.device import pick_device
from lipkit.errors import UserError
from lipkit.eval.evaluate import check_has_images

TASKS = ("zeroshot", "retrieval")
METHODS = ("pgd", "sga", "uap", "words")
DEFAULT_STEPS = {"pgd": 10, "sga": 10, "uap": 200, "words": 0}


@dataclass
class AttackSettings:
    method: str = "pgd"
    task: str = "zeroshot"
    column: str = "subcategory"  # zeroshot: the class column
    eps: float = 2 / 255
    norm: str = "linf"
    steps: int | None = None  # None: DEFAULT_STEPS of the method
    step_size: float | None = None  # None: pgd ε/4 (at least 1/255 for ℓ∞ at ε > 0); sga 0.5/255; uap ε/8
    limit: int = 0  # 0: every image
    batch_size: int = 64
    seed: int = 0
    train: str = ""  # uap: the table δ is learned on
    gallery: int = 12  # clean/adversarial pairs shown in OUT/report.html
    transfer: list[str] = field(default_factory=list)  # checkpoints that also score the adversarial images
    save_images: bool = False  # write OUT/adversarial/*.png and OUT/adversarial.jsonl
    words: int = 1  # words: words changed per caption at most
    candidates: int = 10  # words: nearest vocabulary words tried per word
    templates: list[str] = field(default_factory=lambda: list(EvalConfig().templates))

    def __post_init__(self) -> None:
        if self.steps is None:
            self.steps = DEFAULT_STEPS.get(self.method, 10)
        if self.step_size is None and self.method in ("uap", "sga"):
            self.step_size = self.eps / 8 if self.method == "uap" else STEP
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
    if s.method == "words" and (s.task != "retrieval" or s.words < 1 or s.candidates < 1):
        raise UserError(
            "--method words attacks retrieval captions: pass --task retrieval, --words and --candidates ≥ 1."
        )
    if s.method == "sga" and s.norm != "linf":
        raise UserError("--method sga is an ℓ∞ attack; pass --norm linf.")
    if s.method == "uap" and (not s.train or s.norm != "linf" or s.steps < 1):
        raise UserError(
            "--method uap learns one ℓ∞ perturbation on a table: pass --train TABLE, --steps ≥ 1 and --norm linf."
        )
    if s.method == "words" and (s.transfer or s.save_images):
        raise UserError("--method words changes captions, not images: drop --transfer and --save-images.")


def _loss(model, s: AttackSettings, targets: Targets, rows: range, guide: tuple, gen) -> Loss:
    device, rows = model.device, list(rows)
    if s.method == "sga":
        return set_loss(model, guide[0][rows].to(device), guide[1][rows].to(device), gen)
    if s.task == "zeroshot":
        return zeroshot_loss(model, targets.emb.to(device), targets.truth[rows].to(device))
    return retrieval_loss(
        model, targets.emb.to(device), [targets.truth[i].nonzero()[:, 0].tolist() for i in rows]
    )


def perturb(
    model, store: ImageStore, targets: Targets, s: AttackSettings, delta=None, guide=()
) -> tuple[torch.Tensor, float]:
    """The adversarial 8-bit images of the whole store — PGD's on the method's loss (`guide`: SGA's text
    sets), or x + `delta` (one perturbation for all) — and the largest realised ‖δ‖ (in the norm)."""
    gen = torch.Generator().manual_seed(s.seed)
    n, out, largest = len(store.records), [], 0.0
    for start in track(range(0, n, s.batch_size), description=f"{s.method} ε={s.eps:.4g}"):
        rows = range(start, min(start + s.batch_size, n))
        clean_u8 = store.get(rows).to(model.device)
        clean = clean_u8.float() / 255.0
        if delta is not None:
            found = (clean + delta.to(clean)).clamp(0, 1)
        else:
            loss = _loss(model, s, targets, rows, guide, gen)
            found = pgd(loss, clean, s.eps, s.steps, s.step_size, s.norm, gen)
        adv = toward(clean_u8, found)
        change = (adv.float() / 255.0 - clean).flatten(1)
        size = change.abs().amax(1) if s.norm == "linf" else change.norm(dim=1)
        largest = max(largest, float(size.max()))
        out.append(adv.cpu())
    return torch.cat(out), largest


def _universal(model, tokenizer, s: AttackSettings, out: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """uap: δ learned on --train (attack.universal) and the random δ of the same ε; δ saved to OUT."""
    rows = read_table(s.train)
    if not rows:
        raise UserError(
            f"--train '{s.train}' has no usable rows (each needs an image and a caption); fix it."
        )
    train = ImageStore(
        spread_subset(rows, s.steps * s.batch_size),
        model.spec.image_size,
        cache=True,
        desc="uap train",
    )
    check_has_images("", train)  # read_table has dropped rows without a caption (C-PGC's loss reads them)
    settings = UniversalSettings(s.eps, s.steps, s.batch_size, s.step_size, seed=s.seed)
    delta, losses = learn_universal(model, tokenizer, train, settings)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(delta, out / "perturbation.pt")
    learned = {"train_images": len(train.records), "loss": [round(losses[0], 4), round(losses[-1], 4)]}
    return {"attacked": delta, "random": random_perturbation(tuple(delta.shape), s.eps, s.seed + 1)}, learned


def _load(path: str | Path, s: AttackSettings) -> tuple:
    model, tokenizer, info = load_checkpoint(Path(path).expanduser())
    check_model(model, info, s.task, s.column)
    return model.to(pick_device("auto")).eval().requires_grad_(False), tokenizer


def _transfer(path: str, loaded: tuple, records, stores: dict, s: AttackSettings, cfg, sets: dict) -> dict:
    """Another checkpoint's metrics on the same clean and adversarial images (its own text tower)."""
    model, tokenizer = loaded
    own = {name: resized(st, model.spec.image_size) for name, st in stores.items()}
    targets = task_targets(model, tokenizer, records, s.task, s.column, cfg, sets)
    scored = score_stores(model, tokenizer, records, cfg, sets, own, targets)
    rates = {
        f"{name}_success_rate" if name != "attacked" else "success_rate": v
        for name, v in scored["success"].items()
    }
    return {"checkpoint": str(Path(path).resolve()), **rates, **scored["metrics"]}


def save_adversarial(out: Path, records, images: torch.Tensor) -> Path:
    """OUT/adversarial/NNNNNN.png and OUT/adversarial.jsonl: the split's rows with the adversarial images."""
    folder = out / "adversarial"
    folder.mkdir(parents=True, exist_ok=True)
    with (out / "adversarial.jsonl").open("w", encoding="utf-8") as f:
        for i, (record, image) in enumerate(zip(records, images, strict=True)):
            path = folder / f"{i:06d}.png"
            Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(path)
            row = {**record.meta, "image": str(path.resolve()), "captions": record.captions}
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    return out / "adversarial.jsonl"


def _words(out: Path, records, store, targets, cfg, sets, s: AttackSettings, loaded: tuple) -> dict:
    """--method words (attack.words): the captions attacked, the images as they are."""
    model, tokenizer, checkpoint, source = loaded
    settings = WordSettings(s.words, s.candidates, s.batch_size)
    scored = words_attack(model, tokenizer, records, store, targets, cfg, sets, settings)
    result = {
        "checkpoint": str(Path(checkpoint).resolve()),
        "source": str(source),
        "images": len(records),
        "captions": scored["captions"],
        "changed_captions": len(scored["pairs"]),
        "settings": asdict(s),
        "success_rate": scored["success"],
        **scored["metrics"],
        "transfer": [],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "attack.json").write_text(json.dumps({**result, "substitutions": scored["pairs"]}, indent=1))
    write_caption_report(out, result, scored["pairs"])
    return result


def attack_split(
    checkpoint: str | Path, source: str | Path, out: str | Path, **settings: Any
) -> dict[str, Any]:
    """Attack SOURCE's images (module docstring); write OUT/attack.json and OUT/report.html; return the
    former's content."""
    s = AttackSettings(**settings)
    _check(s)
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"Output '{out}' is a file; choose a directory path.")
    model, tokenizer = _load(checkpoint, s)
    targets_loaded = [_load(path, s) for path in s.transfer]  # refused before the attack, not after
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
    targets = task_targets(model, tokenizer, records, s.task, s.column, cfg, sets)
    if s.method == "words":
        return _words(out, records, store, targets, cfg, sets, s, (model, tokenizer, checkpoint, source))
    guide = guidance_sets(model, tokenizer, records, targets, cfg.batch_size) if s.method == "sga" else ()
    deltas, learned = _universal(model, tokenizer, s, out) if s.method == "uap" else ({"attacked": None}, {})
    stores, largest = {"clean": store}, {}
    for name, delta in deltas.items():
        stores[name] = copy.copy(store)
        stores[name].cache, largest[name] = perturb(model, store, targets, s, delta, guide)
    scored = score_stores(model, tokenizer, records, cfg, sets, stores, targets)
    result = {
        "checkpoint": str(Path(checkpoint).resolve()),
        "source": str(source),
        "images": len(records),
        "settings": asdict(s),
        "largest_perturbation": largest["attacked"],
        "success_rate": scored["success"]["attacked"],
        **({"random_success_rate": scored["success"]["random"], "universal": learned} if learned else {}),
        **scored["metrics"],
        "transfer": [
            _transfer(path, loaded, records, stores, s, cfg, sets)
            for path, loaded in zip(s.transfer, targets_loaded, strict=True)
        ],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "attack.json").write_text(json.dumps(result, indent=1))
    write_report(out, result, stores, scored["best"], scored["right"], targets.names, deltas.get("attacked"))
    if s.save_images:
        save_adversarial(out, records, stores["attacked"].cache)
    return result
