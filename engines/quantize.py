"""int8 quantization of an exported denoiser through ONNX Runtime's quantization tools.

- dynamic: int8 weights, activations quantized on the fly per batch (no data).
- static (QDQ): int8 weights and activations with fixed ranges from timestep-aware
  calibration data (calibration.py); QDQ graphs are also what TensorRT's explicit
  int8 mode consumes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

MODES = ("static", "dynamic")
QUANTIZED_OPS = ("MatMul", "Gemm")
RECIPE = 2  # bump when what gets quantized changes, so cached builds are redone


def float_nodes(path: Path) -> list[str]:
    """Matrix products that stay in float under static int8 (Q-Diffusion practice):

    - products on per-sample vectors (time / step-size embeddings, adaLN
      modulation): a sliver of the compute, but their activations span the whole
      timestep range, so one static scale fits them badly;
    - the first and last token-wise products (patch embedding and output
      projection): the output projection alone, in int8, costs ~5% output error
      on this model.
    """
    import onnx

    model = onnx.load(str(path))
    g = model.graph
    ranks = {v.name: len(v.type.tensor_type.shape.dim)
             for v in [*g.value_info, *g.input, *g.output]}
    weights = {i.name for i in g.initializer}
    weights |= {o for n in g.node if n.op_type == "Constant" for o in n.output}
    products = [n for n in g.node if n.op_type in QUANTIZED_OPS]  # graphs are topo-sorted
    per_sample = [n.name for n in products if ranks.get(n.input[0]) == 2]
    token_wise = [n.name for n in products
                  if ranks.get(n.input[0]) == 3 and n.input[1] in weights]
    return per_sample + token_wise[:1] + token_wise[-1:]


def _preprocess(src: Path, dst: Path) -> None:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)


def quantize_dynamic_int8(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    pre = dst.with_suffix(".pre.onnx")
    _preprocess(src, pre)
    quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8, per_channel=True)
    pre.unlink()


def _reader(feeds: Sequence[dict[str, np.ndarray]]):
    """An onnxruntime CalibrationDataReader over recorded feeds."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds: Iterator[dict[str, np.ndarray]] = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._feeds, None)

    return Reader()


def quantize_static_int8(src: Path, dst: Path, calibration: Sequence[dict[str, np.ndarray]],
                         method: str = "minmax") -> None:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    pre = dst.with_suffix(".pre.onnx")
    _preprocess(src, pre)
    quantize_static(str(pre), str(dst), _reader(calibration), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    per_channel=True, calibrate_method=methods[method],
                    op_types_to_quantize=list(QUANTIZED_OPS),
                    nodes_to_exclude=float_nodes(pre))
    pre.unlink()
