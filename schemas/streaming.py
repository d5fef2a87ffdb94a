"""Streaming, deadlines, reply routing and cancellation: the headers and the two messages.

- ``sluice-deadline``: epoch milliseconds (decimal). Work whose deadline has passed is not
  done: an ``expired`` error answer and a dead letter with reason ``expired``.
- ``sluice-reply-to``: ``<topic>:<partition>`` (topic names cannot hold a colon), where this
  request's text deltas and a copy of its final answer go, so that each asker (a gateway
  replica, a ``SluiceClient``) reads only its own partition, as Spring's
  ReplyingKafkaTemplate does. The answers topic still gets every answer, keyed by
  conversation, for downstream consumers. Stages copy both headers from input to output.
- :class:`DeltaMessage` (``sluice.delta``): a piece of generated text for one request, on its
  reply partition. ``index`` counts from 0 per request; the concatenated ``delta`` texts equal
  the final answer's content; the last one carries ``finish_reason`` (and ``usage``).
- :class:`CancelMessage` (``sluice.cancel``), on the control topic that every compute worker
  reads: stop this request; its answer is a ``cancelled`` error answer.

:func:`reply_copy` is what the stage that produces an answer adds beside it: the same value and
headers, addressed to the request's reply partition.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar, Final, Self

from pydantic import Field

from schemas.answers import Usage
from schemas.headers import Headers, HeadersIn, header_value
from schemas.wire import Message

SLUICE_DEADLINE: Final = "sluice-deadline"
SLUICE_REPLY_TO: Final = "sluice-reply-to"
CE_DELTA: Final = "sluice.delta"
CE_CANCEL: Final = "sluice.cancel"


def now_ms() -> int:
    return int(time.time() * 1000)


def deadline_header(deadline_ms: int) -> tuple[str, bytes]:
    return SLUICE_DEADLINE, str(int(deadline_ms)).encode()


def deadline_in(seconds: float) -> int:
    """The deadline ``seconds`` from now, in epoch milliseconds."""
    return now_ms() + int(seconds * 1000)


def parse_deadline(headers: HeadersIn) -> int | None:
    """The record's deadline in epoch ms; None when absent or not a decimal integer (a
    malformed deadline is ignored rather than expiring the request)."""
    raw = header_value(headers, SLUICE_DEADLINE)
    if raw is None:
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        return None
    return value if value > 0 else None


def expired(headers: HeadersIn, at_ms: int | None = None) -> bool:
    """True when the record carries a deadline that has passed."""
    deadline = parse_deadline(headers)
    return deadline is not None and (now_ms() if at_ms is None else at_ms) >= deadline


@dataclass(frozen=True)
class ReplyTo:
    """Where a request's deltas and answer copy go."""

    topic: str
    partition: int

    def header(self) -> tuple[str, bytes]:
        return SLUICE_REPLY_TO, f"{self.topic}:{self.partition}".encode()

    @classmethod
    def parse(cls, raw: str) -> Self | None:
        topic, sep, partition = raw.rpartition(":")
        if not sep or not topic or not partition.isdigit():
            return None
        return cls(topic, int(partition))


def parse_reply_to(headers: HeadersIn) -> ReplyTo | None:
    """The record's reply address; None when absent or malformed."""
    raw = header_value(headers, SLUICE_REPLY_TO)
    return None if raw is None else ReplyTo.parse(raw)


def reply_copy(answer_headers: HeadersIn, value: bytes) -> tuple[str, int, Headers, bytes] | None:
    """The copy of an answer for its asker: ``(topic, partition, headers, value)`` at the
    answer's ``sluice-reply-to`` (carried over from the request), or None when the answer
    names no (readable) reply address. Headers and value are the answer's own, so the copy is
    the same CloudEvent (``ce_type``, request id, attempt, timings) as the answer."""
    address = parse_reply_to(answer_headers)
    if address is None:
        return None
    headers = [(name, raw) for name, raw in answer_headers if raw is not None]
    return address.topic, address.partition, headers, value


class DeltaMessage(Message):
    """Generated text for one request, while it is generated."""

    ce_type: ClassVar[str] = CE_DELTA

    id: str = Field(min_length=1)
    index: int = Field(ge=0)
    delta: str
    finish_reason: str | None = None
    usage: Usage | None = None


class CancelMessage(Message):
    """Stop serving a request (on the control topic)."""

    ce_type: ClassVar[str] = CE_CANCEL

    id: str = Field(min_length=1)
    reason: str = "cancelled"
