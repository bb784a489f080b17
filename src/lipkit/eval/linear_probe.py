"""Linear-probe evaluation (Radford et al., 2021, "Learning Transferable Visual Models From Natural
Language Supervision", §3.2): how much a frozen image tower knows, read off by a linear classifier.

X (N, D) are the L2-normalised image embeddings of a labelled *probe* table (e.g. the training table),
standardised with the probe table's own mean μ and standard deviation σ: x̃ = (x − μ) / σ; y ∈ {0..C−1}.
The probe is a multinomial logistic regression,

    min_{W, b}  1/N Σ_i −log softmax(W x̃_i + b)_{y_i}  +  λ ‖W‖²_F

solved full-batch with L-BFGS (strong-Wolfe line search) as the CLIP paper does with scikit-learn.
λ is picked from a log grid by top-1 accuracy on a held-out `val_fraction` of the probe table, then the
probe is refit on the whole table with that λ. An evaluation split is scored by argmax(W x̃ + b); a class
of that split which the probe table lacks can never be predicted and counts as an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LAMBDAS: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)


def probe_loss(
    w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor, lam: float
) -> torch.Tensor:
    """The objective above (mean cross entropy + λ‖W‖²) for W (C, D), b (C,)."""
    return F.cross_entropy(x @ w.t() + b, y) + lam * w.pow(2).sum()


def _fit(x: torch.Tensor, y: torch.Tensor, n_classes: int, lam: float, max_iter: int) -> tuple:
    w = torch.zeros(n_classes, x.shape[1], dtype=x.dtype, requires_grad=True)
    b = torch.zeros(n_classes, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-7,
        tolerance_change=1e-10,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = probe_loss(w, b, x, y, lam)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


@dataclass
class LinearProbe:
    """A fitted probe: class names, the standardisation and the linear layer."""

    classes: list[str]
    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor  # (C, D)
    bias: torch.Tensor  # (C,)
    lam: float
    val_top1: float  # held-out accuracy at the chosen λ (nan when the table was too small to hold out)

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        x = (features.double() - self.mean) / self.std
        return x @ self.weight.t() + self.bias

    def classify(
        self, features: torch.Tensor, labels: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(scores over the probe's classes + one −inf column per class it lacks, label indices into
        those columns, number of classes the probe lacks) for a split with string `labels`."""
        unseen = sorted(set(labels) - set(self.classes))
        names = self.classes + unseen
        index = {c: i for i, c in enumerate(names)}
        scores = self.scores(features)
        if unseen:
            pad = torch.full((scores.shape[0], len(unseen)), float("-inf"), dtype=scores.dtype)
            scores = torch.cat([scores, pad], 1)
        return scores, torch.tensor([index[v] for v in labels]), len(unseen)


def fit_linear_probe(
    features: torch.Tensor,
    labels: Sequence[str],
    lambdas: Sequence[float] = LAMBDAS,
    val_fraction: float = 0.2,
    seed: int = 0,
    max_iter: int = 200,
) -> LinearProbe:
    """Fit the probe on (N, D) `features` with string `labels`, λ chosen on a held-out split."""
    if len(labels) != features.shape[0]:
        raise ValueError(f"{features.shape[0]} feature rows but {len(labels)} labels")
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise ValueError(f"a linear probe needs at least 2 classes, the probe table has {len(classes)}")
    x = features.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-8)
    x = (x - mean) / std
    index = {c: i for i, c in enumerate(classes)}
    y = torch.tensor([index[v] for v in labels])
    n_val = int(len(y) * val_fraction)
    val_top1 = float("nan")
    lam = lambdas[len(lambdas) // 2]
    if n_val >= len(classes) and len(lambdas) > 1:
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
        val, fit = perm[:n_val], perm[n_val:]
        accs = []
        for candidate in lambdas:
            w, b = _fit(x[fit], y[fit], len(classes), candidate, max_iter)
            accs.append(((x[val] @ w.t() + b).argmax(1) == y[val]).double().mean().item())
        best = max(range(len(lambdas)), key=lambda i: (accs[i], lambdas[i]))  # ties: the stronger λ
        lam, val_top1 = lambdas[best], accs[best]
    w, b = _fit(x, y, len(classes), lam, max_iter)
    return LinearProbe(classes, mean, std, w, b, lam, val_top1)
