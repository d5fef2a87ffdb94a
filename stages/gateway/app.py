"""The OpenAI-compatible HTTP gateway: chat completions over Kafka, for any OpenAI client.

``POST /v1/chat/completions`` validates the body, publishes it to the prompts topic through a
``SluiceClient`` (the same answer-waiting mechanism producers use) and answers with the
``chat.completion`` or the error the pipeline sent back. Also ``GET /v1/models`` (the one model
served: the folder name of ``SLUICE_MODEL_PATH``), ``/healthz``, ``/readyz`` and ``/metrics``
(``sluice_gateway_*``, its own registry). The OpenAPI spec is at ``/openapi.json``.

Statuses, each with an OpenAI error body (``{"error": {message, type, param, code}}``):

- 400: invalid request (also FastAPI's 422, rewritten), and every ``invalid_request_error``
  answer from the pipeline (e.g. ``context_length_exceeded``);
- 401: missing or wrong API key (only when ``SLUICE_GATEWAY_API_KEY`` is set; Bearer auth);
- 413: body over ``SLUICE_GATEWAY_MAX_BODY_BYTES``, or prompt over ``SLUICE_MAX_PROMPT_BYTES``;
- 503: circuit open in a stage, or Kafka not reachable; 504: no answer within
  ``SLUICE_REQUEST_TIMEOUT_S``; 500: any other server error answer.

Streaming: the pipeline does not stream tokens. ``stream=true`` is answered as Server-Sent
Events once the whole answer is there: one chunk with the full content, one with the finish
reason (and one with ``usage`` when ``stream_options.include_usage``), then ``[DONE]``. So the
OpenAI SDKs' ``stream=True`` works, but the first token arrives with the last one.

Run: ``python -m stages.gateway`` (uvicorn on ``SLUICE_GATEWAY_HOST:SLUICE_GATEWAY_PORT``).
"""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any, Literal

import orjson
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline.aio import run_async
from pipeline.client import ClientStopped, Prepared, PublishError, SluiceClient, prepare
from pipeline.config import Settings, load_settings
from pipeline.logs import setup_logging
from pipeline.observability.metrics import LATENCY_BUCKETS
from schemas.errors import SchemaError, format_loc
from schemas.messages import (
    INVALID_REQUEST_ERROR,
    SERVER_ERROR,
    ChatCompletion,
    ErrorAnswer,
    PromptMessage,
    decode,
    encode,
)

log = logging.getLogger(__name__)

STAGE = "gateway"
VERSION = "0.1.0"
DESCRIPTION = """OpenAI-compatible chat completions served by Sluice, an LLM pipeline over Kafka.

Every error is an OpenAI error object. **Streaming**: the pipeline does not stream tokens; with
`stream: true` the whole answer comes as one `chat.completion.chunk`, a finish chunk (and a usage
chunk with `stream_options.include_usage`), then `data: [DONE]`.

The `model` field is not checked: the gateway serves the one model of `GET /v1/models`. Any `id`
in the body is replaced: the gateway gives each request its own id (header `x-request-id`)."""
OPERATIONS = ("/v1/chat/completions", "/v1/models", "/healthz", "/readyz", "/metrics")
INT64_MAX = 2**63 - 1
INT32_MAX = 2**31 - 1


# --- request and response models --------------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: bool | None = None


class ChatCompletionRequest(PromptMessage):
    """The body of ``POST /v1/chat/completions``: a prompt, with the gateway's own bounds.

    ``seed`` and ``top_k`` are bounded to what the engine takes (int64, int32).
    """

    seed: int | None = Field(default=None, ge=0, le=INT64_MAX)
    top_k: int | None = Field(default=None, ge=0, le=INT32_MAX)
    id: Any = Field(default=None, description="Ignored: the gateway assigns every request its id.")
    stream_options: StreamOptions | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "sluice"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Probe(BaseModel):
    ok: bool
    detail: str


# --- errors -----------------------------------------------------------------------------------


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


