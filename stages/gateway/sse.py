"""Server-Sent Events in OpenAI's stream format: ``chat.completion.chunk`` events, then [DONE].

Each event is ``data: <json>`` and a blank line; the stream ends with ``data: [DONE]``. Today the
whole answer is there before the first event is sent, so ``sse_body`` writes the stream of a
finished completion in one piece; ``sse_event`` and ``DONE`` are the parts a token-by-token
relay writes as deltas arrive.
"""

from __future__ import annotations

from typing import Any, Final

import orjson

from schemas.messages import ChatCompletion

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


def chunk_header(answer: ChatCompletion) -> dict[str, Any]:
    """The fields every ``chat.completion.chunk`` of ``answer``'s stream repeats."""
    return {
        "id": answer.id,
        "object": "chat.completion.chunk",
        "created": answer.created,
        "model": answer.model,
        "system_fingerprint": answer.system_fingerprint,
    }


def sse_body(answer: ChatCompletion, include_usage: bool = False) -> bytes:
    """A completion as OpenAI's stream: content chunk, finish chunk, [usage chunk], [DONE]."""
    choice = answer.choices[0]
    base = chunk_header(answer)

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return sse_event({**base, "choices": choices, **extra})

    delta = {"role": "assistant", "content": choice.message.content}
    parts = [
        chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]),
        chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": choice.finish_reason}]),
    ]
    if include_usage:
        parts.append(chunk([], usage=answer.usage.model_dump(mode="json")))
    parts.append(DONE)
    return b"".join(parts)
