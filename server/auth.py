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

from .errors import BACKEND_DOWN, BACKEND_ERRORS, backend_down, error_response, response_of
from .settings import Settings

# KEYS[1]: bucket hash; ARGV: rate (tokens/s), burst, now (s). Returns {allowed, wait_ms}.
_LUA = """
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local rate, burst, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tokens = tonumber(b[1]) or burst
local ts = tonumber(b[2]) or now
tokens = math.min(burst, tokens + (now - ts) * rate)
local allowed, wait = 0, 0
if tokens >= 1 then tokens = tokens - 1; allowed = 1
else wait = math.ceil((1 - tokens) / rate * 1000) end
redis.call('HSET', KEYS[1], 'tokens', tokens, 'ts', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {allowed, wait}
"""


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


class RedisBuckets:
    def __init__(self, url: str, rate: float, burst: int) -> None:
        from .redis.connect import client

        self.rate, self.burst = rate, burst
        self.client = client(url)
        self.script = self.client.register_script(_LUA)

    def take(self, key: str) -> float:
        allowed, wait_ms = self.script(keys=[f"stepserve:ratelimit:{key}"],
                                       args=[self.rate, self.burst, time.time()])
        return 0.0 if int(allowed) else int(wait_ms) / 1000


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
        self.buckets = None
        if settings.rate_limit_rps > 0:
            burst = settings.rate_limit_burst or max(1, math.ceil(settings.rate_limit_rps))
            self.buckets = (RedisBuckets(settings.redis_url, settings.rate_limit_rps, burst)
                            if settings.redis_url else
                            MemoryBuckets(settings.rate_limit_rps, burst))

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
            except BACKEND_ERRORS as exc:  # the shared rate limiter lives in Redis
                denied = response_of(backend_down(f"{BACKEND_DOWN} ({exc})"))
            if denied is not None:
                await denied(scope, receive, send)
                return
        await self.app(scope, receive, send)
