"""Data parallel: several engine loops (one engine per device, e.g. --device
cuda:0,cuda:1) behind the interface of one; each new request goes to the loop with
the least work in flight, and stays there (its sampler state lives on that device)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from .backend import Handle, Progress, QueueFull
from .core import SchedulerCore
from .loop import EngineLoop
from .request import GenerationParams


class LoopGroup:
    """A JobBackend over several EngineLoops."""

    shared = False

    def __init__(self, loops: Sequence[EngineLoop]) -> None:
        if not loops:
            raise ValueError("a loop group needs at least one loop")
        self.loops = list(loops)

    @property
    def core(self) -> SchedulerCore:  # the first device's core (settings are shared)
        return self.loops[0].core

    @property
    def inflight(self) -> int:
        return sum(loop.inflight for loop in self.loops)

    @property
    def running(self) -> int:
        return sum(loop.running for loop in self.loops)

    @property
    def waiting(self) -> int:
        return sum(loop.waiting for loop in self.loops)

    def start(self) -> None:
        for loop in self.loops:
            loop.start()

    def submit(self, params: GenerationParams) -> Handle:
        """The least loaded loop takes it (its QueueFull only when all are full)."""
        ranked = sorted(self.loops, key=lambda loop: loop.inflight)
        for loop in ranked[:-1]:
            try:
                return loop.submit(params)
            except QueueFull:  # this device is full: try the next
                continue
        return ranked[-1].submit(params)

    def _owner(self, request_id: str) -> EngineLoop | None:
        return next((loop for loop in self.loops if loop.owns(request_id)), None)

    def cancel(self, request_id: str) -> None:
        owner = self._owner(request_id)
        if owner is not None:
            owner.cancel(request_id)

    def progress(self, request_id: str) -> Progress:
        owner = self._owner(request_id)
        return owner.progress(request_id) if owner else Progress("queued")

    def remember_job(self, request_id: str, spec: dict, usage: dict,
                     owner: str | None, done: tuple[Any, int] | None = None) -> None:
        """Jobs live in this process's memory."""

    def close_intake(self) -> None:
        for loop in self.loops:
            loop.close_intake()

    def abort_all(self, message: str) -> None:
        for loop in self.loops:
            loop.abort_all(message)

    async def drain(self, timeout: float | None = None) -> bool:
        done = await asyncio.gather(*(loop.drain(timeout) for loop in self.loops))
        return all(done)
