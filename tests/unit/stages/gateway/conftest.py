"""Fixtures: the gateway app over a ``FakeClient``, and an HTTP client that calls it in-process."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import SecretStr

from pipeline.client import Reply
from pipeline.config import Settings
from stages.gateway import create_app
from tests.unit.stages.gateway.fakes import KEY, MODEL, FakeClient, MakeHttp, echo


@pytest.fixture
def make_http() -> MakeHttp:
    """``make(answer, **settings)``: an HTTP client, the fake behind the app, and the app."""

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
async def http(make_http: MakeHttp) -> AsyncIterator[httpx.AsyncClient]:
    client, _, _ = make_http()
    async with client:
        yield client
