"""The four messages that move through Sluice, and their JSON codec.

| topic     | ce_type                                  | model                             |
|-----------|------------------------------------------|-----------------------------------|
| prompts   | `sluice.prompt`                          | `PromptMessage`                   |
| tokenized | `sluice.tokenized`                       | `TokenizedMessage`                |
| generated | `sluice.generated`                       | `GeneratedMessage`                |
| answers   | `sluice.answer` / `sluice.answer.error`  | `ChatCompletion` / `ErrorAnswer`  |

This module holds the request side: the prompt as a client sends it, and what preprocess and
compute make of it (sampling parameters, tokens, timings). The answers and OpenAI's error
objects live in `schemas.answers`, the base model and the codec (`encode`, `decode`) in
`schemas.wire`; every name is also importable from here.
"""

from __future__ import annotations

from typing import Any, ClassVar, Final, Literal, Self

import pydantic
from pydantic import ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import InitErrorDetails, PydanticCustomError

from schemas.answers import (
    CANCELLED,
    CE_ANSWER,
    CE_ANSWER_ERROR,
    CIRCUIT_OPEN,
    CONTEXT_LENGTH_EXCEEDED,
    EXPIRED,
    INVALID_REQUEST_ERROR,
    SERVER_ERROR,
    TIMEOUT,
    AnswerFinishReason,
    AssistantMessage,
    ChatCompletion,
    Choice,
    ErrorAnswer,
    ErrorBody,
    Usage,
    decode_answer,
)
from schemas.errors import SchemaError
from schemas.wire import Message, WireModel, decode, encode

__all__ = [
    "CANCELLED",
    "CE_ANSWER",
    "CE_ANSWER_ERROR",
    "CE_GENERATED",
    "CE_PROMPT",
    "CE_TOKENIZED",
    "CIRCUIT_OPEN",
    "CONTEXT_LENGTH_EXCEEDED",
    "EXPIRED",
    "INVALID_REQUEST_ERROR",
    "MESSAGE_TYPES",
    "SERVER_ERROR",
    "TIMEOUT",
    "AnswerFinishReason",
    "AssistantMessage",
    "ChatCompletion",
    "ChatMessage",
    "Choice",
    "ErrorAnswer",
    "ErrorBody",
    "FinishReason",
    "GeneratedMessage",
    "Message",
    "PromptMessage",
    "Role",
    "SamplingParams",
    "Timings",
    "TokenizedMessage",
    "Usage",
    "WireModel",
    "decode",
    "decode_answer",
    "encode",
    "parse_prompt",
]

CE_PROMPT: Final = "sluice.prompt"
CE_TOKENIZED: Final = "sluice.tokenized"
CE_GENERATED: Final = "sluice.generated"

Role = Literal["system", "user", "assistant", "tool"]
FinishReason = Literal["stop", "length", "error", "content_filter"]
"""Why generation ended; `error` never reaches an answer (it becomes an `ErrorAnswer`)."""


# --- prompts ---------------------------------------------------------------------------------


def _text_of_parts(value: object) -> object:
    """Accept OpenAI's content-part list when every part is text; join the texts with newlines."""
    if not isinstance(value, list):
        return value
    texts: list[str] = []
    for index, part in enumerate(value):
        if not (
            isinstance(part, dict)
            and part.get("type") == "text"
            and isinstance(part.get("text"), str)
        ):
            raise PydanticCustomError(
                "content_part_unsupported",
                "only text content parts are supported (part {index} is not one)",
                {"index": index},
            )
        texts.append(part["text"])
    return "\n".join(texts)


class ChatMessage(WireModel):
    """One chat turn. `content` is text; a list of text parts is joined into one string.

    OpenAI's `developer` role is the `system` role of newer models: it is read as `system`.
    """

    model_config = ConfigDict(extra="ignore", hide_input_in_errors=True)

    role: Role
    content: str
    name: str | None = None

    @field_validator("role", mode="before")
    @classmethod
    def _developer_is_system(cls, value: object) -> object:
        return "system" if value == "developer" else value

    @field_validator("content", mode="before")
    @classmethod
    def _join_text_parts(cls, value: object) -> object:
        return _text_of_parts(value)


