"""POST /v1/images/generations: validate, submit to the core loop, answer or stream."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import time
from collections.abc import AsyncIterator

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette.sse import EventSourceResponse

from stepserve.engines.capabilities import Capabilities
from stepserve.models.caches.config import CacheConfig, CacheConfigError

from .auth import owner_of, quota_of
from .errors import (
    APIError,
    backend_down,
    error_responses,
    failure_body,
    failure_http,
    shown,
    submit_error,
)
from .images import CONTENT_TYPES, b64, encode_image
from .loras import choose
from .metrics import tenant_label
from .protocol import (
    MAX_N,
    SIZE_RE,
    ImageData,
    ImageGenerationRequest,
    ImagesResponse,
    usage_for,
)
from .quality import apply_quality, ran
from .result_cache import result_key
from .runtime import Runtime, Served
from .scheduler.backend import (
    BackendUnavailable,
    DeadlineUnreachable,
    Handle,
    QueueFull,
    ShuttingDown,
    new_request_id,
)
from .scheduler.events import Completed, Event, Failed, FinishReason, Preview
from .scheduler.request import GenerationParams
from .submission import OutputSpec, Submission

router = APIRouter()
MAX_UPSCALE = 16


def runtime_of(request: Request) -> Runtime:
    return request.app.state.runtime


def resolve(body: ImageGenerationRequest, rt: Runtime
            ) -> tuple[Served, GenerationParams, OutputSpec]:
    """Checks that need the server's settings and model; each error names its field."""
    served = rt.served(body.model)
    if served is None:
        raise APIError(404, f"model {shown(str(body.model))!r} is not served here; available: "
                       f"{', '.join(rt.names())}", "model", "model_not_found")
    s, info, caps = served.settings, served.info, served.caps
    _, h, w = info.image_shape
    upscale = 1
    if body.size not in (None, "auto"):
        m = SIZE_RE.fullmatch(body.size)
        assert m is not None
        width, height = int(m.group(1)), int(m.group(2))
        if width != height or width % w or not 1 <= width // w <= MAX_UPSCALE:
            raise APIError(400, f"size {body.size!r} is not supported by {s.model_name!r}: use "
                           f"{w}x{h} (native) or a square multiple up to "
                           f"{w * MAX_UPSCALE}x{h * MAX_UPSCALE}", "size", "invalid_value")
        upscale = width // w
    if body.background == "transparent":
        raise APIError(400, "background 'transparent' is not supported", "background",
                       "invalid_value")
    # the upper bounds live here, not in the schema: one message for every value over
    steps = body.num_inference_steps or s.default_steps
    if steps > s.max_steps:
        raise APIError(400, f"num_inference_steps must be at most {s.max_steps} on this "
                       "server (max_steps)", "num_inference_steps", "invalid_value")
    max_n = min(MAX_N, s.max_batch_size)
    if body.n > max_n:
        raise APIError(400, f"n must be at most {max_n} on this server", "n", "invalid_value")
    try:
        cache = CacheConfig.parse(body.cache, default=CacheConfig.parse(s.cache))
    except CacheConfigError as exc:
        raise APIError(400, shown(str(exc), 256), f"cache.{shown(exc.field)}"
                       if isinstance(body.cache, dict) else "cache", "invalid_value") from exc
    except TypeError as exc:  # a knob of the wrong type
        raise APIError(400, shown(f"invalid cache options: {exc}", 256), "cache",
                       "invalid_value") from exc
    problem = caps.cache_error(cache, s.model_name, info.engine)
    if problem:
        raise APIError(400, problem, "cache", "unsupported_value")
    samplers = caps.samplers
    sampler = body.sampler or caps.default_sampler
    if sampler not in samplers:
        raise APIError(400, f"sampler {sampler!r} is not available for {s.model_name!r}; "
                       f"one of {', '.join(samplers)}", "sampler", "invalid_value")
    schedule = custom_schedule(body, caps, sampler)
    if schedule is not None:
        steps = len(schedule[0][1]) - (1 if schedule[0][0] == "sigmas" else 0)
    params = GenerationParams(
        prompt=body.prompt, steps=steps,
        seed=body.seed if body.seed is not None else secrets.randbelow(2**31 - 10),
        guidance=body.guidance_scale if body.guidance_scale is not None
        else info.default_guidance,
        n=body.n, negative_prompt=body.negative_prompt or "", sampler=sampler,
        priority=body.priority, timeout_s=body.timeout if body.timeout is not None
        else s.slo_s,
        partial_images=(body.partial_images or 0) if body.stream else 0,
        cache=cache if cache.enabled else None, schedule=schedule,
        mode=body.mode or "throughput",
        lora=choose(body.lora, served.loras, s.model_name, s.max_loras_per_request))
    params = apply_quality(body, params, caps, s.model_name, info.engine, s.max_steps)
    spec = OutputSpec(body.response_format or "b64_json", body.output_format or "png",
                      body.output_compression, f"{w * upscale}x{h * upscale}", upscale,
                      prompt_warnings(rt, caps, body.prompt))
    return served, params, spec


