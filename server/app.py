"""The FastAPI application: health, readiness, models, metrics, files, playground."""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from .auth import Auth, AuthMiddleware, owner_of
from .drain import ActiveResponses
from .edits import router as edits_router
from .errors import (
    APIError,
    api_error_handler,
    backend_down,
    backend_error_handler,
    document_errors,
    error_response,
    error_responses,
    http_error_handler,
    response_of,
    validation_error_handler,
)
from .generation import router as generation_router
from .jobs import router as jobs_router
from .limits import (
    BodyLimitMiddleware,
    BodyTimeout,
    BodyTooLarge,
    body_timeout_handler,
    body_too_large_handler,
)
from .loras import router as loras_router
from .runtime import EngineBuilder, Runtime, build_engine
from .scheduler.backend import BackendUnavailable
from .settings import Settings

PLAYGROUND = Path(__file__).resolve().parent / "static" / "playground.html"
IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp")  # what url results are served as


def create_app(settings: Settings | None = None, builder: EngineBuilder = build_engine,
               load_in_background: bool = True, runtime: Runtime | None = None) -> FastAPI:
    settings = settings or Settings()
    runtime = runtime or Runtime(settings, builder)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runtime.start(background=load_in_background)
        yield
        await runtime.drain()  # uvicorn has stopped intake; finish what is in flight

    app = FastAPI(title="stepserve", lifespan=lifespan)
    app.state.runtime = runtime
    auth = Auth(settings)
    if auth.enabled:
        app.add_middleware(AuthMiddleware, auth=auth)
    app.add_middleware(ActiveResponses, runtime=runtime)
    app.add_middleware(BodyLimitMiddleware, max_bytes=int(settings.max_body_mb * 2**20),
                       timeout_s=settings.body_timeout_s)

    app.add_exception_handler(APIError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(BackendUnavailable, backend_error_handler)
    app.add_exception_handler(BodyTooLarge, body_too_large_handler)
    app.add_exception_handler(BodyTimeout, body_timeout_handler)
    app.include_router(generation_router)
    app.include_router(edits_router)  # before the jobs router: /v1/jobs/edits is its own
    app.include_router(jobs_router)
    app.include_router(loras_router)
    document_errors(app, auth.guards if auth.enabled else None,
                    limiter_503=auth.buckets is not None and bool(settings.redis_url))
    started = int(time.time())

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready", responses=error_responses(
        503, e503="Not ready: loading, failed to load, or the job backend is unavailable"))
    async def ready() -> Response:
        if runtime.draining:  # take this replica out of the load balancer at once
            return error_response(503, "shutting down: finishing the work in flight", None,
                                  "shutting_down")
        down = runtime.backend_error() if runtime.ready else None
        if down:
            return response_of(backend_down(down))
        if runtime.ready:
            return JSONResponse({"status": "ready", "models": runtime.names()})
        if runtime.error:
            return error_response(503, f"model failed to load: {runtime.error}", None,
                                  "load_failed")
        return error_response(503, "model is loading", None, "not_ready",
                              {"Retry-After": "5"})

    @app.get("/v1/models")
    async def models() -> dict:
        def entry(name: str) -> dict:
            served = runtime.served(name)
            vocab = served.caps.vocabulary if served is not None else None
            # an extension: the words a prompt must use one of (the built-in model)
            return {"id": name, "object": "model", "created": started,
                    "owned_by": "stepserve", **({"vocabulary": list(vocab)} if vocab else {})}

        return {"object": "list", "data": [entry(name) for name in runtime.names()]}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        return Response(generate_latest(runtime.metrics.registry),
                        media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/images/files/{key}", response_class=Response, responses={
        200: {"description": "The image", "content": {t: {} for t in IMAGE_TYPES}},
        **error_responses(404, e404="Image not found or expired")})
    async def image_file(key: str, request: Request) -> Response:
        item = runtime.store.get(key, owner_of(request))
        if item is None:
            raise APIError(404, "image not found or expired", "key", "not_found")
        return Response(item.data, media_type=item.content_type)

    @app.get("/", response_class=HTMLResponse)
    async def playground(_: Request) -> HTMLResponse:
        return HTMLResponse(PLAYGROUND.read_text())

    return app
