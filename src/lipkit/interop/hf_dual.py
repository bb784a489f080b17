"""Hugging Face `VisionTextDualEncoderModel` folders in and out, for lipkit models with a timm image tower
and a Hugging Face text tower (the demo's tf_efficientnet_lite0 + all-MiniLM-L6-v2).

The folder: `config.json` (model_type "vision-text-dual-encoder"; `vision_config` a `timm_wrapper` config —
transformers' TimmWrapperModel, `architecture` = timm_model_name, `model_args.global_pool` = timm_pool,
plus `hidden_size` = the trunk's pooled width, which VisionTextDualEncoderModel reads; `text_config` the
text tower's own config; `projection_dim` = embed_dim; `lipkit_text_pool`, `lipkit_pad_id`), one
`model.safetensors`, `preprocessor_config.json` (CLIPImageProcessor: resize, centre crop, image mean/std),
the tokenizer files (AutoTokenizer and AutoProcessor load them) and `modeling_lipkit_dual.py`.

Weights: `vision_model.timm_model.*` is the timm trunk as it is, `visual_projection.weight` the linear head
(`head.proj.weight`, already (out, in)), `text_model.*` the text encoder; `text_projection.weight` is
lipkit's `text_projection` transposed and times 2**14, and `text_model.pooler.dense` (which lipkit's tower
does not have) is 2**-14 times the identity with bias 0 — powers of two, so both scalings are exact.

What each loading call computes (tests/test_interop_hf_dual.py checks each to 1e-4, float32, eval mode):

* `AutoModel.from_pretrained(folder, trust_remote_code=True)` → `LipkitDualEncoderModel`
  (modeling_lipkit_dual.py): image and text features equal to lipkit's, whatever `text_pool`.
* `VisionTextDualEncoderModel.from_pretrained(folder)` (or `AutoModel` without trust_remote_code): same
  weights, image features equal to lipkit's; its text side is BERT's pooler on the first token,
  `tanh(2**-14 · h[:, 0])`, which with that scale is `2**-14 · h[:, 0]` to float32 rounding — so the
  text features equal lipkit's for a `text_pool: cls` model and are first-token features (not lipkit's)
  for a `text_pool: mean` one. Other dtypes are not checked.

Import (`from_hf_dual`) reads the folder as LipkitDualEncoderModel computes it; an exported folder
comes back with the same spec and bit-identical weights (a logit scale above lipkit's maximum is stored
clamped, as for CLIPModel). Needs only safetensors and tokenizers; transformers is for whoever loads it.
"""

from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lipkit.atomic import write_dir
from lipkit.errors import UserError
from lipkit.interop import check_not_adapted, refuse_existing
from lipkit.interop.peer_weights import (
    build_model,
    image_processor_config,
    read_hf_weights,
    read_json,
    tokenizer_from_dir,
)
from lipkit.models.dual_encoder import DualEncoder
from lipkit.models.presets import ModelSpec
from lipkit.text.tokenizer import TextTokenizer

DUAL_TYPE = "vision-text-dual-encoder"
# shipped as package data, not as a module: it imports transformers, which importing lipkit must not do
MODELING = "modeling_lipkit_dual.py"
SCALE = 2.0**14  # text_projection × SCALE, pooler.dense = I / SCALE (see the module notes)
_VISION, _TEXT = "vision_model.timm_model.", "text_model."
_POOLER = "text_model.pooler.dense."
_REEXPORT = "re-export it with `lipkit checkpoint convert --to hf`"


