"""Slow and hostile connections: uvicorn's h11 protocol with a header read timeout and a
connection cap.

uvicorn times out idle keep-alive connections, but not a connection that sends half a
request line and then trickles (or sends nothing at all): each such connection is held
for ever, and a thousand of them hold a thousand sockets. Here a connection whose
request headers are not complete `header_timeout_s` after its first byte (or after it
opened) is closed, and connections beyond `max_connections` are closed as they open.
Body reads are bounded separately (server/limits.py).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("stepserve.connections")


class GuardedH11Protocol(H11Protocol):
    header_timeout_s: float = 10.0
    max_connections: int = 1024
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            log.warning("connection refused: %d open (max_connections)",
                        len(self.connections) - 1)
            transport.close()
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:  # still reading a request's headers
            self._arm()
        else:
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._timed_out)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._disarm()  # a kept-alive connection: uvicorn's keep-alive timeout takes over

    def _timed_out(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            log.info("closing a connection whose request headers did not arrive in %g s",
                     self.header_timeout_s)
            self.transport.close()


def guarded_protocol(header_timeout_s: float, max_connections: int) -> type[Any]:
    """The protocol class with these limits, for uvicorn.Config(http=...)."""
    return type("StepserveH11Protocol", (GuardedH11Protocol,),
                {"header_timeout_s": header_timeout_s, "max_connections": max_connections})
