"""`lipkit harden CHECKPOINT OUT --data TABLE`: adversarial fine-tuning of the image tower, the standard
answer to `lipkit attack` — FARE (Schlarmann et al., 2024, "Robust CLIP: Unsupervised Adversarial
Fine-Tuning of Vision Embeddings for Robust Large Vision-Language Models") or TeCoA (Mao et al., 2023,
"Understanding Zero-Shot Adversarial Robustness for Large-Scale Models").

With φ_θ the image tower's pooled embedding (before normalisation) being fine-tuned, φ₀ the checkpoint's own
(frozen), x ∈ [0, 1] an image of the table, each step minimises over θ, on a batch, by AdamW:

    FARE:   L(θ) = 1/B Σ_i max_{‖δ_i‖∞ ≤ ε} ‖φ_θ(x_i + δ_i) − φ₀(x_i)‖²₂               (unsupervised)
    TeCoA:  L(θ) = 1/B Σ_i max_{‖δ_i‖∞ ≤ ε} CE(t·norm(φ_θ(x_i + δ_i))·Cᵀ, y_i)      (labels of --column)

the inner max by `attack_steps` steps of ℓ∞ PGD (attack.pgd, from a random start, the model's current
weights), C the column's class embeddings over eval's templates from the frozen text tower, t the frozen
logit scale. Only the image tower trains (the text tower, the logit scale and any adapter stay), the model in
eval mode throughout (BatchNorm statistics and dropout as the checkpoint has them). FARE keeps the embedding
of a clean image where it was, so the text tower and every zero-shot classifier still fit; TeCoA fits the one
column's classifier.

Not implemented from the papers: their scale (FARE/TeCoA fine-tune ViT-B/L CLIP for 2 ImageNet epochs, 20k
steps of 128, PGD-10, lr 1e-5; the default here is 200 steps of 32 images with PGD-5 at lr 1e-4 — a CPU
budget, set by --steps/--attack-steps/--lr), their data augmentation (random crops and flips) and learning-
rate warm-up and cosine schedule (constant here), and TeCoA's visual prompting variant.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.progress import track

from lipkit.adapt.run import _save
from lipkit.attack.pgd import Loss, embeddings, pgd, zeroshot_loss
from lipkit.attack.scoring import check_model, task_targets
from lipkit.checkpoint import load_checkpoint
from lipkit.config_eval import EvalConfig
from lipkit.data.image_store import ImageStore, epoch_batches
from lipkit.data.records import spread_subset
from lipkit.data.sources.registry import eval_labels, read_table
from lipkit.device import pick_device
from lipkit.errors import UserError
from lipkit.eval.evaluate import check_has_images

METHODS = ("fare", "tecoa")


@dataclass
class HardenSettings:
    method: str = "tecoa"
    eps: float = 2 / 255  # the ℓ∞ budget trained against
    attack_steps: int = 5  # PGD steps of the inner max (the papers: 10)
    step_size: float | None = None  # None: max(ε/4, 1/255), as `lipkit attack`
    steps: int = 200
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 1e-4
    column: str = "subcategory"  # tecoa: the class column
    seed: int = 0
    templates: list[str] = field(default_factory=lambda: list(EvalConfig().templates))

    def __post_init__(self) -> None:
        if self.step_size is None:
            self.step_size = max(self.eps / 4, 1 / 255 if self.eps else 0.0)


def _check(s: HardenSettings, out: Path, overwrite: bool) -> None:
    if s.method not in METHODS:
        raise UserError(f"--method must be one of {', '.join(METHODS)}, not '{s.method}'.")
    if not 0 < s.eps <= 1 or s.attack_steps < 1 or not (s.step_size or 0) > 0:
        raise UserError(
            "--eps must be in (0, 1] (e.g. 2/255), --attack-steps at least 1, --step-size above 0."
        )
    if s.steps < 1 or s.batch_size < 1 or not s.lr > 0:
        raise UserError("--steps and --batch-size must be at least 1 and --lr above 0.")
    if out.exists() and not out.is_dir():
        raise UserError(f"Output '{out}' is a file; choose a directory path.")
    if (out / "checkpoint").exists() and not overwrite:
        raise UserError(f"'{out / 'checkpoint'}' already exists; choose another OUT or pass --overwrite.")


def fare_loss(model, reference: torch.Tensor) -> Loss:
    """‖φ_θ(x) − φ₀(x_clean)‖²₂ per image, `reference` = φ₀ of the clean batch (B, D)."""
    return lambda x: (embeddings(model, x) - reference.to(x)).pow(2).sum(1)


def _loss(model, original, s: HardenSettings, x: torch.Tensor, labels, classes) -> Loss:
    if s.method == "fare":
        with torch.no_grad():
            reference = embeddings(original, x)
        return fare_loss(model, reference)
    return zeroshot_loss(model, classes.to(x.device), labels.to(x.device))


class FrozenImageSide(torch.nn.Module):
    """φ₀ for FARE: a frozen copy of the model's image tower and image adapter (not the text tower)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.spec = model.spec
        self.visual = copy.deepcopy(model.visual).requires_grad_(False)
        self.image_adapter = copy.deepcopy(model.image_adapter)
        if self.image_adapter is not None:
            self.image_adapter.requires_grad_(False)

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        feats = self.visual(images)
        feats = self.image_adapter(feats) if self.image_adapter is not None else feats
        return torch.nn.functional.normalize(feats, dim=-1) if normalize else feats


