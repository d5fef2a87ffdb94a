"""The API key: Bearer auth on the OpenAI routes when one is configured, none otherwise."""

from __future__ import annotations

import httpx
import pytest

from tests.unit.stages.gateway.fakes import KEY, MakeHttp, assert_openai_error, chat


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
        await http.get("/v1/models/cpu-int8", headers=headers),
    ):
        error = assert_openai_error(response, 401, "invalid_request_error")
        assert error["code"] == code
        assert KEY not in response.text
        assert response.headers["www-authenticate"] == "Bearer"


async def test_probes_and_metrics_need_no_key(http: httpx.AsyncClient) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        assert (await http.get(path)).status_code == 200, path


async def test_without_a_configured_key_no_auth_is_needed(make_http: MakeHttp) -> None:
    client, _, _ = make_http(gateway_api_key=None)
    async with client:
        response = await client.post("/v1/chat/completions", json=chat())
        assert response.status_code == 200
        wrong = {"Authorization": "Bearer anything"}
        assert (await client.get("/v1/models", headers=wrong)).status_code == 200
