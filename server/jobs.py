"""Asynchronous jobs: POST /v1/jobs, GET /v1/jobs/{id}, DELETE /v1/jobs/{id}.

A job is a generation request whose client does not wait on the connection:
it polls for status, queue position, progress and the result, or cancels.
In the all-in-one server jobs live in memory (JobStore) for `url_ttl_s`
after they end; the scaled-out roles keep them in Redis.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from .errors import APIError, error_body
from .generation import (
    OutputSpec,
    image_data,
    record_end,
    require_ready,
    resolve,
    runtime_of,
    submit,
)
from .protocol import ImageGenerationRequest, ImagesResponse, usage_for
from .runtime import Runtime
from .scheduler.events import CANCELLED, Completed, Failed, Preview
from .scheduler.loop import Handle

router = APIRouter()

STATUSES = ("queued", "running", "completed", "failed", "cancelled")


@dataclass
class Job:
    id: str
    handle: Handle
    spec: OutputSpec
    created_at: float = field(default_factory=time.time)
    status: str = "queued"
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    ended_at: float | None = None
    task: asyncio.Task | None = None

    @property
    def final(self) -> bool:
        return self.status in ("completed", "failed", "cancelled")


class JobStore:
    """In-memory jobs; ended jobs are kept `ttl_s`, then forgotten."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self.jobs: dict[str, Job] = {}

    def add(self, job: Job) -> None:
        self.purge()
        self.jobs[job.id] = job

    def get(self, job_id: str) -> Job:
        self.purge()
        job = self.jobs.get(job_id)
        if job is None:
            raise APIError(404, f"no job {job_id!r} (unknown, or its result expired)", "id",
                           "job_not_found")
        return job

    def purge(self) -> None:
        now = time.time()
        for k in [k for k, j in self.jobs.items()
                  if j.ended_at is not None and now - j.ended_at > self.ttl_s]:
            del self.jobs[k]


def store_of(rt: Runtime) -> JobStore:
    if not hasattr(rt, "jobs"):
        rt.jobs = JobStore(rt.settings.url_ttl_s)  # type: ignore[attr-defined]
    return rt.jobs  # type: ignore[attr-defined]


async def follow(rt: Runtime, request: Request, job: Job, params: Any) -> None:
    """Consume the job's events until it ends; store the encoded result."""
    event = None
    try:
        while True:
            event = await job.handle.events.get()
            if not isinstance(event, Preview):
                break
        if isinstance(event, Completed):
            data = await image_data(rt, request, event.images, job.spec)
            job.result = ImagesResponse(
                created=int(time.time()), data=data, background="opaque",
                output_format=job.spec.output_format, size=job.spec.size,
                usage=usage_for(params.prompt, params.n, job.handle.image_tokens)
            ).model_dump(exclude_none=True)
            job.status = "completed"
        elif isinstance(event, Failed) and event.code == CANCELLED:
            job.status, event = "cancelled", None
        elif isinstance(event, Failed):
            job.error = error_body(event.status_code, event.message, None, event.code)["error"]
            job.status = "failed"
    finally:
        record_end(rt, job.handle, event)
        job.ended_at = time.time()


def view(rt: Runtime, job: Job) -> dict[str, Any]:
    out: dict[str, Any] = {"id": job.id, "object": "image.job", "status": job.status,
                           "created_at": int(job.created_at), "queue_position": None,
                           "progress": None, "result": job.result, "error": job.error}
    steps = job.handle.params.steps
    if not job.final and job.handle.loop is not None:
        phase, step, position = job.handle.loop.progress(job.handle.id)
        job.status = out["status"] = phase
        out["queue_position"] = position
        out["progress"] = {"step": step, "total_steps": steps, "fraction": step / steps}
    elif job.status == "completed":
        out["progress"] = {"step": steps, "total_steps": steps, "fraction": 1.0}
    return out


@router.post("/v1/jobs", status_code=202)
async def create_job(body: ImageGenerationRequest, request: Request) -> JSONResponse:
    rt = runtime_of(request)
    require_ready(rt)
    if body.stream:
        raise APIError(400, "jobs are polled, not streamed: drop `stream` (or use "
                       "/v1/images/generations)", "stream", "invalid_value")
    served, params, spec = resolve(body, rt)
    handle = submit(rt, served, params, seeded=body.seed is not None)
    # public id "job-..."; the loop knows the request by the handle's "img-..." id
    job = Job(handle.id.replace("img-", "job-", 1), handle, spec)
    store = store_of(rt)
    store.add(job)
    remember = getattr(handle.loop, "remember_job", None)
    if remember is not None:  # scaled out: any API replica can answer for this job
        usage = usage_for(params.prompt, params.n, handle.image_tokens).model_dump()
        remember(handle.id, dataclasses.asdict(spec), usage)
    job.task = asyncio.create_task(follow(rt, request, job, params))
    return JSONResponse(view(rt, job), status_code=202)


def find(rt: Runtime, job_id: str) -> Job:
    return store_of(rt).get(job_id)


@router.get("/v1/jobs/{job_id}")
async def get_job(job_id: str, request: Request) -> JSONResponse:
    rt = runtime_of(request)
    local = store_of(rt).jobs.get(job_id)
    if _scaled_out(rt) and (local is None or not local.final):
        # Redis holds the truth while a job runs (this replica may hear of its end late)
        from .redis.remote_jobs import remote_view

        remote = await remote_view(rt, request, job_id)
        if remote is not None:
            return JSONResponse(remote)
    return JSONResponse(view(rt, find(rt, job_id)))


def _scaled_out(rt: Runtime) -> bool:
    return any(hasattr(s.loop, "remember_job") for s in rt.models.values())


@router.delete("/v1/jobs/{job_id}")
async def cancel_job(job_id: str, request: Request) -> JSONResponse:
    rt = runtime_of(request)
    if job_id not in store_of(rt).jobs and _scaled_out(rt):
        from .redis.remote_jobs import remote_cancel

        remote = remote_cancel(rt, job_id)
        if remote is not None:
            return JSONResponse(remote)
    job = find(rt, job_id)
    if job.final:
        raise APIError(409, f"job {job_id!r} has already ended ({job.status})", "id",
                       "job_already_ended")
    job.handle.cancel()  # queued: removed at once; running: leaves at the next step
    job.status, job.ended_at = "cancelled", time.time()
    if job.task is not None:
        job.task.cancel()
    return JSONResponse(view(rt, job))
