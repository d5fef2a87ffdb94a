"""The gateway's routes over a fake client: completions, the model list, probes, Kafka trouble."""

from __future__ import annotations

from typing import Any

import httpx

from pipeline.client import PublishError, Reply
from tests.unit.stages.gateway.fakes import AUTH, MakeHttp, assert_openai_error, chat


async def test_a_completion_is_the_pipeline_answer_with_the_request_id(
    make_http: MakeHttp,
) -> None:
    client, fake, _ = make_http()
    async with client:
        response = await client.post(
            "/v1/chat/completions", json=chat(id="ignored", extra_field=1), headers=AUTH
        )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
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
    assert "sluice-degraded" not in response.headers
    assert body["id"] == f"chatcmpl-{sent['id']}"


async def test_kafka_trouble_is_503(make_http: MakeHttp) -> None:
    def unpublishable(_: dict[str, Any]) -> Reply:
        raise PublishError("broker down")

    client, fake, _ = make_http(unpublishable)
    async with client:
        response = await client.post("/v1/chat/completions", json=chat(), headers=AUTH)
        error = assert_openai_error(response, 503, "server_error")
        assert error["code"] == "service_unavailable"
        fake.up = False
        response = await client.post("/v1/chat/completions", json=chat(), headers=AUTH)
        assert_openai_error(response, 503, "server_error")
        assert (await client.get("/readyz")).status_code == 503
        assert (await client.get("/healthz")).status_code == 503


async def test_models_lists_the_served_model(http: httpx.AsyncClient) -> None:
    response = await http.get("/v1/models", headers=AUTH)
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["cpu-int8"]
    assert (await http.get("/v1/models/cpu-int8", headers=AUTH)).json()["object"] == "model"
    missing = await http.get("/v1/models/gpt-4", headers=AUTH)
    assert assert_openai_error(missing, 404, "invalid_request_error")["code"] == "model_not_found"


async def test_probes_say_whether_the_client_is_up(http: httpx.AsyncClient) -> None:
    assert (await http.get("/healthz")).json() == {"ok": True, "detail": "fake"}
    ready = await http.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"ok": True, "detail": "fake"}


async def test_readyz_goes_red_while_kafka_is_unreachable(make_http: MakeHttp) -> None:
    http, fake, _ = make_http()
    fake.up = False
    async with http:
        ready = await http.get("/readyz")
    assert ready.status_code == 503
    assert ready.json() == {"ok": False, "detail": "Kafka unreachable: fake"}
