"""Optional API keys (Authorization: Bearer ...) with a per-key token-bucket rate limit.

The bucket lives in memory in the all-in-one server and in Redis (one atomic Lua
script) when API replicas share Redis, so a key's limit holds across replicas.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import threading
import time
from pathlib import Path
from typing import Protocol

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


class Auth:
    """Checks a request's key and rate; `check` returns an error response or None."""

    def __init__(self, settings: Settings) -> None:
        self.keys = [k.encode() for k in load_keys(settings)]
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

    def check(self, authorization: str | None):
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return error_response(401, "missing API key: send 'Authorization: Bearer <key>'",
                                  None, "invalid_api_key")
        given = token.strip().encode()
        if not any(hmac.compare_digest(given, k) for k in self.keys):
            return error_response(401, "invalid API key", None, "invalid_api_key")
        if self.buckets is not None:
            wait = self.buckets.take(hashlib.sha256(given).hexdigest()[:32])
            if wait > 0:
                return error_response(429, "rate limit exceeded for this API key", None,
                                      "rate_limit_exceeded",
                                      {"Retry-After": str(max(1, math.ceil(wait)))})
        return None


class AuthMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware, which hides client disconnects from the
    endpoints): /v1/* needs a key; image URLs (/v1/images/files/) are capability links."""

    def __init__(self, app, auth: Auth) -> None:
        self.app, self.auth = app, auth

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "")
        if (scope["type"] == "http" and path.startswith("/v1/")
                and not path.startswith("/v1/images/files/")):
            headers = dict(scope.get("headers") or [])
            value = headers.get(b"authorization")
            try:
                denied = self.auth.check(value.decode("latin-1") if value else None)
            except BackendUnavailable as exc:  # a shared rate limiter's store is down
                denied = response_of(backend_down(str(exc)))
            if denied is not None:
                await denied(scope, receive, send)
                return
        await self.app(scope, receive, send)
