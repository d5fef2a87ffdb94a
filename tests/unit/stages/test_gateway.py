"""The gateway's HTTP contract (statuses, OpenAI error bodies, SSE, auth, limits), no Kafka."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from fastapi import FastAPI
from pydantic import SecretStr

from pipeline.client import Prepared, Prompt, PublishError, Reply, SluiceClient
from pipeline.config import Settings
from schemas.messages import ChatCompletion, ErrorAnswer, Usage
from stages.gateway import create_app, sse_body

KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = Path("/models/demo/cpu-int8")


class FakeClient(SluiceClient):
    """Answers every request with what ``answer`` returns for its body."""

    def __init__(self, settings: Settings, answer: Callable[[dict[str, Any]], Reply]) -> None:
        super().__init__(settings, source="test")
        self.answer = answer
        self.bodies: list[dict[str, Any]] = []
        self.up = True

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    @property
    def ready(self) -> bool:
        return self.up

    def healthy(self) -> tuple[bool, str]:
        return self.up, "fake"

    async def request(
        self,
        prompt: Prompt | Prepared,
        *,
        request_id: str | None = None,
        timeout_s: float | None = None,
    ) -> Reply:
        assert isinstance(prompt, Prepared)
        body = orjson.loads(prompt.value)
        self.bodies.append(body)
        self.published += 1
        return self.answer(body)


def echo(body: dict[str, Any]) -> Reply:
    content = body["messages"][-1]["content"]
    answer = ChatCompletion.build(
        id=f"chatcmpl-{body['id']}",
        model=body.get("model") or "cpu-int8",
        content=content.upper(),
        finish_reason="stop",
        usage=Usage.of(5, 2),
    )
    return Reply(body["id"], answer, 0.01)


def failing(answer: ErrorAnswer, **kw: Any) -> Callable[[dict[str, Any]], Reply]:
    return lambda body: Reply(body["id"], answer, 0.01, **kw)


def chat(content: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": "cpu-int8", "messages": [{"role": "user", "content": content}], **extra}


@pytest.fixture
def make_http() -> Callable[..., Any]:
    def make(
        answer: Callable[[dict[str, Any]], Reply] = echo, **overrides: Any
    ) -> tuple[httpx.AsyncClient, FakeClient, FastAPI]:
        values: dict[str, Any] = {"model_path": MODEL, "gateway_api_key": SecretStr(KEY)}
        values.update(overrides)
        settings = Settings(**values)
        fake = FakeClient(settings, answer)
        app = create_app(settings, fake)
        transport = httpx.ASGITransport(app=app)
        return httpx.AsyncClient(transport=transport, base_url="http://gw"), fake, app

    return make


@pytest.fixture
async def http(make_http: Callable[..., Any]) -> AsyncIterator[httpx.AsyncClient]:
    client, _, _ = make_http()
    async with client:
        yield client


def assert_openai_error(response: httpx.Response, status: int, type_: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == type_
    error: dict[str, Any] = body["error"]
    return error


async def test_a_completion_is_the_pipeline_answer_with_the_request_id(
    make_http: Callable[..., Any],
) -> None:
    client, fake, _ = make_http()
    async with client:
        response = await client.post(
            "/v1/chat/completions", json=chat(id="ignored", extra_field=1), headers=AUTH
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {
        "role": "assistant",
        "content": "HELLO",
        "refusal": None,
    }
    sent = fake.bodies[0]
    assert sent["id"] != "ignored" and sent["extra_field"] == 1
    assert response.headers["x-request-id"] == sent["id"]
    assert body["id"] == f"chatcmpl-{sent['id']}"


async def test_stream_true_is_one_chunk_a_finish_chunk_and_done(http: httpx.AsyncClient) -> None:
    response = await http.post(
        "/v1/chat/completions",
        json=chat(stream=True, stream_options={"include_usage": True}),
        headers=AUTH,
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert [c["object"] for c in chunks] == ["chat.completion.chunk"] * 3
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "HELLO"}
    assert chunks[1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[2]["choices"] == [] and chunks[2]["usage"]["total_tokens"] == 7


def test_sse_without_usage_has_no_usage_chunk() -> None:
    answer = ChatCompletion.build(
        id="c", model="m", content="x", finish_reason="length", usage=Usage.of(1, 1)
    )
    assert sse_body(answer).count(b"data: ") == 3


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m", "messages": [{"role": "user", "content": "  "}]}, "messages[0].content"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        (chat(temperature=5), "temperature"),
        (chat(n=2), "n"),
        (chat(seed=-1), "seed"),
        (chat(top_k=2**40), "top_k"),
    ],
)
async def test_invalid_bodies_are_openai_400s_naming_the_param(
    make_http: Callable[..., Any], body: dict[str, Any], param: str
) -> None:
    client, fake, _ = make_http()
    async with client:
        response = await client.post("/v1/chat/completions", json=body, headers=AUTH)
    error = assert_openai_error(response, 400, "invalid_request_error")
    assert error["param"] == param
    assert fake.bodies == []  # never published


@pytest.mark.parametrize("raw", [b"", b"{not json", b"[1, 2]", b"\xff\xfe"])
async def test_bodies_that_are_not_json_objects_are_400(
    http: httpx.AsyncClient, raw: bytes
) -> None:
    response = await http.post("/v1/chat/completions", content=raw, headers=AUTH)
    assert_openai_error(response, 400, "invalid_request_error")


async def test_fastapi_validation_errors_become_openai_400s(
    make_http: Callable[..., Any],
) -> None:
    client, _, app = make_http()

    async def typed(number: int) -> dict[str, int]:
        return {"n": number}

    app.add_api_route("/test/{number}", typed, methods=["GET"])

    async with client:
        response = await client.get("/test/abc")
    error = assert_openai_error(response, 400, "invalid_request_error")
    assert error["param"] == "number"


@pytest.mark.parametrize(
    ("headers", "code"),
    [({}, None), ({"Authorization": "Bearer wrong"}, "invalid_api_key")],
)
async def test_a_missing_or_wrong_api_key_is_401(
    http: httpx.AsyncClient, headers: dict[str, str], code: str | None
) -> None:
    for response in (
        await http.post("/v1/chat/completions", json=chat(), headers=headers),
        await http.get("/v1/models", headers=headers),
    ):
        error = assert_openai_error(response, 401, "invalid_request_error")
        assert error["code"] == code
        assert KEY not in response.text
        assert response.headers["www-authenticate"] == "Bearer"


async def test_without_a_configured_key_no_auth_is_needed(make_http: Callable[..., Any]) -> None:
    client, _, _ = make_http(gateway_api_key=None)
    async with client:
        response = await client.post("/v1/chat/completions", json=chat())
    assert response.status_code == 200


async def test_a_body_over_the_limit_is_413_before_parsing(make_http: Callable[..., Any]) -> None:
    client, fake, _ = make_http(gateway_max_body_bytes=2048)
    async with client:
        response = await client.post("/v1/chat/completions", json=chat("x" * 4000), headers=AUTH)
    error = assert_openai_error(response, 413, "invalid_request_error")
    assert "2048" in error["message"]
    assert fake.bodies == []


async def test_a_chunked_body_over_the_limit_is_413(make_http: Callable[..., Any]) -> None:
    client, _, _ = make_http(gateway_max_body_bytes=2048)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b" " * 1000

    async with client:
        response = await client.post("/v1/chat/completions", content=chunks(), headers=AUTH)
    assert_openai_error(response, 413, "invalid_request_error")


async def test_a_prompt_over_the_prompt_limit_is_413(make_http: Callable[..., Any]) -> None:
    client, fake, _ = make_http(max_prompt_bytes=1024)
    async with client:
        response = await client.post("/v1/chat/completions", json=chat("y" * 1500), headers=AUTH)
    assert_openai_error(response, 413, "invalid_request_error")
    assert fake.bodies == []


@pytest.mark.parametrize(
    ("answer", "status", "type_"),
    [
        (ErrorAnswer.context_length_exceeded(300, 256), 400, "invalid_request_error"),
        (ErrorAnswer.circuit_open(), 503, "server_error"),
        (ErrorAnswer.timeout(), 504, "server_error"),
        (ErrorAnswer.server_error(), 500, "server_error"),
    ],
)
async def test_error_answers_map_to_the_status_an_openai_client_expects(
    make_http: Callable[..., Any], answer: ErrorAnswer, status: int, type_: str
) -> None:
    client, _, _ = make_http(failing(answer, degraded=True))
    async with client:
        response = await client.post("/v1/chat/completions", json=chat(), headers=AUTH)
    error = assert_openai_error(response, status, type_)
    assert error == answer.error.model_dump()
    assert response.headers["sluice-degraded"] == "true"


async def test_kafka_trouble_is_503(make_http: Callable[..., Any]) -> None:
    def unpublishable(_: dict[str, Any]) -> Reply:
        raise PublishError("broker down")

    client, fake, _ = make_http(unpublishable)
    async with client:
        response = await client.post("/v1/chat/completions", json=chat(), headers=AUTH)
        assert_openai_error(response, 503, "server_error")
        fake.up = False
        response = await client.post("/v1/chat/completions", json=chat(), headers=AUTH)
        assert_openai_error(response, 503, "server_error")
        assert (await client.get("/readyz")).status_code == 503
        assert (await client.get("/healthz")).status_code == 503


async def test_unknown_urls_and_methods_get_openai_errors(http: httpx.AsyncClient) -> None:
    response = await http.get("/v1/nothing-here", headers=AUTH)
    error = assert_openai_error(response, 404, "invalid_request_error")
    assert error["message"] == "Invalid URL (GET /v1/nothing-here)"
    response = await http.get("/v1/chat/completions", headers=AUTH)
    assert_openai_error(response, 405, "invalid_request_error")


async def test_models_lists_the_served_model(http: httpx.AsyncClient) -> None:
    response = await http.get("/v1/models", headers=AUTH)
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["cpu-int8"]
    assert (await http.get("/v1/models/cpu-int8", headers=AUTH)).json()["object"] == "model"
    missing = await http.get("/v1/models/gpt-4", headers=AUTH)
    assert assert_openai_error(missing, 404, "invalid_request_error")["code"] == "model_not_found"


async def test_probes_and_metrics(http: httpx.AsyncClient) -> None:
    assert (await http.get("/healthz")).json() == {"ok": True, "detail": "fake"}
    assert (await http.get("/readyz")).status_code == 200
    await http.post("/v1/chat/completions", json=chat(), headers=AUTH)
    text = (await http.get("/metrics")).text
    assert 'sluice_gateway_requests_total{endpoint="/v1/chat/completions",status="200"} 1.0' in (
        text
    )
    for name in (
        "sluice_gateway_request_seconds_bucket",
        "sluice_gateway_in_flight_requests",
        "sluice_gateway_ready 1.0",
        "sluice_gateway_published_total 1.0",
        'sluice_gateway_answers_total{outcome="duplicate"}',
        "sluice_gateway_timeouts_total",
    ):
        assert name in text


def test_the_openapi_spec_documents_openai_errors_and_no_422(
    make_http: Callable[..., Any],
) -> None:
    _, _, app = make_http()
    spec = app.openapi()
    post = spec["paths"]["/v1/chat/completions"]["post"]
    assert set(post["responses"]) == {"200", "400", "401", "413", "500", "503", "504"}
    assert "text/event-stream" in post["responses"]["200"]["content"]
    assert "stream" in spec["info"]["description"].lower()
    assert "422" not in orjson.dumps(spec).decode()
    schemas = spec["components"]["schemas"]
    assert {"ChatCompletionRequest", "ChatMessage", "ErrorAnswer", "ChatCompletion"} <= set(schemas)
