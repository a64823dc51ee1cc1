"""ONNX export of the built-in denoiser with dynamic batch and text-length axes.

The graph takes flat tensors (ONNX has no TextBatch) and per-sample t and d, so
one session serves batches mixing requests at different steps and step sizes.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from stepserve.models.builtin.dit import DiT
from stepserve.models.builtin.text import TextBatch

INPUT_NAMES = ("x", "t", "d", "tokens", "mask", "pooled")
OUTPUT_NAME = "v"
OPSET = 18
EXPORTER = f"torch.onnx.export(dynamo=True) torch {torch.__version__.split('+')[0]}"

class DenoiserGraph(nn.Module):
    def __init__(self, dit: DiT) -> None:
        super().__init__()
        self.dit = dit

    def forward(self, x: torch.Tensor, t: torch.Tensor, d: torch.Tensor, tokens: torch.Tensor,
                mask: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        return self.dit(x, t, d, TextBatch(tokens, mask, pooled))


def export_key(dit: DiT, model_hash: str) -> dict:
    cfg = dit.cfg
    return {"model_hash": model_hash, "exporter": EXPORTER, "opset": OPSET,
            "image_shape": [cfg.channels, cfg.image_size, cfg.image_size],
            "text_dim": cfg.text_dim, "dynamic_axes": ["batch", "text_length"]}


def example_inputs(dit: DiT, batch: int = 2, length: int = 8) -> tuple[torch.Tensor, ...]:
    cfg = dit.cfg
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(batch, cfg.channels, cfg.image_size, cfg.image_size, generator=gen),
            torch.rand(batch, generator=gen), torch.zeros(batch),
            torch.randn(batch, length, cfg.text_dim, generator=gen),
            torch.ones(batch, length, dtype=torch.bool),
            torch.randn(batch, cfg.text_dim, generator=gen))


def export_denoiser(dit: DiT, path: Path) -> None:
    batch, length = "batch", "text_length"
    dynamic = {"x": {0: batch}, "t": {0: batch}, "d": {0: batch},
               "tokens": {0: batch, 1: length}, "mask": {0: batch, 1: length},
               "pooled": {0: batch}}
    graph = DenoiserGraph(dit.float().eval())
    # the exporter logs a warning per optional op library it skips (torchvision)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's notes on axis renaming
        device = next(dit.parameters()).device
        example = tuple(a.to(device) for a in example_inputs(dit))
        torch.onnx.export(graph, example, str(path), dynamo=True,
                          opset_version=OPSET, input_names=list(INPUT_NAMES),
                          output_names=[OUTPUT_NAME], dynamic_shapes=dynamic,
                          external_data=False, verbose=False)


def graph_inputs(x: torch.Tensor, t: torch.Tensor, d: torch.Tensor,
                 text: TextBatch) -> list[torch.Tensor]:
    """The graph's inputs in INPUT_NAMES order, with the dtypes it was exported with."""
    return [x.float(), t.float(), d.float(), text.tokens.float(), text.mask.bool(),
            text.pooled.float()]


def feeds(x: torch.Tensor, t: torch.Tensor, d: torch.Tensor,
          text: TextBatch) -> dict[str, np.ndarray]:
    """Session inputs for one batch (CPU numpy)."""
    return {n: v.detach().cpu().numpy()
            for n, v in zip(INPUT_NAMES, graph_inputs(x, t, d, text))}


def device_inputs(x: torch.Tensor, t: torch.Tensor, d: torch.Tensor, text: TextBatch,
                  device: torch.device) -> list[torch.Tensor]:
    """The same inputs as contiguous device buffers (IO binding, TensorRT)."""
    return [v.to(device).contiguous() for v in graph_inputs(x, t, d, text)]