def prompt_warnings(rt: Runtime, caps: Capabilities, prompt: str) -> tuple[str, ...]:
    """A prompt that names nothing the model knows is served (never refused), with a
    warning and a count."""
    if not caps.out_of_vocabulary(prompt):
        return ()
    rt.metrics.out_of_vocabulary.inc()
    return ("the prompt names nothing this model knows, so expect an image of noise: the "
            "built-in model draws one circle, square or triangle in a colour, size and "
            "position on a background (its vocabulary: GET /v1/models, docs/"
            "shapes-dataset.md)",)


def custom_schedule(body: ImageGenerationRequest, caps: Capabilities, sampler: str
                    ) -> tuple[tuple[str, tuple[float, ...]], ...] | None:
    """Explicit timesteps / sigmas, or a named schedule, checked against the model."""
    given = {k: v for k, v in (("timesteps", body.timesteps), ("sigmas", body.sigmas))
             if v is not None}
    if body.schedule == "ays":
        ays = caps.ays
        if ays is None:
            raise APIError(400, "this model has no Align Your Steps schedule", "schedule",
                           "unsupported_value")
        given["timesteps"] = list(ays)
    if not given:
        return None
    field = next(iter(given))
    if len(given) > 1:
        raise APIError(400, "give one of timesteps, sigmas or schedule", field,
                       "invalid_value")
    problem = caps.schedule_error(sampler, field, list(given[field]))
    if problem:
        raise APIError(400, problem, field, "unsupported_value")
    return ((field, tuple(given[field])),)


def require_ready(rt: Runtime) -> None:
    if rt.draining:  # not even work the result cache could answer: the drain must end
        raise APIError(503, "the server is shutting down; retry on another replica", None,
                       "shutting_down")
    if not rt.ready or not rt.models:
        message = f"model failed to load: {rt.error}" if rt.error else "model is loading"
        raise APIError(503, message, None, "not_ready", {"Retry-After": "5"})
    down = rt.backend_error()
    if down:
        raise backend_down(down)


def submit(rt: Runtime, served: Served, params: GenerationParams,
           seeded: bool = False) -> Submission:
    """Queue the request, or answer it from the exact result cache (seeded requests)."""
    require_ready(rt)
    # auto's images depend on the plan the load picks: never answered from the cache
    cacheable = seeded and rt.results.max_bytes and not params.ladder
    key = result_key(served.info, params) if cacheable else None
    _, h, w = served.info.image_shape
    tokens = h * w // 16  # usage: one output token per 4x4 pixels
    if key is not None:
        images = rt.results.get(key)
        rt.metrics.result_cache.labels("hit" if images is not None else "miss").inc()
        if images is not None:
            handle = Handle(new_request_id(), params)
            handle.events.put_nowait(Completed(handle.id, images, params.steps))
            return Submission(handle, key, tokens, from_cache=True)
    try:
        handle = served.loop.submit(params)
    except (QueueFull, ShuttingDown, BackendUnavailable, DeadlineUnreachable,
            ValueError) as exc:
        if isinstance(exc, QueueFull | DeadlineUnreachable):
            rt.metrics.requests.labels("rejected").inc()
            if isinstance(exc, DeadlineUnreachable) or exc.deadline:
                rt.metrics.deadline_refused.labels(
                    "unreachable" if isinstance(exc, DeadlineUnreachable) else "late").inc()
            rt.metrics.tenant_requests.labels(tenant_label(params.tenant), "rejected").inc()
        raise submit_error(exc, rt.settings.retry_after_s) from exc
    return Submission(handle, key, tokens)


async def encode_all(images: np.ndarray, spec: OutputSpec) -> list[bytes]:
    return await asyncio.to_thread(lambda: [encode_image(im, spec.output_format,
                                                         spec.compression, spec.upscale)
                                            for im in images])


async def image_data(rt: Runtime, request: Request, images: np.ndarray,
                     spec: OutputSpec) -> list[ImageData]:
    encoded = await encode_all(images, spec)
    if spec.response_format == "b64_json":
        return [ImageData(b64_json=b64(e)) for e in encoded]
    base = public_base(rt, request)
    owner, quota = owner_of(request), quota_of(request)
    keys = [rt.store.put(e, CONTENT_TYPES[spec.output_format], spec.output_format,
                         owner, quota) for e in encoded]
    return [ImageData(url=f"{base}/v1/images/files/{k}") for k in keys]


def public_base(rt: Runtime, request: Request) -> str:
    """Where url results are fetched: the configured public URL, else the request's own
    base if its Host is trusted, else a root-relative path (never an attacker's Host)."""
    s = rt.settings
    if s.public_base_url:
        return s.public_base_url.rstrip("/")
    if request.url.hostname in s.allowed_hosts or request.url.hostname == s.host:
        return str(request.base_url).rstrip("/")
    return ""


