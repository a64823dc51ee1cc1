"""Asynchronous jobs: POST /v1/jobs, GET /v1/jobs[/{id}], DELETE /v1/jobs/{id}.

A job is a generation request whose client does not wait on the connection:
it polls for status, queue position, progress and the result, or cancels. A job
belongs to the API key that created it: other keys get 404 (without auth, the
unguessable id is the capability). In the all-in-one server jobs live in memory
(JobStore, bounded in bytes) for `url_ttl_s` after they end; the scaled-out roles
keep them in Redis.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from .auth import owner_of, quota_of
from .errors import APIError, error_responses, failure_body
from .generation import (
    image_data,
    record_end,
    require_ready,
    resolve,
    runtime_of,
    submit,
)
from .job_store import Job
from .protocol import ImageGenerationRequest, ImageJob, ImageJobList, ImagesResponse, usage_for
from .quality import ran
from .runtime import Runtime, Served
from .scheduler.events import Completed, Failed, FinishReason, Preview
from .scheduler.request import GenerationParams
from .submission import OutputSpec, Submission

router = APIRouter()
# OpenAPI links: a created job's id is what GET / DELETE /v1/jobs/{job_id} take
JOB_LINKS = {name: {"operationId": op, "parameters": {"job_id": "$response.body#/id"}}
             for name, op in (("GetJob", "get_job"), ("CancelJob", "cancel_job"))}

def content_key(sub: Submission, spec: OutputSpec) -> str | None:
    """Jobs returning the same cached result in the same inline format share one copy."""
    if sub.result_key is None or spec.response_format != "b64_json":
        return None  # url results belong to one owner each
    return f"{sub.result_key}|{spec}"


def reservation(params: GenerationParams, spec: OutputSpec, shape: tuple[int, int, int]
                ) -> int:
    """The most bytes this job's result can take (b64 of raw-size images)."""
    if spec.response_format != "b64_json":
        return params.n * 256
    _, h, w = shape
    return params.n * (4 * (h * w * 3 * spec.upscale ** 2 + 4096) // 3 + 64)


async def follow(rt: Runtime, request: Request, job: Job, params: GenerationParams) -> None:
    """Consume the job's events until it ends; store the encoded result."""
    event = None
    try:
        while True:
            event = await job.sub.handle.events.get()
            if not isinstance(event, Preview):
                break
        if isinstance(event, Completed):
            if _scaled_out(rt):  # every replica serves it from Redis: keep nothing here
                rt.jobs.complete(job, [], None)
            else:
                key = content_key(job.sub, job.spec)
                data = rt.jobs.shared(job.content_key or key)
                if data is None:
                    encoded = await image_data(rt, request, event.images, job.spec)
                    data = [d.model_dump(exclude_none=True) for d in encoded]
                rt.jobs.complete(job, data, key)
            job.result = ImagesResponse(
                created=int(time.time()), data=[], background="opaque",
                output_format=job.spec.output_format, size=job.spec.size,
                usage=usage_for(params.prompt, params.n, job.sub.image_tokens),
                stepserve=ran(job.sub.handle.params, event, job.spec.warnings)
            ).model_dump(exclude_none=True)
            job.status = "completed"
        elif isinstance(event, Failed) and event.reason is FinishReason.CANCELLED:
            job.status, event = "cancelled", None
        elif isinstance(event, Failed):
            job.error = failure_body(event)["error"]
            job.status = "failed"
    finally:
        if job.data is None:
            rt.jobs.release(job)
        record_end(rt, job.sub, event)
        job.ended_at = time.time()


def view(rt: Runtime, job: Job, with_result: bool = True) -> dict[str, Any]:
    """The job as the API shows it; a listing leaves results out (one shared result
    inlined per listed job would multiply it)."""
    out: dict[str, Any] = {"id": job.id, "object": "image.job", "status": job.status,
                           "created_at": int(job.created_at), "queue_position": None,
                           "progress": None, "result": None, "error": job.error}
    handle = job.sub.handle
    steps = handle.params.steps
    if not job.final and handle.backend is not None:
        p = handle.backend.progress(handle.id)
        # the end is this job's own to record (with its result): until then, running
        job.status = out["status"] = p.phase if p.phase in ("queued", "running") else "running"
        job.last_step = max(job.last_step, p.step)
        out["queue_position"] = p.position
    elif not job.final:  # answered from the result cache: done at its next turn
        out["queue_position"] = 0
    elif job.status == "completed":
        job.last_step = steps
        if with_result:
            out["result"] = {**(job.result or {}), "data": job.data}
    if with_result:
        job.fetched = job.fetched or job.final
    out["progress"] = {"step": job.last_step, "total_steps": steps,
                       "fraction": job.last_step / steps}
    return out


@router.post("/v1/jobs", status_code=202, responses={
    202: {"model": ImageJob, "description": "The job, queued", "links": JOB_LINKS},
    **error_responses(400, 404, 413, 429, 503, 504, e404="The model is not served here",
                      e429="Queue full, the jobs store full, or a rate limit",
                      e504="The job's `timeout` cannot be met (refused at once)")})
async def create_job(body: ImageGenerationRequest, request: Request) -> JSONResponse:
    rt = runtime_of(request)
    require_ready(rt)
    if body.stream:
        raise APIError(400, "jobs are polled, not streamed: drop `stream` (or use "
                       "/v1/images/generations)", "stream", "invalid_value")
    served, params, spec = resolve(body, rt)
    params = dataclasses.replace(params, tenant=quota_of(request))
    return start_job(rt, request, served, params, spec, seeded=body.seed is not None)


def start_job(rt: Runtime, request: Request, served: Served, params: GenerationParams,
              spec: OutputSpec, seeded: bool) -> JSONResponse:
    """Queue a resolved request as an async job (generations and edits alike)."""
    reserve = reservation(params, spec, served.info.image_shape)
    rt.jobs.make_room(reserve)  # before anything runs: a refused job leaves no trace
    sub = submit(rt, served, params, seeded=seeded)
    # public id "job-..."; the backend knows the request by the handle's "img-..." id
    owner = owner_of(request)
    job = Job(sub.handle.id.replace("img-", "job-", 1), sub, spec, owner, quota_of(request))
    rt.jobs.add(job, reserve, content_key(sub, spec))
    try:
        # scaled out: any API replica can answer for it (a no-op for in-process backends)
        usage = usage_for(params.prompt, params.n, sub.image_tokens).model_dump()
        served.loop.remember_job(sub.handle.id, dataclasses.asdict(spec), usage, owner,
                                 (sub.result_key, params.steps) if sub.from_cache else None)
        out = view(rt, job)
    except Exception:  # e.g. Redis went away: the job must not stay half-made
        rt.jobs.remove(job)
        sub.handle.cancel()
        raise
    job.task = asyncio.create_task(follow(rt, request, job, params))
    return JSONResponse(out, status_code=202)


@router.get("/v1/jobs", responses={200: {"model": ImageJobList}, **error_responses(400)})
async def list_jobs(request: Request, limit: int = Query(100, ge=1, le=1000)) -> JSONResponse:
    """The caller's own jobs held by this server, newest first."""
    rt = runtime_of(request)
    jobs = sorted(rt.jobs.mine(owner_of(request), quota_of(request)),
                  key=lambda j: j.created_at, reverse=True)
    # progress may ask Redis (blocking calls): off the event loop
    views = await asyncio.to_thread(lambda: [view(rt, j, with_result=False)
                                             for j in jobs[:limit]])
    return JSONResponse({"object": "list", "data": views, "has_more": len(jobs) > limit})


def find(rt: Runtime, job_id: str, request: Request) -> Job:
    return rt.jobs.get(job_id, owner_of(request))


@router.get("/v1/jobs/{job_id}", operation_id="get_job", responses={
    200: {"model": ImageJob, "links": {"CancelJob": JOB_LINKS["CancelJob"]}},
    **error_responses(404, 503, e404="No such job (unknown, expired, or another key's)")})
async def get_job(job_id: str, request: Request) -> JSONResponse:
    rt = runtime_of(request)
    if _scaled_out(rt):
        # Redis holds the truth, the same for every replica (results encoded once there)
        from .redis.remote_jobs import remote_view

        remote = await remote_view(rt, request, job_id, owner_of(request))
        if remote is not None:
            local = rt.jobs.jobs.get(job_id)
            if local is not None and remote["status"] in ("completed", "failed"):
                local.fetched = True  # read: the local record may go when room is needed
            return JSONResponse(remote)
    return JSONResponse(view(rt, find(rt, job_id, request)))


def _scaled_out(rt: Runtime) -> bool:
    return any(s.loop.shared for s in rt.models.values())


@router.delete("/v1/jobs/{job_id}", operation_id="cancel_job", responses={
    200: {"model": ImageJob, "description": "The job, cancelled"},
    **error_responses(404, 409, 503, e404="No such job (unknown, expired, or another key's)",
                      e409="The job has already ended")})
async def cancel_job(job_id: str, request: Request) -> JSONResponse:
    rt = runtime_of(request)
    if job_id not in rt.jobs.jobs and _scaled_out(rt):
        from .redis.remote_jobs import remote_cancel

        remote = remote_cancel(rt, job_id, owner_of(request))
        if remote is not None:
            return JSONResponse(remote)
    job = find(rt, job_id, request)
    if job.final:
        raise APIError(409, f"job {job_id!r} has already ended ({job.status})", "id",
                       "job_already_ended")
    out = view(rt, job)  # its progress at the moment it is cancelled
    job.sub.handle.cancel()  # queued: removed at once; running: leaves at the next step
    job.status, job.ended_at = "cancelled", time.time()
    if job.task is not None:
        job.task.cancel()
    return JSONResponse({**out, "status": "cancelled", "queue_position": None})
