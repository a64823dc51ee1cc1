"""Batch policy: priority class (with aging, so nothing starves), then earliest deadline
first within the class, then arrival."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from .request import Request


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int = 32  # most samples (images) in one denoiser forward
    aging_s: float = 5.0  # each aging_s without service raises a request one priority level
    # "mixed": rows with any adapters share a forward; "split": only requests with the same
    # adapters and scales do (as the peers batch; kept to measure the difference)
    lora_batching: str = "mixed"
    edf: bool = True  # earliest deadline first within a class (False: arrival order)

    def key(self, req: Request, now: float) -> tuple[float, float, float]:
        """Each aging_s without service lifts a request one priority class; within a
        class the earliest deadline goes first (no deadline: last), then arrival."""
        waited = max(0.0, now - req.last_served)
        deadline = req.deadline if self.edf else None
        return (math.ceil(req.params.priority - waited / self.aging_s),
                math.inf if deadline is None else deadline, req.arrival)

    def order(self, reqs: Iterable[Request], now: float) -> list[Request]:
        return sorted(reqs, key=lambda r: self.key(r, now))

    def pick(self, reqs: Iterable[Request], now: float) -> list[Request]:
        """Fill one batch in policy order; a request's images always travel together."""
        batch, used = [], 0
        group = None
        for req in self.order(reqs, now):
            if self.lora_batching == "split":
                adapters = tuple((c.name, c.scale) for c in req.params.lora)
                group = adapters if group is None else group
                if adapters != group:
                    continue
            if used + req.samples <= self.max_batch_size:
                batch.append(req)
                used += req.samples
        return batch
