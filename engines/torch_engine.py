"""The PyTorch engine for the built-in model: fp32, bf16 autocast on CPU, fp16/bf16 on CUDA."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from stepserve.models.builtin.dit import DiT
from stepserve.models.builtin.loading import DIT_PATH, default_guidance, load_dit
from stepserve.models.builtin.shapes import to_uint8
from stepserve.models.builtin.text import TextBatch, TextEncoder

from .base import EngineInfo

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TorchEngine:
    def __init__(self, model: str = "builtin", precision: str = "fp32", device: str = "cpu",
                 compile: bool = False, text_cache_size: int = 4096,
                 default_steps: int = 4, weights: Path | None = None,
                 dit: DiT | None = None, encoder: TextEncoder | None = None,
                 guidance: float | None = None) -> None:
        if precision not in _DTYPES:
            raise ValueError(f"torch engine supports precision {sorted(_DTYPES)}, "
                             f"not {precision!r}")
        if precision == "fp16" and not device.startswith("cuda"):
            raise ValueError("fp16 needs a CUDA device; use bf16 on CPU")
        self.device = torch.device(device)
        self.dtype = _DTYPES[precision]
        weights = Path(weights) if weights else DIT_PATH
        self.dit = (dit if dit is not None else load_dit(weights)).to(self.device).eval()
        self.forward = torch.compile(self.dit) if compile else self.dit
        if encoder is None:
            encoder = TextEncoder(device=device, cache_size=text_cache_size)
        self.encoder = encoder
        cfg = self.dit.cfg
        self.info = EngineInfo(engine="torch", model=model, precision=precision,
                               device=str(self.device),
                               image_shape=(cfg.channels, cfg.image_size, cfg.image_size),
                               time_shift=cfg.time_shift, default_steps=default_steps,
                               default_guidance=default_guidance(weights)
                               if guidance is None else guidance)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def encode(self, prompts: list[str]) -> TextBatch:
        return self.encoder.encode(prompts)

    @torch.inference_mode()
    def denoise(self, x: torch.Tensor, t: torch.Tensor, d: torch.Tensor,
                text: TextBatch) -> torch.Tensor:
        with self._autocast():
            return self.forward(x.to(self.device), t.to(self.device), d.to(self.device),
                                text.to(self.device)).float()

    def decode(self, x: torch.Tensor) -> np.ndarray:
        return to_uint8(x)

    def warmup(self, batch_sizes: tuple[int, ...] = (1, 8)) -> None:
        c, h, w = self.info.image_shape
        text = self.encode(["warm-up"])
        for b in batch_sizes:
            self.denoise(torch.zeros(b, c, h, w), torch.ones(b), torch.zeros(b),
                         TextBatch.cat([text] * b))
