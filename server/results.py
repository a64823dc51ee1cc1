"""Images behind `response_format=url`: kept in memory for a limited time."""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class StoredImage:
    data: bytes
    content_type: str
    expires_at: float


class ResultStore:
    def __init__(self, ttl_s: float = 3600.0, max_items: int = 10000) -> None:
        self.ttl_s = ttl_s
        self.max_items = max_items
        self._items: OrderedDict[str, StoredImage] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, data: bytes, content_type: str, ext: str) -> str:
        key = f"{secrets.token_urlsafe(16)}.{ext}"
        with self._lock:
            self._evict(time.monotonic())
            self._items[key] = StoredImage(data, content_type, time.monotonic() + self.ttl_s)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)
        return key

    def get(self, key: str) -> StoredImage | None:
        with self._lock:
            item = self._items.get(key)
            if item is None or item.expires_at <= time.monotonic():
                self._items.pop(key, None)
                return None
            return item

    def _evict(self, now: float) -> None:
        while self._items:
            key, item = next(iter(self._items.items()))
            if item.expires_at > now:
                break
            del self._items[key]

    def __len__(self) -> int:
        return len(self._items)
