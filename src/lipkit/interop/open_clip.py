"""OpenCLIP checkpoints in and out.

Both directions convert either image tower — lipkit's ViT (OpenCLIP's VisionTransformer) or its timm
tower (OpenCLIP's TimmModel: `timm_model_name`, avg/max/avgmax pooling, linear/mlp/no projection) —
with either text tower: lipkit's causal transformer (OpenCLIP's `CLIP` class) or a Hugging Face encoder
(bert, roberta, xlm-roberta; mean or first-token pooling, linear projection), which OpenCLIP holds in a
`CustomTextCLIP` (`custom_text: true`, `text_cfg.hf_model_name`); the demo recipe's
tf_efficientnet_lite0 + all-MiniLM-L6-v2 is such a model. open_clip_custom.py has the timm / Hugging
Face details (where the text model's folder goes, pooler names, weight renames).

lipkit's parameter names follow OpenCLIP, so the state dict is a rename: OpenCLIP's `CLIP` keeps the
text tower at the top level (`token_embedding`, `transformer.resblocks...`, `ln_final`,
`text_projection`) where lipkit nests it under `text.`. The architecture comes from an OpenCLIP
model-config JSON (`embed_dim`, `vision_cfg`, `text_cfg`, `quick_gelu`), read by open_clip_spec.py,
which refuses settings lipkit's towers do not implement (layer scale, the pooler's CoCa variants, ResNets,
BERT's `cls_pooler`, MLP text projections, ...) with the setting's name rather than converting them
wrongly. Export refuses a convolutional ViT stem and LexLIP lexicon heads, which OpenCLIP cannot hold.
OpenCLIP's CoCa (`multimodal_cfg`) converts both ways with its decoder (open_clip_coca.py); lipkit's other
caption decoders and its matching head have no OpenCLIP counterpart and are refused on export.

Reading and writing need only safetensors (and torch for .pt files; timm and transformers for those
towers); `open_clip` itself is used to look architectures up by name and, in tests, to check parity.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from lipkit.atomic import write_dir
from lipkit.errors import UserError
from lipkit.interop import check_not_adapted, refuse_existing
from lipkit.interop.clip_bpe import CLIP_VOCAB_SIZE, clip_tokenizer
from lipkit.interop.open_clip_coca import PREFIX_IN, coca_config, decoder_state_in, decoder_state_out
from lipkit.interop.open_clip_custom import (
    TEXT_DIR,
    check_timm_trunk,
    find_hf_folder,
    hf_state_from_open_clip,
    hf_state_to_open_clip,
    hf_text_cfg,
    read_hf_config,
    timm_vision_cfg,
    write_text_model,
    write_tokenizer_files,
)
from lipkit.interop.open_clip_spec import hf_fields, spec_from_open_clip
from lipkit.interop.peer_weights import build_model, read_state_dict, require, tokenizer_from_dir
from lipkit.models.dual_encoder import DualEncoder
from lipkit.models.presets import ModelSpec
from lipkit.text.tokenizer import TextTokenizer

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"


def read_arch(arch: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(model config, preprocess config, name) for an OpenCLIP architecture name or a config path.

    A path may be a model-config JSON (`embed_dim`, `vision_cfg`, `text_cfg`), an
    `open_clip_config.json` (`model_cfg` + `preprocess_cfg`), or a directory holding the latter.
    """
    raw = arch.removeprefix("local-dir:")
    path = Path(raw).expanduser()
    if path.is_dir():
        path = path / CONFIG_NAME
        if not path.is_file():
            raise UserError(
                f"Directory '{raw}' has no {CONFIG_NAME}; pass an OpenCLIP model name or config JSON."
            )
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"OpenCLIP config '{path}' is not valid JSON ({e}); fix or regenerate it.") from e
        if isinstance(data, dict) and "model_cfg" in data:
            return data["model_cfg"], data.get("preprocess_cfg") or {}, path.parent.name
        if not isinstance(data, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= set(data):
            raise UserError(
                f"'{path}' is not an OpenCLIP model config (it needs embed_dim, vision_cfg and text_cfg); "
                "pass a file like open_clip/model_configs/ViT-B-32.json."
            )
        return data, {}, path.stem
    if raw.endswith(".json") or os.sep in raw:
        raise UserError(f"OpenCLIP config file '{raw}' does not exist; check the path or pass a model name.")
    open_clip = require("open_clip", f"Looking up the OpenCLIP architecture '{arch}'")
    name = raw.replace("/", "-")
    cfg = open_clip.get_model_config(name)
    if cfg is None and name.endswith("-quickgelu"):  # any config with OpenAI's QuickGELU activation
        cfg = open_clip.get_model_config(name.removesuffix("-quickgelu"))
        if cfg is not None:
            cfg["quick_gelu"] = True
    if cfg is None:
        close = [m for m in open_clip.list_models() if m.lower().startswith(name.lower()[:5])][:5]
        raise UserError(
            f"Unknown OpenCLIP architecture '{arch}'; use a name from open_clip.list_models() "
            f"(e.g. {', '.join(close) or 'ViT-B-32'}) or the path of a model-config JSON."
        )
    return cfg, {}, name


def check_exportable(spec: ModelSpec, target: str) -> None:
    """Only lipkit's own ViT and transformer text towers have a counterpart in HF's CLIPModel (`target`)."""
    if spec.vision_attn_pool or spec.text_embed_cls:
        raise UserError(
            f"This checkpoint has OpenCLIP CoCa's towers (an attentional pooler, a [cls] text token), which "
            f"{target} cannot hold; export it with `--to open_clip` instead."
        )
    if spec.text_tower != "transformer":
        raise UserError(
            f"This checkpoint's text tower is a Hugging Face encoder (text_tower='{spec.text_tower}'), which "
            f"{target} cannot hold; export it with `--to open_clip` or `lipkit export onnx` instead."
        )
    if spec.vision_tower != "vit":
        raise UserError(
            f"This checkpoint's image tower is a timm network (vision_tower='{spec.vision_tower}'), which "
            f"{target} cannot hold; export it with `--to open_clip` or `lipkit export onnx` instead."
        )
    _check_heads(spec, target)


def _check_heads(spec: ModelSpec, target: str) -> None:
    """A convolutional ViT stem and LexLIP heads have no counterpart in OpenCLIP or CLIPModel."""
    if spec.vision_tower == "vit" and spec.vision_stem != "patch":
        raise UserError(
            f"This checkpoint's image tower has a convolutional stem (vision_stem='{spec.vision_stem}'), which "
            f"{target} cannot hold; export it with `lipkit export onnx` instead."
        )
    if spec.lexicon_vocab:
        raise UserError(
            f"This checkpoint has LexLIP lexicon heads, which {target} cannot hold and a conversion would "
            "drop; keep the lipkit checkpoint for sparse search, or export the towers with `lipkit export onnx`."
        )
    if spec.caption_layers and not (target == "OpenCLIP" and spec.caption_input == "text"):
        raise UserError(
            f"This checkpoint has a caption decoder, which {target}'s CLIP model cannot hold and a conversion would "
            "drop; keep the lipkit checkpoint for `lipkit caption`, or export the towers with `lipkit export onnx`."
        )
    check_not_adapted(spec, target)
    if spec.match_layers:
        raise UserError(
            f"This checkpoint has an image–text matching head, which {target}'s CLIP model cannot hold and a "
            "conversion would drop; keep the lipkit checkpoint for re-ranking, or export the towers with "
            "`lipkit export onnx`."
        )


def open_clip_model_config(
    spec: ModelSpec, logit_bias: float | None = None, text_dir: str = TEXT_DIR
) -> dict[str, Any]:
    """OpenCLIP's model config for a lipkit spec: `CLIP` (argmax or first-end-token text pooling), or
    `CustomTextCLIP` for a Hugging Face text tower whose config and tokenizer are in `text_dir`."""
    _check_heads(spec, "OpenCLIP")
    if spec.vision_tower not in ("vit", "timm") or spec.text_tower not in ("transformer", "hf"):
        raise UserError(
            f"This checkpoint's towers ({spec.vision_tower}, {spec.text_tower}) have no OpenCLIP counterpart; "
            "export it with `lipkit export onnx` instead."
        )
    text: dict[str, Any] = {
        "context_length": spec.context_length,
        "vocab_size": spec.vocab_size,
        "width": spec.text_width,
        "heads": spec.text_heads,
        "layers": spec.text_layers,
        "mlp_ratio": spec.mlp_ratio,
    }
    if spec.eot_id != spec.vocab_size - 1:  # CLIP's end token is the largest id; others pool at eos_id
        text.update(pool_type="eos", eos_id=spec.eot_id)
    vision: dict[str, Any] = {
        "image_size": spec.image_size,
        "layers": spec.vision_layers,
        "width": spec.vision_width,
        "head_width": spec.vision_width // spec.vision_heads,
        "patch_size": spec.patch_size,
        "mlp_ratio": spec.mlp_ratio,
    }
    cfg: dict[str, Any] = {
        "embed_dim": spec.embed_dim,
        "vision_cfg": timm_vision_cfg(spec) if spec.vision_tower == "timm" else vision,
        "text_cfg": hf_text_cfg(spec, text_dir) if spec.text_tower == "hf" else text,
    }
    if spec.text_tower == "hf":
        cfg["custom_text"] = True
    if spec.quick_gelu:
        cfg["quick_gelu"] = True
    if spec.logit_bias:
        cfg["init_logit_bias"] = -10.0 if logit_bias is None else logit_bias
    return coca_config(spec, cfg)


def state_from_open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an OpenCLIP `CLIP` (or `CustomTextCLIP`) state dict to lipkit's names."""
    out = {}
    for k, v in state.items():
        if k in ("attn_mask", "input_resolution", "context_length", "vocab_size"):
            continue  # buffers and metadata of old/OpenAI checkpoints
        if k in ("logit_scale", "logit_bias"):
            out[k] = v.reshape(())
        elif k.startswith(PREFIX_IN):  # CoCa's multimodal decoder
            name, value = decoder_state_in(k, v)
            out[name] = value
        elif k.startswith(("visual.", "text.")):
            out[k] = v
        else:
            out["text." + k] = v
    return out


def state_to_open_clip(state: dict[str, torch.Tensor], custom_text: bool = False) -> dict[str, torch.Tensor]:
    """Rename a lipkit state dict to OpenCLIP `CLIP` names, or (`custom_text`) to CoCa's / a custom-text
    model's, which keep the text tower under `text.`."""
    out = {
        (k if custom_text else k.removeprefix("text.")): v.detach().cpu().clone().contiguous()
        for k, v in state.items()
    }
    return decoder_state_out(out) if custom_text else out


def _adjacent_tokenizer(*places: Path) -> Tokenizer | None:
    for place in places:
        found = tokenizer_from_dir(place if place.is_dir() else place.parent)
        if found is not None:
            return found
    return None


def _places(arch: str, checkpoint: str | Path | dict[str, torch.Tensor]) -> list[Path]:
    """The folders of the checkpoint file and of the config (when `arch` is a path)."""
    out = []
    for p in (checkpoint, arch.removeprefix("local-dir:")):
        if isinstance(p, str | Path) and Path(p).expanduser().exists():
            path = Path(p).expanduser()
            out.append(path if path.is_dir() else path.parent)
    return out


def _clip_tokenizer(cfg: dict[str, Any], arch: str, places: list[Path]) -> TextTokenizer:
    """A `tokenizer.json` beside the config or checkpoint, else CLIP's BPE."""
    raw_tok = _adjacent_tokenizer(*places)
    if raw_tok is None:
        vocab = int((cfg.get("text_cfg") or {}).get("vocab_size", CLIP_VOCAB_SIZE))
        if vocab != CLIP_VOCAB_SIZE:
            raise UserError(
                f"OpenCLIP config '{arch}' has a {vocab}-token vocabulary, not CLIP's BPE ({CLIP_VOCAB_SIZE}); "
                "put the model's tokenizer.json beside the checkpoint."
            )
        raw_tok = clip_tokenizer()
    return TextTokenizer(raw_tok, int((cfg.get("text_cfg") or {}).get("context_length", 77)))


def _hf_text(
    cfg: dict[str, Any], arch: str, places: list[Path], tokenizer: TextTokenizer | None
) -> tuple[dict[str, Any], TextTokenizer]:
    """(spec fields, tokenizer) of a Hugging Face text tower: its config.json from the `hf_model_name`
    folder, the tokenizer from the `hf_tokenizer_name` folder's tokenizer.json (else the model folder's)."""
    text = cfg["text_cfg"]
    folder = find_hf_folder(str(text["hf_model_name"]), arch, places)
    ctx = int(text.get("context_length", 77))
    if tokenizer is not None:
        tokenizer = TextTokenizer(tokenizer.tok, ctx)
    else:
        tok_dirs = [folder]
        if text.get("hf_tokenizer_name"):  # the folder itself, or its name beside the config / checkpoint
            named = Path(str(text["hf_tokenizer_name"])).expanduser()
            tok_dirs = [named, *(base / named.name for base in places), folder]
        path = next((d / "tokenizer.json" for d in tok_dirs if (d / "tokenizer.json").is_file()), None)
        if path is None:
            raise UserError(
                f"The Hugging Face text model '{folder}' of OpenCLIP config '{arch}' has no tokenizer.json; "
                f"save its tokenizer there (AutoTokenizer.from_pretrained(...).save_pretrained('{folder}'))."
            )
        tokenizer = TextTokenizer.load(path, ctx)
    return hf_fields(text, read_hf_config(folder), int(cfg["embed_dim"]), arch, tokenizer), tokenizer


def from_open_clip(
    arch: str, checkpoint: str | Path | dict[str, torch.Tensor], tokenizer: TextTokenizer | None = None
) -> tuple[DualEncoder, TextTokenizer]:
    """A lipkit model and tokenizer from an OpenCLIP architecture and state dict (file or dict).

    The tokenizer is a `tokenizer.json` beside the config or checkpoint when there is one (a model
    written by `to_open_clip`), else CLIP's BPE from OpenCLIP's bundled vocabulary; for a Hugging Face
    text tower, the one in the text model's folder (`text_cfg.hf_tokenizer_name` / `hf_model_name`).
    """
    cfg, preprocess, name = read_arch(arch)
    places = _places(arch, checkpoint)
    text_fields = None
    if (cfg.get("text_cfg") or {}).get("hf_model_name"):
        text_fields, tok = _hf_text(cfg, name, places, tokenizer)
    elif tokenizer is not None:
        tok = TextTokenizer(tokenizer.tok, int((cfg.get("text_cfg") or {}).get("context_length", 77)))
    else:
        tok = _clip_tokenizer(cfg, arch, places)
    spec = spec_from_open_clip(
        cfg, preprocess, eot_id=tok.eot_id, arch=name, pad_id=tok.pad_id, text_fields=text_fields
    )
    if tok.vocab_size > spec.vocab_size:
        raise UserError(
            f"The tokenizer has {tok.vocab_size} tokens but OpenCLIP config '{arch}' only {spec.vocab_size}; "
            "pass the architecture the checkpoint was trained with."
        )
    state = read_state_dict(checkpoint) if isinstance(checkpoint, str | Path) else dict(checkpoint)
    state = state_from_open_clip({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    if spec.text_tower == "hf":
        width = int(spec.text_hf_config["hidden_size"])  # type: ignore[index]
        identity = width if cfg["text_cfg"].get("hf_proj_type", "mlp") is None else None
        state = hf_state_from_open_clip(state, identity)
    source = f"'{checkpoint}'" if isinstance(checkpoint, str | Path) else "the state dict"
    model = build_model(
        spec, state, source, f"pass the OpenCLIP architecture it was trained with instead of '{arch}'"
    )
    return model, tok


def to_open_clip(
    model: DualEncoder, text_dir: str | Path = TEXT_DIR
) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """(model config, preprocess config, state dict) that `open_clip` loads into an equal model.

    A Hugging Face text tower's config names `text_dir` as its model and tokenizer folder; OpenCLIP
    needs an absolute path there (`write_open_clip` writes the folder and names it so)."""
    spec = model.spec
    if spec.vision_tower == "timm":
        check_timm_trunk(model.visual)
    preprocess = {"mean": list(spec.image_mean), "std": list(spec.image_std), "size": spec.image_size}
    state = dict(model.state_dict())
    # OpenCLIP's forward applies exp(logit_scale) unclamped: store the value lipkit actually uses.
    state["logit_scale"] = state["logit_scale"].clamp(max=math.log(model.max_logit_scale))
    bias = float(state["logit_bias"]) if spec.logit_bias else None
    cfg = open_clip_model_config(spec, bias, str(text_dir))
    return (
        cfg,
        preprocess,
        hf_state_to_open_clip(state)
        if spec.text_tower == "hf"
        else state_to_open_clip(state, spec.text_embed_cls),
    )


def write_open_clip(
    model: DualEncoder, tokenizer: TextTokenizer, out: str | Path, overwrite: bool = False
) -> Path:
    """Write an OpenCLIP directory: `open_clip_config.json` + `open_clip_model.safetensors` (load it with
    `open_clip.create_model('local-dir:OUT')`), the bare model config `<OUT name>.json` (for
    `open_clip.add_model_config`), and `tokenizer.json` for the return trip. A Hugging Face text tower
    also gets `OUT/text_model/` (its config.json and tokenizer; the config names it by absolute path) and
    a `tokenizer_config.json` beside `tokenizer.json` (OpenCLIP's `get_tokenizer('local-dir:OUT')` loads
    OUT itself with transformers' AutoTokenizer)."""
    out = Path(out).expanduser()
    refuse_existing(out, overwrite)
    hf = model.spec.text_tower == "hf"
    cfg, preprocess, state = to_open_clip(model, out.resolve() / TEXT_DIR)

    def write(tmp: Path) -> None:
        (tmp / CONFIG_NAME).write_text(
            json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess}, indent=2), encoding="utf-8"
        )
        (tmp / f"{out.name}.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        if hf:
            write_tokenizer_files(tmp, tokenizer)
            write_text_model(tmp / TEXT_DIR, model.spec, tokenizer)
        else:
            tokenizer.save(tmp / "tokenizer.json")

    return write_dir(out, write)


def import_open_clip(arch: str, checkpoint: str | Path, out: str | Path) -> Path:
    """`lipkit checkpoint convert --from open_clip ARCH CHECKPOINT OUT`: write a lipkit checkpoint directory."""
    from lipkit.checkpoint import save_checkpoint

    model, tok = from_open_clip(arch, checkpoint)
    info = {"converted_from": {"format": "open_clip", "arch": arch, "checkpoint": str(checkpoint)}}
    return save_checkpoint(Path(out).expanduser(), model, tok, info)


def export_open_clip(checkpoint: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """`lipkit checkpoint convert --to open_clip CKPT OUT`: write an OpenCLIP directory from a lipkit checkpoint."""
    from lipkit.checkpoint import load_checkpoint

    model, tok, _ = load_checkpoint(checkpoint)
    return write_open_clip(model, tok, out, overwrite)
