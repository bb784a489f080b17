"""Which similarity scores a checkpoint's pairs in evaluation (eval.similarity, eval.image_tokens_kept),
resolved from the settings and the objective the checkpoint was trained with."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from lipkit.config import EvalConfig
from lipkit.errors import UserError
from lipkit.objectives.wukong import DEFAULT_KEPT

SIMILARITIES = ("dense", "filip", "lexical", "frames")
DEFAULT_FRAME_TEMPERATURE = 0.03  # objectives/glscl.py's pool_temperature


def resolve_similarity(setting: str, objective: str | None) -> str:
    """eval.similarity → "dense", "filip", "lexical" or "frames" ("auto": filip for a model trained with the
    filip or wukong objective, lexical — sparse dot products of the LexLIP heads — for lexlip, frames —
    GLSCL's global score of clips, eval.frame_similarity — for glscl, dense otherwise)."""
    if setting == "auto":
        auto = {"filip": "filip", "wukong": "filip", "lexlip": "lexical", "glscl": "frames"}
        return auto.get(objective or "", "dense")
    if setting not in SIMILARITIES:
        raise UserError(f"eval.similarity is '{setting}'; use auto, {', '.join(SIMILARITIES)}.")
    return setting


def resolve_trained_settings(
    cfg: EvalConfig, objective: str | None, objective_args: dict[str, Any]
) -> EvalConfig:
    """`cfg` with what 0 leaves to the run resolved: eval.image_tokens_kept (as set, else a wukong-trained
    model's own K; 0: all) and eval.frame_temperature (as set, else a glscl run's pool_temperature)."""
    if cfg.image_tokens_kept < 0:
        raise UserError(
            f"eval.image_tokens_kept is {cfg.image_tokens_kept}; use 0 (auto) or a positive count."
        )
    if cfg.frame_temperature < 0:
        raise UserError(
            f"eval.frame_temperature is {cfg.frame_temperature}; use 0 (auto) or a positive value."
        )
    if not cfg.frame_temperature:
        own = objective_args.get("pool_temperature") if objective == "glscl" else None
        cfg = replace(cfg, frame_temperature=float(own or DEFAULT_FRAME_TEMPERATURE))
    if cfg.image_tokens_kept or objective != "wukong":
        return cfg
    return replace(cfg, image_tokens_kept=int(objective_args.get("image_tokens_kept", DEFAULT_KEPT) or 0))


def head_objective(info: dict) -> str | None:
    """What decides whether a checkpoint's matching head matches its towers (`resolve_rerank`): its
    train.objective, or "itm" when `lipkit adapt --method ptunifier` trained the head on its frozen towers."""
    if (info.get("adapted") or {}).get("method") == "ptunifier":
        return "itm"
    return (info.get("train") or {}).get("objective")


def resolve_rerank(cfg: EvalConfig, objective: str | None) -> EvalConfig:
    """`cfg` with eval.rerank_top kept for a model trained with the itm objective and 0 otherwise: a matching
    head that a later run (another objective) did not train no longer matches its towers."""
    return cfg if objective == "itm" else replace(cfg, rerank_top=0)
