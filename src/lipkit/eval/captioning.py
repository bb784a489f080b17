"""Captions from a checkpoint's caption decoder (models.caption_decoder): beam search over its next-token
distribution, given the image tower's normalised tokens (CoCa) or, for a text-only decoder
(objectives.capdec), the normalised image embedding in place of the text embedding it was trained on.

A hypothesis starts with the start token; each step extends every live hypothesis by its `beam` most
likely next tokens and keeps the `beam` best by total log-probability; one ending in the end token is
finished. The search stops when `beam` hypotheses are finished and none alive can still beat the best
(log-probabilities only fall), or at the context length. `beam=1` is greedy decoding. Nothing is random:
the same checkpoint and images give the same captions.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from lipkit.errors import UserError
from lipkit.eval.token_similarity import pooled_and_tokens
from lipkit.models.dual_encoder import DualEncoder
from lipkit.text.tokenizer import TextTokenizer


@torch.no_grad()
def beam_search(
    model: DualEncoder, image_tokens: torch.Tensor, sot: int, eot: int, beam: int, max_tokens: int
) -> tuple[list[int], float]:
    """One image's (N, D) normalised tokens → (the best token ids after the start token, up to and without
    the end token; its total log-probability)."""
    decoder = model.captioner
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
    model: DualEncoder, tokenizer: TextTokenizer, images_u8: torch.Tensor, beam: int = 3, max_tokens: int = 0
) -> list[dict[str, object]]:
    """uint8 (B, 3, S, S) at the model's size → [{"caption", "log_prob", "tokens"}] per image. `max_tokens`:
    at most this many generated tokens (0: up to the context length)."""
    if not model.has_captioner:
        raise UserError(
            "This checkpoint has no caption decoder; train one with the coca or capdec objective (docs/captioning.md)."
        )
    if beam < 1:
        raise UserError(f"The beam width must be at least 1, got {beam}.")
    limit = model.spec.context_length - 1
    steps = min(max_tokens, limit) if max_tokens > 0 else limit
    model.eval()
    pooled, tokens = pooled_and_tokens(model, images_u8)
    if model.spec.caption_input == "embedding":  # a text-only decoder reads the image embedding
        tokens = pooled[:, None, :]
    out = []
    for image in tokens.to(model.device):
        ids, logp = beam_search(model, image, tokenizer.sot_id, tokenizer.eot_id, beam, steps)
        out.append({"caption": tokenizer.decode(ids), "log_prob": round(logp, 4), "tokens": len(ids)})
    return out


def caption_files(
    model: DualEncoder, tokenizer: TextTokenizer, paths: Sequence[str], beam: int = 3, max_tokens: int = 0
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
        found += caption_images(model, tokenizer, torch.stack(images), beam, max_tokens)
    return [{"path": str(p), **c} for p, c in zip(paths, found, strict=True)]
