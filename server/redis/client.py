"""The API role's stand-in for an EngineLoop: `submit` puts the job on the model's
Redis Stream, and the job's previews and final event come back over pub/sub into
the same per-request asyncio queue the all-in-one server uses, so the HTTP code
(plain, streaming, jobs) is shared."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import secrets
import time

import redis

from ..errors import BACKEND_DOWN
from ..scheduler.core import QueueFull
from ..scheduler.events import CANCELLED, Completed, Failed, Preview
from ..scheduler.loop import Handle, Unavailable
from ..scheduler.request import GenerationParams
from . import keys, scripts
from .codec import images_from_bytes, params_to_json
from .connect import UNAVAILABLE, aclient, client
from .event_hub import LOST, EventHub

log = logging.getLogger("stepserve.api")


class RedisLoop:
    def __init__(self, url: str, model: str, max_queue: int) -> None:
        self.url, self.model, self.max_queue = url, model, max_queue
        self.sync = client(url)
        self.aio = aclient(url)
        self.hub: EventHub | None = None  # created inside the event loop, on first use
        self._enqueue_script = None
        self.handles: dict[str, Handle] = {}
        self.tasks: dict[str, asyncio.Task] = {}
        self._ids = itertools.count()

    @property
    def inflight(self) -> int:
        return len(self.handles)

    running = 0  # runs on the workers: see their metrics

    @property
    def waiting(self) -> int:
        return self.inflight

    def backlog(self) -> int:
        """Jobs on the stream not yet taken by a worker, plus those being run."""
        try:
            group = next(g for g in self.sync.xinfo_groups(keys.queue(self.model))
                         if g["name"].decode() == keys.GROUP)
        except (StopIteration, redis.ResponseError):
            return 0
        return int(group.get("lag") or 0) + int(group.get("pending") or 0)

    def submit(self, params: GenerationParams) -> Handle:
        try:
            backlog = self.backlog()
        except UNAVAILABLE as exc:
            raise Unavailable(f"{BACKEND_DOWN} ({exc})") from exc
        if backlog >= self.max_queue:
            raise QueueFull(f"queue is full ({self.max_queue} jobs for {self.model!r})")
        job_id = f"img-{secrets.token_hex(6)}-{next(self._ids):06d}"
        handle = Handle(job_id, params, loop=self)
        self.handles[job_id] = handle
        self.tasks[job_id] = asyncio.get_running_loop().create_task(self._run(handle))
        return handle

    async def _run(self, handle: Handle) -> None:
        """Whatever happens (Redis down, an unexpected reply), the handle gets a final
        event: a request never waits forever."""
        job_id = handle.id
        channel = keys.events(job_id)
        if self.hub is None:
            self.hub = EventHub(self.aio)
        failure: Failed | None = None
        try:
            messages = await self.hub.open(channel)  # before the job can finish
            await self._enqueue(handle)
            await self._follow(handle, messages)
        except UNAVAILABLE as exc:
            failure = Failed(job_id, 503, "backend_unavailable", f"{BACKEND_DOWN} ({exc})")
        except Exception as exc:  # e.g. Redis out of memory or read-only after a failover
            log.exception("job %s: unexpected Redis error", job_id)
            failure = Failed(job_id, 503, "backend_error", f"the job queue failed: {exc}")
        finally:
            self.handles.pop(job_id, None)
            self.tasks.pop(job_id, None)
            self.hub.close(channel)
        if failure is not None:
            await handle.events.put(failure)

    async def _enqueue(self, handle: Handle) -> None:
        """The job's hash and its stream entry, in one script (scripts.ENQUEUE)."""
        if self._enqueue_script is None:
            self._enqueue_script = self.aio.register_script(scripts.ENQUEUE)
        args = [self.model, handle.params.steps, time.time(), handle.id,
                params_to_json(handle.params), 100_000]
        for attempt in range(3):  # a pooled connection may predate a Redis restart
            try:
                await self._enqueue_script(keys=[keys.job(handle.id), keys.queue(self.model)],
                                           args=args)
                return
            except UNAVAILABLE:
                if attempt == 2:
                    raise
                await asyncio.sleep(0.1)

    async def _follow(self, handle: Handle, messages: asyncio.Queue) -> None:
        """Previews and the end arrive over pub/sub, which drops messages while Redis
        restarts: after a reconnect (LOST), and every few quiet seconds, the job's stored
        status is read too (the worker stores the outcome before it announces it)."""
        job_id = handle.id
        while True:
            try:
                data = await asyncio.wait_for(messages.get(), timeout=5.0)
            except asyncio.TimeoutError:
                data = LOST
            try:
                if data is LOST:
                    event = await self._stored_outcome(job_id)
                    if event is None:
                        continue
                else:
                    event = json.loads(data)
                if event["type"] == "preview":
                    images = images_from_bytes(base64.b64decode(event["images"]))
                    await handle.events.put(Preview(job_id, event["index"], event["step"],
                                                    images))
                    continue
                await self._deliver(handle, event)
                return
            except UNAVAILABLE:  # Redis is restarting: wait for it
                await asyncio.sleep(0.5)
                messages.put_nowait(LOST)

    async def _stored_outcome(self, job_id: str) -> dict | None:
        meta = await self.aio.hgetall(keys.job(job_id))
        if not meta:  # the hash was written with the entry: Redis lost its data
            return {"type": "failed", "status": 503, "code": "job_lost",
                    "message": "the job was lost when Redis restarted without persistence; "
                               "submit it again"}
        status = meta.get(b"status", b"").decode()
        if status == "completed":
            return {"type": "completed", "steps": int(meta.get(b"steps", 1))}
        if status == "failed":
            return {"type": "failed", **json.loads(meta.get(b"error", b"{}") or b"{}")}
        cancelled = status == "cancelled" or meta.get(b"cancelled") == b"1"
        return {"type": "cancelled"} if cancelled else None

    async def _deliver(self, handle: Handle, event: dict) -> None:
        job_id = handle.id
        if event["type"] == "completed":
            blob = await self.aio.get(keys.result(job_id))
            if blob is None:
                await handle.events.put(Failed(job_id, 500, "result_missing",
                                               "the job ended but its result expired"))
                return
            await handle.events.put(Completed(job_id, images_from_bytes(blob),
                                              event["steps"]))
        elif event["type"] == "failed":
            await handle.events.put(Failed(job_id, event.get("status", 500),
                                           event.get("code", "failed"),
                                           event.get("message", "the job failed")))
        else:  # cancelled, perhaps through another API replica: end this side's wait too
            await handle.events.put(Failed(job_id, 409, CANCELLED, "the job was cancelled"))

    def remember_job(self, request_id: str, spec: dict, usage: dict) -> None:
        """What another API replica needs to answer GET /v1/jobs/{id} for this job."""
        self.sync.hset(keys.job(request_id), mapping={"spec": json.dumps(spec),
                                                      "usage": json.dumps(usage)})

    def cancel(self, request_id: str) -> None:
        """Queued: the worker skips it; running: it leaves its batch at the next step."""
        self.sync.hset(keys.job(request_id), "cancelled", 1)
        self.sync.publish(keys.CANCEL, request_id)  # to the worker running it, if any
        # and to the API replica that created it, which may not be this one
        self.sync.publish(keys.events(request_id), json.dumps({"type": "cancelled"}))
        self.handles.pop(request_id, None)
        task = self.tasks.pop(request_id, None)
        if task is not None:
            task.cancel()

    def progress(self, request_id: str) -> tuple[str, int, int | None]:
        meta = {k.decode(): v.decode() for k, v in self.sync.hgetall(keys.job(request_id)).items()}
        status = meta.get("status", "queued")
        if status == "running":
            return "running", int(meta.get("step", 0)), None
        if status in ("completed", "failed", "cancelled"):
            return status, int(meta.get("step", 0)), None
        entry = meta.get("entry")
        if entry is None:
            return "queued", 0, None
        try:
            group = next(g for g in self.sync.xinfo_groups(keys.queue(self.model))
                         if g["name"].decode() == keys.GROUP)
            last = group["last-delivered-id"].decode()
            ahead = len(self.sync.xrange(keys.queue(self.model), f"({last}", entry))
            return "queued", 0, max(0, ahead - 1)
        except (StopIteration, redis.ResponseError):
            return "queued", 0, None

    def close_intake(self) -> None:
        pass

    def drain(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.handles and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.05)
        return not self.handles
