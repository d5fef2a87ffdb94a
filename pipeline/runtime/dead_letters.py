"""Dead letters that always fit: the record's bytes as they came (a null value stays null), the
Spring header set, and, when that is larger than the producer may send, a truncated copy that
says so.

Why truncate rather than park the value in object storage and reference it: the dead-letter path
is the one that must not fail, so it may not depend on one more service (an object store that is
down, or not configured, would turn one oversized record back into a stalled partition). A record
this large was refused for its size anyway, so it can never be re-driven as it is; its first
bytes, its headers and its original size are what an operator needs to find the sender. The
truncation headers make that explicit, so ``replay dlq`` can leave such dead letters alone.
"""

from __future__ import annotations

from aiokafka.record.default_records import DefaultRecordBatchBuilder

from pipeline.config import Topics
from pipeline.errors import SluiceError
from pipeline.runtime.batch import Output, Record
from schemas.dlt import make_dlt_headers
from schemas.headers import SLUICE_REQUEST_ID, Headers

SLUICE_DLT_TRUNCATED = "sluice-dlt-truncated"
"""What was cut to make the dead letter fit: a comma-separated subset of key, value, headers."""
SLUICE_DLT_ORIGINAL_SIZE = "sluice-dlt-original-size"
"""The original value's size in bytes (decimal), on a truncated dead letter."""
SLUICE_DLT_DROPPED_HEADERS = "sluice-dlt-dropped-headers"
"""How many of the original record's headers were left off (decimal)."""

# Room kept for the truncation headers themselves and the batch framing.
_SLACK = 256


def dead_letter(record: Record, *, group: str, error: SluiceError) -> Output:
    """The dead letter of ``record``: its key, its value (a tombstone stays a tombstone), its
    headers plus the Spring set, including ``kafka_dlt-original-timestamp-type``."""
    return Output(
        topic=Topics.dlt(record.topic),
        key=record.key,
        value=record.value or b"",
        headers=make_dlt_headers(
            record.headers,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            timestamp_ms=record.timestamp_ms,
            group=group,
            reason=error.reason,
            exc=error,
            message=error.message,
            timestamp_type=record.timestamp_type,
        ),
        tombstone=record.value is None,
    )


def record_size(key: bytes | None, value: bytes | None, headers: Headers) -> int:
    """What aiokafka compares with ``max_request_size`` before it accepts a record."""
    size: int = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers)
    return size


def fits(output: Output, max_request_size: int) -> bool:
    return record_size(output.key, output.wire_value, output.headers) <= max_request_size


def _utf8_prefix(data: bytes, limit: int) -> bytes:
    """At most ``limit`` bytes of ``data``, never ending inside a UTF-8 sequence (so text stays
    decodable text; binary loses at most three more bytes)."""
    end = max(0, limit)
    while 0 < end < len(data) and (data[end] & 0xC0) == 0x80 and limit - end < 3:
        end -= 1
    return data[:end]


def _kept(name: str) -> bool:
    """Headers a cut-down dead letter keeps: the dead-letter sets and the request id."""
    lower = name.lower()
    return lower.startswith(("kafka_dlt-", "sluice-dlt-")) or lower == SLUICE_REQUEST_ID


def fit_to_request(output: Output, max_request_size: int) -> Output:
    """``output`` as it is when it fits; else a copy cut down to fit ``max_request_size``.

    The value is cut first; then, if the headers alone are too large, the original record's
    headers are left off largest first (the dead-letter set and the request id are kept); then
    the key. The copy carries ``sluice-dlt-truncated`` (what was cut), the value's original size
    and, if headers were dropped, how many.
    """
    if fits(output, max_request_size):
        return output
    value = output.wire_value or b""
    key = output.key
    headers = list(output.headers)
    cut: list[str] = []
    dropped = 0
    budget = max_request_size - _SLACK

    def overhead() -> int:
        return record_size(key, b"", headers)

    if overhead() > budget:
        removable = sorted(
            (i for i, (name, _) in enumerate(headers) if not _kept(name)),
            key=lambda i: len(headers[i][0]) + len(headers[i][1]),
            reverse=True,
        )
        gone: set[int] = set()
        for i in removable:
            if record_size(key, b"", [h for j, h in enumerate(headers) if j not in gone]) <= budget:
                break
            gone.add(i)
        headers = [h for j, h in enumerate(headers) if j not in gone]
        dropped = len(gone)
        if dropped:
            cut.append("headers")
    if overhead() > budget and key:
        key = key[: max(0, len(key) - (overhead() - budget) - 16)]
        cut.append("key")
    room = budget - overhead()
    if room < 0:
        raise ValueError(
            f"a dead letter cannot be made to fit {max_request_size} bytes: its kept headers "
            f"alone take {overhead()}"
        )
    if len(value) > room:
        value = _utf8_prefix(value, room)
        cut.insert(0, "value")
    headers.append((SLUICE_DLT_TRUNCATED, ",".join(cut).encode()))
    headers.append((SLUICE_DLT_ORIGINAL_SIZE, str(len(output.wire_value or b"")).encode()))
    if dropped:
        headers.append((SLUICE_DLT_DROPPED_HEADERS, str(dropped).encode()))
    return Output(output.topic, key, value, headers, tombstone=output.tombstone)
