"""Optional API keys (Authorization: Bearer ...) with a per-key token-bucket rate limit,
throttled failures per client address, and the key's id as the owner of what it creates.

The bucket lives in memory in the all-in-one server and in Redis (one atomic Lua
script) when API replicas share Redis, so a key's limit holds across replicas.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Protocol

from .errors import backend_down, error_response, response_of
from .scheduler.backend import BackendUnavailable
from .settings import Settings


class Buckets(Protocol):
    def take(self, key: str) -> float: ...


class MemoryBuckets:
    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self._state: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """0 if allowed, else seconds to wait."""
        now = time.monotonic()
        with self._lock:
            tokens, ts = self._state.get(key, (float(self.burst), now))
            tokens = min(self.burst, tokens + (now - ts) * self.rate)
            if tokens >= 1:
                self._state[key] = (tokens - 1, now)
                return 0.0
            self._state[key] = (tokens, now)
            return (1 - tokens) / self.rate


def load_keys(settings: Settings) -> list[str]:
    keys = list(settings.api_keys)
    if settings.api_keys_file:
        keys += [line.strip() for line in Path(settings.api_keys_file).read_text().splitlines()
                 if line.strip() and not line.startswith("#")]
    return keys


class FailureThrottle:
    """Failed key attempts per client address (a token bucket each, LRU-bounded), so keys
    cannot be guessed at request rate."""

    def __init__(self, per_min: float, max_addresses: int = 10000) -> None:
        self.rate, self.burst = per_min / 60.0, max(1.0, per_min)
        self.max_addresses = max_addresses
        self._state: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def _tokens(self, addr: str, now: float) -> float:
        tokens, ts = self._state.get(addr, (self.burst, now))
        return min(self.burst, tokens + (now - ts) * self.rate)

    def wait(self, addr: str) -> float:
        """Seconds until this address may try again (0: now)."""
        with self._lock:
            tokens = self._tokens(addr, time.monotonic())
        return 0.0 if tokens >= 1 else (1 - tokens) / self.rate

    def failed(self, addr: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._state[addr] = (max(0.0, self._tokens(addr, now) - 1), now)
            self._state.move_to_end(addr)
            while len(self._state) > self.max_addresses:
                self._state.popitem(last=False)


def owner_of(request: Any) -> str | None:
    """The id of the API key that made this request (None without auth)."""
    return request.scope.get("state", {}).get("owner")  # set by AuthMiddleware


def quota_of(request: Any) -> str:
    """Whose budget a request's stored results count against: its key, or without
    auth its client address."""
    owner = owner_of(request)
    client = request.scope.get("client") or ("", 0)
    return f"key:{owner}" if owner else f"addr:{client[0]}"


def key_id(key: bytes) -> str:
    """A key's stable, non-secret name: what jobs and results record as their owner."""
    return hashlib.sha256(key).hexdigest()[:32]


INTERNAL = ("/metrics", "/docs", "/redoc", "/openapi.json")


class Auth:
    """Checks a request's key and rate; `check` returns an error response or None and
    records the key's id in the request's state (`owner`)."""

    def __init__(self, settings: Settings) -> None:
        self.keys = [k.encode() for k in load_keys(settings)]
        self.internal = settings.auth_internal
        self.failures = FailureThrottle(settings.auth_failures_per_min)
        self.buckets: MemoryBuckets | Buckets | None = None
        if settings.rate_limit_rps > 0:
            burst = settings.rate_limit_burst or max(1, math.ceil(settings.rate_limit_rps))
            if settings.redis_url:
                from .redis.rate_limit import RedisBuckets

                self.buckets = RedisBuckets(settings.redis_url, settings.rate_limit_rps, burst)
            else:
                self.buckets = MemoryBuckets(settings.rate_limit_rps, burst)

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def guards(self, path: str) -> bool:
        """Whether this path needs a key: the API, url results (their owner's key), and
        with auth_internal the metrics and the API docs."""
        return path.startswith("/v1/") or (self.internal and path.startswith(INTERNAL))

    def check(self, authorization: str | None, addr: str = "", state: dict | None = None):
        wait = self.failures.wait(addr)
        if wait > 0:
            return error_response(429, "too many failed API-key attempts from this address",
                                  None, "too_many_auth_failures",
                                  {"Retry-After": str(max(1, math.ceil(wait)))})
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:  # no key sent: nothing was guessed
            return error_response(401, "missing API key: send 'Authorization: Bearer <key>'",
                                  None, "invalid_api_key")
        given = token.strip().encode()
        if not any(hmac.compare_digest(given, k) for k in self.keys):
            self.failures.failed(addr)
            return error_response(401, "invalid API key", None, "invalid_api_key")
        owner = key_id(given)
        if state is not None:
            state["owner"] = owner
        if self.buckets is not None:
            wait = self.buckets.take(owner)
            if wait > 0:
                return error_response(429, "rate limit exceeded for this API key", None,
                                      "rate_limit_exceeded",
                                      {"Retry-After": str(max(1, math.ceil(wait)))})
        return None


class AuthMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware, which hides client disconnects from the
    endpoints): /v1/* (url results included) needs a key."""

    def __init__(self, app, auth: Auth) -> None:
        self.app, self.auth = app, auth

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and self.auth.guards(scope.get("path", "")):
            headers = dict(scope.get("headers") or [])
            value = headers.get(b"authorization")
            client = scope.get("client") or ("", 0)
            try:
                denied = self.auth.check(value.decode("latin-1") if value else None,
                                         str(client[0]), scope.setdefault("state", {}))
            except BackendUnavailable as exc:  # a shared rate limiter's store is down
                denied = response_of(backend_down(str(exc)))
            if denied is not None:
                await denied(scope, receive, send)
                return
        await self.app(scope, receive, send)
