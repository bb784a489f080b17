"""`lipkit adapt`: few-shot adaptation of a trained checkpoint to a labelled column of a table.

The classes are the column's values (or its base or novel half, adapt.few_shot); K images per class
(`shots`, drawn with `seed`) are the training set. Each class c is the mean of its prompts' normalised text
embeddings over the templates, re-normalised (zero-shot CLIP's classifier, eval.zeroshot), and an image x
is classified by softmax(t · x̂ · ĉᵀ) with the checkpoint's own logit scale t, so the loss is

    L = −1/N Σ_i log softmax_c(t · x̂_i · ĉ_c)_{y_i}

over the N = K·C shots: CoOp's objective (Zhou et al., 2022), here with LoRA (adapt.lora) in the chosen
towers as the only trainable parameters. Full-batch AdamW for `steps` steps; a tower that is not adapted
runs once (the image features, or the class features). The LoRA branches are then merged and the model
saved as an ordinary checkpoint in OUT/checkpoint, its config.json keeping the source's training record
(so eval scores it as the source is scored) plus `adapted` (method, column, classes, shots, seed, steps,
trainable parameters, the shots' loss and top-1 before and after). Checkpoints scored token-wise or
lexically (FILIP, Wukong, LexLIP) are refused: this loss trains the pooled similarity.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.progress import track

from lipkit.adapt.few_shot import class_split, few_shot
from lipkit.adapt.lora import add_lora, merge
from lipkit.checkpoint import load_checkpoint, save_checkpoint
from lipkit.config_eval import EvalConfig
from lipkit.data.image_store import ImageStore
from lipkit.data.sources.registry import read_table
from lipkit.errors import UserError
from lipkit.eval.zeroshot import class_embeddings
from lipkit.models.dual_encoder import DualEncoder
from lipkit.text.tokenizer import TextTokenizer

TOWERS = {"text": ("text",), "image": ("visual",), "both": ("visual", "text")}
TOKEN_SCORED = {"filip": "token-wise", "wukong": "token-wise", "lexlip": "lexically"}
# config.json keys save_checkpoint writes itself (the rest of the source's config is carried over)
SAVED_BY_CHECKPOINT = ("lipkit_version", "model", "max_logit_scale", "context_length", "adapted")


def class_features(
    model: DualEncoder, tokenizer: TextTokenizer, classes: list[str], templates: list[str]
) -> torch.Tensor:
    """(C, D) normalised class embeddings: each class's prompt embeddings averaged (with the graph when
    the text tower trains)."""
    ids = tokenizer([t.format(c) for c in classes for t in templates]).to(model.device)
    return class_embeddings(F.normalize(model.text(ids), dim=-1), len(classes), len(templates))


def image_features(model: DualEncoder, store: ImageStore) -> torch.Tensor:
    """The shots' (N, D) normalised image embeddings (with the graph when the image tower trains)."""
    from lipkit.data.transforms import normalize

    if not len(store.records):
        raise UserError("None of the shots' images can be read; check the table's image paths.")
    pixels = store.get(range(len(store.records)))
    x = normalize(pixels, model.spec.image_mean, model.spec.image_std).to(model.device)
    return F.normalize(model.visual(x), dim=-1)


class Shots:
    """The shots and class prompts; a tower that does not train is run once and its features kept."""

    def __init__(self, model, tokenizer, store, classes, templates, labels, adapted: tuple[str, ...]) -> None:
        self.model, self.tokenizer, self.store = model, tokenizer, store
        self.classes, self.templates, self.labels = classes, templates, labels
        with torch.no_grad():
            self.image = None if "visual" in adapted else image_features(model, store)
            self.text = None if "text" in adapted else class_features(model, tokenizer, classes, templates)

    def loss(self) -> tuple[torch.Tensor, float]:
        """The cross-entropy of the shots and their top-1."""
        img = self.image if self.image is not None else image_features(self.model, self.store)
        cls = self.text
        if cls is None:
            cls = class_features(self.model, self.tokenizer, self.classes, self.templates)
        logits = self.model.scale().detach() * img @ cls.t()
        return F.cross_entropy(logits, self.labels), (logits.argmax(1) == self.labels).float().mean().item()


