"""``stream=true``: the answer as OpenAI's stream of ``chat.completion.chunk`` events."""

from __future__ import annotations

from typing import Any

import httpx
import orjson

from pipeline.client import Reply
from schemas.messages import ChatCompletion, ErrorAnswer, Usage
from stages.gateway import sse_body
from stages.gateway.sse import DONE, Chunks, relay, sse_event
from tests.unit.stages.gateway.fakes import AUTH, FakeStream, MakeHttp, chat, failing


def events(body: str) -> list[str]:
    return [line.removeprefix("data: ") for line in body.split("\n\n") if line]


def chunks_of(body: str) -> list[dict[str, Any]]:
    sent = events(body)
    assert sent[-1] == "[DONE]"
    return [orjson.loads(e) for e in sent[:-1]]


def deltas(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c["choices"][0]["delta"] for c in chunks if c["choices"]]


async def test_deltas_are_relayed_as_chunks_role_first_finish_and_usage_last(
    make_http: MakeHttp,
) -> None:
    http, fake, _ = make_http()
    fake.split = lambda text: [text[:2], text[2:4], text[4:]]
    async with http:
        response = await http.post(
            "/v1/chat/completions",
            json=chat("hello", stream=True, stream_options={"include_usage": True}),
            headers=AUTH,
        )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    chunks = chunks_of(response.text)
    assert [c["object"] for c in chunks] == ["chat.completion.chunk"] * 6
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["id"] == f"chatcmpl-{response.headers['x-request-id']}"
    assert deltas(chunks) == [
        {"role": "assistant", "content": ""},
        {"content": "HE"},
        {"content": "LL"},
        {"content": "O"},
        {},
    ]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * 4 + ["stop"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 7
    assert fake.cancelled == []


async def test_without_deltas_the_whole_answer_is_one_chunk(http: httpx.AsyncClient) -> None:
    response = await http.post("/v1/chat/completions", json=chat(stream=True), headers=AUTH)
    chunks = chunks_of(response.text)
    assert deltas(chunks) == [{"role": "assistant", "content": ""}, {"content": "HELLO"}, {}]
    assert all("usage" not in c for c in chunks)


async def test_an_error_before_any_delta_is_an_http_error(make_http: MakeHttp) -> None:
    http, _, _ = make_http(failing(ErrorAnswer.timeout()))
    async with http:
        response = await http.post("/v1/chat/completions", json=chat(stream=True), headers=AUTH)
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "timeout"


async def test_an_unsupported_field_is_refused_before_anything_is_published(
    make_http: MakeHttp,
) -> None:
    http, fake, _ = make_http()
    async with http:
        response = await http.post(
            "/v1/chat/completions",
            json=chat(stream=True, response_format={"type": "json_object"}),
            headers=AUTH,
        )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "response_format"
    assert fake.bodies == []


def _stream(fake: Any, events: list[Any]) -> FakeStream:
    from pipeline.client import prepare

    return FakeStream(fake, prepare("hi", "r-1"), events)


async def test_a_client_leaving_mid_stream_cancels_the_request(make_http: MakeHttp) -> None:
    from schemas.streaming import DeltaMessage

    _, fake, _ = make_http()
    first = DeltaMessage(id="r-1", index=0, delta="Hel")
    stream = _stream(fake, [DeltaMessage(id="r-1", index=1, delta="lo")])
    body = relay(stream, first, Chunks("chatcmpl-r-1", "m"), False)
    assert b'"role":"assistant"' in await anext(body)
    assert b'"content":"Hel"' in await anext(body)
    await body.aclose()  # what Starlette does when the HTTP client disconnects
    assert fake.cancelled == [("r-1", "client disconnected")]


async def test_a_timeout_mid_stream_is_an_error_event_and_no_done(make_http: MakeHttp) -> None:
    from schemas.streaming import DeltaMessage

    _, fake, _ = make_http()
    timeout = Reply("r-1", ErrorAnswer.timeout(), 1.0, timed_out=True)
    stream = _stream(fake, [timeout])
    body = relay(stream, DeltaMessage(id="r-1", index=0, delta="x"), Chunks("c", "m"), False)
    sent = b"".join([part async for part in body])
    last = orjson.loads(events(sent.decode())[-1])
    assert last["error"]["code"] == "timeout"
    assert DONE not in sent


def test_deltas_short_of_the_answer_are_completed_by_one_chunk() -> None:
    from stages.gateway.sse import ending

    answer = ChatCompletion.build(
        id="c", model="m", content="Hello", finish_reason="stop", usage=Usage.of(1, 1)
    )
    body = ending(Chunks.of(answer), answer, "Hel", include_usage=False)
    chunks = chunks_of(body.decode())
    assert deltas(chunks) == [{"content": "lo"}, {}]


def test_sse_body_of_a_finished_answer_has_no_usage_chunk_unless_asked() -> None:
    answer = ChatCompletion.build(
        id="c", model="m", content="x", finish_reason="length", usage=Usage.of(1, 1)
    )
    body = sse_body(answer)
    assert body.count(b"data: ") == 4
    assert body.endswith(DONE)
    finish = orjson.loads(events(body.decode())[2])
    assert finish["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "length",
    }


def test_an_event_is_one_data_line_and_a_blank_line() -> None:
    event = sse_event({"text": "two\nlines"})
    assert event == b'data: {"text":"two\\nlines"}\n\n'
    assert event.count(b"\n") == 2  # JSON escapes newlines, so one event stays one line
