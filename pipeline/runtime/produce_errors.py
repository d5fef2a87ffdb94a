"""Which produce errors lose one record and which lose the producer.

A record-level error is about the record being sent: it is too large for the producer's
``max_request_size`` (raised by ``send`` before anything is queued) or for the topic's
``max.message.bytes`` (refused by the broker), or the broker found it invalid or corrupt, or its
timestamp out of range. The stage goes on: the input record gets a dead letter of what fits and
an error answer. Everything else (the broker unreachable, a timeout after the producer's own
retries, the producer fenced or closed, authorisation) means this process can no longer deliver
anything, and it is fatal: the process exits and is restarted.

``send_outputs`` is the loop's produce step with this split made: it sends every output, makes
dead letters fit, and returns the outputs refused at record level with the error to answer with.
Its ``max_request_size`` must not exceed the smallest ``max.message.bytes`` of the topics the
stage writes (and the producer's own ``max_request_size``): then nothing too large reaches the
broker, which matters because the idempotent producer does not survive a broker-side refusal
(the next send to that partition fails with ``OutOfOrderSequenceNumber``, which is fatal).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka.errors import (
    CorruptRecordException,
    InvalidTimestampError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
    UnknownError,
)

from pipeline.errors import FatalError, InvalidInput, SluiceError
from pipeline.runtime.batch import Output
from pipeline.runtime.dead_letters import fit_to_request, fits

log = logging.getLogger(__name__)

_TOO_LARGE = (MessageSizeTooLargeError, RecordTooLargeError, RecordListTooLargeError)
# The broker's INVALID_RECORD (87) is newer than aiokafka's table, which reports it (and any
# other per-partition code it does not know) as UnknownError: one record batch refused, the
# connection and the producer intact, so it is treated as the record's problem too.
_INVALID = (CorruptRecordException, InvalidTimestampError, UnknownError)
# What send() and its future raise: Kafka's errors, and argument checks before queueing.
_SEND_ERRORS = (KafkaError, TypeError, ValueError, AssertionError)


class RecordRejected(InvalidInput):
    """Kafka refused one record Sluice tried to produce; the producer is fine."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message, reason=reason)


def is_record_level(exc: BaseException) -> bool:
    """Does ``exc`` (raised by ``send`` or by its delivery future) concern only that record?"""
    if isinstance(exc, (*_TOO_LARGE, *_INVALID)):
        return True
    # send() checks its arguments before queueing: a key, value or header of the wrong type.
    return isinstance(exc, (TypeError, ValueError, AssertionError)) and not isinstance(
        exc, KafkaError
    )


def classify(exc: BaseException, *, stage: str, topic: str) -> SluiceError:
    """``RecordRejected`` (record level) or ``FatalError`` (the producer or broker is lost)."""
    if isinstance(exc, _TOO_LARGE):
        error: SluiceError = RecordRejected(
            f"the {stage} stage could not produce to {topic}: the record is larger than "
            f"Kafka accepts ({type(exc).__name__})",
            reason="record-too-large",
        )
    elif is_record_level(exc):
        error = RecordRejected(
            f"the {stage} stage could not produce to {topic}: Kafka refused the record "
            f"({type(exc).__name__})",
            reason="invalid-record",
        )
    else:
        error = FatalError(f"stage {stage}: producing to {topic} failed: {exc!r}")
    error.__cause__ = exc
    return error


@dataclass(frozen=True, slots=True)
class Refused:
    """An output Kafka would not take, with the error its input record is answered with."""

    index: int  # its position in the outputs handed to send_outputs
    output: Output
    error: SluiceError


async def send_outputs(
    producer: Any, outputs: Sequence[Output], *, stage: str, max_request_size: int
) -> list[Refused]:
    """Send every output and wait for every acknowledgement.

    Dead letters (``*.DLT``) are cut down to fit ``max_request_size`` first (see
    ``fit_to_request``). Returns what Kafka refused at record level, in order; raises
    ``FatalError`` when the producer or the broker is lost. A dead letter refused at record
    level is fatal too: there is nowhere left to put it.
    """
    refused: list[Refused] = []
    pending: list[tuple[int, Output, asyncio.Future[Any]]] = []
    for i, output in enumerate(outputs):
        out = output
        if _is_dlt(output.topic):
            out = fit_to_request(output, max_request_size)
        elif not fits(output, max_request_size):
            # Refused here, never sent: with the idempotent producer, a batch the broker
            # refuses leaves a gap in the partition's sequence numbers, and the next send to
            # that partition fails with OutOfOrderSequenceNumber (fatal).
            too_large = MessageSizeTooLargeError(f"larger than {max_request_size} bytes")
            refused.append(_refusal(i, out, too_large, stage))
            continue
        try:
            future = await producer.send(
                out.topic, out.wire_value, key=out.key, headers=out.headers, partition=out.partition
            )
        except _SEND_ERRORS as exc:  # record level is returned, the rest is fatal
            refused.append(_refusal(i, out, exc, stage))
            continue
        pending.append((i, out, future))
    for i, out, future in pending:
        try:
            await future
        except _SEND_ERRORS as exc:
            refused.append(_refusal(i, out, exc, stage))
    refused.sort(key=lambda r: r.index)
    return refused


def _is_dlt(topic: str) -> bool:
    return topic.endswith(".DLT")


def _refusal(index: int, output: Output, exc: BaseException, stage: str) -> Refused:
    error = classify(exc, stage=stage, topic=output.topic)
    if error.fatal or _is_dlt(output.topic):
        if not error.fatal:
            error = FatalError(
                f"stage {stage}: a dead letter to {output.topic} was refused: {exc!r}"
            )
            error.__cause__ = exc
        raise error
    log.warning(
        "stage %s: Kafka refused a record for %s (%s); its input is dead-lettered",
        stage,
        output.topic,
        type(exc).__name__,
    )
    return Refused(index, output, error)
