"""int8 quantization of an exported denoiser through ONNX Runtime's quantization tools.

- dynamic: int8 weights, activations quantized on the fly per batch (no data).
- static (QDQ): int8 weights and activations with fixed ranges from timestep-aware
  calibration data (calibration.py); QDQ graphs are also what TensorRT's explicit
  int8 mode consumes. The products kept in float (float_nodes) still store int8
  weights (weight-only, DequantizeLinear before the product), so the file shrinks
  as much as the dynamic one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

MODES = ("static", "dynamic")
QUANTIZED_OPS = ("MatMul", "Gemm")
RECIPE = 4  # bump when what gets quantized changes, so cached builds are redone


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
    # matrix products only: ONNX Runtime's int8 convolution (ConvInteger) is slower on
    # these CPUs than the float one, and made v3's refine stage the bottleneck
    quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=list(QUANTIZED_OPS))
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
                         method: str = "minmax", symmetric: bool = False) -> None:
    """symmetric=True: signed int8 activations with zero points 0, the only QDQ form
    TensorRT's explicit quantization accepts; onnxruntime's CPU kernels prefer uint8."""
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
                    activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                    weight_type=QuantType.QInt8, per_channel=True,
                    calibrate_method=methods[method],
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True}
                    if symmetric else None,
                    op_types_to_quantize=list(QUANTIZED_OPS),
                    nodes_to_exclude=float_nodes(pre))
    pre.unlink()
    int8_weight_only(dst, float_nodes(dst))


def int8_weight_only(path: Path, nodes: Sequence[str]) -> None:
    """Store these products' weights as int8 with per-output-channel scales and a
    DequantizeLinear in front: float activations, a quarter of the bytes.

    onnxruntime's quantizers have no weight-only int8 mode for MatMul/Gemm (only
    4-bit MatMulNBits), hence this small rewrite.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    users: dict[str, int] = {}
    for n in g.node:
        for name in n.input:
            users[name] = users.get(name, 0) + 1
    wanted = set(nodes)
    new_nodes = []
    for n in g.node:
        w_name = n.input[1] if n.name in wanted and len(n.input) > 1 else None
        if w_name in inits and inits[w_name].data_type == onnx.TensorProto.FLOAT:
            w = numpy_helper.to_array(inits[w_name])
            trans_b = any(a.name == "transB" and a.i for a in n.attribute)
            axis = 0 if n.op_type == "Gemm" and trans_b else w.ndim - 1
            reduce = tuple(i for i in range(w.ndim) if i != axis)
            scale = np.maximum(np.abs(w).max(axis=reduce), 1e-12) / 127.0
            shape = [1] * w.ndim
            shape[axis] = -1
            q = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
            base = f"{w_name}_wo8"
            g.initializer.extend([numpy_helper.from_array(q, base + "_q"),
                                  numpy_helper.from_array(scale.astype(np.float32),
                                                          base + "_scale")])
            new_nodes.append(helper.make_node("DequantizeLinear", [base + "_q", base + "_scale"],
                                              [base], name=base + "_dq", axis=axis))
            n.input[1] = base
            users[w_name] -= 1
            if users[w_name] == 0:
                g.initializer.remove(inits[w_name])
        new_nodes.append(n)
    del g.node[:]
    g.node.extend(new_nodes)
    onnx.save(model, str(path))
