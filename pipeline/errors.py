"""One root exception; the loop decides retry / dead-letter / crash from its flags.

- ``retriable``: worth another attempt (with backoff) before giving up on the record.
- ``fatal``: the process cannot go on (bad configuration, lost producer): stop the stage.
- ``fault``: the stage itself failed (model error, stall, bug), so it counts towards opening the
  circuit breaker. Bad input is not a fault: a flood of malformed prompts must not open it.

``reason`` is the short, stable word that goes into ``sluice-dlt-reason`` and metric labels;
``error_type`` / ``code`` / ``param`` shape the OpenAI error answer.
"""

from __future__ import annotations

from typing import ClassVar

from schemas.errors import SchemaError
from schemas.messages import (
    CANCELLED,
    CIRCUIT_OPEN,
    EXPIRED,
    INVALID_REQUEST_ERROR,
    SERVER_ERROR,
    ErrorAnswer,
)


class SluiceError(Exception):
    retriable: ClassVar[bool] = False
    fatal: ClassVar[bool] = False
    fault: ClassVar[bool] = True
    reason: str = "stage-error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason

    def answer(self) -> ErrorAnswer:
        """The OpenAI error object the producer gets for this failure."""
        return ErrorAnswer.server_error(self.message)


class InvalidInput(SluiceError):
    """The record can never be processed as it is (bad JSON, schema, too long)."""

    fault = False
    reason = "schema"

    def __init__(
        self,
        message: str,
        *,
        reason: str = "schema",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message, reason=reason)
        self.param = param
        self.code = code

    def answer(self) -> ErrorAnswer:
        return ErrorAnswer.build(
            self.message, type=INVALID_REQUEST_ERROR, code=self.code, param=self.param
        )

    @classmethod
    def from_schema(cls, exc: SchemaError) -> InvalidInput:
        return cls(exc.message, reason=exc.reason, param=exc.param)


class TransientError(SluiceError):
    """A passing failure (timeout, a busy dependency): retried before it is dead-lettered."""

    retriable = True
    reason = "transient"


class StageFault(SluiceError):
    """The stage failed on a valid record (model error, stall): counts for the breaker."""

    reason = "stage-fault"


class CircuitOpen(SluiceError):
    """Not attempted: the stage's breaker is open."""

    fault = False
    reason = "circuit-open"

    def answer(self) -> ErrorAnswer:
        return ErrorAnswer.build(self.message, type=SERVER_ERROR, code=CIRCUIT_OPEN)


class Expired(SluiceError):
    """Not served: the request's deadline (``sluice-deadline``) passed first. Not a fault; its
    dead letter (reason ``expired``) is re-driven by ``sluice replay dlq --reason expired``."""

    fault = False
    reason = "expired"

    def answer(self) -> ErrorAnswer:
        return ErrorAnswer.build(self.message, type=SERVER_ERROR, code=EXPIRED)


class Cancelled(SluiceError):
    """Not served (or stopped mid-generation): the asker cancelled it. Not a fault."""

    fault = False
    reason = "cancelled"

    def answer(self) -> ErrorAnswer:
        return ErrorAnswer.build(self.message, type=SERVER_ERROR, code=CANCELLED)


class FatalError(SluiceError):
    """The process cannot continue; the stage stops (and is restarted by its supervisor)."""

    fatal = True
    reason = "fatal"


def as_sluice_error(exc: BaseException) -> SluiceError:
    """Any exception a handler lets escape, as a SluiceError the loop can act on."""
    if isinstance(exc, SluiceError):
        return exc
    if isinstance(exc, SchemaError):
        return InvalidInput.from_schema(exc)
    error = StageFault(f"{type(exc).__name__} in handler", reason="handler-exception")
    error.__cause__ = exc
    return error
