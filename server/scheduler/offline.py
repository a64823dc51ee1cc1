"""Offline generation through the same scheduler core and engines the server uses."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from stepserve.engines.base import Engine
from stepserve.models.caches.config import CacheConfig
from stepserve.models.sampling.edit import Edit

from .core import SchedulerConfig, SchedulerCore
from .events import Completed, Failed
from .request import GenerationParams, LoraChoice, Request


def generate_offline(engine: Engine, prompts: Sequence[str], seeds: Sequence[int], steps: int,
                     guidance: float | None = None, sampler: str | None = None,
                     max_batch_size: int = 64, batching: str = "step",
                     cache: CacheConfig | None = None,
                     edits: Sequence[Edit | None] | None = None,
                     lora: Sequence[tuple[LoraChoice, ...]] | None = None) -> np.ndarray:
    """uint8 images (N, H, W, 3), one per prompt, in prompt order; `edits[i]` makes
    prompt i an edit of that source, `lora[i]` names its adapters."""
    edits = edits if edits is not None else [None] * len(prompts)
    lora = lora if lora is not None else [()] * len(prompts)
    guidance = engine.info.default_guidance if guidance is None else guidance
    sampler = sampler or engine.capabilities.default_sampler
    core = SchedulerCore(engine, SchedulerConfig(batching=batching,
                                                 max_batch_size=max_batch_size,
                                                 max_queue=max(1, len(prompts))))
    for i, (prompt, seed, edit, adapters) in enumerate(zip(prompts, seeds, edits, lora,
                                                            strict=True)):
        params = GenerationParams(prompt, steps, seed, guidance, sampler=sampler, cache=cache,
                                  edit=edit, lora=tuple(adapters))
        core.submit(Request(str(i), params, arrival=float(i)))
    images: dict[str, np.ndarray] = {}
    while core.has_work:
        for event in core.step():
            if isinstance(event, Failed):
                raise RuntimeError(f"prompt {event.request_id} failed: {event.message}")
            if isinstance(event, Completed):
                images[event.request_id] = event.images[0]
    return np.stack([images[str(i)] for i in range(len(prompts))])