def record_end(rt: Runtime, sub: Submission, event: Event | None) -> None:
    if isinstance(event, Completed) and sub.result_key is not None and not sub.from_cache:
        rt.results.put(sub.result_key, event.images)
    reason = event.reason if isinstance(event, Failed) else None
    status = ("ok" if isinstance(event, Completed)
              else "cancelled" if event is None or reason is FinishReason.CANCELLED
              else "timeout" if reason is FinishReason.TIMEOUT else "error")
    rt.metrics.requests.labels(status).inc()
    rt.metrics.tenant_requests.labels(tenant_label(sub.params.tenant), status).inc()
    if isinstance(event, Completed):
        rt.metrics.latency.observe(time.monotonic() - sub.handle.submitted_at)
        rt.metrics.images.inc(len(event.images))


async def next_final(handle: Handle, request: Request) -> Event | None:
    """The request's final event, or None if the client went away first."""
    while True:
        try:
            event = await asyncio.wait_for(handle.events.get(), timeout=0.25)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                return None
            continue
        if not isinstance(event, Preview):
            return event


@router.post("/v1/images/generations", response_model=None, responses={
    200: {"model": ImagesResponse, "description": "The images; with `stream`, Server-Sent "
          "Events (docs/openai-api.md)", "content": {"text/event-stream": {}}},
    **error_responses(400, 404, 409, 413, 429, 500, 503, 504,
                      e404="The model is not served here")})
async def generate(body: ImageGenerationRequest, request: Request) -> Response:
    rt = runtime_of(request)
    require_ready(rt)
    served, params, spec = resolve(body, rt)
    params = dataclasses.replace(params, tenant=quota_of(request))
    return await answer(rt, request, served, params, spec, body, "image_generation")


async def answer(rt: Runtime, request: Request, served: Served, params: GenerationParams,
                 spec: OutputSpec, body: ImageGenerationRequest, kind: str) -> Response:
    """Run a resolved request and answer it, plain or streamed (`kind` names the SSE
    events: image_generation or image_edit)."""
    sub = submit(rt, served, params, seeded=body.seed is not None)
    if body.stream:
        return EventSourceResponse(stream(rt, request, sub, spec, body, kind),
                                   ping=15, send_timeout=30)
    event: Event | None = None
    try:
        event = await next_final(sub.handle, request)
    finally:
        if event is None:
            sub.handle.cancel()
        record_end(rt, sub, event)
    if event is None:
        return Response(status_code=499)
    if isinstance(event, Failed):
        return JSONResponse(failure_body(event), status_code=failure_http(event)[0])
    assert isinstance(event, Completed)
    data = await image_data(rt, request, event.images, spec)
    out = ImagesResponse(created=int(time.time()), data=data, background="opaque",
                         output_format=spec.output_format, quality=body.quality or "auto",
                         size=spec.size,
                         usage=usage_for(params.prompt, params.n, sub.image_tokens),
                         stepserve=ran(params, event, spec.warnings))
    return JSONResponse(out.model_dump(exclude_none=True))


async def stream(rt: Runtime, request: Request, sub: Submission, spec: OutputSpec,
                 body: ImageGenerationRequest, kind: str = "image_generation"
                 ) -> AsyncIterator[dict]:
    """SSE events: partial images (real x0 previews) then completed (or an error)."""
    common = {"background": "opaque", "output_format": spec.output_format,
              "quality": body.quality or "auto", "size": spec.size}
    final: Event | None = None
    handle = sub.handle
    try:
        while True:
            event = await handle.events.get()
            if isinstance(event, Preview):
                for i, data in enumerate(await encode_all(event.images, spec)):
                    payload = {"type": f"{kind}.partial_image", "b64_json": b64(data),
                               "created_at": int(time.time()),
                               "partial_image_index": event.index, "image_index": i,
                               "step": event.step, "total_steps": handle.params.steps,
                               **common}
                    yield {"event": payload["type"], "data": json.dumps(payload)}
                continue
            final = event
            break
        if isinstance(final, Failed):
            err = failure_body(final)
            yield {"event": "error", "data": json.dumps({"type": "error", **err})}
            return
        assert isinstance(final, Completed)
        usage = usage_for(handle.params.prompt, handle.params.n,
                          sub.image_tokens).model_dump()
        for i, data in enumerate(await encode_all(final.images, spec)):
            payload = {"type": f"{kind}.completed", "b64_json": b64(data),
                       "created_at": int(time.time()), "image_index": i, "usage": usage,
                       "stepserve": ran(handle.params, final, spec.warnings), **common}
            yield {"event": payload["type"], "data": json.dumps(payload)}
    finally:
        if final is None:  # client disconnected mid-stream
            handle.cancel()
        record_end(rt, sub, final)
