"""Records aiokafka will not write: header keys that are not UTF-8, produced as a raw batch.

aiokafka's producer encodes header keys as UTF-8 text, as every well-behaved client does; Kafka's
wire format allows any bytes. To put such a record on a topic, a batch is built with a
placeholder key of the same length, the placeholder is replaced in the built bytes, and the
batch's CRC-32C (over everything from the attributes field on) is computed again.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.util import calc_crc32c

# Record batch v2: baseOffset(8) batchLength(4) partitionLeaderEpoch(4) magic(1) crc(4) attrs...
_CRC_AT = 17
_CRC_FROM = 21

RawHeaders = Sequence[tuple[bytes, bytes | None]]
RawRecord = tuple[bytes | None, bytes | None, RawHeaders]  # key, value, headers (bytes keys)


def _placeholder(i: int, length: int) -> str:
    stem = f"~{i:06d}~"
    if length < len(stem):
        raise ValueError(f"raw header keys must be at least {len(stem)} bytes, got {length}")
    return (stem + "~" * length)[:length]


def _text_headers(
    records: Sequence[RawRecord],
) -> tuple[list[list[tuple[str, bytes | None]]], list[tuple[bytes, bytes]]]:
    """Each record's headers with placeholder names for the non-UTF-8 ones, and the swaps."""
    swaps: list[tuple[bytes, bytes]] = []
    out: list[list[tuple[str, bytes | None]]] = []
    for _key, _value, headers in records:
        text_headers: list[tuple[str, bytes | None]] = []
        for name, header_value in headers:
            try:
                text_headers.append((name.decode("utf-8"), header_value))
            except UnicodeDecodeError:
                holder = _placeholder(len(swaps), len(name))
                swaps.append((holder.encode(), name))
                text_headers.append((holder, header_value))
        out.append(text_headers)
    return out, swaps


def _patch(built: bytes, swaps: Sequence[tuple[bytes, bytes]]) -> bytes:
    raw = bytearray(built)
    for holder, name in swaps:
        at = raw.find(holder)
        if at < 0:
            raise AssertionError("placeholder header key not found in the built batch")
        raw[at : at + len(holder)] = name
    if swaps:
        struct.pack_into(">I", raw, _CRC_AT, calc_crc32c(bytes(raw[_CRC_FROM:])))
    return bytes(raw)


def build_raw_batch(records: Sequence[RawRecord], base_offset: int = 0) -> bytes:
    """One v2 batch of ``records`` as it would sit in a fetch response (for unit tests)."""
    builder = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=0,
        is_transactional=False,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=64 << 20,
    )
    headers, swaps = _text_headers(records)
    for i, ((key, value, _), text) in enumerate(zip(records, headers, strict=True)):
        builder.append(i, timestamp=1_700_000_000_000 + i, key=key, value=value, headers=text)
    raw = bytearray(_patch(bytes(builder.build()), swaps))
    struct.pack_into(">q", raw, 0, base_offset)
    return bytes(raw)


async def send_raw_batch(
    producer: AIOKafkaProducer, topic: str, partition: int, records: Sequence[RawRecord]
) -> Any:
    """Send ``records`` as one batch to ``topic[partition]``; header keys may be any bytes
    (a key that is valid UTF-8 is written as it is). Returns the batch's RecordMetadata."""
    batch = producer.create_batch()
    headers, swaps = _text_headers(records)
    for (key, value, _), text in zip(records, headers, strict=True):
        if batch.append(timestamp=None, key=key, value=value, headers=text) is None:
            raise ValueError("the records do not fit in one batch")
    batch._buffer = _patch(batch._build(), swaps)
    future = await producer.send_batch(batch, topic, partition=partition)
    return await future
