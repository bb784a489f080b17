"""Queries against an index: text and image files or uploaded bytes embedded with the checkpoint that
built it (dense vectors, or lexical weights for a sparse index), and the top-k items they find."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from lipkit.data.frames import DEFAULT_FRAMES, VIDEO_EXTS, Frames, sniff_video, try_load_frames
from lipkit.data.image_policy import MAX_PIXELS
from lipkit.data.images import classify_failure, load_image, open_image
from lipkit.data.transforms import normalize
from lipkit.device import pick_device
from lipkit.errors import UserError
from lipkit.eval.composed_retrieval import composed_queries
from lipkit.models.dual_encoder import DualEncoder
from lipkit.search.encode import (
    Towers,
    check_precision,
    encode_text_tokens,
    inference_precision,
    prepare_for_inference,
    token_wise_of,
)
from lipkit.search.rerank import rerank_hits, resolve_rerank
from lipkit.text.tokenizer import TextTokenizer


class ImageRejected(UserError):
    """An uploaded image the server refuses; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _too_many_pixels(data: bytes, max_pixels: int, e: BaseException) -> ImageRejected:
    """The 413 for an image over the pixel limit, naming its size when the header gives it."""
    try:
        with open_image(data, sys.maxsize) as im:
            w, h = im.size
    except Exception:  # noqa: BLE001 - over PIL's own bomb limit too: no size to name
        return ImageRejected(f"The image has too many pixels ({e}); send a smaller image.", 413)
    return ImageRejected(
        f"The image is {w}×{h} = {w * h / 1e6:.1f} megapixels, over the limit of "
        f"{max_pixels / 1e6:.1f}; send a smaller image.",
        413,
    )


def _rejection(e: BaseException, data: bytes, what: str) -> ImageRejected:
    """The refusal of upload bytes that failed to open or decode (`what`: "PNG image", "image")."""
    if isinstance(e, UnidentifiedImageError):
        return ImageRejected(
            "The uploaded file is not an image this server can read; send a PNG, JPEG, WebP, GIF or BMP file."
        )
    if classify_failure(e, data)[0] == "too_large":
        return ImageRejected(f"The image has too many pixels ({e}); send a smaller image.", 413)
    return ImageRejected(f"The uploaded {what} is damaged or truncated ({e}); send a complete image file.")


_DECODE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)


def decode_image_bytes(data: bytes, size: int, max_pixels: int) -> torch.Tensor:
    """Bytes of an image file → uint8 (3,size,size); refuses non-images and too many pixels before
    decoding the pixel data (the header alone gives the size)."""
    if not data:
        raise ImageRejected("The uploaded file is empty; send an image file (PNG, JPEG, WebP, GIF, BMP).")
    what = "image"
    try:
        with open_image(data, max_pixels) as im:  # the header only
            what = f"{im.format} image" if im.format else "image"
    except Image.DecompressionBombError as e:
        raise _too_many_pixels(data, max_pixels, e) from e
    except _DECODE_ERRORS as e:
        raise _rejection(e, data, what) from e
    try:
        return load_image(data, size, max_pixels)
    except _DECODE_ERRORS as e:
        raise _rejection(e, data, what) from e


def decode_upload(
    data: bytes, size: int, max_pixels: int, max_frames: int, frames: int = DEFAULT_FRAMES
) -> torch.Tensor:
    """An uploaded image → uint8 (3, size, size), or an uploaded video (MP4, WebM, MKV, AVI: by its first
    bytes) → `frames` of its frames (T, 3, size, size), within the server's pixel and frame limits."""
    if not sniff_video(data[:16]):
        return decode_image_bytes(data, size, max_pixels)
    x, reason, detail = try_load_frames(
        Frames(video=data, count=frames), "upload", size, max_pixels=max_pixels, max_frames=max_frames
    )
    if x is not None:
        return x
    if reason in ("too_large", "too_long_video"):
        raise ImageRejected(
            f"The uploaded video is too large ({detail}); send a shorter or smaller video.", 413
        )
    raise ImageRejected(
        f"The uploaded video cannot be decoded ({detail}); send a complete MP4, WebM or MKV file."
    )


