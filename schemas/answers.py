"""The answer side: what the answers topic carries, exactly the objects OpenAI returns.

| ce_type               | model            | body                                           |
|-----------------------|------------------|------------------------------------------------|
| `sluice.answer`       | `ChatCompletion` | OpenAI's `chat.completion` (one choice)        |
| `sluice.answer.error` | `ErrorAnswer`    | `{"error": {"message", "type", "param", "code"}}` |

Answers keep OpenAI's explicit nulls (`refusal`, `logprobs`, `param`, `code`) on the wire.
Sluice facts about an answer (request id, degraded, timings) travel in headers, never in the
body. `Usage` is OpenAI's token count, also carried by compute's `GeneratedMessage`.
"""

from __future__ import annotations

import time
from typing import ClassVar, Final, Literal, Self

from pydantic import Field

from schemas.errors import SchemaError
from schemas.wire import Message, WireModel, load_object, validate

CE_ANSWER: Final = "sluice.answer"
CE_ANSWER_ERROR: Final = "sluice.answer.error"

# OpenAI error `type` values Sluice emits, and the `code` values that refine them.
INVALID_REQUEST_ERROR: Final = "invalid_request_error"
SERVER_ERROR: Final = "server_error"
CONTEXT_LENGTH_EXCEEDED: Final = "context_length_exceeded"
CIRCUIT_OPEN: Final = "circuit_open"
TIMEOUT: Final = "timeout"
EXPIRED: Final = "expired"  # the request's deadline passed before it was served
CANCELLED: Final = "cancelled"  # the asker cancelled it (or left) before it was served

AnswerFinishReason = Literal["stop", "length", "content_filter"]


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


_HTTP_STATUS: Final[dict[str | None, int]] = {
    CIRCUIT_OPEN: 503,
    TIMEOUT: 504,
    EXPIRED: 504,
    CANCELLED: 499,
}


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


def decode_answer(data: bytes | None) -> ChatCompletion | ErrorAnswer:
    """Parse an answers-topic value: an error object if it has `error`, else a completion."""
    obj = load_object(data)
    model_cls: type[ChatCompletion | ErrorAnswer] = (
        ErrorAnswer if "error" in obj else ChatCompletion
    )
    return validate(model_cls, obj)
