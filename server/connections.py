"""Slow and hostile connections: uvicorn's h11 protocol with a header read timeout and a
connection cap.

uvicorn times out idle keep-alive connections, but not a connection that sends half a
request line and then trickles (or sends nothing at all): each such connection is held
for ever, and a thousand of them hold a thousand sockets. Here a connection whose
request headers are not complete `header_timeout_s` after it opened (or after its
previous response), or whose body is not complete `body_timeout_s` after its headers
(also when the app answered early, e.g. 413, and the client keeps trickling), is
closed; connections beyond `max_connections` are closed as they open. The app also
answers a stalled body with 408 (server/limits.py).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("stepserve.connections")
BODY_GRACE_S = 2.0


class GuardedH11Protocol(H11Protocol):
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 1024
    _timer: asyncio.TimerHandle | None = None
    _phase: Any = None  # the h11 state the timer is for (IDLE: headers, SEND_BODY: body)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            log.warning("connection refused: %d open (max_connections)",
                        len(self.connections) - 1)
            transport.close()
            return
        self._watch(h11.IDLE)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch(self.conn.their_state)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _watch(self, state: Any) -> None:
        """A deadline for the part of the request being read (absolute, not per byte:
        a byte at a time must not keep it open)."""
        if state is self._phase and self._timer is not None:
            return
        self._disarm()
        if state is h11.IDLE or state is h11.SEND_BODY:
            # the body's: a backstop just after the app's own 408 (server/limits.py)
            seconds = (self.header_timeout_s if state is h11.IDLE
                       else self.body_timeout_s + BODY_GRACE_S)
            self._phase = state
            self._timer = self.loop.call_later(seconds, self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._phase = None, None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is not h11.SEND_BODY:
            self._disarm()  # kept alive: uvicorn's keep-alive timeout takes over

    def _timed_out(self) -> None:
        phase, self._timer = self._phase, None
        if self.conn.their_state is phase and not self.transport.is_closing():
            log.info("closing a connection whose request %s did not arrive in time",
                     "headers" if phase is h11.IDLE else "body")
            self.transport.close()


def guarded_protocol(header_timeout_s: float, body_timeout_s: float,
                     max_connections: int) -> type[Any]:
    """The protocol class with these limits, for uvicorn.Config(http=...)."""
    return type("StepserveH11Protocol", (GuardedH11Protocol,),
                {"header_timeout_s": header_timeout_s, "body_timeout_s": body_timeout_s,
                 "max_connections": max_connections})