def check_dual_exportable(spec: ModelSpec) -> None:
    """Refuse, in one sentence, what a VisionTextDualEncoderModel folder cannot hold."""
    check_not_adapted(spec, "a VisionTextDualEncoderModel folder")
    onnx = "export it with `lipkit export onnx` instead"
    pair = "a pair that neither CLIPModel nor lipkit's VisionTextDualEncoderModel folders hold"
    open_clip = "export it with `--to open_clip` (OpenCLIP holds this pair) or `lipkit export onnx` instead"
    if spec.vision_tower != "timm":
        raise UserError(
            "This checkpoint's image tower is lipkit's ViT (vision_tower='vit') beside a Hugging Face text "
            f"tower, {pair}; {open_clip}."
        )
    if spec.text_tower != "hf":
        raise UserError(
            "This checkpoint's text tower is lipkit's own transformer (text_tower='transformer') beside a "
            f"timm image tower, {pair}; {open_clip}."
        )
    if spec.timm_proj != "linear" or spec.timm_proj_bias:
        raise UserError(
            f"This checkpoint's image projection is timm_proj='{spec.timm_proj}'"
            f"{' with a bias' if spec.timm_proj_bias else ''}, but VisionTextDualEncoderModel's "
            f"visual_projection is one bias-free linear layer; {onnx}."
        )
    if spec.timm_pool not in ("avg", "max", "avgmax"):
        raise UserError(
            f"This checkpoint's timm tower pools with timm_pool='{spec.timm_pool}', which gives no pooled "
            f"vector for VisionTextDualEncoderModel; {onnx}."
        )
    if spec.text_pool not in ("mean", "cls"):
        raise UserError(f"Text pooling '{spec.text_pool}' is not one lipkit exports; {onnx}.")
    if spec.logit_bias or spec.lexicon_vocab or spec.caption_layers or spec.match_layers:
        what = (
            "a learned logit bias (sigmoid loss)"
            if spec.logit_bias
            else "LexLIP lexicon heads"
            if spec.lexicon_vocab
            else "a caption decoder"
            if spec.caption_layers
            else "an image–text matching head"
        )
        raise UserError(f"This checkpoint has {what}, which VisionTextDualEncoderModel cannot hold; {onnx}.")


def _check_trunk(model: DualEncoder) -> None:
    """TimmWrapperModel builds `timm.create_model(name, num_classes=0, global_pool=pool)`: refuse a trunk
    whose weights that model would not hold one to one."""
    import timm

    spec = model.spec
    with torch.device("meta"):
        peer = timm.create_model(
            spec.timm_model_name, pretrained=False, num_classes=0, global_pool=spec.timm_pool
        )
    ours = {k: tuple(v.shape) for k, v in model.visual.trunk.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in peer.state_dict().items()}
    if ours != theirs:
        k = sorted(set(ours) ^ set(theirs) or {k for k in ours if ours[k] != theirs[k]})[0]
        raise UserError(
            f"transformers' TimmWrapperModel would build timm '{spec.timm_model_name}' with weights other "
            f"than this checkpoint's trunk (e.g. {k}); export it with `lipkit export onnx` instead."
        )


def dual_config(model: DualEncoder, tokenizer: TextTokenizer, logit_scale: float) -> dict[str, Any]:
    """The VisionTextDualEncoderConfig dict of a lipkit model (see the module notes)."""
    spec = model.spec
    return {
        "architectures": ["LipkitDualEncoderModel"],
        "auto_map": {"AutoModel": f"{Path(MODELING).stem}.LipkitDualEncoderModel"},
        "model_type": DUAL_TYPE,
        "projection_dim": spec.embed_dim,
        "logit_scale_init_value": logit_scale,
        "lipkit_text_pool": spec.text_pool,
        "lipkit_pad_id": tokenizer.pad_id,
        "dtype": "float32",
        "vision_config": {
            "model_type": "timm_wrapper",
            "architecture": spec.timm_model_name,
            "model_args": {"global_pool": spec.timm_pool},
            "do_pooling": True,
            "hidden_size": int(model.visual.head.proj.in_features),
            "num_classes": 0,
            "label_names": [],
        },
        "text_config": dict(spec.text_hf_config or {}),
    }


def dual_state(model: DualEncoder) -> tuple[dict[str, torch.Tensor], float]:
    """(VisionTextDualEncoderModel state dict, the logit scale stored) of a lipkit model."""
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for key in list(state):
        if key.startswith("visual.trunk."):
            out[_VISION + key.removeprefix("visual.trunk.")] = state.pop(key)
        elif key.startswith("text.encoder."):
            out[_TEXT + key.removeprefix("text.encoder.")] = state.pop(key)
    projection = state.pop("text.text_projection")
    width = projection.shape[0]
    out["text_projection.weight"] = projection.t() * SCALE
    out[_POOLER + "weight"] = torch.eye(width) / SCALE
    out[_POOLER + "bias"] = torch.zeros(width)
    out["visual_projection.weight"] = state.pop("visual.head.proj.weight")
    # HF applies exp(logit_scale) unclamped: store the value lipkit actually uses.
    scale = min(float(state.pop("logit_scale")), math.log(model.max_logit_scale))
    out["logit_scale"] = torch.tensor(scale)
    if state:
        raise UserError(
            f"This checkpoint has weights no VisionTextDualEncoderModel holds ({sorted(state)[:3]})."
        )
    return {k: v.contiguous().clone() for k, v in out.items()}, scale


