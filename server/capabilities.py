"""What a served model accepts (samplers, caches, custom schedules), as data.

The API checks requests against this, not against the engine object, so the
scaled-out API role (no model loaded) checks them the same way: workers publish
their models' capabilities to Redis.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from dataclasses import dataclass, field
from typing import Any

from stepserve.engines.base import EngineInfo
from stepserve.models.caches.config import CacheConfig


@dataclass(frozen=True)
class Capabilities:
    samplers: tuple[str, ...] = ("euler",)
    default_sampler: str = "euler"
    block_caches: bool = False  # first-blocks / teacache (engines that run DiT blocks)
    lazydit: bool = False  # LazyDiT gates trained for these weights
    deepcache: bool = False  # a U-Net model
    ays: tuple[int, ...] | None = None  # Align Your Steps timesteps, if the family has them
    schedule_kinds: dict[str, tuple[str, ...]] = field(default_factory=dict)  # sampler -> kinds

    def cache_error(self, cache: CacheConfig, info: EngineInfo) -> str | None:
        """Why this model cannot run this cache policy, or None."""
        if cache.block_level and not self.block_caches:
            return (f"cache policy {cache.policy!r} needs an engine that runs the DiT blocks "
                    f"itself (torch); {info.model!r} runs on {info.engine!r}")
        if cache.policy == "deepcache" and not self.deepcache:
            return (f"cache policy 'deepcache' needs a U-Net model (SD, SDXL, LCM); "
                    f"{info.model!r} is not one")
        if cache.policy == "lazydit" and not self.lazydit:
            return ("cache policy 'lazydit' needs LazyDiT gates trained for this model's "
                    "weights (stepserve train-builtin --lazydit-only)")
        return None

    def schedule_error(self, sampler: str, kind: str, values: list[float]) -> str | None:
        if not self.schedule_kinds:
            return ("custom schedules need a diffusers model (the built-in model samples "
                    "its own flow times)")
        if kind not in self.schedule_kinds.get(sampler, ()):
            return f"sampler {sampler!r} does not accept custom {kind}"
        if kind == "timesteps" and any(a <= b for a, b in zip(values, values[1:])):
            return "timesteps must decrease"
        return None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @staticmethod
    def from_json(text: str) -> Capabilities:
        d = json.loads(text)
        d["samplers"] = tuple(d["samplers"])
        d["ays"] = tuple(d["ays"]) if d.get("ays") else None
        d["schedule_kinds"] = {k: tuple(v) for k, v in d.get("schedule_kinds", {}).items()}
        return Capabilities(**d)


def capabilities_of(engine: Any) -> Capabilities:
    samplers = tuple(getattr(engine, "samplers", ("euler",)))
    kinds: dict[str, tuple[str, ...]] = {}
    scheduler_for = getattr(engine, "scheduler_for", None)
    if scheduler_for is not None:
        for name in samplers:
            params = inspect.signature(scheduler_for(name).set_timesteps).parameters
            kinds[name] = tuple(k for k in ("timesteps", "sigmas") if k in params)
    ays = getattr(engine, "ays_timesteps", lambda: None)()
    return Capabilities(
        samplers=samplers, default_sampler=getattr(engine, "default_sampler", samplers[0]),
        block_caches=hasattr(engine, "denoise_cached"),
        lazydit=getattr(engine, "gates", None) is not None,
        deepcache=bool(getattr(getattr(engine, "family", None), "unet", False)),
        ays=tuple(ays) if ays else None, schedule_kinds=kinds)