def lexical_queries(
    model: DualEncoder, tokenizer: TextTokenizer, texts: Sequence[str], vocab: int
) -> np.ndarray:
    """Texts → non-negative V-vectors for a sparse index. A model with a lexicon head exposes
    `encode_text_lexical(ids) -> (B, V)`; without one, a query is its bag of tokenizer ids (the
    document side must then be over the same tokenizer vocabulary)."""
    ids = tokenizer(list(texts))
    if model.has_lexicon:
        head = model.encode_text_lexical
        with torch.inference_mode():
            out = head(ids.to(model.device)).float().cpu().numpy()
        if out.shape[1] != vocab:
            raise UserError(
                f"The checkpoint's lexicon head has {out.shape[1]} terms but the sparse index has {vocab}; "
                "search with the checkpoint that built it."
            )
        return np.maximum(out, 0)
    if tokenizer.vocab_size > vocab:
        raise UserError(
            f"The sparse index is over {vocab} terms but the tokenizer has {tokenizer.vocab_size}; search "
            "with the checkpoint whose vocabulary built the index."
        )
    q = np.zeros((len(texts), vocab), dtype=np.float32)
    specials = {tokenizer.pad_id, tokenizer.sot_id, tokenizer.eot_id}
    for r, row in enumerate(ids.tolist()):
        for t in row:
            if t not in specials:
                q[r, t] += 1.0
    return q


def check_query_args(query: str | None, image: Path | None, k: int) -> None:
    """`lipkit search` takes a non-empty text, an image, or both (a composed query), and 1..1000 results."""
    if query is None and image is None:
        raise UserError(
            "Give a text QUERY, an --image PATH, or both (the image changed by the words), e.g. lipkit search "
            'CKPT INDEX "a red heart".'
        )
    if not 1 <= k <= 1000:
        raise UserError(f"-k must be from 1 to 1000, got {k}.")
    if query is not None and not query.strip():
        raise UserError("The query is empty; type a few words to search for.")


