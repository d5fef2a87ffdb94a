"""Why a message was refused, said precisely enough to act on.

`SchemaError` is what decoding raises for bytes that can never become the expected message: the
pipeline loop dead-letters the original bytes with `reason` as `sluice-dlt-reason`, and the
prompt stage answers with an OpenAI error object built from `message` and `param`. Retrying
does not help, so the error says so with `retriable = False`.

Reasons never quote the input: they name fields and constraints, so they are safe to put in
logs, headers and error answers (prompt text never reaches a log).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Final, Literal

import pydantic

__all__ = [
    "MAX_REASON_CHARS",
    "SchemaError",
    "SchemaReason",
    "format_loc",
    "validation_error_reason",
]

SchemaReason = Literal["bad-json", "schema", "oversized", "empty-messages"]
"""Short, stable, machine-readable reasons (used as `sluice-dlt-reason` and metric labels)."""

MAX_REASON_CHARS: Final = 500


class SchemaError(ValueError):
    """A message that does not decode into its schema; never worth a retry.

    Attributes:
        reason: one of `bad-json`, `schema`, `oversized`, `empty-messages`.
        message: a human sentence naming the field and the constraint, no input text.
        param: the offending field path in OpenAI's style (`messages[0].content`), or None when
            the whole body is at fault.
    """

    retriable: ClassVar[bool] = False
    fatal: ClassVar[bool] = False

    def __init__(self, reason: SchemaReason, message: str, param: str | None = None) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason: SchemaReason = reason
        self.message = message
        self.param = param


def format_loc(loc: Sequence[int | str]) -> str:
    """Render a pydantic error location the way OpenAI names params: `messages[0].content`."""
    out: list[str] = []
    for part in loc:
        if isinstance(part, int):
            out.append(f"[{part}]")
        elif out:
            out.append(f".{part}")
        else:
            out.append(part)
    return "".join(out)


def validation_error_reason(
    exc: pydantic.ValidationError, max_chars: int = MAX_REASON_CHARS
) -> str:
    """One line per problem, `path: message`, joined with "; " and capped at `max_chars`.

    >>> validation_error_reason(err)  # doctest: +SKIP
    'messages[0].content: String should have at least 1 character'
    """
    parts: list[str] = []
    for error in exc.errors(include_url=False, include_input=False, include_context=False):
        path = format_loc(error["loc"])
        parts.append(f"{path}: {error['msg']}" if path else error["msg"])
    text = "; ".join(parts) or "invalid message"
    if len(text) <= max_chars:
        return text
    suffix = f" ... ({len(parts)} errors)"
    return text[: max(0, max_chars - len(suffix))].rstrip("; ") + suffix
