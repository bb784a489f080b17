"""`lipkit adapt --method pic2word|rtd`: teach a trained checkpoint composed image retrieval (a reference
image plus words finds a target image) without a single labelled triplet of images.

pic2word (Saito et al., 2023, "Pic2Word: Mapping Pictures to Words for Zero-shot Composed Image
Retrieval"): the mapping network φ (models.pseudo_word) trains on the table's images alone, the towers
frozen. With v̂_i an image's normalised embedding and q_i = g("a photo of [φ(v̂_i)]"),

    L = ½ [CE(t·q̂ v̂ᵀ, I) + CE(t·v̂ q̂ᵀ, I)]                              over a batch of B images

(t the checkpoint's logit scale): the pseudo-word must say enough about its image to find it again.

rtd (Byun et al., 2024, "Reducing Task Discrepancy of Text Encoders for Zero-Shot Composed Image
Retrieval"): with φ fixed, the text tower g is tuned on text triplets (reference caption T_r,
modification T_c, target caption T_t) — here the captions of a table's composed queries (data.composed),
the first caption of each reference and target row. A frozen copy E of the text tower gives the anchors;
the pseudo-word is made from the reference *caption*, noised (RTD's refined concatenation),
s = φ(Ê(T_r) + ε·u·n/√D), u ~ U(0, 1), n ~ N(0, I), and with the refined batch sampling each triplet
gives two (query, anchor) pairs, (g("a photo of [s] that T_c"), E(T_t)) and (g("a photo of [s]"), E(T_r)).
Over the 2M normalised vectors z of the M = 2B pairs (anchors and queries),

    L = −1/2M Σ_i log [ exp(z_i·z_{p(i)}/τ) / Σ_{j≠i} exp(z_i·z_j/τ) ]           (τ = 0.07)

p(i) the other member of i's pair (RTD's contrastive loss, NT-Xent); a table repeats captions across its
triplets (RTD's LLM-written ones rarely do), so vectors paired with the same caption as i's pair are left out
of i's denominator rather than counted as negatives. All of g trains (AdamW, RTD's lr 1e-5,
weight decay 0.01); the checkpoint keeps the tuned g as its text tower, so plain text search uses it too
(docs/adapt.md measures what that costs).

Not implemented: Pic2Word's CC3M-scale training and its prompt ensembles; RTD's LLM-written triplets
(the table's own composed queries are used), its choice among projection methods (SEARLE, LinCIR: φ is
Pic2Word's here) and its learning-rate schedule.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.progress import track

from lipkit.data.composed import triplets
from lipkit.data.image_store import ImageStore
from lipkit.data.sources.registry import read_table
from lipkit.errors import UserError
from lipkit.eval.embedding import embed_images, embed_texts
from lipkit.models.pseudo_word import PROMPT, TRAIN_PROMPT, PseudoWord, check_prompt, composed_features

DEFAULTS = {"pic2word": {"steps": 300, "lr": 1e-4}, "rtd": {"steps": 200, "lr": 1e-5}}


@dataclass
class ComposeSettings:
    method: str = "pic2word"
    steps: int = 300
    lr: float = 1e-4
    batch_size: int = 256  # images (pic2word) or text triplets (rtd) per step
    seed: int = 0
    prompt: str = PROMPT  # the query's wording at search time
    noise: float = 0.5  # rtd: ε
    tau: float = 0.07  # rtd: τ
    hidden: int = 512  # pic2word: φ's hidden width
    dropout: float = 0.1  # pic2word: φ's dropout


def nt_xent(
    anchors: torch.Tensor, queries: torch.Tensor, tau: float, ids: torch.Tensor | None = None
) -> torch.Tensor:
    """RTD's contrastive loss over the joint set of (M, D) anchors and queries (module docstring). `ids`:
    (M,) an id per anchor (its caption); vectors paired with the same caption as i's pair are left out of
    i's denominator instead of counted as negatives (all ids distinct: RTD's loss exactly)."""
    z = torch.cat([anchors, queries])
    z = F.normalize(z.to(torch.promote_types(z.dtype, torch.float32)), dim=-1)
    m = anchors.shape[0]
    sim = (z @ z.t() / tau).fill_diagonal_(float("-inf"))
    pair = torch.cat([torch.arange(m, 2 * m), torch.arange(m)]).to(z.device)
    if ids is not None:  # the same caption elsewhere in the batch is no negative
        group = torch.cat([ids, ids]).to(z.device)
        same = group[:, None] == group[None, :]
        same[torch.arange(2 * m, device=z.device), pair] = False
        sim = sim.masked_fill(same, float("-inf"))
    return F.cross_entropy(sim, pair)


def _batches(n: int, size: int, steps: int, gen: torch.Generator):
    """`steps` index batches of min(size, n) distinct items: slices of seeded permutations, a new one
    when the rest of the last is too short (the rest is dropped, so no batch repeats an item)."""
    size, order = min(size, n), []
    for _ in range(steps):
        if len(order) < size:
            order = torch.randperm(n, generator=gen).tolist()
        yield torch.tensor(order[:size])
        order = order[size:]


def _pic2word(model, tokenizer, data: Path, s: ComposeSettings) -> tuple[PseudoWord, list[float]]:
    records = read_table(data)
    store = ImageStore(records, model.spec.image_size, cache=True, desc="training")
    if len(store.records) < 2:
        raise UserError(
            f"Pic2Word trains on the images of '{data}', and fewer than 2 can be read; add images."
        )
    v = embed_images(model, store, 256).to(model.device)
    word = PseudoWord(model.spec.embed_dim, model.text.word_width, s.hidden, s.dropout).to(model.device)
    scale = model.scale().detach()
    opt = torch.optim.AdamW(word.parameters(), lr=s.lr, weight_decay=0.0)
    gen, losses = torch.Generator().manual_seed(s.seed), []
    word.train()
    for idx in track(_batches(len(v), s.batch_size, s.steps, gen), total=s.steps, description="pic2word"):
        vb = v[idx.to(v.device)]
        q = F.normalize(
            composed_features(model.text, word, tokenizer, vb, [""] * len(idx), TRAIN_PROMPT), dim=-1
        )
        logits = scale * q @ vb.t()
        labels = torch.arange(len(idx), device=v.device)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return word.eval(), losses


def text_triplets(data: Path) -> list[tuple[str, str, str]]:
    """(reference caption, modification, target caption) of a table's composed queries, each once."""
    records = read_table(data)
    found, _ = triplets(records)
    out = {(records[t.reference].captions[0], t.text, records[t.target].captions[0]) for t in found}
    if not out:
        raise UserError(
            f"RTD trains on composed queries, and '{data}' names none (no 'composed' column, see docs/adapt.md); "
            "use a table built by `lipkit data build composed` (its train.jsonl)."
        )
    return sorted(out)


