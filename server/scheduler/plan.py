"""The plans a `quality: auto` request may run at: steps and a step cache.

The API builds a request's ladder, best first, from what it asked (its steps are a
ceiling) and the model's declared levels (engines/capabilities.py); quality.py chooses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from stepserve.models.caches.config import CacheConfig


@dataclass(frozen=True)
class Plan:
    level: str  # "asked" (the request as sent) or a model level: "high", "medium", "low"
    steps: int
    cache: CacheConfig | None = None

    @property
    def forwards(self) -> int:
        return self.steps if self.cache is None else self.cache.forwards(self.steps)

    def to_json(self) -> dict[str, Any]:
        return {"level": self.level, "steps": self.steps, "cache": cache_json(self.cache)}

    @staticmethod
    def from_json(d: dict[str, Any]) -> Plan:
        return Plan(d["level"], int(d["steps"]),
                    CacheConfig.parse(d["cache"]) if d.get("cache") else None)


def cache_json(cache: CacheConfig | None) -> dict[str, Any] | None:
    if cache is None:
        return None
    return {"policy": cache.policy, **asdict(cache)}


def ladder(asked: Plan, levels: Sequence[Plan]) -> tuple[Plan, ...]:
    """The request as asked, then each level capped at its steps, kept only where it
    costs fewer forwards than every plan before it (a tie keeps the better one)."""
    out = [asked]
    for plan in levels:
        capped = replace(plan, steps=min(plan.steps, asked.steps))
        if capped.forwards < out[-1].forwards:
            out.append(capped)
    return tuple(out)


