"""Every refusal and failure is an OpenAI error object with the status an OpenAI client expects."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from schemas.messages import ErrorAnswer
from stages.gateway.errors import too_large, validation_message
from tests.unit.stages.gateway.fakes import AUTH, MakeHttp, assert_openai_error, chat, failing


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
    make_http: MakeHttp, body: dict[str, Any], param: str
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


async def test_fastapi_validation_errors_become_openai_400s(make_http: MakeHttp) -> None:
    client, _, app = make_http()

    async def typed(number: int) -> dict[str, int]:
        return {"n": number}

    app.add_api_route("/test/{number}", typed, methods=["GET"])

    async with client:
        response = await client.get("/test/abc")
    error = assert_openai_error(response, 400, "invalid_request_error")
    assert error["param"] == "number"


async def test_an_unexpected_exception_is_an_openai_500(make_http: MakeHttp) -> None:
    _, _, app = make_http()

    async def broken() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/test/broken", broken, methods=["GET"])
    # Starlette answers with the handler's response, then re-raises for the server to log.
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        response = await client.get("/test/broken")
    error = assert_openai_error(response, 500, "server_error")
    assert "a bug" not in error["message"]


async def test_a_body_over_the_limit_is_413_before_parsing(make_http: MakeHttp) -> None:
    client, fake, _ = make_http(gateway_max_body_bytes=2048)
    async with client:
        response = await client.post("/v1/chat/completions", json=chat("x" * 4000), headers=AUTH)
    error = assert_openai_error(response, 413, "invalid_request_error")
    assert "2048" in error["message"]
    assert fake.bodies == []


async def test_a_chunked_body_over_the_limit_is_413(make_http: MakeHttp) -> None:
    client, _, _ = make_http(gateway_max_body_bytes=2048)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b" " * 1000

    async with client:
        response = await client.post("/v1/chat/completions", content=chunks(), headers=AUTH)
    assert_openai_error(response, 413, "invalid_request_error")


async def test_a_prompt_over_the_prompt_limit_is_413(make_http: MakeHttp) -> None:
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
    make_http: MakeHttp, answer: ErrorAnswer, status: int, type_: str
) -> None:
    client, _, _ = make_http(failing(answer, degraded=True))
    async with client:
        response = await client.post("/v1/chat/completions", json=chat(), headers=AUTH)
    error = assert_openai_error(response, status, type_)
    assert error == answer.error.model_dump()
    assert response.headers["sluice-degraded"] == "true"
    assert response.headers["x-request-id"]


async def test_unknown_urls_and_methods_get_openai_errors(http: httpx.AsyncClient) -> None:
    response = await http.get("/v1/nothing-here", headers=AUTH)
    error = assert_openai_error(response, 404, "invalid_request_error")
    assert error["message"] == "Invalid URL (GET /v1/nothing-here)"
    response = await http.get("/v1/chat/completions", headers=AUTH)
    assert_openai_error(response, 405, "invalid_request_error")


def test_a_validation_message_names_every_error_and_the_first_param() -> None:
    errors: list[dict[str, Any]] = [
        {"loc": ("body", "messages", 0, "role"), "msg": "bad role"},
        {"loc": ("query", "limit"), "msg": "not a number"},
        {"loc": ("body",), "msg": "whole body"},
    ]
    message, param = validation_message(errors)
    assert message == "messages[0].role: bad role; limit: not a number; whole body"
    assert param == "messages[0].role"
    assert validation_message([]) == ("invalid request", None)


def test_too_large_says_the_size_when_it_is_known() -> None:
    known, unknown = too_large("prompt", 3000, 1024), too_large("request body", None, 1024)
    assert known.status == unknown.status == 413
    assert known.answer.error.message == "The prompt is 3000 bytes; the limit is 1024 bytes."
    assert unknown.answer.error.message == "The request body is too large; the limit is 1024 bytes."
    assert known.answer.error.code == "request_too_large"
