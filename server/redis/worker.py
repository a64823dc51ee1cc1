"""`stepserve worker`: takes jobs from the models' Redis Streams and runs them on its
own scheduler loops (the same step-level batching as the all-in-one server).

A job is acknowledged (XACK) only after its result is stored. Entries of a worker
that died stay pending; after the visibility timeout another worker takes them
over with XAUTOCLAIM and runs them again. Live workers keep their running jobs'
entries fresh (XCLAIM ... JUSTID) so slow jobs are not taken from them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import socket
import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from ..scheduler.events import Completed, Failed, Preview
from ..scheduler.loop import Handle
from . import keys
from .codec import images_to_bytes, params_from_json

log = logging.getLogger("stepserve.worker")
FINAL = ("completed", "failed", "cancelled")


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
        self.r = aioredis.from_url(self.url, decode_responses=False)
        for name, served in self.models.items():
            try:
                await self.r.xgroup_create(keys.queue(name), keys.GROUP, id="0", mkstream=True)
            except aioredis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
            meta = {"info": _info_dict(served.info), "caps": served.caps.to_json()}
            await self.r.hset(keys.MODELS, name, json.dumps(meta))
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

    async def _forever(self, fn, *args) -> None:
        """Run a service loop; a Redis hiccup (restart, network) is retried, not fatal."""
        stop = args[-1]
        while not stop.is_set():
            try:
                await fn(*args)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s failed; retrying in 1 s", fn.__name__)
                await asyncio.sleep(1.0)

    # -- intake -------------------------------------------------------------------------
    async def _consume(self, name: str, stop: asyncio.Event) -> None:
        served = self.models[name]
        while not stop.is_set():
            free = served.settings.max_queue - served.loop.inflight
            if free <= 0:
                await asyncio.sleep(0.05)
                continue
            got = await self.r.xreadgroup(keys.GROUP, self.consumer,
                                          {keys.queue(name): ">"}, count=min(free, 16),
                                          block=500)
            for _, entries in got or []:
                for entry, fields in entries:
                    await self._start(name, entry.decode(), fields)

    async def _start(self, name: str, entry: str, fields: dict) -> None:
        job_id = fields[b"id"].decode()
        meta = await self.r.hgetall(keys.job(job_id))
        if meta.get(b"status", b"").decode() in FINAL:
            await self.r.xack(keys.queue(name), keys.GROUP, entry)  # a re-delivered duplicate
            return
        if meta.get(b"cancelled") == b"1":
            await self._finish(name, entry, job_id, "cancelled", {"type": "cancelled"})
            return
        params = params_from_json(fields[b"params"].decode())
        try:
            handle = self.models[name].loop.submit(params)
        except Exception as exc:  # e.g. invalid for this model: fail the job, never drop it
            await self._finish(name, entry, job_id, "failed",
                               {"type": "failed", "status": 400, "code": "invalid_value",
                                "message": str(exc)})
            return
        await self.r.hset(keys.job(job_id), mapping={"status": "running",
                                                     "worker": self.consumer})
        act = Active(name, entry, handle)
        self.active[job_id] = act
        act.task = asyncio.create_task(self._follow(job_id, act))

    async def _follow(self, job_id: str, act: Active) -> None:
        try:
            while True:
                event = await act.handle.events.get()
                if isinstance(event, Preview):
                    await self.r.publish(keys.events(job_id), json.dumps(
                        {"type": "preview", "index": event.index, "step": event.step,
                         "images": _b64(images_to_bytes(event.images))}))
                    continue
                if isinstance(event, Completed):
                    await self.r.set(keys.result(job_id), images_to_bytes(event.images),
                                     ex=self.result_ttl_s)
                    await self._finish(act.model, act.entry, job_id, "completed",
                                       {"type": "completed", "steps": event.steps})
                elif isinstance(event, Failed):
                    await self._finish(act.model, act.entry, job_id, "failed",
                                       {"type": "failed", "status": event.status_code,
                                        "code": event.code, "message": event.message})
                return
        finally:
            self.active.pop(job_id, None)

    async def _finish(self, model: str, entry: str, job_id: str, status: str,
                      event: dict) -> None:
        """Store the outcome, tell the API, then acknowledge: never the other way round."""
        fields = {"status": status, "ended_at": time.time()}
        if status == "failed":
            fields["error"] = json.dumps({k: event[k] for k in ("status", "code", "message")})
        await self.r.hset(keys.job(job_id), mapping=fields)
        await self.r.expire(keys.job(job_id), self.result_ttl_s)
        await self.r.publish(keys.events(job_id), json.dumps(event))
        await self.r.xack(keys.queue(model), keys.GROUP, entry)

    # -- failure handling ---------------------------------------------------------------
    async def _reclaim(self, stop: asyncio.Event) -> None:
        """Take over entries whose worker stopped refreshing them (it died)."""
        while not stop.is_set():
            for name in self.models:
                result = await self.r.xautoclaim(
                    keys.queue(name), keys.GROUP, self.consumer,
                    min_idle_time=self.visibility_ms, start_id="0-0", count=16)
                for entry, fields in result[1]:  # [next start, claimed, deleted ids]
                    if fields:  # deleted entries come back empty
                        log.warning("reclaimed %s from a silent worker", entry)
                        await self._start(name, entry.decode(), fields)
            await asyncio.sleep(self.visibility_ms / 2000)

    async def _heartbeat(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
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
                job_id = msg["data"].decode()
                act = self.active.get(job_id)
                if act is not None:  # running here: leave the batch at the next step
                    act.handle.cancel()
                    if act.task is not None:
                        act.task.cancel()
                    await self._finish(act.model, act.entry, job_id, "cancelled",
                                       {"type": "cancelled"})
        finally:
            await pubsub.aclose()

    async def _progress(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            for job_id, act in list(self.active.items()):
                _, step, _ = act.handle.loop.progress(act.handle.id)
                await self.r.hset(keys.job(job_id), "step", step)
            await asyncio.sleep(0.25)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _info_dict(info) -> dict:
    import dataclasses

    d = dataclasses.asdict(info)
    d["qsched"] = None  # applied by the worker's own sampler
    return d
