"""The native TensorRT engine: ONNX graph -> TensorRT plan with optimisation profiles.

TensorRT is imported lazily (it is not installable on CPU machines). The plan is
cached on disk keyed by GPU model, TensorRT version, model hash, precision and
the batch sizes the profile covers. Precisions:
- fp16 / bf16: builder flags on the fp32 graph;
- int8: explicit quantization from the static QDQ graph (timestep-aware
  calibration, see quantize.py) with the INT8 flag;
- fp8 (Hopper and later): the graph is quantized with NVIDIA ModelOpt
  (`modelopt.torch.quantization`, FP8 config, calibrated on the same trajectory
  inputs) and exported with FP8 Q/DQ nodes, then built with the FP8 flag.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from stepserve.models.builtin.text import TextBatch

from .build_cache import BuildCache, module_hash
from .builtin_base import BuiltinEngine
from .onnx_builds import onnx_graph
from .onnx_export import INPUT_NAMES, OUTPUT_NAME, device_inputs, export_key

log = logging.getLogger("stepserve")

PLAN = "denoiser.plan"
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")
MAX_TEXT_TOKENS = 64  # MiniLM prompts longer than this are truncated by the encoder


def import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError as exc:
        raise RuntimeError("the tensorrt engine needs NVIDIA TensorRT (`pip install tensorrt` "
                           "on a CUDA machine with access to NVIDIA's index)") from exc
    return tensorrt


def profile_shapes(image_shape: tuple[int, int, int], text_dim: int, max_batch: int,
                   opt_batch: int) -> dict[str, tuple[tuple[int, ...], ...]]:
    """(min, opt, max) shapes per input: batch 1..max_batch, text length 1..MAX_TEXT_TOKENS."""
    c, h, w = image_shape
    length = MAX_TEXT_TOKENS // 2

    def three(*rest: int, text: bool = False) -> tuple[tuple[int, ...], ...]:
        if text:
            return ((1, 1, *rest), (opt_batch, length, *rest),
                    (max_batch, MAX_TEXT_TOKENS, *rest))
        return ((1, *rest), (opt_batch, *rest), (max_batch, *rest))

    return {"x": three(c, h, w), "t": three(), "d": three(),
            "tokens": three(text_dim, text=True), "mask": three(text=True),
            "pooled": three(text_dim)}


class TensorRTEngine(BuiltinEngine):
    name = "tensorrt"

    def __init__(self, precision: str = "fp16", device: str = "cuda",
                 max_batch_size: int = 128, opt_batch_size: int = 16,
                 quantization: str = "static", build_dir: Path | str | None = None,
                 workspace_gb: float = 4.0, **kwargs: Any) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"tensorrt engine supports precision {PRECISIONS}, "
                             f"not {precision!r}")
        if not device.startswith("cuda") or not torch.cuda.is_available():
            raise RuntimeError("the tensorrt engine needs a CUDA device (--device cuda)")
        if quantization != "static" and precision == "int8":
            raise ValueError("tensorrt int8 uses the static QDQ graph (--quantization static)")
        trt = import_tensorrt()
        super().__init__(precision=precision, device=device, **kwargs)
        self.trt = trt
        cache = BuildCache(build_dir)
        shapes = profile_shapes(self.info.image_shape, self.dit.cfg.text_dim, max_batch_size,
                                min(opt_batch_size, max_batch_size))
        key = {**export_key(self.dit, module_hash(self.dit)), "precision": precision,
               "tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(self.device),
               "profile": {k: [list(s) for s in v] for k, v in shapes.items()}}
        start = time.perf_counter()
        graph = self._graph(precision, cache)
        key["source_graph"] = graph.parent.name  # a digest of everything the graph depends on
        found = cache.lookup("tensorrt", key)
        if found is None:
            with cache.building("tensorrt", key) as scratch:
                (scratch / PLAN).write_bytes(self._build(graph, precision, shapes,
                                                         workspace_gb))
            found = cache.path("tensorrt", key)
        self.build_seconds = time.perf_counter() - start
        log.info("tensorrt plan %s ready in %.1f s", found, self.build_seconds)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine((found / PLAN).read_bytes())
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream(self.device)

    def _graph(self, precision: str, cache: BuildCache) -> Path:
        if precision == "int8":
            return onnx_graph(self.dit, "int8", "static", cache, self.encoder,
                              for_tensorrt=True).path
        if precision == "fp8":
            from .fp8 import fp8_onnx_graph

            return fp8_onnx_graph(self.dit, self.encoder, cache)
        return onnx_graph(self.dit, "fp32", cache=cache).path

    def _build(self, graph: Path, precision: str, shapes: dict, workspace_gb: float) -> bytes:
        trt = self.trt
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # explicit batch is the only mode in TRT 10
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(graph)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise RuntimeError(f"TensorRT could not parse {graph}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
        flags = {"fp16": ["FP16"], "bf16": ["BF16"], "int8": ["INT8", "FP16"],
                 "fp8": ["FP8", "FP16"], "fp32": []}[precision]
        for flag in flags:
            config.set_flag(trt.BuilderFlag.__members__[flag])
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
        start = time.perf_counter()
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise RuntimeError("TensorRT engine build failed (see the TensorRT log above)")
        log.info("tensorrt %s build took %.1f s", precision, time.perf_counter() - start)
        return bytes(plan)

    @torch.inference_mode()
    def denoise(self, x: torch.Tensor, t: torch.Tensor, d: torch.Tensor,
                text: TextBatch) -> torch.Tensor:
        dev = self.device
        values = device_inputs(x, t, d, text, dev)
        out = torch.empty(x.shape, dtype=torch.float32, device=dev)
        for name, v in zip(INPUT_NAMES, values):
            if not self.context.set_input_shape(name, tuple(v.shape)):
                raise ValueError(f"batch shape {tuple(v.shape)} of {name!r} is outside the "
                                 "TensorRT profile (raise max_batch_size and rebuild)")
            self.context.set_tensor_address(name, v.data_ptr())
        self.context.set_tensor_address(OUTPUT_NAME, out.data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream(dev))
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        torch.cuda.current_stream(dev).wait_stream(self.stream)
        return out
