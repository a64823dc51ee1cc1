"""Which cache a request uses and with which knobs; validated once, at the API edge.

One frozen config per request (from its `cache` field or the server's `--cache`
default); the per-request state that the policy keeps lives with the request's
sampler state, so it follows the request from batch to batch.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

POLICIES = ("none", "ab-cache", "first-blocks", "teacache", "lazydit", "deepcache")
AVAILABLE = POLICIES
BLOCK_POLICIES = ("first-blocks", "teacache", "lazydit")  # engines that run DiT blocks


@dataclass(frozen=True)
class CacheConfig:
    policy: str = "none"
    # ab-cache: extrapolation order k (1 = reuse the last output), and when to compute:
    # (deepcache: a full U-Net step every `interval` steps after `warmup`)
    # one full compute every `interval` steps, or (with a threshold) whenever the
    # error estimate reaches it; never more than max_skips skipped steps in a row
    order: int = 2
    interval: int = 2
    threshold: float | None = None
    max_skips: int = 3
    # block caches: relative-L1 threshold, blocks always computed, forced warm-up steps
    block_threshold: float = 0.08
    first_blocks: int = 1
    last_blocks: int = 0
    warmup: int = 1
    gate_threshold: float = 0.5  # lazydit: reuse a module when its skip probability is over

    def __post_init__(self) -> None:
        for name in ("order", "interval", "max_skips", "first_blocks", "last_blocks", "warmup"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise CacheConfigError(name, f"{name} must be an integer, not {value!r}")
        for name in ("block_threshold", "gate_threshold", "threshold"):
            value = getattr(self, name)
            if value is None and name == "threshold":
                continue
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise CacheConfigError(name, f"{name} must be a number, not {value!r}")
        if not isinstance(self.policy, str) or self.policy not in POLICIES:
            raise CacheConfigError("policy", f"unknown cache policy {self.policy!r}; "
                                             f"one of {', '.join(POLICIES)}")
        if self.policy not in AVAILABLE:
            raise CacheConfigError("policy", f"cache policy {self.policy!r} is not available "
                                             f"yet; available: {', '.join(AVAILABLE)}")
        if not 1 <= self.order <= 3:
            raise CacheConfigError("order", "order must be 1, 2 or 3")
        if self.interval < 1:
            raise CacheConfigError("interval", "interval must be at least 1")
        if self.threshold is not None and not self.threshold > 0:
            raise CacheConfigError("threshold", "threshold must be positive")
        if self.max_skips < 1:
            raise CacheConfigError("max_skips", "max_skips must be at least 1")
        if not self.block_threshold > 0:
            raise CacheConfigError("block_threshold", "block_threshold must be positive")
        if self.first_blocks < 1 or self.last_blocks < 0:
            raise CacheConfigError("first_blocks", "first_blocks must be >= 1, last_blocks >= 0")
        if self.warmup < 1:
            raise CacheConfigError("warmup", "warmup must be at least 1 (step 0 is computed)")
        if not 0 <= self.gate_threshold <= 1:
            raise CacheConfigError("gate_threshold", "gate_threshold must be in [0, 1]")

    @property
    def block_level(self) -> bool:
        return self.policy in BLOCK_POLICIES

    @property
    def enabled(self) -> bool:
        return self.policy != "none"

    @staticmethod
    def parse(value: str | dict[str, Any] | None, default: CacheConfig | None = None
              ) -> CacheConfig:
        """A policy name, or {"policy": name, knob: value, ...}; None gives the default,
        and a dict without a policy sets knobs of the default policy."""
        if value is None:
            return default or CacheConfig()
        if isinstance(value, str):
            return CacheConfig(policy=value)
        known = {f.name for f in fields(CacheConfig)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise CacheConfigError(unknown[0], f"unknown cache option {unknown[0]!r}; "
                                               f"known: {', '.join(sorted(known))}")
        if "policy" not in value:
            value = {**value, "policy": (default or CacheConfig()).policy}
        return CacheConfig(**value)


class CacheConfigError(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
