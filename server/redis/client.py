"""The API role's stand-in for an EngineLoop: `submit` puts the job on the model's
Redis Stream, and the job's previews and final event come back over pub/sub into
the same per-request asyncio queue the all-in-one server uses, so the HTTP code
(plain, streaming, jobs) is shared."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from typing import Any

import redis

from ..scheduler.backend import (
    BackendUnavailable,
    Handle,
    Progress,
    QueueFull,
    ShuttingDown,
    new_request_id,
)
from ..scheduler.deadlines import refuse_late
from ..scheduler.events import Completed, Failed, FinishReason, Preview
from ..scheduler.load_report import combined_forecast
from ..scheduler.request import GenerationParams
from . import keys, scripts
from .codec import failure_from_json, images_from_bytes, params_to_json
from .connect import REDIS_DOWN, UNAVAILABLE, aclient, as_backend_errors, client
from .event_hub import LOST, EventHub

log = logging.getLogger("stepserve.api")

# error codes of jobs the Redis roles could not bring to an end
JOB_LOST = "job_lost"  # Redis restarted without the job's data
RESULT_MISSING = "result_missing"  # the job ended but its stored images expired
BACKEND_ERROR = "backend_error"  # Redis answered with an error (out of memory, read-only)


class RedisLoop:
    """The API role's JobBackend."""

    shared = True  # every API replica sees these jobs

    def __init__(self, url: str, model: str, max_queue: int,
                 result_ttl_s: float = 3600.0) -> None:
        self.result_ttl_s = max(1, int(result_ttl_s))
        self.url, self.model, self.max_queue = url, model, max_queue
        self.sync = client(url)
        self.aio = aclient(url)
        self.hub: EventHub | None = None  # created inside the event loop, on first use
        self._enqueue_script: Any = None
        self._accepting = True
        self._loop: asyncio.AbstractEventLoop | None = None  # the API's event loop
        self.handles: dict[str, Handle] = {}
        self.tasks: dict[str, asyncio.Task] = {}

    @property
    def inflight(self) -> int:
        return len(self.handles)

    running = 0  # runs on the workers: see their metrics

    def start(self) -> None:
        """Connections open lazily; events are read by the EventHub on first use."""

    @property
    def waiting(self) -> int:
        return self.inflight

    def backlog(self) -> int:
        """Jobs on the stream not yet taken by a worker, plus those being run."""
        return sum(self._group())

    def _group(self) -> tuple[int, int]:
        """(jobs not yet taken by a worker, jobs taken and not finished)."""
        try:
            group = next(g for g in self.sync.xinfo_groups(keys.queue(self.model))
                         if g["name"].decode() == keys.GROUP)
        except (StopIteration, redis.ResponseError):
            return 0, 0
        return int(group.get("lag") or 0), int(group.get("pending") or 0)

    def _check_deadline(self, params: GenerationParams, queued: int) -> None:
        """Refuse now what the workers' load reports say would miss its deadline."""
        if params.timeout_s is None:
            return
        reports = [json.loads(v) for v in self.sync.hvals(keys.load(self.model))]
        refuse_late(combined_forecast(reports, params, queued), params.timeout_s)

    def submit(self, params: GenerationParams) -> Handle:
        if not self._accepting:
            raise ShuttingDown("this API replica is shutting down")
        try:
            queued, taken = self._group()
            if queued + taken >= self.max_queue:
                raise QueueFull(f"queue is full ({self.max_queue} jobs for {self.model!r})")
            self._check_deadline(params, queued)
        except UNAVAILABLE as exc:
            log.warning("Redis unavailable: %s", exc)  # its address stays in the log
            raise BackendUnavailable(REDIS_DOWN) from exc
        job_id = new_request_id()
        handle = Handle(job_id, params, backend=self)
        self._loop = asyncio.get_running_loop()
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
            log.warning("job %s: Redis unavailable: %s", job_id, exc)
            failure = Failed(job_id, FinishReason.UNAVAILABLE, REDIS_DOWN)
        except Exception as exc:  # e.g. Redis out of memory or read-only after a failover
            log.exception("job %s: unexpected Redis error", job_id)
            failure = Failed(job_id, FinishReason.UNAVAILABLE,
                             f"the job queue failed ({type(exc).__name__}); retry shortly",
                             BACKEND_ERROR)
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
        meta: dict[Any, Any] = await self.aio.hgetall(keys.job(job_id))
        if not meta:  # the hash was written with the entry: Redis lost its data
            return {"type": "failed", "reason": FinishReason.UNAVAILABLE.value,
                    "code": JOB_LOST,
                    "message": "the job was lost when Redis restarted without persistence; "
                               "submit it again"}
        status = meta.get(b"status", b"").decode()
        if status == "completed":  # what ran (older workers stored no outcome)
            return {"type": "completed", "steps": int(meta.get(b"steps", 1)),
                    **json.loads(meta.get(b"outcome", b"{}") or b"{}")}
        if status == "failed":
            return {"type": "failed", **json.loads(meta.get(b"error", b"{}") or b"{}")}
        cancelled = status == "cancelled" or meta.get(b"cancelled") == b"1"
        return {"type": "cancelled"} if cancelled else None

    async def _deliver(self, handle: Handle, event: dict) -> None:
        job_id = handle.id
        if event["type"] == "completed":
            blob: bytes | None = await self.aio.get(keys.result(job_id))  # type: ignore[assignment]
            if blob is None:
                await handle.events.put(Failed(job_id, FinishReason.ERROR,
                                               "the job ended but its result expired",
                                               RESULT_MISSING))
                return
            await handle.events.put(Completed(job_id, images_from_bytes(blob),
                                              event["steps"], event.get("cache"),
                                              event.get("level")))
        elif event["type"] == "failed":
            await handle.events.put(failure_from_json(job_id, event))
        else:  # cancelled, perhaps through another API replica: end this side's wait too
            await handle.events.put(Failed(job_id, FinishReason.CANCELLED,
                                           "the job was cancelled"))

    @as_backend_errors
    def remember_job(self, request_id: str, spec: dict, usage: dict,
                     owner: str | None, done: tuple[str, int] | None = None) -> None:
        """What another API replica needs to answer GET /v1/jobs/{id} for this job; a job
        answered from the result cache (`done`: its cache key and steps) is stored as
        completed, pointing at the cached images (not a copy), since no worker will ever
        announce it."""
        record: dict[Any, Any] = {
            "spec": json.dumps(spec), "usage": json.dumps(usage), "owner": owner or ""}
        if done is None:
            self.sync.hset(keys.job(request_id), mapping=record)
            return
        cache_key, steps = done
        pipe = self.sync.pipeline()
        pipe.hset(keys.job(request_id), mapping={
            **record, "status": "completed", "model": self.model, "steps": steps,
            "step": steps, "created_at": time.time(), "ended_at": time.time(),
            "rcache": cache_key})
        pipe.expire(keys.job(request_id), self.result_ttl_s)
        pipe.execute()

    @as_backend_errors
    def cancel(self, request_id: str) -> None:
        """Queued: the worker skips it; running: it leaves its batch at the next step."""
        pipe = self.sync.pipeline()
        pipe.hset(keys.job(request_id), "cancelled", 1)
        pipe.expire(keys.job(request_id), self.result_ttl_s, nx=True)  # never for ever
        pipe.execute()
        self.sync.publish(keys.CANCEL, request_id)  # to the worker running it, if any
        # and to the API replica that created it, which may not be this one
        self.sync.publish(keys.events(request_id), json.dumps({"type": "cancelled"}))
        self.handles.pop(request_id, None)
        task = self.tasks.pop(request_id, None)
        if task is not None:
            task.cancel()

    @as_backend_errors
    def progress(self, request_id: str) -> Progress:
        raw: dict[bytes, bytes] = self.sync.hgetall(keys.job(request_id))  # type: ignore[assignment]
        meta = {k.decode(): v.decode() for k, v in raw.items()}
        status = meta.get("status", "queued")
        if status in ("running", "completed", "failed", "cancelled"):
            return Progress(status, int(meta.get("step", 0)))  # type: ignore[arg-type]
        entry = meta.get("entry")
        if entry is None:
            return Progress("queued")
        try:
            group = next(g for g in self.sync.xinfo_groups(keys.queue(self.model))
                         if g["name"].decode() == keys.GROUP)
            last = group["last-delivered-id"].decode()
            ahead = len(self.sync.xrange(keys.queue(self.model), f"({last}", entry) or [])
            return Progress("queued", 0, max(0, ahead - 1))
        except (StopIteration, redis.ResponseError):
            return Progress("queued")

    def close_intake(self) -> None:
        self._accepting = False

    def abort_all(self, message: str) -> None:
        """Stop waiting for these jobs here (they stay in Redis; a worker still runs them
        and their results stay fetchable through another replica)."""
        loop = self._loop
        for job_id, handle in list(self.handles.items()):
            event = Failed(job_id, FinishReason.UNAVAILABLE, message, "shutting_down")
            if loop is not None:
                loop.call_soon_threadsafe(handle.events.put_nowait, event)
                task = self.tasks.get(job_id)
                if task is not None:
                    loop.call_soon_threadsafe(task.cancel)

    async def drain(self, timeout: float | None = None) -> bool:
        """Await this replica's waiting requests (their tasks run on this event loop)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.handles and (deadline is None or time.monotonic() < deadline):
            await asyncio.sleep(0.05)
        return not self.handles
