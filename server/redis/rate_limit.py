"""The per-key token bucket in Redis (one atomic Lua script), so a key's rate limit
holds across API replicas."""

from __future__ import annotations

import time

from .connect import as_backend_errors, client

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


class RedisBuckets:
    def __init__(self, url: str, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.client = client(url)
        self.script = self.client.register_script(_LUA)

    @as_backend_errors
    def take(self, key: str) -> float:
        """0 if allowed, else seconds to wait."""
        allowed, wait_ms = self.script(keys=[f"stepserve:ratelimit:{key}"],
                                       args=[self.rate, self.burst, time.time()])
        return 0.0 if int(allowed) else int(wait_ms) / 1000
