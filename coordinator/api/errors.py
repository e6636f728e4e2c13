"""Errors in OpenAI's JSON shape `{"error": {message, type, param, code}}`, for every way a
request can fail: our own refusals, invalid bodies, the engine's limits, and bugs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from cluster.errors import ClusterError, ClusterUnavailable, SpecshardError
from coordinator.api.schema import ErrorBody, ErrorDetail
from coordinator.engine.request import ContextExceeded, QueueFull

RETRY_AFTER_S = "5"  # while the ring is rebuilt: a rebuild takes seconds


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.headers = status, headers
        self.detail = ErrorDetail(message=message, type=type_, param=param, code=code)

    def response(self) -> JSONResponse:
        return JSONResponse(ErrorBody(error=self.detail).model_dump(), self.status,
                            headers=self.headers)


def param_of(errors: list[dict[str, Any]]) -> str | None:
    """The field a validation error is about, as `messages[0].content`.

    A union (`stop: str | list`) reports one error per member, with the member's name
    appended to the location; the common prefix of those locations is the field."""
    first = errors[0]
    if first["type"] == "json_invalid":
        return None
    locs = [e["loc"] for e in errors if e["loc"][:2] == first["loc"][:2]]
    common = []
    for parts in zip(*locs, strict=False):
        if len(set(parts)) > 1:
            break
        common.append(parts[0])
    text = ""
    for part in common[1:]:  # [0] is "body"
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text.lstrip(".") or None


def api_error_of(exc: BaseException) -> ApiError:
    """An engine failure as the client sees it, by cause: its own request (400), the
    ring down or rebuilding (503, retry), the cluster's failure (500), a bug (500)."""
    if isinstance(exc, SpecshardError):
        return ApiError(400, str(exc))
    if isinstance(exc, ClusterUnavailable):
        return ApiError(503, str(exc), "server_error", "unavailable",
                        headers={"Retry-After": RETRY_AFTER_S})
    if isinstance(exc, ClusterError):
        return ApiError(500, str(exc), "server_error", "cluster_error")
    return ApiError(500, "internal error; see the server log", "server_error",
                    "internal_error")


def install_error_handlers(app: FastAPI, count: Callable[[str], None]) -> None:
    """Every error as OpenAI's JSON; `count` tallies the outcome of a refused request."""

    async def api_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return exc.response()

    async def invalid_body(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = list(exc.errors())
        param = param_of(errors)
        message = errors[0]["msg"] if errors else "invalid request"
        count("invalid")
        return ApiError(400, f"{param}: {message}" if param else message,
                        param=param).response()

    async def http_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return ApiError(exc.status_code, str(exc.detail),
                        headers=dict(exc.headers) if exc.headers else None).response()

    async def queue_full(_: Request, exc: Exception) -> Response:
        count("rejected")
        return ApiError(429, str(exc), "rate_limit_error", "rate_limit_exceeded",
                        headers={"Retry-After": "1"}).response()

    async def too_long(request: Request, exc: Exception) -> Response:
        count("invalid")
        param = "messages" if request.url.path.endswith("/chat/completions") else "prompt"
        return ApiError(400, str(exc), code="context_length_exceeded", param=param).response()

    async def invalid(_: Request, exc: Exception) -> Response:
        count("invalid")
        return ApiError(400, str(exc)).response()

    async def cluster_failed(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, ClusterError)
        count("unavailable" if isinstance(exc, ClusterUnavailable) else "error")
        return api_error_of(exc).response()

    async def internal(_: Request, exc: Exception) -> Response:
        count("error")  # Starlette re-raises it after this answer: uvicorn logs it
        return ApiError(500, "internal error; see the server log", "server_error",
                        "internal_error").response()

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, invalid_body)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(QueueFull, queue_full)
    app.add_exception_handler(ContextExceeded, too_long)
    app.add_exception_handler(SpecshardError, invalid)
    app.add_exception_handler(ClusterError, cluster_failed)
    app.add_exception_handler(Exception, internal)
