"""Dead-letter headers: Spring Kafka's DeadLetterPublishingRecoverer set (which Sluice writes)
and Kafka Connect's error context (which replay also reads).

Spring writes `kafka_dlt-original-partition/-offset/-timestamp` as big-endian binary integers
(partition 4 bytes, offset and timestamp 8 bytes); Kafka Connect's
`__connect.errors.partition/-offset` are ASCII decimal. `decode_dlt_int` reads both.
"""

from __future__ import annotations

import re
import struct
import traceback
from dataclasses import dataclass
from typing import Final, Literal

from schemas.headers import SLUICE_DLT_REASON, Headers, HeadersIn, header_bytes, header_value

# Spring Kafka DeadLetterPublishingRecoverer.
DLT_ORIGINAL_TOPIC: Final = "kafka_dlt-original-topic"
DLT_ORIGINAL_PARTITION: Final = "kafka_dlt-original-partition"
DLT_ORIGINAL_OFFSET: Final = "kafka_dlt-original-offset"
DLT_ORIGINAL_TIMESTAMP: Final = "kafka_dlt-original-timestamp"
DLT_ORIGINAL_TIMESTAMP_TYPE: Final = "kafka_dlt-original-timestamp-type"
DLT_ORIGINAL_CONSUMER_GROUP: Final = "kafka_dlt-original-consumer-group"
DLT_EXCEPTION_FQCN: Final = "kafka_dlt-exception-fqcn"
DLT_EXCEPTION_CAUSE_FQCN: Final = "kafka_dlt-exception-cause-fqcn"
DLT_EXCEPTION_MESSAGE: Final = "kafka_dlt-exception-message"
DLT_EXCEPTION_STACKTRACE: Final = "kafka_dlt-exception-stacktrace"

# Kafka Connect errors.deadletterqueue.context.headers.enable=true.
CONNECT_ERRORS_TOPIC: Final = "__connect.errors.topic"
CONNECT_ERRORS_PARTITION: Final = "__connect.errors.partition"
CONNECT_ERRORS_OFFSET: Final = "__connect.errors.offset"
CONNECT_ERRORS_CONNECTOR_NAME: Final = "__connect.errors.connector.name"
CONNECT_ERRORS_TASK_ID: Final = "__connect.errors.task.id"
CONNECT_ERRORS_STAGE: Final = "__connect.errors.stage"
CONNECT_ERRORS_CLASS_NAME: Final = "__connect.errors.class.name"
CONNECT_ERRORS_EXCEPTION_CLASS_NAME: Final = "__connect.errors.exception.class.name"
CONNECT_ERRORS_EXCEPTION_MESSAGE: Final = "__connect.errors.exception.message"
CONNECT_ERRORS_EXCEPTION_STACKTRACE: Final = "__connect.errors.exception.stacktrace"

MAX_STACKTRACE_BYTES: Final = 16 * 1024

_DLT_SET: Final = frozenset(
    {
        DLT_ORIGINAL_TOPIC,
        DLT_ORIGINAL_PARTITION,
        DLT_ORIGINAL_OFFSET,
        DLT_ORIGINAL_TIMESTAMP,
        DLT_ORIGINAL_TIMESTAMP_TYPE,
        DLT_ORIGINAL_CONSUMER_GROUP,
        DLT_EXCEPTION_FQCN,
        DLT_EXCEPTION_CAUSE_FQCN,
        DLT_EXCEPTION_MESSAGE,
        DLT_EXCEPTION_STACKTRACE,
        SLUICE_DLT_REASON,
    }
)


# --- dead letters ----------------------------------------------------------------------------


def encode_int32(value: int) -> bytes:
    """Big-endian signed 4 bytes, as Spring writes `kafka_dlt-original-partition`."""
    return struct.pack(">i", value)


def encode_int64(value: int) -> bytes:
    """Big-endian signed 8 bytes, as Spring writes `kafka_dlt-original-offset/-timestamp`."""
    return struct.pack(">q", value)


_DECIMAL_RE: Final = re.compile(rb"\s*-?[0-9]+\s*")


def decode_dlt_int(value: bytes) -> int:
    """Read a dead-letter integer header written by Spring (binary) or Kafka Connect (text).

    ASCII decimal (`b"42"`, optional sign and surrounding spaces) is tried first; otherwise 4
    or 8 bytes are a big-endian signed integer. The one ambiguity, a 4- or 8-byte value whose
    every byte is an ASCII digit, is read as decimal: as binary it would be a partition above
    808 million or an offset/timestamp above 3.4e18, which real records never have.

    Raises ValueError for anything else.
    """
    if _DECIMAL_RE.fullmatch(value):
        return int(value)
    if len(value) == 4:
        return int(struct.unpack(">i", value)[0])
    if len(value) == 8:
        return int(struct.unpack(">q", value)[0])
    raise ValueError(f"not a dead-letter integer header: {len(value)} bytes, neither 4 nor 8")


# Kafka's TimestampType ids and the names Spring writes for them (TimestampType.toString()).
TIMESTAMP_TYPE_NAMES: Final = {0: "CreateTime", 1: "LogAppendTime"}


def timestamp_type_name(timestamp_type: int) -> str:
    """``CreateTime`` (0) or ``LogAppendTime`` (1), as Spring writes the header; anything else
    (-1, a record without a timestamp) is ``NoTimestampType``, Kafka's name for it."""
    return TIMESTAMP_TYPE_NAMES.get(timestamp_type, "NoTimestampType")


