"""What every step-cache policy is: a frozen config with its own knobs, a fresh
per-request (or per-row) state, and the hook that applies it.

Two levels, as in the methods themselves:
- `StepCache` (AB-Cache): decides per request and step whether the denoiser runs
  at all; a skipped step's output is predicted, and the request takes no batch row.
- `ForwardCache` (first-blocks, TeaCache, LazyDiT, DeepCache): runs inside the
  forward, per batch row (a request's conditional and unconditional rows each keep
  a state); the model's forward applies it (models/caches/block_cache.py for the
  built-in DiT, models/caches/deepcache.py for U-Nets).

Policies are registered by name at the end of this module (lazily imported);
`CacheConfig(policy, **knobs)` builds the named policy's config. Choices for the
API, the settings and the CLI come from `policy_names()`; nothing outside this
package compares policy names.
"""

from __future__ import annotations

import abc
import importlib
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch


class CacheConfigError(ValueError):
    """A bad cache option; `field` names it for the API's error message."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class _ByPolicy(abc.ABCMeta):
    """`CacheConfig("ab-cache", order=3)` builds that policy's own config class."""

    def __call__(cls, *args: Any, **knobs: Any) -> Any:
        if cls is CacheConfig:
            return cache_config(*args, **knobs)
        return super().__call__(*args, **knobs)


@dataclass(frozen=True)
class CacheConfig(metaclass=_ByPolicy):
    """Base of every policy's config; `policy` is its registry name."""

    policy: ClassVar[str] = "none"
    requires: ClassVar[str | None] = None  # engine feature it needs (engines/capabilities.py)

    def __post_init__(self) -> None:
        values = vars(self)
        for f in fields(self):
            value, kind = values[f.name], str(f.type)  # annotations are strings here
            if value is None and "None" in kind:
                continue
            if kind.startswith("int") and (not isinstance(value, int)
                                           or isinstance(value, bool)):
                raise CacheConfigError(f.name, f"{f.name} must be an integer, not {value!r}")
            if kind.startswith("float") and (not isinstance(value, int | float)
                                             or isinstance(value, bool)):
                raise CacheConfigError(f.name, f"{f.name} must be a number, not {value!r}")
        self.validate()

    def validate(self) -> None:
        """Range checks of the policy's own knobs (raise CacheConfigError)."""

    @property
    def enabled(self) -> bool:
        return self.policy != "none"

    def forwards(self, steps: int) -> int:
        """Denoiser forwards a request of `steps` steps is expected to run (admission's
        cost model); policies that skip whole steps on a fixed pattern say fewer."""
        return steps

    @staticmethod
    def parse(value: str | dict[str, Any] | None, default: CacheConfig | None = None
              ) -> CacheConfig:
        """A policy name, or {"policy": name, knob: value, ...}; None gives the default,
        and a dict without a policy sets knobs of the default policy."""
        return parse_cache(value, default)


@dataclass(frozen=True)
class NoCache(CacheConfig):
    policy: ClassVar[str] = "none"


@dataclass(frozen=True)
class StepCache(CacheConfig, abc.ABC):
    """A policy that skips whole denoiser calls for a request."""

    @abc.abstractmethod
    def new_state(self) -> Any:
        """The request's fresh cache state."""

    @abc.abstractmethod
    def must_compute(self, state: Any, step: int, steps: int, t: float) -> bool:
        """Whether this step runs the denoiser (else its output is predicted)."""

    @abc.abstractmethod
    def record(self, state: Any, t: float, out: torch.Tensor) -> Any:
        """The state after a computed step with (guided) model output `out`."""

    @abc.abstractmethod
    def predict(self, state: Any, t: float) -> torch.Tensor:
        """A skipped step's model output."""

    @abc.abstractmethod
    def skipped(self, state: Any) -> Any:
        """The state after a predicted step."""


@dataclass(frozen=True)
class ForwardCache(CacheConfig, abc.ABC):
    """A policy applied inside the forward, per batch row."""

    @abc.abstractmethod
    def new_row_state(self) -> Any:
        """One row's fresh state; it must have a `skipped_blocks` count."""


# name -> "module:config class" under this package
_POLICIES: dict[str, str] = {
    "none": "config:NoCache",
    "ab-cache": "ab_cache:ABCacheConfig",
    "first-blocks": "first_blocks:FirstBlocksConfig",
    "teacache": "teacache:TeaCacheConfig",
    "lazydit": "lazydit:LazyDiTConfig",
    "deepcache": "deepcache:DeepCacheConfig",
}


def policy_names() -> tuple[str, ...]:
    return tuple(_POLICIES)


def cache_policy(name: str) -> type[CacheConfig]:
    if not isinstance(name, str) or name not in _POLICIES:
        raise CacheConfigError("policy", f"unknown cache policy {name!r}; "
                                         f"one of {', '.join(_POLICIES)}")
    module, _, attr = _POLICIES[name].partition(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), attr)  # by name


def options(name: str) -> tuple[str, ...]:
    """The options a policy takes (besides its name)."""
    return tuple(f.name for f in fields(cache_policy(name)))


def cache_config(policy: str = "none", **knobs: Any) -> CacheConfig:
    """The named policy's config; an option it does not take is an error naming it."""
    cls = cache_policy(policy)
    allowed = options(policy)
    unknown = sorted(set(knobs) - set(allowed))
    if unknown:
        raise CacheConfigError(unknown[0], f"cache policy {policy!r} has no option "
                                           f"{unknown[0]!r}; its options: "
                                           f"{', '.join(allowed) or 'none'}")
    return cls(**knobs)


def parse_cache(value: str | dict[str, Any] | None, default: CacheConfig | None = None
                ) -> CacheConfig:
    """A policy name, or {"policy": name, option: value, ...}; None gives the default,
    and a dict without a policy sets options of the default policy."""
    if value is None:
        return default or cache_config()
    if isinstance(value, str):
        return cache_config(value)
    knobs = dict(value)
    policy = knobs.pop("policy", (default or cache_config()).policy)
    return cache_config(policy, **knobs)
