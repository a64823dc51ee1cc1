"""The sampling half of the Engine contract for the built-in flow model, shared by its
torch, onnxruntime and tensorrt engines: per-request SamplerState
(models/sampling/state.py) advanced by the one batched step (models/sampling/batch.py)
over the engine's `denoise` (and `denoise_cached` for block caches). An engine
supplies the forwards, `encode` and `decode`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from stepserve.models.builtin.captions import vocabulary
from stepserve.models.builtin.text import TextBatch
from stepserve.models.caches.config import CacheConfig
from stepserve.models.lora.library import LoraLibrary, LoraTarget
from stepserve.models.sampling import batch
from stepserve.models.sampling import state as flow
from stepserve.models.sampling.edit import Edit
from stepserve.models.sampling.paradigms import PicardState, picard_init, picard_round

from .base import EngineInfo, adapters
from .capabilities import Capabilities


class FlowSampling:
    info: EngineInfo
    build_seconds: float = 0.0
    runs_blocks: ClassVar[bool] = False  # implements denoise_cached (DiT block caches)
    gates: Any = None  # LazyDiT gates trained for these weights
    loras: LoraLibrary | None = None
    lora_fallback_rows: int = 0  # adapter rows a graph engine ran through torch instead

    # -- what an engine supplies ----------------------------------------------------------
    def encode(self, prompts: list[str]) -> TextBatch:
        raise NotImplementedError

    def denoise(self, x: torch.Tensor, t: torch.Tensor, d: torch.Tensor,
                text: TextBatch) -> torch.Tensor:
        """ONE forward for a batch whose members may be at different t / d / prompts."""
        raise NotImplementedError

    def denoise_cached(self, x: torch.Tensor, t: torch.Tensor, d: torch.Tensor,
                       text: TextBatch, rows: list[Any]) -> tuple[torch.Tensor, list[Any]]:
        """The forward with per-row block caches (engines with runs_blocks)."""
        raise NotImplementedError(f"{type(self).__name__} does not run the DiT blocks")

    def decode(self, x: torch.Tensor) -> np.ndarray:
        raise NotImplementedError

    # -- the sampling contract ------------------------------------------------------------
    @property
    def capabilities(self) -> Capabilities:
        features = (("dit-blocks",) if self.runs_blocks else ()) + (
            ("lazydit-gates",) if self.gates is not None else ())
        return Capabilities(samplers=flow.SAMPLERS, default_sampler="euler",
                            features=features, latency_mode=True, edits=True,
                            lora=self.lora_target is not None, vocabulary=vocabulary())

    @property
    def lora_target(self) -> LoraTarget | None:
        """The torch DiT where this engine runs it (onnxruntime / TensorRT graphs have
        the weights built in)."""
        return None

    def init_state(self, seed: int, steps: int, cond: TextBatch, uncond: TextBatch, *,
                   guidance: float, sampler: str = "euler", cache: CacheConfig | None = None,
                   schedule: dict[str, Sequence[float]] | None = None,
                   edit: Edit | None = None,
                   lora: Sequence[tuple[str, float]] = ()) -> flow.SamplerState:
        if schedule:
            raise ValueError("custom schedules need a diffusers model (the built-in model "
                             "samples its own flow times)")
        info = self.info
        return flow.init_state(seed, steps, cond, uncond, shape=info.image_shape,
                               guidance=guidance, sampler=sampler,
                               time_shift=info.time_shift, qsched=info.qsched, cache=cache,
                               edit=edit, lora=adapters(self, lora),
                               noise_scale=info.noise_scale)

    @property
    def step_model(self) -> flow.FlowStepModel:
        return flow.FlowStepModel(self.denoise, block_denoiser=self.denoise_cached
                                  if self.runs_blocks else None,
                                  lora_denoiser=self.lora_rows if self.lora_fallback else None)

    lora_fallback: bool = False  # rows with adapters take `lora_rows` (torch) instead

    def lora_rows(self, x: torch.Tensor, t: torch.Tensor, d: torch.Tensor,
                  text: TextBatch) -> torch.Tensor:
        """The torch forward for rows with LoRA adapters (graph engines)."""
        raise NotImplementedError

    def step_batch(self, states: Sequence[flow.SamplerState]) -> list[flow.SamplerState]:
        """At most ONE forward; states whose cache skips this step take no row in it."""
        return batch.step_batch(self.step_model, states)

    @staticmethod
    def needs_forward(state: flow.SamplerState) -> bool:
        return batch.needs_forward(state)

    def preview(self, x0: torch.Tensor) -> np.ndarray:
        return self.decode(x0)  # the model's images are its samples: previews are exact

    def text_cache_stats(self) -> tuple[int, int]:
        return 0, 0

    def warmup(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        pass

    # latency mode: ParaDiGMS Picard rounds for a request alone on the server
    def picard_init(self, state: flow.SamplerState) -> PicardState:
        return picard_init(state, window=8, tol=1e-3)

    def picard_round(self, p: PicardState) -> PicardState:
        return picard_round(self.denoise, p)
