"""Redis clients with timeouts, and what counts as "Redis is unavailable".

Every role talks to Redis through these: a Redis that hangs must not hang a request
handler (socket timeouts), and a restarted Redis is reconnected to on the next
command (redis-py's pool does that) without restarting stepserve.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

import redis
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..scheduler.backend import BackendUnavailable

log = logging.getLogger("stepserve.redis")
REDIS_DOWN = "the job queue (Redis) is unavailable; retry shortly"
T = TypeVar("T")
P = ParamSpec("P")

# Connection refused or reset, timeouts, and a Redis still loading its data after a
# restart (BusyLoadingError is a ConnectionError).
UNAVAILABLE: tuple[type[Exception], ...] = (RedisConnectionError, RedisTimeoutError)
# A connection idle for over 2 s is PINGed before use: one left over from before a
# Redis restart is then replaced instead of failing the request that picks it up.
_OPTIONS = {"socket_connect_timeout": 2.0, "socket_timeout": 10.0,
            "health_check_interval": 2, "retry_on_timeout": False}


def client(url: str) -> redis.Redis:
    """Blocking client: the API calls it from request handlers (short commands), so a
    Redis that hangs holds a handler for at most 2 s."""
    return redis.Redis.from_url(url, **{**_OPTIONS, "socket_timeout": 2.0})


def aclient(url: str) -> aioredis.Redis:
    return aioredis.from_url(url, **_OPTIONS)


async def until_done(fn: Callable[[], Awaitable[T]], what: str, patience_s: float = 600.0,
                     pause_s: float = 0.5) -> T:
    """Retry `fn` while Redis is unavailable (a restart, a failover), up to `patience_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience_s
    while True:
        try:
            return await fn()
        except UNAVAILABLE as exc:
            if loop.time() > deadline:
                raise
            log.warning("%s: Redis unavailable (%s); retrying", what, exc)
            await asyncio.sleep(pause_s)


def as_backend_errors(fn: Callable[P, T]) -> Callable[P, T]:
    """Redis being unreachable, raised as the backend-neutral BackendUnavailable (the API
    answers 503 + Retry-After without knowing about Redis)."""

    @functools.wraps(fn)
    def wrapped(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return fn(*args, **kwargs)
        except UNAVAILABLE as exc:
            log.warning("Redis unavailable: %s", exc)  # its address stays in the log
            raise BackendUnavailable(REDIS_DOWN) from exc

    return wrapped
