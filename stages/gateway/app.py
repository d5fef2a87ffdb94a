"""The OpenAI-compatible HTTP gateway: chat completions over Kafka, for any OpenAI client.

``POST /v1/chat/completions`` validates the body, publishes it to the prompts topic through a
``SluiceClient`` (the same answer-waiting mechanism producers use) and answers with the
``chat.completion`` or the error the pipeline sent back. Also ``GET /v1/models`` (the one model
served: the folder name of ``SLUICE_MODEL_PATH``), ``/healthz``, ``/readyz`` and ``/metrics``
(``sluice_gateway_*``, its own registry). The OpenAPI spec is at ``/openapi.json``.

Each group of routes is a router built here from what it needs; ``create_app`` puts them
together with the error handlers (``errors``), the API key (``auth``), the metrics
(``metrics``) and the corrected OpenAPI document (``openapi``). Every error is an OpenAI error
object; ``errors`` lists the statuses.

Streaming: the pipeline does not stream tokens. ``stream=true`` is answered as Server-Sent
Events (``sse``) once the whole answer is there: one chunk with the full content, one with the
finish reason (and one with ``usage`` when ``stream_options.include_usage``), then ``[DONE]``.
So the OpenAI SDKs' ``stream=True`` works, but the first token arrives with the last one.

Run: ``python -m stages.gateway`` (uvicorn on ``SLUICE_GATEWAY_HOST:SLUICE_GATEWAY_PORT``).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pipeline.aio import run_async
from pipeline.client import ClientStopped, Prepared, PublishError, Reply, SluiceClient, prepare
from pipeline.config import Settings, load_settings
from pipeline.logs import setup_logging
from schemas.errors import SchemaError
from schemas.messages import INVALID_REQUEST_ERROR, ChatCompletion, ErrorAnswer, decode, encode
from stages.gateway.auth import Auth, bearer_auth
from stages.gateway.batches import batch_router
from stages.gateway.bodies import ChatCompletionRequest, ModelCard, ModelList, Probe
from stages.gateway.errors import (
    OpenAIHTTPError,
    error_response,
    install_error_handlers,
    too_large,
    unavailable,
)
from stages.gateway.metrics import GatewayMetrics, MetricsMiddleware
from stages.gateway.openapi import error_responses, install_openapi, json_body
from stages.gateway.sse import MEDIA_TYPE, SSE_EVENT_SCHEMA, Chunks, relay

log = logging.getLogger(__name__)

STAGE = "gateway"
VERSION = "0.1.0"
DESCRIPTION = """OpenAI-compatible chat completions served by Sluice, an LLM pipeline over Kafka.

Every error is an OpenAI error object. **Streaming**: with `stream: true` the answer comes as
`chat.completion.chunk` events as it is generated: the role, the text deltas, a finish chunk (and
a usage chunk with `stream_options.include_usage`), then `data: [DONE]`. Request fields the
server does not implement (`tools`, `response_format`, `logprobs`, ...) are refused (400, with
`param` naming the field).

