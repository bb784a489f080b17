"""The `eval:` section of a config (lipkit.config holds the others and re-exports this one)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EvalConfig:
    class_columns: list[str] = field(default_factory=lambda: ["subcategory", "category"])
    templates: list[str] = field(
        default_factory=lambda: ["{}", "an emoji of {}.", "a picture of {}.", "an icon of {}."]
    )
    retrieval_caption: int = 0  # which caption of each row is the text→image query
    # also retrieval per value of this list column parallel to the captions, e.g. langs: per-language R@K
    group_by: str = ""
    # how a pair is scored: "dense" (cosine of the pooled embeddings), "filip" (token-wise late
    # interaction), "lexical" (sparse dot product of LexLIP term weights), "frames" (clips: GLSCL's
    # text-conditioned pooling of the frame states; image splits and adapted models are scored dense),
    # or "auto": filip / lexical / frames for checkpoints
    # trained with the filip or wukong / lexlip / glscl objective, dense otherwise
    similarity: str = "auto"
    frame_temperature: float = 0.0  # τ_g of similarity=frames; 0: a glscl run's own, else 0.03
    # token-wise scoring keeps the K image tokens most aligned with each image's mean token (Wukong's
    # reduced-token interaction); 0: a model trained with wukong keeps its own K, any other every token
    image_tokens_kept: int = 0
    batch_size: int = 256
    # fp32, or bf16 autocast for the towers' forwards (about half the CPU time; what evaluation during a
    # bf16 training run uses); embeddings, similarities and the probe stay float32
    precision: str = "fp32"
    max_images: int = 0  # evaluate this many images spread evenly over each split (0: all)
    # linear probe (logistic regression on frozen image embeddings, λ picked on a held-out part) fit on
    # this table's class columns and scored on every evaluation split: "" = off, "train" = data.train,
    # or a table path. `lipkit eval` and the end of `lipkit demo` run it; evaluation during training not.
    linear_probe: str = ""
    # the few-shot protocol (eval.few_shot_protocol): K images per class of each class column drawn from
    # `few_shot_table` ("train" = data.train, or a path) for each K here (e.g. [1, 2, 4, 8, 16]; []: off)
    # and each of `few_shot_seeds` seeds; a K-shot linear probe and Tip-Adapter scored on every split, on
    # CoOp's base/novel split of the classes (`few_shot_classes: base`) or on all of them (`all`)
    few_shot: list[int] = field(default_factory=list)
    few_shot_seeds: int = 3
    few_shot_classes: str = "base"
    few_shot_table: str = "train"
    # "lipkit", or "clip_benchmark": CLIP_benchmark's protocol — every caption of an image is a
    # text→image query relevant to that image alone (lipkit: one caption per image, `retrieval_caption`,
    # relevant to every image that has it), and images decoded as CLIP_benchmark feeds OpenCLIP's preprocess
    # (RGB first: transparency dropped, no EXIF orientation; then torchvision's resize and crop rounding)
    protocol: str = "lipkit"
    # checkpoints with a caption decoder (coca, capdec, connector) caption this many images spread over each
    # split (0: all) by beam search of this width, scored by BLEU-4 and CIDEr-D against the captions in
    # caption_langs ([]: all; a langs column names them) and, given a checkpoint, CLIP-score by it
    caption_max_images: int = 500
    caption_beam: int = 3
    caption_langs: list[str] = field(default_factory=list)
    caption_scorer: str = ""
    # text-only decoders (capdec) also decode this many noised copies of each image embedding and keep the
    # caption the towers match best (MacCap's sampling and CLIP re-ranking; eval.captioning); 0: off
    caption_samples: int = 0
    # checkpoints trained with the itm objective also re-rank each text query's top K images by their
    # matching head (retrieval/reranked/text_to_image/R@k); 0: off
    rerank_top: int = 20
