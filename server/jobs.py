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
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from .errors import APIError, failure_body
from .generation import (
    image_data,
    record_end,
    require_ready,
    resolve,
    runtime_of,
    submit,
)
from .job_store import Job
from .protocol import ImageGenerationRequest, ImagesResponse, usage_for
from .runtime import Runtime
from .scheduler.events import Completed, Failed, FinishReason, Preview
from .scheduler.request import GenerationParams

router = APIRouter()

async def follow(rt: Runtime, request: Request, job: Job, params: GenerationParams) -> None:
    """Consume the job's events until it ends; store the encoded result."""
    event = None
    try:
        while True:
            event = await job.sub.handle.events.get()
            if not isinstance(event, Preview):
                break
        if isinstance(event, Completed):
            data = await image_data(rt, request, event.images, job.spec)
            job.result = ImagesResponse(
                created=int(time.time()), data=data, background="opaque",
                output_format=job.spec.output_format, size=job.spec.size,
                usage=usage_for(params.prompt, params.n, job.sub.image_tokens)
            ).model_dump(exclude_none=True)
            job.status = "completed"
        elif isinstance(event, Failed) and event.reason is FinishReason.CANCELLED:
            job.status, event = "cancelled", None
        elif isinstance(event, Failed):
            job.error = failure_body(event)["error"]
            job.status = "failed"
    finally:
        record_end(rt, job.sub, event)
        job.ended_at = time.time()


def view(rt: Runtime, job: Job) -> dict[str, Any]:
    out: dict[str, Any] = {"id": job.id, "object": "image.job", "status": job.status,
                           "created_at": int(job.created_at), "queue_position": None,
                           "progress": None, "result": job.result, "error": job.error}
    handle = job.sub.handle
    steps = handle.params.steps
    if not job.final and handle.backend is not None:
        p = handle.backend.progress(handle.id)
        job.status = out["status"] = p.phase
        out["queue_position"] = p.position
        out["progress"] = {"step": p.step, "total_steps": steps, "fraction": p.step / steps}
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
    sub = submit(rt, served, params, seeded=body.seed is not None)
    # public id "job-..."; the backend knows the request by the handle's "img-..." id
    job = Job(sub.handle.id.replace("img-", "job-", 1), sub, spec)
    rt.jobs.add(job)
    if sub.handle.backend is not None:  # scaled out: any API replica can answer for it
        usage = usage_for(params.prompt, params.n, sub.image_tokens).model_dump()
        sub.handle.backend.remember_job(sub.handle.id, dataclasses.asdict(spec), usage)
    job.task = asyncio.create_task(follow(rt, request, job, params))
    return JSONResponse(view(rt, job), status_code=202)


def find(rt: Runtime, job_id: str) -> Job:
    return rt.jobs.get(job_id)


@router.get("/v1/jobs/{job_id}")
async def get_job(job_id: str, request: Request) -> JSONResponse:
    rt = runtime_of(request)
    local = rt.jobs.jobs.get(job_id)
    if _scaled_out(rt) and (local is None or not local.final):
        # Redis holds the truth while a job runs (this replica may hear of its end late)
        from .redis.remote_jobs import remote_view

        remote = await remote_view(rt, request, job_id)
        if remote is not None:
            return JSONResponse(remote)
    return JSONResponse(view(rt, find(rt, job_id)))


def _scaled_out(rt: Runtime) -> bool:
    return any(s.loop.shared for s in rt.models.values())


@router.delete("/v1/jobs/{job_id}")
async def cancel_job(job_id: str, request: Request) -> JSONResponse:
    rt = runtime_of(request)
    if job_id not in rt.jobs.jobs and _scaled_out(rt):
        from .redis.remote_jobs import remote_cancel

        remote = remote_cancel(rt, job_id)
        if remote is not None:
            return JSONResponse(remote)
    job = find(rt, job_id)
    if job.final:
        raise APIError(409, f"job {job_id!r} has already ended ({job.status})", "id",
                       "job_already_ended")
    job.sub.handle.cancel()  # queued: removed at once; running: leaves at the next step
    job.status, job.ended_at = "cancelled", time.time()
    if job.task is not None:
        job.task.cancel()
    return JSONResponse(view(rt, job))
