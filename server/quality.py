"""The OpenAI `quality` field: fixed levels from the model's declared presets, or `auto`
(the backend chooses per request from load and the deadline: scheduler/quality.py).

Omitting it, or `standard` (DALL-E 3's default), keeps the request exactly as sent;
`hd` is `high`. A level's steps never exceed an explicit `num_inference_steps` (a
ceiling), and an explicit `cache` wins over a fixed level's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from stepserve.engines.capabilities import QUALITY_LEVELS, Capabilities
from stepserve.models.caches.config import CacheConfig

from .errors import APIError
from .protocol import ImageGenerationRequest
from .scheduler.events import Completed
from .scheduler.plan import Plan, ladder
from .scheduler.request import GenerationParams


def apply_quality(body: ImageGenerationRequest, params: GenerationParams,
                  caps: Capabilities, model: str, engine: str, max_steps: int = 100
                  ) -> GenerationParams:
    asked = {"hd": "high", "standard": None}.get(body.quality or "", body.quality)
    if asked is None:
        return params
    if params.schedule is not None:
        raise APIError(400, f"quality {body.quality!r} chooses the steps itself: it cannot "
                       "be combined with timesteps, sigmas or schedule", "quality",
                       "invalid_value")

    def plan(level: str) -> Plan:
        preset = caps.quality[level]
        cache = _supported(preset.get("cache"), caps, model, engine)
        ceiling = body.num_inference_steps or max_steps  # never past the server's max_steps
        return Plan(level, min(int(preset["steps"]), ceiling), cache)

    if asked in QUALITY_LEVELS:
        fixed = plan(asked)
        cache = params.cache if body.cache is not None else fixed.cache
        return replace(params, steps=fixed.steps, cache=cache, quality=asked)
    plans = ladder(Plan("asked", params.steps, params.cache),
                   [plan(level) for level in reversed(QUALITY_LEVELS)])
    return replace(params, quality="auto", ladder=plans,
                   safe_cache=_supported(caps.safe_cache, caps, model, engine))


def _supported(spec: Any, caps: Capabilities, model: str, engine: str) -> CacheConfig | None:
    """A declared cache, where this engine runs it (a preset never makes a request fail)."""
    if not spec:
        return None
    cache = CacheConfig.parse(spec)
    return None if caps.cache_error(cache, model, engine) else cache


def ran(params: GenerationParams, done: Completed, warnings: Sequence[str] = ()
        ) -> dict[str, Any]:
    """The `stepserve` block of a response: the quality asked and what actually ran (the
    plan auto chose, its steps and step cache), and warnings about the request."""
    return block(params.quality, done.level, done.steps, done.cache, warnings)


def block(quality: str | None, level: str | None, steps: int, cache: str | None,
          warnings: Sequence[str] = ()) -> dict[str, Any]:
    out: dict[str, Any] = {"quality": quality, "level": level, "steps": steps,
                           "cache": cache}
    return {**out, "warnings": list(warnings)} if warnings else out
