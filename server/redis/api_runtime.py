"""The API role's runtime: no engines; its models are the ones workers announce in
Redis, each served through a RedisLoop."""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from typing import Any

import redis

from stepserve.engines.base import EngineInfo
from stepserve.engines.capabilities import Capabilities

from ..loras import AnnouncedLoras
from ..runtime import Runtime, Served
from . import keys
from .client import RedisLoop
from .connect import REDIS_DOWN, UNAVAILABLE, client
from .file_store import RedisResultStore
from .result_cache import RedisResultCache

log = logging.getLogger("stepserve.api")


class ApiRuntime(Runtime):
    _down: str | None = None

    def backend_error(self) -> str | None:
        """Why Redis cannot take jobs now (None: it can). Read from a watcher thread's
        last ping, so a Redis that hangs never blocks a request or /ready."""
        return self._down

    def _watch(self, url: str) -> None:
        pinger = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
        while True:
            try:
                pinger.ping()
                self._down = None
            except redis.RedisError as exc:
                if self._down is None:
                    log.warning("Redis unavailable: %s", exc)  # the address stays in the log
                self._down = REDIS_DOWN
            time.sleep(1.0)

    def _announced_loras(self, name: str) -> list[dict] | None:
        """The adapters a worker last announced for the model (POST /v1/loras/reload)."""
        raw = self._client.hget(keys.MODELS, name)
        return None if raw is None else json.loads(raw).get("loras")

    def _load(self) -> None:
        url = self.settings.redis_url
        if not url:
            self.error = "the api role needs --redis-url"
            return
        if self.settings.result_cache_mb:
            self.results = RedisResultCache(url, int(self.settings.result_cache_mb * 2**20),
                                            self.settings.result_cache_ttl_s)
        s = self.settings
        self.store = RedisResultStore(url, s.url_ttl_s, int(s.url_results_max_mb * 2**20),
                                      int(s.url_results_per_key_mb * 2**20))
        self._client = client(url)
        while True:  # ready once at least one worker has announced its models
            try:
                announced: dict[Any, Any] = self._client.hgetall(keys.MODELS)
            except UNAVAILABLE as exc:
                log.warning("waiting for Redis: %s", exc)
                announced = {}
            if announced:
                break
            time.sleep(0.5)
        for key, raw in sorted(announced.items()):
            meta = json.loads(raw)
            info = meta["info"]
            info["image_shape"] = tuple(info["image_shape"])
            name = key.decode()
            self.models[name] = Served(
                name, self.settings, EngineInfo(**info), Capabilities.from_json(meta["caps"]),
                RedisLoop(url, name, self.settings.max_queue, self.settings.url_ttl_s),
                loras=AnnouncedLoras(AnnouncedLoras.from_json(meta["loras"]).infos,
                                     functools.partial(self._announced_loras, name))
                if meta.get("loras") is not None else None)
        self.metrics.watch(waiting=lambda: sum(m.loop.waiting for m in self.models.values()),
                           running=lambda: 0)
        threading.Thread(target=self._watch, args=(url,), name="stepserve-redis-watch",
                         daemon=True).start()
        self.metrics.ready.set(1)
        self._ready.set()
        log.info("api ready; models from workers: %s", ", ".join(self.models))