def _fit(
    shots: Shots, params: list, steps: int, lr: float
) -> tuple[tuple[float, float], tuple[float, float]]:
    """Full-batch AdamW on the LoRA parameters; the shots' (loss, top-1) before and after."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    with torch.no_grad():
        start = shots.loss()
    for _ in track(range(steps), description="adapt"):
        loss, _ = shots.loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        end = shots.loss()
    return (start[0].item(), start[1]), (end[0].item(), end[1])


def _check(checkpoint: Path, out: Path, overwrite: bool, towers: str, model: DualEncoder, info: dict) -> None:
    """Refuse, in one sentence each, what this adaptation cannot do."""
    if out.exists() and not out.is_dir():
        raise UserError(f"Output '{out}' is a file; choose a directory path.")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"Output '{out}' already exists; choose a new path or pass --overwrite.")
    if (out / "checkpoint").resolve() == checkpoint.resolve():
        raise UserError(f"Output '{out}' would overwrite the checkpoint being adapted; choose another path.")
    if towers not in TOWERS:
        raise UserError(f"The towers to adapt must be one of {', '.join(TOWERS)}, not '{towers}'.")
    if "visual" in TOWERS[towers] and model.spec.vision_tower != "vit":
        raise UserError(
            "LoRA on a timm image tower is not supported yet; adapt the text tower (--towers text)."
        )
    objective = (info.get("train") or {}).get("objective", "")
    if objective in TOKEN_SCORED:
        raise UserError(
            f"This checkpoint is scored {TOKEN_SCORED[objective]} (train.objective {objective}) and adapt trains "
            "the pooled similarity; adapt a checkpoint trained with a pooled objective (e.g. infonce, siglip)."
        )


def _classes(records, column: str, split: str) -> list[str]:
    values = [r.meta.get(column) for r in records if r.meta.get(column) not in (None, "")]
    classes = class_split([str(v) for v in values], split) if values else []
    if len(classes) < 2:
        raise UserError(
            f"Column '{column}' has {len(classes)} class(es) in the '{split}' split of the table; adapting needs "
            "2 or more: pass another --column, or --classes all."
        )
    return classes


def adapt_checkpoint(
    checkpoint: str | Path,
    data: str | Path,
    column: str,
    out: str | Path,
    shots: int = 16,
    seed: int = 0,
    split: str = "all",
    towers: str = "text",
    rank: int = 4,
    alpha: float = 8.0,
    steps: int = 100,
    lr: float = 1e-3,
    templates: list[str] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Adapt `checkpoint` to `column` of the table `data` with LoRA (module docstring); write the merged
    checkpoint to `out`/checkpoint (a run directory: `lipkit eval` then writes `out`/eval) and return what
    its config.json records under `adapted`."""
    checkpoint, out = Path(checkpoint).expanduser(), Path(out).expanduser()
    model, tokenizer, source = load_checkpoint(checkpoint)
    _check(checkpoint, out, overwrite, towers, model, source)
    records = read_table(data)
    classes = _classes(records, column, split)
    shot_records, _ = few_shot(records, column, shots, seed, classes)
    model.requires_grad_(False)  # only the LoRA branches train
    torch.manual_seed(seed)
    adapted = [getattr(model, name) for name in TOWERS[towers]]
    params = add_lora(adapted, rank, alpha)
    model.eval()  # no dropout; frozen statistics
    store = ImageStore(shot_records, model.spec.image_size, cache=True, desc="shots")
    # (the store drops unreadable images from its records: the labels follow what is left)
    labels = torch.tensor([classes.index(str(r.meta[column])) for r in store.records], device=model.device)
    batch = Shots(
        model, tokenizer, store, classes, templates or EvalConfig().templates, labels, TOWERS[towers]
    )
    (start_loss, start_acc), (end_loss, end_acc) = _fit(batch, params, steps, lr)
    merged = merge(adapted)
    model.requires_grad_(True)
    info = {
        "method": "lora",
        "from": str(checkpoint.resolve()),
        "column": column,
        "split": split,
        "classes": len(classes),
        "shots": shots,
        "seed": seed,
        "towers": towers,
        "rank": rank,
        "alpha": alpha,
        "steps": steps,
        "lr": lr,
        "weights_adapted": merged,
        "trainable_parameters": sum(p.numel() for p in params),
        "shot_loss": [round(start_loss, 4), round(end_loss, 4)],
        "shot_top1": [round(start_acc, 4), round(end_acc, 4)],
    }
    kept = {k: v for k, v in source.items() if k not in SAVED_BY_CHECKPOINT}
    save_checkpoint(out / "checkpoint", model, tokenizer, {**kept, "adapted": info})
    return info
