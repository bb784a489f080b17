"""Quantising one exported tower with onnxruntime's quantiser, and the calibration inputs the static
method needs (see `interop.quantize` for why each method, and what was measured)."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from lipkit.config import Config
from lipkit.data.image_store import ImageStore
from lipkit.data.records import Record
from lipkit.data.sources.registry import read_table, source_kind
from lipkit.data.transforms import normalize
from lipkit.errors import UserError
from lipkit.text.tokenizer import TextTokenizer

METHODS = ("auto", "static", "dynamic")
CALIBRATION_BATCH = 32


def read_source(source: str | Path, cfg: Config, what: str) -> list[Record]:
    """Records of a table (any kind `read_table` knows) or of a folder of images."""
    d = cfg.data
    kind = source_kind(source)
    if kind.images_only is not None:
        records = kind.images_only(source)
    else:
        records = read_table(source, d.image_column, d.caption_column, d.image_root)
    if not records:
        raise UserError(f"The {what} '{source}' has no usable rows; point it at a table or folder of images.")
    return records


def pick_method(method: str, graph: Path) -> str:
    """ "static" for a graph whose convolutions hold most of its weights (a CNN), "dynamic" for the rest
    (transformers: a ViT's one patch-embedding convolution holds ~1 % of its weights). See the module
    doc of `interop.quantize` for the measurements behind it."""
    if method not in METHODS:
        raise UserError(f"Quantisation method '{method}' is unknown; use one of {', '.join(METHODS)}.")
    if method != "auto":
        return method
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    sizes = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    weights = {"Conv": 0, "MatMul": 0, "Gemm": 0}
    for node in model.graph.node:
        if node.op_type in weights and len(node.input) > 1:
            weights[node.op_type] += sizes.get(node.input[1], 0)
    return "static" if weights["Conv"] > weights["MatMul"] + weights["Gemm"] else "dynamic"


def _reader(feeds: list[dict[str, np.ndarray]]) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

        def rewind(self) -> None:
            self.it = iter(feeds)

    return Reader()


def saturating_int8() -> bool:
    """Whether this CPU multiplies u8×s8 with AVX2's VPMADDUBSW, whose int16 pair sums saturate (no VNNI):
    onnxruntime's advice is 7-bit weights (`reduce_range`) there. Measured on an AVX2-only EPYC: image
    embeddings' cosine to fp32 0.953 (min) with 8-bit weights; tests/test_quantize.py asks > 0.98."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return " avx2" in flags and "vnni" not in flags


def quantize_graph(
    src: Path, dst: Path, method: str, feeds: Callable[[], list[dict[str, np.ndarray]]]
) -> dict[str, Any]:
    """Write the int8 version of `src` to `dst`; `feeds()` gives the calibration inputs ("static")."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_dynamic,
        quantize_static,
    )

    reduce = saturating_int8()
    if method == "dynamic":
        quantize_dynamic(
            str(src),
            str(dst),
            op_types_to_quantize=["MatMul", "Gemm"],
            per_channel=True,
            reduce_range=reduce,
            weight_type=QuantType.QInt8,
        )
        return {
            "method": "dynamic",
            "ops": ["MatMul", "Gemm"],
            "weights": "int8 per channel" + (", 7-bit range (AVX2 without VNNI)" if reduce else ""),
        }
    pre = dst.with_name(dst.stem + ".pre.onnx")
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    data = feeds()
    quantize_static(
        str(pre),
        str(dst),
        _reader(data),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=reduce,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )
    pre.unlink()
    n = sum(len(next(iter(f.values()))) for f in data)
    return {
        "method": "static",
        "format": "QDQ",
        "weights": "int8 per channel" + (", 7-bit range (AVX2 without VNNI)" if reduce else ""),
        "activations": "uint8 min-max",
        "calibration_inputs": n,
    }


def missing_calibration(tower: str) -> UserError:
    return UserError(
        f"Static quantisation of the {tower} tower needs calibration data; pass --calibration-source "
        f"TABLE (e.g. the training table) or --{tower}-method dynamic."
    )


class Calibration:
    """Calibration inputs for either tower: `count` rows drawn (seeded) from the calibration source, read
    when a static quantisation first needs them; images decoded and normalised as at run time, texts
    tokenised with the checkpoint's tokenizer."""

    def __init__(
        self,
        source: str | Path | None,
        cfg: Config,
        onnx_cfg: dict[str, Any],
        tok: TextTokenizer,
        count: int,
        seed: int,
    ) -> None:
        self.source, self.cfg, self.onnx_cfg, self.tok = source, cfg, onnx_cfg, tok
        self.count, self.seed = count, seed
        self._records: list[Record] | None = None

    def records(self, tower: str) -> list[Record]:
        if self.source is None:
            raise missing_calibration(tower)
        if self._records is None:
            records = read_source(self.source, self.cfg, "calibration source")
            random.Random(self.seed).shuffle(records)
            self._records = records
        return self._records

    def images(self) -> list[dict[str, np.ndarray]]:
        c = self.onnx_cfg
        records = self.records("image")[: self.count]
        store = ImageStore(records, c["image_size"], cache=True, desc="calibration")
        if store.cache is None or len(store.cache) == 0:
            raise UserError(
                f"No image of the calibration source '{self.source}' could be read; fix its image paths."
            )
        x = normalize(store.cache, c["image_mean"], c["image_std"]).numpy()
        return [{c["image_input"]: x[s : s + CALIBRATION_BATCH]} for s in range(0, len(x), CALIBRATION_BATCH)]

    def texts(self) -> list[dict[str, np.ndarray]]:
        captions = [r.captions[0] for r in self.records("text") if r.captions][: self.count]
        if not captions:
            raise UserError(f"The calibration source '{self.source}' has no captions; pass a captions table.")
        ids = self.tok(captions).numpy()
        return [
            {self.onnx_cfg["text_input"]: ids[s : s + CALIBRATION_BATCH]}
            for s in range(0, len(ids), CALIBRATION_BATCH)
        ]
