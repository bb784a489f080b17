"""Captions from a checkpoint's caption decoder (models.caption_decoder): beam search over its next-token
distribution, given the image tower's normalised tokens (CoCa) or, for a text-only decoder
(objectives.capdec), the normalised image embedding in place of the text embedding it was trained on.

A hypothesis starts with the start token; each step extends every live hypothesis by its `beam` most
likely next tokens and keeps the `beam` best by total log-probability; one ending in the end token is
finished. The search stops when `beam` hypotheses are finished and none alive can still beat the best
(log-probabilities only fall), or at the context length. `beam=1` is greedy decoding.

MacCap's sampling and CLIP re-ranking (Qiu et al., 2024; `samples` = N > 0, text-only decoders): beside the
image embedding e, N noised copies e + σ·n_s (σ the decoder's training noise, n_s ~ N(0, I) drawn from
`seed`, the same for every image) are decoded too, and of the N + 1 captions the one whose text embedding
has the highest cosine with e by the checkpoint's own towers is kept. Nothing is random across calls: the
same checkpoint, images and seed give the same captions.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from lipkit.errors import UserError
from lipkit.eval.embedding import embed_texts
from lipkit.eval.token_similarity import pooled_and_tokens
from lipkit.models.dual_encoder import DualEncoder
from lipkit.text.tokenizer import TextTokenizer


@torch.no_grad()
def beam_search(
    model: DualEncoder, image_tokens: torch.Tensor, sot: int, eot: int, beam: int, max_tokens: int
) -> tuple[list[int], float]:
    """One image's (N, D) tokens (normalised; as the tower gives them for OpenCLIP's CoCa layout) → (the best
    token ids after the start token, up to and without the end token; its total log-probability)."""
    decoder = model.caption_reader
    alive: list[tuple[list[int], float]] = [([sot], 0.0)]
    finished: list[tuple[list[int], float]] = []
    for _ in range(max_tokens):
        ids = torch.tensor([seq for seq, _ in alive], device=image_tokens.device)
        logits = decoder.last_logits(ids, image_tokens[None].expand(len(alive), -1, -1))
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        logp = torch.log_softmax(logits, dim=-1).cpu()
        top = logp.topk(min(beam, logp.shape[1]), dim=1)
        cands = [
            (seq + [int(t)], score + float(v))
            for (seq, score), vs, ts in zip(alive, top.values, top.indices, strict=True)
            for v, t in zip(vs, ts, strict=True)
        ]
        cands.sort(key=lambda c: -c[1])
        alive = []
        for seq, score in cands[:beam]:
            (finished if seq[-1] == eot else alive).append((seq, score))
        finished.sort(key=lambda c: -c[1])
        if not alive or (len(finished) >= beam and finished[0][1] >= alive[0][1]):
            break
    best = max(finished or alive, key=lambda c: c[1])
    seq = best[0][1:]
    return (seq[:-1] if seq and seq[-1] == eot else seq), best[1]


def caption_images(
    model: DualEncoder,
    tokenizer: TextTokenizer,
    images_u8: torch.Tensor,
    beam: int = 3,
    max_tokens: int = 0,
    samples: int = 0,
    seed: int = 0,
) -> list[dict[str, object]]:
    """uint8 (B, 3, S, S) at the model's size → [{"caption", "log_prob", "tokens"}] per image. `max_tokens`:
    at most this many generated tokens (0: up to the context length); `samples`: MacCap's noised
    candidates re-ranked by the towers (module docstring), drawn from `seed`."""
    _check_decoding(model, beam, samples)
    limit = model.spec.context_length - 1
    steps = min(max_tokens, limit) if max_tokens > 0 else limit
    model.eval()
    pooled, tokens = pooled_and_tokens(model, images_u8, normalize_tokens=model.spec.caption_input != "text")
    if model.spec.caption_input == "embedding":  # a text-only decoder reads the image embedding
        tokens = pooled[:, None, :]
    noise = _noise(model, samples, seed, pooled.shape[1])
    out = []
    for image, embedding in zip(tokens.to(model.device), pooled, strict=True):
        inputs = [image] + [image + n.to(image) for n in noise]  # noise: (N, 1, D) for a text-only decoder
        found = [beam_search(model, x, tokenizer.sot_id, tokenizer.eot_id, beam, steps) for x in inputs]
        ids, logp = found[_most_similar(model, tokenizer, embedding, found)] if len(noise) else found[0]
        out.append({"caption": tokenizer.decode(ids), "log_prob": round(logp, 4), "tokens": len(ids)})
    return out


def _check_decoding(model: DualEncoder, beam: int, samples: int) -> None:
    if not model.has_captioner:
        raise UserError(
            "This checkpoint has no caption decoder; train one with the coca, capdec or connector objective "
            "(docs/captioning.md)."
        )
    if beam < 1:
        raise UserError(f"The beam width must be at least 1, got {beam}.")
    if samples < 0:
        raise UserError(f"The number of sampled captions must be 0 or more, got {samples}.")
    if samples and model.spec.caption_input != "embedding":
        raise UserError(
            "Sampling noised captions (MacCap) needs a text-only decoder (the capdec objective); this "
            "checkpoint's decoder reads image tokens, so drop --samples."
        )
    if samples and float(model.captioner.noise_std) <= 0:
        raise UserError(
            "This decoder was trained without noise (noise_std 0), so every sample would be the same caption; "
            "drop --samples."
        )


def _noise(model: DualEncoder, samples: int, seed: int, dim: int) -> torch.Tensor:
    """(N, 1, D) Gaussian noise of the decoder's training σ, drawn from `seed` (N = `samples`; 0: none)."""
    if not samples:
        return torch.zeros(0, 1, dim)
    gen = torch.Generator().manual_seed(seed)
    return float(model.captioner.noise_std) * torch.randn(samples, 1, dim, generator=gen)


def _most_similar(
    model: DualEncoder,
    tokenizer: TextTokenizer,
    embedding: torch.Tensor,
    found: list[tuple[list[int], float]],
) -> int:
    """The index of the candidate caption whose text embedding is most similar to the image's (the first on
    ties: the caption of the image embedding itself)."""
    texts = [tokenizer.decode(ids) for ids, _ in found]
    with torch.no_grad():
        feats = embed_texts(model, tokenizer, texts, len(texts))
    return int((feats @ embedding.float()).argmax())


def caption_files(
    model: DualEncoder,
    tokenizer: TextTokenizer,
    paths: Sequence[str],
    beam: int = 3,
    max_tokens: int = 0,
    samples: int = 0,
) -> list[dict[str, object]]:
    """Image files → their captions (`caption_images`, 32 images at a time), each with its path; a missing
    or unreadable file is refused before any is captioned."""
    from lipkit.data.images import load_image

    for p in paths:
        if not Path(p).is_file():
            raise UserError(f"Image '{p}' does not exist; pass the path of an image file.")
    found: list[dict[str, object]] = []
    for s in range(0, len(paths), 32):
        images = []
        for p in paths[s : s + 32]:
            try:
                images.append(load_image(p, model.spec.image_size))
            except (OSError, ValueError) as e:
                raise UserError(
                    f"Image '{p}' cannot be decoded ({e}); pass a PNG, JPEG, WebP, GIF or BMP file."
                ) from None
        found += caption_images(model, tokenizer, torch.stack(images), beam, max_tokens, samples)
    return [{"path": str(p), **c} for p, c in zip(paths, found, strict=True)]
