"""The engine contract, exactly as the scheduler core and the runtime call it.

An engine encodes prompts, builds each request image's sampler state, advances a
batch of states with at most ONE denoiser forward, and turns samples into images.
What it accepts (samplers, cache policies, schedules, latency mode) it declares as
`capabilities`, data the API checks requests against.

Implementations: engines/flow_sampling.py (the built-in model: torch, onnxruntime,
tensorrt) and engines/diffusers_engine.py (diffusers folders).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from stepserve.models.caches.config import CacheConfig
from stepserve.models.lora.apply import Adapters
from stepserve.models.lora.format import LoraError
from stepserve.models.lora.library import LoraLibrary, LoraNotFound, LoraTarget
from stepserve.models.sampling.batch import RowState
from stepserve.models.sampling.edit import Edit
from stepserve.models.sampling.qsched import QSched

from .capabilities import Capabilities


@dataclass(frozen=True)
class EngineInfo:
    engine: str  # registry name, e.g. "torch"
    model: str  # served model name
    precision: str
    device: str
    image_shape: tuple[int, int, int]  # (C, H, W) of one output image
    time_shift: float
    default_guidance: float
    qsched: QSched | None = None  # sampler correction of a quantized build (fixed at load)
    # text-to-image starts from noise times this (the model card's sampling default)
    noise_scale: float = 1.0


class Engine(Protocol):
    info: EngineInfo
    build_seconds: float  # export / compile / quantize time paid at start-up
    loras: LoraLibrary | None  # the adapters it may apply (the runtime sets it)
    lora_fallback_rows: int  # adapter rows run through torch instead of its graph, so far

    @property
    def lora_target(self) -> LoraTarget | None:
        """The denoiser LoRA adapters hook into (None: this engine cannot apply them)."""

    @property
    def capabilities(self) -> Capabilities:
        """What this engine's model accepts."""

    def encode(self, prompts: list[str]) -> Any:
        """Batched, cached text encoding; the result has `select(index)` (one prompt per
        request: its `cond` / `uncond`)."""

    def init_state(self, seed: int, steps: int, cond: Any, uncond: Any, *, guidance: float,
                   sampler: str, cache: CacheConfig | None = None,
                   schedule: dict[str, Sequence[float]] | None = None,
                   edit: Edit | None = None,
                   lora: Sequence[tuple[str, float]] = ()) -> RowState:
        """One request image's own sampler state. `schedule` is {"timesteps": [...]} or
        {"sigmas": [...]} where `capabilities.schedule_kinds` allows it; `edit` starts it
        from a source image (where `capabilities.edits`); `lora` names adapters of the
        engine's `loras` library with their scales (where `capabilities.lora`). Raises
        ValueError for parameters this model cannot run (the request's fault)."""

    def needs_forward(self, state: Any) -> bool:
        """False when the state's step cache predicts its next step instead."""

    def step_batch(self, states: Sequence[Any]) -> list[Any]:
        """Advance every state one step with at most ONE batched forward."""

    def decode(self, x: torch.Tensor) -> np.ndarray:
        """Final samples (N, ...) -> uint8 RGB images (N, H, W, 3)."""

    def preview(self, x0: torch.Tensor) -> np.ndarray:
        """Cheap images of predicted clean samples (N, ...) for streamed previews."""

    def picard_init(self, state: Any) -> Any:
        """Latency mode (capabilities.latency_mode): a request's ParaDiGMS state."""

    def picard_round(self, p: Any) -> Any:
        """One batched ParaDiGMS round for it."""

    def text_cache_stats(self) -> tuple[int, int]:
        """(hits, misses) of the prompt-encoding cache so far."""

    def warmup(self, batch_sizes: tuple[int, ...]) -> None:
        """Run representative forwards so the first request pays no start-up cost."""


def adapters(engine: Engine, specs: Sequence[tuple[str, float]]) -> Adapters | None:
    """The named adapters, loaded for this engine's model (ValueError naming `lora`)."""
    if not specs:
        return None
    target = engine.lora_target
    if target is None:
        raise ValueError(f"lora: engine {engine.info.engine!r} does not apply LoRA adapters "
                         "(serve the model with the torch engine)")
    if engine.loras is None:
        raise ValueError("lora: this server has no adapters (set lora_dirs)")
    try:
        return engine.loras.resolve(specs, target)
    except LoraNotFound as exc:
        raise ValueError(f"lora: no adapter named {exc.args[0]!r}") from None
    except LoraError as exc:
        raise ValueError(f"lora: {exc}") from None
