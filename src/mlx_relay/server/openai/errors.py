"""Errors of the OpenAI-compatible API, in OpenAI's shape.

Every failure under ``/v1`` answers ``{"error": {"message", "type", "param", "code"}}`` with
the status OpenAI uses, whatever raised it: a handler, a dependency (the bearer token), or
FastAPI's body validation (answered 400, not FastAPI's 422). :class:`OpenAIRoute` does the
translation for the routes of one router, so the rest of the app keeps its own error format;
:func:`install_unmatched_errors` does it for requests under ``/v1`` that match no route (an
unknown path, a model id no route pattern takes, a method the path does not have).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.routing import Match

from mlx_relay.core.errors import (
    InvalidRequest,
    PipelineNotReady,
    QueueFull,
    RelayError,
    WorkerUnavailable,
)
from mlx_relay.core.validation import field_path
from mlx_relay.server.openai.responses import ErrorBody, ErrorDetail

logger = logging.getLogger(__name__)

# Seconds a client is asked to wait before retrying a 429 or 503.
RETRY_AFTER_SECONDS = 1

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


class OpenAIError(Exception):
    """An error answered in OpenAI's shape.

    Args:
        status: HTTP status code.
        message: What went wrong, for the user.
        param: The request field at fault, if any.
        code: A machine-readable code (OpenAI's, where one exists).
        error_type: Overrides the type derived from ``status``.
        headers: Extra response headers (``Retry-After``, ``WWW-Authenticate``).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        error_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type or _TYPE_BY_STATUS.get(
            status, "server_error" if status >= 500 else "invalid_request_error"
        )
        self.headers = headers or {}

    def body(self) -> ErrorBody:
        return ErrorBody(
            error=ErrorDetail(
                message=self.message, type=self.error_type, param=self.param, code=self.code
            )
        )

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status, headers=self.headers)


def from_relay_error(exc: RelayError) -> OpenAIError:
    """Translate an error raised by the coordinator into the status a client should see."""
    if isinstance(exc, InvalidRequest):
        return OpenAIError(400, str(exc), param=exc.param, code=exc.code)
    if isinstance(exc, QueueFull):
        return retry_later(429, f"the server is at capacity: {exc}", "queue_full")
    if isinstance(exc, PipelineNotReady):
        return service_unavailable(str(exc))
    if isinstance(exc, WorkerUnavailable):
        return retry_later(503, f"a pipeline stage is unavailable: {exc}", "worker_unavailable")
    logger.error("request failed: %s", exc)
    return OpenAIError(500, f"inference failed: {exc}", error_type="server_error")


def retry_later(status: int, message: str, code: str) -> OpenAIError:
    """A 429 or 503 that asks the client to retry after :data:`RETRY_AFTER_SECONDS`."""
    return OpenAIError(
        status, message, code=code, headers={"Retry-After": str(RETRY_AFTER_SECONDS)}
    )


def service_unavailable(message: str) -> OpenAIError:
    return retry_later(503, f"the model is not ready to serve: {message}", "pipeline_not_ready")


def from_validation_error(exc: RequestValidationError) -> OpenAIError:
    """A body that is not JSON or does not fit the request model -> 400 naming the field."""
    errors: Sequence[Any] = exc.errors()
    if not errors:
        return OpenAIError(400, "invalid request body")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return OpenAIError(400, "the request body is not valid JSON")
    loc = [part for part in first.get("loc", ()) if part != "body"]
    param = field_path(loc) or None
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "missing":
        return OpenAIError(400, f"missing required parameter '{param}'", param=param)
    if not param:
        return OpenAIError(400, f"invalid request body: {message}")
    return OpenAIError(400, f"invalid '{param}': {message}", param=param)


def from_http_exception(exc: HTTPException) -> OpenAIError:
    """Errors raised by shared dependencies (the bearer token, rate limits) in OpenAI's shape."""
    headers = dict(exc.headers or {})
    if exc.status_code == 503:
        return service_unavailable(str(exc.detail))
    if exc.status_code == 401:
        return OpenAIError(
            401,
            "missing or invalid API key: send 'Authorization: Bearer <token>'",
            code="invalid_api_key",
            headers=headers,
        )
    return OpenAIError(exc.status_code, str(exc.detail), headers=headers)


class OpenAIRoute(APIRoute):
    """A route whose every error, including body validation and dependency errors, is
    answered in OpenAI's shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except OpenAIError as exc:
                return exc.response()
            except RequestValidationError as exc:
                return from_validation_error(exc).response()
            except HTTPException as exc:
                return from_http_exception(exc).response()
            except RelayError as exc:
                return from_relay_error(exc).response()
            except Exception:
                # Answer in the API's shape; the traceback goes to the log, not the client.
                logger.exception("unexpected error serving %s", request.url.path)
                return OpenAIError(500, "internal server error").response()

        return handle


# The prefix of the API's paths.
API_PREFIX = "/v1"


def install_unmatched_errors(app: FastAPI) -> None:
    """Answer the HTTP errors of requests under ``/v1`` that no route took (404, 405) in
    OpenAI's shape, as the schema declares; other paths keep FastAPI's ``{"detail"}``. A 405
    names in ``Allow`` every method of the path (Starlette names only its first route's)."""

    async def handle(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        path = request.url.path
        if exc.status_code == 405:
            allow = ", ".join(sorted(_methods_of(request.app, path)))
            exc = HTTPException(405, exc.detail, headers={**(exc.headers or {}), "Allow": allow})
        if path == API_PREFIX or path.startswith(API_PREFIX + "/"):
            return from_http_exception(exc).response()
        return await http_exception_handler(request, exc)

    app.add_exception_handler(HTTPException, handle)


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def _methods_of(app: FastAPI, path: str) -> set[str]:
    """The methods some route of ``app`` takes on ``path``."""
    methods = set()
    for method in _METHODS:
        scope = {"type": "http", "method": method, "path": path, "root_path": "", "headers": []}
        if any(route.matches(scope)[0] == Match.FULL for route in app.router.routes):
            methods.add(method)
    return methods
