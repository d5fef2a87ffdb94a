"""A tolerant reader of Kafka's record batch format (v2), for records aiokafka cannot unpack.

aiokafka decodes header keys as UTF-8 while it iterates a fetched batch; one record whose header
key is not UTF-8 makes every ``getmany`` fail at that batch, and records behind it are never
returned. This reader walks the same bytes, keeps header keys as bytes, and says for each record
whether aiokafka would have accepted it, so the records around a bad one can still be handled.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from aiokafka.codec import gzip_decode, lz4_decode, snappy_decode, zstd_decode
from aiokafka.record.util import decode_varint

# baseOffset batchLength partitionLeaderEpoch magic crc attributes lastOffsetDelta
# baseTimestamp maxTimestamp producerId producerEpoch baseSequence recordCount
_BATCH = struct.Struct(">qiibIhiqqqhii")
_LOG_OVERHEAD = 12  # baseOffset + batchLength precede what batchLength counts
_CODEC_MASK = 0x07
_TIMESTAMP_TYPE_MASK = 0x08
_CONTROL_MASK = 0x20
_DECODERS = {1: gzip_decode, 2: snappy_decode, 3: lz4_decode, 4: zstd_decode}


@dataclass(frozen=True, slots=True)
class RawRecord:
    """One record as it is on the wire; header keys stay bytes."""

    offset: int
    timestamp_ms: int
    timestamp_type: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[bytes, bytes | None], ...]

    @property
    def problem(self) -> str | None:
        """Why aiokafka cannot hand this record over, or None when it can."""
        for name, _ in self.headers:
            try:
                name.decode("utf-8")
            except UnicodeDecodeError:
                return "a header key is not UTF-8"
        return None


@dataclass(frozen=True, slots=True)
class RawBatch:
    base_offset: int
    next_offset: int  # the offset after the batch's last (even if compaction removed it)
    control: bool
    records: tuple[RawRecord, ...]


def _bytes(buf: bytes, pos: int) -> tuple[bytes | None, int]:
    length, pos = decode_varint(buf, pos)
    if length < 0:
        return None, pos
    end = pos + length
    if end > len(buf):
        raise ValueError("a record field runs past the end of its batch")
    return bytes(buf[pos:end]), end


def _records(
    data: bytes, count: int, base_offset: int, base_ts: int, ts_type: int
) -> Iterator[RawRecord]:
    pos = 0
    for _ in range(count):
        length, pos = decode_varint(data, pos)
        end = pos + length
        pos += 1  # attributes (unused)
        ts_delta, pos = decode_varint(data, pos)
        offset_delta, pos = decode_varint(data, pos)
        key, pos = _bytes(data, pos)
        value, pos = _bytes(data, pos)
        n_headers, pos = decode_varint(data, pos)
        headers: list[tuple[bytes, bytes | None]] = []
        for _h in range(n_headers):
            name, pos = _bytes(data, pos)
            header_value, pos = _bytes(data, pos)
            headers.append((name or b"", header_value))
        if pos != end:
            raise ValueError("a record's length does not match its fields")
        yield RawRecord(
            base_offset + offset_delta, base_ts + ts_delta, ts_type, key, value, tuple(headers)
        )


def read_batches(buf: bytes) -> Iterator[RawBatch]:
    """The complete v2 batches in ``buf`` (a fetch response's records); a partial batch at the
    end (the fetch size cut it) is left out. Raises ValueError on bytes that are not batches."""
    pos = 0
    while pos + _BATCH.size <= len(buf):
        (base, length, _epoch, magic, _crc, attrs, last_delta, base_ts, _max_ts, _pid, _pe, _seq,
         count) = _BATCH.unpack_from(buf, pos)  # fmt: skip
        end = pos + _LOG_OVERHEAD + length
        if end > len(buf):
            return
        if magic != 2:
            raise ValueError(f"record batch magic {magic} at offset {base}: only v2 is read")
        data = bytes(buf[pos + _BATCH.size : end])
        codec = attrs & _CODEC_MASK
        if codec:
            data = _DECODERS[codec](data)
        ts_type = 1 if attrs & _TIMESTAMP_TYPE_MASK else 0
        records = tuple(_records(data, count, base, base_ts, ts_type))
        yield RawBatch(base, base + last_delta + 1, bool(attrs & _CONTROL_MASK), records)
        pos = end