def _rtd(model, tokenizer, data: Path, s: ComposeSettings) -> tuple[PseudoWord, list[float]]:
    found = text_triplets(data)
    captions = sorted({c for r, _, t in found for c in (r, t)})
    frozen = copy.deepcopy(model.text).eval().requires_grad_(False)
    anchors = F.normalize(embed_texts(model, tokenizer, captions, 256, frozen), dim=-1).to(model.device)
    row = {c: i for i, c in enumerate(captions)}
    ref = torch.tensor([row[r] for r, _, _ in found], device=model.device)
    tgt = torch.tensor([row[t] for _, _, t in found], device=model.device)
    word = model.pseudo_word.eval()
    tower = model.text.requires_grad_(True).train()
    opt = torch.optim.AdamW(tower.parameters(), lr=s.lr, weight_decay=0.01)
    gen, losses = torch.Generator().manual_seed(s.seed), []
    for idx in track(_batches(len(found), s.batch_size, s.steps, gen), total=s.steps, description="rtd"):
        r, t = ref[idx.to(ref.device)], tgt[idx.to(tgt.device)]
        x = anchors[r]
        u = torch.rand(x.shape[0], 1, generator=gen).to(x.device)
        noised = x + s.noise * u * torch.randn(x.shape, generator=gen).to(x.device) / x.shape[1] ** 0.5
        with torch.no_grad():
            w = word(noised)
        mods = [found[i][1] for i in idx.tolist()]
        with_mod = composed_features(tower, None, tokenizer, w, mods, s.prompt)
        alone = composed_features(tower, None, tokenizer, w, [""] * len(mods), TRAIN_PROMPT)
        loss = nt_xent(torch.cat([anchors[t], x]), torch.cat([with_mod, alone]), s.tau, torch.cat([t, r]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    tower.eval().requires_grad_(False)
    if hasattr(tower, "_cache"):  # a Hugging Face tower's pooled features by token ids: stale now
        tower._cache.clear()
    return word, losses


def train_composer(
    model, tokenizer, data: Path, s: ComposeSettings
) -> tuple[dict[str, Any], PseudoWord, dict]:
    """Train `s.method` on `model` (frozen but for what the method trains) and return the adapter settings,
    the mapping network and what config.json records."""
    check_prompt(s.prompt)
    if s.method == "rtd" and model.pseudo_word is None:
        raise UserError(
            "RTD tunes the text tower of a checkpoint that already maps images to words; adapt it with "
            "`--method pic2word` first and run rtd on that checkpoint."
        )
    torch.manual_seed(s.seed)
    train = _pic2word if s.method == "pic2word" else _rtd
    word, losses = train(model, tokenizer, data, s)
    settings = {"method": s.method, "hidden": s.hidden, "dropout": s.dropout, "prompt": s.prompt}
    if s.method == "rtd":
        settings.update({k: model.spec.adapter[k] for k in ("hidden", "dropout")})
    trained = sum(
        p.numel() for p in (word.parameters() if s.method == "pic2word" else model.text.parameters())
    )
    info = {
        "steps": s.steps,
        "lr": s.lr,
        "batch_size": s.batch_size,
        "prompt": s.prompt,
        **({"noise": s.noise, "tau": s.tau} if s.method == "rtd" else {}),
        "trainable_parameters": trained,
        "loss": [round(losses[0], 4), round(losses[-1], 4)] if losses else [],
    }
    return settings, word, info
