"""Every error the gateway answers is an OpenAI error object with the status a client expects.

- 400: invalid request (FastAPI's 422 is rewritten to it), and every ``invalid_request_error``
  answer from the pipeline (e.g. ``context_length_exceeded``);
- 401: missing or wrong API key (see ``stages.gateway.auth``);
- 404 / 405: unknown URL or method;
- 413: body over ``SLUICE_GATEWAY_MAX_BODY_BYTES``, or prompt over ``SLUICE_MAX_PROMPT_BYTES``;
- 503: circuit open in a stage, or Kafka not reachable; 504: no answer within
  ``SLUICE_REQUEST_TIMEOUT_S``; 500: any other server error, answered or raised.

A route raises ``OpenAIHTTPError``; ``install_error_handlers`` turns it, and every error FastAPI
or Starlette raises, into ``{"error": {message, type, param, code}}``.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from schemas.errors import format_loc
from schemas.messages import INVALID_REQUEST_ERROR, SERVER_ERROR, ErrorAnswer, encode

log = logging.getLogger(__name__)


class OpenAIHTTPError(Exception):
    """Answer the HTTP request with ``status`` and an OpenAI error body."""

    def __init__(
        self, status: int, answer: ErrorAnswer, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(answer.error.message)
        self.status = status
        self.answer = answer
        self.headers = headers


def error_response(
    status: int, answer: ErrorAnswer, headers: dict[str, str] | None = None
) -> Response:
    return Response(encode(answer), status, headers, media_type="application/json")


def too_large(what: str, size: int | None, limit: int) -> OpenAIHTTPError:
    """A 413 for ``what`` (its size when known) over ``limit`` bytes."""
    told = f" is {size} bytes;" if size is not None else " is too large;"
    message = f"The {what}{told} the limit is {limit} bytes."
    return OpenAIHTTPError(
        413, ErrorAnswer.build(message, type=INVALID_REQUEST_ERROR, code="request_too_large")
    )


def unavailable(why: str) -> OpenAIHTTPError:
    """A 503 that says ``why`` and asks the client to retry."""
    answer = ErrorAnswer.build(
        f"The service is temporarily unavailable: {why}. Retry later.",
        type=SERVER_ERROR,
        code="service_unavailable",
    )
    return OpenAIHTTPError(503, answer)


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """FastAPI's validation errors as one message, and the first offending parameter."""
    parts: list[str] = []
    first_param: str | None = None
    for error in errors:
        loc = [p for p in error.get("loc", ()) if p not in ("body", "query", "path", "header")]
        path = format_loc(loc)
        first_param = first_param or path or None
        parts.append(f"{path}: {error.get('msg', 'invalid')}" if path else error.get("msg", ""))
    return "; ".join(parts)[:500] or "invalid request", first_param


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error ``app`` meets, raised or refused, with an OpenAI error body."""

    @app.exception_handler(OpenAIHTTPError)
    async def _openai_error(_: Request, exc: OpenAIHTTPError) -> Response:
        return error_response(exc.status, exc.answer, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> Response:
        message, param = validation_message(list(exc.errors()))
        return error_response(400, ErrorAnswer.invalid_request(message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = (
            f"Invalid URL ({request.method} {request.url.path})"
            if exc.status_code == 404
            else str(exc.detail)
        )
        return error_response(
            exc.status_code,
            ErrorAnswer.build(message, type=INVALID_REQUEST_ERROR),
            dict(exc.headers or {}),
        )

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> Response:
        log.error("gateway: %s %s failed", request.method, request.url.path, exc_info=exc)
        return error_response(500, ErrorAnswer.server_error())
