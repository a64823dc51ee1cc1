"""The ONNX Runtime engine: fp32 or int8 (dynamic / static QDQ) graphs of the built-in
denoiser, on the CPU, CUDA or TensorRT execution providers."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from stepserve.models.builtin.text import TextBatch
from stepserve.models.sampling.qsched import QSched

from .build_cache import BuildCache
from .builtin_base import BuiltinEngine
from .onnx_builds import onnx_graph
from .onnx_export import INPUT_NAMES, OUTPUT_NAME, device_inputs, feeds

log = logging.getLogger("stepserve")

OPT_LEVELS = ("disable", "basic", "extended", "all")
QSCHED_FILE = "qsched.json"  # Q-Sched start pair, next to the quantized graph


def providers_for(device: str, requested: list[str] | None) -> list[Any]:
    """Execution providers in priority order; a missing one is a clear error, not a silent
    fall-back to the CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested:
        names = list(requested)
    elif device.startswith("cuda"):
        names = ["CUDAExecutionProvider"]
    else:
        names = ["CPUExecutionProvider"]
    missing = [n for n in names if n not in available]
    if missing:
        raise ValueError(f"onnxruntime providers {missing} are not available here "
                         f"(available: {available}); CUDA/TensorRT need onnxruntime-gpu")
    device_id = int(device.split(":")[1]) if device.startswith("cuda:") else 0
    out: list[Any] = []
    for n in names:
        if n in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
            out.append((n, {"device_id": device_id}))
        else:
            out.append(n)
    if "CPUExecutionProvider" not in names:
        out.append("CPUExecutionProvider")  # ops a GPU provider lacks
    return out


class OnnxRuntimeEngine(BuiltinEngine):
    name = "onnxruntime"

    def __init__(self, precision: str = "fp32", device: str = "cpu",
                 quantization: str = "static", providers: list[str] | None = None,
                 threads: int | None = None, opt_level: str = "all",
                 build_dir: Path | str | None = None,
                 qsched: QSched | None | Literal["stored"] = "stored", **kwargs: Any) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise RuntimeError("the onnxruntime engine needs `pip install 'stepserve[onnx]'` "
                               "(onnxruntime-gpu for CUDA)") from exc

        if opt_level not in OPT_LEVELS:
            raise ValueError(f"opt_level must be one of {OPT_LEVELS}, not {opt_level!r}")
        super().__init__(precision=precision, device=device,
                         qsched=None if qsched == "stored" else qsched, **kwargs)
        self.quantization = quantization
        build = onnx_graph(self.dit, precision, quantization, BuildCache(build_dir),
                           encoder=self.encoder)
        self.build_seconds = build.seconds
        self.graph_path = build.path
        qsched_path = build.path.parent / QSCHED_FILE
        if qsched == "stored" and precision != "fp32" and qsched_path.is_file():
            self.info = dataclasses.replace(self.info, qsched=QSched.load(qsched_path))
            log.info("Q-Sched correction %s", self.info.qsched)
        log.info("onnxruntime graph %s (%s, %.1f s)", build.path,
                 "cached" if build.cached else "built", build.seconds)
        options = ort.SessionOptions()
        options.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[opt_level]
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(build.path), options,
                                            providers=providers_for(device, providers))
        self.use_io_binding = self.device.type == "cuda"

    def denoise(self, x: torch.Tensor, t: torch.Tensor, d: torch.Tensor,
                text: TextBatch) -> torch.Tensor:
        if self.use_io_binding:
            return self._denoise_bound(x, t, d, text)
        out = self.session.run([OUTPUT_NAME], feeds(x, t, d, text))[0]
        return torch.from_numpy(out)

    def _denoise_bound(self, x: torch.Tensor, t: torch.Tensor, d: torch.Tensor,
                       text: TextBatch) -> torch.Tensor:
        """CUDA: bind device buffers directly so inputs and output never visit the host."""
        dev = self.device
        values = device_inputs(x, t, d, text, dev)
        out = torch.empty(x.shape, dtype=torch.float32, device=dev)
        binding = self.session.io_binding()
        for name, v in zip(INPUT_NAMES, values):
            binding.bind_input(name, "cuda", dev.index or 0,
                               np.bool_ if v.dtype == torch.bool else np.float32,
                               tuple(v.shape), v.data_ptr())
        binding.bind_output(OUTPUT_NAME, "cuda", dev.index or 0, np.float32, tuple(out.shape),
                            out.data_ptr())
        torch.cuda.current_stream(dev).synchronize()  # inputs written by torch are ready
        self.session.run_with_iobinding(binding)
        return out
