"""Exact result cache: an identical request (model, engine, prompt, seed and every
parameter) gets the stored images back without a denoiser step.

Only requests with an explicit seed are cached (a random seed never repeats).
In memory here, LRU by bytes with a TTL; the scaled-out roles use Redis.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
import time
from collections import OrderedDict
from typing import Protocol

import numpy as np

from stepserve.engines.base import EngineInfo

from .scheduler.request import GenerationParams


class Results(Protocol):
    """An exact result cache: in memory (below) or in Redis (server/redis/result_cache.py)."""

    max_bytes: int

    def get(self, key: str) -> np.ndarray | None: ...

    def put(self, key: str, images: np.ndarray) -> None: ...


def result_key(info: EngineInfo, params: GenerationParams) -> str:
    fields = dict(vars(params))  # shallow: the edit's pixels are not copied
    fields["cache"] = dataclasses.asdict(params.cache) if params.cache else None
    fields["edit"] = params.edit.digest() if params.edit else None  # not the pixels
    for name in ("priority", "timeout_s", "partial_images", "tenant"):  # not the images
        fields.pop(name)
    if params.cache is not None:  # two policies may share option names: key on the name too
        fields["cache"] = {"policy": params.cache.policy, **fields["cache"]}
    engine = {"model": info.model, "engine": info.engine, "precision": info.precision,
              "qsched": dataclasses.asdict(info.qsched) if info.qsched else None,
              "noise_scale": info.noise_scale}
    blob = json.dumps({"engine": engine, "params": fields}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class ResultCache:
    def __init__(self, max_bytes: int, ttl_s: float) -> None:
        self.max_bytes, self.ttl_s = max_bytes, ttl_s
        self._items: OrderedDict[str, tuple[np.ndarray, float]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: str) -> np.ndarray | None:
        with self._lock:
            item = self._items.get(key)
            if item is None or item[1] <= time.monotonic():
                if item is not None:
                    self._drop(key)
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: str, images: np.ndarray) -> None:
        if images.nbytes > self.max_bytes:
            return
        with self._lock:
            if key in self._items:
                self._drop(key)
            self._items[key] = (images, time.monotonic() + self.ttl_s)
            self._bytes += images.nbytes
            while self._bytes > self.max_bytes:
                self._drop(next(iter(self._items)))

    def _drop(self, key: str) -> None:
        images, _ = self._items.pop(key)
        self._bytes -= images.nbytes

    def __len__(self) -> int:
        return len(self._items)
