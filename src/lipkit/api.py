"""lipkit from Python: load a checkpoint as (model, preprocess, tokenizer), build a zero-shot classifier,
train and evaluate — the calls `import lipkit` forwards to (`lipkit.load`, ...), in the shape OpenCLIP
users know from `open_clip.create_model_and_transforms`:

    model, preprocess, tokenizer = lipkit.load("runs/demo/checkpoint")
    images = torch.stack([preprocess(Image.open(p)) for p in paths])   # (B, 3, S, S) float32
    image_emb = model.encode_image(images)                             # (B, D), unit length
    text_emb = model.encode_text(tokenizer(["a red heart", "a cat"]))  # (T, D), unit length
    classifier = lipkit.zero_shot_classifier(model, tokenizer, ["heart", "cat"])  # (C, D)
    probs = (model.scale() * image_emb @ classifier.T).softmax(dim=-1)

Nothing here computes anything of its own: images are decoded by `lipkit.data.images` (what training,
`lipkit eval` and `lipkit embed` use), class embeddings are `lipkit.eval.zeroshot`'s, configs are
`lipkit.config`'s, and training and evaluation are `lipkit train`'s and `lipkit eval`'s functions.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from lipkit.checkpoint import load_checkpoint
from lipkit.config import Config, EvalConfig, config_from_dict, load_config, packaged_config
from lipkit.data.image_policy import IMAGE_REASONS, MAX_PIXELS
from lipkit.data.images import image_pixels, try_load_image
from lipkit.data.label_sets import fill_template
from lipkit.data.transforms import normalize
from lipkit.device import pick_device
from lipkit.errors import UserError
from lipkit.eval.composed_retrieval import model_queries
from lipkit.eval.evaluate import embed_texts
from lipkit.eval.heatmaps import MAP_KINDS
from lipkit.eval.suite import run_eval
from lipkit.eval.zeroshot import class_embeddings
from lipkit.models.dual_encoder import DualEncoder
from lipkit.models.pseudo_tokens import PseudoTokenPools, encode_fused
from lipkit.search.encode import PRECISIONS, inference_precision, prepare_for_inference
from lipkit.search.heatmap import query_heatmap
from lipkit.text.tokenizer import TextTokenizer
from lipkit.train.launch import run_training

__all__ = [
    "Preprocess",
    "composed_query",
    "evaluate",
    "fit",
    "fused_features",
    "heatmap",
    "load",
    "zero_shot_classifier",
]

ImageInput = Image.Image | str | Path | bytes


class Preprocess:
    """One image → the float32 (3, S, S) tensor `model.encode_image` takes (stack several for a batch).

    The pixels are those `lipkit eval` and `lipkit embed` feed the model for the same file: decoded by
    `lipkit.data.images.load_image` (EXIF orientation applied, transparency on white, any mode to RGB,
    bicubic resize of the short side to S, centre crop), then scaled to [0, 1] and normalised with the
    checkpoint's own mean and std. Takes a PIL image, or a path or encoded bytes (decoded directly).
    """

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.image_size, self.mean, self.std = int(image_size), tuple(mean), tuple(std)

    def __call__(self, image: ImageInput) -> torch.Tensor:
        return normalize(self.pixels(image)[None], self.mean, self.std)[0]

    def pixels(self, image: ImageInput) -> torch.Tensor:
        """The uint8 (3, S, S) pixels, before scaling and normalisation."""
        if isinstance(image, Image.Image):  # decoded already: the steps load_image applies after decoding
            return image_pixels(image, self.image_size)
        pixels, reason, detail = try_load_image(image, self.image_size, MAX_PIXELS)
        if pixels is None:
            what = f"image '{image}'" if isinstance(image, str | Path) else "these image bytes"
            raise UserError(f"Cannot use {what}: {IMAGE_REASONS[reason]} ({detail}); pass another one.")
        return pixels

    def __repr__(self) -> str:
        return f"Preprocess(image_size={self.image_size}, mean={self.mean}, std={self.std})"


def _checkpoint_dir(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (train.output) holding one as checkpoint/."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(
            f"'{p}' does not exist; pass a checkpoint directory (e.g. runs/demo/checkpoint) or the run "
            "directory holding it (the train.output of a `lipkit train` run)."
        )
    if not (p / "config.json").is_file() and (p / "checkpoint" / "config.json").is_file():
        return p / "checkpoint"
    return p  # load_checkpoint names what is missing when this is not a checkpoint either


def _under_bf16(encode: Callable[..., torch.Tensor], device_type: str) -> Callable[..., torch.Tensor]:
    @functools.wraps(encode)
    def call(*args: Any, **kwargs: Any) -> torch.Tensor:
        with torch.autocast(device_type, dtype=torch.bfloat16):
            return encode(*args, **kwargs).float()

    return call


def load(
    path: str | Path, device: str = "cpu", precision: str = "fp32"
) -> tuple[DualEncoder, Preprocess, TextTokenizer]:
    """Load a lipkit checkpoint for inference: `(model, preprocess, tokenizer)`.

    path: a checkpoint directory written by `lipkit train` (runs/demo/checkpoint), or the run directory
        holding it (runs/demo). Checkpoints converted from OpenCLIP or Hugging Face load the same way.
    device: "cpu", "cuda", "cuda:1", or "auto" (a GPU when there is one). Move inputs there yourself:
        `model.encode_image(images.to(model.device))`.
    precision: "fp32", or "bf16": linear and convolution weights cast to bfloat16 once, and
        `encode_image` / `encode_text` run under bf16 autocast and return float32 — what
        `lipkit search --precision bf16` computes (about half the CPU time, embeddings within ~1e-2).

    Returns
        model: the `DualEncoder` in eval mode. `model.encode_image(x)` takes `preprocess` output stacked
            to (B, 3, S, S) and `model.encode_text(ids)` takes `tokenizer` output; both return
            L2-normalised (B, D) embeddings (`normalize=False` for the raw projections);
            `model.encode_region(x, boxes)` embeds boxes of each image (docs/localization.md). Wrap calls in
            `torch.no_grad()`. `model.scale()` is the learned logit scale (CLIP's 1/temperature).
        preprocess: image (PIL, path or bytes) → float32 (3, S, S); see `Preprocess`.
        tokenizer: `tokenizer(["a cat", ...])` (or one string) → int64 (B, context_length) token ids,
            start/end tokens added, padded and truncated as in training; `tokenizer.decode(ids)` reverses.
    """
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, not '{precision}'.")
    model, tokenizer, _ = load_checkpoint(_checkpoint_dir(path))
    dev = pick_device(device)
    prepare_for_inference(model.to(dev), precision)  # eval mode; channels-last for conv image towers
    if precision == "bf16":
        model.encode_image = _under_bf16(model.encode_image, dev.type)
        model.encode_text = _under_bf16(model.encode_text, dev.type)
        model.encode_region = _under_bf16(model.encode_region, dev.type)
    spec = model.spec
    return model, Preprocess(spec.image_size, spec.image_mean, spec.image_std), tokenizer


def heatmap(
    model: DualEncoder, tokenizer: TextTokenizer, image: ImageInput, text: str, kind: str = "similarity"
) -> dict[str, Any]:
    """Where in `image` the words `text` match: {"kind", "grid", "peak"}, what `lipkit serve` answers on
    GET /heatmap — `grid` h × w scores over the centre square the model sees, `peak` the centre (x, y) of
    the highest cell as fractions of the side. kind: "similarity" (token–text cosine), "gradcam" (Grad-CAM,
    any checkpoint) or "filip" (word–patch, FILIP checkpoints); the formulas: docs/localization.md."""
    if kind not in MAP_KINDS:
        raise UserError(f"kind must be one of {', '.join(MAP_KINDS)}, not '{kind}'.")
    spec = model.spec
    pixels = Preprocess(spec.image_size, spec.image_mean, spec.image_std).pixels(image)
    precision = "bf16" if any(p.dtype == torch.bfloat16 for p in model.parameters()) else "fp32"
    return query_heatmap(model, tokenizer, pixels, text, kind, precision)


def composed_query(
    model: DualEncoder, tokenizer: TextTokenizer, image: ImageInput, text: str
) -> torch.Tensor:
    """A reference image changed by words ("with dark skin tone") as one float32 (D,) unit-length query, to
    score against image embeddings: the checkpoint's Pic2Word/RTD pseudo-word sentence "a photo of [φ(v̂)]
    that {text}" when `lipkit adapt --method pic2word|rtd` gave it a mapping network, else the normalised sum
    of the image's and the text's embeddings — what `lipkit search TEXT --image IMAGE` and `lipkit eval`'s
    composed queries compute (docs/adapt.md)."""
    spec = model.spec
    pixels = Preprocess(spec.image_size, spec.image_mean, spec.image_std)(image)[None].to(model.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            v = model.encode_image(pixels).float().cpu()
            return model_queries(model, tokenizer, v, [text], 1)[0].to(model.device)
    finally:
        model.train(was_training)


def fused_features(
    model: DualEncoder,
    tokenizer: TextTokenizer,
    images: Sequence[ImageInput] | None = None,
    texts: Sequence[str] | None = None,
) -> torch.Tensor:
    """PTUnifier's one representation for image-only, caption-only or paired input: float32 (B, W)
    unit-length final [CLS] states of the checkpoint's matching head, the missing modality filled with
    pseudo tokens from its pools (a checkpoint `lipkit adapt --method ptunifier` wrote; docs/adapt.md).
    Pass `images`, `texts`, or both of the same length (image i with text i)."""
    if not isinstance(getattr(model, "adapter", None), PseudoTokenPools) or not model.has_matcher:
        raise UserError(
            "fused_features needs a checkpoint with PTUnifier's pools; adapt one with "
            "`lipkit adapt CHECKPOINT OUT --method ptunifier --data TABLE`."
        )
    if isinstance(texts, str) or isinstance(images, str | bytes | Path | Image.Image):
        raise UserError("fused_features takes lists: pass texts=[...] and images=[...], even for one item.")
    if not images and not texts:
        raise UserError("fused_features needs images, texts, or both.")
    if images and texts and len(images) != len(texts):
        raise UserError(
            f"fused_features pairs image i with text i: got {len(images)} images and {len(texts)} texts."
        )
    spec = model.spec
    pixels = None
    if images:
        pixels = torch.stack(
            [Preprocess(spec.image_size, spec.image_mean, spec.image_std)(x) for x in images]
        )
    was_training = model.training
    model.eval()
    precision = "bf16" if any(p.dtype == torch.bfloat16 for p in model.parameters()) else "fp32"
    try:
        with inference_precision(model, precision):  # a model loaded with precision="bf16" too
            return encode_fused(model, pixels, tokenizer(list(texts)) if texts else None).cpu()
    finally:
        model.train(was_training)


def zero_shot_classifier(
    model: DualEncoder,
    tokenizer: TextTokenizer,
    classnames: Sequence[str],
    templates: Sequence[str] | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """Class embeddings for zero-shot classification, as CLIP builds them: float32 (C, D) on the model's
    device, row c the mean of the normalised embeddings of class c's prompts, re-normalised. Score
    images with `image_emb @ classifier.T` (cosine similarities; × `model.scale()` and softmax for
    probabilities); the argmax is the predicted class — what `lipkit eval` scores as zero-shot top-1
    (for a checkpoint that `lipkit adapt --method coop|tip|tip-f` gave a class head, eval scores the adapted
    column through that head instead: `lipkit.eval.adapted_classes.adapted_class_scores`).

    classnames: the C class names, e.g. ["face smiling", "animal mammal"].
    templates: prompt templates; `{}` (or `{c}`) is replaced by the class name. Default: the
        `eval.templates` of lipkit's config ("{}", "an emoji of {}.", "a picture of {}.", "an icon of {}.").
        More, varied templates usually help (CLIP used 80 for ImageNet).
    """
    templates = list(EvalConfig().templates if templates is None else templates)
    if not classnames or not templates:
        raise UserError("zero_shot_classifier needs at least one class name and one template.")
    prompts = [fill_template(t, c) for c in classnames for t in templates]
    was_training = model.training
    model.eval()
    try:
        prompt_emb = embed_texts(model, tokenizer, prompts, batch_size)
    finally:
        model.train(was_training)
    return class_embeddings(prompt_emb, len(classnames), len(templates)).to(model.device)


ConfigLike = Config | str | Path | Sequence[str | Path] | None


def _config_file(name: str | Path) -> Path:
    """A YAML path, or the packaged config of that name (demo, scratch, methods/siglip, ...)."""
    p = Path(name).expanduser()
    if p.is_file() or p.suffix in (".yaml", ".yml"):
        return p  # a missing .yaml path: load_config says so
    packaged = packaged_config(str(name))
    if packaged.is_file():
        return packaged
    root = packaged_config().parent
    names = sorted(q.relative_to(root).with_suffix("").as_posix() for q in root.rglob("*.yaml"))
    raise UserError(
        f"Config '{name}' is neither a YAML file nor a packaged config; pass a path or one of: "
        f"{', '.join(names)}."
    )


def _config(config: ConfigLike, overrides: Mapping[str, Any]) -> Config:
    """`config` (a Config, a YAML path or packaged name, or several layered) with dotted `overrides`
    applied as `--set key=value` would apply them (each value written as YAML)."""
    sets = [f"{key}={json.dumps(value, default=str)}" for key, value in overrides.items()]
    if isinstance(config, Config):
        return config_from_dict(config.to_dict(), sets)
    if config is None:
        return load_config(None, sets)
    files = [config] if isinstance(config, str | Path) else list(config)
    return load_config([_config_file(f) for f in files], sets)


def fit(config: ConfigLike, **overrides: Any) -> Path:
    """Train as `lipkit train` does; returns the final checkpoint directory (<train.output>/checkpoint),
    ready for `lipkit.load`. `lipkit.train(config, **overrides)` is the same call (the `lipkit.train`
    package is callable and forwards here).

    config: a `lipkit.config.Config`, a YAML file, a packaged config's name ("demo", "scratch",
        "methods/siglip", ...), or a list of these layered left to right like repeated `--config`.
    overrides: dotted keys as `--set` takes them, with Python values:
        `lipkit.fit("demo", **{"train.max_minutes": 2, "train.output": "runs/quick"})`.

    The run directory gets config.json, metrics.jsonl, checkpoints/ and checkpoint/. Ctrl-C (or
    SIGTERM) finishes the step, writes a resumable checkpoint and raises KeyboardInterrupt; continue
    with `**{"train.resume": "auto"}`.
    """
    run_dir, result = run_training(_config(config, overrides))
    if result.interrupted:
        raise KeyboardInterrupt(
            f"training interrupted at step {result.steps}; a resumable checkpoint is in "
            f"{run_dir / 'checkpoints'} (continue with train.resume='auto')"
        )
    return run_dir / "checkpoint"


def evaluate(
    checkpoint: str | Path,
    splits: Mapping[str, str | Path] | None = None,
    config: ConfigLike = None,
    out: str | Path | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Evaluate as `lipkit eval` does and return its results: {"splits": {name: {"metrics", "chance",
    ...}}, ...} with zero-shot top-1/top-5/mean recall per `eval.class_columns` and retrieval R@1/5/10.

    checkpoint: a checkpoint directory or the run directory holding one.
    splits: split name → table, e.g. {"test-style": "~/.cache/lipkit/datasets/emoji/test-style.jsonl"};
        default: the config's data.eval.
    config, overrides: as in `fit` (only the eval: and data: sections matter), e.g.
        `**{"eval.templates": ["a photo of {}."], "eval.linear_probe": ""}`.
    out: where the results JSON goes (default: eval/results.json beside the checkpoint).
    """
    cfg = _config(config, overrides)
    tables = {name: str(path) for name, path in (cfg.data.eval if splits is None else splits).items()}
    if not tables:
        raise UserError(
            "Nothing to evaluate on; pass splits={'name': 'table.jsonl'} or a config with data.eval."
        )
    ckpt = _checkpoint_dir(checkpoint)
    return run_eval(ckpt, tables, cfg, Path(out) if out else ckpt.parent / "eval" / "results.json")
