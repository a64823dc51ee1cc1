"""The job backend the API edge submits to: one protocol for the in-process loop
(`EngineLoop`), a group of them over devices (`LoopGroup`) and the Redis-backed
client of the scaled-out API role (`server/redis/client.py: RedisLoop`).

A backend answers `submit` at once (or raises one of the errors below); the
request's previews and its final event then arrive on the returned handle's
asyncio queue, whichever backend runs it.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from .events import Event
from .request import GenerationParams


def new_request_id(kind: str = "img") -> str:
    """An unguessable id (128 random bits): it is the capability to read a job's
    result where no API key separates users."""
    return f"{kind}-{secrets.token_hex(16)}"


class QueueFull(Exception):
    """The bounded queue (or the caller's share of it) is full; `retry_after` says when
    to retry, from the measured drain rate (None: not measured yet)."""

    def __init__(self, message: str, retry_after: float | None = None,
                 deadline: bool = False) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.deadline = deadline  # refused because it would finish past its deadline


class DeadlineUnreachable(Exception):
    """The request cannot finish within its timeout even if it ran in every forward
    from now: refused at once rather than admitted to miss it."""


class ShuttingDown(Exception):
    """Intake is closed: the server is draining."""


class BackendUnavailable(Exception):
    """The backend cannot take jobs right now (e.g. its queue store is unreachable; the
    client may retry shortly)."""


@dataclass(frozen=True)
class Progress:
    """Where a live request is: queued (position 0 = next) or running (steps done)."""

    phase: Literal["queued", "running", "completed", "failed", "cancelled"]
    step: int = 0
    position: int | None = None


@dataclass(eq=False)
class Handle:
    """The API's view of one submitted request: its id and the queue its events arrive
    on. `backend` is None for a request answered without running (e.g. from a cache)."""

    id: str
    params: GenerationParams
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    submitted_at: float = field(default_factory=time.monotonic)
    backend: JobBackend | None = field(default=None, repr=False)

    def cancel(self) -> None:
        """The client went away: leave the batch at the next step (no-op when cached)."""
        if self.backend is not None:
            self.backend.cancel(self.id)


class JobBackend(Protocol):
    """What runs submitted requests (see the module docstring)."""

    @property
    def inflight(self) -> int:
        """Requests submitted here and not yet ended."""

    @property
    def running(self) -> int:
        """Requests in the batch now (0 where another process runs them)."""

    @property
    def waiting(self) -> int:
        """Requests accepted and not yet running."""

    @property
    def shared(self) -> bool:
        """True when other API replicas see this backend's jobs (they live outside this
        process): job lookups must then ask the backend, not only local memory."""

    def start(self) -> None:
        """Begin running (threads, connections); called once the model is loaded."""

    def submit(self, params: GenerationParams) -> Handle:
        """Accept a request or raise QueueFull / ShuttingDown / BackendUnavailable /
        ValueError (the request cannot run here) at once; must run inside the event loop
        that will read the handle's events."""

    def cancel(self, request_id: str) -> None:
        """Queued: removed; running: it leaves its batch at the next step."""

    def progress(self, request_id: str) -> Progress:
        """A live request's phase, steps done and queue position."""

    def remember_job(self, request_id: str, spec: dict, usage: dict,
                     owner: str | None, done: tuple[Any, int] | None = None) -> None:
        """Keep what other API replicas need to answer for this async job (its output
        spec, usage and owner; for a job answered from the result cache, `done` = its
        cache key and steps); a no-op where jobs live in one process."""

    def close_intake(self) -> None:
        """Refuse new requests from now on (ShuttingDown)."""

    def abort_all(self, message: str) -> None:
        """End every request in flight at once with Failed(UNAVAILABLE, message,
        "shutting_down"); callable from any thread."""

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait until in-flight work has ended (True) or `timeout` passed (False), then
        stop. Awaited on the event loop, so requests whose last events need it can end."""
