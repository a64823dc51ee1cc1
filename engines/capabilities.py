"""What a served model accepts (samplers, caches, custom schedules, latency mode), as
data each engine declares.

The API checks requests against this, not against the engine object, so the
scaled-out API role (no model loaded) checks them the same way: workers publish
their models' capabilities to Redis.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field

from stepserve.models.caches.config import CacheConfig, cache_policy

# Features an engine may have; cache policies name the one they need (models/caches).
FEATURES = {
    "dit-blocks": "an engine that runs the DiT blocks itself (torch)",
    "lazydit-gates": "LazyDiT gates trained for this model's weights "
                     "(stepserve train-builtin --lazydit-only)",
    "unet": "a U-Net model (SD, SDXL, LCM)",
}


# AB-Cache with a full compute every third step: 2-2.7x fewer forwards at 8-16 steps with
# all-five accuracy unchanged on the built-in model (docs/caches.md)
SAFE_CACHE: dict = {"policy": "ab-cache", "order": 2, "interval": 3}
DEFAULT_QUALITY: dict[str, dict] = {"high": {"steps": 8, "cache": None},
                   "medium": {"steps": 8, "cache": SAFE_CACHE},
                   "low": {"steps": 2, "cache": None}}
QUALITY_LEVELS = ("low", "medium", "high")


@dataclass(frozen=True)
class Capabilities:
    samplers: tuple[str, ...] = ("euler",)
    default_sampler: str = "euler"
    features: tuple[str, ...] = ()  # keys of FEATURES
    ays: tuple[int, ...] | None = None  # Align Your Steps timesteps, if the family has them
    schedule_kinds: dict[str, tuple[str, ...]] = field(default_factory=dict)  # sampler -> kinds
    latency_mode: bool = False  # ParaDiGMS Picard rounds (picard_init / picard_round)
    edits: bool = False  # img2img and inpainting (init_state(edit=...))
    lora: bool = False  # per-row LoRA adapters (init_state(lora=...))
    # the OpenAI `quality` levels: "low" / "medium" / "high" -> {"steps": int, "cache":
    # policy name, {"policy": ..., knob: ...} or None}; `safe_cache` is the policy that
    # `quality: auto` may switch on part-way through a request (its quality measured
    # equal to none on this model: docs/caches.md)
    quality: dict[str, dict] = field(default_factory=lambda: dict(DEFAULT_QUALITY))
    safe_cache: dict | None = field(default_factory=lambda: dict(SAFE_CACHE))
    # the words a prompt must use one of to be drawable (the built-in model's; None:
    # any prompt); a prompt with none gets a warning, never a refusal
    vocabulary: tuple[str, ...] | None = None

    def out_of_vocabulary(self, prompt: str) -> bool:
        if not self.vocabulary:
            return False
        return not set(re.findall(r"[a-z]+", prompt.lower())) & set(self.vocabulary)

    def cache_error(self, cache: CacheConfig, model: str, engine: str) -> str | None:
        """Why this model cannot run this cache policy, or None."""
        need = cache_policy(cache.policy).requires
        if need is None or need in self.features:
            return None
        return (f"cache policy {cache.policy!r} needs {FEATURES[need]}; {model!r} "
                f"on {engine!r} does not have it")

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
        d["features"] = tuple(d.get("features", ()))
        d["ays"] = tuple(d["ays"]) if d.get("ays") else None
        d["schedule_kinds"] = {k: tuple(v) for k, v in d.get("schedule_kinds", {}).items()}
        d["vocabulary"] = tuple(d["vocabulary"]) if d.get("vocabulary") else None
        return Capabilities(**d)
