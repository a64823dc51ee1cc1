"""fp8 (E4M3) denoiser graphs for TensorRT on Hopper and later, through NVIDIA ModelOpt.

ModelOpt inserts fp8 quantizers into the PyTorch model, calibrates them on the
same timestep-aware trajectory inputs as int8, and the ONNX export then carries
fp8 Q/DQ nodes that TensorRT's FP8 builder flag consumes. Imported lazily:
`pip install nvidia-modelopt[torch]` on the GPU machine.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from stepserve.models.builtin.dit import DiT
from stepserve.models.builtin.text import TextBatch, TextEncoder

from .build_cache import BuildCache, module_hash
from .calibration import DEFAULT_CALIBRATION, CalibrationConfig, trajectory_inputs
from .onnx_builds import GRAPH
from .onnx_export import INPUT_NAMES, export_denoiser, export_key


def fp8_onnx_graph(dit: DiT, encoder: TextEncoder, cache: BuildCache,
                   calibration: CalibrationConfig = DEFAULT_CALIBRATION) -> Path:
    try:
        import modelopt.torch.quantization as mtq
    except ImportError as exc:
        raise RuntimeError("fp8 needs NVIDIA ModelOpt: pip install 'nvidia-modelopt[torch]'"
                           ) from exc
    key = {**export_key(dit, module_hash(dit)), "quantization": "fp8-modelopt",
           "calibration": calibration.key()}
    found = cache.lookup("onnx-fp8", key)
    if found is not None:
        return found / GRAPH
    from .torch_engine import TorchEngine

    device = "cuda"
    feeds = trajectory_inputs(TorchEngine(dit=dit, encoder=encoder), calibration)
    model = copy.deepcopy(dit).to(device).eval()

    def forward_loop(m: DiT) -> None:
        for feed in feeds:
            x, t, d, tokens, mask, pooled = (torch.from_numpy(feed[n]).to(device)
                                             for n in INPUT_NAMES)
            m(x, t, d, TextBatch(tokens, mask, pooled))

    model = mtq.quantize(model, mtq.FP8_DEFAULT_CFG, forward_loop)
    with cache.building("onnx-fp8", key) as scratch:
        export_denoiser(model, scratch / GRAPH)
    return cache.path("onnx-fp8", key) / GRAPH