def _tokenizer_files(tokenizer: TextTokenizer, out: Path) -> None:
    data = json.loads(tokenizer.tok.to_str())
    data["padding"], data["truncation"] = None, None  # HF tokenizers pad and truncate on request
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    name = tokenizer.tok.id_to_token
    special = {
        "cls_token": name(tokenizer.sot_id),
        "bos_token": name(tokenizer.sot_id),
        "sep_token": name(tokenizer.eot_id),
        "eos_token": name(tokenizer.eot_id),
        "pad_token": name(tokenizer.pad_id),
    }
    for role, token in (("unk_token", "[UNK]"), ("mask_token", "[MASK]")):
        if tokenizer.tok.token_to_id(token) is not None:
            special[role] = token
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "processor_class": "VisionTextDualEncoderProcessor",
        "model_max_length": tokenizer.context_length,
        **special,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")


def write_hf_dual(
    model: DualEncoder, tokenizer: TextTokenizer, out: str | Path, overwrite: bool = False
) -> Path:
    """Write a VisionTextDualEncoderModel folder (see the module notes for what each loader computes)."""
    out = Path(out).expanduser()
    check_dual_exportable(model.spec)
    _check_trunk(model)
    state, scale = dual_state(model)
    config = dual_config(model, tokenizer, scale)
    refuse_existing(out, overwrite)

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        pre = image_processor_config(model.spec, processor_class="VisionTextDualEncoderProcessor")
        (tmp / "preprocessor_config.json").write_text(json.dumps(pre, indent=2), encoding="utf-8")
        _tokenizer_files(tokenizer, tmp)
        source = resources.files("lipkit.interop").joinpath(f"{MODELING}.txt")
        (tmp / MODELING).write_bytes(source.read_bytes())

    return write_dir(out, write)


def loading_hint(out: Path, config: dict[str, Any]) -> str:
    """What each transformers loading call gives for a folder written by `write_hf_dual`."""
    exact = (
        f"transformers.AutoModel.from_pretrained('{out}', trust_remote_code=True) gives lipkit's embeddings"
    )
    stock = f"VisionTextDualEncoderModel.from_pretrained('{out}')"
    if config.get("lipkit_text_pool") == "cls":
        return f"{exact}; {stock} gives them too, to float32 rounding"
    return (
        f"{exact}; {stock} loads the same weights with lipkit's image embeddings but first-token ([CLS]) "
        "text embeddings, not lipkit's mean-pooled ones"
    )


def _timm_args(vision: dict[str, Any], where: str) -> tuple[str, str]:
    """(timm_model_name, timm_pool) of a timm_wrapper vision config."""
    kind = vision.get("model_type")
    if kind != "timm_wrapper":
        raise UserError(
            f"{where} has a '{kind}' vision model; lipkit imports VisionTextDualEncoder folders whose "
            "vision model is a timm network (model_type 'timm_wrapper'), as `lipkit checkpoint convert "
            "--to hf` writes them."
        )
    args = vision.get("model_args") or {}
    if not vision.get("architecture") or set(args) != {"global_pool"}:
        raise UserError(
            f"{where} builds its timm model from architecture={vision.get('architecture')!r} and model_args "
            f"{args}; lipkit needs an architecture and model_args with global_pool only, {_REEXPORT}."
        )
    if args["global_pool"] not in ("avg", "max", "avgmax"):
        raise UserError(
            f"{where} pools its timm model with global_pool={args['global_pool']!r}, which lipkit's timm "
            f"tower does not implement (avg, max or avgmax); {_REEXPORT}."
        )
    return str(vision["architecture"]), str(args["global_pool"])


