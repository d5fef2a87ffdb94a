"""A gateway without Kafka: a client that answers in-process, and what its tests send."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
from fastapi import FastAPI

from pipeline.client import Prepared, Prompt, Reply, ReplyStream, SluiceClient
from pipeline.client.routing import Event
from pipeline.config import Settings
from schemas.messages import ChatCompletion, ErrorAnswer, Usage
from schemas.streaming import DeltaMessage

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
        self.split: Callable[[str], list[str]] | None = None  # deltas of a streamed answer
        self.cancelled: list[tuple[str, str]] = []

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    @property
    def ready(self) -> bool:
        return self.up

    def healthy(self) -> tuple[bool, str]:
        return self.up, "fake"

    def readiness(self) -> tuple[bool, str]:
        return self.up, "fake" if self.up else "Kafka unreachable: fake"

    def stream(
        self,
        prompt: Prompt | Prepared,
        *,
        request_id: str | None = None,
        timeout_s: float | None = None,
    ) -> ReplyStream:
        assert isinstance(prompt, Prepared)
        body = orjson.loads(prompt.value)
        self.bodies.append(body)
        reply = self.answer(body)
        events: list[Event] = []
        if self.split is not None and isinstance(reply.answer, ChatCompletion):
            parts = self.split(reply.answer.content)
            events = [
                DeltaMessage(id=reply.request_id, index=i, delta=text)
                for i, text in enumerate(parts)
            ]
        return FakeStream(self, prompt, [*events, reply])

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


class FakeStream(ReplyStream):
    """Its events, one by one; closing it early records a cancel on the fake client."""

    def __init__(self, client: FakeClient, prepared: Prepared, events: list[Event]) -> None:
        super().__init__(client, prepared, deadline=float("inf"))
        self.fake = client
        self.pending = events

    async def open(self) -> None:
        return None

    async def next_event(self) -> Event:
        event = self.pending.pop(0) if self.reply is None else self.reply
        if isinstance(event, Reply):
            self.reply = event
        return event

    def close(self, reason: str = "client left") -> None:
        if self.reply is None:
            self.fake.cancelled.append((self.request_id, reason))


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


def assert_openai_error(response: httpx.Response, status: int, type_: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == type_
    error: dict[str, Any] = body["error"]
    return error


MakeHttp = Callable[..., tuple[httpx.AsyncClient, FakeClient, FastAPI]]
"""The ``make_http`` fixture: ``make(answer, **settings)`` -> (HTTP client, fake, app)."""
