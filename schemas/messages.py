"""The four messages that move through Sluice, and their JSON codec.

| topic     | ce_type                                  | model                             |
|-----------|------------------------------------------|-----------------------------------|
| prompts   | `sluice.prompt`                          | `PromptMessage`                   |
| tokenized | `sluice.tokenized`                       | `TokenizedMessage`                |
| generated | `sluice.generated`                       | `GeneratedMessage`                |
| answers   | `sluice.answer` / `sluice.answer.error`  | `ChatCompletion` / `ErrorAnswer`  |

Every model ignores unknown fields, so a newer producer never breaks an older consumer during a
rolling upgrade. On the wire (`encode`), Sluice's own messages leave out None fields; answers
keep OpenAI's explicit nulls (`refusal`, `logprobs`, `param`, `code`) because they are exactly
the objects OpenAI returns. Sluice facts about an answer (request id, degraded, timings) travel
in headers, never in the body.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Final, Literal, Self, TypeVar

import orjson
import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from schemas.errors import SchemaError, format_loc, validation_error_reason

__all__ = [
    "CE_ANSWER",
    "CE_ANSWER_ERROR",
    "CE_GENERATED",
    "CE_PROMPT",
    "CE_TOKENIZED",
    "CIRCUIT_OPEN",
    "CONTEXT_LENGTH_EXCEEDED",
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
CE_ANSWER: Final = "sluice.answer"
CE_ANSWER_ERROR: Final = "sluice.answer.error"

# OpenAI error `type` values Sluice emits, and the `code` values that refine them.
INVALID_REQUEST_ERROR: Final = "invalid_request_error"
SERVER_ERROR: Final = "server_error"
CONTEXT_LENGTH_EXCEEDED: Final = "context_length_exceeded"
CIRCUIT_OPEN: Final = "circuit_open"
TIMEOUT: Final = "timeout"

Role = Literal["system", "user", "assistant", "tool"]
FinishReason = Literal["stop", "length", "error", "content_filter"]
"""Why generation ended; `error` never reaches an answer (it becomes an `ErrorAnswer`)."""
AnswerFinishReason = Literal["stop", "length", "content_filter"]

M = TypeVar("M", bound="WireModel")


class WireModel(BaseModel):
    """Base of everything Sluice puts on a topic: unknown fields are ignored on decode."""

    model_config = ConfigDict(extra="ignore")

    exclude_none_on_wire: ClassVar[bool] = True


class Message(WireModel):
    """A top-level message; `ce_type` is the CloudEvents type its record carries."""

    ce_type: ClassVar[str]


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
    """One chat turn. `content` is text; a list of text parts is joined into one string."""

    model_config = ConfigDict(extra="ignore", hide_input_in_errors=True)

    role: Role
    content: str
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _join_text_parts(cls, value: object) -> object:
        return _text_of_parts(value)


class PromptMessage(Message):
    """An OpenAI chat-completions request body plus Sluice's `id`, `conversation_id`, `metadata`.

    Fields OpenAI defines that Sluice does not implement (`tools`, `response_format`,
    `logprobs`, penalties, ...) and any unknown fields are ignored, not rejected, so stock
    OpenAI clients work unchanged. `n` must be 1. `stop` is normalised to a list (a single
    string becomes a one-item list; empty strings are dropped). `top_k` is the common
    extension OpenAI lacks. `id` and `conversation_id` are optional on input: the gateway or
    preprocess fills them. Validation errors never echo the input (prompt text stays out of
    logs).
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


class Usage(WireModel):
    """Token counts, in OpenAI's `usage` shape."""

    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Self:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


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


# --- answers ---------------------------------------------------------------------------------


