"""Request bodies: a size limit enforced before the body is buffered (a declared
Content-Length over the limit is refused at once with 413, a body that streams past
it is cut off as soon as it does), and a read timeout (a body that stops arriving,
e.g. a Content-Length larger than what is sent, gets 408 instead of holding the
connection)."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.exceptions import HTTPException

from .errors import error_response


class BodyTimeout(HTTPException):
    def __init__(self, seconds: float) -> None:
        super().__init__(408, f"the request body did not arrive within {seconds:g} s "
                              "(setting body_timeout_s)")


async def body_timeout_handler(_: Any, exc: Exception) -> Any:
    assert isinstance(exc, BodyTimeout)
    return error_response(408, str(exc.detail), None, "request_timeout", CLOSE)


class BodyTooLarge(HTTPException):
    """Raised from `receive` (an HTTPException so FastAPI's body parsing passes it on
    instead of turning it into a 400)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than {limit / 2**20:g} MB "
                              "(setting max_body_mb)")
        self.limit = limit


async def body_too_large_handler(_: Any, exc: Exception) -> Any:
    assert isinstance(exc, BodyTooLarge)
    return too_large(exc.limit)


CLOSE = {"Connection": "close"}  # the rest of the body is not read: drop the connection


def too_large(limit: int) -> Any:
    return error_response(413, f"request body is larger than {limit / 2**20:g} MB "
                          "(setting max_body_mb)", None, "request_too_large", CLOSE)


class BodyLimitMiddleware:
    """Pure ASGI, outermost: nothing below it ever holds more than `max_bytes` of body."""

    def __init__(self, app: Any, max_bytes: int, timeout_s: float = 30.0) -> None:
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = self.max_bytes + 1
            if declared > self.max_bytes:
                await too_large(self.max_bytes)(scope, receive, send)
                return
        seen = 0
        started = False
        body_done = False
        deadline: float | None = None

        async def limited_receive() -> Any:
            nonlocal seen, body_done, deadline
            if body_done:  # later reads wait for a disconnect: that may take long
                return await receive()
            now = asyncio.get_running_loop().time()
            deadline = deadline or now + self.timeout_s  # for the whole body, not per chunk
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - now))
            except asyncio.TimeoutError:
                raise BodyTimeout(self.timeout_s) from None
            if message["type"] == "http.request":
                body_done = not message.get("more_body", False)
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await too_large(self.max_bytes)(scope, receive, send)
