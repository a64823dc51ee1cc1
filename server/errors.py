"""Errors in the OpenAI shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .scheduler.backend import BackendUnavailable, QueueFull, ShuttingDown
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


async def validation_error_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "extra_forbidden":
        message = f"unknown field {param!r}"
    elif first.get("type") == "json_invalid":
        message, param = "request body is not valid JSON", None
    else:
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
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
        return APIError(429, str(exc), None, "queue_full", {"Retry-After": str(retry_after_s)})
    if isinstance(exc, ShuttingDown):
        return APIError(503, str(exc), None, "shutting_down")
    if isinstance(exc, BackendUnavailable):
        return backend_down(str(exc))
    return APIError(400, str(exc), "n", "invalid_value")


async def backend_error_handler(_: Request, exc: Exception) -> JSONResponse:
    return response_of(backend_down(str(exc) or BACKEND_DOWN))