def _too_large(what: str, size: int | None, limit: int) -> OpenAIHTTPError:
    told = f" is {size} bytes;" if size is not None else " is too large;"
    message = f"The {what}{told} the limit is {limit} bytes."
    return OpenAIHTTPError(
        413, ErrorAnswer.build(message, type=INVALID_REQUEST_ERROR, code="request_too_large")
    )


def _validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    parts: list[str] = []
    first_param: str | None = None
    for error in errors:
        loc = [p for p in error.get("loc", ()) if p not in ("body", "query", "path", "header")]
        path = format_loc(loc)
        first_param = first_param or path or None
        parts.append(f"{path}: {error.get('msg', 'invalid')}" if path else error.get("msg", ""))
    return "; ".join(parts)[:500] or "invalid request", first_param


# --- metrics ----------------------------------------------------------------------------------


class GatewayMetrics:
    def __init__(self, client: SluiceClient, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "sluice_gateway_requests_total",
            "HTTP requests answered.",
            ["endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "sluice_gateway_request_seconds",
            "HTTP request to response.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "sluice_gateway_in_flight_requests", "HTTP requests being served.", registry=r
        )
        ready = Gauge("sluice_gateway_ready", "1 when producer and reply consumer run.", registry=r)
        ready.set_function(lambda: 1.0 if client.ready else 0.0)
        r.register(_ClientCollector(client))

    @staticmethod
    def endpoint(path: str) -> str:
        if path in OPERATIONS:
            return path
        return "/v1/models/{model}" if path.startswith("/v1/models/") else "other"


class _ClientCollector(Collector):
    """The reply side's counters, read from the client when scraped."""

    def __init__(self, client: SluiceClient) -> None:
        self.client = client

    def collect(self) -> Iterator[Metric]:
        stats = self.client.router.stats
        published = CounterMetricFamily("sluice_gateway_published", "Prompts published to Kafka.")
        published.add_metric([], self.client.published)
        yield published
        answers = CounterMetricFamily(
            "sluice_gateway_answers",
            "Answer records read, by what became of them.",
            labels=["outcome"],
        )
        for outcome, value in (
            ("delivered", stats.delivered),
            ("duplicate", stats.duplicates),
            ("late", stats.late),
            ("foreign", stats.foreign),
            ("undecodable", stats.undecodable),
        ):
            answers.add_metric([outcome], value)
        yield answers
        timeouts = CounterMetricFamily(
            "sluice_gateway_timeouts", "Requests with no answer within the timeout."
        )
        timeouts.add_metric([], stats.timeouts)
        yield timeouts


class _MetricsMiddleware:
    """Counts and times every HTTP request by endpoint (a fixed label set) and status."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        endpoint = self.metrics.endpoint(scope["path"])
        t0 = time.perf_counter()
        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.in_flight.dec()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
            self.metrics.requests.labels(endpoint, str(status)).inc()


# --- the app ----------------------------------------------------------------------------------

_SSE_EVENT: dict[str, Any] = {
    "description": "One Server-Sent Event (OpenAPI 3.1: the schema of each event).",
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "type": "string",
            "description": "A chat.completion.chunk as JSON, or [DONE] (the last event).",
        },
        "event": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
}
_ERROR_CONTENT = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorAnswer"}}}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    text = {
        400: "Invalid request",
        401: "Missing or wrong API key",
        404: "Not found",
        413: "Body or prompt too large",
        500: "Server error",
        503: "Unavailable (circuit open, or Kafka unreachable)",
        504: "No answer within the request timeout",
    }
    return {s: {"description": text[s], "content": _ERROR_CONTENT} for s in statuses}


def create_app(settings: Settings, client: SluiceClient | None = None) -> FastAPI:
    """The gateway's ASGI app. It starts and stops ``client`` (a new one if None) with itself."""
    backend = client if client is not None else SluiceClient(settings, source=STAGE)
    metrics = GatewayMetrics(backend)
    model_name = settings.model_path.name
    try:
        model_created = int(settings.model_path.stat().st_mtime)
    except OSError:
        model_created = 0
    api_key = settings.gateway_api_key

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await backend.start()
        log.info("gateway ready: model %s, topics under %r", model_name, settings.topic_prefix)
        try:
            yield
        finally:
            await backend.stop()

    bearer = HTTPBearer(auto_error=False, description="The gateway's API key, if it has one.")

    async def authorize(
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer),  # noqa: B008
    ) -> None:
        if api_key is None:
            return
        challenge = {"WWW-Authenticate": "Bearer"}
        if credentials is None:
            message = (
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
            )
            raise OpenAIHTTPError(
                401, ErrorAnswer.build(message, type=INVALID_REQUEST_ERROR), challenge
            )
        given = credentials.credentials.encode()
        if not hmac.compare_digest(given, api_key.get_secret_value().encode()):
            raise OpenAIHTTPError(
                401,
                ErrorAnswer.build(
                    "Incorrect API key provided.",
                    type=INVALID_REQUEST_ERROR,
                    code="invalid_api_key",
                ),
                challenge,
            )

    guarded = [Depends(authorize)] if api_key is not None else []
    auth_errors = (401,) if api_key is not None else ()
    app = FastAPI(
        title="Sluice gateway", version=VERSION, description=DESCRIPTION, lifespan=lifespan
    )
    app.add_middleware(_MetricsMiddleware, metrics=metrics)

    @app.exception_handler(OpenAIHTTPError)
    async def _openai_error(_: Request, exc: OpenAIHTTPError) -> Response:
        return error_response(exc.status, exc.answer, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> Response:
        message, param = _validation_message(list(exc.errors()))
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

    @app.post(
        "/v1/chat/completions",
        dependencies=guarded,
        response_model=ChatCompletion,
        responses={
            200: {
                "description": "The completion (or, with stream=true, Server-Sent Events)",
                "content": {"text/event-stream": {"schema": _SSE_EVENT}},
            },
            **_errors(400, *auth_errors, 413, 500, 503, 504),
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}
                    }
                },
            }
        },
        summary="Create a chat completion",
    )
    async def chat_completions(request: Request) -> Response:
        raw = await _read_body(request, settings.gateway_max_body_bytes)
        try:
            body = decode(ChatCompletionRequest, raw)
        except SchemaError as exc:
            raise OpenAIHTTPError(400, ErrorAnswer.from_schema_error(exc)) from exc
        prepared = prepare(orjson.loads(raw), request_id=str(uuid.uuid4()))
        if len(prepared.value) > settings.max_prompt_bytes:
            raise _too_large("prompt", len(prepared.value), settings.max_prompt_bytes)
        return await _complete(prepared, body)

    async def _complete(prepared: Prepared, body: ChatCompletionRequest) -> Response:
        if not backend.ready:
            raise OpenAIHTTPError(503, _unavailable("the gateway is not connected to Kafka"))
        try:
            reply = await backend.request(prepared)
        except PublishError as exc:
            log.error("gateway: request %s not published: %s", prepared.request_id, exc)
            raise OpenAIHTTPError(503, _unavailable("the prompt could not be queued")) from exc
        except ClientStopped as exc:
            raise OpenAIHTTPError(503, _unavailable("the gateway is shutting down")) from exc
        headers = {"x-request-id": reply.request_id}
        if reply.degraded:
            headers["sluice-degraded"] = "true"
        answer = reply.answer
        if not isinstance(answer, ChatCompletion):
            log.info(
                "gateway: request %s answered %d: %s",
                reply.request_id,
                reply.status,
                answer.error.code or answer.error.type,
            )
            return error_response(reply.status, answer, headers)
        if body.stream:
            usage = body.stream_options is not None and bool(body.stream_options.include_usage)
            headers["cache-control"] = "no-cache"
            return Response(sse_body(answer, usage), 200, headers, "text/event-stream")
        return Response(encode(answer), 200, headers, media_type="application/json")

    @app.get("/v1/models", dependencies=guarded, responses=_errors(*auth_errors))
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_name, created=model_created)])

    @app.get("/v1/models/{model}", dependencies=guarded, responses=_errors(*auth_errors, 404))
    async def retrieve_model(model: str) -> ModelCard:
        if model != model_name:
            message = f"The model '{model}' does not exist"
            raise OpenAIHTTPError(
                404,
                ErrorAnswer.build(message, type=INVALID_REQUEST_ERROR, code="model_not_found"),
            )
        return ModelCard(id=model_name, created=model_created)

    def _probe(ok: bool, detail: str) -> Response:
        body = Probe(ok=ok, detail=detail).model_dump_json()
        return Response(body, 200 if ok else 503, media_type="application/json")

    probe_responses: dict[int | str, dict[str, Any]] = {
        503: {"model": Probe, "description": "Not (yet) able to serve"}
    }

    @app.get("/healthz", response_model=Probe, responses=probe_responses)
    async def healthz() -> Response:
        """Alive: the reply consumer has polled Kafka recently."""
        return _probe(*backend.healthy())

    @app.get("/readyz", response_model=Probe, responses=probe_responses)
    async def readyz() -> Response:
        """Ready: the Kafka producer and the reply consumer are started."""
        ok = backend.ready
        return _probe(ok, "producer and reply consumer started" if ok else "starting")

    @app.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    async def prometheus_metrics() -> Response:
        """Prometheus text format (``sluice_gateway_*``)."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            request_schema = ChatCompletionRequest.model_json_schema(
                ref_template="#/components/schemas/{model}"
            )
            schemas = spec.setdefault("components", {}).setdefault("schemas", {})
            schemas.update(request_schema.pop("$defs", {}))
            schemas["ChatCompletionRequest"] = request_schema
            schemas.setdefault(
                "ErrorAnswer",
                ErrorAnswer.model_json_schema(ref_template="#/components/schemas/{model}"),
            )
            schemas.update(schemas["ErrorAnswer"].pop("$defs", {}))
            _validation_errors_are_400(spec)
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.state.client = backend
    app.state.metrics = metrics
    return app


def _validation_errors_are_400(spec: dict[str, Any]) -> None:
    """FastAPI documents its 422; this gateway answers validation errors with an OpenAI 400."""
    for operations in spec.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.get("responses", {})
            if responses.pop("422", None) is not None:
                responses.setdefault("400", _errors(400)[400])
    schemas = spec.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it is known to be over ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large("request body", int(declared), limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large("request body", None, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _unavailable(why: str) -> ErrorAnswer:
    return ErrorAnswer.build(
        f"The service is temporarily unavailable: {why}. Retry later.",
        type=SERVER_ERROR,
        code="service_unavailable",
    )


def sse_body(answer: ChatCompletion, include_usage: bool = False) -> bytes:
    """A completion as OpenAI's stream: content chunk, finish chunk, [usage chunk], [DONE]."""
    choice = answer.choices[0]
    base = {
        "id": answer.id,
        "object": "chat.completion.chunk",
        "created": answer.created,
        "model": answer.model,
        "system_fingerprint": answer.system_fingerprint,
    }

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return b"data: " + orjson.dumps({**base, "choices": choices, **extra}) + b"\n\n"

    delta = {"role": "assistant", "content": choice.message.content}
    parts = [
        chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]),
        chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": choice.finish_reason}]),
    ]
    if include_usage:
        parts.append(chunk([], usage=answer.usage.model_dump(mode="json")))
    parts.append(b"data: [DONE]\n\n")
    return b"".join(parts)


# --- running it -------------------------------------------------------------------------------


async def serve(settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT; uvicorn finishes in-flight requests, then the client stops."""
    config = uvicorn.Config(
        create_app(settings),
        host=settings.gateway_host,
        port=settings.gateway_port,
        log_config=None,
        access_log=False,
        lifespan="on",
        backlog=4096,
        timeout_graceful_shutdown=int(settings.shutdown_deadline_s),
    )
    server = uvicorn.Server(config)
    await server.serve()
    if not server.started:
        raise SystemExit(3)  # start-up failed (Kafka, topics, port); uvicorn logged why


def run_gateway(settings: Settings) -> None:
    """What ``sluice run gateway`` runs."""
    run_async(serve(settings))


def main() -> None:
    setup_logging()
    run_gateway(load_settings())
