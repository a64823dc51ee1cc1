"""What the app holds at run time: engine, core loop, result store, metrics, readiness.

Loading and warm-up run in a background thread so /health answers at once and
/ready turns 200 only when the model is warm.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from stepserve.engines.base import Engine, EngineInfo
from stepserve.engines.capabilities import Capabilities
from stepserve.engines.registry import create_engine
from stepserve.models.caches.config import CacheConfig
from stepserve.models.lora.library import LoraLibrary

from .job_store import JobStore
from .loras import LocalLoras, LoraCatalog
from .metrics import Metrics
from .result_cache import ResultCache, Results
from .results import Files, ResultStore
from .scheduler.backend import JobBackend
from .scheduler.core import SchedulerConfig, SchedulerCore, StepStats
from .scheduler.loop import EngineLoop
from .scheduler.loop_group import LoopGroup
from .scheduler.request import Status
from .settings import Settings

log = logging.getLogger("stepserve")

EngineBuilder = Callable[[Settings], Engine]


def build_engine(settings: Settings, **extra: Any) -> Engine:
    """The engine the settings name; `extra` goes to the built-in model's engines (e.g.
    `weights`, `encoder`)."""
    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)
    if settings.model != "builtin":
        if extra:
            raise ValueError(f"{sorted(extra)} apply to the built-in model only")
        return diffusers_engine(settings)
    return create_engine(settings.engine, **engine_kwargs(settings), **extra)


def diffusers_engine(settings: Settings) -> Engine:
    """A local diffusers folder named by --model (config only, never by a request)."""
    from pathlib import Path

    from stepserve.engines.diffusers_engine import DiffusersEngine

    folder = Path(settings.model)
    if not (folder / "model_index.json").is_file():
        raise ValueError(f"--model {settings.model}: not 'builtin' and not a diffusers folder "
                         "(no model_index.json)")
    if settings.engine != "torch":
        raise ValueError("diffusers folders run on --engine torch for now")
    return DiffusersEngine(settings.model_name, folder, precision=settings.precision,
                           device=settings.device, image_size=settings.image_size)


def engine_kwargs(settings: Settings) -> dict:
    """The settings each engine takes (engines reject options that are not theirs)."""
    kwargs = {"model": settings.model_name, "precision": settings.precision,
              "device": settings.device, "text_cache_size": settings.text_cache_size,
              "text_cache_mb": settings.text_cache_mb}
    if settings.engine == "torch":
        kwargs["compile"] = settings.compile
    if settings.engine in ("onnxruntime", "tensorrt"):
        kwargs.update(quantization=settings.quantization, build_dir=settings.build_dir)
    if settings.engine == "tensorrt":
        # a guided request adds an unconditional row: a forward holds up to 2x the images
        kwargs["max_batch_size"] = 2 * settings.max_batch_size
    if settings.engine == "onnxruntime":
        kwargs.update(providers=settings.ort_providers, threads=settings.threads,
                      opt_level=settings.ort_opt_level)
    return kwargs


@dataclass
class Served:
    """One served model: its settings, what it accepts, and the backend that runs it (a
    local EngineLoop or LoopGroup, or in the API role a Redis client with no engine)."""

    name: str
    settings: Settings
    info: EngineInfo
    caps: Capabilities
    loop: JobBackend
    engine: Engine | None = None
    loras: LoraCatalog | None = None  # the adapters it may apply (None: it takes none)


class Runtime:
    def __init__(self, settings: Settings, builder: EngineBuilder = build_engine) -> None:
        self.settings = settings
        self.builder = builder
        self.metrics = Metrics()
        self.store: Files = ResultStore(settings.url_ttl_s,
                                        int(settings.url_results_max_mb * 2**20),
                                        int(settings.url_results_per_key_mb * 2**20))
        self.results: Results = ResultCache(int(settings.result_cache_mb * 2**20),
                                            settings.result_cache_ttl_s)
        self.jobs = JobStore(settings.url_ttl_s, int(settings.jobs_max_mb * 2**20),
                             settings.max_jobs)
        self.models: dict[str, Served] = {}
        self.error: str | None = None
        self._ready = threading.Event()
        self._draining = False
        self._drain_started = 0.0
        self.responses = 0  # API responses being written (server/drain.py)
        self._cache_seen: dict[str, tuple[int, int]] = {}
        self._lora_library: LoraLibrary | None = None
        self._lora_seen: dict[str, int] = {}

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def backend_error(self) -> str | None:
        """Why requests cannot be queued right now though the models are loaded (the
        API role: Redis is unreachable); None when they can."""
        return None

    @property
    def default(self) -> Served | None:
        return next(iter(self.models.values()), None)

    @property
    def engine(self) -> Engine | None:
        """The default (first) model's engine."""
        return self.default.engine if self.default else None

    @property
    def loop(self) -> JobBackend | None:
        return self.default.loop if self.default else None

    def served(self, name: str | None) -> Served | None:
        """The named model (None: the default); None if it is not served here."""
        return self.default if name is None else self.models.get(name)

    def names(self) -> list[str]:
        """Served model names (configured ones until loading finishes)."""
        if self.models:
            return list(self.models)
        try:
            return [s.model_name for s in self.settings.per_model()]
        except ValueError:
            return [self.settings.model_name]

    def start(self, background: bool = True) -> None:
        if background:
            threading.Thread(target=self._load, name="stepserve-load", daemon=True).start()
        else:
            self._load()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def _load(self) -> None:
        start = time.perf_counter()
        try:
            loaded = [self._load_one(s) for s in self.settings.per_model()]
        except (ValueError, RuntimeError, FileNotFoundError) as exc:  # a user's mistake
            log.error("engine failed to load: %s", exc)
            self.error = f"{type(exc).__name__}: {exc}"
            return
        except Exception as exc:  # a bug: keep the traceback
            log.exception("engine failed to load")
            self.error = f"{type(exc).__name__}: {exc}"
            return
        for served in loaded:
            self.models[served.name] = served
            served.loop.start()
        self.metrics.watch(waiting=lambda: sum(m.loop.waiting for m in self.models.values()),
                           running=lambda: sum(m.loop.running for m in self.models.values()))
        self.metrics.warmup_s.set(time.perf_counter() - start)
        self.metrics.build_s.set(sum(m.engine.build_seconds for m in loaded if m.engine))
        self.metrics.ready.set(1)
        self._ready.set()
        log.info("%d model(s) ready in %.1f s: %s", len(loaded), time.perf_counter() - start,
                 ", ".join(self.models))

    def _load_one(self, settings: Settings) -> Served:
        """One model; with several devices (--device cuda:0,cuda:1) one engine and loop
        per device behind a LoopGroup (data parallel)."""
        devices = [d.strip() for d in settings.device.split(",") if d.strip()]
        name = settings.model_name
        config = SchedulerConfig(batching=settings.batching,
                                 max_batch_size=settings.max_batch_size,
                                 max_queue=settings.max_queue, aging_s=settings.aging_s,
                                 queue_cost=float(settings.max_queue * settings.default_steps),
                                 queue_share=settings.queue_share,
                                 lora_batching=settings.lora_batching,
                                 deadlines=settings.deadlines == "forecast",
                                 live_state_bytes=int(settings.live_state_mb * 2**20),
                                 offload={"auto": None, "on": True, "off": False}[
                                     settings.offload])
        engines, loops = [], []
        for device in devices:
            engine = self.builder(settings.model_copy(update={"device": device}))
            caps = engine.capabilities
            problem = caps.cache_error(CacheConfig.parse(settings.cache), name,
                                       engine.info.engine)
            if problem:
                raise ValueError(f"{name}: --cache {settings.cache}: {problem}")
            engine.warmup(tuple(settings.warmup_batch_sizes))
            engines.append(engine)
            loops.append(EngineLoop(SchedulerCore(engine, config),
                                    on_step=functools.partial(self._observe, model=name)))
        loop = loops[0] if len(loops) == 1 else LoopGroup(loops)
        return Served(name, settings, engines[0].info, caps, loop, engines[0],
                      self._loras_for(engines))

    def _loras_for(self, engines: list[Engine]) -> LoraCatalog | None:
        """One adapter library for every model here (one byte budget), checked against
        each model's denoiser."""
        target = engines[0].lora_target
        if self.settings.max_loras_per_request == 0 or target is None:
            return None
        if self._lora_library is None:
            s = self.settings
            self._lora_library = LoraLibrary(s.lora_dirs, int(s.lora_cache_mb * 2**20))
        for engine in engines:
            engine.loras = self._lora_library
        return LocalLoras(self._lora_library, target)

    def _observe(self, stats: StepStats, model: str = "") -> None:
        m = self.metrics
        m.observe_step(stats)
        for req in stats.finished:
            if req.deadline is not None and req.status in (Status.FINISHED, Status.TIMED_OUT):
                m.deadline_requests.labels(
                    "met" if req.status is Status.FINISHED else "missed").inc()
            if req.first_step_at is not None:
                m.queue_wait.observe(req.first_step_at - req.arrival)
            if req.first_preview_at is not None:
                m.first_preview.observe(req.first_preview_at - req.arrival)
        served = self.models.get(model)
        if served is not None and served.engine is not None:
            hits, misses = served.engine.text_cache_stats()
            seen = self._cache_seen.get(model, (0, 0))
            m.text_cache_hits.inc(max(0, hits - seen[0]))
            m.text_cache_misses.inc(max(0, misses - seen[1]))
            self._cache_seen[model] = (hits, misses)
            rows = served.engine.lora_fallback_rows
            m.lora_fallback_rows.inc(max(0, rows - self._lora_seen.get(model, 0)))
            self._lora_seen[model] = rows

    @property
    def draining(self) -> bool:
        return self._draining

    def begin_drain(self) -> None:
        """Refuse new work from now on (readiness turns 503, submissions 503); work in
        flight, streams and async jobs included, goes on."""
        if not self._draining:
            self._drain_started = time.time()
        self._draining = True
        for served in self.models.values():
            served.loop.close_intake()

    @property
    def inflight(self) -> int:
        return sum(served.loop.inflight for served in self.models.values())

    def unfetched_jobs(self) -> int:
        """Ended async jobs whose outcome only this process holds and nobody has read
        yet (a draining server waits for them)."""
        if any(served.loop.shared for served in self.models.values()):
            return 0  # the scaled-out roles keep results in Redis for every replica
        return self.jobs.unfetched(since=self._drain_started)

    def abort_inflight(self, message: str) -> None:
        """End everything still in flight now, each with an explicit error."""
        for served in self.models.values():
            served.loop.abort_all(message)

    async def wait_idle(self, timeout: float) -> bool:
        """Until nothing is in flight (True) or `timeout` passed (False)."""
        deadline = time.monotonic() + timeout
        while self.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.inflight == 0

    async def drain(self) -> bool:
        """Stop intake everywhere, then await in-flight work (up to drain_timeout_s)."""
        self.begin_drain()
        done = await asyncio.gather(*(served.loop.drain(self.settings.drain_timeout_s)
                                      for served in self.models.values()))
        return all(done)

    def shutdown(self) -> None:
        """`drain` for callers outside an event loop (tests, the worker command)."""
        asyncio.run(self.drain())
