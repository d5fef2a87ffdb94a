"""Prompts as they go on the prompts topic, and the refusal of those preprocess would refuse."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from pipeline.client.routing import Reply
from schemas.errors import SchemaError
from schemas.messages import ErrorAnswer, PromptMessage, decode

Prompt = str | Mapping[str, Any] | PromptMessage
"""A user message (text), an OpenAI chat-completions request body, or a ``PromptMessage``."""


@dataclass(frozen=True, slots=True)
class Prepared:
    """A prompt as it goes on the prompts topic."""

    request_id: str
    key: bytes
    value: bytes


def prepare(prompt: Prompt, request_id: str | None = None) -> Prepared:
    """The record for ``prompt``: its body with ``id`` set to the request id.

    The request id is ``request_id`` when given, else the body's own ``id``, else a new uuid4.
    The key is the body's ``conversation_id``, else the request id. The body is not validated
    here (see :func:`refusal`); unknown fields are kept.
    """
    body: dict[str, Any]
    if isinstance(prompt, str):
        body = {"messages": [{"role": "user", "content": prompt}]}
    elif isinstance(prompt, PromptMessage):
        body = prompt.model_dump(mode="json", exclude_none=True)
    else:
        body = dict(prompt)
    own = body.get("id")
    rid = request_id or (own if isinstance(own, str) and own else None) or str(uuid.uuid4())
    body["id"] = rid
    conversation = body.get("conversation_id")
    key = conversation if isinstance(conversation, str) and conversation else rid
    return Prepared(rid, key.encode(), orjson.dumps(body))


def refusal(prepared: Prepared) -> Reply | None:
    """The error reply preprocess would give a prompt that breaks the schema (an unsupported
    field, no messages, ...), made here without publishing it; None for a valid prompt."""
    try:
        decode(PromptMessage, prepared.value)
    except SchemaError as exc:
        return Reply(prepared.request_id, ErrorAnswer.from_schema_error(exc), 0.0)
    return None