def fine_tune(model, store: ImageStore, s: HardenSettings, classes=None, labels=None) -> dict[str, Any]:
    """Train `model.visual` in place (module docstring); the first and last steps' losses, clean and
    adversarial, both before that step's update. The model's requires_grad flags are restored."""
    flags = [p.requires_grad for p in model.parameters()]
    original = FrozenImageSide(model) if s.method == "fare" else None
    params = list(model.visual.parameters())
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    gen = torch.Generator().manual_seed(s.seed)
    history = []
    batches = epoch_batches(len(store.records), s.steps, s.batch_size, torch.Generator().manual_seed(s.seed))
    for step, rows in enumerate(track(batches, description=f"{s.method} ε={s.eps:.4g}")):
        x = store.get(rows.tolist()).to(model.device).float() / 255.0
        y = labels[rows] if labels is not None else None
        loss_fn = _loss(model, original, s, x, y, classes)
        model.requires_grad_(False)  # the inner max needs the image's gradient only
        adversarial = pgd(loss_fn, x, s.eps, s.attack_steps, s.step_size, "linf", gen)
        if step in (0, s.steps - 1):
            with torch.no_grad():
                clean = float(loss_fn(x).mean())
        model.visual.requires_grad_(True)
        loss = loss_fn(adversarial).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step in (0, s.steps - 1):
            history.append({"step": step + 1, "adversarial": float(loss.detach()), "clean": clean})
    for p, flag in zip(model.parameters(), flags, strict=True):
        p.requires_grad_(flag)
    return {"trainable_parameters": sum(p.numel() for p in params), "loss": history}


def harden_checkpoint(
    checkpoint: str | Path, data: str | Path, out: str | Path, overwrite: bool = False, **settings: Any
) -> dict[str, Any]:
    """Fine-tune `checkpoint`'s image tower on `data`'s images (module docstring); save OUT/checkpoint
    (config.json's `adapted` records the method, its settings and the losses) and return that record."""
    s = HardenSettings(**settings)
    checkpoint, out = Path(checkpoint).expanduser(), Path(out).expanduser()
    _check(s, out, overwrite)
    model, tokenizer, info = load_checkpoint(checkpoint)
    check_model(model, info, "zeroshot" if s.method == "tecoa" else "retrieval", s.column)
    model.to(pick_device("auto")).eval()
    torch.manual_seed(s.seed)
    records = spread_subset(read_table(data), s.steps * s.batch_size)  # the images the steps will see
    store = ImageStore(records, model.spec.image_size, cache=True, desc="harden")
    check_has_images("", store)
    classes = labels = None
    if s.method == "tecoa":
        cfg = EvalConfig(class_columns=[s.column], templates=s.templates, precision="fp32")
        found = task_targets(model, tokenizer, store.records, "zeroshot", s.column, cfg, eval_labels(data))
        classes, labels = found.emb, found.truth
    trained = fine_tune(model, store, s, classes, labels)
    kept = {k: v for k, v in asdict(s).items() if s.method == "tecoa" or k not in ("column", "templates")}
    record = {"from": str(checkpoint.resolve()), "data": str(data), **kept, **trained}
    _save(out, (model.cpu(), tokenizer, info), record)
    return record
