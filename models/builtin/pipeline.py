"""The built-in model assembled for use: text encoder + DiT + sampler.

Used by `stepserve generate`, the yardstick and (later) the PyTorch engine.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..sampling.state import SamplerState, init_state, run_to_completion
from .checkpoint import WEIGHTS_DIR, load_config, load_state
from .dit import DiT, DiTConfig
from .shapes import to_uint8
from .text import TextBatch, TextEncoder

DIT_PATH = WEIGHTS_DIR / "dit.safetensors"
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_dit(path: Path = DIT_PATH) -> DiT:
    meta = load_config(path)
    return load_state(DiT(DiTConfig(**meta["config"])), path).eval()


def default_guidance(path: Path = DIT_PATH) -> float:
    return float(load_config(path).get("default_guidance", 3.0))


class BuiltinPipeline:
    def __init__(self, dit: DiT | None = None, encoder: TextEncoder | None = None,
                 device: str = "cpu", precision: str = "fp32",
                 guidance: float | None = None) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        self.device = torch.device(device)
        self.dit = (dit or load_dit()).to(self.device).eval()
        self.encoder = encoder or TextEncoder()
        self.precision = precision
        self.cfg: DiTConfig = self.dit.cfg
        self.default_guidance = default_guidance() if guidance is None else guidance

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    @torch.inference_mode()
    def denoise(self, x: torch.Tensor, t: torch.Tensor, d: torch.Tensor,
                text: TextBatch) -> torch.Tensor:
        with self.autocast():
            return self.dit(x, t, d, text).float()

    def states(self, prompts: Sequence[str], seeds: Sequence[int], steps: int,
               guidance: float, sampler: str = "euler",
               negative_prompts: Sequence[str] | None = None) -> list[SamplerState]:
        negative_prompts = negative_prompts or [""] * len(prompts)
        cond = self.encoder.encode(list(prompts))
        uncond = self.encoder.encode(list(negative_prompts))
        shape = (self.cfg.channels, self.cfg.image_size, self.cfg.image_size)
        return [init_state(seed, steps, cond.select([i]), uncond.select([i]), shape=shape,
                           guidance=guidance, sampler=sampler, time_shift=self.cfg.time_shift)
                for i, seed in enumerate(seeds)]

    def generate(self, prompts: Sequence[str], seeds: Sequence[int], steps: int = 4,
                 guidance: float | None = None, sampler: str = "euler",
                 max_batch: int = 64) -> np.ndarray:
        """uint8 images (N, H, W, 3)."""
        guidance = self.default_guidance if guidance is None else guidance
        states = self.states(prompts, seeds, steps, guidance, sampler)
        done = run_to_completion(self.denoise, states, max_batch, self.device)
        return to_uint8(torch.stack([s.x for s in done]))

    def timed_generate(self, *args: object, **kwargs: object) -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        images = self.generate(*args, **kwargs)  # type: ignore[arg-type]
        return images, time.perf_counter() - start
