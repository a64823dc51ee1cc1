"""Images behind `response_format=url`: kept in memory for a limited time, bounded in
bytes in all and per owner.

Each image belongs to the API key that made it (its `owner`; None without auth,
where the unguessable 128-bit key is the capability) and counts against a quota
(the key, or the client address without auth). A quota that is full drops its own
oldest images; when the whole store is full, the largest quota's oldest go first,
so a flood spread over several quotas cannot push out a small one's images before
its own.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class StoredImage:
    data: bytes
    content_type: str
    expires_at: float
    owner: str | None = None
    quota: str = ""


class Files(Protocol):
    """Where url results live: here in memory, or in Redis (server/redis/file_store.py)
    where every API replica serves them."""

    def put(self, data: bytes, content_type: str, ext: str, owner: str | None = None,
            quota: str = "") -> str: ...

    def get(self, key: str, owner: str | None = None) -> StoredImage | None: ...


class ResultStore:
    def __init__(self, ttl_s: float = 3600.0, max_bytes: int = 256 * 2**20,
                 per_quota_bytes: int = 64 * 2**20) -> None:
        self.ttl_s = ttl_s
        self.max_bytes, self.per_quota_bytes = max_bytes, per_quota_bytes
        self._items: OrderedDict[str, StoredImage] = OrderedDict()
        self._used: dict[str, int] = {}  # quota -> bytes
        self._by_quota: dict[str, OrderedDict[str, None]] = {}  # quota -> its keys, oldest 1st
        self.bytes = 0
        self._lock = threading.Lock()

    def put(self, data: bytes, content_type: str, ext: str, owner: str | None = None,
            quota: str = "") -> str:
        key = f"{secrets.token_urlsafe(16)}.{ext}"
        size = len(data)
        with self._lock:
            self._evict_expired(time.monotonic())
            mine = self._by_quota.get(quota)
            while mine and self._used.get(quota, 0) + size > self.per_quota_bytes:
                self._drop(next(iter(mine)))
            while self._items and self.bytes + size > self.max_bytes:
                largest = max(self._used, key=lambda q: self._used[q])
                self._drop(next(iter(self._by_quota[largest])))
            self._items[key] = StoredImage(data, content_type, time.monotonic() + self.ttl_s,
                                           owner, quota)
            self._used[quota] = self._used.get(quota, 0) + size
            self._by_quota.setdefault(quota, OrderedDict())[key] = None
            self.bytes += size
        return key

    def get(self, key: str, owner: str | None = None) -> StoredImage | None:
        """The image, for its owner only (None for anyone else, as for an unknown key)."""
        with self._lock:
            item = self._items.get(key)
            if item is not None and item.expires_at <= time.monotonic():
                self._drop(key)
                return None
            if item is None or item.owner != owner:
                return None
            return item

    def _drop(self, key: str) -> None:
        item = self._items.pop(key)
        self.bytes -= len(item.data)
        left = self._used.get(item.quota, 0) - len(item.data)
        keys = self._by_quota.get(item.quota, OrderedDict())
        keys.pop(key, None)
        if left > 0 and keys:
            self._used[item.quota] = left
        else:
            self._used.pop(item.quota, None)
            self._by_quota.pop(item.quota, None)

    def _evict_expired(self, now: float) -> None:
        while self._items:
            key, item = next(iter(self._items.items()))
            if item.expires_at > now:
                break
            self._drop(key)

    def __len__(self) -> int:
        return len(self._items)
