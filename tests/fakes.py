"""Fake engines: the scheduler's and the API's tests need no model."""

from __future__ import annotations

import threading

import numpy as np
import torch

from stepserve.engines.base import EngineInfo
from stepserve.engines.flow_sampling import FlowSampling
from stepserve.models.builtin.text import TextBatch

BOOM = "boom"  # a prompt containing this makes the forward raise


class FakeEngine(FlowSampling):
    def __init__(self, shape: tuple[int, int, int] = (3, 4, 4)) -> None:
        self.info = EngineInfo(engine="fake", model="fake", precision="fp32", device="cpu",
                               image_shape=shape, time_shift=1.0,
                               default_guidance=1.0)
        self.batches: list[int] = []  # rows per forward
        self.encoded: list[list[str]] = []

    def encode(self, prompts: list[str]) -> TextBatch:
        self.encoded.append(list(prompts))
        flag = torch.tensor([[1.0 if BOOM in p else 0.0] for p in prompts])
        return TextBatch(torch.zeros(len(prompts), 1, 384), torch.ones(len(prompts), 1,
                                                                        dtype=torch.bool),
                         torch.cat([flag, torch.zeros(len(prompts), 383)], 1))

    def denoise(self, x, t, d, text: TextBatch) -> torch.Tensor:
        self.batches.append(x.shape[0])
        if bool((text.pooled[:, 0] > 0).any()):
            raise RuntimeError("engine exploded")
        return x * 0.5  # deterministic, depends on x only

    def decode(self, x: torch.Tensor) -> np.ndarray:
        return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()

    def warmup(self, batch_sizes=(1,)) -> None:
        pass


class GatedEngine(FakeEngine):
    """A FakeEngine whose every forward waits at a gate the test controls.

    `open()` lets every forward through until `close()`; while closed, `allow(n)` lets
    exactly n more forwards through. A forward that waits longer than `timeout` seconds
    runs anyway (so a broken test cannot hang the server thread forever) and is counted
    in `timed_out`.
    """

    def __init__(self, shape: tuple[int, int, int] = (3, 8, 8), timeout: float = 10.0) -> None:
        super().__init__(shape)
        self.timeout = timeout
        self.timed_out = 0
        self._cond = threading.Condition()
        self._open = False
        self._permits = 0

    def open(self) -> None:
        with self._cond:
            self._open = True
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._open = False

    def allow(self, n: int = 1) -> None:
        with self._cond:
            self._permits += n
            self._cond.notify_all()

    def denoise(self, x, t, d, text: TextBatch) -> torch.Tensor:
        with self._cond:
            passed = self._cond.wait_for(lambda: self._open or self._permits > 0,
                                         timeout=self.timeout)
            if not passed:
                self.timed_out += 1
            elif not self._open:
                self._permits -= 1
        return super().denoise(x, t, d, text)


class Clock:
    """A fake clock for the scheduler core: time moves only when a test moves it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class TimedEngine(FakeEngine):
    """Each forward takes 0.1 s + 0.01 s per row of a fake clock's time."""

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.clock = clock

    def denoise(self, x, t, d, text: TextBatch) -> torch.Tensor:
        self.clock.now += 0.1 + 0.01 * x.shape[0]
        return super().denoise(x, t, d, text)


def drain(core, limit: int = 100) -> list:
    """Step the core until it has no work (at most `limit` steps); all its events."""
    events: list = []
    for _ in range(limit):
        if not core.has_work:
            break
        events += core.step()
    return events


def drain_with_stats(core) -> tuple[list, list]:
    """Step the core until it has no work: its events and each step's stats."""
    events: list = []
    stats: list = []
    while core.has_work:
        events += core.step()
        stats.append(core.last_stats)
    return events, stats


def finish(core) -> dict[str, np.ndarray]:
    """Step the core to the end: each completed request's first image by id."""
    from stepserve.server.scheduler.events import Completed

    return {e.request_id: e.images[0] for e in drain(core, 10**6)
            if isinstance(e, Completed)}
