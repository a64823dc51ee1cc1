"""The core loop thread and the asyncio-facing client.

The asyncio side never touches the core: it posts commands to an inbox and
awaits per-request event queues; the loop thread owns the core, drains the
inbox between steps and posts events back with call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from .admission import Admission
from .backend import (
    Handle,
    Progress,
    QueueFull,
    ShuttingDown,
    new_request_id,
)
from .core import SchedulerCore, StepStats
from .deadlines import refuse_late
from .events import Completed, Event, Failed, FinishReason
from .request import GenerationParams, Request

log = logging.getLogger("stepserve.loop")


class EngineLoop:
    """The in-process JobBackend: one scheduler core on its own thread."""

    shared = False  # jobs live in this process only

    def __init__(self, core: SchedulerCore,
                 on_step: Callable[[StepStats], None] | None = None) -> None:
        self.core = core
        self.on_step = on_step
        self._inbox: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._handles: dict[str, tuple[Handle, asyncio.AbstractEventLoop]] = {}
        self._lock = threading.Lock()  # guards _handles, admission and the in-flight count
        config = core.config
        self.admission = Admission(config.queue_cost, config.queue_share)
        self._accepting = True
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="stepserve-core", daemon=True)

    # -- asyncio side ---------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def inflight(self) -> int:
        with self._lock:
            return len(self._handles)

    def owns(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._handles

    @property
    def running(self) -> int:
        return len(self.core.running)

    @property
    def waiting(self) -> int:
        return max(0, self.inflight - self.running)

    def submit(self, params: GenerationParams) -> Handle:
        """Admit a request or raise QueueFull / ShuttingDown / ValueError at once."""
        if not self._accepting:
            raise ShuttingDown("server is shutting down")
        if params.n > self.core.config.max_batch_size:
            raise ValueError(f"n={params.n} exceeds the server's max batch size "
                             f"{self.core.config.max_batch_size}")
        req = Request(new_request_id(), params, self.core.clock())
        self.core.plan(req, req.arrival)  # quality: auto picks its plan here, once
        req.predicted_s = self._check_deadline(req.params) or req.predicted_s
        handle = Handle(req.id, req.params, backend=self)
        with self._lock:
            if len(self._handles) >= self.core.config.max_queue:
                raise QueueFull(f"queue is full ({self.core.config.max_queue} requests)",
                                self.admission.full_retry_after(len(self._handles)))
            self.admission.admit(handle.id, req.params)
            self._handles[handle.id] = (handle, asyncio.get_running_loop())
        self._inbox.put(("submit", req))
        self._wake.set()
        return handle

    def _check_deadline(self, params: GenerationParams) -> float | None:
        """Refuse now what cannot finish in time (deadlines.refuse_late); the forecast
        seconds to finish, when there is one."""
        if params.timeout_s is None or not self.core.config.deadlines:
            return None
        return refuse_late(self.core.forecast(params, self.core.clock()), params.timeout_s)

    def progress(self, request_id: str) -> Progress:
        """Read without stopping the core: "queued" (position 0 = next to be admitted)
        or "running" with its completed steps."""
        core = self.core
        waiting = core.policy.order(list(core.waiting), core.clock())
        for pos, req in enumerate(waiting):
            if req.id == request_id:
                return Progress("queued", 0, pos)
        for req in list(core.running):
            if req.id == request_id:
                return Progress("running", req.step)
        # still in the inbox: it will queue behind everything waiting now
        return Progress("queued", 0, len(waiting))

    def cancel(self, request_id: str) -> None:
        """The client went away: the request leaves the batch at the next step."""
        with self._lock:
            known = self._handles.pop(request_id, None) is not None
            self.admission.release(request_id)
        if known:
            self._inbox.put(("cancel", request_id))
            self._wake.set()

    def close_intake(self) -> None:
        self._accepting = False

    def abort_all(self, message: str) -> None:
        with self._lock:
            ids = list(self._handles)
        self._deliver([Failed(i, FinishReason.UNAVAILABLE, message, "shutting_down")
                       for i in ids])
        for i in ids:
            self._inbox.put(("cancel", i))
        self._wake.set()

    def remember_job(self, request_id: str, spec: dict, usage: dict,
                     owner: str | None, done: tuple[Any, int] | None = None) -> None:
        """Jobs of an in-process loop are answered from this process's memory."""

    async def drain(self, timeout: float | None = None) -> bool:
        """Stop intake, wait until in-flight work finishes, stop the thread."""
        self.close_intake()
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.inflight and (deadline is None or time.monotonic() < deadline):
            await asyncio.sleep(0.05)
        await asyncio.to_thread(self.stop)
        return self.inflight == 0

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)

    # -- loop thread ----------------------------------------------------------------------
    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "submit":
                assert isinstance(item, Request)
                try:
                    self.core.submit(item)
                except QueueFull as exc:
                    self._deliver([Failed(item.id, FinishReason.REJECTED, str(exc))])
                except ValueError as exc:
                    self._deliver([Failed(item.id, FinishReason.INVALID, str(exc))])
            else:
                self.core.cancel(str(item))

    def _deliver(self, events: list[Event]) -> None:
        for event in events:
            with self._lock:
                entry = self._handles.get(event.request_id)
                if entry is not None and isinstance(event, Completed | Failed):
                    del self._handles[event.request_id]
                    self.admission.release(event.request_id)
            if entry is not None:
                handle, loop = entry
                try:
                    loop.call_soon_threadsafe(handle.events.put_nowait, event)
                except RuntimeError:  # the event loop is closed (shutdown)
                    pass

    def _run(self) -> None:
        while not self._stop:
            self._drain_inbox()
            if not self.core.has_work:
                self.admission.rate.idle()
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                events = self.core.step()
            except Exception:  # the core itself must never die
                log.exception("scheduler step failed")
                continue
            stats = self.core.last_stats
            self.admission.rate.observe(stats.batch_samples + sum(stats.skipped.values()))
            if self.on_step is not None:  # metrics first: a finished client may scrape
                try:
                    self.on_step(self.core.last_stats)
                except Exception:
                    log.exception("step observer failed")
            self._deliver(events)
