"""`stepserve worker`: takes jobs from the models' Redis Streams and runs them on its
own scheduler loops (the same step-level batching as the all-in-one server).

A job is acknowledged (XACK) only after its result is stored. Entries of a worker
that died stay pending; after the visibility timeout another worker takes them
over with XAUTOCLAIM and runs them again. Live workers keep their running jobs'
entries fresh (XCLAIM ... JUSTID) so slow jobs are not taken from them. A job's
start and end are single Lua scripts (scripts.py), so a job run twice still ends,
and is announced, exactly once. When Redis restarts, the worker keeps its running
jobs, retries storing their results, and re-creates its consumer group if the
restart lost it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from ..loras import catalog_json
from ..scheduler import load_report
from ..scheduler.backend import Handle, QueueFull
from ..scheduler.events import Completed, Failed, FinishReason, Preview
from . import keys, scripts
from .codec import failure_to_json, images_to_bytes, params_from_json
from .connect import UNAVAILABLE, aclient, until_done

log = logging.getLogger("stepserve.worker")
MAX_RUNS = 3  # a job whose worker dies this many times (it may be what kills them) fails
_CRASH = {"reason": FinishReason.ERROR.value, "code": "worker_crashed",
          "message": f"the job was started {MAX_RUNS} times and its worker died each time; "
                     "it is not retried again"}
_CRASHED, _CRASHED_EVENT = json.dumps(_CRASH), json.dumps({"type": "failed", **_CRASH})


@dataclass
class Active:
    model: str
    entry: str
    handle: Handle
    task: asyncio.Task | None = None


class RedisWorker:
    def __init__(self, url: str, models: dict, visibility_s: float = 30.0,
                 result_ttl_s: float = 3600.0, consumer: str | None = None) -> None:
        self.url, self.models = url, models  # name -> Served (with a local EngineLoop)
        self.visibility_ms = int(visibility_s * 1000)
        self.result_ttl_s = int(result_ttl_s)
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.active: dict[str, Active] = {}
        self.r: aioredis.Redis | None = None

    async def run(self, stop: asyncio.Event, drain_timeout_s: float = 120.0) -> None:
        self.r = aclient(self.url)
        self.start_script = self.r.register_script(scripts.START)
        self.finish_script = self.r.register_script(scripts.FINISH)
        self.requeue_script = self.r.register_script(scripts.REQUEUE)
        await until_done(self._announce, "announcing models")
        done = asyncio.Event()  # set once running jobs have finished after a stop
        intake = [asyncio.create_task(self._forever(self._consume, name, stop))
                  for name in self.models]
        intake.append(asyncio.create_task(self._forever(self._reclaim, stop)))
        service = [asyncio.create_task(self._forever(f, done))
                   for f in (self._heartbeat, self._cancels, self._progress)]
        await stop.wait()  # SIGTERM: take no new jobs, finish the running ones
        for t in intake:
            t.cancel()
        deadline = time.monotonic() + drain_timeout_s
        while self.active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        done.set()
        await asyncio.gather(*intake, *service, return_exceptions=True)
        await self.r.aclose()

    async def _announce(self) -> None:
        """Create the consumer groups and publish the models (again after a Redis restart
        that lost them: an API replica started later reads them from here)."""
        for name, served in self.models.items():
            try:
                await self.r.xgroup_create(keys.queue(name), keys.GROUP, id="0", mkstream=True)
            except aioredis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
            meta = {"info": _info_dict(served.info), "caps": served.caps.to_json(),
                    "loras": catalog_json(served.loras)
                    if served.loras is not None else None}
            await self.r.hset(keys.MODELS, name, json.dumps(meta))

    async def reload_loras(self) -> None:
        """Rescan the adapter folders, then publish each model's adapters again."""
        from ..loras import reload_all

        await asyncio.to_thread(reload_all, self)
        await self._announce()

    async def _forever(self, fn, *args) -> None:
        """Run a service loop; a Redis hiccup (restart, network) is retried, not fatal."""
        stop = args[-1]
        while not stop.is_set():
            try:
                await fn(*args)
            except asyncio.CancelledError:
                raise
            except UNAVAILABLE as exc:
                log.warning("%s: Redis unavailable (%s); retrying in 1 s", fn.__name__, exc)
                await asyncio.sleep(1.0)
            except aioredis.ResponseError as exc:
                if "NOGROUP" in str(exc):  # Redis came back empty: set up again
                    log.warning("consumer group missing (Redis restarted?); re-creating")
                    with contextlib.suppress(Exception):  # if not now, on the next turn
                        await self._announce()
                    await asyncio.sleep(0.2)
                    continue
                log.exception("%s failed; retrying in 1 s", fn.__name__)
                await asyncio.sleep(1.0)
            except Exception:
                log.exception("%s failed; retrying in 1 s", fn.__name__)
                await asyncio.sleep(1.0)

    # -- intake -------------------------------------------------------------------------
    async def _consume(self, name: str, stop: asyncio.Event) -> None:
        while not stop.is_set():
            free = self._free(name)
            if free <= 0:
                await asyncio.sleep(0.05)
                continue
            got = await self.r.xreadgroup(keys.GROUP, self.consumer,
                                          {keys.queue(name): ">"}, count=min(free, 16),
                                          block=500)
            for _, entries in got or []:
                for entry, fields in entries:
                    await self._start(name, entry.decode(), fields)

    def _free(self, name: str) -> int:
        """How many more jobs this worker's loop for `name` accepts now."""
        served = self.models[name]
        return served.settings.max_queue - served.loop.inflight

    async def _start(self, name: str, entry: str, fields: dict) -> None:
        job_id = fields[b"id"].decode()
        if job_id in self.active:  # our own running job, reclaimed back to us: keep going
            return
        verdict = (await self.start_script(
            keys=[keys.job(job_id), keys.queue(name), keys.events(job_id)],
            args=[keys.GROUP, entry, self.consumer, MAX_RUNS, time.time(), _CRASHED,
                  _CRASHED_EVENT, self.result_ttl_s])).decode()
        if verdict in ("ended", "crashed"):  # re-delivered after its end, or given up
            if verdict == "crashed":
                log.error("job %s failed: its workers died %d times", job_id, MAX_RUNS)
            return
        if verdict == "cancelled":
            await self._finish(name, entry, job_id, "cancelled", {"type": "cancelled"})
            return
        params = params_from_json(fields[b"params"].decode())
        try:
            handle = self.models[name].loop.submit(params)
        except QueueFull:  # full after all: leave the entry pending for a later reclaim
            await self.requeue_script(keys=[keys.job(job_id)], args=[self.consumer])
            return
        except Exception as exc:  # e.g. invalid for this model: fail the job, never drop it
            failed = Failed(job_id, FinishReason.INVALID, str(exc))
            await self._finish(name, entry, job_id, "failed",
                               {"type": "failed", **failure_to_json(failed)})
            return
        act = Active(name, entry, handle)
        self.active[job_id] = act
        act.task = asyncio.create_task(self._follow(job_id, act))

    async def _follow(self, job_id: str, act: Active) -> None:
        try:
            while True:
                event = await act.handle.events.get()
                if isinstance(event, Preview):
                    message = json.dumps({"type": "preview", "index": event.index,
                                          "step": event.step,
                                          "images": _b64(images_to_bytes(event.images))})
                    # best effort: one retry (a pooled connection may predate a Redis
                    # restart), then the preview is skipped rather than the job held up
                    for _ in range(2):
                        try:
                            await self.r.publish(keys.events(job_id), message)
                            break
                        except UNAVAILABLE:
                            continue
                    continue
                if isinstance(event, Completed):
                    await self._finish(act.model, act.entry, job_id, "completed",
                                       {"type": "completed", "steps": event.steps,
                                        "cache": event.cache, "level": event.level,
                                        "quality": act.handle.params.quality},
                                       images_to_bytes(event.images))
                elif isinstance(event, Failed):
                    await self._finish(act.model, act.entry, job_id, "failed",
                                       {"type": "failed", **failure_to_json(event)})
                return
        finally:
            self.active.pop(job_id, None)

    async def _finish(self, model: str, entry: str, job_id: str, status: str,
                      event: dict, result: bytes = b"") -> bool:
        """Store the outcome, tell the API, then acknowledge, in one script; while Redis is
        down, keep trying (the entry stays pending, so nothing is lost either way)."""
        error = (json.dumps({k: event[k] for k in ("reason", "code", "message")})
                 if status == "failed" else "")
        args = [keys.GROUP, entry, status, time.time(), error, json.dumps(event),
                self.result_ttl_s, result]
        ended = await until_done(lambda: self.finish_script(
            keys=[keys.job(job_id), keys.result(job_id), keys.queue(model),
                  keys.events(job_id)], args=args), f"storing job {job_id}")
        if not ended:
            log.info("job %s had already ended elsewhere; not stored twice", job_id)
        return bool(ended)

    # -- failure handling ---------------------------------------------------------------
    async def _reclaim(self, stop: asyncio.Event) -> None:
        """Take over entries whose worker stopped refreshing them (it died)."""
        while not stop.is_set():
            for name in self.models:
                cursor = "0-0"
                while self._free(name) > 0:  # scan the whole pending list, page by page
                    result = await self.r.xautoclaim(  # [next start, claimed, (deleted)]
                        keys.queue(name), keys.GROUP, self.consumer,
                        min_idle_time=self.visibility_ms, start_id=cursor,
                        count=min(self._free(name), 16))
                    cursor, claimed = result[0], result[1]
                    for entry, fields in claimed:
                        if fields:  # deleted entries come back empty
                            log.warning("reclaimed %s from a silent worker", entry)
                            await self._start(name, entry.decode(), fields)
                    cursor = cursor.decode() if isinstance(cursor, bytes) else cursor
                    if cursor == "0-0":
                        break
            await asyncio.sleep(self.visibility_ms / 2000)

    async def _heartbeat(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self._announce()
            by_model: dict[str, list[str]] = {}
            for act in list(self.active.values()):
                by_model.setdefault(act.model, []).append(act.entry)
            for name, entries in by_model.items():
                await self.r.xclaim(keys.queue(name), keys.GROUP, self.consumer, 0, entries,
                                    justid=True)
            await asyncio.sleep(self.visibility_ms / 3000)

    async def _cancels(self, stop: asyncio.Event) -> None:
        pubsub = self.r.pubsub()
        await pubsub.subscribe(keys.CANCEL)
        try:
            while not stop.is_set():
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
                if msg is None:
                    continue
                await self._cancel_here(msg["data"].decode())
        finally:
            await pubsub.aclose()

    async def _cancel_here(self, job_id: str) -> None:
        act = self.active.pop(job_id, None)
        if act is not None:  # running here: it leaves its batch at the next step
            act.handle.cancel()
            if act.task is not None:
                act.task.cancel()
            await self._finish(act.model, act.entry, job_id, "cancelled",
                               {"type": "cancelled"})

    def _step(self, act: Active) -> int:
        return self.models[act.model].loop.progress(act.handle.id).step

    async def _progress(self, stop: asyncio.Event) -> None:
        """Publish each running job's step; also catch cancellations whose pub/sub
        message was missed (e.g. sent while Redis was restarting)."""
        while not stop.is_set():
            running = list(self.active.items())
            pipe = self.r.pipeline(transaction=False)
            for job_id, act in running:
                pipe.hset(keys.job(job_id), "step", self._step(act))
                pipe.hget(keys.job(job_id), "cancelled")
            for name, served in self.models.items():  # for the API's deadline forecasts
                pipe.hset(keys.load(name), self.consumer,
                          json.dumps(load_report.report(served.loop.core)))
                pipe.expire(keys.load(name), 60)
            replies = await pipe.execute()
            for (job_id, _), flag in zip(running, replies[1:2 * len(running):2]):
                if flag == b"1":
                    await self._cancel_here(job_id)
            await asyncio.sleep(0.25)
        for name in self.models:  # stopped: its load no longer counts
            with contextlib.suppress(Exception):
                await self.r.hdel(keys.load(name), self.consumer)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _info_dict(info) -> dict:
    import dataclasses

    d = dataclasses.asdict(info)
    d["qsched"] = None  # applied by the worker's own sampler
    return d
