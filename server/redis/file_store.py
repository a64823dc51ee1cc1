"""Url results (`response_format=url`) in Redis, so every API replica serves them: the
same ownership, TTL and byte bounds as the in-memory ResultStore (server/results.py),
kept atomically by one Lua script per put. (It names keys it does not declare, so it
needs a single Redis, not Redis Cluster, like the rest of the Redis roles.)"""

from __future__ import annotations

import secrets
import time

from ..results import StoredImage
from .connect import as_backend_errors, client

PREFIX = "stepserve:files"

# KEYS: 1 the file hash, 2 all files (zset by time), 3 this quota's files (zset by
#       time), 4 sizes and quotas per file (hash), 5 bytes in all (string),
#       6 bytes per quota (zset: quota -> bytes)
# ARGV: 1 key, 2 data, 3 content type, 4 owner, 5 quota, 6 now, 7 ttl s, 8 max bytes,
#       9 per-quota bytes, 10 file hash prefix, 11 quota zset prefix. A full quota drops
#       its own oldest files; a full store drops the largest quota's oldest. Expired
#       files are dropped from the books first; empty quotas leave no trace.
PUT = """
local function drop(member)
  local size = tonumber(redis.call('HGET', KEYS[4], member) or '0')
  local quota = redis.call('HGET', KEYS[4], member .. '|q')
  redis.call('DEL', ARGV[10] .. member)
  redis.call('HDEL', KEYS[4], member, member .. '|q')
  redis.call('ZREM', KEYS[2], member)
  if quota then
    redis.call('ZREM', ARGV[11] .. quota, member)
    if tonumber(redis.call('ZINCRBY', KEYS[6], -size, quota)) <= 0 then
      redis.call('ZREM', KEYS[6], quota)
    end
  end
  redis.call('DECRBY', KEYS[5], size)
end
local now, ttl = tonumber(ARGV[6]), tonumber(ARGV[7])
for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - ttl)) do drop(m) end
local size = string.len(ARGV[2])
while tonumber(redis.call('ZSCORE', KEYS[6], ARGV[5]) or '0') + size > tonumber(ARGV[9]) do
  local oldest = redis.call('ZRANGE', KEYS[3], 0, 0)
  if #oldest == 0 then break end
  drop(oldest[1])
end
while tonumber(redis.call('GET', KEYS[5]) or '0') + size > tonumber(ARGV[8]) do
  local largest = redis.call('ZREVRANGE', KEYS[6], 0, 0)
  if #largest == 0 then break end
  local oldest = redis.call('ZRANGE', ARGV[11] .. largest[1], 0, 0)
  if #oldest == 0 then redis.call('ZREM', KEYS[6], largest[1]) else drop(oldest[1]) end
end
redis.call('HSET', KEYS[1], 'data', ARGV[2], 'type', ARGV[3], 'owner', ARGV[4])
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('ZADD', KEYS[2], now, ARGV[1])
redis.call('ZADD', KEYS[3], now, ARGV[1])
redis.call('HSET', KEYS[4], ARGV[1], size, ARGV[1] .. '|q', ARGV[5])
redis.call('ZINCRBY', KEYS[6], size, ARGV[5])
redis.call('INCRBY', KEYS[5], size)
return 1
"""


class RedisResultStore:
    def __init__(self, url: str, ttl_s: float, max_bytes: int, per_quota_bytes: int) -> None:
        self.client = client(url)
        self.ttl_s, self.max_bytes, self.per_quota_bytes = ttl_s, max_bytes, per_quota_bytes
        self.script = self.client.register_script(PUT)

    @as_backend_errors
    def put(self, data: bytes, content_type: str, ext: str, owner: str | None = None,
            quota: str = "") -> str:
        key = f"{secrets.token_urlsafe(16)}.{ext}"
        self.script(keys=[f"{PREFIX}:file:{key}", f"{PREFIX}:all", f"{PREFIX}:quota:{quota}",
                          f"{PREFIX}:sizes", f"{PREFIX}:bytes", f"{PREFIX}:quotas"],
                    args=[key, data, content_type, owner or "", quota, time.time(),
                          max(1, int(self.ttl_s)), self.max_bytes, self.per_quota_bytes,
                          f"{PREFIX}:file:", f"{PREFIX}:quota:"])
        return key

    @as_backend_errors
    def get(self, key: str, owner: str | None = None) -> StoredImage | None:
        raw = self.client.hgetall(f"{PREFIX}:file:{key}")
        if not raw or raw.get(b"owner", b"").decode() != (owner or ""):
            return None
        return StoredImage(raw[b"data"], raw[b"type"].decode(), time.monotonic() + 1,
                           owner, "")

    @property
    def bytes(self) -> int:
        return int(self.client.get(f"{PREFIX}:bytes") or 0)
