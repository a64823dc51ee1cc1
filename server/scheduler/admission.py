"""Admission by cost, per tenant: one API key (or client address) cannot fill the queue.

A request's cost is the denoiser work it asks for, images x steps (the queue belongs
to one model, so its native image size is the same for every request). A tenant may
hold at most `share` of the queue's cost capacity in flight, except that a tenant
with nothing in flight always gets one request in (so no request is too big to run
ever). A refusal carries a Retry-After computed from the measured drain rate.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from .backend import QueueFull
from .request import GenerationParams


def request_cost(params: GenerationParams) -> float:
    return float(params.n * params.steps)


@dataclass
class DrainRate:
    """Image-steps the core completes per second (exponential moving average)."""

    per_s: float | None = None
    _last: float | None = None

    def observe(self, image_steps: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if self._last is not None and now > self._last and image_steps:
            rate = image_steps / (now - self._last)
            self.per_s = rate if self.per_s is None else 0.8 * self.per_s + 0.2 * rate
        self._last = now

    def idle(self) -> None:
        self._last = None  # time spent idle is not drain time

    def seconds_for(self, cost: float) -> float | None:
        return None if not self.per_s else cost / self.per_s


@dataclass
class Admission:
    capacity: float  # cost the whole queue holds
    share: float  # fraction of it one tenant may hold
    rate: DrainRate = field(default_factory=DrainRate)
    total: float = 0.0
    _tenants: dict[str, float] = field(default_factory=dict)
    _requests: dict[str, tuple[str, float]] = field(default_factory=dict)

    def admit(self, request_id: str, params: GenerationParams) -> None:
        """Count the request in, or raise QueueFull with a Retry-After."""
        cost, tenant = request_cost(params), params.tenant
        held = self._tenants.get(tenant, 0.0)
        limit = self.share * self.capacity
        if held > 0 and held + cost > limit:
            raise QueueFull(f"this API key's share of the queue is full ({held:g} of "
                            f"{limit:g} image-steps in flight)",
                            self._retry_after(held + cost - limit))
        if self.total > 0 and self.total + cost > self.capacity:
            raise QueueFull(f"queue is full ({self.total:g} image-steps in flight)",
                            self._retry_after(self.total + cost - self.capacity))
        self._requests[request_id] = (tenant, cost)
        self._tenants[tenant] = held + cost
        self.total += cost

    def release(self, request_id: str) -> None:
        entry = self._requests.pop(request_id, None)
        if entry is None:
            return
        tenant, cost = entry
        left = self._tenants.get(tenant, 0.0) - cost
        if left > 1e-9:
            self._tenants[tenant] = left
        else:
            self._tenants.pop(tenant, None)
        self.total = max(0.0, self.total - cost)

    def full_retry_after(self, count: int) -> float | None:
        """Retry-After for a queue full by count: until about one request's work drains."""
        return self._retry_after(self.total / max(1, count))

    def _retry_after(self, cost: float) -> float | None:
        seconds = self.rate.seconds_for(cost)
        return None if seconds is None else max(1.0, math.ceil(seconds))