# OpenAI request fields Sluice does not implement, and the values that ask for nothing (what
# the SDKs send by default, or an explicit "off"). Any other value is refused, naming the field:
# an answer that silently ignored it would not be the answer the caller asked for.
UNSUPPORTED_PARAMETERS: Final[dict[str, tuple[object, ...]]] = {
    "response_format": (None, {"type": "text"}),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "parallel_tool_calls": (None, True, False),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "frequency_penalty": (None, 0),
    "presence_penalty": (None, 0),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
}


def _refuse_unsupported(value: object, info: ValidationInfo) -> object:
    name = info.field_name or "?"
    for off in UNSUPPORTED_PARAMETERS[name]:
        if value == off and isinstance(value, bool) == isinstance(off, bool):
            return None  # asks for nothing: the same as leaving it out
    raise PydanticCustomError(
        "unsupported_parameter",
        "'{name}' is not supported by this server; leave it out",
        {"name": name},
    )


class PromptMessage(Message):
    """An OpenAI chat-completions request body plus Sluice's `id`, `conversation_id`, `metadata`.

    Fields OpenAI defines that Sluice does not implement (`tools`, `response_format`,
    `logprobs`, penalties, ... see `UNSUPPORTED_PARAMETERS`) are refused, naming the field,
    unless they carry their "off" value; unknown fields are ignored. `n` must be 1. `stop` is
    normalised to a list (a single string becomes a one-item list; empty strings are dropped).
    `top_k` is the common extension OpenAI lacks. `id` and `conversation_id` are optional on
    input: the gateway or preprocess fills them. Validation errors never echo the input (prompt
    text stays out of logs).
    """

    model_config = ConfigDict(extra="ignore", hide_input_in_errors=True)
    ce_type: ClassVar[str] = CE_PROMPT

    model: str | None = Field(default=None, min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0, le=2**31 - 1)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    stop: list[str] | None = Field(default=None, max_length=4)
    n: int | None = None
    stream: bool = False
    user: str | None = None
    id: str | None = Field(default=None, min_length=1, max_length=256)
    conversation_id: str | None = Field(default=None, min_length=1, max_length=256)
    metadata: dict[str, str] | None = None

    # refused unless "off" (kept out of the JSON schema and out of what is published)
    response_format: SkipJsonSchema[Any] = Field(default=None, exclude=True)
    tools: SkipJsonSchema[Any] = Field(default=None, exclude=True)
    tool_choice: SkipJsonSchema[Any] = Field(default=None, exclude=True)
    parallel_tool_calls: SkipJsonSchema[Any] = Field(default=None, exclude=True)
    functions: SkipJsonSchema[Any] = Field(default=None, exclude=True)
    function_call: SkipJsonSchema[Any] = Field(default=None, exclude=True)
    logprobs: SkipJsonSchema[Any] = Field(default=None, exclude=True)
    top_logprobs: SkipJsonSchema[Any] = Field(default=None, exclude=True)
    logit_bias: SkipJsonSchema[Any] = Field(default=None, exclude=True)
    frequency_penalty: SkipJsonSchema[Any] = Field(default=None, exclude=True)
    presence_penalty: SkipJsonSchema[Any] = Field(default=None, exclude=True)
    audio: SkipJsonSchema[Any] = Field(default=None, exclude=True)
    modalities: SkipJsonSchema[Any] = Field(default=None, exclude=True)
    prediction: SkipJsonSchema[Any] = Field(default=None, exclude=True)
    reasoning_effort: SkipJsonSchema[Any] = Field(default=None, exclude=True)
    web_search_options: SkipJsonSchema[Any] = Field(default=None, exclude=True)

    _unsupported = field_validator(*UNSUPPORTED_PARAMETERS, mode="before")(_refuse_unsupported)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("stop", mode="after")
    @classmethod
    def _drop_empty_stops(cls, value: list[str] | None) -> list[str] | None:
        return [s for s in value if s] if value is not None else None

    @field_validator("n", mode="after")
    @classmethod
    def _only_one_choice(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise PydanticCustomError("n_unsupported", "only n=1 is supported")
        return value

    @model_validator(mode="after")
    def _last_user_turn_has_text(self) -> Self:
        for index in range(len(self.messages) - 1, -1, -1):
            turn = self.messages[index]
            if turn.role != "user":
                continue
            if not turn.content.strip():
                raise pydantic.ValidationError.from_exception_data(
                    type(self).__name__,
                    [
                        InitErrorDetails(
                            type=PydanticCustomError(
                                "empty_user_message", "the last user message must not be empty"
                            ),
                            loc=("messages", index, "content"),
                            input="",
                        )
                    ],
                    hide_input=True,
                )
            break
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        """`max_completion_tokens`, else the deprecated `max_tokens`, else None."""
        return self.max_completion_tokens or self.max_tokens


# --- tokenized / generated -------------------------------------------------------------------


class SamplingParams(WireModel):
    """What the engine needs to sample, and what postprocess needs to trim (`stop`)."""

    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0, le=2**31 - 1)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    max_tokens: int | None = Field(default=None, ge=1)
    stop: list[str] = Field(default_factory=list, max_length=4)

    @classmethod
    def from_prompt(cls, prompt: PromptMessage, *, max_tokens: int | None = None) -> Self:
        """Copy the prompt's sampling fields; `max_tokens` overrides the requested limit."""
        return cls(
            temperature=prompt.temperature,
            top_p=prompt.top_p,
            top_k=prompt.top_k,
            seed=prompt.seed,
            max_tokens=max_tokens if max_tokens is not None else prompt.requested_max_tokens,
            stop=list(prompt.stop or []),
        )


