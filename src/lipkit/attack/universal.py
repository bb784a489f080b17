"""One perturbation for every image: a universal adversarial perturbation (UAP) learned with C-PGC's
malicious contrastive objective (Fang et al., ICCV 2025, "One Perturbation is Enough: On Generating Universal
Adversarial Perturbations against Vision-Language Pre-training Models"; read against github
ffhibnese/CPGC_VLP_Universal_Attacks), and the random perturbation it is compared with.

A single δ ∈ [−ε, ε]^{3×H×W} is learned on a training table's images and then added to every image of the
attacked split. For a training batch of clean images x_i (pixels in [0, 1]), f the normalised image embedding,
a_i = clip(x_i + n_i + δ, 0, 1) with n_i ~ U[−ε, ε] per pixel (the reference code's noise augmentation),
t_j the normalised embeddings of the training pool's captions (each image's `eval.retrieval_caption`):

    P_i = Σ_{j ∈ own(i)} exp(f(a_i)·t_j / τ)          the image's own captions: the negatives
    G_i = Σ_{j ∈ far(i)} exp(f(a_i)·t_j / τ)          far(i): the captions of the pool image whose captions'
                                                       mean similarity to the clean f(x_i) is lowest: positives
    L(δ) = 1/B Σ_i [ −log(G_i / (G_i + P_i)) − λ·‖f(a_i) − f(x_i)‖²₂ ]

minimised by signed-gradient steps δ ← clip(δ − α·sign(∇_δ L), −ε, ε), one batch per step, from a random
start in the ball. The adversarial split is toward(x, clip(x + δ, 0, 1)): 8-bit, as `lipkit attack`'s PGD.

`random_perturbation` is the baseline of the same budget: one δ with each pixel ±ε at random (a corner of the
ℓ∞ ball, the largest random change it allows).

Not implemented from the paper: the generator (a network with cross-attention on text conditions, trained by
Adam, that outputs δ — here δ itself is optimised, the classic UAP formulation), its multi-scale resize
augmentation, and the text-side universal perturbation (a learned word embedding). The reference code takes
log(P/(P+G)) of batch means and weights the squared distance 0.1 on a batch sum; here both terms are
per-image means with λ = 1 and τ = 0.1 (lipkit's choices).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from rich.progress import track

from lipkit.attack.pgd import embeddings
from lipkit.data.image_store import ImageStore, epoch_batches
from lipkit.eval.embedding import embed_texts
from lipkit.eval.evaluate import RetrievalTexts


@dataclass
class UniversalSettings:
    eps: float = 2 / 255
    steps: int = 200
    batch_size: int = 32
    step_size: float | None = None  # None: ε/8
    tau: float = 0.1
    weight: float = 1.0  # λ of the distance term
    caption: int = 0  # which caption of each pool image (eval.retrieval_caption)
    seed: int = 0


def contrastive_loss(
    adv: torch.Tensor, texts: torch.Tensor, own: torch.Tensor, far: torch.Tensor, tau: float
) -> torch.Tensor:
    """−log(G/(G+P)) per image (module docstring); `own`, `far`: (B, T) masks over the caption rows."""
    logits = adv @ texts.t() / tau
    positive = logits.masked_fill(~far, float("-inf")).logsumexp(1)
    negative = logits.masked_fill(~own, float("-inf")).logsumexp(1)
    return torch.logaddexp(positive, negative) - positive


def farthest(clean: torch.Tensor, texts: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """(B,) the pool image whose captions' mean similarity to each clean feature is lowest (relevant: (T, N))."""
    means = (relevant.t().to(texts) @ texts) / relevant.sum(0).clamp_min(1).unsqueeze(1).to(texts)
    return (clean @ means.t()).argmin(1)


def learn_universal(
    model, tokenizer, store: ImageStore, s: UniversalSettings, text_batch: int = 256
) -> tuple[torch.Tensor, list[float]]:
    """δ (3, H, W) learned on `store`'s images (the model frozen, in eval mode), and the loss at each step."""
    pool = RetrievalTexts.of(store.records, s.caption)
    device = model.device
    texts = embed_texts(model, tokenizer, pool.texts, text_batch).to(device).float()
    relevant = pool.relevant.to(device)
    gen = torch.Generator().manual_seed(s.seed)
    size = model.spec.image_size
    delta = (torch.rand(3, size, size, generator=gen) * 2 - 1).to(device) * s.eps
    alpha = s.step_size or s.eps / 8
    losses = []
    for rows in track(
        epoch_batches(len(store.records), s.steps, s.batch_size, gen), description=f"uap ε={s.eps:.4g}"
    ):
        x = store.get(rows.tolist()).to(device).float() / 255.0
        with torch.no_grad():
            clean = F.normalize(embeddings(model, x), dim=-1)
            far = relevant[:, farthest(clean, texts, relevant)].t()
        noise = (torch.rand(x.shape, generator=gen) * 2 - 1).to(device) * s.eps
        delta.requires_grad_(True)
        adv = F.normalize(embeddings(model, (x + noise + delta).clamp(0, 1)), dim=-1)
        distance = (adv - clean).pow(2).sum(1)
        own = relevant[:, rows.to(device)].t()
        loss = (contrastive_loss(adv, texts, own, far, s.tau) - s.weight * distance).mean()
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta = (delta - alpha * grad.sign()).clamp(-s.eps, s.eps)
        losses.append(float(loss.detach()))
    return delta.detach().cpu(), losses


def random_perturbation(shape: tuple[int, ...], eps: float, seed: int) -> torch.Tensor:
    """One δ of `shape` with every pixel +ε or −ε at random (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, shape, generator=gen) * 2 - 1).float() * eps
