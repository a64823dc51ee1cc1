"""The engine interface the scheduler drives: encode text, one batched forward, decode."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from stepserve.models.builtin.text import TextBatch
from stepserve.models.caches.config import CacheConfig
from stepserve.models.sampling.qsched import QSched


@dataclass(frozen=True)
class EngineInfo:
    engine: str  # registry name, e.g. "torch"
    model: str  # served model name
    precision: str
    device: str
    image_shape: tuple[int, int, int]  # (C, H, W) of one sample
    time_shift: float
    default_steps: int
    default_guidance: float
    qsched: QSched | None = None  # sampler correction for a quantized build


@runtime_checkable
class Engine(Protocol):
    info: EngineInfo

    def encode(self, prompts: list[str]) -> TextBatch:
        """Batched, cached text encoding."""

    def denoise(self, x: torch.Tensor, t: torch.Tensor, d: torch.Tensor,
                text: TextBatch) -> torch.Tensor:
        """ONE forward for a batch whose members may be at different t / d / prompts."""

    def decode(self, x: torch.Tensor) -> np.ndarray:
        """Model samples (N, C, H, W) -> uint8 RGB images (N, H, W, 3)."""

    # The sampling contract the scheduler drives (flow_sampling.FlowSampling for the
    # built-in model). A state exposes .step, .done, .x and .x0 (the preview).
    def init_state(self, seed: int, steps: int, cond: Any, uncond: Any, *, guidance: float,
                   sampler: str = "euler", cache: CacheConfig | None = None) -> Any:
        """One request image's own sampler state."""

    def step_batch(self, states: Sequence[Any]) -> list[Any]:
        """Advance every state one step with at most ONE batched forward."""

    def needs_forward(self, state: Any) -> bool:
        """False when the state's step cache predicts its next step instead."""

    def warmup(self, batch_sizes: tuple[int, ...]) -> None:
        """Run representative forwards so the first request pays no start-up cost."""