class Timings(WireModel):
    """Where a request's time went. `*_at` are unix seconds; `*_s` are durations in seconds.

    Each stage fills its own fields and passes the rest along; the answer carries the whole
    set in the `sluice-timings` header (`encode(timings)`).
    """

    received_at: float | None = None
    preprocess_s: float | None = None
    preprocessed_at: float | None = None
    queue_s: float | None = None
    ttft_s: float | None = None
    compute_s: float | None = None
    generated_at: float | None = None
    postprocess_s: float | None = None
    answered_at: float | None = None


class TokenizedMessage(Message):
    """A prompt after preprocess: the chat template applied and tokenized."""

    ce_type: ClassVar[str] = CE_TOKENIZED

    id: str = Field(min_length=1)
    conversation_id: str = Field(min_length=1)
    model: str = Field(min_length=1)
    input_ids: list[int] = Field(min_length=1)
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    created: int = Field(ge=0, description="unix seconds of the prompt's arrival")
    timings: Timings = Field(default_factory=Timings)


class GeneratedMessage(Message):
    """Compute's output. `output_ids` are every generated token, before stop-string trimming.

    `error` says why when `finish_reason` is `error`; postprocess answers such a message with
    an `ErrorAnswer`.
    """

    ce_type: ClassVar[str] = CE_GENERATED

    id: str = Field(min_length=1)
    conversation_id: str = Field(min_length=1)
    model: str = Field(min_length=1)
    prompt_tokens: int = Field(ge=0)
    output_ids: list[int]
    finish_reason: FinishReason
    usage: Usage
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    created: int = Field(ge=0, description="unix seconds of the prompt's arrival")
    timings: Timings = Field(default_factory=Timings)
    error: str | None = None


MESSAGE_TYPES: Final[dict[str, type[Message]]] = {
    cls.ce_type: cls
    for cls in (PromptMessage, TokenizedMessage, GeneratedMessage, ChatCompletion, ErrorAnswer)
}


def parse_prompt(raw: bytes | None, max_bytes: int) -> PromptMessage:
    """Decode a prompt record value, refusing more than `max_bytes` before parsing it.

    Raises `SchemaError` with reason `oversized`, `bad-json` (not JSON, not UTF-8, empty),
    `schema` (not an object, or a field breaks the schema) or `empty-messages` (no messages,
    or the last user message is blank). `param` names the offending field when there is one.
    """
    if raw is not None and len(raw) > max_bytes:
        raise SchemaError(
            "oversized", f"the request body is {len(raw)} bytes; the limit is {max_bytes} bytes"
        )
    return decode(PromptMessage, raw)
