"""The exact result cache in Redis, shared by API replicas: entries expire after a TTL,
and the oldest are evicted once the total size passes the bound."""

from __future__ import annotations

import time

import numpy as np

from .codec import images_from_bytes, images_to_bytes
from .connect import UNAVAILABLE, client

PREFIX = "stepserve:rcache"


class RedisResultCache:
    def __init__(self, url: str, max_bytes: int, ttl_s: float) -> None:
        self.client = client(url)
        self.max_bytes, self.ttl_s = max_bytes, ttl_s
        self.hits = self.misses = 0

    def get(self, key: str) -> np.ndarray | None:
        try:
            blob = self.client.get(f"{PREFIX}:{key}")
        except UNAVAILABLE:  # the cache is an optimisation: Redis down reads as a miss
            blob = None
        if blob is None:
            self.misses += 1
            return None
        self.hits += 1
        return images_from_bytes(blob)

    def put(self, key: str, images: np.ndarray) -> None:
        blob = images_to_bytes(images)
        if len(blob) > self.max_bytes:
            return
        try:
            pipe = self.client.pipeline()
            pipe.set(f"{PREFIX}:{key}", blob, ex=max(1, int(self.ttl_s)))
            pipe.zadd(f"{PREFIX}:index", {key: time.time()})
            pipe.hset(f"{PREFIX}:sizes", key, len(blob))
            pipe.incrby(f"{PREFIX}:bytes", len(blob))
            pipe.execute()
            self._evict()
        except UNAVAILABLE:  # not cached this time; the caller already has its images
            pass

    def _evict(self) -> None:
        """Oldest first until under the bound (sizes are tracked per key, so entries that
        already expired are accounted for too)."""
        while int(self.client.get(f"{PREFIX}:bytes") or 0) > self.max_bytes:
            oldest = self.client.zpopmin(f"{PREFIX}:index")
            if not oldest:
                self.client.set(f"{PREFIX}:bytes", 0)
                return
            key = oldest[0][0].decode()
            size = int(self.client.hget(f"{PREFIX}:sizes", key) or 0)
            pipe = self.client.pipeline()
            pipe.delete(f"{PREFIX}:{key}")
            pipe.hdel(f"{PREFIX}:sizes", key)
            pipe.decrby(f"{PREFIX}:bytes", size)
            pipe.execute()

    def __len__(self) -> int:
        return int(self.client.zcard(f"{PREFIX}:index"))
