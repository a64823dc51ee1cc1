"""Errors in the OpenAI shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .protocol import ErrorResponse
from .scheduler.backend import (
    BackendUnavailable,
    DeadlineUnreachable,
    QueueFull,
    ShuttingDown,
)
from .scheduler.events import Failed, FinishReason

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          408: "timeout_error", 429: "rate_limit_error", 503: "server_unavailable"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None) -> dict:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None
                   ) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status,
                        headers=headers)


def response_of(exc: APIError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)


async def api_error_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return response_of(exc)


SHOWN = 64  # most characters of a client's value that an error message repeats


def shown(value: str, limit: int = SHOWN) -> str:
    """A client-supplied value as an error message may echo it: cut past `limit`."""
    return value if len(value) <= limit else value[:limit] + "..."


def _field_path(err: Any, body: Any) -> list[str]:
    """Where an error is, as the client wrote it: pydantic's union-member tags ('str',
    'dict[str,...]') are left out by following the request body itself."""
    loc = list(err.get("loc", ()))
    if loc and loc[0] in ("query", "path", "header", "cookie"):
        return [str(p) for p in loc[1:2]]
    parts = loc[1:] if loc[:1] == ["body"] else loc
    path, node = [], body
    for i, part in enumerate(parts):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        elif not (i == len(parts) - 1 and err.get("type") == "missing"):
            continue  # a union member's tag, not the client's field
        path.append(str(part))
    return path


def _either(messages: list[str]) -> str:
    lead = "Input should be "
    if len(messages) > 1 and all(m.startswith(lead) for m in messages):
        return lead + " or ".join(m[len(lead):] for m in messages)
    return "; ".join(messages)


async def validation_error_handler(_: Request, exc: Exception) -> JSONResponse:
    """Pydantic's errors as one 400: the first field at fault, by the name the client
    used (`cache`, never `cache.str`), and of its errors the deepest (a union value
    names the member it came closest to)."""
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    if not errors or errors[0].get("type") == "json_invalid":
        return error_response(400, "request body is not valid JSON" if errors
                              else "invalid request", None, "invalid_value")
    paths = [_field_path(e, exc.body) for e in errors]
    same = [i for i, p in enumerate(paths) if p[:1] == paths[0][:1]]
    best = max(same, key=lambda i: len(paths[i]))
    messages = list(dict.fromkeys(str(errors[i].get("msg")).removeprefix("Value error, ")
                                  for i in same if paths[i] == paths[best]))
    param = shown(".".join(paths[best])) or None
    if errors[best].get("type") == "extra_forbidden":
        message = f"unknown field {param!r}"
    elif tuple(errors[best].get("loc", ())) == ("body",):  # no body, or not an object
        message = "the request body must be a JSON object (Content-Type: application/json)"
    else:
        message = f"{param}: {_either(messages)}" if param else _either(messages)
    return error_response(400, message, param, "invalid_value")


async def http_error_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return error_response(exc.status_code, str(exc.detail), None, None,
                          dict(exc.headers or {}))


BACKEND_DOWN = "the job queue is unavailable; retry shortly"

# The one table that turns a scheduler outcome into an HTTP status and error code.
FINISH_HTTP: dict[FinishReason, tuple[int, str]] = {
    FinishReason.CANCELLED: (409, "cancelled"),
    FinishReason.TIMEOUT: (504, "timeout"),
    FinishReason.REJECTED: (429, "queue_full"),
    FinishReason.INVALID: (400, "invalid_value"),
    FinishReason.ERROR: (500, "engine_error"),
    FinishReason.UNAVAILABLE: (503, "backend_unavailable"),
}


def failure_http(event: Failed) -> tuple[int, str]:
    """(HTTP status, error code) for a request that ended without images."""
    status, code = FINISH_HTTP[event.reason]
    return status, event.code or code


def failure_body(event: Failed) -> dict:
    status, code = failure_http(event)
    return error_body(status, event.message, None, code)


def backend_down(message: str) -> APIError:
    """The job backend is down (a Redis restart, the network): a 503 the client can
    retry, not a 500."""
    return APIError(503, message, None, "backend_unavailable", {"Retry-After": "2"})


def submit_error(exc: Exception, retry_after_s: int) -> APIError:
    """A backend's refusal at submit time, as the API answers it."""
    if isinstance(exc, QueueFull):
        wait = retry_after_s if exc.retry_after is None else math.ceil(exc.retry_after)
        return APIError(429, str(exc), None, "queue_full", {"Retry-After": str(wait)})
    if isinstance(exc, ShuttingDown):
        return APIError(503, str(exc), None, "shutting_down")
    if isinstance(exc, DeadlineUnreachable):
        return APIError(504, str(exc), "timeout", "deadline_unreachable")
    if isinstance(exc, BackendUnavailable):
        return backend_down(str(exc))
    return APIError(400, str(exc), "n", "invalid_value")


async def backend_error_handler(_: Request, exc: Exception) -> JSONResponse:
    return response_of(backend_down(str(exc) or BACKEND_DOWN))


# What each error status means, for /openapi.json (routes list theirs with `responses=`)
STATUS_MEANING = {
    400: "Invalid request: `param` names the field at fault",
    401: "Missing or unknown API key (only when the server has API keys)",
    404: "Not found",
    409: "Conflict: the request or job was cancelled, or the job has already ended",
    413: "Request body too large (setting max_body_mb)",
    429: "Queue full, or a rate limit; retry after `Retry-After` seconds",
    500: "The engine failed on this request",
    503: "Not ready, shutting down, or the job backend is unavailable; `Retry-After`",
    504: "The request's `timeout` passed before it finished, or cannot be met (refused "
         "at once, or dropped once unreachable)",
}


def error_responses(*statuses: int, **meaning: str) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries of a route: each status with the error body's model;
    `meaning` overrides a description (`e404="no such model"`)."""
    return {status: {"model": ErrorResponse,
                     "description": meaning.get(f"e{status}", STATUS_MEANING[status])}
            for status in statuses}


def document_errors(app: FastAPI, guards: Callable[[str], bool] | None = None,
                    limiter_503: bool = False) -> None:
    """Make /openapi.json say what the server answers: no 422 (a bad request is a 400,
    which each route lists), and with API keys 401 and 429 (too many failed keys, or
    the key's rate limit; `limiter_503`: also 503, a shared limiter being down) on every
    route `guards` names."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = original()
        extra = (401, 429, 503) if limiter_503 else (401, 429)
        for path, operations in schema.get("paths", {}).items():
            for op in operations.values():
                responses = op.setdefault("responses", {})
                responses.pop("422", None)
                if guards is not None and guards(path):
                    for status in extra:
                        responses.setdefault(str(status), _error_entry(schema, status))
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        if "HTTPValidationError" not in json.dumps(schema.get("paths", {})):
            components.pop("HTTPValidationError", None)
            components.pop("ValidationError", None)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _error_entry(schema: dict[str, Any], status: int) -> dict[str, Any]:
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    if "ErrorResponse" not in components:
        body = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        components["ErrorResponse"] = body
    return {"description": STATUS_MEANING[status], "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
