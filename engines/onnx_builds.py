"""Find or make the ONNX graph an engine needs: fp32 export, int8 dynamic or static QDQ.

Used lazily by the engines at start-up and ahead of time by `stepserve build`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from stepserve.models.builtin.dit import DiT
from stepserve.models.builtin.text import TextEncoder

from .build_cache import BuildCache, module_hash
from .calibration import DEFAULT_CALIBRATION, CalibrationConfig, split_rows, trajectory_inputs
from .onnx_export import export_denoiser, export_key
from .quantize import MODES, RECIPE, quantize_dynamic_int8, quantize_static_int8

log = logging.getLogger("stepserve")

GRAPH = "denoiser.onnx"


@dataclass
class OnnxBuild:
    path: Path  # the .onnx file
    seconds: float  # time spent building now (0 when it came from the cache)
    cached: bool


def onnx_graph(dit: DiT, precision: str = "fp32", quantization: str = "static",
               cache: BuildCache | None = None, encoder: TextEncoder | None = None,
               calibration: CalibrationConfig = DEFAULT_CALIBRATION,
               calibrate_method: str = "minmax", for_tensorrt: bool = False) -> OnnxBuild:
    if precision not in ("fp32", "int8"):
        raise ValueError(f"ONNX builds support precision fp32 or int8, not {precision!r}")
    if quantization not in MODES:
        raise ValueError(f"quantization must be one of {MODES}, not {quantization!r}")
    cache = cache or BuildCache()
    start = time.perf_counter()
    key = export_key(dit, module_hash(dit))
    fp32 = cache.lookup("onnx-fp32", key)
    built = fp32 is None
    if built:
        log.info("exporting the denoiser to ONNX (opset %s)", key["opset"])
        with cache.building("onnx-fp32", key) as scratch:
            export_denoiser(dit, scratch / GRAPH)
        fp32 = cache.path("onnx-fp32", key)
    if precision == "fp32":
        return _done(fp32 / GRAPH, start, built)
    kind = f"onnx-int8-{quantization}" + ("-tensorrt" if for_tensorrt else "")
    import onnxruntime

    qkey = {**key, "quantization": quantization, "recipe": RECIPE,
            "onnxruntime": onnxruntime.__version__}
    if quantization == "static":
        qkey.update(calibration=calibration.key(), calibrate_method=calibrate_method)
    found = cache.lookup(kind, qkey)
    if found is not None:
        return _done(found / GRAPH, start, built)
    with cache.building(kind, qkey) as scratch:
        if quantization == "dynamic":
            log.info("quantizing the denoiser to int8 (dynamic)")
            quantize_dynamic_int8(fp32 / GRAPH, scratch / GRAPH)
        else:
            from .torch_engine import TorchEngine

            reference = TorchEngine(dit=dit, encoder=encoder or TextEncoder())
            rows = split_rows(trajectory_inputs(reference, calibration))
            log.info("quantizing the denoiser to int8 (static QDQ, %d calibration inputs "
                     "from %d prompts x steps %s)", len(rows), calibration.prompts,
                     list(calibration.steps))
            quantize_static_int8(fp32 / GRAPH, scratch / GRAPH, rows, calibrate_method,
                                 symmetric=for_tensorrt)
    return _done(cache.path(kind, qkey) / GRAPH, start, built=True)


def _done(path: Path, start: float, built: bool) -> OnnxBuild:
    return OnnxBuild(path, time.perf_counter() - start, cached=not built)