class AssistantMessage(WireModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class Choice(WireModel):
    index: int = Field(default=0, ge=0)
    message: AssistantMessage
    finish_reason: AnswerFinishReason
    logprobs: None = None


class ChatCompletion(Message):
    """Exactly OpenAI's `chat.completion` object (one choice), keys in OpenAI's order."""

    ce_type: ClassVar[str] = CE_ANSWER
    exclude_none_on_wire: ClassVar[bool] = False

    id: str = Field(min_length=1)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(ge=0)
    model: str
    choices: list[Choice] = Field(min_length=1)
    usage: Usage
    system_fingerprint: str | None = None

    @classmethod
    def build(
        cls,
        *,
        id: str,
        model: str,
        content: str,
        finish_reason: AnswerFinishReason,
        usage: Usage,
        created: int | None = None,
        system_fingerprint: str | None = None,
    ) -> Self:
        """A one-choice completion; `created` defaults to now (unix seconds)."""
        return cls(
            id=id,
            created=int(time.time()) if created is None else created,
            model=model,
            choices=[
                Choice(message=AssistantMessage(content=content), finish_reason=finish_reason)
            ],
            usage=usage,
            system_fingerprint=system_fingerprint,
        )

    @property
    def content(self) -> str:
        return self.choices[0].message.content


class ErrorBody(WireModel):
    """OpenAI's error object: `type` is the class of error, `code` refines it."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


_HTTP_STATUS: Final[dict[str | None, int]] = {CIRCUIT_OPEN: 503, TIMEOUT: 504}


class ErrorAnswer(Message):
    """OpenAI's error response body: `{"error": {"message", "type", "param", "code"}}`."""

    ce_type: ClassVar[str] = CE_ANSWER_ERROR
    exclude_none_on_wire: ClassVar[bool] = False

    error: ErrorBody

    @classmethod
    def build(
        cls,
        message: str,
        *,
        type: str = INVALID_REQUEST_ERROR,
        code: str | None = None,
        param: str | None = None,
    ) -> Self:
        return cls(error=ErrorBody(message=message, type=type, param=param, code=code))

    @classmethod
    def invalid_request(cls, message: str, *, param: str | None = None) -> Self:
        return cls.build(message, type=INVALID_REQUEST_ERROR, param=param)

    @classmethod
    def from_schema_error(cls, exc: SchemaError) -> Self:
        return cls.build(exc.message, type=INVALID_REQUEST_ERROR, param=exc.param)

    @classmethod
    def context_length_exceeded(cls, prompt_tokens: int, max_context: int) -> Self:
        return cls.build(
            f"This model's maximum context length is {max_context} tokens. However, your "
            f"messages resulted in {prompt_tokens} tokens. Please reduce the length of the "
            "messages.",
            type=INVALID_REQUEST_ERROR,
            code=CONTEXT_LENGTH_EXCEEDED,
            param="messages",
        )

    @classmethod
    def circuit_open(cls, message: str | None = None) -> Self:
        return cls.build(
            message or "The service is temporarily unavailable (circuit open). Retry later.",
            type=SERVER_ERROR,
            code=CIRCUIT_OPEN,
        )

    @classmethod
    def timeout(cls, message: str | None = None) -> Self:
        return cls.build(
            message or "The request timed out before an answer was generated.",
            type=SERVER_ERROR,
            code=TIMEOUT,
        )

    @classmethod
    def server_error(cls, message: str | None = None) -> Self:
        return cls.build(
            message or "The server had an error while processing your request.",
            type=SERVER_ERROR,
        )

    def http_status(self) -> int:
        """The status an HTTP gateway answers with: 400, 503 (circuit open), 504, else 500."""
        if self.error.type == INVALID_REQUEST_ERROR:
            return 400
        return _HTTP_STATUS.get(self.error.code, 500)


MESSAGE_TYPES: Final[dict[str, type[Message]]] = {
    cls.ce_type: cls
    for cls in (PromptMessage, TokenizedMessage, GeneratedMessage, ChatCompletion, ErrorAnswer)
}


# --- codec -----------------------------------------------------------------------------------


def encode(model: WireModel) -> bytes:
    """UTF-8 JSON bytes (orjson); None fields left out except where OpenAI keeps nulls."""
    return orjson.dumps(
        model.model_dump(mode="json", exclude_none=type(model).exclude_none_on_wire)
    )


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "a string" if isinstance(value, str) else "an array"


def _load_object(data: bytes | None) -> dict[str, Any]:
    if data is None:
        raise SchemaError("bad-json", "the message has no value (tombstone)")
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise SchemaError("bad-json", f"the body is not valid UTF-8 JSON: {exc.msg}") from exc
    if not isinstance(obj, dict):
        raise SchemaError("schema", f"the body must be a JSON object, not {_json_kind(obj)}")
    return obj


def _schema_error(exc: pydantic.ValidationError) -> SchemaError:
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    first = errors[0] if errors else None
    empty = first is not None and (
        first["type"] == "empty_user_message"
        or (first["type"] == "too_short" and tuple(first["loc"]) == ("messages",))
    )
    param = (format_loc(first["loc"]) or None) if first is not None else None
    return SchemaError("empty-messages" if empty else "schema", validation_error_reason(exc), param)


def decode(model_cls: type[M], data: bytes | None) -> M:
    """Parse bytes into `model_cls`; raises `SchemaError` (`bad-json` or `schema`) otherwise."""
    obj = _load_object(data)
    try:
        return model_cls.model_validate(obj)
    except pydantic.ValidationError as exc:
        raise _schema_error(exc) from exc


def decode_answer(data: bytes | None) -> ChatCompletion | ErrorAnswer:
    """Parse an answers-topic value: an error object if it has `error`, else a completion."""
    obj = _load_object(data)
    model_cls: type[ChatCompletion | ErrorAnswer] = (
        ErrorAnswer if "error" in obj else ChatCompletion
    )
    try:
        return model_cls.model_validate(obj)
    except pydantic.ValidationError as exc:
        raise _schema_error(exc) from exc


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