def _fqcn(exc: BaseException) -> str:
    cls = type(exc)
    return f"{cls.__module__}.{cls.__qualname__}"


def make_dlt_headers(
    original: HeadersIn | None,
    *,
    topic: str,
    partition: int,
    offset: int,
    timestamp_ms: int,
    group: str,
    reason: str,
    exc: BaseException | None = None,
    message: str | None = None,
    timestamp_type: int = 0,
) -> Headers:
    """The headers of a dead letter: the original ones plus the Spring Kafka set.

    Dead-letter headers already on the original (a message dead-lettered before) are replaced,
    so a record carries one set. The exception's class and text come from `exc`; `message`
    replaces its text in both the message and the stack-trace headers (for exceptions whose text
    might quote a prompt). Without `exc`, the message is `message` or else `reason`. The stack
    trace is capped at `MAX_STACKTRACE_BYTES`. `timestamp_type` is Kafka's id (0 CreateTime,
    1 LogAppendTime), written by name as Spring writes it. Null original header values become
    empty.
    """
    headers: Headers = [
        (name, value or b"") for name, value in original or () if name.lower() not in _DLT_SET
    ]
    headers += [
        (DLT_ORIGINAL_TOPIC, topic.encode()),
        (DLT_ORIGINAL_PARTITION, encode_int32(partition)),
        (DLT_ORIGINAL_OFFSET, encode_int64(offset)),
        (DLT_ORIGINAL_TIMESTAMP, encode_int64(timestamp_ms)),
        (DLT_ORIGINAL_TIMESTAMP_TYPE, timestamp_type_name(timestamp_type).encode()),
        (DLT_ORIGINAL_CONSUMER_GROUP, group.encode()),
    ]
    text = message if message is not None else (str(exc) if exc is not None else reason)
    if exc is not None:
        headers.append((DLT_EXCEPTION_FQCN, _fqcn(exc).encode()))
        if exc.__cause__ is not None:
            headers.append((DLT_EXCEPTION_CAUSE_FQCN, _fqcn(exc.__cause__).encode()))
        if message is None:
            stack = "".join(traceback.format_exception(exc)).encode()
        else:  # the override exists to keep the exception's own text out of the record
            frames = "".join(traceback.format_tb(exc.__traceback__))
            stack = f"Traceback (most recent call last):\n{frames}{_fqcn(exc)}: {text}\n".encode()
        headers.append((DLT_EXCEPTION_STACKTRACE, stack[:MAX_STACKTRACE_BYTES]))
    headers.append((DLT_EXCEPTION_MESSAGE, text.encode()))
    headers.append((SLUICE_DLT_REASON, reason.encode()))
    return headers


@dataclass(frozen=True, slots=True)
class DeadLetterInfo:
    """Where a dead letter came from and why, from either header set; any field may be None."""

    convention: Literal["spring", "connect"]
    topic: str | None
    partition: int | None
    offset: int | None
    timestamp_ms: int | None
    group: str | None
    exception_class: str | None
    exception_message: str | None
    stacktrace: str | None
    reason: str | None
    timestamp_type: str | None = None  # CreateTime / LogAppendTime (Spring only)


def _int_header(headers: HeadersIn, name: str) -> int | None:
    raw = header_bytes(headers, name)
    if raw is None:
        return None
    try:
        return decode_dlt_int(raw)
    except ValueError:
        return None


def parse_dlt_headers(headers: HeadersIn | None) -> DeadLetterInfo | None:
    """Read the Spring Kafka (`kafka_dlt-*`) or else Kafka Connect (`__connect.errors.*`) set.

    None when the record carries neither. Unreadable integers come back as None.
    """
    headers = headers or ()
    reason = header_value(headers, SLUICE_DLT_REASON)
    if header_bytes(headers, DLT_ORIGINAL_TOPIC) is not None:
        return DeadLetterInfo(
            convention="spring",
            topic=header_value(headers, DLT_ORIGINAL_TOPIC),
            partition=_int_header(headers, DLT_ORIGINAL_PARTITION),
            offset=_int_header(headers, DLT_ORIGINAL_OFFSET),
            timestamp_ms=_int_header(headers, DLT_ORIGINAL_TIMESTAMP),
            group=header_value(headers, DLT_ORIGINAL_CONSUMER_GROUP),
            exception_class=header_value(headers, DLT_EXCEPTION_FQCN),
            exception_message=header_value(headers, DLT_EXCEPTION_MESSAGE),
            stacktrace=header_value(headers, DLT_EXCEPTION_STACKTRACE),
            reason=reason,
            timestamp_type=header_value(headers, DLT_ORIGINAL_TIMESTAMP_TYPE),
        )
    if header_bytes(headers, CONNECT_ERRORS_TOPIC) is not None:
        return DeadLetterInfo(
            convention="connect",
            topic=header_value(headers, CONNECT_ERRORS_TOPIC),
            partition=_int_header(headers, CONNECT_ERRORS_PARTITION),
            offset=_int_header(headers, CONNECT_ERRORS_OFFSET),
            timestamp_ms=None,
            group=None,
            exception_class=header_value(headers, CONNECT_ERRORS_EXCEPTION_CLASS_NAME),
            exception_message=header_value(headers, CONNECT_ERRORS_EXCEPTION_MESSAGE),
            stacktrace=header_value(headers, CONNECT_ERRORS_EXCEPTION_STACKTRACE),
            reason=reason,
        )
    return None