def spec_from_dual(
    config: dict[str, Any], preprocessor: dict[str, Any] | None, tok: TextTokenizer, where: str
) -> ModelSpec:
    """The lipkit ModelSpec of a VisionTextDualEncoderConfig dict written by `write_hf_dual`."""
    name, pool = _timm_args(config.get("vision_config") or {}, where)
    text_pool = config.get("lipkit_text_pool")
    if text_pool not in ("mean", "cls"):
        raise UserError(
            f"{where} has no lipkit_text_pool, so its text side is BERT's tanh pooler, which lipkit's text "
            "tower does not compute; import folders written by `lipkit checkpoint convert --to hf`."
        )
    prep = preprocessor or {}
    crop = prep.get("crop_size") or {}
    square = (
        isinstance(crop, dict) and "height" in crop and crop.get("width", crop["height"]) == crop["height"]
    )
    if not square or len(prep.get("image_mean") or ()) != 3 or len(prep.get("image_std") or ()) != 3:
        raise UserError(
            f"{where} has no preprocessor_config.json with a square crop_size and RGB image_mean/image_std; "
            f"{_REEXPORT}."
        )
    return ModelSpec(
        embed_dim=int(config.get("projection_dim", 512)),
        image_size=int(crop["height"]),
        vision_tower="timm",
        timm_model_name=name,
        timm_pool=pool,
        timm_proj="linear",
        text_tower="hf",
        text_hf_config=dict(config.get("text_config") or {}),
        text_pool=text_pool,
        context_length=tok.context_length,
        vocab_size=tok.vocab_size,
        eot_id=tok.eot_id,
        pad_id=tok.pad_id,
        image_mean=tuple(float(x) for x in prep["image_mean"]),  # type: ignore[arg-type]
        image_std=tuple(float(x) for x in prep["image_std"]),  # type: ignore[arg-type]
    )


def state_from_dual(state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """A VisionTextDualEncoderModel state dict under lipkit's names, as LipkitDualEncoderModel computes it:
    text_projection(pooler.dense(pooled)) is one linear map when the pooler's bias is 0."""
    rest = {k: v for k, v in state.items() if not k.endswith("position_ids")}

    def take(key: str) -> torch.Tensor:
        if key not in rest:
            raise UserError(f"The weights of {where} lack '{key}'; {_REEXPORT}.")
        return rest.pop(key)

    dense, bias, projection = take(_POOLER + "weight"), take(_POOLER + "bias"), take("text_projection.weight")
    if bias.any() or dense.ndim != 2 or projection.shape[-1] != dense.shape[0]:
        raise UserError(
            f"The text pooler of {where} is not a bias-free linear map into text_projection, which lipkit's "
            f"text tower cannot hold; {_REEXPORT}."
        )
    out = {
        "text.text_projection": (projection @ dense).t(),
        "visual.head.proj.weight": take("visual_projection.weight"),
        "logit_scale": take("logit_scale").reshape(()),
    }
    for key in list(rest):
        for hf, ours in ((_VISION, "visual.trunk."), (_TEXT, "text.encoder.")):
            if key.startswith(hf):
                out[ours + key.removeprefix(hf)] = rest.pop(key)
    out.update(rest)  # anything left over is reported by build_model as not used
    return out


def from_hf_dual(directory: Path, config: dict[str, Any]) -> tuple[DualEncoder, TextTokenizer]:
    """A lipkit model and tokenizer from a folder written by `write_hf_dual` (config: its config.json)."""
    where = f"'{directory}'"
    _timm_args(config.get("vision_config") or {}, where)
    raw = tokenizer_from_dir(directory)
    if raw is None:
        raise UserError(
            f"{where} has no tokenizer.json with start, end and pad tokens; save the text model's tokenizer "
            "into it (tokenizer.save_pretrained(dir))."
        )
    text = config.get("text_config") or {}
    tok_config = read_json(directory / "tokenizer_config.json") or {}
    context = min(int(tok_config.get("model_max_length", 512)), int(text.get("max_position_embeddings", 512)))
    tok = TextTokenizer(raw, context)
    spec = spec_from_dual(config, read_json(directory / "preprocessor_config.json"), tok, where)
    weights = read_hf_weights(directory, "`lipkit checkpoint convert --to hf`")
    state = {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}
    try:
        return build_model(spec, state_from_dual(state, where), where, _REEXPORT), tok
    except (TypeError, ValueError) as e:  # a text model type HFTextTower cannot build without its pooler
        raise UserError(
            f"lipkit cannot build the '{text.get('model_type')}' text model of {where} as its text tower "
            f"({e}); {_REEXPORT}."
        ) from e
