"""``stream=true``: the answer as OpenAI's stream of ``chat.completion.chunk`` events."""

from __future__ import annotations

import httpx
import orjson

from schemas.messages import ChatCompletion, Usage
from stages.gateway import sse_body
from stages.gateway.sse import DONE, sse_event
from tests.unit.stages.gateway.fakes import AUTH, chat


def events(body: str) -> list[str]:
    return [line.removeprefix("data: ") for line in body.split("\n\n") if line]


async def test_stream_true_is_one_chunk_a_finish_chunk_and_done(http: httpx.AsyncClient) -> None:
    response = await http.post(
        "/v1/chat/completions",
        json=chat(stream=True, stream_options={"include_usage": True}),
        headers=AUTH,
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    sent = events(response.text)
    assert sent[-1] == "[DONE]"
    chunks = [orjson.loads(e) for e in sent[:-1]]
    assert [c["object"] for c in chunks] == ["chat.completion.chunk"] * 3
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "HELLO"}
    assert chunks[1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[2]["choices"] == [] and chunks[2]["usage"]["total_tokens"] == 7


async def test_stream_without_include_usage_has_no_usage_chunk(http: httpx.AsyncClient) -> None:
    response = await http.post("/v1/chat/completions", json=chat(stream=True), headers=AUTH)
    chunks = [orjson.loads(e) for e in events(response.text)[:-1]]
    assert len(chunks) == 2
    assert all("usage" not in c for c in chunks)


def test_sse_without_usage_has_no_usage_chunk() -> None:
    answer = ChatCompletion.build(
        id="c", model="m", content="x", finish_reason="length", usage=Usage.of(1, 1)
    )
    body = sse_body(answer)
    assert body.count(b"data: ") == 3
    assert body.endswith(DONE)
    finish = orjson.loads(events(body.decode())[1])
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
