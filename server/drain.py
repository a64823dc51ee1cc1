"""Graceful drain on SIGTERM / Ctrl-C, for plain requests, streams and async jobs.

uvicorn's own shutdown closes the listener at once and sse-starlette then cuts every
open stream, so a rolling deploy would end streams without a `completed` event and
lose queued jobs. Instead, the first signal only starts a drain: readiness turns 503
and new work is refused (the listener stays open, so streams finish and finished
jobs stay fetchable); once nothing is in flight, no API response is still being
written and every ended in-memory job has been read, the server exits. Work still
running after `drain_timeout_s` ends with an explicit error (`503 shutting_down`, an
SSE `error` event, a failed job readable for ABORT_GRACE_S more) before the exit. A
second Ctrl-C exits at once.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType
from typing import Any

import uvicorn

log = logging.getLogger("stepserve.drain")
SHUTTING_DOWN = "the server shut down before this request finished; retry it"
ABORT_GRACE_S = 5.0  # after the drain timeout: how long aborted jobs stay readable


class ActiveResponses:
    """Pure ASGI: counts API requests whose response has not been fully sent."""

    def __init__(self, app: Any, runtime: Any) -> None:
        self.app, self.runtime = app, runtime

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope.get("path", "").startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        self.runtime.responses += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.runtime.responses -= 1


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, runtime: Any, timeout_s: float) -> None:
        super().__init__(config)
        self.runtime, self.timeout_s = runtime, timeout_s
        self._draining: threading.Thread | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining is None and not self.should_exit:
            self._captured_signals.append(sig)  # uvicorn re-raises them once stopped
            self._draining = threading.Thread(target=self._drain, name="stepserve-drain",
                                              daemon=True)
            self._draining.start()
        elif sig == signal.SIGINT:  # a second Ctrl-C: now
            self.should_exit = self.force_exit = True

    def busy(self) -> bool:
        rt = self.runtime
        return bool(rt.inflight or rt.responses or rt.unfetched_jobs())

    def _drain(self) -> None:
        try:
            self._wait_for_work()
        except Exception:  # whatever happens, the server must still exit
            log.exception("drain failed; exiting now")
        finally:
            self.should_exit = True

    def _wait_for_work(self) -> None:
        rt = self.runtime
        rt.begin_drain()
        deadline = time.monotonic() + self.timeout_s
        while self.busy() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.busy():  # past drain_timeout_s: end the rest explicitly, not silently
            rt.abort_inflight(SHUTTING_DOWN)
            until = time.monotonic() + ABORT_GRACE_S  # for the errors to be read
            while (rt.responses or rt.unfetched_jobs()) and time.monotonic() < until:
                time.sleep(0.05)
        from sse_starlette.sse import AppStatus

        AppStatus.should_exit = True  # nothing is streaming any more


def keep_streams_open_on_shutdown() -> None:
    """sse-starlette would cut streams on the first signal; DrainingServer ends them."""
    from sse_starlette.sse import AppStatus

    AppStatus.disable_automatic_graceful_drain()
