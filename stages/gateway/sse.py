"""Server-Sent Events in OpenAI's stream format: ``chat.completion.chunk`` events, then [DONE].

Each event is ``data: <json>`` and a blank line. A stream is, as OpenAI sends it: a first chunk
with the role (``{"role": "assistant", "content": ""}``), a content chunk per text delta as
the pipeline sends them, a chunk with ``finish_reason`` (empty delta), a usage chunk (no
choices) when ``stream_options.include_usage`` is set, then ``data: [DONE]``. An error after
the stream has started (a timeout, a cancelled generation) is one ``data: {"error": ...}``
event, which the OpenAI SDKs raise, and no [DONE].

:func:`relay` writes a request's stream from its ``ReplyStream``; when no delta arrived (an
engine that does not stream, a cached answer) the whole content is one chunk, and when the
deltas fell short of the final answer the rest is one more chunk, so the chunks always join to
the answer's content. :func:`sse_body` writes the stream of a finished completion at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from pipeline.client import Reply, ReplyStream
from schemas.messages import ChatCompletion, ErrorAnswer, encode
from schemas.streaming import DeltaMessage

log = logging.getLogger(__name__)

MEDIA_TYPE: Final = "text/event-stream"
DONE: Final = b"data: [DONE]\n\n"

# One event, as the OpenAPI document describes the ``text/event-stream`` response (3.1 style:
# the schema of each event).
SSE_EVENT_SCHEMA: Final[dict[str, Any]] = {
    "description": "One Server-Sent Event (OpenAPI 3.1: the schema of each event).",
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "type": "string",
            "description": "A chat.completion.chunk as JSON, or [DONE] (the last event).",
        },
        "event": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
}


def sse_event(data: dict[str, Any]) -> bytes:
    """One ``data:`` event carrying ``data`` as JSON."""
    return b"data: " + orjson.dumps(data) + b"\n\n"


@dataclass(slots=True)
class Chunks:
    """The chunks of one request's stream; every chunk repeats ``id``, ``created``, ``model``."""

    id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))
    system_fingerprint: str | None = None

    @classmethod
    def of(cls, answer: ChatCompletion) -> Chunks:
        return cls(answer.id, answer.model, answer.created, answer.system_fingerprint)

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return sse_event(
            {
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "system_fingerprint": self.system_fingerprint,
                "choices": choices,
                **extra,
            }
        )

    def _choice(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        return self._chunk(
            [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
        )

    def role(self) -> bytes:
        return self._choice({"role": "assistant", "content": ""})

    def content(self, text: str) -> bytes:
        return self._choice({"content": text})

    def finish(self, answer: ChatCompletion) -> bytes:
        self.system_fingerprint = answer.system_fingerprint or self.system_fingerprint
        return self._choice({}, answer.choices[0].finish_reason)

    def usage(self, answer: ChatCompletion) -> bytes:
        return self._chunk([], usage=answer.usage.model_dump(mode="json"))


def error_event(answer: ErrorAnswer) -> bytes:
    """An error in the middle of a stream, as OpenAI sends one."""
    return b"data: " + encode(answer) + b"\n\n"


def ending(chunks: Chunks, answer: ChatCompletion, sent: str, include_usage: bool) -> bytes:
    """What follows the deltas once the answer is there: the content the deltas did not carry
    (all of it when there were none), the finish chunk, [usage], [DONE]."""
    content = answer.choices[0].message.content or ""
    parts: list[bytes] = []
    if content.startswith(sent):
        if len(content) > len(sent):
            parts.append(chunks.content(content[len(sent) :]))
    else:
        log.warning(
            "request %s: the streamed deltas (%d chars) are not a prefix of the answer (%d)",
            chunks.id,
            len(sent),
            len(content),
        )
    parts.append(chunks.finish(answer))
    if include_usage:
        parts.append(chunks.usage(answer))
    parts.append(DONE)
    return b"".join(parts)


async def relay(
    stream: ReplyStream,
    first: DeltaMessage | Reply,
    chunks: Chunks,
    include_usage: bool,
) -> AsyncGenerator[bytes, None]:
    """The SSE body of a streamed request whose first event is ``first``. Closing it before
    the answer (the HTTP client went away) cancels the request."""
    sent: list[str] = []
    try:
        yield chunks.role()
        event = first
        while isinstance(event, DeltaMessage):
            if event.delta:
                sent.append(event.delta)
                yield chunks.content(event.delta)
            event = await stream.next_event()
        answer = event.answer
        if isinstance(answer, ChatCompletion):
            yield ending(chunks, answer, "".join(sent), include_usage)
        else:
            log.info(
                "gateway: stream %s ended with %s", stream.request_id, answer.error.code or "error"
            )
            yield error_event(answer)
    finally:
        stream.close("client disconnected")


def sse_body(answer: ChatCompletion, include_usage: bool = False) -> bytes:
    """A finished completion as OpenAI's stream: role, content, finish, [usage], [DONE]."""
    chunks = Chunks.of(answer)
    return chunks.role() + ending(chunks, answer, "", include_usage)
