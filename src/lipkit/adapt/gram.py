"""`lipkit adapt --method gram-meta`: GRAM's meta-training of a prompt initialisation and a gradient
regulator (Li et al., 2023, "Gradient-Regulated Meta-Prompt Learning for Generalizable Vision-Language
Models"); `--method gram` then fine-tunes that context on the shots (adapt.learners.GramLearner).

With θ the (M, width) class-shared prompt context (models.prompt_context), ψ_φ the gradient regulator
(models.gradient_regulator) and a task's loss L(θ) the cross-entropy of its images among its concepts'
prompted captions at the checkpoint's logit scale (adapt.meta_tasks), one meta-step draws `tasks` pairs
(support S from one domain, query Q from another) and minimises over θ and φ

    θ′ = θ − α·ψ_φ(∇_θ L_S(θ))        (`inner_steps` such steps)
    L_meta = 1/T Σ_(S,Q) L_Q(θ′)

with Adam (`lr`). The meta-gradient is first-order, as in MAML's first-order approximation: the support
gradient is held constant (no second derivatives), so ∂θ′/∂θ = I and φ learns through ψ_φ(g) alone.
The result is OUT/gram.pt (θ, φ, the settings) and OUT/gram.json (what it was trained on and the meta
objective on `probe` fixed task pairs before and after). The towers never change.

Not implemented: the paper's pre-training-scale meta-data (CC3M-like pairs; lipkit uses the given table),
its second-order variant, its unlabelled-domain augmentation and its CoCoOp/MaPLe backbones.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.progress import track

from lipkit.adapt.meta_tasks import Concepts, Task, concepts_of, sample_pair
from lipkit.data.sources.registry import read_table
from lipkit.errors import UserError
from lipkit.models.gradient_regulator import GradientRegulator
from lipkit.models.prompt_context import prompted_features

META_FILE = "gram.pt"


@dataclass
class MetaSettings:
    steps: int = 200
    lr: float = 1e-3  # Adam on θ and φ
    inner_lr: float = 1.0  # α
    inner_steps: int = 1
    tasks: int = 4  # (support, query) pairs per meta-step
    ways: int = 16
    shots: int = 16
    domains: int = 8
    rank: int = 16  # ψ's rank
    probe: int = 32  # fixed task pairs the meta objective is reported on
    seed: int = 0


def task_loss(model, concepts: Concepts, task: Task, context: torch.Tensor) -> torch.Tensor:
    """L(θ): the task's images classified among its concepts' prompts with the (1, M, width) `context`."""
    ids = concepts.ids[task.concepts].to(model.device)
    feats = prompted_features(model.text, ids, context.expand(len(ids), -1, -1))
    text = F.normalize(feats.to(torch.promote_types(feats.dtype, torch.float32)), dim=-1)
    images = concepts.images[task.images].to(model.device, text.dtype)
    return F.cross_entropy(model.scale().detach() * images @ text.t(), task.labels.to(model.device))


def adapted_context(model, concepts, support: Task, context, regulator, s: MetaSettings) -> torch.Tensor:
    """θ′ after `inner_steps` regulated steps on the support task, the support gradients held constant."""
    fast = context
    for _ in range(s.inner_steps):
        held = fast.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(task_loss(model, concepts, support, held), held)
        fast = fast - s.inner_lr * regulator(grad)
    return fast


def meta_objective(model, concepts, pairs, context, regulator, s: MetaSettings) -> torch.Tensor:
    """L_meta over the (support, query) `pairs`."""
    losses = [
        task_loss(model, concepts, q, adapted_context(model, concepts, sup, context, regulator, s))
        for sup, q in pairs
    ]
    return torch.stack(losses).mean()


def meta_train(model, tokenizer, records, context: torch.Tensor, s: MetaSettings) -> dict[str, Any]:
    """Meta-train the (1, M, width) `context` in place and a regulator for it; the summary, with the
    regulator under "regulator"."""
    concepts = concepts_of(model, tokenizer, records, context.shape[1], s.domains, s.seed)
    g = torch.Generator().manual_seed(s.seed)
    probe = [sample_pair(concepts, s.ways, s.shots, g) for _ in range(s.probe)]
    torch.manual_seed(s.seed)
    regulator = GradientRegulator(context.numel(), s.rank).to(model.device)
    context.requires_grad_(True)

    def probed() -> float:
        return round(meta_objective(model, concepts, probe, context, regulator, s).item(), 4)

    start = probed()
    opt = torch.optim.Adam([context, *regulator.parameters()], lr=s.lr)
    for _ in track(range(s.steps), description="meta-train (gram)"):
        pairs = [sample_pair(concepts, s.ways, s.shots, g) for _ in range(s.tasks)]
        loss = meta_objective(model, concepts, pairs, context, regulator, s)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    summary = {
        "concepts": len(concepts.captions),
        "images": len(concepts.images),
        "rows_left_out": concepts.dropped,
        "domains": int((torch.bincount(concepts.domain) >= 2).sum()),  # those tasks are drawn from
        "meta_objective": [start, probed()],
    }
    return {"regulator": regulator, **summary}


def save_meta(out: Path, context, regulator: GradientRegulator, info: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    state = {"context": context.detach().cpu(), "regulator": regulator.state_dict(), "info": info}
    torch.save(state, out / META_FILE)
    (out / "gram.json").write_text(json.dumps(info, indent=1))
    return out / META_FILE


def load_meta(
    where: str | Path, width: int, checkpoint: Path | None = None
) -> tuple[torch.Tensor, GradientRegulator, dict[str, Any]]:
    """(θ₀ (1, M, width), ψ_φ, the meta-training record) from a gram-meta run directory (or its gram.pt),
    refused when it was meta-trained on another checkpoint than `checkpoint` (a context means nothing in
    another model's word-embedding space)."""
    path = Path(where).expanduser()
    path = path / META_FILE if path.is_dir() else path
    if not path.is_file():
        raise UserError(
            f"'{where}' holds no {META_FILE}; run `lipkit adapt CHECKPOINT OUT --method gram-meta --data TABLE` "
            "first and pass its OUT as --meta."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        context, info = state["context"], state["info"]
        regulator = GradientRegulator(context.numel(), int(info["rank"]))
        regulator.load_state_dict(state["regulator"])
        info["inner_lr"], info["inner_steps"] = float(info["inner_lr"]), int(info["inner_steps"])
    except Exception as e:  # a foreign or damaged file
        raise UserError(f"'{path}' is not a GRAM meta-training file ({e}); re-run --method gram-meta.") from e
    if context.shape[-1] != width:
        raise UserError(
            f"'{path}' was meta-trained for a text tower with {context.shape[-1]}-wide word embeddings, and this "
            f"checkpoint's are {width}; meta-train on this checkpoint."
        )
    source = info.get("from")
    if checkpoint is not None and source and Path(source) != Path(checkpoint).resolve():
        raise UserError(
            f"'{path}' was meta-trained on the checkpoint '{source}', not '{checkpoint}'; meta-train on this "
            "checkpoint (--method gram-meta) and pass that run as --meta."
        )
    return context, regulator, info


def run_meta(model, tokenizer, data: Path, out: Path, context, s: MetaSettings, source: str, init: str):
    """Meta-train on the table `data` from `context` (drawn, or spelled by the phrase `init`) and write
    OUT/gram.pt; the record it keeps."""
    records = read_table(data)
    trained = meta_train(model, tokenizer, records, context, s)
    regulator = trained.pop("regulator")
    info = {"method": "gram-meta", "from": source, "data": str(data), "context": context.shape[1]}
    info.update({"context_init": init, **asdict(s)})
    info.update(trained)
    info["trainable_parameters"] = context.numel() + sum(p.numel() for p in regulator.parameters())
    save_meta(out, context, regulator, info)
    return info
