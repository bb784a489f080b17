"""lipkit: CLIP-family language-image pre-training — train, evaluate, serve.

From Python (see lipkit.api and the README's "Python" section):

    import lipkit
    model, preprocess, tokenizer = lipkit.load("runs/demo/checkpoint")
    classifier = lipkit.zero_shot_classifier(model, tokenizer, ["cat", "dog"])
    checkpoint = lipkit.train("demo", **{"train.max_minutes": 2})   # also lipkit.fit
    results = lipkit.evaluate(checkpoint, {"test": "test.jsonl"})

`import lipkit` stays cheap (no torch, PIL or NumPy): these names load lipkit.api on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = [
    "Preprocess",
    "__version__",
    "composed_query",
    "evaluate",
    "fit",
    "fused_features",
    "heatmap",
    "load",
    "train",
    "zero_shot_classifier",
]
_API = frozenset(__all__) - {"__version__", "train"}

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ forwards on first use
    from lipkit.api import (
        Preprocess,
        composed_query,
        evaluate,
        fit,
        fused_features,
        heatmap,
        load,
        zero_shot_classifier,
    )


def __getattr__(name: str) -> Any:  # PEP 562: called only for names not found in this module
    if name in _API:
        from lipkit import api

        value = getattr(api, name)
        globals()[name] = value  # later lookups skip this function
        return value
    if name == "train":  # the subpackage, callable: lipkit.train(config) (see lipkit/train/__init__.py)
        import importlib

        return importlib.import_module("lipkit.train")
    raise AttributeError(f"module 'lipkit' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _API | {"train"})
