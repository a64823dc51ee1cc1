"""What every engine for the built-in model shares: weights, text encoder, decode, warm-up.

Engines differ only in how they run the denoiser forward (PyTorch, ONNX Runtime,
TensorRT), so that is the one method a subclass supplies.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from stepserve.models.builtin.dit import DiT
from stepserve.models.builtin.loading import (
    DIT_PATH,
    default_guidance,
    default_noise_scale,
    load_dit,
)
from stepserve.models.builtin.shapes import to_uint8
from stepserve.models.builtin.text import TextBatch, TextEncoder
from stepserve.models.lora.library import LoraTarget
from stepserve.models.sampling.qsched import QSched

from .base import EngineInfo
from .flow_sampling import FlowSampling


class BuiltinEngine(FlowSampling):
    name = "base"

    def __init__(self, model: str = "builtin", precision: str = "fp32", device: str = "cpu",
                 text_cache_size: int = 4096, text_cache_mb: float = 64.0,
                 weights: Path | None = None, dit: DiT | None = None,
                 encoder: TextEncoder | None = None, guidance: float | None = None,
                 qsched: QSched | None = None, noise_scale: float | None = None) -> None:
        self.device = torch.device(device)
        self.weights = Path(weights) if weights else DIT_PATH
        self.dit = (dit if dit is not None else load_dit(self.weights)).eval()
        self.encoder = encoder or TextEncoder(device=device, cache_size=text_cache_size,
                                              cache_bytes=int(text_cache_mb * 2**20))
        self.build_seconds = 0.0  # export / compile / quantize time paid at start-up
        cfg = self.dit.cfg
        self.info = EngineInfo(engine=self.name, model=model, precision=precision,
                               device=str(self.device),
                               image_shape=(cfg.channels, cfg.image_size, cfg.image_size),
                               time_shift=cfg.time_shift,
                               default_guidance=default_guidance(self.weights)
                               if guidance is None else guidance, qsched=qsched,
                               noise_scale=default_noise_scale(self.weights)
                               if noise_scale is None else noise_scale)

    # onnxruntime / TensorRT graphs hold the weights; rows with LoRA adapters run through
    # the torch DiT kept beside them (counted: stepserve_lora_fallback_rows_total)
    lora_fallback = True

    @property
    def lora_target(self) -> LoraTarget | None:
        return LoraTarget(self.info.model, self.dit)

    @torch.inference_mode()
    def lora_rows(self, x: torch.Tensor, t: torch.Tensor, d: torch.Tensor,
                  text: TextBatch) -> torch.Tensor:
        self.lora_fallback_rows += x.shape[0]
        dev = next(self.dit.parameters()).device
        return self.dit(x.to(dev), t.to(dev), d.to(dev), text.to(dev)).float()

    def encode(self, prompts: list[str]) -> TextBatch:
        return self.encoder.encode(prompts)

    def text_cache_stats(self) -> tuple[int, int]:
        return self.encoder.hits, self.encoder.misses

    def decode(self, x: torch.Tensor) -> np.ndarray:
        return to_uint8(x)

    def warmup(self, batch_sizes: tuple[int, ...] = (1, 8)) -> None:
        c, h, w = self.info.image_shape
        text = self.encode(["warm-up"])
        for b in batch_sizes:
            self.denoise(torch.zeros(b, c, h, w), torch.ones(b), torch.zeros(b),
                         TextBatch.cat([text] * b))