class Searcher:
    """A model and an index together: embed a text or an image and return the top-k items."""

    def __init__(
        self,
        checkpoint: str | Path,
        index_path: str | Path,
        device: str = "cpu",
        precision: str = "fp32",
        onnx: str | Path | None = None,
        threads: int = 1,
        rerank: int | None = None,
    ) -> None:
        """`onnx`: a folder from `lipkit quantize` (or `lipkit export onnx`) of this checkpoint; its
        towers (int8 where the quality check kept them) answer dense queries instead of PyTorch's, with
        `threads` onnxruntime threads per call. `rerank`: how many hits of a text query the checkpoint's
        matching head re-orders (search.rerank; None: 20 when it has one, else none)."""
        from lipkit.checkpoint import load_checkpoint
        from lipkit.search.index import load_index

        self.precision = check_precision(precision)
        self.model, self.tokenizer, self.config = load_checkpoint(checkpoint)
        prepare_for_inference(self.model.to(pick_device(device)), self.precision)
        self.index = load_index(index_path)
        objective = (self.config.get("train") or {}).get("objective")  # a ptunifier head: only when asked
        self.rerank_top = resolve_rerank(rerank, self.model, checkpoint, objective)
        self.size = int(self.model.spec.image_size)
        self.dim = int(self.model.spec.embed_dim)
        if self.index.kind != "sparse" and self.index.dim != self.dim:
            raise UserError(
                f"Index '{index_path}' holds {self.index.dim}-d vectors but checkpoint '{checkpoint}' makes "
                f"{self.dim}-d embeddings; search with the checkpoint that embedded the collection."
            )
        if self.token_wise and token_wise_of(self.config) is None:
            raise UserError(
                f"Index '{index_path}' is token-wise but checkpoint '{checkpoint}' was not trained with filip or "
                "wukong, so its token features were never trained to match; search with the checkpoint that embedded it."
            )
        self.onnx = None if onnx is None else self._onnx_encoder(Path(onnx), checkpoint, threads)
        self.towers = (
            Towers.of_model(self.model, self.tokenizer, self.precision)
            if self.onnx is None
            else Towers.of_onnx(self.onnx)
        )

    def _onnx_encoder(self, folder: Path, checkpoint: str | Path, threads: int):  # noqa: ANN202
        from lipkit.search.onnx_encoder import onnx_towers_of

        if self.sparse or self.token_wise:
            raise UserError(
                f"A {self.index.kind} index is searched through the checkpoint's "
                f"{'lexicon heads' if self.sparse else 'token features'}, which ONNX folders do not carry; drop "
                "--int8 for this index."
            )
        enc = onnx_towers_of(checkpoint, folder, threads)  # refuses a folder of another checkpoint
        if (enc.image_size, enc.dim) != (self.size, self.dim):
            raise UserError(
                f"ONNX folder '{folder}' makes {enc.dim}-d embeddings of {enc.image_size}px images but "
                f"checkpoint '{checkpoint}' makes {self.dim}-d of {self.size}px; quantize this checkpoint."
            )
        return enc

    @property
    def runtime(self) -> dict[str, str]:
        """What answers each kind of query: e.g. {"image": "onnx int8", "text": "torch bf16"}."""
        if self.onnx is not None:
            return {t: f"onnx {p}" for t, p in self.onnx.precision.items()}
        return {"image": f"torch {self.precision}", "text": f"torch {self.precision}"}

    @property
    def sparse(self) -> bool:
        return self.index.kind == "sparse"

    @property
    def token_wise(self) -> bool:
        """A tokens index: text queries are token features, scored by FILIP's late interaction."""
        return self.index.kind == "tokens"

    def text_query(self, text: str) -> np.ndarray:
        return self.text_queries([text])

    def text_queries(self, texts: list[str]) -> np.ndarray:
        """(len(texts), D) query vectors, one model call."""
        if self.sparse:
            with inference_precision(self.model, self.precision):
                return lexical_queries(self.model, self.tokenizer, texts, self.index.dim)
        if self.token_wise:  # (len(texts), context_length, D), zero rows at padding
            with inference_precision(self.model, self.precision):
                return encode_text_tokens(self.model, self.tokenizer, texts)
        return self.towers.texts(texts)

    def check_image_queries(self) -> None:
        """Refuse image queries up front when this index cannot answer them."""
        if self.token_wise:
            raise ImageRejected(
                "This index is token-wise (FILIP's late interaction of a text's words with each image's "
                "patches), so it answers text queries only; build a --kind flat index from the same "
                "embeddings to search by image.",
                400,
            )
        if self.sparse and not self.model.has_lexicon:
            raise ImageRejected(
                "This index is sparse (lexical) and the checkpoint has no image lexicon head, so it "
                "answers text queries only; search a dense index for images.",
                400,
            )

    def image_query(self, image_u8: torch.Tensor) -> np.ndarray:
        return self.image_queries(image_u8[None])

    def image_queries(self, images_u8: torch.Tensor) -> np.ndarray:
        """uint8 (B,3,S,S) images or (B,T,3,S,S) clips → (B, D) query vectors, one model call."""
        self.check_image_queries()
        if images_u8.dim() == 5 and (self.onnx is not None or self.sparse):
            raise ImageRejected(
                "Video queries are embedded by the PyTorch model through its temporal head; search a dense "
                "index without --onnx/--int8 for them.",
                400,
            )
        if self.sparse:
            assert self.towers.lexical is not None  # checked just above
            return self.towers.lexical(images_u8)
        return self.towers.images(images_u8)

    @property
    def composed_way(self) -> str:
        """How a reference image and words make one query: the checkpoint's pseudo-word (pic2word, rtd;
        models.pseudo_word) on PyTorch, else the normalised sum of the two embeddings."""
        word = self.model.pseudo_word is not None and self.onnx is None
        return self.model.spec.adapter["method"] if word else "sum"

    def check_composed_queries(self) -> None:
        """Refuse composed queries up front when this index cannot answer them."""
        if self.sparse or self.token_wise:
            raise ImageRejected(
                f"This index is {self.index.kind}; an image plus words is searched in a dense index (--kind "
                "flat, hnsw or ivfpq) of the same embeddings.",
                400,
            )

    def composed_query(self, image_u8: torch.Tensor, text: str) -> np.ndarray:
        """uint8 (3, S, S) reference image and the words that change it → (1, D) query vector."""
        return self.composed_queries(image_u8[None], [text])

    def composed_queries(self, images_u8: torch.Tensor, texts: list[str]) -> np.ndarray:
        """uint8 (B, 3, S, S) reference images and the words that change each → (B, D), one batch."""
        self.check_composed_queries()
        v = self.image_queries(images_u8)
        if self.composed_way == "sum":
            q = v + self.text_queries(texts)
            return (q / np.linalg.norm(q, axis=1, keepdims=True).clip(min=1e-12)).astype(np.float32)
        with torch.inference_mode(), inference_precision(self.model, self.precision):
            ref = torch.from_numpy(np.ascontiguousarray(v))
            return composed_queries(self.model, self.tokenizer, ref, texts, len(texts)).numpy()

    def region_embeddings(self, image_u8: torch.Tensor, boxes: list[list[float]]) -> np.ndarray:
        """uint8 (3, S, S) and its boxes → (len(boxes), D) region embeddings (DualEncoder.encode_region,
        the PyTorch model whatever answers other queries), float32."""
        spec = self.model.spec
        x = normalize(image_u8[None], spec.image_mean, spec.image_std).to(self.model.device)
        with torch.inference_mode(), inference_precision(self.model, self.precision):
            return self.model.encode_region(x, [boxes]).float().cpu().numpy()

    @property
    def clip_frames(self) -> int:
        """Frames decoded from a video query: as many as the model was trained on (else DEFAULT_FRAMES)."""
        return self.model.spec.clip_frames or DEFAULT_FRAMES

    def image_file(self, path: str | Path) -> torch.Tensor:
        """An image file → uint8 (3, S, S); a video file (by its extension) → (DEFAULT_FRAMES, 3, S, S)."""
        p = Path(path)
        if p.suffix.lower() in VIDEO_EXTS:
            frames = Frames(video=p, count=self.clip_frames)
            x, reason, detail = try_load_frames(frames, str(p), self.size)
            if x is None:
                raise UserError(
                    f"Video '{p}' cannot be used ({detail}); pass an MP4, WebM or MKV file that plays."
                )
            return x
        try:
            return load_image(p, self.size)
        except FileNotFoundError as e:
            raise UserError(f"Image '{p}' does not exist; pass the path of an image file.") from e
        except (OSError, ValueError) as e:
            raise UserError(
                f"Image '{p}' cannot be decoded ({e}); pass a PNG, JPEG, WebP, GIF or BMP file."
            ) from e

    def rerank(
        self, text: str, hits: list[dict[str, Any]], max_pixels: int = MAX_PIXELS
    ) -> list[dict[str, Any]]:
        """A text query's hits, the first `rerank_top` re-ordered by the matching head (search.rerank)."""
        if not self.rerank_top:
            return hits
        with inference_precision(self.model, self.precision):
            items = self.index.items
            return rerank_hits(self.model, self.tokenizer, items, text, hits, self.rerank_top, max_pixels)

    def search(self, query: np.ndarray, k: int, **params: Any) -> list[dict[str, Any]]:
        scores, ids = self.index.search(query, k, **params)
        hits = []
        for s, i in zip(scores[0].tolist(), ids[0].tolist(), strict=True):
            if i < 0:
                continue
            item = self.index.items[i]
            hits.append(
                {
                    "id": int(i),
                    "score": round(float(s), 6),
                    "caption": item.get("caption"),
                    "path": item.get("path"),
                    "has_image": bool(item.get("path") or item.get("blob")),
                    "meta": item.get("meta") or {},
                }
            )
        return hits
