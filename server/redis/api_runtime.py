"""The API role's runtime: no engines; its models are the ones workers announce in
Redis, each served through a RedisLoop."""

from __future__ import annotations

import json
import logging
import time

from stepserve.engines.base import EngineInfo

from ..capabilities import Capabilities
from ..errors import BACKEND_DOWN
from ..runtime import Runtime, Served
from . import keys
from .client import RedisLoop
from .connect import UNAVAILABLE, client
from .result_cache import RedisResultCache

log = logging.getLogger("stepserve.api")


class ApiRuntime(Runtime):
    _pinged_at = float("-inf")
    _down: str | None = None

    def backend_error(self) -> str | None:
        """Redis reachable? Asked at most once a second (readiness, every request)."""
        now = time.monotonic()
        if now - self._pinged_at >= 1.0 and getattr(self, "_client", None) is not None:
            self._pinged_at = now
            try:
                self._client.ping()
                self._down = None
            except UNAVAILABLE as exc:
                self._down = f"{BACKEND_DOWN} ({exc})"
        return self._down

    def _load(self) -> None:
        url = self.settings.redis_url
        if not url:
            self.error = "the api role needs --redis-url"
            return
        if self.settings.result_cache_mb:
            self.results = RedisResultCache(url, int(self.settings.result_cache_mb * 2**20),
                                            self.settings.result_cache_ttl_s)
        self._client = client(url)
        while True:  # ready once at least one worker has announced its models
            try:
                announced = self._client.hgetall(keys.MODELS)
            except UNAVAILABLE as exc:
                log.warning("waiting for Redis: %s", exc)
                announced = {}
            if announced:
                break
            time.sleep(0.5)
        for name, raw in sorted(announced.items()):
            meta = json.loads(raw)
            info = meta["info"]
            info["image_shape"] = tuple(info["image_shape"])
            name = name.decode()
            self.models[name] = Served(
                name, self.settings, EngineInfo(**info), Capabilities.from_json(meta["caps"]),
                RedisLoop(url, name, self.settings.max_queue))
        self.metrics.watch(waiting=lambda: sum(m.loop.waiting for m in self.models.values()),
                           running=lambda: 0)
        self.metrics.ready.set(1)
        self._ready.set()
        log.info("api ready; models from workers: %s", ", ".join(self.models))
