"""``/metrics``: every request counted by endpoint and status, the client's counters read."""

from __future__ import annotations

import httpx

from stages.gateway import GatewayMetrics
from tests.unit.stages.gateway.fakes import AUTH, chat


async def test_requests_and_the_client_are_counted(http: httpx.AsyncClient) -> None:
    await http.post("/v1/chat/completions", json=chat(), headers=AUTH)
    await http.get("/v1/nothing-here", headers=AUTH)
    text = (await http.get("/metrics")).text
    assert 'sluice_gateway_requests_total{endpoint="/v1/chat/completions",status="200"} 1.0' in (
        text
    )
    assert 'sluice_gateway_requests_total{endpoint="other",status="404"} 1.0' in text
    for name in (
        "sluice_gateway_request_seconds_bucket",
        "sluice_gateway_in_flight_requests",
        "sluice_gateway_ready 1.0",
        "sluice_gateway_published_total 1.0",
        'sluice_gateway_answers_total{outcome="duplicate"}',
        "sluice_gateway_timeouts_total",
    ):
        assert name in text


def test_the_endpoint_label_is_a_fixed_set() -> None:
    assert GatewayMetrics.endpoint("/v1/chat/completions") == "/v1/chat/completions"
    assert GatewayMetrics.endpoint("/v1/models/anything") == "/v1/models/{model}"
    assert GatewayMetrics.endpoint("/v1/chat/completions/x") == "other"
    assert GatewayMetrics.endpoint("/favicon.ico") == "other"