The `model` field is not checked: the gateway serves the one model of `GET /v1/models`. Any `id`
in the body is replaced: the gateway gives each request its own id (header `x-request-id`)."""


def create_app(settings: Settings, client: SluiceClient | None = None) -> FastAPI:
    """The gateway's ASGI app. It starts and stops ``client`` (a new one if None) with itself."""
    backend = client if client is not None else SluiceClient(settings, source=STAGE)
    metrics = GatewayMetrics(backend)
    auth = bearer_auth(settings.gateway_api_key)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await backend.start()
        log.info(
            "gateway ready: model %s, topics under %r",
            settings.model_path.name,
            settings.topic_prefix,
        )
        try:
            yield
        finally:
            await backend.stop()

    app = FastAPI(
        title="Sluice gateway", version=VERSION, description=DESCRIPTION, lifespan=lifespan
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    install_error_handlers(app)
    app.include_router(chat_router(settings, backend, auth))
    app.include_router(models_router(settings, auth))
    app.include_router(batch_router(settings, auth))
    app.include_router(probes_router(backend, metrics))
    install_openapi(app, [ChatCompletionRequest])
    app.state.client = backend
    app.state.metrics = metrics
    return app


# --- routers ----------------------------------------------------------------------------------


def chat_router(settings: Settings, backend: SluiceClient, auth: Auth) -> APIRouter:
    """``POST /v1/chat/completions``: one prompt published, its answer (or error) returned."""
    router = APIRouter()

    @router.post(
        "/v1/chat/completions",
        dependencies=auth.dependencies,
        response_model=ChatCompletion,
        responses={
            200: {
                "description": "The completion (or, with stream=true, Server-Sent Events)",
                "content": {MEDIA_TYPE: {"schema": SSE_EVENT_SCHEMA}},
            },
            **error_responses(400, *auth.errors, 413, 500, 503, 504),
        },
        openapi_extra=json_body(ChatCompletionRequest),
        summary="Create a chat completion",
    )
    async def chat_completions(request: Request) -> Response:
        raw = await read_body(request, settings.gateway_max_body_bytes)
        try:
            body = decode(ChatCompletionRequest, raw)
        except SchemaError as exc:
            raise OpenAIHTTPError(400, ErrorAnswer.from_schema_error(exc)) from exc
        prepared = prepare(orjson.loads(raw), request_id=str(uuid.uuid4()))
        if len(prepared.value) > settings.max_prompt_bytes:
            raise too_large("prompt", len(prepared.value), settings.max_prompt_bytes)
        if body.stream:
            return await stream_completion(backend, prepared, body, settings.model_path.name)
        return await complete(backend, prepared, body)

    return router


async def complete(
    backend: SluiceClient, prepared: Prepared, body: ChatCompletionRequest
) -> Response:
    """Publish ``prepared``, wait for its answer and answer the HTTP request with it (a
    timeout is 504, and the client has published a cancel for it)."""
    if not backend.ready:
        raise unavailable("the gateway is not connected to Kafka")
    try:
        reply = await backend.request(prepared)
    except PublishError as exc:
        log.error("gateway: request %s not published: %s", prepared.request_id, exc)
        raise unavailable("the prompt could not be queued") from exc
    except ClientStopped as exc:
        raise unavailable("the gateway is shutting down") from exc
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
    return Response(encode(answer), 200, headers, media_type="application/json")


async def stream_completion(
    backend: SluiceClient, prepared: Prepared, body: ChatCompletionRequest, model: str
) -> Response:
    """Publish ``prepared`` as a stream; relay its deltas as Server-Sent Events. An error that
    comes before any delta is answered with its HTTP status instead of a stream."""
    if not backend.ready:
        raise unavailable("the gateway is not connected to Kafka")
    stream = backend.stream(prepared)
    try:
        first = await stream.next_event()
    except PublishError as exc:
        log.error("gateway: request %s not published: %s", prepared.request_id, exc)
        raise unavailable("the prompt could not be queued") from exc
    except BaseException:
        stream.close("gateway error")
        raise
    headers = {"x-request-id": prepared.request_id}
    chunks = Chunks(f"chatcmpl-{prepared.request_id}", body.model or model)
    if isinstance(first, Reply):
        answer = first.answer
        if not isinstance(answer, ChatCompletion):
            log.info(
                "gateway: request %s answered %d: %s",
                first.request_id,
                first.status,
                answer.error.code or answer.error.type,
            )
            return error_response(first.status, answer, headers)
        chunks = Chunks.of(answer)
    headers["cache-control"] = "no-cache"
    return StreamingResponse(
        relay(stream, first, chunks, body.include_usage), 200, headers, media_type=MEDIA_TYPE
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it is known to be over ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large("request body", int(declared), limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large("request body", None, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def models_router(settings: Settings, auth: Auth) -> APIRouter:
    """``GET /v1/models`` and ``/v1/models/{model}``: the one model served."""
    router = APIRouter()
    model_name = settings.model_path.name
    try:
        model_created = int(settings.model_path.stat().st_mtime)
    except OSError:
        model_created = 0

    @router.get(
        "/v1/models", dependencies=auth.dependencies, responses=error_responses(*auth.errors)
    )
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_name, created=model_created)])

    @router.get(
        "/v1/models/{model}",
        dependencies=auth.dependencies,
        responses=error_responses(*auth.errors, 404),
    )
    async def retrieve_model(model: str) -> ModelCard:
        if model != model_name:
            message = f"The model '{model}' does not exist"
            raise OpenAIHTTPError(
                404,
                ErrorAnswer.build(message, type=INVALID_REQUEST_ERROR, code="model_not_found"),
            )
        return ModelCard(id=model_name, created=model_created)

    return router


def probes_router(backend: SluiceClient, metrics: GatewayMetrics) -> APIRouter:
    """``/healthz``, ``/readyz`` and ``/metrics``: open, whatever the API key."""
    router = APIRouter()
    probe_responses: dict[int | str, dict[str, Any]] = {
        503: {"model": Probe, "description": "Not (yet) able to serve"}
    }

    def probe(ok: bool, detail: str) -> Response:
        body = Probe(ok=ok, detail=detail).model_dump_json()
        return Response(body, 200 if ok else 503, media_type="application/json")

    @router.get("/healthz", response_model=Probe, responses=probe_responses)
    async def healthz() -> Response:
        """Alive: the reply consumer has polled Kafka recently."""
        return probe(*backend.healthy())

    @router.get("/readyz", response_model=Probe, responses=probe_responses)
    async def readyz() -> Response:
        """Ready: the Kafka producer and the reply consumer are started and the broker
        answers (red while Kafka is unreachable)."""
        return probe(*backend.readiness())

    @router.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    async def prometheus_metrics() -> Response:
        """Prometheus text format (``sluice_gateway_*``)."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return router


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
